"""Training: `train_and_evaluate(config, workdir)` is the whole run, top to bottom.

Sections: workdir and logging / input pipeline / model and optimizer / update step / load checkpoint
/ train loop.
Running it again on the same workdir resumes from the latest checkpoint, data order included.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax.training import train_state
from jax import lax

from ms_cxr import (
  attention_losses,
  checkpointing,
  config_lib,
  fusion,
  losses,
  metric_writers,
  metrics,
  models,
  parallel,
)
from ms_cxr.data import datasets, pipeline
from ms_cxr.data.records import Record, label_matrix
from ms_cxr.errors import UserError
from ms_cxr.models import ssbn

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


class TrainState(train_state.TrainState):
  """Params, optimizer state and step, plus BatchNorm running statistics."""

  batch_stats: Any


class NonFiniteLossError(UserError):
  """The loss became NaN or infinite; the last good checkpoint is kept."""


class Preempted(Exception):
  """SIGTERM stopped training after a step whose checkpoint was saved; the same command resumes from it."""

  def __init__(self, step: int, workdir: str):
    super().__init__(
      f'SIGTERM: stopped after step {step} with its checkpoint saved in {workdir}/checkpoints; '
      'run the same command to resume'
    )
    self.step = step


class _PreemptionWatch:
  """SIGTERM sets a flag instead of killing the process; the train loop checks it between steps.

  In a multi-process run every process checks at the same steps (every `every_steps`): the flags are all-gathered
  and all stop together if any process got the signal. `restore` puts the previous handler back.
  """

  def __init__(self, every_steps: int = 1):
    import signal
    import threading

    self.received = False
    self.every_steps = max(int(every_steps), 1)
    # Python handles signals in the main thread only; elsewhere (e.g. a test thread) SIGTERM keeps its default.
    self._installed = threading.current_thread() is threading.main_thread()
    self._previous = signal.signal(signal.SIGTERM, self._handle) if self._installed else None

  def _handle(self, signum, frame) -> None:
    self.received = True

  def should_stop(self, step: int) -> bool:
    """Whether to stop after `step`; the same answer on every process."""
    if jax.process_count() == 1:
      return self.received
    if step % self.every_steps:
      return False
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(self.received))))

  def restore(self) -> None:
    if self._installed:
      import signal

      signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)


# --------------------------------------------------------------------------------------------------
# Model and optimizer
# --------------------------------------------------------------------------------------------------


def create_learning_rate_schedule(
  optim: ml_collections.ConfigDict, num_steps: int
) -> optax.Schedule:
  """Warm-up (linear from 0), then constant | step | cosine."""
  lr = optim.learning_rate
  decay_steps = max(num_steps - optim.warmup_steps, 1)
  if optim.schedule == 'constant':
    main = optax.constant_schedule(lr)
  elif optim.schedule == 'step':
    main = optax.piecewise_constant_schedule(
      lr, {int(b) - optim.warmup_steps: optim.step_factor for b in optim.step_boundaries}
    )
  elif optim.schedule == 'cosine':
    main = optax.cosine_decay_schedule(lr, decay_steps, alpha=optim.cosine_final_fraction)
  else:
    raise UserError(
      f"config.optim.schedule={optim.schedule!r}; expected 'constant', 'step' or 'cosine'"
    )
  if optim.warmup_steps <= 0:
    return main
  warmup = optax.linear_schedule(0.0, lr, optim.warmup_steps)
  return optax.join_schedules([warmup, main], [optim.warmup_steps])


def create_optimizer(
  optim: ml_collections.ConfigDict, schedule: optax.Schedule, *, count_per_leaf: bool = False
) -> optax.GradientTransformation:
  """Adam, AdamW (decoupled decay) or SGD with momentum; optional global-norm clipping.

  Args:
    optim: the `optim` section of the config.
    schedule: the learning rate by step (`create_learning_rate_schedule`).
    count_per_leaf: Adam's bias correction counts each parameter's own updates rather than the steps
      (`ssbn.scale_by_adam_per_leaf`, as PyTorch's Adam does), for models whose steps update only some parameters:
      SSBN trained one size per step. The learning-rate schedule still follows the step.
  """
  parts = []
  if optim.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim.grad_clip_norm))
  if optim.name == 'adamw':
    if count_per_leaf:  # optax.adamw's chain with the per-leaf counts
      parts.append(
        optax.chain(
          ssbn.scale_by_adam_per_leaf(b1=optim.b1, b2=optim.b2),
          optax.add_decayed_weights(optim.weight_decay),
          optax.scale_by_learning_rate(schedule),
        )
      )
    else:
      parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay))
  elif optim.name in ('adam', 'sgd'):
    if optim.weight_decay > 0:  # classic L2: added to the gradient before the update rule
      parts.append(optax.add_decayed_weights(optim.weight_decay))
    if optim.name == 'sgd':
      parts.append(optax.sgd(schedule, momentum=optim.momentum, nesterov=optim.nesterov))
    elif count_per_leaf:  # optax.adam's chain with the per-leaf counts
      parts.append(
        optax.chain(
          ssbn.scale_by_adam_per_leaf(b1=optim.b1, b2=optim.b2),
          optax.scale_by_learning_rate(schedule),
        )
      )
    else:
      parts.append(optax.adam(schedule, b1=optim.b1, b2=optim.b2))
  else:
    raise UserError(f"config.optim.name={optim.name!r}; expected 'adam', 'adamw' or 'sgd'")
  return optax.chain(*parts)


def config_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The optimizer `config` describes: its schedule over `train.num_steps`, and for SSBN models Adam's step counts
  per parameter (a step of one size leaves the other sizes' branches, counts included, as they were)."""
  schedule = create_learning_rate_schedule(config.optim, config.train.num_steps)
  return create_optimizer(config.optim, schedule, count_per_leaf=config.model.norm == 'ssbn')


def create_train_state(
  config: ml_collections.ConfigDict,
  model: nn.Module,
  tx: optax.GradientTransformation,
  *,
  load_init_from: bool = True,
) -> TrainState:
  """Initialises parameters (from `config.train.seed`, then `config.model.init_from`) and optimizer state."""
  size = config.data.sizes[0]  # any size: size-specific branches are all created at init
  images = jnp.zeros((1, size, size, 1), jnp.uint8)
  variables = jax.jit(functools.partial(model.init, train=False))(
    jax.random.key(config.train.seed), images
  )
  if config.model.init_from and load_init_from:
    variables = initialize_from(config.model.init_from, variables, config.data.sizes[0])
  return TrainState.create(
    apply_fn=model.apply, params=variables['params'], tx=tx, batch_stats=variables['batch_stats']
  )


def initialize_from(
  source: str, variables: dict[str, Any], size_px: int | None = None
) -> dict[str, Any]:
  """Variables with weights from a training workdir or a torchvision DenseNet file (config.model.init_from).

  From a workdir, every leaf that corresponds is copied (`ssbn.transplant`; `size_px` chooses the size branch of an
  SSBN source for a plain-BatchNorm model); the leaves left at their initialisation are logged, and a workdir of
  which nothing fits is an error.
  """
  if os.path.isdir(source):
    loaded, counts = ssbn.transplant(variables, checkpointing.load_variables(source), size_px)
    if not counts['copied']:
      raise UserError(
        f'config.model.init_from={source!r}: none of its variables fits this model (another architecture?)'
      )
    logging.info(
      'init_from %s: %d leaves copied, %d kept at init', source, counts['copied'], counts['kept']
    )
    if counts['kept']:
      logging.warning(
        'init_from %s: %d leaves have no counterpart there and keep their initialisation: %s%s',
        source,
        counts['kept'],
        ', '.join(counts['kept_paths'][:8]),
        ', ...' if counts['kept'] > 8 else '',
      )
    return loaded
  if not os.path.exists(source):
    raise UserError(f'config.model.init_from={source!r}: no such workdir or file')
  from ms_cxr.models import convert

  try:
    loaded, summary = convert.init_from_torchvision(source, variables)
  except ValueError as e:
    raise UserError(str(e)) from None
  logging.info('init_from %s: %s', source, summary)
  return loaded


def count_params(tree: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


# --------------------------------------------------------------------------------------------------
# Update and prediction steps, written for one device (see ms_cxr.parallel)
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AttentionTerms:
  """The extra loss terms of attention models (MS-ANet); all off by default.

  Attributes:
    scale_weight: weight of the classification loss on each scale's own logits.
    consistency_weight: weight of the attention-consistency loss (Guo et al. 2019).
    transform: the geometric transform T (see ms_cxr.attention_losses.TRANSFORMS).
    seed: seeds the per-step transform parameters.
  """

  scale_weight: float = 0.0
  consistency_weight: float = 0.0
  transform: str = 'rescale'
  seed: int = 0

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> AttentionTerms:
    return cls(
      scale_weight=config.train.scale_loss_weight,
      consistency_weight=config.train.consistency_weight,
      transform=config.train.consistency_transform,
      seed=config.train.seed,
    )


def train_step(
  state: TrainState,
  batch: Batch,
  *,
  classification_loss: losses.LossFn,
  axis_name: str,
  accum_steps: Mapping[int, int],
  multiscale_loss: str = 'mean',
  trainable_sizes: tuple[int, ...] = (),
  attention: AttentionTerms = AttentionTerms(),
) -> tuple[TrainState, Metrics]:
  """One optimisation step on this device's share of the global batch, at the batch's sizes.

  The batch holds `image_<size>` for each size this step runs (ms_cxr.data.pipeline). Each size's loss is the
  masked BCE over the global batch; with several sizes they are averaged (or summed). A size with
  `accum_steps[size] = k` runs as k sequential micro-batches whose gradients add up to the same total.
  Size-specific parameters of sizes not in the batch, and their optimizer state, are left exactly as they were;
  with `trainable_sizes`, only those sizes' SSBN parameters change at all.

  Attention models (MS-ANet) return a dict; `attention` adds the per-scale logits' loss and the consistency
  loss between CAM(T(x)) and T(CAM(x)), with T drawn per image from a key folded with the step, the size and the
  image's row in the global batch (so the same on any number of devices and micro-batches).
  The transformed images join the batch, so they share BatchNorm statistics and are classified too.
  """
  sizes = pipeline.batch_sizes(batch)
  if not sizes:
    raise ValueError(f'the batch has no image_<size> entry (keys: {sorted(batch)})')
  labels = batch['labels']
  # Divide by the global number of known labels: each replica then holds its share of the global mean loss,
  # and summing the shares' gradients gives exactly the gradient of one device seeing the whole batch.
  global_count = jnp.maximum(lax.psum(jnp.sum(~jnp.isnan(labels)), axis_name), 1).astype(
    jnp.float32
  )
  size_weight = 1.0 / len(sizes) if multiscale_loss == 'mean' else 1.0

  consistency = attention.consistency_weight > 0
  step_key = jax.random.fold_in(jax.random.key(attention.seed), state.step)

  def loss_fn(params, batch_stats, images, chunk_labels, key, first_row, num_chunks):
    batch_size = images.shape[0]
    if consistency:
      # Each image's transform from its row in the global batch: the same draws on any number of devices and
      # micro-batches.
      rows = first_row + jnp.arange(batch_size)
      transform = jax.vmap(
        lambda row: jax.tree.map(
          lambda v: v[0],
          attention_losses.random_transform_params(
            jax.random.fold_in(key, row), attention.transform, 1
          ),
        )
      )(rows)
      images = jnp.concatenate(
        [images, attention_losses.transform_images(images, attention.transform, transform)]
      )
      chunk_labels = jnp.concatenate([chunk_labels, chunk_labels])
    out, updates = state.apply_fn(
      {'params': params, 'batch_stats': batch_stats}, images, train=True, mutable=['batch_stats']
    )
    outputs = out if isinstance(out, dict) else {'logits': out}
    copies = 2.0 if consistency else 1.0
    loss_sum, _ = classification_loss(outputs['logits'], chunk_labels)
    total = loss_sum / (global_count * copies)
    if attention.scale_weight > 0 and 'scale_logits' in outputs:
      for scale_logits in outputs['scale_logits']:
        scale_sum, _ = classification_loss(scale_logits, chunk_labels)
        total += attention.scale_weight * scale_sum / (global_count * copies)
    if consistency:
      maps = [*outputs['cams'], outputs['fused_cam']]
      for m in maps:
        c_sum, c_count = attention_losses.attention_consistency_sum(
          m[batch_size:],
          attention_losses.transform_maps(m[:batch_size], attention.transform, transform),
          attention_losses.frame_mask(m[:batch_size], attention.transform, transform),
        )
        # c_count depends on shapes only: its global sum is this count times the replicas and micro-batches. For
        # transforms that leave the frame it also depends on this micro-batch's draws, and with several
        # micro-batches each is then normalised by its own count (a mean of per-micro-batch means).
        denominator = lax.psum(c_count, axis_name) * num_chunks * len(maps)
        total += attention.consistency_weight * c_sum / denominator
    return total * size_weight, updates['batch_stats']

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  grads = jax.tree.map(jnp.zeros_like, state.params)
  batch_stats = state.batch_stats
  step_metrics = {}
  for size in sizes:
    images = batch[pipeline.image_key(size)]
    chunks = accum_steps.get(size, 1)
    size_key = jax.random.fold_in(step_key, size)
    # This device's first row in the global batch (devices hold consecutive rows).
    device_row = lax.axis_index(axis_name) * images.shape[0]
    if chunks == 1:
      (loss, batch_stats), size_grads = grad_fn(
        state.params, batch_stats, images, labels, size_key, device_row, 1
      )
    else:
      # Micro-batches in sequence (lax.scan keeps one in memory at a time); BatchNorm statistics are those of
      # each micro-batch (across devices), and the running averages are updated once per micro-batch.
      def micro_step(carry, chunk, num_chunks=chunks, size_key=size_key):
        stats, grad_sum, loss_sum = carry
        chunk_images, chunk_labels, first_row = chunk
        (loss, stats), g = grad_fn(
          state.params, stats, chunk_images, chunk_labels, size_key, first_row, num_chunks
        )
        return (stats, jax.tree.map(jnp.add, grad_sum, g), loss_sum + loss), None

      micro_batches = jax.tree.map(
        lambda x, n=chunks: x.reshape(n, x.shape[0] // n, *x.shape[1:]), (images, labels)
      ) + (device_row + jnp.arange(chunks) * (images.shape[0] // chunks),)
      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (batch_stats, size_grads, loss), _ = lax.scan(
        micro_step, (batch_stats, zeros, jnp.zeros((), jnp.float32)), micro_batches
      )
    grads = jax.tree.map(jnp.add, grads, size_grads)
    step_metrics[f'loss_{size}'] = lax.psum(loss, axis_name) / size_weight

  # psum so every replica applies the same update (the global-batch gradient).
  grads = lax.psum(grads, axis_name)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  params_mask = ssbn.size_mask(state.params, sizes)
  if trainable_sizes:
    params_mask = jax.tree.map(
      lambda a, b: a and b, params_mask, ssbn.trainable_mask(state.params, trainable_sizes)
    )
  if not all(jax.tree.leaves(params_mask)):
    # Zero gradients would still move Adam's moments (and so the parameters) of sizes this step did not run.
    opt_mask = ssbn.opt_state_mask(state.tx, state.opt_state, params_mask)
    new_state = new_state.replace(
      params=ssbn.keep_inactive(new_state.params, state.params, params_mask),
      opt_state=ssbn.keep_inactive(new_state.opt_state, state.opt_state, opt_mask),
    )
  step_metrics['loss'] = sum(step_metrics.values()) * size_weight
  step_metrics['l2_grads'] = optax.tree.norm(grads)
  step_metrics['l2_params'] = optax.tree.norm(new_state.params)
  if len(sizes) == 1:
    del step_metrics[f'loss_{sizes[0]}']
  return new_state, step_metrics


def configured_train_step(
  config: ml_collections.ConfigDict, classification_loss: Callable[..., jax.Array]
) -> Callable[..., Any]:
  """`train_step` with every setting `config` gives it (sizes' micro-batches, multi-scale loss, trainable sizes,
  attention terms), for the data-parallel axis: what training compiles, and what the memory summary and the
  benchmark compile, so that their figures are the training step's."""
  return functools.partial(
    train_step,
    classification_loss=classification_loss,
    axis_name=parallel.AXIS,
    accum_steps=accum_steps_by_size(config),
    multiscale_loss=config.train.multiscale_loss,
    trainable_sizes=tuple(config.train.trainable_sizes),
    attention=AttentionTerms.from_config(config),
  )


def train_step_memory(config: ml_collections.ConfigDict, size_px: int) -> dict[str, int]:
  """XLA's memory figures (bytes) for one device's train step at `size_px`, compiled but not run.

  The per-device batch is `train.global_batch_size` over one device, split by `train.accum_steps`; nothing is
  allocated (abstract inputs), so this answers "does 896 px fit" before a cluster run. `peak_bytes` is arguments
  + outputs + temporaries - aliased (donated) buffers.
  """
  dp = parallel.DataParallel.create(config.parallel.api, 1)
  model = models.create_model(
    config.model, len(config.data.labels), config.data.sizes, parallel.AXIS
  )
  state = jax.eval_shape(
    lambda: create_train_state(config, model, config_optimizer(config), load_init_from=False)
  )
  batch_size = config.train.global_batch_size
  batch = {
    pipeline.image_key(size_px): jax.ShapeDtypeStruct((batch_size, size_px, size_px, 1), jnp.uint8),
    'labels': jax.ShapeDtypeStruct((batch_size, len(config.data.labels)), jnp.float32),
  }
  # The loss's weights do not change the program's memory; the training rates are not read for this.
  loss = losses.classification_loss(
    config.train.loss,
    label_weights=config.train.label_weights,
    positive_rates=np.full(len(config.data.labels), 0.5),
    focal_gamma=config.train.focal_gamma,
  )
  step = dp.compile(configured_train_step(config, loss), donate_state=True)
  figures = compiled_memory(step.lower(state, batch).compile())
  if figures is None:
    raise UserError(
      f'the {jax.default_backend()} backend gives no memory analysis of a compiled step'
    )
  return figures


def compiled_memory(compiled: Any) -> dict[str, int] | None:
  """XLA's memory analysis of a compiled program in bytes (argument, output, temp, alias and
  peak = argument + output + temp - alias), or None where the backend has none."""
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # backends without one raise or return None
    return None
  if analysis is None:
    return None
  figures = {
    name: int(getattr(analysis, f'{name}_size_in_bytes'))
    for name in ('argument', 'output', 'temp', 'alias')
  }
  figures['peak'] = figures['argument'] + figures['output'] + figures['temp'] - figures['alias']
  return {f'{name}_bytes': value for name, value in figures.items()}


TTA_VIEWS = ('hflip', 'zoom', 'shift')


def tta_view(images: jax.Array, view: str) -> jax.Array:
  """One test-time view of uint8 images [B, S, S, C] at the same size.

  hflip: mirrored left-right; zoom: the central 90% enlarged back to S; shift: moved by S/32 down and right (the
  border filled with black, as training augmentation does).
  """
  size = images.shape[1]
  if view == 'hflip':
    return images[:, :, ::-1]
  if view == 'zoom':
    margin = round(size * 0.05)
    crop = images[:, margin : size - margin, margin : size - margin].astype(jnp.float32)
    resized = jax.image.resize(crop, (images.shape[0], size, size, images.shape[3]), 'linear')
    return jnp.clip(jnp.round(resized), 0, 255).astype(images.dtype)
  if view == 'shift':
    d = max(1, size // 32)
    return jnp.pad(images[:, : size - d, : size - d], ((0, 0), (d, 0), (d, 0), (0, 0)))
  raise ValueError(f'test-time view {view!r}; expected one of {TTA_VIEWS}')


def tta_views(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """`config.eval.tta` as view names; `--config.eval.tta=hflip,zoom` arrives as one string and is split here."""
  return tuple(v.strip() for item in config.eval.tta for v in str(item).split(',') if v.strip())


def eval_step(state: TrainState, batch: Batch, tta: tuple[str, ...] = ()) -> dict[str, jax.Array]:
  """Logits at every size in the batch for this device's examples (BatchNorm in inference mode).

  With `tta` (views of `TTA_VIEWS`), each size's logits are the mean over the original image and those views.
  """
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  out = {'index': batch['index'], 'valid': batch['valid']}
  for size in pipeline.batch_sizes(batch):
    images = batch[pipeline.image_key(size)]
    views = [images] + [tta_view(images, view) for view in tta]
    per_view = []
    for view_images in views:
      logits = state.apply_fn(variables, view_images, train=False)
      per_view.append(logits['logits'] if isinstance(logits, dict) else logits)  # MS-ANet: fused
    out[f'logits_{size}'] = per_view[0] if len(per_view) == 1 else jnp.mean(jnp.stack(per_view), 0)
  return out


def predict(
  p_eval_step: Any,
  state: TrainState,
  records: list[Record],
  config: ml_collections.ConfigDict,
  dp: parallel.DataParallel,
) -> tuple[dict[int, np.ndarray], np.ndarray]:
  """Predicts `records` in order at every configured size.

  Returns:
    Logits {size: [len(records), num_labels]} and a bool [len(records)] mask of the records predicted: all of
    them, except images that failed to decode under `data.skip_bad` (their logits rows are NaN).
  """
  ds = pipeline.eval_dataset(
    records, config, process_index=jax.process_index(), process_count=jax.process_count()
  )
  num_labels = len(config.data.labels)
  logits = {s: np.full((len(records), num_labels), np.nan, np.float32) for s in config.data.sizes}
  predicted = np.zeros(len(records), np.bool_)
  iterator = iter(ds)
  try:
    for batch in iterator:
      batch.pop('skipped', None)  # host-side bookkeeping, not a model input
      out = dp.gather(p_eval_step(state, dp.shard_batch(batch)))
      keep = out['valid']
      predicted[out['index'][keep]] = True
      for size in config.data.sizes:
        logits[size][out['index'][keep]] = out[f'logits_{size}'][keep]
  finally:
    if hasattr(iterator, 'close'):  # stops Grain worker processes and frees their shared memory
      iterator.close()
  return logits, predicted


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


# Fields a resumed run may change (a name ending in '.' covers its section): where the data lives and how fast it is
# read, how the same functions are compiled, logging and validation cadence, evaluation, checkpoint cadence and the
# device layout. Every other field shapes the restored state, the data stream the saved iterator position indexes
# or the updates that follow, so a resumed run keeps it. `data.num_workers` is not here: Grain saves the data
# position per worker process, and a position saved with one number of workers does not restore under another.
RESUMABLE_FIELDS = (
  'data.root',
  'data.prepared_dir',  # moved; switching between native files and prepared shards changes the images
  'data.read_threads',
  'data.prefetch_batches',
  # A run without skip_bad had no bad row (its split would not have loaded), so turning it on later keeps the
  # split; turning it off makes a bad row or image an error, never a different split.
  'data.skip_bad',
  'model.init_from',  # ignored on resume
  'model.remat',
  'model.pointwise_matmul',
  'model.kernel_grad_matmul',
  'train.num_steps',  # extending a run (see check_resume_config)
  'train.log_every_steps',
  'train.eval_every_steps',
  'eval.',
  'ckpt.',
  'parallel.',
)
# Learning-rate schedules spread over train.num_steps (see create_learning_rate_schedule).
SCHEDULES_OVER_NUM_STEPS = ('cosine',)


def flatten_config(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'section.field': value} of a nested config dict."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(flatten_config(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def field_in(field: str, patterns: Sequence[str]) -> bool:
  """Whether a dotted config field is one of `patterns` (a name, or a section prefix ending in '.')."""
  return any(field == f or (f.endswith('.') and field.startswith(f)) for f in patterns)


def differing_fields(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """The flattened fields both configs have whose values differ, compared as JSON text (a NaN field, such as
  data.chexpert.blank=nan, equals itself there); fields only one has (added or removed by an update of the code)
  are not compared."""
  return [k for k in new if k in old and json.dumps(old[k]) != json.dumps(new[k])]


def _may_change_on_resume(field: str, old: Any, new: Any) -> bool:
  if field == 'data.prepared_dir' and bool(old) != bool(new):
    return False
  return field_in(field, RESUMABLE_FIELDS)


def check_resume_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses to resume `workdir` under a config that differs from the one its checkpoints were trained with.

  Resuming restores the train state and the data-iterator position; a changed batch size, seed, sizes, optimizer
  or model would replay that position against another pipeline or schedule without any error, and rewriting
  config.json would lose the record of how the checkpoints were made. Only fields of RESUMABLE_FIELDS may differ
  from `<workdir>/config.json`; a longer (or shorter) train.num_steps is allowed, with a warning when the
  learning-rate schedule is spread over it. Fields that only one of the two configs has (added or removed by an
  update of the code) are not compared. A workdir with no checkpoint yet starts over, so any config goes.

  Every process reads the same files and so reaches the same decision; process 0 rewrites config.json only after
  its check passed, and a process reading the rewritten file finds its own config there.

  Raises:
    UserError: naming each changed field with its old and new value, and how to start a new run instead.
  """
  step = checkpointing.latest_step(workdir)
  path = os.path.join(workdir, 'config.json')
  if step is None or not os.path.exists(path):
    return
  try:
    with open(path) as f:
      old = flatten_config(config_lib.upgrade_written(json.load(f)))
  except (OSError, json.JSONDecodeError) as e:
    raise UserError(f'{path}: cannot read the config this workdir was trained with ({e})') from None
  new = flatten_config(json.loads(config_lib.to_json(config)))
  fields = differing_fields(old, new)
  refused = [k for k in fields if not _may_change_on_resume(k, old[k], new[k])]
  if refused:
    changes = ', '.join(f'{k} {old[k]!r} -> {new[k]!r}' for k in refused)
    raise UserError(
      f'workdir {workdir!r} holds a run (checkpoint of step {step}) trained with another config: {changes} '
      f'(old values from {path}); a resumed run must keep them. Resume with the old values, or start a new '
      f"--workdir, optionally from this run's weights with --config.model.init_from={workdir}"
    )
  if 'train.num_steps' in fields and config.optim.schedule in SCHEDULES_OVER_NUM_STEPS:
    logging.warning(
      'train.num_steps changed from %s to %s on resuming from step %d: the %s learning-rate schedule is spread over '
      'train.num_steps, so from here on the rate follows the %s-step curve, not the one this run started on',
      old['train.num_steps'],
      new['train.num_steps'],
      step,
      config.optim.schedule,
      new['train.num_steps'],
    )


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Checks the config against a run the workdir already holds (see `check_resume_config`), then creates the
  workdir and writes the resolved config; a one-line error if it is not writable."""
  check_resume_config(config, workdir)
  if jax.process_index() != 0:
    return
  try:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, 'config.json')
    with open(path + '.tmp', 'w') as f:
      f.write(config_lib.to_json(config))
    os.replace(path + '.tmp', path)
  except OSError as e:
    raise UserError(f'workdir {workdir!r} is not writable: {e.strerror}') from None


def accum_steps_by_size(config: ml_collections.ConfigDict) -> dict[int, int]:
  """{size: micro-batches} from `train.accum_steps` (empty = 1 for every size)."""
  steps = tuple(config.train.accum_steps) or (1,) * len(config.data.sizes)
  return dict(zip(config.data.sizes, steps, strict=True))


def validate_parallel(config: ml_collections.ConfigDict) -> None:
  """Checks `config.parallel.api` and `num_devices` against the devices present, before a mesh is built from them."""
  api = config.parallel.api
  if api not in parallel.APIS:
    raise UserError(f'config.parallel.api={api!r}; expected one of {parallel.APIS}')
  requested, count = config.parallel.num_devices, jax.device_count()
  if not isinstance(requested, int) or not 0 <= requested <= count:
    raise UserError(
      f'config.parallel.num_devices={requested!r}; expected 0 (all devices) or at most the {count} device(s) present'
    )
  if jax.process_count() > 1 and requested not in (0, count):
    raise UserError(
      f'config.parallel.num_devices={requested}; a multi-process run uses every device: expected 0 (or {count})'
    )


def validate_config(config: ml_collections.ConfigDict, dp: parallel.DataParallel) -> None:
  """Checks that fail fast, before any compilation."""
  sizes = tuple(config.data.sizes)
  if not sizes or len(set(sizes)) != len(sizes) or min(sizes) < 16:
    raise UserError(f'config.data.sizes={sizes} must be distinct sizes of at least 16 px')
  unknown = set(config.train.trainable_sizes) - set(sizes)
  if unknown:
    raise UserError(
      f'config.train.trainable_sizes has {sorted(unknown)}, not among data.sizes {sizes}'
    )
  if config.train.trainable_sizes and config.model.norm != 'ssbn':
    raise UserError("config.train.trainable_sizes needs config.model.norm='ssbn'")
  for name in ('accum_steps', 'size_probs'):
    value = tuple(config.train[name])
    if value and len(value) != len(sizes):
      raise UserError(f'config.train.{name}={value} needs one entry per size in {sizes}')
  local_per_device = config.train.global_batch_size // max(dp.num_devices, 1)
  for size, chunks in accum_steps_by_size(config).items():
    if chunks < 1 or local_per_device % chunks:
      raise UserError(
        f'config.train.accum_steps: {chunks} micro-batches at {size} px do not divide the per-device '
        f'batch of {local_per_device}'
      )
  if config.train.multiscale not in pipeline.MULTISCALE_MODES:
    raise UserError(
      f'config.train.multiscale={config.train.multiscale!r}; expected one of {pipeline.MULTISCALE_MODES}'
    )
  if config.train.loss not in losses.LOSSES:
    raise UserError(f'config.train.loss={config.train.loss!r}; expected one of {losses.LOSSES}')
  if config.train.consistency_transform not in attention_losses.TRANSFORMS:
    raise UserError(
      f'config.train.consistency_transform={config.train.consistency_transform!r}; '
      f'expected one of {attention_losses.TRANSFORMS}'
    )
  is_attention_model = config.model.name.startswith('msanet')
  if (config.train.consistency_weight or config.train.scale_loss_weight) and not is_attention_model:
    raise UserError('config.train.consistency_weight / scale_loss_weight need an msanet_* model')
  if config.eval.fusion not in fusion.FUSIONS:
    raise UserError(f'config.eval.fusion={config.eval.fusion!r}; expected one of {fusion.FUSIONS}')
  unknown_views = [v for v in tta_views(config) if v not in TTA_VIEWS]
  if unknown_views:
    raise UserError(f'config.eval.tta has {unknown_views}; expected views from {TTA_VIEWS}')
  for name in ('train.global_batch_size', 'eval.batch_size'):
    value = config.train.global_batch_size if name.startswith('train') else config.eval.batch_size
    if value <= 0 or value % dp.num_devices:
      raise UserError(
        f'config.{name}={value} must be a positive multiple of {dp.num_devices} devices'
      )
  if config.train.label_weights and len(config.train.label_weights) != len(config.data.labels):
    raise UserError(
      f'config.train.label_weights has {len(config.train.label_weights)} values; '
      f'expected one per label ({len(config.data.labels)})'
    )
  if config.train.label_weights and config.train.loss != 'bce':
    raise UserError(
      f'config.train.label_weights is set but config.train.loss={config.train.loss!r}; expected loss '
      "'bce' (the only loss that takes per-label weights) or label_weights=()"
    )
  for name in ('train.log_every_steps', 'ckpt.every_steps'):
    section, field = name.split('.')
    value = config[section][field]
    if not isinstance(value, int) or value < 1:
      raise UserError(f'config.{name}={value!r}; expected a positive number of steps')
  every = config.train.eval_every_steps
  if not isinstance(every, int) or every < 0:
    raise UserError(
      f'config.train.eval_every_steps={every!r}; expected a number of steps (0 = never)'
    )
  validate_map_size(config)


def validate_map_size(config: ml_collections.ConfigDict) -> None:
  """`config.eval.map_size`: 0 or an input size the model can run at (with SSBN, one of its branches' sizes)."""
  map_size, sizes = config.eval.map_size, tuple(config.data.sizes)
  if not isinstance(map_size, int) or (map_size and map_size < 16):
    raise UserError(
      f'config.eval.map_size={map_size!r}; expected a size of at least 16 px (or 0 = the largest of data.sizes)'
    )
  if config.model.norm == 'ssbn' and map_size and map_size not in sizes:
    raise UserError(
      f'config.eval.map_size={map_size}; an SSBN model has BatchNorm branches for data.sizes {sizes} only: '
      'expected one of them (or 0 = the largest)'
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains (resuming from `workdir` if it has a checkpoint) and returns the final state.

  Args:
    config: the resolved config.
    workdir: where config.json, checkpoints and TensorBoard files go.

  Returns:
    The final train state (replicated per `config.parallel.api`).
  """
  # --- workdir and logging ------------------------------------------------------------------------
  validate_parallel(config)
  dp = parallel.DataParallel.create(config.parallel.api, config.parallel.num_devices)
  validate_config(config, dp)
  prepare_workdir(config, workdir)
  writer = metric_writers.MetricWriter(workdir)
  labels = tuple(config.data.labels)

  # --- input pipeline -----------------------------------------------------------------------------
  skipped_rows: list[
    str
  ] = []  # data.skip_bad: label rows and missing images left out of the splits
  train_records = datasets.load_split(config.data, 'train', skipped_rows)
  val_records = (
    datasets.load_split(config.data, config.eval.val_split, skipped_rows)
    if config.train.eval_every_steps
    else []
  )
  train_iter = iter(
    pipeline.train_dataset(
      train_records,
      config,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
  )
  writer.log(
    f'{config.data.dataset}: {len(train_records)} train / {len(val_records)} validation images, '
    f'{len(labels)} labels, sizes {tuple(config.data.sizes)} px'
  )

  # --- model and optimizer ------------------------------------------------------------------------
  model = models.create_model(config.model, len(labels), config.data.sizes, axis_name=parallel.AXIS)
  schedule = create_learning_rate_schedule(config.optim, config.train.num_steps)
  ckpt = checkpointing.Checkpointer(workdir, config.ckpt)
  resuming = ckpt.latest_step() is not None
  state = create_train_state(config, model, config_optimizer(config), load_init_from=not resuming)
  writer.log(f'{config.model.name}: {count_params(state.params):,} parameters')

  # --- update step --------------------------------------------------------------------------------
  classification_loss = losses.classification_loss(
    config.train.loss,
    label_weights=config.train.label_weights,
    positive_rates=attention_losses.positive_rates(label_matrix(train_records, len(labels))),
    focal_gamma=config.train.focal_gamma,
  )
  p_train_step = dp.compile(configured_train_step(config, classification_loss), donate_state=True)
  p_eval_step = dp.compile(eval_step, sharded_output=True)

  # --- load checkpoint ----------------------------------------------------------------------------
  replicated = jax.sharding.NamedSharding(dp.mesh, jax.sharding.PartitionSpec())
  if resuming:
    manager, step = ckpt.resolve_step('latest')

    def restore(template: TrainState) -> TrainState:
      restored, _ = ckpt.restore(
        manager,
        step,
        checkpointing.abstract_like(template, replicated),
        checkpointing.checkpoint_meta(config),
        data_iter=train_iter,
      )
      return restored

    try:
      restored = restore(state)
    except UserError:
      if config.model.norm != 'ssbn':
        raise
      # Saved before Adam's step counts were per parameter (one count for all): restored in that layout, each
      # parameter's count then starts from the shared one.
      shared = create_optimizer(config.optim, schedule, count_per_leaf=False)
      restored = restore(state.replace(tx=shared, opt_state=shared.init(state.params)))
      restored = restored.replace(
        tx=state.tx, opt_state=ssbn.counts_per_leaf(restored.opt_state, state.opt_state)
      )
      writer.log(
        'Adam step counts of the checkpoint (one for all parameters) now kept per parameter'
      )
    state = restored
    writer.log(f'resumed from step {step}')
  first_step = int(state.step)
  discarded = ckpt.discard_best_after(first_step)
  if discarded:
    writer.log(
      f'best checkpoint(s) of step(s) {discarded}, saved after step {first_step} by the run stopped there, '
      'discarded: validation chooses the best again from here'
    )
  best_score = ckpt.best_score()
  state = dp.replicate(state)

  # --- train loop ---------------------------------------------------------------------------------
  progress = metric_writers.ReportProgress(
    config.train.num_steps, config.train.global_batch_size, first_step
  )
  # Per-step metrics not yet fetched: fetching every step would stall the dispatch of the next one.
  pending: list[tuple[int, Metrics]] = []
  skipped_images = (
    0  # data.skip_bad: training images that failed to decode since this process started
  )
  if config.data.skip_bad:
    writer.write_scalars(first_step, {'skipped_rows': len(skipped_rows)}, prefix='data/')
  last_saved = first_step

  fetched: list[dict] = []  # metrics fetched to the host but not yet logged

  def flush(step: int) -> dict[str, float]:
    """Fetches pending metrics (raising on the first non-finite loss, before anything is saved) and returns the
    means of everything fetched since the last call that logged; steps fetched early (for a checkpoint or a
    validation) are kept for that log line rather than dropped."""
    new = jax.device_get([m for _, m in pending])
    for (s, _), m in zip(pending, new, strict=True):
      loss = float(np.ravel(m['loss'])[0])
      # The loss is that of the parameters before the step's update; their norm after it catches an update that
      # diverged (a norm past float32's range is as unusable as a NaN) before it is validated or saved.
      l2_params = float(np.ravel(m['l2_params'])[0])
      if not math.isfinite(loss) or not math.isfinite(l2_params):
        what = (
          f'loss is {loss}'
          if not math.isfinite(loss)
          else f'parameters diverged (L2 norm {l2_params})'
        )
        kept = (
          f'The last good checkpoint (step {last_saved}) is kept in {workdir}/checkpoints'
          if last_saved > 0
          else f'No checkpoint had been saved yet (ckpt.every_steps={config.ckpt.every_steps})'
        )
        raise NonFiniteLossError(f'{what} at step {s}; stopping. {kept}')
    pending.clear()
    fetched.extend(new)
    return {}

  def log_means(step: int) -> dict[str, float]:
    """Flushes, then the means since the previous log line (and clears them)."""
    flush(step)
    keys = sorted({k for m in fetched for k in m})  # per-size losses appear only on their steps
    means = {k: float(np.mean([np.ravel(m[k])[0] for m in fetched if k in m])) for k in keys}
    means['learning_rate'] = float(schedule(step - 1))
    fetched.clear()
    return means

  def save(step: int, *, best: bool = False, extra: dict | None = None) -> None:
    host_state = dp.unreplicate(state)
    meta = checkpointing.checkpoint_meta(config, step=step, **(extra or {}))
    ckpt.save(step, host_state, train_iter, meta, best=best)

  # Preemption (SIGTERM): finish the step, save state and data position, raise Preempted (exit status 4).
  preemption = _PreemptionWatch(config.parallel.preemption_check_every_steps)
  try:
    for step in range(first_step + 1, config.train.num_steps + 1):
      host_batch = next(train_iter)
      skipped_images += int(host_batch.pop('skipped').sum())
      batch = dp.shard_batch(host_batch)
      state, step_metrics = p_train_step(state, batch)
      pending.append((step, step_metrics))

      is_last = step == config.train.num_steps
      if step % config.train.log_every_steps == 0 or is_last:
        scalars = log_means(step)
        images_per_sec, eta = progress(step)
        scalars['images_per_sec'] = images_per_sec
        writer.write_scalars(step, scalars, prefix='train/')
        if config.data.skip_bad:
          writer.write_scalars(step, {'skipped_images': skipped_images}, prefix='data/')
          if skipped_images:
            writer.log(
              f'data.skip_bad: {skipped_images} unreadable training image(s) replaced so far'
            )
        writer.log(
          f'step {step}/{config.train.num_steps}  loss {scalars["loss"]:.4f}  '
          f'lr {scalars["learning_rate"]:.2e}  {images_per_sec:.1f} images/s  '
          f'ETA {eta / 60:.1f} min'
        )

      eval_now = config.train.eval_every_steps and (
        step % config.train.eval_every_steps == 0 or is_last
      )
      if eval_now:
        if pending:
          flush(step)
        logits, predicted = predict(p_eval_step, state, val_records, config, dp)
        # best_on_val would choose sizes on the very split it is scored on: use the mean there.
        rule = 'mean_prob' if config.eval.fusion == 'best_on_val' else config.eval.fusion
        probs = fusion.fuse({s: v[predicted] for s, v in logits.items()}, rule)
        per_class = metrics.per_class_auroc(
          probs, label_matrix(val_records, len(labels))[predicted], labels
        )
        score = metrics.mean_auroc(per_class)
        writer.write_scalars(
          step, {'mean_auroc': score if score is not None else float('nan')}, prefix='val/'
        )
        writer.log(f'step {step}  validation mean AUROC {score}')
        if score is not None and (best_score is None or score > best_score):
          best_score = score
          save(step, best=True, extra={'val_mean_auroc': score})

      if step % config.ckpt.every_steps == 0 or is_last:
        if pending:
          flush(step)
        save(step)
        last_saved = step

      if preemption.should_stop(step):
        if last_saved != step:
          if pending or fetched:
            writer.write_scalars(step, log_means(step), prefix='train/')
          save(step)
          last_saved = step
        ckpt.wait()
        writer.log(f'SIGTERM: checkpoint of step {step} saved; stopping')
        write_preempted_marker(step)
        raise Preempted(step, workdir)
  finally:
    preemption.restore()
    ckpt.wait()
    ckpt.close()
    writer.close()
    if hasattr(train_iter, 'close'):  # stops Grain worker processes and frees their shared memory
      train_iter.close()
  return state


PREEMPTED_MARKER_ENV = 'MS_CXR_PREEMPTED_MARKER'


def write_preempted_marker(step: int) -> None:
  """With `MS_CXR_PREEMPTED_MARKER=FILE` set, process 0 writes FILE once the preempted run's checkpoint is saved,
  and no process goes on before it is written (a barrier), so a launcher that kills the other tasks when the first
  one exits (srun --kill-on-bad-exit) finds it whichever exits first (launch/slurm.sbatch). A file that cannot be
  written is a warning: the run still ends as preempted, with status 4."""
  marker = os.environ.get(PREEMPTED_MARKER_ENV)
  if not marker:
    return
  if jax.process_index() == 0:
    try:
      with open(marker + '.tmp', 'w') as f:
        f.write(f'SIGTERM: stopped after step {step}\n')
      os.replace(marker + '.tmp', marker)
    except OSError as e:
      logging.warning('cannot write the preemption marker %s: %s', marker, e)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices('ms_cxr preemption marker written')


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes JSON through a temporary file so a reader never sees half a file."""
  with open(path + '.tmp', 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write('\n')
  os.replace(path + '.tmp', path)
