"""Tables for a paper from evaluation reports: label x model AUROC, parameter counts, mean.

  python -m ms_cxr.report runs/densenet_224 runs/densenet_448 runs/ssbn runs/ensemble [--eval_name=test]
  python -m ms_cxr.report --localization runs/msanet runs/densenet_224     (pointing game and IoU per label)

Each argument is a workdir (its `eval/<eval_name>/metrics.json` is read, or `eval/<eval_name>_ensemble/` where
only an ensemble was evaluated into it) or a metrics.json path. Multi-scale
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

from ms_cxr import cli
from ms_cxr.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_string('eval_name', 'test', 'Report folder under <workdir>/eval/ to read.')
flags.DEFINE_bool(
  'localization',
  False,
  'Print the pointing-game / IoU table of the attention maps instead of AUROC.',
)


def load_metrics(path: str, eval_name: str = 'test') -> dict[str, Any]:
  """metrics.json of a workdir's evaluation (or the file itself). A workdir holding no `eval/<eval_name>` but an
  ensemble's `eval/<eval_name>_ensemble` (a folder made for an ensemble's report) gives that one."""
  file = path if path.endswith('.json') else os.path.join(path, 'eval', eval_name, 'metrics.json')
  ensemble = os.path.join(path, 'eval', f'{eval_name}_ensemble', 'metrics.json')
  if not path.endswith('.json') and not os.path.exists(file) and os.path.exists(ensemble):
    file = ensemble
  try:
    with open(file) as f:
      return json.load(f)
  except FileNotFoundError:
    raise UserError(f'{file} not found: evaluate {path!r} first (--mode=evaluate)') from None


Column = tuple[str, 'int | None', dict, 'float | None', dict, 'list | None']


def _scored_on(result: dict[str, Any]) -> str:
  """'<dataset> <split>, <N> images' of a metrics.json."""
  return f'{result.get("dataset", "?")} {result.get("split", "?")}, {result.get("num_images", "?")} images'


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
  scored_on = [_scored_on(result) for _, result in runs for _ in columns_of('', result)]
  rows = [['label'] + [c[0] for c in columns]]
  rows += [[label] + [_cell(c[2].get(label), c[4].get(label)) for c in columns] for label in labels]
  rows.append(['mean AUROC'] + [_cell(c[3], c[5]) for c in columns])
  rows.append(['parameters'] + ['' if c[1] is None else str(c[1]) for c in columns])
  # Runs scored on other images (another split or dataset, eval.max_images) say so in a row of their own.
  if len(set(scored_on)) > 1:
    rows.insert(-1, ['scored on'] + scored_on)
  if fmt == 'csv':
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator='\n').writerows(rows)
    return buffer.getvalue()
  rows[-1] = ['parameters'] + ['–' if c[1] is None else f'{c[1] / 1e6:.2f}M' for c in columns]
  lines = ['| ' + ' | '.join(rows[0]) + ' |', '|---|' + '---:|' * len(columns)]
  lines += ['| ' + ' | '.join(row) + ' |' for row in rows[1:]]
  return '\n'.join(lines) + '\n'


def _render(rows: list[list[str]], fmt: str, align: str = '---:|') -> str:
  if fmt == 'csv':
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator='\n').writerows(rows)
    return buffer.getvalue()
  lines = ['| ' + ' | '.join(rows[0]) + ' |', '|---|' + align * (len(rows[0]) - 1)]
  lines += ['| ' + ' | '.join(row) + ' |' for row in rows[1:]]
  return '\n'.join(lines) + '\n'


def per_size_table(result: dict[str, Any], fmt: str = 'md') -> str:
  """A multi-scale model's AUROC per label at each input size alone, the fused value, and the size that wins.

  Ties go to the smaller size; a label without an AUROC at any size has no winner.
  """
  sizes = sorted(result['per_size'], key=int)
  rows = [['label'] + [f'{s} px' for s in sizes] + [f'fused ({result["fusion"]})', 'best size']]
  for label in result['labels']:
    values = [result['per_size'][s]['per_class_auroc'].get(label) for s in sizes]
    known = [(v, -int(s)) for v, s in zip(values, sizes, strict=True) if v is not None]
    best = f'{-max(known)[1]} px' if known else 'n/a'
    rows.append(
      [label]
      + [_cell(v, None) for v in values]
      + [_cell(result['per_class_auroc'].get(label), None), best]
    )
  means = [result['per_size'][s]['mean_auroc'] for s in sizes]
  wins = {s: 0 for s in sizes}
  for row in rows[1:]:
    if row[-1] != 'n/a':
      wins[row[-1].split()[0]] += 1
  rows.append(
    ['mean AUROC'] + [_cell(m, None) for m in means] + [_cell(result['mean_auroc'], None), '']
  )
  rows.append(['labels won'] + [str(wins[s]) for s in sizes] + ['', ''])
  return _render(rows, fmt)


def localization_table(runs: Sequence[tuple[str, dict[str, Any]]]) -> str:
  """Markdown: per label, the pointing-game hit rate and mean IoU of each run's attention maps (n = images), and
  a last row with each run's pointing-game margin (`eval.pointing_tolerance`) and IoU threshold."""
  labels = runs[0][1]['labels']
  for name, result in runs[1:]:
    if result['labels'] != labels:
      raise UserError(f'{name} has labels {result["labels"]}; the first run has {labels}')
  header = ['label', 'n']
  for name, _ in runs:
    header += [f'{name} pointing game', f'{name} IoU']
  rows = [header]
  for label in labels + ['mean']:
    # Boxed images scored per run: one number when the runs agree, else each run's (e.g. other
    # eval.localization_max_images), in run order.
    counts = [
      (result['localization']['per_label'].get(label) or {}).get('num_images', 0)
      for _, result in runs
    ]
    if label == 'mean':
      n = ''
    elif len(set(counts)) == 1:
      n = str(counts[0])
    else:
      n = ' / '.join(str(c) for c in counts)
    row = [label, str(n)]
    for _, result in runs:
      loc = result['localization']
      if label == 'mean':
        values = (loc['mean_pointing_game'], loc['mean_iou'])
      else:
        entry = loc['per_label'].get(label)
        values = (entry['pointing_game'], entry['mean_iou']) if entry else (None, None)
      row += ['n/a' if v is None else f'{v:.3f}' for v in values]
    rows.append(row)
  # How each run was scored: a pointing game with a margin, or an IoU at another threshold, is another measure.
  settings = ['settings', '']
  for _, result in runs:
    loc = result['localization']
    tolerance, threshold = loc.get('pointing_tolerance'), loc.get('iou_threshold')
    settings += [
      'margin ?' if tolerance is None else f'margin {tolerance:g}',
      'threshold ?' if threshold is None else f'threshold {threshold:g}',
    ]
  rows.append(settings)
  return _render(rows, 'md')


