"""ChestX-ray14 reader on the real label files and sample images beside the checkout (../shared/data).

The full-size files are parsed once per module; small variants (2017 header, broken rows, partial image
folders) are written or symlinked into tmp_path, never into the repository.
"""

import gzip
import logging
import os
import pathlib

import numpy as np
import pytest

from ms_cxr.data import nih
from ms_cxr.data.labels import NIH_LABELS
from ms_cxr.data.records import label_matrix

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data'
LABELS_DIR = SHARED_DATA / 'labels'
DATA_ENTRY_GZ = LABELS_DIR / 'Data_Entry_2017_v2020.csv.gz'
NIH_SAMPLE = SHARED_DATA / 'nih'
NIH_64PX = SHARED_DATA / 'nih_64px'

pytestmark = pytest.mark.skipif(
  not SHARED_DATA.is_dir(),
  reason=f'real test data not found at {SHARED_DATA} (it lives beside the checkout)',
)


def _link(root: pathlib.Path, **files: pathlib.Path) -> pathlib.Path:
  """Makes `root` with symlinks name -> shared file, so the real data is read in place."""
  root.mkdir(parents=True, exist_ok=True)
  for name, target in files.items():
    (root / name).symlink_to(target)
  return root


@pytest.fixture(scope='module')
def full_root(tmp_path_factory):
  """The full ChestX-ray14 label files, without images."""
  return _link(
    tmp_path_factory.mktemp('nih_full'),
    **{
      'Data_Entry_2017_v2020.csv.gz': DATA_ENTRY_GZ,
      'BBox_List_2017.csv.gz': LABELS_DIR / 'BBox_List_2017.csv.gz',
      'train_val_list.txt': LABELS_DIR / 'nih_official_splits' / 'train_val_list.txt',
      'test_list.txt': LABELS_DIR / 'nih_official_splits' / 'test_list.txt',
    },
  )


@pytest.fixture(scope='module')
def full(full_root):
  """Every official split of the full label file, each read once."""
  return {split: nih.read_records(full_root, split=split) for split in nih.SPLITS}


def _data_entry_lines(count: int) -> list[str]:
  """The header and the first `count` data lines of the real v2020 label file."""
  with gzip.open(DATA_ENTRY_GZ, 'rt', newline='') as f:
    return [next(f).rstrip('\r\n') for _ in range(count + 1)]


def _patients(records) -> set[str]:
  return {r.patient_id for r in records}


def test_full_label_file_counts(full):
  records = full['all']
  assert len(records) == 112_120
  assert len(_patients(records)) == 30_805
  matrix = label_matrix(records, len(NIH_LABELS))
  positives = dict(zip(NIH_LABELS, matrix.sum(0).astype(int).tolist(), strict=True))
  assert positives['Infiltration'] == 19_894
  assert positives['Effusion'] == 13_317
  assert positives['Atelectasis'] == 11_559
  assert positives['Hernia'] == 227
  assert int((matrix.sum(1) == 0).sum()) == 60_361  # No Finding
  assert matrix.dtype == np.float32 and not np.isnan(matrix).any()


def test_full_first_record(full, full_root):
  first = full['all'][0]
  assert first.id == '00000001_000.png'
  assert first.patient_id == '1' and first.study_id == '1_0' and first.view == 'PA'
  assert first.labels.tolist() == [float(name == 'Cardiomegaly') for name in NIH_LABELS]
  # No image folder: label-only use, the path is where the image would be.
  assert first.image == os.path.join(os.path.abspath(full_root), 'images', '00000001_000.png')


def test_official_split(full):
  train_val, test = full['train_val'], full['test']
  assert (len(train_val), len(test)) == (86_524, 25_596)
  assert not _patients(train_val) & _patients(test)
  assert {r.id for r in train_val} | {r.id for r in test} == {r.id for r in full['all']}


def test_train_val_carve_by_patient(full):
  train, val, train_val = full['train'], full['val'], full['train_val']
  assert not _patients(train) & _patients(val)
  assert len(train) + len(val) == len(train_val)
  assert _patients(train) | _patients(val) == _patients(train_val)
  assert len(_patients(val)) == round(0.1 * len(_patients(train_val)))
  # Deterministic by seed, and the seed matters.
  patients = [r.patient_id for r in train_val]
  assert nih.carve_val_patients(patients, 0.1, seed=0) == _patients(val)
  assert nih.carve_val_patients(reversed(patients), 0.1, seed=0) == _patients(val)
  assert nih.carve_val_patients(patients, 0.1, seed=1) != _patients(val)


