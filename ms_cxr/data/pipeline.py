"""The Grain input pipeline: records -> fixed-shape host batches for one process.

Training: a global, seeded shuffle of the whole split, reshuffled every epoch, then consecutive
global batches;
process `p` of `P` takes rows [p*L, (p+1)*L) of each global batch (L = local batch). Every example's augmentation
draws from a generator Grain derives from the seed and the example's index, so the global batch
sequence does not
depend on the number of processes or workers, and resuming from a saved iterator position replays
the same data.

Evaluation: the split in order, padded to whole global batches; padded rows carry `valid=False` and are dropped
before scoring.

Batches are dicts of numpy arrays: `image` uint8 [L, S, S, 1], `labels` float32 [L, K] (NaN = unknown), `index`
int32 [L] (position in the split's record list, -1 for padding) and `valid` bool [L].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grain
import ml_collections
import numpy as np

from ms_cxr.data import images
from ms_cxr.data.records import Record

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class _LoadExample:
  """Decode and resize one record (picklable, so Grain worker processes can run it)."""

  records: Sequence[Record]
  size_px: int

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    valid = index >= 0
    record = self.records[index if valid else 0]
    pixels = images.decode(record.image, self.size_px)
    return {
      'image': pixels[:, :, None],
      'labels': np.asarray(record.labels, np.float32),
      'index': np.int32(index),
      'valid': np.bool_(valid),
    }


@dataclasses.dataclass(frozen=True)
class _LoadAugmentedExample:
  """Decode, resize and augment one record with the generator Grain gives this example."""

  load: _LoadExample
  augment: ml_collections.ConfigDict

  def __call__(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    example = self.load(index)
    if self.augment.enabled:
      example['image'] = images.augment(example['image'][:, :, 0], rng, self.augment)[:, :, None]
    return example


def _finish(
  ds: grain.MapDataset,
  local_batch_size: int,
  process_index: int,
  process_count: int,
  num_workers: int,
  prefetch_batches: int,
) -> grain.IterDataset:
  """Batches, keeps this process's share of every global batch, and prefetches."""
  # Consecutive local batches k*P .. k*P+P-1 make up global batch k; this process keeps batch k*P+p.
  ds = ds.batch(local_batch_size, drop_remainder=True)[process_index::process_count]
  it = ds.to_iter_dataset()
  if num_workers > 0:
    return it.mp_prefetch(
      grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=max(1, prefetch_batches)
      )
    )
  if prefetch_batches > 0:
    # A background thread decodes ahead while the accelerator runs the step.
    return grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=prefetch_batches)
  return it


def train_dataset(
  records: Sequence[Record],
  data_config: ml_collections.ConfigDict,
  *,
  size_px: int,
  global_batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
) -> grain.IterDataset:
  """An endless, shuffled, augmented stream of this process's training batches.

  Args:
    records: the training split.
    data_config: the `data` section (seed, augment, num_workers, prefetch_batches).
    size_px: image side for this stream.
    global_batch_size: batch across all processes; must divide by process_count.
    process_index: this process.
    process_count: number of processes.

  Returns:
    A checkpointable Grain IterDataset (its iterator's state is saved with the train state).
  """
  if not records:
    raise ValueError('the training split is empty')
  if global_batch_size % process_count:
    raise ValueError(
      f'global batch {global_batch_size} does not divide over {process_count} processes'
    )
  load = _LoadAugmentedExample(_LoadExample(tuple(records), size_px), data_config.augment)
  ds = grain.MapDataset.range(len(records)).seed(data_config.seed).shuffle().repeat()
  ds = ds.random_map(load)
  return _finish(
    ds,
    global_batch_size // process_count,
    process_index,
    process_count,
    data_config.num_workers,
    data_config.prefetch_batches,
  )


def eval_dataset(
  records: Sequence[Record],
  data_config: ml_collections.ConfigDict,
  *,
  size_px: int,
  global_batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
) -> grain.IterDataset:
  """The split in order, once, padded to whole global batches (padding rows have valid=False)."""
  if global_batch_size % process_count:
    raise ValueError(
      f'global batch {global_batch_size} does not divide over {process_count} processes'
    )
  padded = -(-len(records) // global_batch_size) * global_batch_size
  indices = np.full(padded, -1, np.int64)
  indices[: len(records)] = np.arange(len(records))
  ds = grain.MapDataset.source(indices).map(_LoadExample(tuple(records), size_px))
  return _finish(
    ds,
    global_batch_size // process_count,
    process_index,
    process_count,
    data_config.num_workers,
    data_config.prefetch_batches,
  )


def num_eval_batches(num_records: int, global_batch_size: int) -> int:
  """Global batches `eval_dataset` yields for a split of `num_records`."""
  return -(-num_records // global_batch_size)
