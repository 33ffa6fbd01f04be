"""VinDr-CXR reader on the real label files beside the checkout (../shared/data) and on small hand-made files.

The real files are symlinked into tmp_path roots (never copied into the repository). There are no VinDr DICOMs
anywhere reachable, so box-to-fraction tests write small DICOM headers with pydicom.
"""

import pathlib

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from ms_cxr import localization
from ms_cxr.data import bad_input, vindr
from ms_cxr.data.labels import CHEXPERT_LABELS, NIH_LABELS
from ms_cxr.data.records import Box, label_matrix
from ms_cxr.data.vindr import NO_FINDING, VINDR_FINDINGS

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data'
KAGGLE_GZ = SHARED_DATA / 'labels' / 'vinbigdata-train.csv.gz'
PHYSIONET_EXCERPT = SHARED_DATA / 'vindr' / 'annotations' / 'annotations_train.excerpt.csv'
EXCERPT_IDS = (
  '000434271f63a053c4128a0ba6352c7f',
  '00053190460d56c53cc3e57321387478',
  '0005e8e3701dfb1dd93d53e2ff537b6e',
  '0006e0a85696f6bb578e84fafa9a5607',
  '0007d316f756b3fa0baea2ff514ce945',
  '000ae00eb3942d27e0b97903dd563a6e',
)
KAGGLE_HEADER = 'image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max'
BOX_HEADER = 'image_id,rad_id,class_name,x_min,y_min,x_max,y_max'

needs_shared = pytest.mark.skipif(
  not KAGGLE_GZ.is_file() or not PHYSIONET_EXCERPT.is_file(),
  reason=f'real VinDr label files not found under {SHARED_DATA} (they live beside the checkout)',
)


def _kaggle_row(image: str, name: str, rad: str, box=None) -> str:
  coordinates = ','.join(str(v) for v in box) if box else ',,,'
  return f'{image},{name},{VINDR_FINDINGS.index(name)},{rad},{coordinates}'


def _kaggle_root(root: pathlib.Path, rows: list[str]) -> pathlib.Path:
  root.mkdir(parents=True, exist_ok=True)
  (root / 'train.csv').write_text('\n'.join([KAGGLE_HEADER, *rows]) + '\n')
  return root


def _physionet_root(root: pathlib.Path, **files: str) -> pathlib.Path:
  """A PhysioNet layout with the given annotations/ files (name -> CSV text)."""
  (root / 'annotations').mkdir(parents=True, exist_ok=True)
  for name, text in files.items():
    (root / 'annotations' / f'{name}.csv').write_text(text)
  return root


def _write_dicom_header(path: pathlib.Path, rows: int, columns: int) -> None:
  """A minimal 8-bit DICOM of the given size (the reader only needs Rows / Columns)."""
  meta = FileMetaDataset()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
  meta.MediaStorageSOPInstanceUID = generate_uid()
  ds = Dataset()
  ds.file_meta = meta
  ds.Rows, ds.Columns = rows, columns
  ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, 'MONOCHROME2'
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
  ds.PixelData = bytes(rows * columns)
  ds.save_as(path, enforce_file_format=True)


def _by_id(records):
  return {r.id: r for r in records}


def _positives(record, names=VINDR_FINDINGS) -> list[str]:
  return [name for name, value in zip(names, record.labels, strict=True) if value == 1.0]


@pytest.fixture(scope='module')
def kaggle_root(tmp_path_factory):
  root = tmp_path_factory.mktemp('vinbigdata')
  (root / 'train.csv.gz').symlink_to(KAGGLE_GZ)
  return root


@pytest.fixture(scope='module')
def kaggle_full(kaggle_root):
  """All 15,000 training images of the Kaggle file under both aggregations."""
  if not KAGGLE_GZ.is_file():
    pytest.skip(f'{KAGGLE_GZ} not found')
  return {
    aggregate: vindr.read_records(kaggle_root, split='train_val', aggregate=aggregate)
    for aggregate in vindr.AGGREGATIONS
  }


