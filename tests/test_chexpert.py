"""CheXpert reader on the real label files and sample images beside the checkout (../shared/data).

The full train.csv is parsed once per policy per module. Expected values were read off the file by hand (rows
quoted in the tests) or counted over its raw strings: 3,127,796 label fields = 2,277,974 blank + 515,589 '1.0' +
194,275 '0.0' + 139,958 '-1.0', of which 33,739 are uncertain Atelectasis and 12,984 uncertain Edema.
"""

import gzip
import math
import os
import pathlib

import numpy as np
import pytest

from ms_cxr.data import bad_input, chexpert, nih
from ms_cxr.data.labels import CHEXPERT_COMPETITION_LABELS, CHEXPERT_LABELS
from ms_cxr.data.records import label_matrix

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data'
TRAIN_GZ = SHARED_DATA / 'labels' / 'chexpert_train.csv.gz'
SAMPLE_ROOT = SHARED_DATA / 'chexpert'
SAMPLE_DIR = SAMPLE_ROOT / 'CheXpert-v1.0-small'

pytestmark = pytest.mark.skipif(
  not SHARED_DATA.is_dir(),
  reason=f'real test data not found at {SHARED_DATA} (it lives beside the checkout)',
)

NAN = math.nan
# Data row 2: CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg,Female,87,Frontal,AP,
#   ,,-1.0,1.0,,-1.0,-1.0,,-1.0,,-1.0,,1.0,
ROW_2 = ['', '', '-1.0', '1.0', '', '-1.0', '-1.0', '', '-1.0', '', '-1.0', '', '1.0', '']
# Data row 180027: CheXpert-v1.0-small/train/patient42324/study1/view1_frontal.jpg,Male,68,Frontal,AP,
#   ,,,1.0,,,-1.0,,-1.0,0.0,1.0,,,1.0
ROW_180027 = ['', '', '', '1.0', '', '', '-1.0', '', '-1.0', '0.0', '1.0', '', '', '1.0']
# What '-1.0' becomes per label (CHEXPERT_LABELS order) under the fixed policies.
UNCERTAIN_AS = {
  'ignore': [NAN] * 14,
  'zeros': [0.0] * 14,
  'ones': [1.0] * 14,
  'mixed': [float(name in ('Atelectasis', 'Edema')) for name in CHEXPERT_LABELS],
}
TOTAL_FIELDS, BLANK, ONES, ZEROS, UNCERTAIN = 3_127_796, 2_277_974, 515_589, 194_275, 139_958
UNCERTAIN_ATELECTASIS_EDEMA = 33_739 + 12_984


@pytest.fixture(scope='module')
def train():
  """policy -> records of the full train.csv; 'ignore' with blank=NaN, the others with the default blank=0."""
  parsed = {}

  def get(policy):
    if policy not in parsed:
      blank = NAN if policy == 'ignore' else 0.0
      parsed[policy] = chexpert.read_csv(TRAIN_GZ, uncertainty=policy, blank=blank)
    return parsed[policy]

  return get


def _expected(raw: list[str], policy: str) -> list[float]:
  blank = NAN if policy == 'ignore' else 0.0
  uncertain = UNCERTAIN_AS[policy]
  table = {'': blank, '1.0': 1.0, '0.0': 0.0}
  return [uncertain[j] if v == '-1.0' else table[v] for j, v in enumerate(raw)]


def _assert_same(actual: np.ndarray, expected: list[float]):
  np.testing.assert_array_equal(actual, np.asarray(expected, np.float32))


@pytest.mark.parametrize('policy', ['ignore', 'zeros', 'ones', 'mixed'])
def test_full_train_file_fixed_policies(train, policy):
  records = train(policy)
  assert len(records) == 223_414
  _assert_same(records[1].labels, _expected(ROW_2, policy))
  _assert_same(records[180_026].labels, _expected(ROW_180027, policy))
  matrix = label_matrix(records, len(CHEXPERT_LABELS))
  counts = {
    'ignore': (BLANK + UNCERTAIN, ONES, ZEROS),
    'zeros': (0, ONES, BLANK + ZEROS + UNCERTAIN),
    'ones': (0, ONES + UNCERTAIN, BLANK + ZEROS),
    'mixed': (
      0,
      ONES + UNCERTAIN_ATELECTASIS_EDEMA,
      BLANK + ZEROS + UNCERTAIN - UNCERTAIN_ATELECTASIS_EDEMA,
    ),
  }[policy]
  assert (int(np.isnan(matrix).sum()), int((matrix == 1).sum()), int((matrix == 0).sum())) == counts
  assert matrix.size == TOTAL_FIELDS


