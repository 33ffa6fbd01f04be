"""Bad input: an error naming the file and row by default; `data.skip_bad` skips and counts instead.

Label files are small variants of the real ones in ../shared/data written into tmp_path; images are the real NIH
samples plus a truncated copy and a missing path made by the test.
"""

import gzip
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, SHARED_DATA

from configs import densenet
from ms_cxr.data import bad_input, chexpert, nih, pipeline, vindr
from ms_cxr.data.records import Record
from ms_cxr.errors import UserError

pytestmark = pytest.mark.skipif(
  not SHARED_DATA.is_dir(), reason=f'real test data not found at {SHARED_DATA}'
)
NIH_SAMPLE = SHARED_DATA / 'nih'
NIH_64PX = SHARED_DATA / 'nih_64px'


def _data_entry_lines(count: int) -> list[str]:
  with gzip.open(SHARED_DATA / 'labels' / 'Data_Entry_2017_v2020.csv.gz', 'rt', newline='') as f:
    return [next(f).rstrip('\r\n') for _ in range(count + 1)]


def _broken_data_entry(path: pathlib.Path) -> pathlib.Path:
  """Six data rows: row 2 has a field missing, row 4 an unknown label."""
  lines = _data_entry_lines(6)
  lines[2] = lines[2].rsplit(',', 1)[0]
  name, _, rest = lines[4].split(',', 2)
  lines[4] = ','.join([name, 'Effusion|Pneumonai', rest])
  path.write_text('\n'.join(lines) + '\n')
  return path


def test_nih_bad_rows_raise_by_default_and_are_skipped_when_collecting(tmp_path):
  path = _broken_data_entry(tmp_path / 'Data_Entry_2017_v2020.csv')
  with pytest.raises(ValueError, match=r'Data_Entry_2017_v2020\.csv row 2 \(line 3\): 10 fields'):
    nih.read_data_entry(path)
  with bad_input.collecting() as skipped:
    rows = nih.read_data_entry(path)
  assert [r.row for r in rows] == [1, 3, 5, 6]
  assert len(skipped) == 2
  assert 'row 2 (line 3): 10 fields, expected 11' in skipped[0]
  assert "row 4: 'Finding Labels' has unknown label 'Pneumonai'" in skipped[1]
  assert not bad_input.skipping()  # the policy ends with the block
  with pytest.raises(ValueError, match='row 2'):
    nih.read_data_entry(path)


def test_chexpert_bad_rows_skipped(tmp_path):
  lines = (SHARED_DATA / 'chexpert' / 'CheXpert-v1.0-small' / 'valid.csv').read_text().splitlines()
  lines = lines[:6]
  fields = lines[2].split(',')
  fields[3] = 'Sideways'  # Frontal/Lateral
  lines[2] = ','.join(fields)
  lines[4] = lines[4] + ',extra'
  path = tmp_path / 'valid.csv'
  path.write_text('\n'.join(lines) + '\n')
  with pytest.raises(ValueError, match=r"valid\.csv row 2, column 'Frontal/Lateral': 'Sideways'"):
    chexpert.read_csv(path, views=('frontal', 'lateral'))
  with bad_input.collecting() as skipped:
    records = chexpert.read_csv(path, views=('frontal', 'lateral'))
  assert len(records) == 3
  assert len(skipped) == 2
  assert "valid.csv row 2, column 'Frontal/Lateral': 'Sideways'" in skipped[0]
  assert 'valid.csv row 4 (line 5): 20 fields, expected 19' in skipped[1]


def test_vindr_bad_label_value_skipped(tmp_path):
  path = tmp_path / 'image_labels_test.csv'
  path.write_text('image_id,rad_id,Aortic enlargement,No finding\na,R1,1,0\nb,R1,x,1\nc,R1,0,1\n')
  with pytest.raises(ValueError, match=r"row 2, column 'Aortic enlargement': 'x' is not 0 or 1"):
    vindr.read_image_labels(path)
  with bad_input.collecting() as skipped:
    readings = vindr.read_image_labels(path)
  assert sorted(readings.images) == ['a', 'c']
  assert len(skipped) == 1 and 'row 2' in skipped[0]


@pytest.fixture
def records(tmp_path):
  """Four records: readable, truncated PNG, missing file, readable (labels 0, 1, 2, 3)."""
  good = sorted((NIH_SAMPLE / 'images').iterdir())[:2]
  truncated = tmp_path / 'truncated.png'
  truncated.write_bytes(good[0].read_bytes()[:3000])
  paths = [good[0], truncated, tmp_path / 'missing.png', good[1]]
  return [
    Record(id=p.name, image=str(p), labels=np.array([float(i)], np.float32), patient_id=str(i))
    for i, p in enumerate(paths)
  ]


