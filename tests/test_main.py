"""The command line: summary, and one-line errors with a non-zero exit for bad input."""

import os

import pytest
from conftest import run_module


def _main(*args, env=None):
  return run_module('ms_cxr.main', *args, timeout=300, env=env)


def _last_line(result):
  return result.stderr.strip().splitlines()[-1]


def test_summary_prints_densenet121_parameter_count():
  result = _main('--config=configs/densenet.py:dataset=nih', '--mode=summary')
  assert result.returncode == 0, result.stderr
  assert 'params: 6968206' in result.stdout.splitlines()
  assert 'batch_stats: 83648' in result.stdout.splitlines()
  assert 'forward at 224 px: 5.20 GFLOP per image (a train step: 3x)' in result.stdout.splitlines()


def test_unknown_config_field_is_a_one_line_error(tmp_path):
  result = _main(
    '--config=configs/densenet.py:smoke', f'--workdir={tmp_path}', '--config.train.num_stepz=3'
  )
  assert result.returncode != 0
  assert 'num_stepz' in _last_line(result)
  assert not (tmp_path / 'config.json').exists()


def test_unknown_config_argument_is_an_error(tmp_path):
  result = _main('--config=configs/densenet.py:smok', f'--workdir={tmp_path}')
  assert result.returncode != 0
  assert "'smok' is unknown" in result.stderr


def test_evaluating_an_empty_workdir_is_a_one_line_error(tmp_path):
  result = _main('--config=configs/densenet.py:smoke', f'--workdir={tmp_path}', '--mode=evaluate')
  assert result.returncode == 2
  assert (
    _last_line(result)
    == f"error: no checkpoints in workdir '{tmp_path}' (train it first, or check the path)"
  )
  assert 'Traceback' not in result.stderr


def test_non_writable_workdir_is_a_one_line_error(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  result = _main('--config=configs/densenet.py:smoke', f'--workdir={blocker}/run')
  assert result.returncode == 2
  assert _last_line(result).startswith(f"error: workdir '{blocker}/run' is not writable")
  assert 'Traceback' not in result.stderr


@pytest.mark.parametrize('step', ['7'])
def test_missing_checkpoint_step_is_an_error_and_leaves_checkpoints(tmp_path, step):
  workdir = tmp_path / 'run'
  trained = _main(
    '--config=configs/densenet.py:smoke',
    f'--workdir={workdir}',
    '--mode=train',
    '--config.train.eval_every_steps=0',
  )
  assert trained.returncode == 0, trained.stderr[-2000:]
  before = sorted(os.listdir(workdir / 'checkpoints' / 'latest'))
  result = _main(
    '--config=configs/densenet.py:smoke',
    f'--workdir={workdir}',
    '--mode=evaluate',
    f'--config.eval.step={step}',
  )
  assert result.returncode == 2
  assert _last_line(result).startswith(f'error: no checkpoint at step {step} in ')
  assert sorted(os.listdir(workdir / 'checkpoints' / 'latest')) == before == ['12', '6']


def test_summary_of_ssbn_and_of_an_ensemble_of_three(tmp_path):
  from configs import densenet
  from ms_cxr import config_lib

  result = _main('--config=configs/ssbn.py:dataset=nih', '--mode=summary')
  assert result.returncode == 0, result.stderr
  assert 'params: 7135502' in result.stdout.splitlines()
  # One DenseNet-121 computation per size: 4x the positions, 4x the FLOPs (the classifier aside).
  for line in [
    'forward at 224 px: 5.20 GFLOP per image (a train step: 3x)',
    'forward at 448 px: 20.82 GFLOP per image (a train step: 3x)',
    'forward at 896 px: 83.26 GFLOP per image (a train step: 3x)',
  ]:
    assert line in result.stdout.splitlines()

  members = []
  for size in (224, 448, 896):
    member = tmp_path / f'densenet_{size}'
    member.mkdir()
    (member / 'config.json').write_text(
      config_lib.to_json(densenet.get_config(f'dataset=nih,size={size}'))
    )
    members.append(str(member))
  result = _main(
    '--config=configs/densenet.py:dataset=nih',
    '--mode=summary',
    f'--config.eval.ensemble_workdirs={",".join(members)}',
  )
  assert result.returncode == 0, result.stderr
  assert 'params: 20904618' in result.stdout.splitlines()


@pytest.mark.parametrize(
  'args, message',
  [
    (
      ['--mode=evaluate', '--config.parallel.api=pjit'],
      "error: config.parallel.api='pjit'; expected one of ('shard_map', 'pmap')",
    ),
    (
      ['--mode=train', '--config.ckpt.every_steps=0'],
      'error: config.ckpt.every_steps=0; expected a positive number of steps',
    ),
  ],
)
def test_bad_device_and_cadence_values_are_one_line_errors(tmp_path, args, message):
  result = _main('--config=configs/densenet.py:smoke', f'--workdir={tmp_path / "run"}', *args)
  assert result.returncode == 2
  assert _last_line(result) == message
  assert 'Traceback' not in result.stderr


def test_resuming_with_a_changed_batch_size_is_a_one_line_error(tmp_path):
  from test_resume_config import _trained_workdir

  from configs import densenet

  workdir = _trained_workdir(densenet.get_config('smoke'), tmp_path / 'run')
  result = _main(
    '--config=configs/densenet.py:smoke',
    f'--workdir={workdir}',
    '--config.train.global_batch_size=16',
  )
  assert result.returncode == 2
  assert _last_line(result).startswith(
    f"error: workdir '{workdir}' holds a run (checkpoint of step 6) trained with another config: "
    'train.global_batch_size 8 -> 16 '
  )
  assert 'Traceback' not in result.stderr


@pytest.mark.parametrize(
  'config, message',
  [
    ('configs/densenet.py:dataset=NIH', "config.data.dataset='NIH' is unknown"),
    ('configs/ssbn.py:sizes=224+abc', "sizes='224+abc': expected sizes in px joined by '+'"),
    ('configs/densenet.py:size=224,size=448', "config argument 'size' is given twice"),
    ('configs/densenet.py:demo,size=448', "config argument 'demo' sets size itself"),
    ('configs/ssbn.py:cpu,sizes=64+128', "config argument 'cpu' sets sizes itself"),
    ('configs/msanet.py:cpu,size=224', "config argument 'cpu' sets size itself"),
  ],
)
def test_config_arguments_that_cannot_be_honoured_are_one_line_errors(config, message):
  result = _main(f'--config={config}', '--mode=summary')
  assert result.returncode == 2
  assert message in _last_line(result) and 'Traceback' not in result.stderr