def compare_table(name_a: str, name_b: str, comparison: dict[str, Any], fmt: str = 'md') -> str:
  """The DeLong comparison of two models on the same images: AUROC of each, difference, z, p per label."""
  rows = [['label', f'AUROC {name_a}', f'AUROC {name_b}', 'difference (A - B)', 'z', 'p-value']]
  for label, test in comparison['per_label'].items():
    if test is None:
      rows.append([label, 'n/a', 'n/a', 'n/a', 'n/a', 'n/a (fewer than 2 positives or negatives)'])
      continue
    rows.append(
      [
        label,
        f'{test["auc_a"]:.4f}',
        f'{test["auc_b"]:.4f}',
        f'{test["diff"]:+.4f}',
        f'{test["z"]:.2f}',
        f'{test["p_value"]:.4g}',
      ]
    )
  rows.append(
    [
      'mean AUROC',
      _cell(comparison['mean_auroc_a'], None),
      _cell(comparison['mean_auroc_b'], None),
      f'{comparison["mean_auroc_a"] - comparison["mean_auroc_b"]:+.4f}',
      '',
      '',
    ]
  )
  return _render(rows, fmt)


def run_names(paths: Sequence[str]) -> list[str]:
  """Column names for the runs: each workdir's folder name (for a metrics.json, the workdir it was written in,
  <workdir>/eval/<name>/metrics.json, else its folder); where two would be the same, the paths as given."""

  def short(path: str) -> str:
    path = os.path.normpath(path)
    if path.endswith('.json'):
      folder = os.path.dirname(os.path.abspath(path))
      parent = os.path.dirname(folder)
      path = os.path.dirname(parent) if os.path.basename(parent) == 'eval' else folder
    return os.path.basename(path)

  names = [short(p) for p in paths]
  full = [os.path.normpath(p) for p in paths]
  return [full[i] if names.count(name) > 1 else name for i, name in enumerate(names)]


def main(argv: Sequence[str]) -> None:
  paths = argv[1:]
  if not paths:
    cli.fail('give one or more workdirs (or metrics.json files)')
  with cli.user_errors():
    runs = list(
      zip(run_names(paths), [load_metrics(p, FLAGS.eval_name) for p in paths], strict=True)
    )
    if FLAGS.localization:
      missing = [name for name, result in runs if 'localization' not in result]
      if missing:
        raise UserError(f'{missing}: no localization in metrics.json (the split has no boxes?)')
      print(localization_table(runs), end='')
    else:
      print(table(runs), end='')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
