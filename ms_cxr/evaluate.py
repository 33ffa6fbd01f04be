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

# ruff: noqa: E402  (the imports after the re-execution below)
import sys

if __name__ == '__main__':
  # First, before the imports below: the re-executed process would repeat them (2-3 s of every launch).
  from ms_cxr import hugepages

  hugepages.reexec_with_huge_pages()

import csv
import dataclasses
import functools
import io
import json
import os
import re
import shutil
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import optax

from ms_cxr import (
  checkpointing,
  cli,
  config_lib,
  fusion,
  localization,
  metrics,
  models,
  parallel,
  plots,
  report,
  train,
)
from ms_cxr.data import datasets, images
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
  if not isinstance(values, dict):
    raise UserError(f'{path}: expected a JSON object of config sections')
  return _with_defaults(config_lib.upgrade_written(values))


# Fields that make a checkpoint's model compute what it was trained to: `main --mode=evaluate` from a config file
# refuses to differ from the run's config.json in them (a forgotten `size=448` evaluated a 448 px model at 224 px).
# The other model.* fields change how, not what, it computes.
MODEL_DEFINING_FIELDS = ('data.sizes', 'data.labels', 'model.')
# The model fields a resumed run may change (train.RESUMABLE_FIELDS): how it computes, not what.
_HOW_NOT_WHAT = tuple(f for f in train.RESUMABLE_FIELDS if f.startswith('model.'))


def check_trained_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses to evaluate `workdir` under a config whose model differs from the one it was trained with.

  Compares MODEL_DEFINING_FIELDS with `<workdir>/config.json` (nothing to compare without one, or for an
  ensemble, whose members are read with their own configs). `python -m ms_cxr.evaluate --workdir=DIR` reads the
  run's own config, and its overrides are deliberate; this is for a config given again by file.

  Raises:
    UserError: naming each differing field with the trained and the given value.
  """
  path = os.path.join(workdir, 'config.json')
  if ensemble_members(config) or not os.path.exists(path):
    return
  trained = train.flatten_config(json.loads(config_lib.to_json(load_workdir_config(workdir))))
  given = train.flatten_config(json.loads(config_lib.to_json(config)))
  differing = [
    k
    for k in train.differing_fields(trained, given)
    if train.field_in(k, MODEL_DEFINING_FIELDS) and not train.field_in(k, _HOW_NOT_WHAT)
  ]
  if differing:
    changes = ', '.join(f'{k} {trained[k]!r} (trained) vs {given[k]!r}' for k in differing)
    raise UserError(
      f'{workdir!r} was trained with another model than this config gives: {changes} (from {path}). Evaluate '
      f'it with its own config: python -m ms_cxr.evaluate --workdir={workdir} [--config.eval.FIELD=VALUE ...] '
      '(a deliberate change goes there as --config.SECTION.FIELD=VALUE)'
    )


def _as_tuple(value: Any) -> Any:
  """A JSON list (config_lib.to_json writes tuples as lists) back as a tuple, nested lists included."""
  if isinstance(value, list):
    return tuple(_as_tuple(v) for v in value)
  return value


def _with_defaults(values: dict[str, Any]) -> ml_collections.ConfigDict:
  """A workdir's config, with fields added since it was written taken from configs/base.py when importable.

  JSON has no tuples, so a list comes back as a tuple wherever the default is one: ml_collections cannot
  override a list field from the command line (`--config.eval.tta=hflip` on a list is an error), and the
  code compares sizes and labels as tuples. Without configs/base.py every list becomes a tuple, as no field
  is a list.
  """
  try:
    from configs import base  # the repository's configs/ (on sys.path when run from the checkout)
  except ImportError:
    return ml_collections.ConfigDict(_tuples_everywhere(values))
  merged = base.get_config().to_dict()

  def merge(into: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
      default = into.get(key)
      if isinstance(value, dict) and isinstance(default, dict):
        merge(default, value)
      elif isinstance(value, list) and isinstance(default, tuple):
        into[key] = _as_tuple(value)
      else:
        into[key] = value

  merge(merged, values)
  return ml_collections.ConfigDict(merged)


def _tuples_everywhere(values: Any) -> Any:
  if isinstance(values, dict):
    return {key: _tuples_everywhere(value) for key, value in values.items()}
  return _as_tuple(values)


def _restore(config: ml_collections.ConfigDict, workdir: str, dp: parallel.DataParallel):
  """Restores the checkpoint `config.eval` names from `workdir`: (state, step)."""
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise UserError(f'no checkpoints in workdir {workdir!r} (train it first, or check the path)')
  ckpt = checkpointing.Checkpointer(workdir, config.ckpt, read_only=True)
  try:
    manager, step = ckpt.resolve_step(config.eval.checkpoint, config.eval.step)
    model = models.create_model(config.model, len(config.data.labels), config.data.sizes)
    # The variables alone: evaluation needs no optimizer state, so a checkpoint whose optimizer state has another
    # layout (other optim settings, or Adam's counts before they were per parameter) evaluates all the same.
    template = jax.eval_shape(
      lambda: train.create_train_state(config, model, optax.identity(), load_init_from=False)
    )
    replicated = jax.sharding.NamedSharding(dp.mesh, jax.sharding.PartitionSpec())
    variables = ckpt.restore_variables(
      manager, step, replicated, checkpointing.checkpoint_meta(config)
    )
    # The checkpoint's variables must be this model's (the optimizer state is not compared).
    expected = {'params': template.params, 'batch_stats': template.batch_stats}
    if jax.tree.structure(variables) != jax.tree.structure(expected) or any(
      a.shape != b.shape
      for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(expected), strict=True)
    ):
      raise UserError(
        f'checkpoint of step {step} in {workdir!r} does not fit the configured model '
        f'({config.model.name}, sizes {tuple(config.data.sizes)}, {len(config.data.labels)} labels)'
      )
    state = train.TrainState.create(
      apply_fn=model.apply,
      params=variables['params'],
      tx=optax.identity(),
      batch_stats=variables['batch_stats'],
    )
  finally:
    ckpt.close()
  return state, int(step)


@dataclasses.dataclass
class _Run:
  """One run's predictions: logits per size (NaN rows: unreadable images), masks, and what produced them."""

  logits: dict[int, np.ndarray]
  predicted: np.ndarray
  val_logits: dict[int, np.ndarray] | None
  val_predicted: np.ndarray | None
  step: int
  num_params: int
  variables: dict[str, Any]  # host copy of params and batch_stats, for attention maps