def _config(skip_bad: bool):
  config = densenet.get_config('smoke')
  config.data.sizes = (32,)
  config.data.labels = ('x',)
  config.train.global_batch_size = 4
  config.eval.batch_size = 4
  config.data.augment.enabled = False
  config.data.skip_bad = skip_bad
  return config


def test_training_batch_names_the_bad_image_or_substitutes_the_next_readable(records):
  with pytest.raises(UserError, match=r'truncated\.png: cannot read image .*data\.skip_bad=True'):
    next(iter(pipeline.train_dataset(records, _config(False))))
  iterator = iter(pipeline.train_dataset(records, _config(True)))
  batches = [next(iterator) for _ in range(3)]
  for batch in batches:
    # Every row holds a readable record; a bad one is replaced by the next readable record of the split.
    assert set(batch['index'].tolist()) <= {0, 3}
    np.testing.assert_array_equal(batch['labels'][:, 0], batch['index'])
  # A batch is one epoch: the truncated image's row passes over it and the missing one (2), the missing one's row
  # over itself (1).
  assert [int(b['skipped'].sum()) for b in batches] == [3, 3, 3]


def test_evaluation_leaves_bad_images_out(records):
  with pytest.raises(UserError, match=r'missing\.png: cannot read image'):
    list(pipeline.eval_dataset(records[2:], _config(False)))
  (batch,) = list(pipeline.eval_dataset(records, _config(True)))
  assert batch['valid'].tolist() == [True, False, False, True]
  assert batch['skipped'].tolist() == [0, 1, 1, 0]
  assert batch['image_32'][1].max() == 0


def _broken_nih_root(root: pathlib.Path) -> tuple[pathlib.Path, str]:
  """The 1,000-image 64 px set with one bad label row and one truncated test image; returns the image's id."""
  root.mkdir()
  for name in ('train_val_list.txt', 'test_list.txt', 'BBox_List_2017.csv'):
    (root / name).symlink_to(NIH_64PX / name)
  lines = (NIH_64PX / 'Data_Entry_2017_v2020.csv').read_text().splitlines()
  lines[10] = lines[10].rsplit(',', 2)[0]  # a row with too few fields
  (root / 'Data_Entry_2017_v2020.csv').write_text('\n'.join(lines) + '\n')
  test = set((NIH_64PX / 'test_list.txt').read_text().split())
  images = root / 'images'
  images.mkdir()
  names = sorted(p.name for p in (NIH_64PX / 'images').iterdir())
  bad = next(n for n in names if n in test)
  for name in names:
    if name == bad:
      shutil.copyfile(NIH_64PX / 'images' / name, images / name)
      data = (images / name).read_bytes()
      (images / name).write_bytes(data[: len(data) // 3])
    else:
      (images / name).symlink_to(NIH_64PX / 'images' / name)
  return root, bad


def test_run_with_skip_bad_counts_rows_and_images_in_metrics(tmp_path):
  root, bad = _broken_nih_root(tmp_path / 'nih')
  command = [
    sys.executable,
    '-m',
    'ms_cxr.main',
    '--config=configs/densenet.py:dataset=nih,smoke',
    f'--config.data.root={root}',
    '--config.train.num_steps=2',
    '--config.train.eval_every_steps=0',
    '--config.eval.bootstrap_resamples=0',
    '--mode=train_and_evaluate',
  ]
  strict = subprocess.run(
    [*command, f'--workdir={tmp_path / "strict"}'], cwd=REPO, capture_output=True, text=True
  )
  assert strict.returncode == 2
  assert strict.stderr.strip().splitlines()[-1].startswith('error: ')
  assert 'Data_Entry_2017_v2020.csv row 10 (line 11): 9 fields' in strict.stderr

  workdir = tmp_path / 'skip'
  run = subprocess.run(
    [*command, f'--workdir={workdir}', '--config.data.skip_bad=True'],
    cwd=REPO,
    capture_output=True,
    text=True,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads((workdir / 'eval' / 'test' / 'metrics.json').read_text())
  assert result['skipped_images'] == [bad]
  assert result['skipped_rows'] == 1
  predictions = (workdir / 'eval' / 'test' / 'predictions.csv').read_text().splitlines()
  assert len(predictions) - 1 == result['num_images']
  assert not any(line.startswith(bad + ',') for line in predictions)
  assert f'data.skip_bad: leaving out evaluation image: {root / "images" / bad}' in run.stderr
