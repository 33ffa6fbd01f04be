"""Checkpoint evaluation: restore, predict a split, score, and write the report files.

Writes `<workdir>/eval/<name>/metrics.json` and `predictions.csv`:
  * metrics.json: checkpoint_step, num_images, labels, per_class_auroc (null where a label has one class present),
    mean_auroc over the non-null labels, skipped_labels, num_params, dataset, split, sizes; for multi-scale models
    the fusion rule, `per_size` (each size alone) and, for best_on_val, the size chosen per label; for ensembles
    the members.
  * predictions.csv: id, then `<label>_prob` and `<label>_target` per label (an unknown target is empty).
Both are written through temporary files, so an interrupted evaluation never leaves half a report.

  python -m ms_cxr.main --config=configs/densenet.py:demo --workdir=runs/demo --mode=evaluate
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from ms_cxr import checkpointing, fusion, metrics, models, parallel, report, train
from ms_cxr.data import datasets
from ms_cxr.data.records import label_matrix
from ms_cxr.errors import UserError


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a training run wrote to `<workdir>/config.json`."""
  path = os.path.join(workdir, 'config.json')
  try:
    with open(path) as f:
      values = json.load(f)
  except FileNotFoundError:
    raise UserError(f'{path} not found: is {workdir!r} a training workdir?') from None
  except json.JSONDecodeError as e:
    raise UserError(f'{path}: not valid JSON ({e})') from None
  config = ml_collections.ConfigDict(values)
  config.data.sizes = tuple(config.data.sizes)
  config.data.labels = tuple(config.data.labels)
  return config


def _restore(config: ml_collections.ConfigDict, workdir: str, dp: parallel.DataParallel):
  """Restores the checkpoint `config.eval` names from `workdir`: (state, step)."""
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise UserError(f'no checkpoints in workdir {workdir!r} (train it first, or check the path)')
  ckpt = checkpointing.Checkpointer(workdir, config.ckpt, read_only=True)
  try:
    manager, step = ckpt.resolve_step(config.eval.checkpoint, config.eval.step)
    model = models.create_model(config.model, len(config.data.labels), config.data.sizes)
    schedule = train.create_learning_rate_schedule(config.optim, config.train.num_steps)
    template = jax.eval_shape(
      lambda: train.create_train_state(
        config, model, train.create_optimizer(config.optim, schedule)
      )
    )
    replicated = jax.sharding.NamedSharding(dp.mesh, jax.sharding.PartitionSpec())
    state, _ = ckpt.restore(
      manager,
      step,
      checkpointing.abstract_like(template, replicated),
      checkpointing.checkpoint_meta(config),
    )
  finally:
    ckpt.close()
  return state, int(step)


def _predict_run(config, workdir, records, val_records, dp):
  """One run's logits per size on `records` (and on `val_records` when best_on_val needs them)."""
  state, step = _restore(config, workdir, dp)
  p_eval_step = dp.compile(train.eval_step, sharded_output=True)
  state = dp.replicate(state)
  logits = train.predict(p_eval_step, state, records, config, dp)
  val_logits = train.predict(p_eval_step, state, val_records, config, dp) if val_records else None
  return logits, val_logits, step, train.count_params(state.params)


def _score(probs: np.ndarray, targets: np.ndarray, labels: tuple[str, ...]) -> dict[str, Any]:
  per_class = metrics.per_class_auroc(probs, targets, labels)
  return {
    'per_class_auroc': per_class,
    'mean_auroc': metrics.mean_auroc(per_class),
    'skipped_labels': [label for label, v in per_class.items() if v is None],
  }