@pytest.fixture(scope='module')
def physionet_root(tmp_path_factory):
  root = tmp_path_factory.mktemp('vindr_physionet')
  (root / 'annotations').mkdir()
  (root / 'annotations' / 'annotations_train.csv').symlink_to(PHYSIONET_EXCERPT)
  return root


@needs_shared
def test_kaggle_file_aggregates_to_one_record_per_image(kaggle_root, kaggle_full):
  for aggregate, records in kaggle_full.items():
    assert len(records) == 15_000, aggregate
    assert len({r.id for r in records}) == 15_000
    matrix = label_matrix(records, len(VINDR_FINDINGS))
    assert matrix.dtype == np.float32 and not np.isnan(matrix).any()
    assert set(np.unique(matrix)) == {0.0, 1.0}
  record = kaggle_full['majority'][0]
  assert record.patient_id == record.study_id == record.id
  assert pathlib.Path(record.image) == kaggle_root / 'train' / f'{record.id}.dicom'
  assert record.boxes == ()  # no image folder, so no DICOM sizes


@needs_shared
def test_kaggle_positive_counts_any_vs_majority(kaggle_full):
  # Counted independently of the reader (csv module, sets of readers per image and class).
  expected = {
    'any': {'Cardiomegaly': 2300, 'Pneumothorax': 96, 'Nodule/Mass': 826, NO_FINDING: 10_606},
    'majority': {'Cardiomegaly': 1817, 'Pneumothorax': 58, 'Nodule/Mass': 405, NO_FINDING: 10_606},
  }
  for aggregate, counts in expected.items():
    matrix = label_matrix(kaggle_full[aggregate], len(VINDR_FINDINGS))
    found = dict(zip(VINDR_FINDINGS, matrix.sum(0).astype(int).tolist(), strict=True))
    assert {name: found[name] for name in counts} == counts, aggregate
  # 'majority' can only remove positives.
  assert (label_matrix(kaggle_full['majority'], 15) <= label_matrix(kaggle_full['any'], 15)).all()


@needs_shared
def test_kaggle_train_val_carve_by_image(kaggle_root):
  train = vindr.read_records(kaggle_root, split='train', val_fraction=0.1, seed=3)
  val = vindr.read_records(kaggle_root, split='val', val_fraction=0.1, seed=3)
  assert (len(train), len(val)) == (13_500, 1_500)
  assert not {r.id for r in train} & {r.id for r in val}


@needs_shared
def test_kaggle_has_no_labelled_test_split(kaggle_root):
  with pytest.raises(ValueError, match='no public labels'):
    vindr.read_records(kaggle_root, split='test')


@needs_shared
@pytest.mark.parametrize('aggregate', vindr.AGGREGATIONS)
def test_physionet_excerpt_matches_kaggle(physionet_root, kaggle_full, aggregate):
  physionet = _by_id(
    vindr.read_records(
      physionet_root, split='train_val', aggregate=aggregate, labels=VINDR_FINDINGS
    )
  )
  kaggle = _by_id(kaggle_full[aggregate])
  assert tuple(physionet) == EXCERPT_IDS
  for image_id, record in physionet.items():
    np.testing.assert_array_equal(record.labels, kaggle[image_id].labels, err_msg=image_id)
  # Hand-checked: R8 Consolidation + Nodule/Mass, R9 Lung Opacity, R10 Infiltration + Lung Opacity.
  mixed = physionet['0005e8e3701dfb1dd93d53e2ff537b6e']
  if aggregate == 'any':
    assert _positives(mixed) == ['Consolidation', 'Infiltration', 'Lung Opacity', 'Nodule/Mass']
  else:
    assert _positives(mixed) == ['Lung Opacity']
  assert _positives(physionet['000434271f63a053c4128a0ba6352c7f']) == [NO_FINDING]


