"""ChestX-ray14 (NIH) reader: `Data_Entry_2017*.csv`, the official split lists and the box list.

Expected layout under `root` (the NIH download and the Kaggle mirror both fit):

  Data_Entry_2017_v2020.csv | Data_Entry_2017.csv   (either, optionally gzipped as .csv.gz)
  train_val_list.txt, test_list.txt                  (the official patient-wise split)
  BBox_List_2017.csv                                 (optional, .csv.gz too)
  images/<name>.png | images_001/images/<name>.png ... images_012/images/<name>.png

File quirks handled here: an unquoted `OriginalImage[Width,Height]` header is two fields to a CSV parser (and each
row holds two values there), so bracketed names are rejoined and given one column per value
(`OriginalImage[Width]`, `OriginalImage[Height]`); the 2017 file ends every line with an empty field and the box
list's header ends with three empty names, so trailing empty header names are optional in the rows.

Two helpers here are shared with the CheXpert reader: `open_csv` (plain or gzipped text) and
`carve_val_patients` (the seeded patient-level train/val carve).
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import operator
import os
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TextIO

import numpy as np
from absl import logging

from ms_cxr.data import bad_input
from ms_cxr.data.labels import NIH_LABELS
from ms_cxr.data.records import Box, Record

SPLITS = ('train', 'val', 'train_val', 'test', 'all')

# Preferred first: the 2020 revision corrects errors of the 2017 release.
DATA_ENTRY_NAMES = (
  'Data_Entry_2017_v2020.csv',
  'Data_Entry_2017_v2020.csv.gz',
  'Data_Entry_2017.csv',
  'Data_Entry_2017.csv.gz',
)
BBOX_NAMES = ('BBox_List_2017.csv', 'BBox_List_2017.csv.gz')
TRAIN_VAL_LIST = 'train_val_list.txt'
TEST_LIST = 'test_list.txt'

NO_FINDING = 'No Finding'
# The box list was drawn on the released 1024 x 1024 PNGs, not on the original DICOM size that Data_Entry's
# `OriginalImage[Width,Height]` gives (e.g. 2992 x 2991): over all 984 boxes x + w <= 1012 and y + h <= 1022.
BOX_IMAGE_SIZE = 1024.0
# The box list spells one finding differently from Data_Entry.
_BOX_LABEL_ALIASES = {'Infiltrate': 'Infiltration'}

_IMAGE_SUBFOLDER = re.compile(r'images_\d{3}')
# How many image names a warning about the split lists quotes.
_NAMES_QUOTED = 5

_IMAGE = 'Image Index'
_FINDINGS = 'Finding Labels'
_FOLLOW_UP = 'Follow-up #'
_PATIENT = 'Patient ID'
_AGE = 'Patient Age'
_GENDER = 'Patient Gender'
_VIEW = 'View Position'
_WIDTH = 'OriginalImage[Width]'
_HEIGHT = 'OriginalImage[Height]'
_SPACING_X = 'OriginalImagePixelSpacing[x]'
_SPACING_Y = 'OriginalImagePixelSpacing[y]'
_DATA_ENTRY_COLUMNS = (
  _IMAGE,
  _FINDINGS,
  _FOLLOW_UP,
  _PATIENT,
  _AGE,
  _GENDER,
  _VIEW,
  _WIDTH,
  _HEIGHT,
  _SPACING_X,
  _SPACING_Y,
)
_BOX_COLUMNS = ('Image Index', 'Finding Label', 'Bbox [x]', 'Bbox [y]', 'Bbox [w]', 'Bbox [h]')


@dataclasses.dataclass(frozen=True, slots=True)
class DataEntryRow:
  """One parsed row of `Data_Entry_2017*.csv`.

  Attributes:
    row: 1-based data row number (the header is line 1, so this row is on line `row + 1`).
    image_index: the image file name, e.g. '00000001_000.png'.
    findings: the `Finding Labels` names in file order; empty for 'No Finding'.
    follow_up: `Follow-up #`, the patient's visit number.
    patient_id: `Patient ID` as written in the file (no zero padding).
    patient_age: `Patient Age` in years.
    patient_gender: 'M' or 'F'.
    view_position: 'PA' or 'AP'.
    width, height: `OriginalImage[Width,Height]`, the size of the original DICOM in pixels.
    pixel_spacing_x, pixel_spacing_y: `OriginalImagePixelSpacing[x,y]` in mm.
  """

  row: int
  image_index: str
  findings: tuple[str, ...]
  follow_up: int
  patient_id: str
  patient_age: int
  patient_gender: str
  view_position: str
  width: int
  height: int
  pixel_spacing_x: float
  pixel_spacing_y: float


class CsvText:
  """The lines of a CSV text stream for `csv.reader`; a file that cannot be read as UTF-8 text (an export in
  another encoding) or as gzip data (a download cut short) raises ValueError naming the file and the line, rather
  than a decoder's error that names neither."""

  def __init__(self, path: str | os.PathLike, stream: TextIO, is_gzip: bool):
    self.path = os.fspath(path)
    self._stream = stream
    self._is_gzip = is_gzip
    self._line = 0

  def __enter__(self) -> CsvText:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self._stream.close()

  def __iter__(self) -> Iterator[str]:
    return self

  def __next__(self) -> str:
    try:
      line = next(self._stream)
    except UnicodeDecodeError as e:
      raise ValueError(
        f'{self.path} line {self._line + 1}: not UTF-8 text ({e.reason}); save the file as UTF-8 CSV'
      ) from None
    except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
      what = 'gzip data' if self._is_gzip else 'file'
      raise ValueError(
        f'{self.path} line {self._line + 1}: the {what} cannot be read ({e}); it may be cut short or damaged, '
        'download it again'
      ) from None
    self._line += 1
    return line


