"""CheXpert reader: `train.csv` / `valid.csv` / `test.csv` rows to records, with an uncertainty policy.

Expected layout: `root` holds `CheXpert-v1.0/` or `CheXpert-v1.0-small/`, or is that folder, which holds
`train.csv`, `valid.csv`, optionally `test.csv` (each may be gzipped as `.csv.gz`) and the image folders
`train/`, `valid/`, `test/` (`<split>/patientNNNNN/studyN/viewN_{frontal,lateral}.jpg`).

The `Path` column starts with the dataset folder's name (`CheXpert-v1.0-small/train/...`); that first component
is replaced by the dataset folder actually found, so a renamed folder, or the small set's CSV placed beside the
full-size images, still resolves. `Record.id` is the path below the dataset folder (`train/patient00001/study1/
view1_frontal.jpg`), the same for both resolutions.

Label values are 1.0 (positive), 0.0 (negative), -1.0 (uncertain) or blank (not mentioned in the report).
Uncertain values follow one of `UNCERTAINTY_POLICIES`:
  ignore  NaN (masked out of the loss and metrics; U-Ignore)
  zeros   0 (U-Zeros)
  ones    1 (U-Ones)
  mixed   1 for Atelectasis and Edema (where U-Ones worked best in Irvin et al. 2019), 0 for the others
  smooth  a value in `smoothing_range` (label-smoothing regularisation, Pham et al. 2021): uniform in
          [lo, hi), drawn from a BLAKE2b hash of the image's path below the dataset folder (`Record.id`), a
          separate draw per label (by its position in `CHEXPERT_LABELS`), so it is the same at every read, for
          any `labels` subset, and in the small and the full-size download (whose `Path` values differ only in
          the first component).
Blank values become `blank` (0.0 by default, the usual reading of "not mentioned"; NaN masks them).
"""

from __future__ import annotations

import csv
import hashlib
import math
import operator
import os
import re
import struct
from collections.abc import Sequence

import numpy as np

from ms_cxr.data import bad_input
from ms_cxr.data.labels import CHEXPERT_LABELS
from ms_cxr.data.nih import carve_val_patients, open_csv
from ms_cxr.data.records import Record

UNCERTAINTY_POLICIES = ('ignore', 'zeros', 'ones', 'mixed', 'smooth')
SPLITS = ('train', 'val', 'train_val', 'valid', 'test')
VIEWS = ('frontal', 'lateral')
DATASET_FOLDERS = ('CheXpert-v1.0', 'CheXpert-v1.0-small')
# The labels the 'mixed' policy maps to 1 when uncertain; every other label maps to 0.
MIXED_ONES = ('Atelectasis', 'Edema')

_PATH = 'Path'
_FRONTAL_LATERAL = 'Frontal/Lateral'
_AP_PA = 'AP/PA'
_STUDY = re.compile(r'(patient\d+)/(study\d+)/')
_DIGEST_WORDS = struct.Struct('<16I')
_UNCERTAIN = -1.0
_VALUES = {'1.0': 1.0, '0.0': 0.0, '-1.0': _UNCERTAIN, '1': 1.0, '0': 0.0, '-1': _UNCERTAIN}