@needs_shared
def test_physionet_boxes_derive_local_labels_only(physionet_root):
  records = vindr.read_records(physionet_root, split='train_val')
  expected_names = vindr.VINDR_LOCAL_LABELS + (NO_FINDING,)
  assert all(len(r.labels) == len(expected_names) for r in records)
  # A global label is unknown when only the box file is there.
  pneumonia = vindr.read_records(physionet_root, split='train_val', labels=['Pneumonia', 'Edema'])
  assert np.isnan(pneumonia[0].labels[0]) and pneumonia[0].labels[1] == 0.0
  with pytest.raises(ValueError, match=r'annotations_test\.csv'):
    vindr.read_records(physionet_root, split='test')


def test_aggregate_labels_any_vs_majority():
  readings = np.array([[1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 1, 0]], np.float32)
  np.testing.assert_array_equal(vindr.aggregate_labels(readings, 'any'), [1, 1, 1, 0])
  np.testing.assert_array_equal(vindr.aggregate_labels(readings, 'majority'), [1, 0, 1, 0])
  # More than half: a 2-of-4 tie is negative, 3 of 4 positive; one reader decides alone.
  tie = np.array([[1, 1], [1, 1], [0, 1], [0, 0]], np.float32)
  np.testing.assert_array_equal(vindr.aggregate_labels(tie, 'majority'), [0, 1])
  np.testing.assert_array_equal(vindr.aggregate_labels([[0, 1]], 'majority'), [0, 1])
  with pytest.raises(ValueError, match='aggregate'):
    vindr.aggregate_labels(readings, 'mean')
  with pytest.raises(ValueError, match='num_readers'):
    vindr.aggregate_labels(np.zeros((0, 3)), 'any')


def test_any_vs_majority_on_hand_made_rows(tmp_path):
  root = _kaggle_root(
    tmp_path,
    [
      _kaggle_row('a', 'Cardiomegaly', 'R1', (10, 10, 50, 50)),
      _kaggle_row('a', 'Cardiomegaly', 'R2', (12, 12, 52, 52)),
      _kaggle_row('a', 'Pneumothorax', 'R2', (1, 1, 5, 5)),
      _kaggle_row('a', 'Pneumothorax', 'R2', (6, 6, 9, 9)),  # two boxes, one vote
      _kaggle_row('a', NO_FINDING, 'R3'),
      _kaggle_row('b', NO_FINDING, 'R1'),
      _kaggle_row('b', NO_FINDING, 'R4'),
      _kaggle_row('b', 'Atelectasis', 'R5', (3, 3, 8, 8)),
    ],
  )
  any_ = _by_id(vindr.read_records(root, split='train_val', aggregate='any'))
  majority = _by_id(vindr.read_records(root, split='train_val', aggregate='majority'))
  # 'No finding' means none of the others: a reader's 'No finding' beside another's finding does not survive.
  assert _positives(any_['a']) == ['Cardiomegaly', 'Pneumothorax']
  assert _positives(majority['a']) == ['Cardiomegaly']
  assert _positives(any_['b']) == ['Atelectasis']
  assert _positives(majority['b']) == [NO_FINDING]


def test_no_finding_is_positive_only_without_a_finding():
  # Columns: Cardiomegaly, Edema, No finding. R1 found Cardiomegaly, R2 and R3 nothing.
  readings = np.array([[1, 0, 0], [0, 0, 1], [0, 0, 1]], np.float32)
  np.testing.assert_array_equal(vindr.aggregate_labels(readings, 'any', no_finding=2), [1, 0, 0])
  np.testing.assert_array_equal(
    vindr.aggregate_labels(readings, 'majority', no_finding=2), [0, 0, 1]
  )
  # Without the column named, each label is aggregated on its own.
  np.testing.assert_array_equal(vindr.aggregate_labels(readings, 'any'), [1, 0, 1])
  # Under 'majority' both can win only when readers marked both, which an image_labels file can hold.
  both = np.array([[1, 0, 1], [1, 0, 1], [0, 0, 1]], np.float32)
  np.testing.assert_array_equal(vindr.aggregate_labels(both, 'majority', no_finding=2), [1, 0, 0])
  with pytest.raises(ValueError, match='no_finding=3'):
    vindr.aggregate_labels(both, 'any', no_finding=3)