def test_mixed_policy_by_hand(train):
  # Row 2 is uncertain for Cardiomegaly, Edema, Consolidation, Atelectasis and Pleural Effusion.
  values = dict(zip(CHEXPERT_LABELS, train('mixed')[1].labels.tolist(), strict=True))
  assert [values[name] for name in CHEXPERT_COMPETITION_LABELS] == [1.0, 0.0, 0.0, 1.0, 0.0]
  assert values['Lung Opacity'] == 1.0 and values['Fracture'] == 1.0 and values['No Finding'] == 0.0


def test_full_train_file_smooth(train, tmp_path):
  records = train('smooth')
  matrix = label_matrix(records, len(CHEXPERT_LABELS))
  smoothed = (matrix > 0) & (matrix < 1)
  assert int(smoothed.sum()) == UNCERTAIN
  assert matrix[smoothed].min() >= 0.55 and matrix[smoothed].max() < 0.85
  assert abs(float(matrix[smoothed].mean()) - 0.70) < 0.01
  assert (int((matrix == 1).sum()), int((matrix == 0).sum())) == (ONES, BLANK + ZEROS)
  row = records[1].labels
  uncertain = [j for j, v in enumerate(ROW_2) if v == '-1.0']
  assert all(0.55 <= row[j] < 0.85 for j in uncertain)
  assert len({float(row[j]) for j in uncertain}) == len(uncertain)  # one draw per label

  # The value depends on the row's path and the label only: the same from a one-row file and for a subset.
  with gzip.open(TRAIN_GZ, 'rt', newline='') as f:
    header, _, line_2 = next(f), next(f), next(f)
  (tmp_path / 'one.csv').write_text(header + line_2)
  alone = chexpert.read_csv(tmp_path / 'one.csv', uncertainty='smooth')
  _assert_same(alone[0].labels, row.tolist())
  subset = chexpert.read_csv(
    tmp_path / 'one.csv', uncertainty='smooth', labels=('Edema', 'Cardiomegaly')
  )
  _assert_same(
    subset[0].labels,
    [row[CHEXPERT_LABELS.index('Edema')], row[CHEXPERT_LABELS.index('Cardiomegaly')]],
  )
  pinned = chexpert.read_csv(tmp_path / 'one.csv', uncertainty='smooth', smoothing_range=(0.7, 0.7))
  assert all(pinned[0].labels[j] == np.float32(0.7) for j in uncertain)


def test_smooth_draw_is_the_same_in_the_small_and_the_full_download(tmp_path):
  # The same image (train.csv row 2) under each download's Path prefix: one id, so one draw per label.
  with gzip.open(TRAIN_GZ, 'rt', newline='') as f:
    header, _, line_2 = next(f), next(f), next(f)
  assert line_2.startswith('CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg,')
  records = []
  for folder in chexpert.DATASET_FOLDERS:
    path = tmp_path / folder / 'train.csv'
    path.parent.mkdir()
    path.write_text(header + line_2.replace('CheXpert-v1.0-small/', f'{folder}/', 1))
    records += chexpert.read_records(tmp_path / folder, split='train_val', uncertainty='smooth')
  small, full = records
  assert small.id == full.id == 'train/patient00002/study2/view1_frontal.jpg'
  uncertain = [j for j, v in enumerate(ROW_2) if v == '-1.0']
  assert all(0.55 <= small.labels[j] < 0.85 for j in uncertain)
  _assert_same(full.labels, small.labels.tolist())


def test_full_train_file_ids_and_views(train):
  records = train('ones')
  first, lateral, left_lateral = records[0], records[3], records[32_625]
  assert first.id == 'train/patient00001/study1/view1_frontal.jpg'
  assert (first.patient_id, first.study_id, first.view) == (
    'patient00001',
    'patient00001/study1',
    'AP',
  )
  assert lateral.id == 'train/patient00002/study1/view2_lateral.jpg' and lateral.view == 'LATERAL'
  # Row 32626 is a frontal image marked 'LL' in AP/PA: neither AP nor PA, so the view is unknown.
  assert (
    left_lateral.id == 'train/patient07958/study5/view2_frontal.jpg' and left_lateral.view == ''
  )
  views = [r.view for r in records]
  assert (views.count('AP'), views.count('PA'), views.count('LATERAL'), views.count('')) == (
    161_590,
    29_420,
    32_387,
    17,
  )
  assert len({r.patient_id for r in records}) == 64_540