def read_csv(
  path: str | os.PathLike,
  *,
  labels: Sequence[str] = CHEXPERT_LABELS,
  uncertainty: str = 'ones',
  blank: float = 0.0,
  smoothing_range: tuple[float, float] = (0.55, 0.85),
  views: Sequence[str] = VIEWS,
  dataset_dir: str | os.PathLike | None = None,
  all_patients: set[str] | None = None,
) -> list[Record]:
  """Parses a CheXpert label file (`train.csv`, `valid.csv`, `test.csv`, or any of them gzipped).

  Args:
    path: the CSV.
    labels: label order of `Record.labels`; any subset or reordering of `CHEXPERT_LABELS`.
    uncertainty: what -1.0 becomes, one of `UNCERTAINTY_POLICIES` (see the module docstring).
    blank: what a blank value becomes (0.0 or NaN usually).
    smoothing_range: (lo, hi) of the 'smooth' policy, 0 <= lo <= hi <= 1.
    views: 'frontal' and/or 'lateral' (the `Frontal/Lateral` column); other rows are dropped.
    dataset_dir: the folder that replaces the first component of `Path` (the dataset folder's name); defaults
      to the CSV's folder.
    all_patients: when given, the patient of every row is added to it, whatever its view and whether or not
      the row is kept (a carve over these does not move with the view selection or with rows skipped as bad).

  Returns:
    Records in file order: id = `Path` below the dataset folder, image = absolute path (not checked here),
    patient_id 'patientNNNNN', study_id 'patientNNNNN/studyN', view 'AP' / 'PA' for frontal images ('' for the
    few frontal rows marked LL / RL) and 'LATERAL', labels float32.

  Raises:
    ValueError: unknown policy, label or view; bad smoothing_range; a missing column; a row with the wrong
      number of fields, a value other than 1 / 0 / -1 / blank, or a path without patient and study (the error
      names the file, the 1-based data row and the column).
  """
  if uncertainty not in UNCERTAINTY_POLICIES:
    raise ValueError(
      f'uncertainty={uncertainty!r} is unknown; expected one of {UNCERTAINTY_POLICIES}'
    )
  lo, hi = (float(v) for v in smoothing_range)
  if not 0.0 <= lo <= hi <= 1.0:
    raise ValueError(f'smoothing_range={smoothing_range} must satisfy 0 <= lo <= hi <= 1')
  wanted_views = _check_views(views)
  unknown = [name for name in labels if name not in CHEXPERT_LABELS]
  if unknown:
    raise ValueError(f'labels {unknown} are unknown; expected names from {CHEXPERT_LABELS}')
  if not labels or len(set(labels)) != len(labels):
    raise ValueError(f'labels={list(labels)} must name each label once, at least one')
  dataset_dir = os.path.abspath(
    dataset_dir if dataset_dir is not None else os.path.dirname(path) or '.'
  )

  # Per requested label: raw string -> value. Under 'smooth' the uncertain value is None here and is
  # replaced per row below, since it depends on the row.
  tables: list[dict[str, float | None]] = []
  for name in labels:
    uncertain = {
      'ignore': math.nan,
      'zeros': 0.0,
      'ones': 1.0,
      'mixed': 1.0 if name in MIXED_ONES else 0.0,
      'smooth': None,
    }[uncertainty]
    table = {raw: uncertain if v == _UNCERTAIN else v for raw, v in _VALUES.items()}
    table[''] = float(blank)
    tables.append(table)
  hash_slots = [CHEXPERT_LABELS.index(name) for name in labels]
  step = (hi - lo) / 2.0**32  # maps a uint32 draw to [lo, hi)
  smooth = uncertainty == 'smooth'

  with open_csv(path) as f:
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None:
      raise ValueError(f'{path} is empty; expected a header with {_PATH!r} and the label columns')
    header = [name.strip() for name in header]
    missing = [c for c in (_PATH, _FRONTAL_LATERAL, _AP_PA, *labels) if c not in header]
    if missing:
      raise ValueError(f'{path}: header has no column {missing}; found {header}')
    path_col, kind_col, ap_pa_col = (header.index(c) for c in (_PATH, _FRONTAL_LATERAL, _AP_PA))
    columns = [header.index(name) for name in labels]
    # itemgetter of one index returns the field itself, not a 1-tuple.
    raw_labels = (
      operator.itemgetter(*columns) if len(columns) > 1 else lambda row: (row[columns[0]],)
    )
    num_fields = len(header)
    prefix = os.path.join(dataset_dir, '')
    # 223,414 train rows hold ~24,000 distinct label strings: convert each combination once.
    converted: dict[tuple[str, ...], list[float | None]] = {}

    ids, images, patients, studies, record_views, values = [], [], [], [], [], []
    for n, row in enumerate(reader, 1):
      if all_patients is not None and len(row) > path_col:
        match = _STUDY.search(row[path_col])
        if match is not None:
          all_patients.add(match[1])
      with bad_input.ROW:  # data.skip_bad: a bad row is skipped and counted
        if len(row) != num_fields:
          raise ValueError(
            f'{path} row {n} (line {n + 1}): {len(row)} fields, expected {num_fields}'
          )
        kind = row[kind_col]
        if kind == 'Frontal':
          view = row[ap_pa_col] if row[ap_pa_col] in ('AP', 'PA') else ''
        elif kind == 'Lateral':
          view = 'LATERAL'
        else:
          raise ValueError(
            f'{path} row {n}, column {_FRONTAL_LATERAL!r}: {kind!r} is not Frontal or Lateral'
          )
        if kind.lower() not in wanted_views:
          continue
        raw = raw_labels(row)
        row_values = converted.get(raw)
        if row_values is None:
          row_values = [
            _parse_value(path, n, name, text, table)
            for name, text, table in zip(labels, raw, tables, strict=True)
          ]
          converted[raw] = row_values
        image_path = row[path_col]
        match = _STUDY.search(image_path)
        if match is None:
          raise ValueError(
            f'{path} row {n}, column {_PATH!r}: {image_path!r} has no patientNNNNN/studyN/ part'
          )
        first, _, rest = image_path.partition('/')
        relative = rest if first.startswith('CheXpert-v1.0') else image_path
        if smooth and None in row_values:
          words = _hash_words(relative)
          row_values = [
            lo + step * words[slot] if v is None else v
            for v, slot in zip(row_values, hash_slots, strict=True)
          ]
        ids.append(relative)
        images.append(prefix + relative)
        patients.append(match[1])
        studies.append(f'{match[1]}/{match[2]}')
        record_views.append(view)
        values.append(row_values)

  matrix = np.array(values, np.float32).reshape(len(values), len(labels))
  return [
    Record(id=i, image=image, labels=label_row, patient_id=p, study_id=s, view=v)
    for i, image, label_row, p, s, v in zip(
      ids, images, matrix, patients, studies, record_views, strict=True
    )
  ]