def _predict_run(config, workdir, records, val_records, dp) -> _Run:
  """One run's logits per size on `records` (and on `val_records` when given)."""
  state, step = _restore(config, workdir, dp)
  variables = jax.device_get({'params': state.params, 'batch_stats': state.batch_stats})
  p_eval_step = dp.compile(
    functools.partial(train.eval_step, tta=train.tta_views(config)), sharded_output=True
  )
  state = dp.replicate(state)
  logits, predicted = train.predict(p_eval_step, state, records, config, dp)
  val_logits = val_predicted = None
  if val_records:
    val_logits, val_predicted = train.predict(p_eval_step, state, val_records, config, dp)
  return _Run(
    logits,
    predicted,
    val_logits,
    val_predicted,
    step,
    train.count_params(variables['params']),
    variables,
  )


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
      # Resamples in which every label of the mean had both classes: the mean's interval uses these alone.
      'mean_num_resamples_used': mean['num_resamples_used'],
      'seed': ci['seed'],
      'alpha': ci['alpha'],
      'unit': 'patient',
    }
  return result


def validate_eval_config(config: ml_collections.ConfigDict, dp: parallel.DataParallel) -> None:
  """What an evaluation needs of the config, checked before anything is loaded.

  train.validate_config is not used: it checks training-only fields against this machine (the global training
  batch and its accum_steps micro-batches per device), which would refuse to evaluate a run on a machine with
  another device count although evaluation never uses them.
  """
  sizes = tuple(config.data.sizes)
  if not sizes or len(set(sizes)) != len(sizes) or min(sizes) < 16:
    raise UserError(f'config.data.sizes={sizes} must be distinct sizes of at least 16 px')
  train.validate_map_size(config)
  tolerance = config.eval.pointing_tolerance
  if not isinstance(tolerance, (int, float)) or not 0.0 <= tolerance < 0.5:
    raise UserError(
      f'config.eval.pointing_tolerance={tolerance!r}; expected a fraction of the image side in [0, 0.5)'
    )
  threshold = config.eval.iou_threshold
  if not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 1.0:
    raise UserError(
      f'config.eval.iou_threshold={threshold!r}; expected a fraction of the map range in (0, 1]'
    )
  grid = config.eval.localization_grid
  if not isinstance(grid, int) or grid < 1:
    raise UserError(f'config.eval.localization_grid={grid!r}; expected a positive number of pixels')
  labels = tuple(config.data.labels)
  if not labels or len(set(labels)) != len(labels):
    raise UserError(f'config.data.labels={labels} must be distinct label names, at least one')
  if config.eval.fusion not in fusion.FUSIONS:
    raise UserError(f'config.eval.fusion={config.eval.fusion!r}; expected one of {fusion.FUSIONS}')
  unknown_views = [v for v in train.tta_views(config) if v not in train.TTA_VIEWS]
  if unknown_views:
    raise UserError(f'config.eval.tta has {unknown_views}; expected views from {train.TTA_VIEWS}')
  if config.eval.batch_size <= 0 or config.eval.batch_size % dp.num_devices:
    raise UserError(
      f'config.eval.batch_size={config.eval.batch_size} must be a positive multiple of {dp.num_devices} devices'
    )
  chosen_on_val = _chosen_on_val(config)
  if chosen_on_val and config.eval.split == config.eval.val_split:
    raise UserError(
      f'config.eval.split={config.eval.split!r} is also config.eval.val_split, where '
      f'{" and ".join(chosen_on_val)} would choose on the split being scored; expected another eval.split or '
      'eval.val_split, or those off'
    )