def test_valid_sample_with_images():
  records = chexpert.read_records(SAMPLE_ROOT, split='valid', views=('frontal', 'lateral'))
  assert len(records) == 118
  assert all(os.path.isfile(r.image) for r in records)
  assert all(pathlib.Path(r.image) == SAMPLE_DIR / r.id for r in records)
  first = records[0]
  # valid.csv row 1: CheXpert-v1.0-small/valid/patient64542/study1/view1_frontal.jpg,Male,70,Frontal,PA,
  #   0.0 x 13, 1.0 (Support Devices)
  assert first.id == 'valid/patient64542/study1/view1_frontal.jpg' and first.view == 'PA'
  assert first.labels.tolist() == [float(name == 'Support Devices') for name in CHEXPERT_LABELS]
  frontal = chexpert.read_records(SAMPLE_ROOT, split='valid')
  assert len(frontal) == 100 and {r.view for r in frontal} == {'AP', 'PA'}
  lateral = chexpert.read_records(SAMPLE_ROOT, split='valid', views=('lateral',))
  assert len(lateral) == 18 and {r.view for r in lateral} == {'LATERAL'}


def test_root_forms_and_test_fallback():
  by_folder = chexpert.read_records(SAMPLE_DIR, split='valid')
  fallback = chexpert.read_records(SAMPLE_ROOT, split='test')
  assert [r.image for r in by_folder] == [r.image for r in fallback]
  assert len(by_folder) == 100
  subset = chexpert.read_records(SAMPLE_ROOT, split='valid', labels=CHEXPERT_COMPETITION_LABELS)
  assert subset[0].labels.shape == (5,)


def test_missing_csv_and_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match=r'CheXpert-v1\.0-small/train\.csv is missing'):
    chexpert.read_records(SAMPLE_ROOT, split='train')
  with pytest.raises(
    ValueError,
    match=r"uncertainty='u-ones' is unknown.*'ignore', 'zeros', 'ones', 'mixed', 'smooth'",
  ):
    chexpert.read_records(SAMPLE_ROOT, split='valid', uncertainty='u-ones')
  with pytest.raises(ValueError, match='split .validation. is unknown'):
    chexpert.read_records(SAMPLE_ROOT, split='validation')
  with pytest.raises(ValueError, match='views='):
    chexpert.read_records(SAMPLE_ROOT, split='valid', views=('PA',))
  with pytest.raises(ValueError, match=r"\['Effusion'\] are unknown"):
    chexpert.read_records(SAMPLE_ROOT, split='valid', labels=('Effusion',))
  with pytest.raises(ValueError, match='neither CheXpert-v1.0 nor CheXpert-v1.0-small'):
    chexpert.read_records(tmp_path, split='valid')


@pytest.mark.parametrize('bad', ['2', 'x'])
def test_bad_value_names_file_row_and_column(tmp_path, bad):
  lines = (SAMPLE_DIR / 'valid.csv').read_text().splitlines()[:4]
  fields = lines[3].split(',')
  fields[5 + CHEXPERT_LABELS.index('Edema')] = bad
  lines[3] = ','.join(fields)
  path = tmp_path / 'valid.csv'
  path.write_text('\n'.join(lines) + '\n')
  with pytest.raises(
    ValueError, match=rf"valid\.csv row 3 \(line 4\), column 'Edema': '{bad}' is not"
  ):
    chexpert.read_csv(path)


def test_missing_images_error_or_skip(tmp_path):
  dataset = tmp_path / 'CheXpert-v1.0-small'
  (dataset / 'valid').mkdir(parents=True)
  (dataset / 'valid.csv').symlink_to(SAMPLE_DIR / 'valid.csv')
  patients = sorted(p.name for p in (SAMPLE_DIR / 'valid').iterdir())
  for name in patients[:60]:
    (dataset / 'valid' / name).symlink_to(SAMPLE_DIR / 'valid' / name)
  everything = chexpert.read_records(SAMPLE_ROOT, split='valid', views=('frontal', 'lateral'))
  present = [r for r in everything if r.patient_id in patients[:60]]
  with pytest.raises(ValueError, match=rf'{len(everything) - len(present)} of 118 images'):
    chexpert.read_records(tmp_path, split='valid', views=('frontal', 'lateral'))
  kept = chexpert.read_records(
    tmp_path, split='valid', views=('frontal', 'lateral'), skip_missing_images=True
  )
  assert [r.id for r in kept] == [r.id for r in present]
  # Without the valid/ image folder the labels still read (no existence check).
  (dataset / 'valid').rename(tmp_path / 'elsewhere')
  assert len(chexpert.read_records(tmp_path, split='valid', views=('frontal', 'lateral'))) == 118