def read_records(
  root: str | os.PathLike,
  *,
  split: str,
  val_fraction: float = 0.1,
  seed: int = 0,
  views: Sequence[str] = ('frontal',),
  labels: Sequence[str] = CHEXPERT_LABELS,
  uncertainty: str = 'ones',
  blank: float = 0.0,
  smoothing_range: tuple[float, float] = (0.55, 0.85),
  skip_missing_images: bool = False,
) -> list[Record]:
  """Reads one split of CheXpert as records.

  Args:
    root: a folder holding `CheXpert-v1.0/` or `CheXpert-v1.0-small/`, or that folder itself.
    split: 'train' / 'val' (train.csv carved by patient: `val_fraction` of its patients go to 'val', chosen
      by `seed` with `nih.carve_val_patients` among all patients of the file, whatever `views` keeps),
      'train_val' (all of train.csv), 'valid' (valid.csv, the radiologist-labelled set of 200 studies) or
      'test' (test.csv when present, else valid.csv: the CheXpert-v1.0 download has no test labels, and papers
      report on the valid set).
    val_fraction: fraction of the train.csv patients in 'val'.
    seed: selects the train/val carve.
    views: 'frontal' and/or 'lateral'.
    labels, uncertainty, blank, smoothing_range: as in `read_csv`.
    skip_missing_images: drop records whose image is missing instead of raising. Existence is checked only
      when the split's image folder (e.g. `valid/`) exists, so a label file alone still reads.

  Returns:
    The split's records (see `read_csv`).

  Raises:
    ValueError: unknown split, no dataset folder or CSV, anything `read_csv` raises, or missing images
      (unless `skip_missing_images`).
  """
  if split not in SPLITS:
    raise ValueError(f'split {split!r} is unknown; expected one of {SPLITS}')
  dataset_dir = _dataset_dir(os.path.abspath(root))
  stem = 'valid' if split in ('valid', 'test') else 'train'
  csv_path = (split == 'test' and _find_csv(dataset_dir, 'test')) or _find_csv(dataset_dir, stem)
  if csv_path is None:
    raise ValueError(f'{os.path.join(dataset_dir, stem + ".csv")} is missing (split {split!r})')
  all_patients: set[str] = set()
  records = read_csv(
    csv_path,
    labels=labels,
    uncertainty=uncertainty,
    blank=blank,
    smoothing_range=smoothing_range,
    views=views,
    dataset_dir=dataset_dir,
    all_patients=all_patients,
  )
  if split in ('train', 'val'):
    # Carved over every patient of train.csv, so a patient is on the same side under any view selection.
    val_patients = carve_val_patients(all_patients, val_fraction, seed)
    records = [r for r in records if (r.patient_id in val_patients) == (split == 'val')]
  return _check_images(records, dataset_dir, csv_path, skip_missing_images)


