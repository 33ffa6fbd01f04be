"""VinDr-CXR reader: radiologist readings to records, aggregated across readers and optionally mapped to the
CheXpert or ChestX-ray14 label space for external validation.

Two layouts are recognised under `root` (each label file may also be gzipped, `.csv.gz`):

  PhysioNet (VinDr-CXR 1.0.0):
    annotations/image_labels_train.csv, annotations/image_labels_test.csv
    annotations/annotations_train.csv, annotations/annotations_test.csv
    train/<image_id>.dicom, test/<image_id>.dicom
  Kaggle ("VinBigData Chest X-ray Abnormalities Detection"):
    train.csv   image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max
    train/<image_id>.dicom   (the Kaggle test images have no public labels)

`image_labels_*.csv` holds one row per (image, radiologist) and one 0/1 column per label; its header is read, so
the label names are whatever the file has (VINDR_LABELS for the 1.0.0 release). `annotations_*.csv` holds one row
per box, `image_id,rad_id,class_name,x_min,y_min,x_max,y_max`, plus one row without coordinates per radiologist who
found nothing ('No finding'). When `image_labels_*.csv` is absent, labels are derived from the box file: a
radiologist who drew a box of a class is positive for it, one who wrote 'No finding' is negative for everything,
and the image's readers are the radiologists with a row for it. Since only local (boxed) findings appear there,
the global labels (VINDR_GLOBAL_LABELS) are then unknown (NaN) unless the file lists them. The Kaggle file has
the same box schema plus `class_id`, with the 14 local findings kept for the competition (VINDR_FINDINGS); the
8 other local labels and the global labels are NaN there. When `annotations/` exists the PhysioNet layout is
read, else `train.csv`.

Readers: each training image was read independently by 3 of 17 radiologists; the PhysioNet test images carry one
consensus reading of 5 radiologists. `aggregate` turns an image's readings into one label vector: 'any' (positive
if any reader marked it) or 'majority' (positive if more than half of that image's readers did). Either way
'No finding' ends up positive only when no other label is, since it means "none of them" (`aggregate_labels`).
Under 'majority' an image can be negative for every label including 'No finding' (e.g. three readers, three
different findings).

Patients: VinDr-CXR releases no patient ids (de-identification removed them), so each image is its own patient
(and study) here, and the train/val carve is by image id. Should the release hold several images of one patient,
they may fall on both sides of the carve; nothing in the released files allows checking.

Boxes: coordinates are pixels of the original DICOM, while `Box` is in image fractions, so each image's size is
read from its DICOM header (Rows, Columns). Boxes are therefore only attached when the image folder exists; with
label files alone, records have no boxes. Every radiologist's boxes are kept, unfused and under the VinDr class
name whatever the label space, so a finding boxed by one reader of three has boxes even where 'majority' makes
it negative.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np

from ms_cxr.data import bad_input, dicom
from ms_cxr.data.labels import CHEXPERT_LABELS, NIH_LABELS
from ms_cxr.data.nih import carve_val_patients, open_csv
from ms_cxr.data.records import Box, Record

SPLITS = ('train', 'val', 'train_val', 'test')
AGGREGATIONS = ('any', 'majority')
LABEL_SPACES = ('vindr', 'chexpert', 'nih')

NO_FINDING = 'No finding'
# The Kaggle competition's classes in `class_id` order (0..14): the 14 local findings kept there, and 'No finding'.
VINDR_FINDINGS = (
  'Aortic enlargement',
  'Atelectasis',
  'Calcification',
  'Cardiomegaly',
  'Consolidation',
  'ILD',
  'Infiltration',
  'Lung Opacity',
  'Nodule/Mass',
  'Other lesion',
  'Pleural effusion',
  'Pleural thickening',
  'Pneumothorax',
  'Pulmonary fibrosis',
  NO_FINDING,
)
# The 22 local (boxed) labels of the PhysioNet release, in its column order; 8 of them were left out of Kaggle.
VINDR_LOCAL_LABELS = (
  'Aortic enlargement',
  'Atelectasis',
  'Calcification',
  'Cardiomegaly',
  'Clavicle fracture',
  'Consolidation',
  'Edema',
  'Emphysema',
  'Enlarged PA',
  'ILD',
  'Infiltration',
  'Lung Opacity',
  'Lung cavity',
  'Lung cyst',
  'Mediastinal shift',
  'Nodule/Mass',
  'Pleural effusion',
  'Pleural thickening',
  'Pneumothorax',
  'Pulmonary fibrosis',
  'Rib fracture',
  'Other lesion',
)
# The PhysioNet release's global (image-level, unboxed) diagnoses.
VINDR_GLOBAL_LABELS = ('COPD', 'Lung tumor', 'Pneumonia', 'Tuberculosis', 'Other disease')
# Every label of the PhysioNet release (the columns of image_labels_*.csv besides image_id and rad_id).
VINDR_LABELS = VINDR_LOCAL_LABELS + VINDR_GLOBAL_LABELS + (NO_FINDING,)

# VinDr label -> the ChestX-ray14 labels it makes positive. A target label is positive when any of its sources
# is, negative when all of them are negative, and NaN (unknown) when it has no source in the file read:
#   Atelectasis, Cardiomegaly, Consolidation, Edema, Emphysema, Infiltration, Pneumonia, Pneumothorax
#                        same finding, same name.
#   Pleural effusion     -> Effusion: same finding.
#   Pleural thickening   -> Pleural_Thickening: same finding.
#   Pulmonary fibrosis   -> Fibrosis: same finding (parenchymal fibrosis in both).
#   Nodule/Mass          -> Nodule and Mass: VinDr does not separate them (the split is by size, 3 cm), so a
#                        positive is a positive for either; AUROC for NIH 'Nodule' or 'Mass' on VinDr thus measures
#                        "nodule or mass". A negative is negative for both, which is exact.
#   not mapped: Hernia (VinDr has no such label, so it stays NaN); ILD (interstitial lung disease is wider than
#   fibrosis: as a source it would make Fibrosis positive on non-fibrotic ILD); Lung Opacity, Aortic enlargement,
#   Calcification, Other lesion, the fractures, the other global labels and No finding (none of ChestX-ray14's 14
#   outputs corresponds).
# Edema, Emphysema and Pneumonia exist only in the PhysioNet files; on Kaggle they are NaN.
TO_NIH: Mapping[str, tuple[str, ...]] = {
  'Atelectasis': ('Atelectasis',),
  'Cardiomegaly': ('Cardiomegaly',),
  'Consolidation': ('Consolidation',),
  'Edema': ('Edema',),
  'Emphysema': ('Emphysema',),
  'Infiltration': ('Infiltration',),
  'Nodule/Mass': ('Nodule', 'Mass'),
  'Pleural effusion': ('Effusion',),
  'Pleural thickening': ('Pleural_Thickening',),
  'Pneumonia': ('Pneumonia',),
  'Pneumothorax': ('Pneumothorax',),
  'Pulmonary fibrosis': ('Fibrosis',),
}

# VinDr label -> the CheXpert labels it makes positive (same combination rule as TO_NIH). The CheXpert labeler's
# mention phrases (stanfordmlgroup/chexpert-labeler, phrases/mention/) were the guide:
#   Atelectasis, Cardiomegaly, Consolidation, Edema, Pneumonia, Pneumothorax
#                        same finding, same name.
#   Pleural effusion     -> Pleural Effusion: same finding.
#   Lung Opacity         -> Lung Opacity: same name. CheXpert's Lung Opacity is a parent of several findings, but
#                        VinDr readers marked those separately, so only VinDr's own Lung Opacity is a source.
#   Nodule/Mass, Lung tumor, Lung cavity
#                        -> Lung Lesion: the labeler's Lung Lesion phrases are mass, nodule, tumor, carcinoma,
#                        neoplasm and cavitary lesion.
#   Pleural thickening   -> Pleural Other: the labeler's Pleural Other phrases start with "pleural thickening".
#   Rib fracture, Clavicle fracture
#                        -> Fracture: the fractures VinDr annotates; others seen on a chest film (spine, humerus)
#                        are not annotated, so a Fracture negative means "no rib or clavicle fracture".
#   No finding           -> No Finding: both mean none of the dataset's findings.
#   not mapped: Enlarged Cardiomediastinum (VinDr annotates Aortic enlargement and Cardiomegaly, not a widened
#   mediastinum in general, so a negative would not be reliable: NaN), Support Devices (not annotated: NaN),
#   Infiltration, ILD, Pulmonary fibrosis (the labeler files "fibrosis" under Pleural Other, but VinDr's is
#   parenchymal), Lung cyst, Emphysema, Calcification, Aortic enlargement and the other global labels.
# Edema, Pneumonia, Lung tumor, Lung cavity and the fractures exist only in the PhysioNet files; on Kaggle the
# targets fed only by them (Edema, Pneumonia, Fracture) are NaN, and Lung Lesion comes from Nodule/Mass alone.
TO_CHEXPERT: Mapping[str, tuple[str, ...]] = {
  'Atelectasis': ('Atelectasis',),
  'Cardiomegaly': ('Cardiomegaly',),
  'Clavicle fracture': ('Fracture',),
  'Consolidation': ('Consolidation',),
  'Edema': ('Edema',),
  'Lung Opacity': ('Lung Opacity',),
  'Lung cavity': ('Lung Lesion',),
  'Lung tumor': ('Lung Lesion',),
  NO_FINDING: ('No Finding',),
  'Nodule/Mass': ('Lung Lesion',),
  'Pleural effusion': ('Pleural Effusion',),
  'Pleural thickening': ('Pleural Other',),
  'Pneumonia': ('Pneumonia',),
  'Pneumothorax': ('Pneumothorax',),
  'Rib fracture': ('Fracture',),
}

KAGGLE_LABEL_FILES = ('train.csv', 'train.csv.gz')
PHYSIONET_DIR = 'annotations'
IMAGE_SUFFIX = '.dicom'

_IMAGE_ID = 'image_id'
_RAD_ID = 'rad_id'
_CLASS_NAME = 'class_name'
_CLASS_ID = 'class_id'
_COORDINATES = ('x_min', 'y_min', 'x_max', 'y_max')
_LABEL_VALUES = {'0': 0.0, '1': 1.0, '0.0': 0.0, '1.0': 1.0}
# Header spellings of image_labels_*.csv -> the name used here: the PhysioNet 1.0.0 train file spells the last
# global label 'Other diseases' where its test file has 'Other disease'; both read as one label.
_HEADER_ALIASES = {'Other diseases': 'Other disease'}


@dataclasses.dataclass(frozen=True, slots=True)
class Annotation:
  """One row of a box file (`annotations_*.csv` or Kaggle `train.csv`).

  Attributes:
    row: 1-based data row number (the header is line 1).
    image_id: the image, i.e. the DICOM file name without `.dicom`.
    rad_id: the radiologist ('R1' ... 'R17'); '' when the file has no rad_id column (consensus readings).
    class_name: a VinDr label name.
    box: (x_min, y_min, x_max, y_max) in pixels of the original DICOM, or None for a row without coordinates.
  """

  row: int
  image_id: str
  rad_id: str
  class_name: str
  box: tuple[float, float, float, float] | None


@dataclasses.dataclass(frozen=True)
class Readings:
  """Each image's readings of a label file, before aggregation.

  Attributes:
    path: the file they were read from (for error messages).
    names: the label names, one column each.
    images: image id -> that image's readings, float32 [num_readers, len(names)] of 0/1, in file order.
    rows: image id -> the 1-based data row where it first appears.
    from_header: whether `names` come from the file's header (image_labels_*.csv), where a label that is not
      among them is a column the file lacks (or spells differently), rather than from a vocabulary fixed here
      (box files), where it is a label the release does not have.
  """

  path: str
  names: tuple[str, ...]
  images: dict[str, np.ndarray]
  rows: dict[str, int]
  from_header: bool = False


def aggregate_labels(
  readings: np.ndarray, aggregate: str = 'majority', no_finding: int | None = None
) -> np.ndarray:
  """Combines the readings of one image into one label vector.

  Args:
    readings: 0/1 values [num_readers, num_labels], one row per radiologist who read the image.
    aggregate: 'any' (1 where any reader has 1) or 'majority' (1 where more than half of the readers have 1; a
      tie, e.g. 2 of 4, is 0).
    no_finding: the column of 'No finding', if any. It means "none of the other labels", so after aggregation it
      is 1 only where every other label is 0: under 'any', one reader's 'No finding' beside another reader's
      finding would otherwise make it 1 together with that finding (under 'majority' the same can only come
      from readers who marked both, which a label file may hold).

  Returns:
    float32 [num_labels] of 0/1.

  Raises:
    ValueError: unknown `aggregate`, no readings, or `no_finding` outside the columns.
  """
  readings = np.asarray(readings, np.float32)
  if aggregate not in AGGREGATIONS:
    raise ValueError(f'aggregate={aggregate!r} is unknown; expected one of {AGGREGATIONS}')
  if readings.ndim != 2 or readings.shape[0] == 0:
    raise ValueError(f'readings of shape {readings.shape}: expected [num_readers >= 1, num_labels]')
  if no_finding is not None and not 0 <= no_finding < readings.shape[1]:
    raise ValueError(
      f'no_finding={no_finding} is not a column of readings of shape {readings.shape}'
    )
  votes = (readings == 1.0).sum(0)
  if aggregate == 'any':
    out = (votes >= 1).astype(np.float32)
  else:
    out = (2 * votes > readings.shape[0]).astype(np.float32)
  if no_finding is not None and np.delete(out, no_finding).any():
    out[no_finding] = 0.0
  return out


def map_labels(
  matrix: np.ndarray,
  source: Sequence[str],
  target: Sequence[str],
  mapping: Mapping[str, Sequence[str]],
) -> np.ndarray:
  """Maps label columns from VinDr names to another vocabulary.

  Args:
    matrix: float [N, len(source)] of 1 / 0 / NaN.
    source: the VinDr names of `matrix`'s columns.
    target: the output label names.
    mapping: VinDr name -> the target names it makes positive (`TO_CHEXPERT`, `TO_NIH`).

  Returns:
    float32 [N, len(target)]: for each target label, 1 where any of its sources present in `source` is 1, 0 where
    all of them are 0, NaN otherwise, and NaN throughout when none of its sources is in `source`.
  """
  matrix = np.asarray(matrix, np.float32)
  column = {name: j for j, name in enumerate(source)}
  out = np.full((matrix.shape[0], len(target)), np.nan, np.float32)
  for j, name in enumerate(target):
    sources = [column[s] for s, targets in mapping.items() if name in targets and s in column]
    if sources:
      values = matrix[:, sources]
      known = ~np.isnan(values).any(axis=1)
      out[:, j] = np.where((values == 1.0).any(axis=1), 1.0, np.where(known, 0.0, np.nan))
  return out


def detect_layout(root: str | os.PathLike) -> str:
  """'physionet' when `root/annotations/` exists, else 'kaggle' when `root/train.csv[.gz]` does.

  Raises:
    ValueError: neither found; the message names what was looked for.
  """
  if os.path.isdir(os.path.join(root, PHYSIONET_DIR)):
    return 'physionet'
  if _find(root, KAGGLE_LABEL_FILES):
    return 'kaggle'
  raise ValueError(
    f'{root} is not a VinDr-CXR folder: found neither {PHYSIONET_DIR}/ (PhysioNet: '
    f'{PHYSIONET_DIR}/image_labels_train.csv or {PHYSIONET_DIR}/annotations_train.csv) nor '
    f'{" / ".join(KAGGLE_LABEL_FILES)} (Kaggle VinBigData)'
  )


def read_annotations(
  path: str | os.PathLike, known: Sequence[str] = VINDR_LABELS
) -> list[Annotation]:
  """Parses a box file: PhysioNet `annotations_*.csv` or Kaggle `train.csv` (told apart by `class_id`).

  Args:
    path: the file (.csv or .csv.gz).
    known: the accepted class names. With a `class_id` column (Kaggle) the names must be VINDR_FINDINGS and
      each id must be the name's position there.

  Returns:
    The rows in file order.

  Raises:
    ValueError: naming the file and 1-based data row for a missing column, a wrong field count, an unknown class
      name, a class_id that does not match the name, or bad coordinates (partly blank, not a finite number,
      negative, x_min >= x_max or y_min >= y_max, or a box on a 'No finding' row).
  """
  with open_csv(path) as f:
    rows, header = _rows(path, f)
    image_col, class_col = (_column(path, header, c) for c in (_IMAGE_ID, _CLASS_NAME))
    rad_col = _column(path, header, _RAD_ID, required=False)
    coordinate_cols = [_column(path, header, c) for c in _COORDINATES]
    class_id_col = _column(path, header, _CLASS_ID, required=False)
    if class_id_col is not None:
      known = VINDR_FINDINGS
    known = frozenset(known)
    out = []
    for n, row in rows:
      with bad_input.ROW:  # data.skip_bad: a bad row is skipped and counted
        name = row[class_col].strip()
        if name not in known:
          raise ValueError(
            f'{path} row {n}: class_name {name!r} is unknown; expected one of {sorted(known)}'
          )
        if class_id_col is not None and row[class_id_col].strip() != str(
          VINDR_FINDINGS.index(name)
        ):
          raise ValueError(
            f'{path} row {n}: class_id {row[class_id_col]!r} does not match class_name {name!r} '
            f'(expected {VINDR_FINDINGS.index(name)})'
          )
        box = _parse_box(path, n, name, [row[c] for c in coordinate_cols])
        rad = row[rad_col].strip() if rad_col is not None else ''
        out.append(Annotation(n, row[image_col].strip(), rad, name, box))
  return out


def read_image_labels(path: str | os.PathLike) -> Readings:
  """Parses a PhysioNet `image_labels_*.csv`: one row per (image, radiologist), one 0/1 column per label.

  Args:
    path: the file (.csv or .csv.gz). Every column besides `image_id` and `rad_id` (any case; absent in a
      consensus file) is a label, named as in the header ('Other diseases', the train file's spelling, is read
      as 'Other disease'). `read_records` checks the names it needs against the header.

  Returns:
    The readings, with the header's label names (`from_header` set).

  Raises:
    ValueError: naming the file (and 1-based data row) for a missing image_id column, no label column, a repeated
      label name, a wrong field count, a value other than 0 / 1, or an (image, radiologist) pair listed twice.
  """
  with open_csv(path) as f:
    rows, header = _rows(path, f)
    image_col = _column(path, header, _IMAGE_ID)
    rad_col = _column(path, header, _RAD_ID, required=False)
    label_cols = [j for j in range(len(header)) if j not in (image_col, rad_col)]
    names = tuple(_HEADER_ALIASES.get(header[j], header[j]) for j in label_cols)
    if not names or len(set(names)) != len(names):
      raise ValueError(f'{path}: header {header} must name each label column once, at least one')
    images: dict[str, list[np.ndarray]] = {}
    first: dict[str, int] = {}
    seen: dict[tuple[str, str], int] = {}
    for n, row in rows:
      with bad_input.ROW:  # data.skip_bad: a bad row is skipped and counted
        image = row[image_col].strip()
        rad = row[rad_col].strip() if rad_col is not None else ''
        if (image, rad) in seen:
          raise ValueError(
            f'{path} row {n}: image {image!r} reader {rad!r} is listed again (first on row '
            f'{seen[image, rad]})'
          )
        values = []
        for j, name in zip(label_cols, names, strict=True):
          value = _LABEL_VALUES.get(row[j].strip())
          if value is None:
            raise ValueError(f'{path} row {n}, column {name!r}: {row[j]!r} is not 0 or 1')
          values.append(value)
        seen[image, rad] = n
        first.setdefault(image, n)
        images.setdefault(image, []).append(np.asarray(values, np.float32))
  return Readings(
    str(path), names, {k: np.stack(v) for k, v in images.items()}, first, from_header=True
  )


def readings_from_annotations(
  path: str | os.PathLike, annotations: Sequence[Annotation], names: Sequence[str]
) -> Readings:
  """Derives per-reader labels from box rows: a class boxed (or listed) by a reader is 1 for that reader.

  Args:
    path: the box file (for error messages).
    annotations: its rows (`read_annotations`).
    names: the label columns; every class name in `annotations` must be one of them.

  Returns:
    The readings: each image's readers are the radiologists with a row for it; a 'No finding' row gives that
    reader 1 for 'No finding' and 0 for everything else.

  Raises:
    ValueError: naming the file and row where a reader marks 'No finding' and a finding on the same image.
  """
  column = {name: j for j, name in enumerate(names)}
  no_finding = column.get(NO_FINDING)
  marked: dict[str, dict[str, set[int]]] = {}
  first: dict[str, int] = {}
  for a in annotations:
    by_reader = marked.get(a.image_id)
    if by_reader is None:
      by_reader = marked[a.image_id] = {}
      first[a.image_id] = a.row
    by_reader.setdefault(a.rad_id, set()).add(column[a.class_name])
  images = {}
  for image, by_reader in marked.items():
    matrix = np.zeros((len(by_reader), len(names)), np.float32)
    for i, (rad, columns) in enumerate(by_reader.items()):
      if no_finding in columns and len(columns) > 1:
        _raise_contradiction(path, annotations, image, rad)
      matrix[i, list(columns)] = 1.0
    images[image] = matrix
  return Readings(str(path), tuple(names), images, first)


def read_records(
  root: str | os.PathLike,
  *,
  split: str,
  val_fraction: float = 0.1,
  seed: int = 0,
  labels: Sequence[str] | None = None,
  label_space: str = 'vindr',
  aggregate: str = 'majority',
  skip_missing_images: bool = False,
) -> list[Record]:
  """Reads one split of VinDr-CXR as records.

  Args:
    root: the dataset folder, PhysioNet or Kaggle layout (module docstring).
    split: 'train' / 'val' (the training images carved by image id: `val_fraction` of them go to 'val', chosen
      by `seed` with `nih.carve_val_patients`, each image being its own patient), 'train_val' (all training
      images) or 'test' (PhysioNet's consensus-labelled test set; Kaggle's test set has no labels).
    val_fraction: fraction of the training images in 'val'.
    seed: selects the train/val carve.
    labels: the label order of `Record.labels`. Default: the file's VinDr labels ('vindr': the image_labels
      header, or VINDR_FINDINGS for Kaggle, or VINDR_LOCAL_LABELS + 'No finding' when derived from PhysioNet
      boxes), CHEXPERT_LABELS ('chexpert') or NIH_LABELS ('nih'). Names must come from that space. A VinDr
      label that a box file cannot have (Kaggle's 8 dropped local labels, the global labels) is NaN; one missing
      from an image_labels header is an error, since there it is a column left out or spelt otherwise.
    label_space: 'vindr', 'chexpert' or 'nih' (VinDr labels mapped with TO_CHEXPERT / TO_NIH; target labels
      without a source in a box file are NaN, never 0; with an image_labels file every source of a requested
      target must be a column, so that no target quietly loses part of its definition).
    aggregate: how an image's readers combine, 'any' or 'majority' (`aggregate_labels`).
    skip_missing_images: drop records whose image is missing instead of raising. Existence is checked only when
      the split's image folder (`train/` or `test/`) exists; without it, records point at
      `root/<train|test>/<image_id>.dicom` unchecked and have no boxes.

  Returns:
    Records in label-file order: id = patient_id = study_id = image_id, image = absolute path, view = ''
    (not recorded in the label files), labels float32, and boxes from the box file in image fractions when the
    image exists.

  Raises:
    ValueError: unknown split, label space, aggregation or label, val_fraction outside [0, 1), no VinDr layout,
      'test' on Kaggle, missing label files, an image_labels header without a label asked for (or a source of
      one), a malformed file (see `read_annotations`, `read_image_labels`), or missing images (unless
      `skip_missing_images`); and, unless bad rows are skipped (`bad_input.collecting()`), a box outside its
      image or a DICOM whose header cannot be read (the error names the box file's row and the DICOM).
  """
  root = os.path.abspath(root)
  if split not in SPLITS:
    raise ValueError(f'split {split!r} is unknown; expected one of {SPLITS}')
  if label_space not in LABEL_SPACES:
    raise ValueError(f'label_space={label_space!r} is unknown; expected one of {LABEL_SPACES}')
  if aggregate not in AGGREGATIONS:
    raise ValueError(f'aggregate={aggregate!r} is unknown; expected one of {AGGREGATIONS}')
  folder = 'test' if split == 'test' else 'train'
  readings, annotations, box_path = _read_split_files(root, folder)

  image_ids = list(readings.images)
  if split in ('train', 'val'):
    val_ids = carve_val_patients(image_ids, val_fraction, seed)
    image_ids = [i for i in image_ids if (i in val_ids) == (split == 'val')]
  source = np.zeros((len(image_ids), len(readings.names)), np.float32)
  no_finding = readings.names.index(NO_FINDING) if NO_FINDING in readings.names else None
  for k, image_id in enumerate(image_ids):
    source[k] = aggregate_labels(readings.images[image_id], aggregate, no_finding)
  matrix = _labels_in_space(source, readings, labels, label_space)

  image_paths = _image_paths(root, folder, image_ids, readings, skip_missing_images)
  boxes = _boxes_by_image(annotations)
  records = []
  for image_id, label_row, image in zip(image_ids, matrix, image_paths, strict=True):
    if image is None:
      continue
    image_boxes = ()
    if image_id in boxes and os.path.isfile(image):
      image_boxes = _boxes_in_space(_to_fractions(box_path, boxes[image_id], image), label_space)
    records.append(
      Record(
        id=image_id,
        image=image,
        labels=label_row,
        patient_id=image_id,
        study_id=image_id,
        boxes=image_boxes,
      )
    )
  return records


def _read_split_files(root: str, folder: str) -> tuple[Readings, list[Annotation], str | None]:
  """The split's readings, box rows and box file path, from whichever layout `root` has."""
  if detect_layout(root) == 'kaggle':
    if folder == 'test':
      raise ValueError(
        f'{root} is the Kaggle VinBigData layout, whose test images have no public labels; split '
        "'test' needs the PhysioNet release (annotations/image_labels_test.csv)"
      )
    box_path = _find(root, KAGGLE_LABEL_FILES)
    annotations = read_annotations(box_path, VINDR_FINDINGS)
    return readings_from_annotations(box_path, annotations, VINDR_FINDINGS), annotations, box_path

  directory = os.path.join(root, PHYSIONET_DIR)
  label_names = (f'image_labels_{folder}.csv', f'image_labels_{folder}.csv.gz')
  box_names = (f'annotations_{folder}.csv', f'annotations_{folder}.csv.gz')
  label_path, box_path = _find(directory, label_names), _find(directory, box_names)
  if label_path is None and box_path is None:
    raise ValueError(
      f'{directory}: no label file for the {folder} images; expected {label_names[0]} or {box_names[0]} '
      '(or gzipped)'
    )
  annotations = read_annotations(box_path) if box_path else []
  if label_path:
    return read_image_labels(label_path), annotations, box_path
  seen = {a.class_name for a in annotations}
  # Global labels are only known when the box file lists them (module docstring).
  names = VINDR_LOCAL_LABELS + tuple(n for n in VINDR_GLOBAL_LABELS if n in seen) + (NO_FINDING,)
  return readings_from_annotations(box_path, annotations, names), annotations, box_path


def _labels_in_space(
  source: np.ndarray, readings: Readings, labels: Sequence[str] | None, label_space: str
) -> np.ndarray:
  """The aggregated VinDr label matrix in the requested label space and order."""
  names = readings.names
  if label_space == 'vindr':
    vocabulary = tuple(dict.fromkeys((*names, *VINDR_LABELS, *VINDR_FINDINGS)))
    labels = tuple(names) if labels is None else tuple(labels)
    _check_labels(labels, vocabulary)
    mapping = {name: (name,) for name in labels}
  else:
    vocabulary = CHEXPERT_LABELS if label_space == 'chexpert' else NIH_LABELS
    labels = vocabulary if labels is None else tuple(labels)
    _check_labels(labels, vocabulary)
    mapping = TO_CHEXPERT if label_space == 'chexpert' else TO_NIH
  if readings.from_header:
    _check_columns(readings, labels, label_space, mapping)
  return map_labels(source, names, labels, mapping)


def _check_labels(labels: Sequence[str], vocabulary: Sequence[str]) -> None:
  unknown = [name for name in labels if name not in vocabulary]
  if unknown:
    raise ValueError(f'labels {unknown} are unknown; expected names from {tuple(vocabulary)}')
  if not labels or len(set(labels)) != len(labels):
    raise ValueError(f'labels={list(labels)} must name each label once, at least one')


def _check_columns(
  readings: Readings,
  labels: Sequence[str],
  label_space: str,
  mapping: Mapping[str, Sequence[str]],
) -> None:
  """Raises when a label asked for, or a VinDr source of a mapped one, is not a column of an image_labels file.

  Its header names the labels, so a column spelt otherwise than VINDR_LABELS ('Pleural Effusion') would read as
  a label the file lacks: NaN throughout, or for a target with several sources (CheXpert's Lung Lesion) a
  narrower definition made of the sources that are left. Columns the file has but nobody asks for are fine.
  """
  present = frozenset(readings.names)
  wanted = frozenset(labels)
  missing = {
    source: [t for t in targets if t in wanted]
    for source, targets in mapping.items()
    if source not in present and any(t in wanted for t in targets)
  }
  if not missing:
    return
  if label_space == 'vindr':
    what = f'label(s) {list(missing)} asked for'
  else:
    needs = ', '.join(f'{s!r} (for {", ".join(map(repr, t))})' for s, t in missing.items())
    what = f'the VinDr source(s) of {label_space} labels asked for: {needs}'
  unknown = [name for name in readings.names if name not in VINDR_LABELS]
  found = f'; its columns {unknown} are not VinDr labels' if unknown else ''
  raise ValueError(
    f'{readings.path}: header has no column for {what}{found}; expected label names from {VINDR_LABELS}'
  )


def _image_paths(
  root: str, folder: str, image_ids: Sequence[str], readings: Readings, skip_missing: bool
) -> list[str | None]:
  """Each image's path (None: missing and skipped), from one scan of the split's image folder."""
  directory = os.path.join(root, folder)
  paths = [os.path.join(directory, i + IMAGE_SUFFIX) for i in image_ids]
  if not os.path.isdir(directory):
    return paths
  with os.scandir(directory) as entries:
    present = {e.name for e in entries if e.name.endswith(IMAGE_SUFFIX) and e.is_file()}
  missing = [i for i in image_ids if i + IMAGE_SUFFIX not in present]
  for i in missing if bad_input.skipping() else ():
    bad_input.skip(
      f'{readings.path} row {readings.rows[i]}: image {i + IMAGE_SUFFIX!r} is not in {directory}'
    )
  if missing and not skip_missing and not bad_input.skipping():
    raise ValueError(
      f'{readings.path} row {readings.rows[missing[0]]}: image {missing[0] + IMAGE_SUFFIX!r} is not in '
      f'{directory} ({len(missing)} of {len(image_ids)} images of the split are missing; '
      'skip_missing_images=True skips them)'
    )
  gone = frozenset(missing)
  return [None if i in gone else p for i, p in zip(image_ids, paths, strict=True)]


def _boxes_by_image(annotations: Sequence[Annotation]) -> dict[str, list[Annotation]]:
  out: dict[str, list[Annotation]] = {}
  for a in annotations:
    if a.box is not None:
      out.setdefault(a.image_id, []).append(a)
  return out


def _to_fractions(
  box_path: str | None, annotations: Sequence[Annotation], image: str
) -> tuple[Box, ...]:
  """Pixel boxes -> image fractions, using the DICOM header's size; clipped to the image.

  Each box is a row of the box file, so bad ones follow the bad row policy (`bad_input`): under `collecting()` a
  box outside the image is dropped with its message recorded, and a DICOM whose header cannot be read (empty,
  truncated, not DICOM, no Rows / Columns) drops all the image's boxes with one message naming the DICOM and the
  rows; outside it both raise. The record itself stays either way: its labels come from rows that did parse,
  and an image that does not decode is the pipeline's to count or skip.
  """
  size = None
  with bad_input.ROW:  # data.skip_bad: an unreadable DICOM header skips the image's box rows
    try:
      size = dicom.read_size(image)
    except ValueError as e:
      rows = ', '.join(str(a.row) for a in annotations)
      raise ValueError(
        f'{box_path} row {annotations[0].row}: cannot place the boxes of image '
        f'{annotations[0].image_id!r} (box rows {rows}): {e}'
      ) from None
  if size is None:
    return ()
  height, width = size
  out = []
  for a in annotations:
    with bad_input.ROW:  # data.skip_bad: a box outside the image is skipped and counted
      x_min, y_min, x_max, y_max = a.box
      x0, y0 = x_min / width, y_min / height
      x1, y1 = min(x_max / width, 1.0), min(y_max / height, 1.0)
      if not (x0 < x1 and y0 < y1):
        raise ValueError(
          f'{box_path} row {a.row}: box {a.box} px lies outside image {a.image_id!r} of '
          f'{width} x {height} px'
        )
      out.append(Box(a.class_name, x0, y0, x1, y1))
  return tuple(out)


def _boxes_in_space(boxes: Sequence[Box], label_space: str) -> tuple[Box, ...]:
  """VinDr boxes under the names of `label_space`, by the labels' mapping: a box of a VinDr finding becomes one
  box per label it makes positive ('Nodule/Mass' -> Nodule and Mass), and a finding no label maps from has none.
  So a mapped label's boxes are scored and drawn like the dataset's own."""
  if label_space == 'vindr':
    return tuple(boxes)
  mapping = TO_CHEXPERT if label_space == 'chexpert' else TO_NIH
  return tuple(
    Box(target, box.x0, box.y0, box.x1, box.y1)
    for box in boxes
    for target in mapping.get(box.label, ())
  )


def _raise_contradiction(
  path: str | os.PathLike, annotations: Sequence[Annotation], image: str, rad: str
) -> None:
  """Raises for a reader who marks both 'No finding' and a finding on one image, naming both rows."""
  rows = [a for a in annotations if a.image_id == image and a.rad_id == rad]
  nothing = next(a.row for a in rows if a.class_name == NO_FINDING)
  something = next(a.row for a in rows if a.class_name != NO_FINDING)
  raise ValueError(
    f'{path} row {max(nothing, something)}: reader {rad!r} marks both {NO_FINDING!r} (row {nothing}) '
    f'and a finding (row {something}) on image {image!r}'
  )


def _parse_box(
  path: str | os.PathLike, n: int, name: str, fields: Sequence[str]
) -> tuple[float, float, float, float] | None:
  if not ''.join(fields).strip():
    return None
  fields = [f.strip() for f in fields]
  if name == NO_FINDING:
    raise ValueError(f'{path} row {n}: a {NO_FINDING!r} row has coordinates {fields}')
  if '' in fields:
    raise ValueError(f'{path} row {n}: bad box coordinates {fields}: partly blank')
  try:
    x_min, y_min, x_max, y_max = (float(v) for v in fields)
  except ValueError as e:
    raise ValueError(f'{path} row {n}: bad box coordinates {fields} ({e})') from None
  # NaN fails every comparison, so this also rejects non-numbers; the upper bounds reject infinities.
  if not (0.0 <= x_min < x_max < math.inf and 0.0 <= y_min < y_max < math.inf):
    raise ValueError(
      f'{path} row {n}: bad box coordinates {fields}: need finite 0 <= x_min < x_max and '
      '0 <= y_min < y_max'
    )
  return x_min, y_min, x_max, y_max


def _rows(
  path: str | os.PathLike, f: Iterable[str]
) -> tuple[Iterator[tuple[int, list[str]]], list[str]]:
  """The header (stripped names) and a checked iterator over (1-based data row, fields)."""
  reader = csv.reader(f)
  header = next(reader, None)
  if header is None:
    raise ValueError(f'{path} is empty; expected a header line')
  header = [name.strip() for name in header]

  def rows() -> Iterator[tuple[int, list[str]]]:
    for n, row in enumerate(reader, 1):
      if len(row) != len(header):
        message = f'{path} row {n} (line {n + 1}): {len(row)} fields, expected {len(header)}'
        if bad_input.skip(message):
          continue
        raise ValueError(message)
      yield n, row

  return rows(), header


def _column(
  path: str | os.PathLike, header: Sequence[str], name: str, required: bool = True
) -> int | None:
  """The index of column `name` (matched case-insensitively: PhysioNet spells it rad_id and rad_ID)."""
  lowered = [h.lower() for h in header]
  if name in lowered:
    return lowered.index(name)
  if required:
    raise ValueError(f'{path}: header has no column {name!r}; found {list(header)}')
  return None


def _find(directory: str | os.PathLike, names: Sequence[str]) -> str | None:
  for name in names:
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return path
  return None