def _full_score(
  probs: np.ndarray,
  targets: np.ndarray,
  labels: tuple[str, ...],
  patient_ids: list[str],
  eval_config: ml_collections.ConfigDict,
) -> dict[str, Any]:
  """AUROC with patient-bootstrap intervals, average precision, Youden operating points, calibration."""
  result = _score(probs, targets, labels)
  result['per_class_ap'] = metrics.per_class_average_precision(probs, targets, labels)
  result['operating_points'] = metrics.operating_points(probs, targets, labels)
  result['expected_calibration_error'] = metrics.expected_calibration_error(probs, targets)
  if eval_config.bootstrap_resamples > 0:
    ci = metrics.bootstrap_auroc_ci(
      probs,
      targets,
      labels,
      patient_ids,
      num_resamples=eval_config.bootstrap_resamples,
      seed=eval_config.bootstrap_seed,
    )
    result['per_class_auroc_ci'] = {
      label: None if v['lo'] is None else [v['lo'], v['hi']] for label, v in ci['per_label'].items()
    }
    mean = ci['mean']
    result['mean_auroc_ci'] = None if mean['lo'] is None else [mean['lo'], mean['hi']]
    result['bootstrap'] = {
      'num_resamples': ci['num_resamples'],
      'seed': ci['seed'],
      'alpha': ci['alpha'],
      'unit': 'patient',
    }
  return result


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Evaluates one checkpoint of `workdir` (or an ensemble) on `config.eval.split` and writes the report.

  Args:
    config: the resolved config (the same model and labels the checkpoint was trained with).
    workdir: the training run's folder; the report goes to `<workdir>/eval/<name>/`.

  Returns:
    The metrics dictionary written to metrics.json.

  Raises:
    UserError: no such checkpoint, or one that does not match the config.
  """
  dp = parallel.DataParallel.create(config.parallel.api, config.parallel.num_devices)
  train.validate_config(config, dp)
  labels = tuple(config.data.labels)
  records = datasets.load_split(config.data, config.eval.split)
  if config.eval.max_images:
    records = records[: config.eval.max_images]
  if not records:
    raise UserError(f'split {config.eval.split!r} of {config.data.dataset} has no images')
  targets = label_matrix(records, len(labels))

  members = [m for m in config.eval.ensemble_workdirs.split(',') if m.strip()]
  if members:
    result, probs = _evaluate_ensemble(config, [m.strip() for m in members], records, targets, dp)
  else:
    needs_val = len(config.data.sizes) > 1 and config.eval.fusion == 'best_on_val'
    val_records = datasets.load_split(config.data, config.eval.val_split) if needs_val else []
    logits, val_logits, step, num_params = _predict_run(config, workdir, records, val_records, dp)
    result = {'checkpoint_step': step, 'num_params': num_params}
    if len(logits) > 1:
      best = None
      if needs_val:
        val_targets = label_matrix(val_records, len(labels))
        best = fusion.best_size_per_label(val_logits, val_targets, labels)
        result['best_size_per_label'] = dict(zip(labels, best, strict=True))
      result['fusion'] = config.eval.fusion
      result['per_size'] = {
        str(s): _score(fusion.sigmoid(logits[s]), targets, labels) for s in sorted(logits)
      }
      probs = fusion.fuse(logits, config.eval.fusion, best)
    else:
      probs = fusion.sigmoid(next(iter(logits.values())))
  result.update(
    num_images=len(records),
    labels=list(labels),
    dataset=config.data.dataset,
    split=config.eval.split,
    sizes=list(config.data.sizes),
    **_full_score(probs, targets, labels, [r.patient_id for r in records], config.eval),
  )
  if jax.process_index() == 0:
    out_dir = os.path.join(workdir, 'eval', config.eval.name or config.eval.split)
    try:
      os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
      raise UserError(f'cannot write the report to {out_dir!r}: {e.strerror}') from None
    ids = [r.id for r in records]
    write_predictions(os.path.join(out_dir, 'predictions.csv'), ids, probs, targets, labels)
    train.write_json_atomic(os.path.join(out_dir, 'metrics.json'), result)
    name = os.path.basename(os.path.normpath(workdir))
    write_text_atomic(os.path.join(out_dir, 'table.md'), report.table([(name, result)], 'md'))
    write_text_atomic(os.path.join(out_dir, 'table.csv'), report.table([(name, result)], 'csv'))
  return result


def write_text_atomic(path: str, text: str) -> None:
  with open(path + '.tmp', 'w', newline='') as f:
    f.write(text)
  os.replace(path + '.tmp', path)


def _evaluate_ensemble(config, members, records, targets, dp):
  """Mean of the members' probabilities; each member is fused over its own sizes by mean probability."""
  labels = tuple(config.data.labels)
  member_probs, member_info = [], []
  for workdir in members:
    member = load_workdir_config(workdir)
    if tuple(member.data.labels) != labels:
      raise UserError(f'ensemble member {workdir} has labels {member.data.labels}, not {labels}')
    member.eval.checkpoint, member.eval.step = config.eval.checkpoint, config.eval.step
    member.parallel = config.parallel
    logits, _, step, num_params = _predict_run(member, workdir, records, [], dp)
    probs = fusion.fuse(logits, 'mean_prob')
    member_probs.append(probs)
    member_info.append(
      {
        'workdir': workdir,
        'checkpoint_step': step,
        'num_params': num_params,
        'sizes': list(member.data.sizes),
        'mean_auroc': _score(probs, targets, labels)['mean_auroc'],
      }
    )
  result = {
    'checkpoint_step': None,
    'num_params': sum(m['num_params'] for m in member_info),
    'ensemble': member_info,
  }
  return result, np.mean(member_probs, axis=0)