def test_no_finding_after_aggregation_in_an_image_labels_file(tmp_path):
  labels = '\n'.join(
    [
      'image_id,rad_id,Cardiomegaly,Edema,No finding',
      'a,R1,1,0,1',  # one reader marks a finding and 'No finding'
      'a,R2,1,0,1',
      'a,R3,0,0,1',
      'b,R1,0,1,0',
      'b,R2,0,0,1',
      'b,R3,0,0,1',
    ]
  )
  root = _physionet_root(tmp_path, image_labels_train=labels + '\n')
  names = ['Cardiomegaly', 'Edema', NO_FINDING]
  for aggregate, a, b in (
    ('majority', ['Cardiomegaly'], [NO_FINDING]),
    ('any', ['Cardiomegaly'], ['Edema']),
  ):
    records = _by_id(vindr.read_records(root, split='train_val', aggregate=aggregate))
    assert _positives(records['a'], names) == a, aggregate
    assert _positives(records['b'], names) == b, aggregate
    chexpert = _by_id(
      vindr.read_records(
        root, split='train_val', aggregate=aggregate, label_space='chexpert', labels=['No Finding']
      )
    )
    assert chexpert['a'].labels.tolist() == [0.0], aggregate


def test_mapping_to_chexpert_and_nih(tmp_path):
  root = _kaggle_root(
    tmp_path,
    [
      _kaggle_row('a', 'Nodule/Mass', 'R1', (1, 1, 5, 5)),
      _kaggle_row('a', 'Pleural effusion', 'R1', (1, 1, 5, 5)),
      _kaggle_row('a', 'Pulmonary fibrosis', 'R1', (1, 1, 5, 5)),
      _kaggle_row('b', NO_FINDING, 'R1'),
    ],
  )
  nih = _by_id(vindr.read_records(root, split='train_val', label_space='nih', aggregate='any'))
  a = dict(zip(NIH_LABELS, nih['a'].labels.tolist(), strict=True))
  assert a['Nodule'] == a['Mass'] == a['Effusion'] == a['Fibrosis'] == 1.0
  assert a['Cardiomegaly'] == a['Pleural_Thickening'] == a['Infiltration'] == 0.0
  # No VinDr source at all (Hernia), or a source only in the PhysioNet files (Kaggle has no Edema, Emphysema,
  # Pneumonia): unknown, never 0.
  for name in ('Hernia', 'Edema', 'Emphysema', 'Pneumonia'):
    assert np.isnan(a[name]), name
  assert np.isnan(nih['b'].labels[NIH_LABELS.index('Hernia')])

  chexpert = _by_id(vindr.read_records(root, split='train_val', label_space='chexpert'))
  a = dict(zip(CHEXPERT_LABELS, chexpert['a'].labels.tolist(), strict=True))
  b = dict(zip(CHEXPERT_LABELS, chexpert['b'].labels.tolist(), strict=True))
  assert a['Lung Lesion'] == a['Pleural Effusion'] == 1.0 and a['No Finding'] == 0.0
  assert b['No Finding'] == 1.0 and b['Lung Lesion'] == b['Cardiomegaly'] == 0.0
  for name in ('Enlarged Cardiomediastinum', 'Support Devices', 'Edema', 'Pneumonia', 'Fracture'):
    assert np.isnan(a[name]) and np.isnan(b[name]), name

  subset = vindr.read_records(root, split='train_val', label_space='nih', labels=['Mass', 'Hernia'])
  assert subset[0].labels[0] == 1.0 and np.isnan(subset[0].labels[1])
  with pytest.raises(ValueError, match=r"labels \['Lung Opacity'\] are unknown"):
    vindr.read_records(root, split='train_val', label_space='nih', labels=['Lung Opacity'])


def test_map_labels_combines_sources_with_unknowns():
  matrix = np.array([[1, np.nan], [0, np.nan], [0, 0], [np.nan, 1]], np.float32)
  mapping = {'x': ('T',), 'y': ('T', 'U')}
  out = vindr.map_labels(matrix, ['x', 'y'], ['T', 'U', 'V'], mapping)
  np.testing.assert_array_equal(
    out[:, 0], [1, np.nan, 0, 1]
  )  # any positive wins; else unknown if any is
  np.testing.assert_array_equal(out[:, 1], [np.nan, np.nan, 0, 1])
  assert np.isnan(out[:, 2]).all()  # no source