def test_boxes_on_full_label_file(full):
  boxes = [b for r in full['all'] for b in r.boxes]
  assert len(boxes) == 984
  assert all(0.0 <= b.x0 < b.x1 <= 1.0 and 0.0 <= b.y0 < b.y1 <= 1.0 for b in boxes)
  assert 'Infiltrate' not in {b.label for b in boxes}
  assert sum(b.label == 'Infiltration' for b in boxes) == 123


def test_read_data_entry_fields():
  rows = nih.read_data_entry(NIH_SAMPLE / 'Data_Entry_2017_v2020.csv')
  assert len(rows) == 19
  second = rows[1]
  assert second == nih.DataEntryRow(
    row=2,
    image_index='00000001_002.png',
    findings=('Cardiomegaly', 'Effusion'),
    follow_up=2,
    patient_id='1',
    patient_age=58,
    patient_gender='M',
    view_position='PA',
    width=2500,
    height=2048,
    pixel_spacing_x=0.168,
    pixel_spacing_y=0.168,
  )
  assert rows[2].findings == ()  # 'No Finding'


def test_2017_header_with_trailing_empty_column(tmp_path):
  lines = _data_entry_lines(50)
  (tmp_path / 'v2020.csv').write_text('\n'.join(lines) + '\n')
  (tmp_path / 'Data_Entry_2017.csv').write_text(''.join(line + ',\n' for line in lines))
  expected = nih.read_data_entry(tmp_path / 'v2020.csv')
  assert len(expected) == 50
  assert nih.read_data_entry(tmp_path / 'Data_Entry_2017.csv') == expected
  # read_records finds the 2017 name too; 'all' needs no split list.
  records = nih.read_records(tmp_path, split='all')
  assert [r.id for r in records] == [row.image_index for row in expected]


def test_quoted_bracket_header_parses_the_same(tmp_path):
  lines = _data_entry_lines(5)
  header = lines[0].replace('OriginalImage[Width,Height]', '"OriginalImage[Width,Height]"')
  (tmp_path / 'a.csv').write_text('\n'.join(lines) + '\n')
  (tmp_path / 'b.csv').write_text('\n'.join([header, *lines[1:]]) + '\n')
  assert nih.read_data_entry(tmp_path / 'b.csv') == nih.read_data_entry(tmp_path / 'a.csv')


def test_unknown_label_names_row_and_label(tmp_path):
  lines = _data_entry_lines(5)
  name, labels, rest = lines[4].split(',', 2)
  lines[4] = ','.join([name, 'Effusion|Pneumonai', rest])
  path = tmp_path / 'Data_Entry_2017.csv'
  path.write_text('\n'.join(lines) + '\n')
  with pytest.raises(
    ValueError, match=r"Data_Entry_2017\.csv row 4: 'Finding Labels' has unknown label 'Pneumonai'"
  ):
    nih.read_data_entry(path)


def test_wrong_field_count_names_file_and_row(tmp_path):
  lines = _data_entry_lines(5)
  lines[3] = lines[3].rsplit(',', 1)[0]
  path = tmp_path / 'Data_Entry_2017_v2020.csv'
  path.write_text('\n'.join(lines) + '\n')
  with pytest.raises(
    ValueError, match=r'Data_Entry_2017_v2020\.csv row 3 \(line 4\): 10 fields, expected 11'
  ):
    nih.read_data_entry(path)


def test_dicom_age_strings_and_bad_numbers_name_the_column(tmp_path):
  lines = _data_entry_lines(4)
  header = lines[0].split(',')
  age = header.index('Patient Age')
  width = header.index('OriginalImage[Width')  # the header's bracket pair splits on its comma
  fields = [line.split(',') for line in lines[1:]]
  years = [int(f[age]) for f in fields]
  fields[0][age] = f'{years[0]:03d}Y'  # the Kaggle sample's spelling
  fields[1][age] = '018M'
  path = tmp_path / 'Data_Entry_2017.csv'
  path.write_text('\n'.join([lines[0], *(','.join(f) for f in fields)]) + '\n')
  rows = nih.read_data_entry(path)
  assert [r.patient_age for r in rows] == [years[0], 1, *years[2:]]

  fields[2][width] = '2500.5'
  path.write_text('\n'.join([lines[0], *(','.join(f) for f in fields)]) + '\n')
  with pytest.raises(
    ValueError,
    match=r"Data_Entry_2017\.csv row 3: 'OriginalImage\[Width\]' is '2500\.5', expected an integer",
  ):
    nih.read_data_entry(path)