def write_predictions(
  path: str, ids: list[str], probs: np.ndarray, targets: np.ndarray, labels: tuple[str, ...]
) -> None:
  """predictions.csv: id, then <label>_prob and <label>_target per label (empty target = unknown)."""
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator='\n')
  writer.writerow(['id'] + [f'{label}_{kind}' for label in labels for kind in ('prob', 'target')])
  for i, image_id in enumerate(ids):
    row = [image_id]
    for k in range(len(labels)):
      target = targets[i, k]
      row += [repr(float(probs[i, k])), '' if np.isnan(target) else f'{target:g}']
    writer.writerow(row)
  write_text_atomic(path, buffer.getvalue())


def format_table(result: dict[str, Any]) -> str:
  """The per-label AUROC table printed after an evaluation: one column per size, then the fused result."""
  columns = [
    (f'{s} px', result['per_size'][s]['per_class_auroc']) for s in result.get('per_size', {})
  ]
  fused_name = f'fused ({result["fusion"]})' if columns else 'AUROC'
  if 'ensemble' in result:
    fused_name = f'ensemble of {len(result["ensemble"])}'
  columns.append((fused_name, result['per_class_auroc']))
  means = [result['per_size'][s]['mean_auroc'] for s in result.get('per_size', {})]
  means.append(result['mean_auroc'])

  def cell(value):
    return 'n/a' if value is None else f'{value:.4f}'

  width = max(len(label) for label in result['labels'] + ['mean AUROC'])
  widths = [max(len(name), 6) for name, _ in columns]
  step = result['checkpoint_step']
  lines = [
    f'{result["dataset"]} {result["split"]}: {result["num_images"]} images, '
    + (f'checkpoint step {step}, ' if step is not None else '')
    + f'{result["num_params"]:,} parameters',
    '  '.join(
      [f'{"label":<{width}}'] + [f'{n:>{w}}' for (n, _), w in zip(columns, widths, strict=True)]
    ),
  ]
  rule = '  '.join(['-' * width] + ['-' * w for w in widths])
  lines.append(rule)
  for label in result['labels']:
    cells = [f'{cell(c[label]):>{w}}' for (_, c), w in zip(columns, widths, strict=True)]
    lines.append('  '.join([f'{label:<{width}}'] + cells))
  lines.append(rule)
  lines.append(
    '  '.join(
      [f'{"mean AUROC":<{width}}'] + [f'{cell(m):>{w}}' for m, w in zip(means, widths, strict=True)]
    )
  )
  return '\n'.join(lines)