def test_physionet_image_labels_header_and_consensus_test(tmp_path):
  names = ['Cardiomegaly', 'Edema', 'Pneumonia', 'Tuberculosis', NO_FINDING]
  header = ','.join(['image_id', 'rad_ID', *names])
  train = '\n'.join(
    [
      header,
      'a,R1,1,0,1,0,0',
      'a,R2,1,1,0,0,0',
      'a,R3,0,0,1,0,0',
      'b,R1,0,0,0,0,1',
      'b,R2,0,0,0,0,1',
      'b,R3,0,0,0,0,1',
    ]
  )
  test = '\n'.join([','.join(['image_id', *names]), 'c,0,1,1,0,0'])
  root = _physionet_root(tmp_path, image_labels_train=train + '\n', image_labels_test=test + '\n')
  records = _by_id(vindr.read_records(root, split='train_val'))
  assert _positives(records['a'], names) == ['Cardiomegaly', 'Pneumonia']
  assert _positives(records['b'], names) == [NO_FINDING]
  any_ = _by_id(vindr.read_records(root, split='train_val', aggregate='any'))
  assert _positives(any_['a'], names) == ['Cardiomegaly', 'Edema', 'Pneumonia']

  mapped = ['Edema', 'Pneumonia', 'Cardiomegaly', 'No Finding']
  (test_record,) = vindr.read_records(root, split='test', label_space='chexpert', labels=mapped)
  assert test_record.labels.tolist() == [1.0, 1.0, 0.0, 0.0]
  assert pathlib.Path(test_record.image) == root / 'test' / 'c.dicom'
  # Lung Lesion's sources (Nodule/Mass, Lung tumor, Lung cavity) are not columns of this file: asking for it
  # is an error, not a NaN column.
  with pytest.raises(
    ValueError,
    match=r"image_labels_test\.csv: header has no column for .*'Nodule/Mass' \(for 'Lung Lesion'\)",
  ):
    vindr.read_records(root, split='test', label_space='chexpert')


def test_boxes_in_image_fractions_from_the_dicom_header(tmp_path):
  root = _kaggle_root(
    tmp_path,
    [
      _kaggle_row('a', 'Cardiomegaly', 'R1', (10.0, 50.0, 60.0, 150.0)),
      _kaggle_row('a', 'Cardiomegaly', 'R2', (20, 40, 100, 210)),  # clipped at the image edge
      _kaggle_row('a', NO_FINDING, 'R3'),
      _kaggle_row('b', NO_FINDING, 'R1'),
    ],
  )
  (root / 'train').mkdir()
  _write_dicom_header(root / 'train' / 'a.dicom', rows=200, columns=100)
  _write_dicom_header(root / 'train' / 'b.dicom', rows=8, columns=8)
  records = _by_id(vindr.read_records(root, split='train_val'))
  assert records['a'].boxes == (
    Box('Cardiomegaly', 0.1, 0.25, 0.6, 0.75),
    Box('Cardiomegaly', 0.2, 0.2, 1.0, 1.0),
  )
  assert records['b'].boxes == ()
  assert pathlib.Path(records['a'].image) == root / 'train' / 'a.dicom'