def open_csv(path: str | os.PathLike) -> CsvText:
  """Opens a CSV as text, gunzipping it when it is gzip data (whatever its name ends with).

  Args:
    path: a .csv or .csv.gz file.

  Returns:
    A context manager iterating over the file's lines, for `csv.reader` (opened with newline='' as the csv
    module requires; a UTF-8 BOM is dropped).
  """
  with open(path, 'rb') as f:
    is_gzip = f.read(2) == b'\x1f\x8b'
  if is_gzip:
    return CsvText(path, gzip.open(path, 'rt', encoding='utf-8-sig', newline=''), True)
  return CsvText(path, open(path, encoding='utf-8-sig', newline=''), False)


def carve_val_patients(
  patient_ids: Iterable[str], val_fraction: float, seed: int
) -> frozenset[str]:
  """Picks the validation patients of a patient-level train/val carve.

  Each patient gets a key from a hash of (seed, patient id) and the patients with the smallest keys go to
  validation, so the carve depends only on the set of patients and the seed (not on row order or Python's
  hash randomisation).

  Args:
    patient_ids: the patients to carve (repeats allowed).
    val_fraction: fraction of patients (not images) for validation, in [0, 1). When it is above 0 and there are
      at least two patients, at least one patient goes to each side.
    seed: selects the carve.

  Returns:
    The validation patients.

  Raises:
    ValueError: val_fraction outside [0, 1).
  """
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f'val_fraction={val_fraction} must be in [0, 1)')
  patients = set(patient_ids)
  if val_fraction == 0.0 or len(patients) < 2:
    return frozenset()
  num_val = min(len(patients) - 1, max(1, round(val_fraction * len(patients))))
  salt = f'{seed}\0'.encode()
  ranked = sorted(
    patients, key=lambda p: hashlib.blake2b(salt + p.encode(), digest_size=8).digest()
  )
  return frozenset(ranked[:num_val])


