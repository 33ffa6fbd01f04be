"""Dataset registry: names -> label vocabularies and readers returning `Record`s per split.

Split names are the same for every dataset: `train` (optimised), `val` (model selection, carved from training data
by patient), `test` (reported).
"""

from __future__ import annotations

import dataclasses
import functools

import ml_collections
from absl import logging

from ms_cxr.data import bad_input, synthetic
from ms_cxr.data import labels as labels_lib
from ms_cxr.data.records import Record
from ms_cxr.errors import UserError

DATASETS = ('synthetic', 'nih', 'chexpert', 'vindr')
SPLITS = ('train', 'val', 'test')


def default_labels(dataset: str) -> tuple[str, ...]:
  """The label vocabulary a dataset's configs train on by default."""
  if dataset == 'synthetic':
    return tuple(synthetic.LABELS)
  if dataset == 'nih':
    return labels_lib.NIH_LABELS
  if dataset == 'chexpert':
    return labels_lib.CHEXPERT_LABELS
  if dataset == 'vindr':
    from ms_cxr.data import vindr

    return tuple(vindr.VINDR_FINDINGS)
  raise UserError(f'config.data.dataset={dataset!r} is unknown; expected one of {DATASETS}')


def load_split(
  data_config: ml_collections.ConfigDict, split: str, skipped: list[str] | None = None
) -> list[Record]:
  """Reads one split of the configured dataset.

  Args:
    data_config: the `data` section of the config.
    split: train | val | test.
    skipped: with `data_config.skip_bad`, the messages of the rows (and missing images) skipped are appended here;
      they are logged as a warning either way.

  Returns:
    The split's records, labels ordered as `data_config.labels`.

  Raises:
    UserError: unknown dataset or split, or a label the dataset does not have.
  """
  if split not in SPLITS:
    raise UserError(f'split {split!r} is unknown; expected one of {SPLITS}')
  dataset = data_config.dataset
  if data_config.prepared_dir:
    from ms_cxr.data import prepare

    try:
      return prepare.read_prepared(
        data_config.prepared_dir, split, labels=tuple(data_config.labels), data_config=data_config
      )
    except (ValueError, FileNotFoundError) as e:
      raise UserError(str(e)) from None
  if dataset == 'synthetic':
    return _synthetic_split(data_config, split)
  if dataset == 'nih':
    from ms_cxr.data import nih

    reader = functools.partial(nih.read_records, views=tuple(data_config.nih.views))
  elif dataset == 'chexpert':
    from ms_cxr.data import chexpert

    options = data_config.chexpert
    reader = functools.partial(
      chexpert.read_records,
      views=tuple(options.views),
      uncertainty=options.uncertainty,
      blank=options.blank,
      smoothing_range=tuple(options.smoothing_range),
    )
  elif dataset == 'vindr':
    from ms_cxr.data import vindr

    options = data_config.vindr
    reader = functools.partial(
      vindr.read_records, label_space=options.label_space, aggregate=options.aggregate
    )
  else:
    raise UserError(f'config.data.dataset={dataset!r} is unknown; expected one of {DATASETS}')
  if not data_config.root:
    raise UserError(f'config.data.root is empty; set it to the {dataset} dataset folder')
  try:
    if not data_config.skip_bad:
      return reader(
        data_config.root,
        split=split,
        val_fraction=data_config.val_fraction,
        seed=data_config.split_seed,
        labels=tuple(data_config.labels),
      )
    with bad_input.collecting() as bad:
      records = reader(
        data_config.root,
        split=split,
        val_fraction=data_config.val_fraction,
        seed=data_config.split_seed,
        labels=tuple(data_config.labels),
      )
  except (ValueError, FileNotFoundError) as e:
    # The readers' own option for missing images is data.skip_bad here.
    raise UserError(
      str(e).replace('skip_missing_images=True', '--config.data.skip_bad=True')
    ) from None
  if bad:
    logging.warning(
      'data.skip_bad: skipped %d bad row(s) or missing image(s) of %s %s, e.g. %s',
      len(bad),
      dataset,
      split,
      '; '.join(bad[:3]),
    )
  if skipped is not None:
    skipped.extend(bad)
  return records


def _synthetic_split(data_config: ml_collections.ConfigDict, split: str) -> list[Record]:
  """Consecutive index ranges train | val | test; each range starts on a patient boundary (no
  leakage)."""
  per_patient = data_config.synthetic.images_per_patient
  start = 0
  for name in SPLITS:
    count = data_config.synthetic[f'num_{name}']
    if name == split:
      records = synthetic.make_records(data_config.split_seed, start, count, per_patient)
      unknown = [label for label in data_config.labels if label not in synthetic.LABELS]
      if unknown:
        raise UserError(
          f'config.data.labels has {unknown} which the synthetic set does not draw; '
          f'expected names from {synthetic.LABELS}'
        )
      return _select_labels(records, synthetic.LABELS, data_config.labels)
    start += -(-count // per_patient) * per_patient  # round up to a whole patient
  raise AssertionError(split)


def _select_labels(records, available, wanted) -> list[Record]:
  if tuple(available) == tuple(wanted):
    return records
  columns = [list(available).index(name) for name in wanted]
  return [dataclasses.replace(r, labels=r.labels[columns]) for r in records]