def test_boxes_take_the_names_of_the_label_space(tmp_path):
  """Mapped to ChestX-ray14's labels, a 'Nodule/Mass' box is a Nodule box and a Mass box, a 'Pleural effusion'
  box an Effusion box, and a box of a finding without a counterpart ('Aortic enlargement') is dropped."""
  root = _kaggle_root(
    tmp_path,
    [
      _kaggle_row('a', 'Nodule/Mass', 'R1', (10.0, 50.0, 60.0, 150.0)),
      _kaggle_row('a', 'Pleural effusion', 'R2', (0.0, 0.0, 50.0, 100.0)),
      _kaggle_row('a', 'Aortic enlargement', 'R3', (0.0, 0.0, 10.0, 10.0)),
    ],
  )
  (root / 'train').mkdir()
  _write_dicom_header(root / 'train' / 'a.dicom', rows=200, columns=100)
  (record,) = vindr.read_records(root, split='train_val', label_space='nih', aggregate='any')
  assert record.boxes == (
    Box('Nodule', 0.1, 0.25, 0.6, 0.75),
    Box('Mass', 0.1, 0.25, 0.6, 0.75),
    Box('Effusion', 0.0, 0.0, 0.5, 0.5),
  )
  labels = list(NIH_LABELS)
  assert localization.boxed_images([record], labels) == [0]
  (native,) = vindr.read_records(root, split='train_val', aggregate='any')
  assert [b.label for b in native.boxes] == [
    'Nodule/Mass',
    'Pleural effusion',
    'Aortic enlargement',
  ]


def test_missing_images_and_boxes_outside_the_image(tmp_path):
  root = _kaggle_root(
    tmp_path,
    [_kaggle_row('a', NO_FINDING, 'R1'), _kaggle_row('b', 'Atelectasis', 'R1', (5, 5, 9, 9))],
  )
  (root / 'train').mkdir()
  _write_dicom_header(root / 'train' / 'a.dicom', rows=4, columns=4)
  with pytest.raises(
    ValueError, match=r"train\.csv row 2: image 'b\.dicom' is not in .*1 of 2 images"
  ):
    vindr.read_records(root, split='train_val')
  assert [r.id for r in vindr.read_records(root, split='train_val', skip_missing_images=True)] == [
    'a'
  ]
  _write_dicom_header(root / 'train' / 'b.dicom', rows=4, columns=4)
  with pytest.raises(ValueError, match=r"train\.csv row 2: box .* outside image 'b' of 4 x 4 px"):
    vindr.read_records(root, split='train_val')


def test_unreadable_dicom_or_box_outside_the_image_follows_skip_bad(tmp_path):
  root = _kaggle_root(
    tmp_path,
    [
      _kaggle_row('a', 'Cardiomegaly', 'R1', (10, 10, 50, 50)),
      _kaggle_row('b', 'Atelectasis', 'R1', (1, 1, 5, 5)),  # b.dicom is empty
      _kaggle_row('b', 'Atelectasis', 'R2', (2, 2, 6, 6)),
      _kaggle_row('c', 'Nodule/Mass', 'R1', (1, 1, 3, 3)),
      _kaggle_row('c', 'Nodule/Mass', 'R2', (20, 20, 30, 30)),  # c.dicom is 8 x 8 px
      _kaggle_row('d', 'Pneumothorax', 'R1', (1, 1, 4, 4)),  # d.dicom is cut short
    ],
  )
  (root / 'train').mkdir()
  _write_dicom_header(root / 'train' / 'a.dicom', rows=100, columns=100)
  (root / 'train' / 'b.dicom').write_bytes(b'')
  _write_dicom_header(root / 'train' / 'c.dicom', rows=8, columns=8)
  _write_dicom_header(root / 'train' / 'full.dicom', rows=64, columns=64)
  (root / 'train' / 'd.dicom').write_bytes((root / 'train' / 'full.dicom').read_bytes()[:200])
  (root / 'train' / 'full.dicom').unlink()

  with pytest.raises(
    ValueError, match=r"train\.csv row 2: cannot place the boxes of image 'b' .*b\.dicom"
  ):
    vindr.read_records(root, split='train_val')
  (root / 'train' / 'b.dicom').unlink()
  _write_dicom_header(root / 'train' / 'b.dicom', rows=8, columns=8)
  with pytest.raises(ValueError, match=r"train\.csv row 5: box .* outside image 'c' of 8 x 8 px"):
    vindr.read_records(root, split='train_val')
  _write_dicom_header(root / 'train' / 'c.dicom', rows=64, columns=64)
  with pytest.raises(ValueError, match=r"train\.csv row 6: cannot place .*'d' .*d\.dicom"):
    vindr.read_records(root, split='train_val')

  (root / 'train' / 'b.dicom').write_bytes(b'')
  _write_dicom_header(root / 'train' / 'c.dicom', rows=8, columns=8)
  with bad_input.collecting() as skipped:
    records = _by_id(vindr.read_records(root, split='train_val'))
  # Every record stays, with its labels; only the boxes that cannot be placed are dropped.
  assert list(records) == ['a', 'b', 'c', 'd']
  assert _positives(records['b']) == ['Atelectasis']
  assert records['a'].boxes == (Box('Cardiomegaly', 0.1, 0.1, 0.5, 0.5),)
  assert records['b'].boxes == records['d'].boxes == ()
  assert records['c'].boxes == (Box('Nodule/Mass', 0.125, 0.125, 0.375, 0.375),)
  assert len(skipped) == 3
  assert "train.csv row 2: cannot place the boxes of image 'b' (box rows 2, 3)" in skipped[0]
  assert 'b.dicom' in skipped[0]
  assert "train.csv row 5: box (20.0, 20.0, 30.0, 30.0) px lies outside image 'c'" in skipped[1]
  assert "train.csv row 6: cannot place the boxes of image 'd'" in skipped[2]
  assert 'd.dicom' in skipped[2]