def read_data_entry(path: str | os.PathLike) -> list[DataEntryRow]:
  """Parses a ChestX-ray14 label file (`Data_Entry_2017_v2020.csv` or `Data_Entry_2017.csv`, or gzipped).

  Columns are found by name, so both the 2020 file and the 2017 file (extra empty last field) parse the same.

  Args:
    path: the label file.

  Returns:
    One `DataEntryRow` per data row, in file order.

  Raises:
    ValueError: naming the file (and the 1-based data row where it applies) for a missing column, a row with the
      wrong number of fields, an unreadable number, an unknown finding name, 'No Finding' combined with a finding,
      or an image listed twice.
  """
  known = frozenset(NIH_LABELS)
  # ~800 distinct label strings over 112,120 rows: parse each once.
  findings_cache: dict[str, tuple[str, ...]] = {}
  first_row: dict[str, int] = {}
  rows = []
  with open_csv(path) as f:
    lines = _checked_rows(path, f, _DATA_ENTRY_COLUMNS)
    for n, (name, labels, follow_up, patient, age, gender, view, w, h, sx, sy) in lines:
      with bad_input.ROW:  # data.skip_bad: a bad row is skipped and counted
        findings = findings_cache.get(labels)
        if findings is None:
          findings = _parse_findings(path, n, labels, known)
          findings_cache[labels] = findings
        if name in first_row:
          raise ValueError(
            f'{path} row {n}: image {name!r} is listed again (first on row {first_row[name]})'
          )
        row = DataEntryRow(
          n,
          name,
          findings,
          _number(path, n, _FOLLOW_UP, follow_up, int),
          patient,
          _age_years(path, n, age),
          gender,
          view.strip().upper(),
          _number(path, n, _WIDTH, w, int),
          _number(path, n, _HEIGHT, h, int),
          _number(path, n, _SPACING_X, sx, float),
          _number(path, n, _SPACING_Y, sy, float),
        )
        first_row[name] = n
        rows.append(row)
  return rows


def _number(path: str | os.PathLike, n: int, column: str, text: str, kind: type) -> Any:
  try:
    return kind(text)
  except ValueError:
    raise ValueError(
      f'{path} row {n}: {column!r} is {text!r}, expected {"an integer" if kind is int else "a number"}'
    ) from None


# An age as a plain number of years or as DICOM's age string (e.g. '057Y', '006M'): the spelling of some
# ChestX-ray14 label files (the Kaggle sample's).
_AGE_STRING = re.compile(r'\s*(\d+)\s*([YMWD]?)\s*', re.IGNORECASE)
_DAYS_PER_UNIT = {'': 365.25, 'Y': 365.25, 'M': 365.25 / 12, 'W': 7.0, 'D': 1.0}


