"""`python -m ms_cxr.data.summary` on label files alone."""

import json

import pytest
from conftest import SHARED_DATA, run_module


def _summary(*args):
  return run_module('ms_cxr.data.summary', *args, timeout=300)


@pytest.mark.skipif(not (SHARED_DATA / 'nih_64px').is_dir(), reason='../shared/data is not present')
def test_nih_summary_counts_splits_patients_and_labels():
  result = _summary('--dataset=nih', f'--root={SHARED_DATA / "nih_64px"}')
  assert result.returncode == 0, result.stderr
  summary = json.loads(result.stdout)
  splits = summary['splits']
  assert summary['num_images'] == 1000
  # Official split restricted to these images: 690 train_val (carved by patient into train/val) and 310 test.
  assert splits['train']['num_images'] + splits['val']['num_images'] == 690
  assert splits['test']['num_images'] == 310
  for split in splits.values():
    for counts in split['labels'].values():
      assert counts['positive'] + counts['negative'] + counts['unknown'] == split['num_images']
  effusion = sum(s['labels']['Effusion']['positive'] for s in splits.values())
  with open(SHARED_DATA / 'nih_64px' / 'Data_Entry_2017_v2020.csv') as f:
    expected = sum('Effusion' in line.split(',')[1] for line in f.readlines()[1:])
  assert effusion == expected


def test_summary_of_a_missing_root_is_a_one_line_error(tmp_path):
  result = _summary('--dataset=nih', f'--root={tmp_path}')
  assert result.returncode == 2
  assert result.stderr.strip().startswith('error: ')
  assert len(result.stderr.strip().splitlines()) == 1
