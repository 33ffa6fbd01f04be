"""Tables for a paper from evaluation reports: label x model AUROC, parameter counts, mean.

  python -m ms_cxr.report runs/densenet_224 runs/densenet_448 runs/ssbn runs/ensemble [--eval_name=test]

Each argument is a workdir (its `eval/<eval_name>/metrics.json` is read) or a metrics.json path. Multi-scale
runs contribute one column per size and one for the fusion, so single-scale, multi-scale and ensemble rows of a
table like the SSBN paper's line up side by side. Prints Markdown.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from ms_cxr.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_string('eval_name', 'test', 'Report folder under <workdir>/eval/ to read.')


def load_metrics(path: str, eval_name: str = 'test') -> dict[str, Any]:
  """metrics.json of a workdir's evaluation (or the file itself)."""
  file = path if path.endswith('.json') else os.path.join(path, 'eval', eval_name, 'metrics.json')
  try:
    with open(file) as f:
      return json.load(f)
  except FileNotFoundError:
    raise UserError(f'{file} not found: evaluate {path!r} first (--mode=evaluate)') from None


Column = tuple[str, 'int | None', dict, 'float | None', dict, 'list | None']


def columns_of(name: str, result: dict[str, Any]) -> list[Column]:
  """(title, params, per-label AUROC, mean, per-label CI, mean CI) per column: each size, then fused/single."""
  columns = []
  for size, scores in sorted(result.get('per_size', {}).items(), key=lambda item: int(item[0])):
    columns.append(
      (
        f'{name} @{size}',
        result.get('num_params'),
        scores['per_class_auroc'],
        scores['mean_auroc'],
        {},
        None,
      )
    )
  title = f'{name} ({result["fusion"]})' if 'per_size' in result else name
  columns.append(
    (
      title,
      result.get('num_params'),
      result['per_class_auroc'],
      result['mean_auroc'],
      result.get('per_class_auroc_ci') or {},
      result.get('mean_auroc_ci'),
    )
  )
  return columns


def _cell(value: float | None, interval: list | None) -> str:
  if value is None:
    return 'n/a'
  return f'{value:.4f} [{interval[0]:.3f}, {interval[1]:.3f}]' if interval else f'{value:.4f}'


def table(runs: Sequence[tuple[str, dict[str, Any]]], fmt: str = 'md') -> str:
  """Labels as rows, one column per model (and per size of multi-scale models): `AUROC [lo, hi]`.

  Args:
    runs: (name, metrics.json contents) per model, all with the same labels.
    fmt: 'md' (Markdown) or 'csv'.
  """
  labels = runs[0][1]['labels']
  for name, result in runs:
    if result['labels'] != labels:
      raise UserError(f'{name} has labels {result["labels"]}; the first run has {labels}')
  columns = [c for name, result in runs for c in columns_of(name, result)]
  rows = [['label'] + [c[0] for c in columns]]
  rows += [[label] + [_cell(c[2].get(label), c[4].get(label)) for c in columns] for label in labels]
  rows.append(['mean AUROC'] + [_cell(c[3], c[5]) for c in columns])
  rows.append(['parameters'] + ['' if c[1] is None else str(c[1]) for c in columns])
  if fmt == 'csv':
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator='\n').writerows(rows)
    return buffer.getvalue()
  rows[-1] = ['parameters'] + ['–' if c[1] is None else f'{c[1] / 1e6:.2f}M' for c in columns]
  lines = ['| ' + ' | '.join(rows[0]) + ' |', '|---|' + '---:|' * len(columns)]
  lines += ['| ' + ' | '.join(row) + ' |' for row in rows[1:]]
  return '\n'.join(lines) + '\n'


def main(argv: Sequence[str]) -> None:
  paths = argv[1:]
  if not paths:
    raise app.UsageError('give one or more workdirs (or metrics.json files)')
  try:
    runs = [
      (os.path.basename(os.path.normpath(p)), load_metrics(p, FLAGS.eval_name)) for p in paths
    ]
    print(table(runs), end='')
  except UserError as e:
    raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
  app.run(main)