def _age_years(path: str | os.PathLike, n: int, text: str) -> int:
  """Whole years of a 'Patient Age' field."""
  match = _AGE_STRING.fullmatch(text)
  if match is None:
    raise ValueError(
      f"{path} row {n}: {_AGE!r} is {text!r}, expected years ('57') or a DICOM age ('057Y', '006M')"
    )
  return int(int(match[1]) * _DAYS_PER_UNIT[match[2].upper()] // 365.25)


def read_boxes(path: str | os.PathLike) -> dict[str, tuple[Box, ...]]:
  """Parses `BBox_List_2017.csv` into boxes in image fractions.

  The file's `Bbox [x,y,w,h]` are pixels of the released 1024 x 1024 PNGs (see `BOX_IMAGE_SIZE`); they are
  divided by 1024 and clipped to [0, 1]. 'Infiltrate' is renamed 'Infiltration' to match Data_Entry.

  Args:
    path: the box list (.csv or .csv.gz).

  Returns:
    Image file name -> its boxes in file order.

  Raises:
    ValueError: naming the file and 1-based data row for a malformed row, an unknown finding name or an empty box.
  """
  known = frozenset(NIH_LABELS)
  boxes: dict[str, list[Box]] = {}
  with open_csv(path) as f:
    for n, (name, label, x, y, w, h) in _checked_rows(path, f, _BOX_COLUMNS):
      with bad_input.ROW:
        label = _BOX_LABEL_ALIASES.get(label, label)
        if label not in known:
          raise ValueError(f"{path} row {n}: 'Finding Label' has unknown label {label!r}")
        try:
          x, y, w, h = (float(v) / BOX_IMAGE_SIZE for v in (x, y, w, h))
        except ValueError as e:
          raise ValueError(f'{path} row {n}: {e}') from None
        x0, y0 = max(x, 0.0), max(y, 0.0)
        x1, y1 = min(x + w, 1.0), min(y + h, 1.0)
        if not (x0 < x1 and y0 < y1):
          raise ValueError(
            f'{path} row {n}: box ({x}, {y}, {w}, {h}) x 1024 px is empty inside the image'
          )
        boxes.setdefault(name, []).append(Box(label, x0, y0, x1, y1))
  return {name: tuple(b) for name, b in boxes.items()}


def read_records(
  root: str | os.PathLike,
  *,
  split: str,
  val_fraction: float = 0.1,
  seed: int = 0,
  views: Sequence[str] = ('PA', 'AP'),
  labels: Sequence[str] = NIH_LABELS,
  skip_missing_images: bool = False,
) -> list[Record]:
  """Reads one split of ChestX-ray14 as records.

  Args:
    root: the dataset folder (layout in the module docstring).
    split: 'test' (official test_list.txt), 'train_val' (official train_val_list.txt), 'train' / 'val'
      (train_val_list.txt carved by patient: `val_fraction` of its patients go to 'val', chosen by `seed`
      with `carve_val_patients`) or 'all' (every row; needs no list file). Listed images without a Data_Entry
      row, and rows in neither list, are left out with a warning (absl logging).
    val_fraction: fraction of the train_val patients in 'val'.
    seed: selects the train/val carve.
    views: View Position values to keep (case-insensitive).
    labels: label order of `Record.labels`; any subset or reordering of `NIH_LABELS`.
    skip_missing_images: drop records whose image is missing instead of raising. Existence is checked only when
      `root` has an image folder (`images/` or `images_0NN/images/`); without one, records point at
      `root/images/<name>` unchecked, for label-only use.

  Returns:
    Records in label-file order: id = image file name, image = absolute path, patient_id = Patient ID,
    study_id = '<patient>_<follow-up>', view = View Position, labels float32 0/1 in `labels` order, and
    boxes from BBox_List_2017 when that file exists.

  Raises:
    ValueError: unknown split or label, val_fraction outside [0, 1), a missing label or list file, a malformed
      file (see `read_data_entry`, `read_boxes`), or missing images (unless `skip_missing_images`).
  """
  root = os.path.abspath(root)
  if split not in SPLITS:
    raise ValueError(f'split {split!r} is unknown; expected one of {SPLITS}')
  columns = _label_columns(labels, NIH_LABELS)
  entry_path = _find_file(root, DATA_ENTRY_NAMES, 'label file')
  rows = read_data_entry(entry_path)

  if split != 'all':
    list_path = os.path.join(root, TEST_LIST if split == 'test' else TRAIN_VAL_LIST)
    listed = _read_list(list_path, split)
    _warn_list_mismatch(root, entry_path, rows, list_path, listed)
    rows = [r for r in rows if r.image_index in listed]
  if split in ('train', 'val'):
    val_patients = carve_val_patients((r.patient_id for r in rows), val_fraction, seed)
    rows = [r for r in rows if (r.patient_id in val_patients) == (split == 'val')]
  wanted_views = {v.upper() for v in views}
  rows = [r for r in rows if r.view_position in wanted_views]

  image_paths = _image_paths(root, rows, entry_path, skip_missing_images)
  bbox_path = _find_file(root, BBOX_NAMES, 'box list', required=False)
  boxes = read_boxes(bbox_path) if bbox_path else {}

  matrix = np.zeros((len(rows), len(columns)), np.float32)
  for i, row in enumerate(rows):
    for finding in row.findings:
      j = columns.get(finding)
      if j is not None:
        matrix[i, j] = 1.0
  return [
    Record(
      id=row.image_index,
      image=image,
      labels=label_row,
      patient_id=row.patient_id,
      study_id=f'{row.patient_id}_{row.follow_up}',
      view=row.view_position,
      boxes=boxes.get(row.image_index, ()),
    )
    for row, label_row, image in zip(rows, matrix, image_paths, strict=True)
    if image is not None
  ]


def _expand_header(names: Sequence[str]) -> list[str]:
  """Gives each field its own name.

  An unquoted `OriginalImage[Width,Height]` arrives as the fields `OriginalImage[Width` and `Height]` (a quoted
  one as one field) while the rows hold one value per comma, so it becomes `OriginalImage[Width]`,
  `OriginalImage[Height]`.
  """
  out = []
  i = 0
  while i < len(names):
    end = i
    if '[' in names[i]:
      while ']' not in names[end] and end + 1 < len(names):
        end += 1
    if '[' not in names[i] or ']' not in names[end]:
      out.append(names[i].strip())
      i += 1
      continue
    base, inner = ','.join(names[i : end + 1]).strip().split('[', 1)
    out.extend(f'{base}[{part.strip()}]' for part in inner.rstrip(']').split(','))
    i = end + 1
  return out


def _checked_rows(
  path: str | os.PathLike, f: Iterable[str], columns: Sequence[str]
) -> Iterator[tuple[int, tuple[str, ...]]]:
  """Yields (1-based data row, the `columns` fields of that row) after checking the row's field count.

  A row may have as many fields as the header has names, or just the named ones when the header ends with
  empty names (the 2017 Data_Entry ends each line with an empty field; the box list's header ends with `,,,`
  while its rows do not).
  """
  reader = csv.reader(f)
  header = next(reader, None)
  if header is None:
    raise ValueError(f'{path} is empty; expected a header with {list(columns)}')
  names = _expand_header(header)
  named = len(names)
  while named and not names[named - 1]:
    named -= 1
  missing = [c for c in columns if c not in names[:named]]
  if missing:
    raise ValueError(f'{path}: header has no column {missing}; found {names[:named]}')
  fields = operator.itemgetter(*(names.index(c) for c in columns))
  allowed = {named, len(names)}
  for n, row in enumerate(reader, 1):
    if len(row) not in allowed:
      expected = ' or '.join(str(k) for k in sorted(allowed))
      message = f'{path} row {n} (line {n + 1}): {len(row)} fields, expected {expected}'
      if bad_input.skip(message):
        continue
      raise ValueError(message)
    yield n, fields(row)


def _parse_findings(
  path: str | os.PathLike, n: int, text: str, known: frozenset[str]
) -> tuple[str, ...]:
  names = tuple(name.strip() for name in text.split('|'))
  if names == (NO_FINDING,):
    return ()
  for name in names:
    if name == NO_FINDING:
      raise ValueError(
        f"{path} row {n}: 'Finding Labels' combines {NO_FINDING!r} with findings: {text!r}"
      )
    if name not in known:
      raise ValueError(f"{path} row {n}: 'Finding Labels' has unknown label {name!r}")
  return names


def _label_columns(labels: Sequence[str], vocabulary: Sequence[str]) -> dict[str, int]:
  """Label name -> its column in `Record.labels`, checking the names against the dataset's vocabulary."""
  unknown = [name for name in labels if name not in vocabulary]
  if unknown:
    raise ValueError(f'labels {unknown} are unknown; expected names from {tuple(vocabulary)}')
  if not labels or len(set(labels)) != len(labels):
    raise ValueError(f'labels={list(labels)} must name each label once, at least one')
  return {name: j for j, name in enumerate(labels)}


def _find_file(root: str, names: Sequence[str], what: str, required: bool = True) -> str | None:
  for name in names:
    path = os.path.join(root, name)
    if os.path.isfile(path):
      return path
  if required:
    raise ValueError(f'{root}: no {what}; expected one of {list(names)}')
  return None


def _read_list(path: str, split: str) -> frozenset[str]:
  if not os.path.isfile(path):
    raise ValueError(f'{path} is missing; split {split!r} needs the official ChestX-ray14 list')
  with open(path, encoding='utf-8') as f:
    return frozenset(line.strip() for line in f if line.strip())


def _warn_list_mismatch(
  root: str,
  entry_path: str,
  rows: Sequence[DataEntryRow],
  list_path: str,
  listed: frozenset[str],
) -> None:
  """Warns (absl) about images the split lists and the label file do not agree on; both leave them out.

  Two mismatches, each counted with the first few names:
    - names in the split's list without a Data_Entry row (no labels, so no record);
    - Data_Entry rows in neither train_val_list.txt nor test_list.txt (in no split but 'all'); checked only when
      both lists exist.
  The official lists and Data_Entry cover exactly the same 112,120 images, as do the lists and labels of a
  subset cut consistently (lists restricted to the subset's images), so on a sound download neither fires. A
  subset that keeps the full official lists beside a cut Data_Entry does get the first warning, for every image
  left out: it is not silenced, since a truncated or wrong Data_Entry looks just the same. Rows skipped as bad
  (`bad_input.collecting()`) count as absent.
  """
  present = frozenset(r.image_index for r in rows)
  unlabelled = sorted(listed - present)
  if unlabelled:
    logging.warning(
      '%s: %d of its %d images have no row in %s%s and are left out, e.g. %s',
      list_path,
      len(unlabelled),
      len(listed),
      entry_path,
      ' (or only a bad row, skipped)' if bad_input.skipping() else '',
      ', '.join(unlabelled[:_NAMES_QUOTED]),
    )
  is_test = os.path.basename(list_path) == TEST_LIST
  other = os.path.join(root, TRAIN_VAL_LIST if is_test else TEST_LIST)
  if not os.path.isfile(other):
    return
  unlisted = [r for r in rows if r.image_index not in listed]
  if unlisted:
    in_other = _read_list(other, 'train_val' if is_test else 'test')
    unlisted = [r for r in unlisted if r.image_index not in in_other]
  if unlisted:
    logging.warning(
      '%s: %d of its %d rows are in neither %s nor %s, so in no split but %r, e.g. %s',
      entry_path,
      len(unlisted),
      len(rows),
      TRAIN_VAL_LIST,
      TEST_LIST,
      'all',
      ', '.join(f'row {r.row} {r.image_index}' for r in unlisted[:_NAMES_QUOTED]),
    )


def _image_paths(
  root: str, rows: Sequence[DataEntryRow], entry_path: str, skip_missing: bool
) -> list[str | None]:
  """Each row's image path (None: missing and skipped), from one scan of the image folders."""
  folders = [os.path.join(root, 'images')] if os.path.isdir(os.path.join(root, 'images')) else []
  with os.scandir(root) as entries:
    numbered = sorted(e.name for e in entries if _IMAGE_SUBFOLDER.fullmatch(e.name) and e.is_dir())
  folders += [
    os.path.join(root, name, 'images')
    for name in numbered
    if os.path.isdir(os.path.join(root, name, 'images'))
  ]
  if not folders:
    prefix = os.path.join(root, 'images', '')
    return [prefix + row.image_index for row in rows]

  found: dict[str, str] = {}
  for folder in folders:
    with os.scandir(folder) as entries:
      for entry in entries:
        if entry.name not in found and entry.is_file():
          found[entry.name] = entry.path
  paths = [found.get(row.image_index) for row in rows]
  missing = [row for row, path in zip(rows, paths, strict=True) if path is None]
  if missing and (skip_missing or bad_input.skipping()):
    for row in missing:
      bad_input.skip(
        f'{entry_path} row {row.row}: image {row.image_index!r} is not in the image folders'
      )
    return paths
  if missing:
    first = missing[0]
    raise ValueError(
      f'{entry_path} row {first.row}: image {first.image_index!r} is not in {folders} '
      f'({len(missing)} of {len(rows)} images of the split are missing; '
      'skip_missing_images=True skips them)'
    )
  return paths
