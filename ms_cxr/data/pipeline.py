"""The Grain input pipeline: records -> fixed-shape host batches for one process.

Training: a global, seeded shuffle of the whole split, reshuffled every epoch, cut into consecutive global batches;
process `p` of `P` takes rows [p*L, (p+1)*L) of each global batch (L = local batch). Which input sizes a step uses
is a pure function of the step number (`step_sizes`), and every example's augmentation draws from a generator
seeded by (seed, its position in the global stream), so the batch sequence depends neither on the number of
processes nor on the number of workers, and resuming from a saved iterator position replays the same data. When a
step uses several sizes, each example gets the same geometric augmentation at every size.

Evaluation: the split in order, at every configured size, padded to whole global batches; padded rows carry
`valid=False` and are dropped before scoring.

A batch is a dict of numpy arrays: `image_<size>` uint8 [L, size, size, 1] for each size of the step, `labels`
float32 [L, K] (NaN = unknown), `index` int32 [L] (position in the split's record list, -1 for padding), `valid`
bool [L] and `skipped` int32 [L], the number of images that failed to decode for that row (always 0 unless
`data.skip_bad`; the step does not take it).

Bad images: an image that fails to decode raises an error naming the file. With `data.skip_bad`, a training row
takes the next readable record of the split instead (deterministically, so resuming replays the same data), and
an evaluation row is marked not valid, so it is left out of the scores.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grain
import ml_collections
import numpy as np
from absl import flags, logging

from ms_cxr.data import images
from ms_cxr.data.records import Record
from ms_cxr.errors import UserError

Batch = dict[str, np.ndarray]
MULTISCALE_MODES = ('round_robin', 'random', 'all')
# data.skip_bad: how many following records a training row tries before giving up on a run of unreadable images.
MAX_SUBSTITUTES = 64


def image_key(size_px: int) -> str:
  return f'image_{size_px}'


def batch_sizes(batch: dict) -> tuple[int, ...]:
  """The input sizes present in a batch, ascending."""
  return tuple(sorted(int(k[len('image_') :]) for k in batch if k.startswith('image_')))


def step_sizes(
  step: int, sizes: Sequence[int], mode: str, probs: Sequence[float] = (), seed: int = 0
) -> tuple[int, ...]:
  """The sizes training step `step` (0-based) runs at.

  Args:
    step: global step index.
    sizes: every configured size.
    mode: round_robin (one size per step, cycling), random (one size per step, drawn with `probs`, uniform if
      empty) or all (every size of the same images in one step).
    probs: probabilities for `random`, one per size.
    seed: seeds `random`; the draw depends only on (seed, step).
  """
  sizes = tuple(sizes)
  if len(sizes) == 1 or mode == 'all':
    return sizes
  if mode == 'round_robin':
    return (sizes[step % len(sizes)],)
  if mode == 'random':
    p = np.asarray(probs if probs else [1.0] * len(sizes), np.float64)
    rng = np.random.default_rng([seed, step, 0x5A5])
    return (sizes[int(rng.choice(len(sizes), p=p / p.sum()))],)
  raise ValueError(f'config.train.multiscale={mode!r}; expected one of {MULTISCALE_MODES}')


_WARNED: set[str] = set()  # images already reported by this process (each epoch meets them again)


def _warn_once(image: str, message: str) -> None:
  if image not in _WARNED:
    _WARNED.add(image)
    logging.warning('data.skip_bad: %s', message)


@dataclasses.dataclass(frozen=True)
class _LoadTrainBatch:
  """Decodes, resizes and augments one local batch (picklable, so Grain worker processes can run it)."""

  records: Sequence[Record]
  sizes: tuple[int, ...]
  multiscale: str
  size_probs: tuple[float, ...]
  augment: ml_collections.ConfigDict
  seed: int
  global_batch_size: int
  process_index: int
  skip_bad: bool = False

  def _load(self, index: int, sizes: tuple[int, ...]) -> tuple[int, dict[int, np.ndarray], int]:
    """(the record used, its pixels per size, how many unreadable records were passed over)."""
    try:
      return index, images.load(self.records[index].image, sizes), 0
    except ValueError as e:
      if not self.skip_bad:
        raise UserError(f'{e}; data.skip_bad=True skips unreadable images') from None
      _warn_once(self.records[index].image, f'skipping training image: {e}')
    for k in range(1, MAX_SUBSTITUTES + 1):
      substitute = (index + k) % len(self.records)
      try:
        return substitute, images.load(self.records[substitute].image, sizes), k
      except ValueError as e:
        _warn_once(self.records[substitute].image, f'skipping training image: {e}')
    raise UserError(
      f'data.skip_bad: {self.records[index].image} and the {MAX_SUBSTITUTES} records after it are all '
      'unreadable; check the image folder'
    )

  def __call__(self, step: int, indices: np.ndarray) -> Batch:
    sizes = step_sizes(step, self.sizes, self.multiscale, self.size_probs, self.seed)
    local = len(indices)
    batch = {image_key(s): np.empty((local, s, s, 1), np.uint8) for s in sizes}
    used = np.empty(local, np.int32)
    skipped = np.zeros(local, np.int32)
    first = step * self.global_batch_size + self.process_index * local
    for row, index in enumerate(indices):
      used[row], pixels_by_size, skipped[row] = self._load(int(index), sizes)
      for size, pixels in pixels_by_size.items():
        if self.augment.enabled:
          # Same generator at every size: the sizes of one example see the same transformed view.
          rng = np.random.default_rng([self.seed, first + row])
          pixels = images.augment(pixels, rng, self.augment)
        batch[image_key(size)][row, :, :, 0] = pixels
    batch['labels'] = np.stack([np.asarray(self.records[i].labels, np.float32) for i in used])
    batch['index'] = used
    batch['valid'] = np.ones(local, np.bool_)
    batch['skipped'] = skipped
    return batch


@dataclasses.dataclass(frozen=True)
class _LoadEvalExample:
  """Decodes and resizes one record at every size, without augmentation."""

  records: Sequence[Record]
  sizes: tuple[int, ...]
  skip_bad: bool = False

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    valid = index >= 0
    record = self.records[index if valid else 0]
    skipped = 0
    try:
      if valid:
        pixels = images.load(record.image, self.sizes)
      else:  # padding to a whole global batch: not scored, so not decoded
        pixels = {s: np.zeros((s, s), np.uint8) for s in self.sizes}
    except ValueError as e:
      if not self.skip_bad:
        raise UserError(f'{e}; data.skip_bad=True leaves unreadable images out') from None
      _warn_once(record.image, f'leaving out evaluation image: {e}')
      pixels = {s: np.zeros((s, s), np.uint8) for s in self.sizes}
      valid, skipped = False, int(valid)
    example = {image_key(s): p[:, :, None] for s, p in pixels.items()}
    example['labels'] = np.asarray(record.labels, np.float32)
    example['index'] = np.int32(index)
    example['valid'] = np.bool_(valid)
    example['skipped'] = np.int32(skipped)
    return example


def _read_options(config: ml_collections.ConfigDict) -> grain.ReadOptions:
  """Grain reads whole local batches (the elements of both datasets): `data.read_threads` of them decoded side
  by side, each by one thread, and no more than that or `data.prefetch_batches` held ahead."""
  threads = config.data.read_threads
  if not isinstance(threads, int) or threads < 1:
    raise UserError(f'data.read_threads must be a positive integer, got {threads!r}')
  return grain.ReadOptions(
    num_threads=threads, prefetch_buffer_size=max(threads, config.data.prefetch_batches)
  )


def _prefetch(it: grain.IterDataset, num_workers: int, prefetch_batches: int) -> grain.IterDataset:
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():
      # Grain reads its absl flags when it starts workers; a notebook or a test never parsed any (defaults then).
      flags.FLAGS.mark_as_parsed()
    options = grain.MultiprocessingOptions(
      num_workers=num_workers, per_worker_buffer_size=max(1, prefetch_batches)
    )
    return it.mp_prefetch(options)
  if prefetch_batches > 0:
    # A background thread decodes ahead while the accelerator runs the step.
    return grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=prefetch_batches)
  return it


def _check_batch(global_batch_size: int, process_count: int) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
      f'global batch {global_batch_size} does not divide over {process_count} processes'
    )
  return global_batch_size // process_count


def train_dataset(
  records: Sequence[Record],
  config: ml_collections.ConfigDict,
  *,
  process_index: int = 0,
  process_count: int = 1,
) -> grain.IterDataset:
  """An endless, shuffled, augmented stream of this process's training batches.

  Args:
    records: the training split.
    config: the whole config (data.sizes, data.seed, data.augment, data.num_workers, data.prefetch_batches,
      train.global_batch_size, train.multiscale, train.size_probs).
    process_index: this process.
    process_count: number of processes.

  Returns:
    A checkpointable Grain IterDataset (its iterator's state is saved with the train state).
  """
  if not records:
    raise ValueError('the training split is empty')
  local = _check_batch(config.train.global_batch_size, process_count)
  # Training only some sizes' SSBN branches (adding a size): steps run at those sizes alone.
  trainable = tuple(config.train.trainable_sizes)
  load = _LoadTrainBatch(
    records=tuple(records),
    sizes=trainable or tuple(config.data.sizes),
    multiscale=config.train.multiscale,
    size_probs=() if trainable else tuple(config.train.size_probs),
    augment=config.data.augment,
    seed=config.data.seed,
    global_batch_size=config.train.global_batch_size,
    process_index=process_index,
    skip_bad=config.data.skip_bad,
  )
  order = grain.MapDataset.range(len(records)).seed(config.data.seed).shuffle().repeat()
  # Consecutive local batches k*P .. k*P+P-1 make up global batch k; this process keeps batch k*P+p, and
  # map_with_index hands the loader k, the step number.
  ds = order.batch(local)[process_index::process_count].map_with_index(load)
  it = ds.to_iter_dataset(_read_options(config))
  return _prefetch(it, config.data.num_workers, config.data.prefetch_batches)


def eval_dataset(
  records: Sequence[Record],
  config: ml_collections.ConfigDict,
  *,
  process_index: int = 0,
  process_count: int = 1,
) -> grain.IterDataset:
  """The split in order, once, at every size, padded to whole global batches (padding has valid=False)."""
  global_batch = config.eval.batch_size
  local = _check_batch(global_batch, process_count)
  padded = -(-len(records) // global_batch) * global_batch
  indices = np.full(padded, -1, np.int64)
  indices[: len(records)] = np.arange(len(records))
  ds = grain.MapDataset.source(indices).map(
    _LoadEvalExample(tuple(records), tuple(config.data.sizes), config.data.skip_bad)
  )
  ds = ds.batch(local, drop_remainder=True)[process_index::process_count]
  it = ds.to_iter_dataset(_read_options(config))
  return _prefetch(it, config.data.num_workers, config.data.prefetch_batches)