def _check_views(views: Sequence[str]) -> frozenset[str]:
  wanted = frozenset(v.lower() for v in views)
  if not wanted or not wanted <= frozenset(VIEWS):
    raise ValueError(f'views={tuple(views)} must be a non-empty selection of {VIEWS}')
  return wanted


def _parse_value(
  path: str | os.PathLike, n: int, column: str, raw: str, table: dict[str, float | None]
) -> float | None:
  """Converts one label field; numeric spellings such as ' 1' or '-1.00' are accepted too."""
  if raw in table:
    return table[raw]
  if not raw.strip():
    return table['']
  try:
    number = float(raw)
  except ValueError:
    number = math.nan
  for key in ('1.0', '0.0', '-1.0'):
    if number == float(key):
      return table[key]
  raise ValueError(
    f'{path} row {n} (line {n + 1}), column {column!r}: {raw!r} is not 1.0, 0.0, -1.0 or blank'
  )


def _hash_words(image_id: str) -> tuple[int, ...]:
  """16 integers uniform in [0, 2**32), fixed by the image's id (its path below the dataset folder): the id's
  64-byte BLAKE2b digest read as uint32."""
  return _DIGEST_WORDS.unpack(hashlib.blake2b(image_id.encode()).digest())


def _dataset_dir(root: str) -> str:
  present = [name for name in DATASET_FOLDERS if os.path.isdir(os.path.join(root, name))]
  if len(present) > 1:
    raise ValueError(f'{root} holds both {present}; point root at the one to read')
  if present:
    return os.path.join(root, present[0])
  if any(_find_csv(root, stem) for stem in ('train', 'valid', 'test')):
    return root
  raise ValueError(
    f'{root} has neither {" nor ".join(DATASET_FOLDERS)} nor train.csv / valid.csv; '
    'point root at the folder that holds the CheXpert download'
  )


def _find_csv(dataset_dir: str, stem: str) -> str | None:
  for name in (f'{stem}.csv', f'{stem}.csv.gz'):
    path = os.path.join(dataset_dir, name)
    if os.path.isfile(path):
      return path
  return None


def _check_images(
  records: list[Record], dataset_dir: str, csv_path: str, skip_missing: bool
) -> list[Record]:
  """Drops (or raises on) records whose image is missing from an image folder (train/, valid/) that exists."""
  folder_exists: dict[str, bool] = {}
  kept, missing = [], []
  for record in records:
    folder = record.id.partition('/')[0]
    if folder not in folder_exists:
      folder_exists[folder] = os.path.isdir(os.path.join(dataset_dir, folder))
    if folder_exists[folder] and not os.path.isfile(record.image):
      missing.append(record)
    else:
      kept.append(record)
  if missing and bad_input.skipping():
    for record in missing:
      bad_input.skip(f'{csv_path}: image {record.image} is missing')
  elif missing and not skip_missing:
    raise ValueError(
      f'{csv_path}: image {missing[0].image} is missing ({len(missing)} of {len(records)} images of the '
      'split are missing; skip_missing_images=True skips them)'
    )
  return kept