def test_image_labels_header_names_are_checked_against_the_vindr_labels(tmp_path):
  # 'Pleural Effusion' for 'Pleural effusion' and 'Nodule/mass' for 'Nodule/Mass': spelling variants.
  header = (
    'image_id,rad_id,Pleural Effusion,Nodule/mass,Lung tumor,Lung cavity,Cardiomegaly,No finding'
  )
  rows = ['a,R1,1,1,0,0,0,0', 'b,R1,0,0,0,0,0,1']
  root = _physionet_root(tmp_path, image_labels_train='\n'.join([header, *rows]) + '\n')
  with pytest.raises(
    ValueError,
    match=r"image_labels_train\.csv: header has no column for label\(s\) \['Pleural effusion'\] asked "
    r"for; its columns \['Pleural Effusion', 'Nodule/mass'\] are not VinDr labels; expected label names "
    r"from \('Aortic enlargement'",
  ):
    vindr.read_records(root, split='train_val', labels=['Pleural effusion', NO_FINDING])
  # Lung Lesion would otherwise be Lung tumor or Lung cavity alone, silently leaving nodules and masses out.
  with pytest.raises(
    ValueError,
    match=r"no column for the VinDr source\(s\) of chexpert .*'Nodule/Mass' \(for 'Lung Lesion'\)",
  ):
    vindr.read_records(root, split='train_val', label_space='chexpert', labels=['Lung Lesion'])
  with pytest.raises(ValueError, match=r"'Pleural effusion' \(for 'Effusion'\)"):
    vindr.read_records(root, split='train_val', label_space='nih', labels=['Effusion'])
  # Labels whose columns are there still read; the header's own names are the default.
  records = _by_id(vindr.read_records(root, split='train_val', labels=['Cardiomegaly', NO_FINDING]))
  assert records['a'].labels.tolist() == [0.0, 0.0] and records['b'].labels.tolist() == [0.0, 1.0]
  (default,) = {r.labels.shape for r in vindr.read_records(root, split='train_val')}
  assert default == (6,)


def test_image_labels_train_spelling_of_other_disease(tmp_path):
  # The PhysioNet train file says 'Other diseases', the test file 'Other disease': one label for both.
  root = _physionet_root(
    tmp_path,
    image_labels_train='image_id,rad_id,Other diseases,No finding\na,R1,1,0\n',
    image_labels_test='image_id,Other disease,No finding\nb,1,0\n',
  )
  for split, image in (('train_val', 'a'), ('test', 'b')):
    (record,) = vindr.read_records(root, split=split, labels=['Other disease', NO_FINDING])
    assert record.id == image and record.labels.tolist() == [1.0, 0.0]
  assert vindr.read_image_labels(root / 'annotations' / 'image_labels_train.csv').names == (
    'Other disease',
    NO_FINDING,
  )