def _chosen_on_val(config: ml_collections.ConfigDict) -> list[str]:
  """The settings under which this evaluation uses something chosen on `eval.val_split`."""
  chosen = []
  if config.eval.step < 0 and config.eval.checkpoint == 'best':
    chosen.append('eval.checkpoint=best')  # the best validation AUROC during training
  # An ensemble fuses its members by mean probability. (Validation thresholds are not chosen here: scoring the
  # validation split itself simply leaves them out, as they would be the Youden points already reported.)
  if not config.eval.ensemble_workdirs.strip():
    if len(config.data.sizes) > 1 and config.eval.fusion == 'best_on_val':
      chosen.append('eval.fusion=best_on_val')
  return chosen


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Evaluates one checkpoint of `workdir` (or an ensemble) on `config.eval.split` and writes the report.

  Args:
    config: the resolved config (the same model and labels the checkpoint was trained with).
    workdir: the training run's folder; the report goes to `<workdir>/eval/<name>/`.

  Returns:
    The metrics dictionary written to metrics.json.

  Raises:
    UserError: no such checkpoint, or one that does not match the config; thresholds, sizes or the checkpoint
      chosen on the split being scored (eval.val_split equal to eval.split).
  """
  train.validate_parallel(config)
  dp = parallel.DataParallel.create(config.parallel.api, config.parallel.num_devices)
  validate_eval_config(config, dp)
  labels = tuple(config.data.labels)
  skipped_rows: list[str] = []
  records = datasets.load_split(config.data, config.eval.split, skipped_rows)
  if config.eval.max_images:
    records = records[: config.eval.max_images]
  if not records:
    raise UserError(f'split {config.eval.split!r} of {config.data.dataset} has no images')

  members = ensemble_members(config)
  run = val_probs = None
  if members:
    val_records = []
    if config.eval.val_thresholds and config.eval.split != config.eval.val_split:
      val_records = datasets.load_split(config.data, config.eval.val_split)
    result, probs, predicted, val = _evaluate_ensemble(config, members, records, val_records, dp)
    records, probs = _drop_unread(records, probs, predicted, result)
    targets = label_matrix(records, len(labels))
    if val_records:
      val_probs, val_predicted = val
      val_probs = val_probs[val_predicted]
      val_targets = label_matrix(
        [r for r, ok in zip(val_records, val_predicted, strict=True) if ok], len(labels)
      )
  else:
    best_on_val = len(config.data.sizes) > 1 and config.eval.fusion == 'best_on_val'
    val_thresholds = config.eval.val_thresholds and config.eval.split != config.eval.val_split
    val_records = []
    if best_on_val or val_thresholds:
      val_records = datasets.load_split(config.data, config.eval.val_split)
    run = _predict_run(config, workdir, records, val_records, dp)
    result = {'checkpoint_step': run.step, 'num_params': run.num_params}
    records, logits = _drop_unread(records, run.logits, run.predicted, result)
    targets = label_matrix(records, len(labels))
    best = None
    if val_records:
      val_kept = [r for r, ok in zip(val_records, run.val_predicted, strict=True) if ok]
      val_targets = label_matrix(val_kept, len(labels))
      val_logits = {s: v[run.val_predicted] for s, v in run.val_logits.items()}
      if best_on_val:
        best = fusion.best_size_per_label(val_logits, val_targets, labels)
        result['best_size_per_label'] = dict(zip(labels, best, strict=True))
    if len(logits) > 1:
      result['fusion'] = config.eval.fusion
      result['per_size'] = {
        str(s): _score(fusion.sigmoid(logits[s]), targets, labels) for s in sorted(logits)
      }
      probs = fusion.fuse(logits, config.eval.fusion, best)
      if val_records and val_thresholds:
        val_probs = fusion.fuse(val_logits, config.eval.fusion, best)
    else:
      probs = fusion.sigmoid(next(iter(logits.values())))
      if val_records and val_thresholds:
        val_probs = fusion.sigmoid(next(iter(val_logits.values())))
  if config.data.skip_bad:
    result['skipped_rows'] = len(skipped_rows)
  if train.tta_views(config):
    result['tta'] = ['identity', *train.tta_views(config)]
  result.update(
    num_images=len(records),
    labels=list(labels),
    dataset=config.data.dataset,
    split=config.eval.split,
    sizes=list(config.data.sizes),
    **_full_score(probs, targets, labels, [r.patient_id for r in records], config.eval),
  )
  if val_probs is not None:
    # Thresholds chosen on validation (Youden there) and applied here: the unbiased operating points.
    val_points = metrics.operating_points(val_probs, val_targets, labels)
    result['operating_points_val_threshold'] = metrics.operating_points(
      probs, targets, labels, thresholds={k: v['threshold'] for k, v in val_points.items() if v}
    )
  if config.data.dataset == 'vindr' and config.data.vindr.label_space != 'vindr':
    result['label_mapping'] = _vindr_mapping(config.data.vindr.label_space, labels)

  out_dir = os.path.join(workdir, 'eval', report_name(config))
  maps = None
  if run is not None and (config.eval.heatmap_images or config.eval.localization):
    maps = _attention_outputs(config, run, records, probs, result)
  if jax.process_index() == 0:
    _write_report(config, workdir, out_dir, records, probs, targets, result, maps)
  return result


def _vindr_mapping(label_space: str, labels: Sequence[str]) -> dict[str, Any]:
  """The VinDr findings behind each evaluated label (empty: unmapped, its targets are unknown)."""
  from ms_cxr.data import vindr

  table = vindr.TO_CHEXPERT if label_space == 'chexpert' else vindr.TO_NIH
  sources = {
    label: sorted(name for name, targets in table.items() if label in targets) for label in labels
  }
  return {
    'from': 'VinDr-CXR',
    'to': label_space,
    'sources': sources,
    'unmapped': [label for label, names in sources.items() if not names],
    'rule': 'a label is positive when any of its VinDr sources is; documented in ms_cxr/data/vindr.py',
  }


class _Maps(NamedTuple):
  indices: list[int]  # rows of `records` the maps belong to
  maps: np.ndarray  # float32 [len(indices), h, w, K]
  size: int  # input side the maps were computed at
  heatmap_rows: list[int]  # rows of `records` drawn as overlays


def _map_size(config) -> int:
  return config.eval.map_size or max(config.data.sizes)


def _attention_outputs(config, run: _Run, records, probs, result) -> _Maps | None:
  """Attention maps of the boxed images (scored into result['localization']) and of the overlay images."""
  labels = tuple(config.data.labels)
  boxed = localization.boxed_images(records, labels) if config.eval.localization else []
  if config.eval.localization_max_images:
    boxed = boxed[: config.eval.localization_max_images]
  chosen = _heatmap_rows(config, records, boxed)
  rows = sorted(set(boxed) | set(chosen))
  if not rows:
    return None
  size = _map_size(config)
  maps = compute_attention_maps(config, run.variables, [records[i] for i in rows], size)
  position = {row: j for j, row in enumerate(rows)}
  if boxed:
    result['localization'] = localization.score(
      maps[[position[i] for i in boxed]],
      [records[i] for i in boxed],
      labels,
      grid=config.eval.localization_grid,
      threshold=config.eval.iou_threshold,
      tolerance=config.eval.pointing_tolerance,
    )
    result['localization']['map_size'] = size
  return _Maps(rows, maps, size, chosen)


def _heatmap_rows(config, records, boxed: list[int]) -> list[int]:
  """Records drawn as overlays: `eval.heatmap_ids`, else the first with boxes, then the first with a finding."""
  ids = [i.strip() for i in config.eval.heatmap_ids.split(',') if i.strip()]
  if ids:
    where = {r.id: i for i, r in enumerate(records)}
    missing = [i for i in ids if i not in where]
    if missing:
      raise UserError(
        f'config.eval.heatmap_ids: {missing} not in split {config.eval.split!r} (ids as in predictions.csv)'
      )
    return [where[i] for i in ids]
  count = config.eval.heatmap_images
  positive = [i for i, r in enumerate(records) if np.nansum(r.labels) > 0 and i not in set(boxed)]
  return (boxed + positive)[:count]


def compute_attention_maps(config, variables, records, size: int) -> np.ndarray:
  """Class-wise attention maps [N, h, w, K] of `records` at input `size` (see models.attention_maps)."""
  model = models.create_model(config.model, len(config.data.labels), config.data.sizes)
  apply = jax.jit(lambda v, x: models.attention_maps(model, v, x, size_px=size))
  batch = max(1, config.eval.batch_size // max(1, jax.local_device_count()))
  out = []
  for start in range(0, len(records), batch):
    chunk = records[start : start + batch]
    pixels = np.zeros((batch, size, size, 1), np.uint8)  # one shape: one compilation
    for j, record in enumerate(chunk):
      pixels[j, :, :, 0] = images.load(record.image, (size,))[size]
    out.append(np.asarray(apply(variables, pixels), np.float32)[: len(chunk)])
  return np.concatenate(out)


def report_name(config: ml_collections.ConfigDict) -> str:
  """The report folder under <workdir>/eval/: `eval.name`, else the split, then what makes this evaluation's
  numbers differ from the plain one of that checkpoint (`_ensemble`, `_tta-<views>`, `_<fusion>` for a
  multi-scale model's non-default fusion), then `_best` or `_step<N>` when the checkpoint is not the latest. So
  an ensemble evaluated into one member's workdir, a run with test-time views and another checkpoint each get
  their own folder and never replace the report of the member's own latest checkpoint."""
  if config.eval.name:
    return config.eval.name
  name = config.eval.split
  ensemble = bool(ensemble_members(config))
  if ensemble:
    name += '_ensemble'
  views = train.tta_views(config)
  if views:
    name += '_tta-' + '-'.join(views)
  if len(config.data.sizes) > 1 and config.eval.fusion != fusion.FUSIONS[0] and not ensemble:
    name += f'_{config.eval.fusion}'
  if config.eval.step >= 0:
    return f'{name}_step{config.eval.step}'
  if config.eval.checkpoint == 'best':
    return f'{name}_best'
  return name


def ensemble_members(config: ml_collections.ConfigDict) -> list[str]:
  """The workdirs of `eval.ensemble_workdirs` (comma-separated), in order."""
  return [m.strip() for m in config.eval.ensemble_workdirs.split(',') if m.strip()]


def _write_report(config, workdir, out_dir, records, probs, targets, result, maps) -> None:
  """Writes the report folder as a whole: built beside it, then put in its place, so it never mixes files of
  two evaluations (an earlier one's per-size tables or overlays) and a failure leaves the earlier report intact."""
  out_dir = os.path.normpath(out_dir)
  partial = out_dir + '.partial'
  shutil.rmtree(partial, ignore_errors=True)
  try:
    os.makedirs(partial)
  except OSError as e:
    raise UserError(f'cannot write the report to {out_dir!r}: {e.strerror}') from None
  try:
    _write_report_files(config, workdir, partial, records, probs, targets, result, maps)
    # `compare` writes its DeLong tables into A's report folder: results of their own, kept (rerun compare to
    # bring them up to date with this evaluation).
    for name in os.listdir(out_dir) if os.path.isdir(out_dir) else ():
      if name.startswith('delong_'):
        shutil.copy2(os.path.join(out_dir, name), os.path.join(partial, name))
    old = out_dir + '.old'
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(out_dir):
      os.replace(out_dir, old)
    os.replace(partial, out_dir)
    shutil.rmtree(old, ignore_errors=True)
  finally:
    shutil.rmtree(partial, ignore_errors=True)


def _write_report_files(config, workdir, out_dir, records, probs, targets, result, maps) -> None:
  """Every report file into `out_dir`."""
  labels = tuple(config.data.labels)
  ids = [r.id for r in records]
  write_predictions(os.path.join(out_dir, 'predictions.csv'), ids, probs, targets, labels)
  name = os.path.basename(os.path.normpath(workdir))
  write_text_atomic(os.path.join(out_dir, 'table.md'), report.table([(name, result)], 'md'))
  write_text_atomic(os.path.join(out_dir, 'table.csv'), report.table([(name, result)], 'csv'))
  if 'per_size' in result:
    write_text_atomic(os.path.join(out_dir, 'per_size.md'), report.per_size_table(result, 'md'))
    write_text_atomic(os.path.join(out_dir, 'per_size.csv'), report.per_size_table(result, 'csv'))
  if 'localization' in result:
    write_text_atomic(
      os.path.join(out_dir, 'localization.md'), report.localization_table([(name, result)])
    )
  if config.eval.plots:
    title = f'{name}: {config.data.dataset} {config.eval.split}, {len(records)} images'
    plots.roc_curves(os.path.join(out_dir, 'roc.png'), probs, targets, labels, title)
    plots.pr_curves(os.path.join(out_dir, 'pr.png'), probs, targets, labels, title)
    plots.reliability_diagram(os.path.join(out_dir, 'reliability.png'), probs, targets)
  if maps is not None:
    _write_maps(out_dir, records, probs, labels, maps)
  train.write_json_atomic(os.path.join(out_dir, 'metrics.json'), result)


def _safe(name: str) -> str:
  return re.sub(r'[^A-Za-z0-9._-]+', '_', name).strip('_')


def _write_maps(out_dir, records, probs, labels, maps: _Maps) -> None:
  """attention_maps.npz (every map computed) and heatmaps/<id>__<label>.png overlays."""
  path = os.path.join(out_dir, 'attention_maps.npz')
  with open(path + '.tmp', 'wb') as f:
    np.savez_compressed(
      f,
      ids=np.asarray([records[i].id for i in maps.indices]),
      labels=np.asarray(labels),
      maps=maps.maps.astype(np.float16),
      size=np.int32(maps.size),
    )
  os.replace(path + '.tmp', path)
  if not maps.heatmap_rows:
    return
  folder = os.path.join(out_dir, 'heatmaps')
  os.makedirs(folder, exist_ok=True)
  position = {row: j for j, row in enumerate(maps.indices)}
  for row in maps.heatmap_rows:
    record = records[row]
    # The image's findings; an image without any gets its most probable label.
    ks = [k for k in range(len(labels)) if record.labels[k] == 1.0] or [int(np.argmax(probs[row]))]
    pixels = images.load(record.image, (maps.size,))[maps.size]
    for k in ks:
      target = record.labels[k]
      truth = 'unknown' if np.isnan(target) else f'{target:g}'
      plots.heatmap_overlay(
        os.path.join(folder, f'{_safe(record.id)}__{_safe(labels[k])}.png'),
        pixels,
        maps.maps[position[row], :, :, k],
        f'{record.id}\n{labels[k]}: p = {probs[row, k]:.3f}, target {truth}',
        [b for b in record.boxes or () if b.label == labels[k]],
      )


def _drop_unread(records, values, predicted: np.ndarray, result: dict[str, Any]):
  """Leaves out the records whose image could not be read (data.skip_bad), listing them in `result`."""
  if predicted.all():
    return records, values
  result['skipped_images'] = [r.id for r, ok in zip(records, predicted, strict=True) if not ok]
  kept = [r for r, ok in zip(records, predicted, strict=True) if ok]
  if not kept:
    raise UserError('no image of the split could be read (data.skip_bad left every one out)')
  if isinstance(values, dict):
    return kept, {s: v[predicted] for s, v in values.items()}
  return kept, values[predicted]


def write_text_atomic(path: str, text: str) -> None:
  with open(path + '.tmp', 'w', newline='') as f:
    f.write(text)
  os.replace(path + '.tmp', path)


# What an ensemble's evaluation sets for each member, whose own config gives its model and sizes: which
# checkpoint, the devices, test-time views, the batch and the input pipeline's settings.
_MEMBER_FIELDS = (
  'eval.checkpoint',
  'eval.step',
  'eval.tta',
  'eval.batch_size',
  'data.skip_bad',
  'data.num_workers',
  'data.read_threads',
  'data.prefetch_batches',
)


def _evaluate_ensemble(config, members, records, val_records, dp):
  """Mean of the members' probabilities; each member is fused over its own sizes by mean probability.

  Returns:
    (result, probabilities [N, K], the bool [N] mask of the records every member predicted, and for
    `val_records` the same two (None, None without them)).
  """
  labels = tuple(config.data.labels)
  member_probs, member_val_probs, member_info = [], [], []
  all_predicted = np.ones(len(records), np.bool_)
  val_predicted = np.ones(len(val_records), np.bool_)
  targets = label_matrix(records, len(labels))
  for workdir in members:
    member = load_workdir_config(workdir)
    if tuple(member.data.labels) != labels:
      raise UserError(f'ensemble member {workdir} has labels {member.data.labels}, not {labels}')
    member.parallel = config.parallel
    for field in _MEMBER_FIELDS:
      section, name = field.split('.')
      member[section][name] = config[section][name]
    try:
      validate_eval_config(member, dp)
    except UserError as e:
      raise UserError(f'ensemble member {workdir}: {e}') from None
    member_run = _predict_run(member, workdir, records, val_records, dp)
    logits, predicted = member_run.logits, member_run.predicted
    step, num_params = member_run.step, member_run.num_params
    probs = fusion.fuse(logits, 'mean_prob')
    member_probs.append(probs)
    all_predicted &= predicted
    if val_records:
      member_val_probs.append(fusion.fuse(member_run.val_logits, 'mean_prob'))
      val_predicted &= member_run.val_predicted
    member_info.append(
      {
        'workdir': workdir,
        'checkpoint_step': step,
        'num_params': num_params,
        'sizes': list(member.data.sizes),
        'mean_auroc': _score(probs[predicted], targets[predicted], labels)['mean_auroc'],
      }
    )
  result = {
    'checkpoint_step': None,
    'num_params': sum(m['num_params'] for m in member_info),
    'ensemble': member_info,
  }
  val = (np.mean(member_val_probs, axis=0), val_predicted) if val_records else (None, None)
  return result, np.mean(member_probs, axis=0), all_predicted, val


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


# --------------------------------------------------------------------------------------------------
# Comparing two evaluations
# --------------------------------------------------------------------------------------------------


def _eval_dir(path: str, eval_name: str) -> str:
  """A report folder (with predictions.csv) from itself or from a training workdir."""
  if os.path.isfile(os.path.join(path, 'predictions.csv')):
    return path
  candidate = os.path.join(path, 'eval', eval_name)
  if os.path.isfile(os.path.join(candidate, 'predictions.csv')):
    return candidate
  raise UserError(
    f'{path}: no predictions.csv here or in {candidate}; evaluate the run first (--mode=evaluate)'
  )


def read_predictions(path: str) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
  """predictions.csv -> (ids, labels, probabilities [N, K], targets [N, K] with NaN = unknown)."""
  try:
    with open(path, newline='') as f:
      rows = list(csv.reader(f))
  except FileNotFoundError:
    raise UserError(f'{path} not found') from None
  if not rows or rows[0][:1] != ['id'] or (len(rows[0]) - 1) % 2:
    raise UserError(f'{path}: expected a header id,<label>_prob,<label>_target,...')
  header = rows[0]
  labels = [h[: -len('_prob')] for h in header[1::2]]
  if header[2::2] != [f'{label}_target' for label in labels]:
    raise UserError(f'{path}: header columns must alternate <label>_prob, <label>_target')
  ids, probs, targets = [], [], []
  for n, row in enumerate(rows[1:], 1):
    if len(row) != len(header):
      raise UserError(f'{path} row {n}: {len(row)} fields, expected {len(header)}')
    try:
      probs.append([float(v) for v in row[1::2]])
      targets.append([float(v) if v else np.nan for v in row[2::2]])
    except ValueError as e:
      raise UserError(f'{path} row {n}: {e}') from None
    ids.append(row[0])
  k = len(labels)
  return (
    ids,
    labels,
    np.asarray(probs, np.float64).reshape(-1, k),
    np.asarray(targets, np.float64).reshape(-1, k),
  )


def compare(dir_a: str, dir_b: str, eval_name: str = 'test', out_dir: str = '') -> dict[str, Any]:
  """Paired DeLong test of two evaluations of the same images, per label; writes the comparison files.

  Args:
    dir_a: model A's training workdir (its eval/<eval_name>/) or report folder.
    dir_b: model B's, evaluated on the same split.
    eval_name: the report folder under each workdir's eval/.
    out_dir: where `delong_<A>_vs_<B>.{md,csv,json}` go; '' = A's report folder.

  Returns:
    The comparison: per label the DeLong dict (auc_a, auc_b, diff, var, z, p_value) or None, both mean AUROCs.

  Raises:
    UserError: a missing report, different labels, different images or different targets.
  """
  folder_a, folder_b = _eval_dir(dir_a, eval_name), _eval_dir(dir_b, eval_name)
  path_a, path_b = (os.path.join(d, 'predictions.csv') for d in (folder_a, folder_b))
  ids_a, labels_a, probs_a, targets_a = read_predictions(path_a)
  ids_b, labels_b, probs_b, targets_b = read_predictions(path_b)
  if labels_a != labels_b:
    raise UserError(f'{path_a} has labels {labels_a} but {path_b} has {labels_b}')
  if sorted(ids_a) != sorted(ids_b):
    only_a, only_b = set(ids_a) - set(ids_b), set(ids_b) - set(ids_a)
    raise UserError(
      f'{path_a} and {path_b} cover different images ({len(only_a)} only in A, {len(only_b)} only in B, '
      f'e.g. {sorted(only_a | only_b)[:3]}): a paired test needs the same split'
    )
  order = {image: i for i, image in enumerate(ids_b)}
  take = [order[image] for image in ids_a]
  probs_b, targets_b = probs_b[take], targets_b[take]
  if not np.array_equal(np.isnan(targets_a), np.isnan(targets_b)) or not np.allclose(
    np.nan_to_num(targets_a), np.nan_to_num(targets_b)
  ):
    raise UserError(f'{path_a} and {path_b} have different targets for the same images')
  labels = tuple(labels_a)
  name_a = os.path.basename(os.path.normpath(dir_a))
  name_b = os.path.basename(os.path.normpath(dir_b))
  if name_a == name_b:
    name_a, name_b = f'{name_a} (A)', f'{name_b} (B)'
  comparison = {
    'a': {'name': name_a, 'predictions': os.path.abspath(path_a)},
    'b': {'name': name_b, 'predictions': os.path.abspath(path_b)},
    'num_images': len(ids_a),
    'test': 'paired DeLong, two-sided, per label (no multiple-comparison correction)',
    'per_label': metrics.delong_per_label(probs_a, probs_b, targets_a, labels),
    'mean_auroc_a': metrics.mean_auroc(metrics.per_class_auroc(probs_a, targets_a, labels)),
    'mean_auroc_b': metrics.mean_auroc(metrics.per_class_auroc(probs_b, targets_b, labels)),
  }
  out_dir = out_dir or folder_a
  os.makedirs(out_dir, exist_ok=True)
  stem = os.path.join(out_dir, f'delong_{_safe(name_a)}_vs_{_safe(name_b)}')
  write_text_atomic(stem + '.md', report.compare_table(name_a, name_b, comparison, 'md'))
  write_text_atomic(stem + '.csv', report.compare_table(name_a, name_b, comparison, 'csv'))
  train.write_json_atomic(stem + '.json', comparison)
  comparison['files'] = [stem + ext for ext in ('.md', '.csv', '.json')]
  return comparison


USAGE = """usage:
  python -m ms_cxr.evaluate --workdir=DIR [--config=configs/FILE.py:ARGS] [--config.eval.FIELD=VALUE ...]
      evaluates a checkpoint of DIR (default config: DIR/config.json) and writes DIR/eval/<name>/
  python -m ms_cxr.evaluate compare DIR_A DIR_B [--eval_name=test] [--out=FOLDER]
      paired DeLong test of two evaluations of the same split, per label"""


def _main(argv) -> None:
  from absl import flags

  flags_ = flags.FLAGS
  args = argv[1:]
  with cli.user_errors():
    if args and args[0] == 'compare':
      if len(args) != 3:
        raise UserError('compare takes two folders: compare DIR_A DIR_B')
      comparison = compare(args[1], args[2], flags_.eval_name, flags_.out)
      print(open(comparison['files'][0]).read(), end='')
      print(f'written: {", ".join(comparison["files"])}')
      return
    if args:
      raise UserError(f'unexpected arguments {args}\n{USAGE}')
    if not flags_.workdir:
      raise UserError(f'--workdir is required\n{USAGE}')
    from ms_cxr import distributed

    distributed.initialize(flags_.config.parallel)
    result = evaluate(flags_.config, flags_.workdir)
    if jax.process_index() == 0:
      print(format_table(result))


def _flag_value(argv: Sequence[str], name: str) -> str | None:
  """The value of `--name=V` or `--name V` (absl accepts both, and one dash) in `argv`; None when absent."""
  value = None
  for i, arg in enumerate(argv):
    if arg == '--':
      break
    for prefix in (f'--{name}', f'-{name}'):
      if arg.startswith(prefix + '='):
        value = arg[len(prefix) + 1 :]
      elif arg == prefix:
        value = argv[i + 1] if i + 1 < len(argv) else ''  # absl reports the missing value
  return value


def _define_flags(argv: list[str], flag_values: Any = None) -> None:
  """--config from a file when given, else the workdir's config.json (overridable the same way).

  Args:
    argv: the command line (the program first), read for --config and --workdir before absl parses it.
    flag_values: where the flags are defined; absl's global FLAGS when None.
  """
  from absl import flags
  from ml_collections import config_flags

  flag_values = flags.FLAGS if flag_values is None else flag_values
  flags.DEFINE_string('workdir', None, 'Training workdir to evaluate.', flag_values=flag_values)
  # --eval_name is ms_cxr.report's flag (imported above): the report folder under each workdir's eval/.
  flags.DEFINE_string(
    'out', '', "compare: output folder ('' = A's report folder).", flag_values=flag_values
  )
  if _flag_value(argv, 'config') is not None:
    config_flags.DEFINE_config_file(
      'config', None, 'Config file, as for ms_cxr.main.', flag_values=flag_values, sys_argv=argv
    )
    return
  workdir = _flag_value(argv, 'workdir')
  if workdir is None or (argv[1:2] == ['compare']):
    config_flags.DEFINE_config_dict(
      'config',
      ml_collections.ConfigDict({'parallel': {}}),
      flag_values=flag_values,
      sys_argv=argv,
    )
    return
  with cli.user_errors():
    config = load_workdir_config(workdir)
  config_flags.DEFINE_config_dict(
    'config',
    config,
    "The run's config.json; override fields with --config.X=V",
    flag_values=flag_values,
    sys_argv=argv,
  )


if __name__ == '__main__':
  from absl import app

  _define_flags(sys.argv)
  app.run(_main, flags_parser=cli.parse_flags)