def test_train_val_carve_by_patient(tmp_path):
  # The first 30,000 rows of the real train.csv, gzipped, in the official layout.
  dataset = tmp_path / 'CheXpert-v1.0-small'
  dataset.mkdir()
  with (
    gzip.open(TRAIN_GZ, 'rt', newline='') as src,
    gzip.open(dataset / 'train.csv.gz', 'wt') as dst,
  ):
    dst.writelines(next(src) for _ in range(30_001))
  kwargs = dict(views=('frontal', 'lateral'), val_fraction=0.2)
  train = chexpert.read_records(tmp_path, split='train', **kwargs)
  val = chexpert.read_records(tmp_path, split='val', **kwargs)
  whole = chexpert.read_records(tmp_path, split='train_val', **kwargs)
  train_patients, val_patients = {r.patient_id for r in train}, {r.patient_id for r in val}
  assert not train_patients & val_patients
  assert len(train) + len(val) == len(whole) == 30_000
  assert len(val_patients) == round(0.2 * len(train_patients | val_patients))
  assert val_patients == nih.carve_val_patients([r.patient_id for r in whole], 0.2, seed=0)
  other = chexpert.read_records(tmp_path, split='val', seed=1, **kwargs)
  assert {r.patient_id for r in other} != val_patients
  again = chexpert.read_records(tmp_path, split='val', **kwargs)
  assert [r.id for r in again] == [r.id for r in val]


def test_the_carve_keeps_each_patient_on_one_side_under_any_view_selection(tmp_path):
  """Validation patients are chosen among all of train.csv's, so a model trained on frontal images is never
  validated on its own training patients' lateral images, and a skipped bad row moves no patient."""
  dataset = tmp_path / 'CheXpert-v1.0-small'
  dataset.mkdir()
  with gzip.open(TRAIN_GZ, 'rt', newline='') as src:
    header, template = next(src), next(src).split(',')
  # 40 patients with a frontal and a lateral image, 40 with a lateral image only.
  lines = [header]
  for p in range(80):
    kinds = ['Frontal', 'Lateral'] if p < 40 else ['Lateral']
    for v, kind in enumerate(kinds, 1):
      fields = list(template)
      fields[0] = f'CheXpert-v1.0-small/train/patient{p:05d}/study1/view{v}_{kind.lower()}.jpg'
      fields[3], fields[4] = kind, 'AP' if kind == 'Frontal' else ''
      lines.append(','.join(fields))
  (dataset / 'train.csv').write_text(''.join(lines))
  everyone = {f'patient{p:05d}' for p in range(80)}
  expected_val = nih.carve_val_patients(everyone, 0.25, seed=0)
  sides = {}
  for views in [('frontal',), ('lateral',), ('frontal', 'lateral')]:
    train = chexpert.read_records(tmp_path, split='train', views=views, val_fraction=0.25)
    val = chexpert.read_records(tmp_path, split='val', views=views, val_fraction=0.25)
    sides[views] = ({r.patient_id for r in train}, {r.patient_id for r in val})
    assert sides[views][1] == expected_val & (sides[views][0] | sides[views][1])
  assert not sides[('frontal',)][0] & sides[('lateral',)][1]
  assert len(sides[('frontal', 'lateral')][1]) == 20

  # A row cut short, skipped as bad: no patient changes side.
  lines[7] = ','.join(lines[7].split(',')[:5]) + '\n'
  (dataset / 'train.csv').write_text(''.join(lines))
  with bad_input.collecting() as skipped:
    val = chexpert.read_records(
      tmp_path, split='val', views=('frontal', 'lateral'), val_fraction=0.25
    )
  assert len(skipped) == 1 and 'row 7' in skipped[0]
  assert {r.patient_id for r in val} <= expected_val
