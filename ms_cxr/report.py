"""Tables for a paper from evaluation reports: label x model AUROC, parameter counts, mean.

  python -m ms_cxr.report runs/densenet_224 runs/densenet_448 runs/ssbn runs/ensemble [--eval_name=test]

Each argument is a workdir (its `eval/<eval_name>/metrics.json` is read) or a metrics.json path. Multi-scale
runs contribute one column per size and one for the fusion, so single-scale, multi-scale and ensemble rows of a
table like the SSBN paper's line up side by side. Prints Markdown.
"""

from __future__ import annotations

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


def columns_of(
  name: str, result: dict[str, Any]
) -> list[tuple[str, int | None, dict, float | None]]:
  """(column title, params, per-label AUROC, mean) for one evaluation: per size, then fused or single."""
  columns = []
  for size, scores in result.get('per_size', {}).items():
    columns.append(
      (f'{name} @{size}', result.get('num_params'), scores['per_class_auroc'], scores['mean_auroc'])
    )
  title = f'{name} ({result["fusion"]})' if 'per_size' in result else name
  columns.append((title, result.get('num_params'), result['per_class_auroc'], result['mean_auroc']))
  return columns


def markdown_table(runs: Sequence[tuple[str, dict[str, Any]]]) -> str:
  """Labels as rows, one column per model (and per size of multi-scale models)."""
  labels = runs[0][1]['labels']
  for name, result in runs:
    if result['labels'] != labels:
      raise UserError(f'{name} has labels {result["labels"]}; the first run has {labels}')
  columns = [c for name, result in runs for c in columns_of(name, result)]

  def cell(v):
    return '–' if v is None else f'{v:.4f}'

  lines = [
    '| label | ' + ' | '.join(c[0] for c in columns) + ' |',
    '|---|' + '---:|' * len(columns),
  ]
  for label in labels:
    lines.append(f'| {label} | ' + ' | '.join(cell(c[2].get(label)) for c in columns) + ' |')
  lines.append('| **mean AUROC** | ' + ' | '.join(f'**{cell(c[3])}**' for c in columns) + ' |')
  params = ['–' if c[1] is None else f'{c[1] / 1e6:.2f}M' for c in columns]
  lines.append('| parameters | ' + ' | '.join(params) + ' |')
  return '\n'.join(lines)


def main(argv: Sequence[str]) -> None:
  paths = argv[1:]
  if not paths:
    raise app.UsageError('give one or more workdirs (or metrics.json files)')
  try:
    runs = [
      (os.path.basename(os.path.normpath(p)), load_metrics(p, FLAGS.eval_name)) for p in paths
    ]
    print(markdown_table(runs))
  except UserError as e:
    raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
  app.run(main)