def test_label_files_that_are_not_utf8_or_cut_short_name_the_file(tmp_path):
  lines = _data_entry_lines(400)
  text = '\n'.join(lines) + '\n'
  exported = tmp_path / 'utf16' / 'Data_Entry_2017.csv'
  exported.parent.mkdir()
  exported.write_bytes(text.encode('utf-16'))  # a spreadsheet's 'Unicode text' export
  with pytest.raises(ValueError, match=r'Data_Entry_2017\.csv line 1: not UTF-8 text'):
    nih.read_data_entry(exported)
  data = gzip.compress(text.encode())
  cut = tmp_path / 'cut' / 'Data_Entry_2017.csv.gz'
  cut.parent.mkdir()
  cut.write_bytes(data[: len(data) // 2])
  with pytest.raises(
    ValueError, match=r'Data_Entry_2017\.csv\.gz line \d+: the gzip data cannot be read'
  ):
    nih.read_data_entry(cut)


def test_missing_list_and_bad_arguments(tmp_path):
  root = _link(
    tmp_path / 'root', **{'Data_Entry_2017_v2020.csv': NIH_SAMPLE / 'Data_Entry_2017_v2020.csv'}
  )
  with pytest.raises(ValueError, match=r'test_list\.txt is missing'):
    nih.read_records(root, split='test')
  with pytest.raises(ValueError, match=r'train_val_list\.txt is missing'):
    nih.read_records(root, split='train')
  with pytest.raises(ValueError, match='split .validation. is unknown'):
    nih.read_records(root, split='validation')
  with pytest.raises(ValueError, match=r"\['Pneumonai'\] are unknown"):
    nih.read_records(root, split='all', labels=('Effusion', 'Pneumonai'))
  with pytest.raises(ValueError, match='no label file'):
    nih.read_records(tmp_path, split='all')


def test_sample_folder_resolves_images():
  records = nih.read_records(NIH_SAMPLE, split='all')
  assert len(records) == 19
  assert all(pathlib.Path(r.image) == NIH_SAMPLE / 'images' / r.id for r in records)
  assert all(os.path.isfile(r.image) for r in records)
  assert len(nih.read_records(NIH_SAMPLE, split='train_val')) == 12
  assert len(nih.read_records(NIH_SAMPLE, split='test')) == 7
  by_id = {r.id: r for r in records}
  assert by_id['00000001_002.png'].study_id == '1_2'
  assert by_id['00000003_000.png'].labels.tolist() == [float(n == 'Hernia') for n in NIH_LABELS]


def test_label_subset_and_order():
  records = nih.read_records(NIH_SAMPLE, split='all', labels=('Effusion', 'Cardiomegaly'))
  by_id = {r.id: r for r in records}
  assert by_id['00000001_002.png'].labels.tolist() == [1.0, 1.0]
  assert by_id['00000001_000.png'].labels.tolist() == [0.0, 1.0]


def test_missing_images_error_or_skip(tmp_path):
  root = _link(
    tmp_path / 'root', **{'Data_Entry_2017_v2020.csv': NIH_SAMPLE / 'Data_Entry_2017_v2020.csv'}
  )
  names = sorted(p.name for p in (NIH_SAMPLE / 'images').iterdir())
  _link(root / 'images', **{name: NIH_SAMPLE / 'images' / name for name in names[:10]})
  rows = {
    row.image_index: row.row for row in nih.read_data_entry(root / 'Data_Entry_2017_v2020.csv')
  }
  first_missing = min(names[10:], key=rows.get)
  with pytest.raises(
    ValueError, match=rf'row {rows[first_missing]}: image {first_missing!r}.*9 of 19'
  ):
    nih.read_records(root, split='all')
  kept = nih.read_records(root, split='all', skip_missing_images=True)
  assert sorted(r.id for r in kept) == names[:10]


def test_kaggle_numbered_image_folders(tmp_path):
  root = _link(
    tmp_path / 'root', **{'Data_Entry_2017_v2020.csv': NIH_SAMPLE / 'Data_Entry_2017_v2020.csv'}
  )
  names = sorted(p.name for p in (NIH_SAMPLE / 'images').iterdir())
  _link(root / 'images_001' / 'images', **{n: NIH_SAMPLE / 'images' / n for n in names[:12]})
  _link(root / 'images_002' / 'images', **{n: NIH_SAMPLE / 'images' / n for n in names[12:]})
  records = nih.read_records(root, split='all')
  folder = {r.id: pathlib.Path(r.image).parent.parent.name for r in records}
  assert len(records) == 19
  assert all(folder[n] == 'images_001' for n in names[:12])
  assert all(folder[n] == 'images_002' for n in names[12:])


def _list_warnings(caplog) -> list[str]:
  return [
    r.getMessage()
    for r in caplog.records
    if r.levelno == logging.WARNING
    and ('no row in' in r.getMessage() or 'neither' in r.getMessage())
  ]


def test_split_lists_and_data_entry_disagreeing_are_warned_about(tmp_path, caplog):
  root = _link(
    tmp_path / 'root', **{'Data_Entry_2017_v2020.csv': NIH_SAMPLE / 'Data_Entry_2017_v2020.csv'}
  )
  train_val = (NIH_SAMPLE / 'train_val_list.txt').read_text().split()
  test = (NIH_SAMPLE / 'test_list.txt').read_text().split()
  # One listed image without a Data_Entry row, and one Data_Entry row in neither list.
  (root / 'train_val_list.txt').write_text('\n'.join([*train_val, '99999999_000.png']) + '\n')
  (root / 'test_list.txt').write_text('\n'.join(test[1:]) + '\n')
  with caplog.at_level(logging.WARNING):
    records = nih.read_records(root, split='train_val')
  assert len(records) == len(train_val)
  unlabelled, unlisted = _list_warnings(caplog)
  assert 'train_val_list.txt: 1 of its 13 images have no row in ' in unlabelled
  assert unlabelled.endswith('Data_Entry_2017_v2020.csv and are left out, e.g. 99999999_000.png')
  assert (
    'Data_Entry_2017_v2020.csv: 1 of its 19 rows are in neither train_val_list.txt nor' in unlisted
  )
  assert f'{test[0]}' in unlisted
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    assert len(nih.read_records(root, split='test')) == len(test) - 1
  (unlisted,) = _list_warnings(caplog)
  assert 'in neither' in unlisted and test[0] in unlisted


def test_no_list_warning_when_the_lists_cover_data_entry(full_root, caplog):
  with caplog.at_level(logging.WARNING):
    for root in (NIH_SAMPLE, NIH_64PX, full_root):
      for split in ('train', 'test'):
        nih.read_records(root, split=split)
  assert _list_warnings(caplog) == []


def test_64px_set_images_views_and_boxes():
  records = nih.read_records(NIH_64PX, split='all')
  assert len(records) == 1000 and all(os.path.isfile(r.image) for r in records)
  assert len(nih.read_records(NIH_64PX, split='train_val')) == 690
  assert len(nih.read_records(NIH_64PX, split='test')) == 310
  assert len(nih.read_records(NIH_64PX, split='all', views=('pa',))) == 637
  by_id = {r.id: r for r in records}
  assert sum(len(r.boxes) for r in records) == 9
  # BBox_List row: 00000181_061.png,Atelectasis,209.898305084746,568.714132018009,213.694915254237,254.915254237288
  # in 1024-px space: x0 = 209.898 / 1024, x1 = (209.898 + 213.695) / 1024, and so on.
  (box,) = by_id['00000181_061.png'].boxes
  assert box.label == 'Atelectasis'
  assert box.x0 == pytest.approx(0.204979, abs=1e-6)
  assert box.y0 == pytest.approx(0.555385, abs=1e-6)
  assert box.x1 == pytest.approx(0.413665, abs=1e-6)
  assert box.y1 == pytest.approx(0.804326, abs=1e-6)
  (infiltrate,) = by_id['00000211_016.png'].boxes
  assert infiltrate.label == 'Infiltration'