@pytest.mark.parametrize(
  'row, message',
  [
    (
      'a,Cardiomegally,3,R1,1,1,5,5',
      r"train\.csv row 2: class_name 'Cardiomegally' is unknown",
    ),
    (
      'a,Cardiomegaly,4,R1,1,1,5,5',
      r"train\.csv row 2: class_id '4' does not match class_name 'Cardiomegaly'",
    ),
    ('a,Cardiomegaly,3,R1,5,1,5,5', r'train\.csv row 2: bad box coordinates .*x_min < x_max'),
    ('a,Cardiomegaly,3,R1,1,9,5,5', r'train\.csv row 2: bad box coordinates .*y_min < y_max'),
    ('a,Cardiomegaly,3,R1,-1,1,5,5', r'train\.csv row 2: bad box coordinates .*0 <= x_min'),
    ('a,Cardiomegaly,3,R1,1,1,,5', r'train\.csv row 2: bad box coordinates .*partly blank'),
    ('a,Cardiomegaly,3,R1,1,1,five,5', r'train\.csv row 2: bad box coordinates .*five'),
    ('a,Cardiomegaly,3,R1,1,1,nan,5', r'train\.csv row 2: bad box coordinates .*need finite'),
    ('a,No finding,14,R1,1,1,5,5', r"train\.csv row 2: a 'No finding' row has coordinates"),
    ('a,Cardiomegaly,3,R1,1,1,5', r'train\.csv row 2 \(line 3\): 7 fields, expected 8'),
    (
      'a,Cardiomegaly,3,R2,1,1,5,5',
      r"train\.csv row 2: reader 'R2' marks both 'No finding' \(row 1\)",
    ),
  ],
)
def test_malformed_rows_name_file_and_row(tmp_path, row, message):
  first = 'a,No finding,14,R2,,,,' if 'R2' in row else 'z,No finding,14,R1,,,,'
  root = _kaggle_root(tmp_path, [first, row])
  with pytest.raises(ValueError, match=message):
    vindr.read_records(root, split='train_val')


def test_physionet_errors_name_file_and_row(tmp_path):
  root = _physionet_root(
    tmp_path,
    annotations_train=f'{BOX_HEADER}\na,R1,No finding,,,,\na,R2,Lung Opacityy,1,1,5,5\n',
  )
  with pytest.raises(ValueError, match=r"annotations_train\.csv row 2: class_name 'Lung Opacityy'"):
    vindr.read_records(root, split='train')
  labels = 'image_id,rad_id,Cardiomegaly,No finding\na,R1,0,1\na,R1,1,0\nb,R1,2,0\n'
  root = _physionet_root(tmp_path / 'two', image_labels_train=labels)
  with pytest.raises(
    ValueError, match=r"image_labels_train\.csv row 2: image 'a' reader 'R1' is listed"
  ):
    vindr.read_records(root, split='train')
  root = _physionet_root(
    tmp_path / 'three', image_labels_train=labels.replace('a,R1,1,0', 'a,R2,1,0')
  )
  with pytest.raises(
    ValueError, match=r"image_labels_train\.csv row 3, column 'Cardiomegaly': '2'"
  ):
    vindr.read_records(root, split='train')


def test_argument_and_layout_errors(tmp_path):
  with pytest.raises(ValueError, match=r'neither annotations/ .* nor train\.csv'):
    vindr.read_records(tmp_path, split='train')
  root = _kaggle_root(tmp_path / 'k', [_kaggle_row('a', NO_FINDING, 'R1')])
  with pytest.raises(ValueError, match='split'):
    vindr.read_records(root, split='valid')
  with pytest.raises(ValueError, match='label_space'):
    vindr.read_records(root, split='train', label_space='mimic')
  with pytest.raises(ValueError, match='aggregate'):
    vindr.read_records(root, split='train', aggregate='all')
  with pytest.raises(ValueError, match=r"labels \['Hernia'\] are unknown"):
    vindr.read_records(root, split='train', labels=['Hernia'])
  with pytest.raises(ValueError, match='val_fraction'):
    vindr.read_records(root, split='val', val_fraction=1.0)
