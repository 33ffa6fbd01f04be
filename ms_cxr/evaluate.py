"""Checkpoint evaluation: restore, predict a split, score, and write the report files.

Writes `<workdir>/eval/<name>/metrics.json` (checkpoint_step, num_images, labels, per_class_auroc with null where a
label has one class, mean_auroc over the non-null labels, plus the split, dataset and image size) and
`predictions.csv` (id, then `<label>_prob` and `<label>_target` per label; an unknown target is empty).
Both are written through temporary files, so an interrupted evaluation never leaves half a report.

  python -m ms_cxr.main --config=configs/densenet.py:demo --workdir=runs/demo --mode=evaluate
"""

from __future__ import annotations

import csv
import io
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from ms_cxr import checkpointing, metrics, models, parallel, train
from ms_cxr.data import datasets
from ms_cxr.data.records import label_matrix
from ms_cxr.errors import UserError


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Evaluates one checkpoint of `workdir` on `config.eval.split` and writes the report.

  Args:
    config: the resolved config (the same model and labels the checkpoint was trained with).
    workdir: the training run's folder.

  Returns:
    The metrics dictionary written to metrics.json.

  Raises:
    UserError: no such checkpoint, or one that does not match the config.
  """
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise UserError(f'no checkpoints in workdir {workdir!r} (train it first, or check the path)')
  dp = parallel.DataParallel.create(config.parallel.api, config.parallel.num_devices)
  train.validate_config(config, dp)
  labels = tuple(config.data.labels)

  ckpt = checkpointing.Checkpointer(workdir, config.ckpt, read_only=True)
  manager, step = ckpt.resolve_step(config.eval.checkpoint, config.eval.step)
  model = models.create_model(config.model, len(labels))
  schedule = train.create_learning_rate_schedule(config.optim, config.train.num_steps)
  template = jax.eval_shape(
    lambda: train.create_train_state(config, model, train.create_optimizer(config.optim, schedule))
  )
  replicated = jax.sharding.NamedSharding(dp.mesh, jax.sharding.PartitionSpec())
  state, _ = ckpt.restore(
    manager,
    step,
    checkpointing.abstract_like(template, replicated),
    checkpointing.checkpoint_meta(config),
  )
  ckpt.close()

  records = datasets.load_split(config.data, config.eval.split)
  if config.eval.max_images:
    records = records[: config.eval.max_images]
  if not records:
    raise UserError(f'split {config.eval.split!r} of {config.data.dataset} has no images')
  p_eval_step = dp.compile(train.eval_step, sharded_output=True)
  probs = train.predict(p_eval_step, dp.replicate(state), records, config, dp)
  targets = label_matrix(records, len(labels))

  per_class = metrics.per_class_auroc(probs, targets, labels)
  result = {
    'checkpoint_step': int(step),
    'num_images': len(records),
    'labels': list(labels),
    'per_class_auroc': per_class,
    'mean_auroc': metrics.mean_auroc(per_class),
    'dataset': config.data.dataset,
    'split': config.eval.split,
    'size_px': config.data.size_px,
  }
  if jax.process_index() == 0:
    out_dir = os.path.join(workdir, 'eval', config.eval.name or config.eval.split)
    os.makedirs(out_dir, exist_ok=True)
    write_predictions(
      os.path.join(out_dir, 'predictions.csv'), [r.id for r in records], probs, targets, labels
    )
    train.write_json_atomic(os.path.join(out_dir, 'metrics.json'), result)
  return result


def write_predictions(
  path: str, ids: list[str], probs: np.ndarray, targets: np.ndarray, labels: tuple[str, ...]
) -> None:
  """predictions.csv: id, then <label>_prob and <label>_target per label (empty target =
  unknown)."""
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator='\n')
  writer.writerow(['id'] + [f'{label}_{kind}' for label in labels for kind in ('prob', 'target')])
  for i, image_id in enumerate(ids):
    row = [image_id]
    for k in range(len(labels)):
      target = targets[i, k]
      row += [repr(float(probs[i, k])), '' if np.isnan(target) else f'{target:g}']
    writer.writerow(row)
  with open(path + '.tmp', 'w', newline='') as f:
    f.write(buffer.getvalue())
  os.replace(path + '.tmp', path)


def format_table(result: dict[str, Any]) -> str:
  """The per-label AUROC table printed at the end of an evaluation."""
  width = max(len(label) for label in result['labels'] + ['mean AUROC'])
  lines = [
    f'{result["dataset"]} {result["split"]}: {result["num_images"]} images, '
    f'checkpoint step {result["checkpoint_step"]}',
    f'{"label":<{width}}  AUROC',
    f'{"-" * width}  ------',
  ]
  for label in result['labels']:
    value = result['per_class_auroc'][label]
    lines.append(f'{label:<{width}}  {"n/a" if value is None else f"{value:.4f}"}')
  mean = result['mean_auroc']
  lines.append(f'{"-" * width}  ------')
  lines.append(f'{"mean AUROC":<{width}}  {"n/a" if mean is None else f"{mean:.4f}"}')
  return '\n'.join(lines)
