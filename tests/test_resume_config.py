"""Resuming a workdir under a changed config: refused with every changed field named, unless the field may change
(paths, readers, cadence, evaluation, checkpoints, devices); config.json then still records the run's config."""

import logging

import jax
import numpy as np
import pytest

from ms_cxr import checkpointing, evaluate, train
from ms_cxr.errors import UserError


def _trained_workdir(config, workdir, step: int = 6) -> str:
  """A workdir as a run leaves it: config.json and a latest checkpoint (a stand-in state; only that one exists
  matters here)."""
  workdir = str(workdir)
  train.prepare_workdir(config, workdir)
  ckpt_config = config.ckpt.copy_and_resolve_references()
  ckpt_config.async_save = False
  ckpt = checkpointing.Checkpointer(workdir, ckpt_config)
  ckpt.save(
    step, {'w': np.zeros(3, np.float32)}, None, checkpointing.checkpoint_meta(config, step=step)
  )
  ckpt.wait()
  ckpt.close()
  return workdir


def _changed(config, **fields):
  """A copy of `config` with {'section__field': value} set."""
  config = config.copy_and_resolve_references()
  for name, value in fields.items():
    *sections, field = name.split('__')
    node = config
    for section in sections:
      node = node[section]
    node[field] = value
  return config


def test_a_changed_config_is_refused_naming_every_field_and_config_json_is_kept(
  smoke_config, tmp_path
):
  workdir = _trained_workdir(smoke_config, tmp_path / 'run')
  before = open(f'{workdir}/config.json', 'rb').read()
  changed = _changed(
    smoke_config,
    train__global_batch_size=16,
    data__seed=1,
    optim__learning_rate=3e-3,
    data__sizes=(48,),
  )
  with pytest.raises(UserError) as raised:
    train.train_and_evaluate(changed, workdir)
  message = str(raised.value)
  assert '\n' not in message
  for change in (
    'train.global_batch_size 8 -> 16',
    'data.seed 0 -> 1',
    'optim.learning_rate 0.001 -> 0.003',
    'data.sizes [32] -> [48]',
  ):
    assert change in message
  assert 'checkpoint of step 6' in message
  assert f'--config.model.init_from={workdir}' in message
  assert open(f'{workdir}/config.json', 'rb').read() == before


@pytest.mark.parametrize(
  'fields',
  [
    # Grain keeps the data position per worker process: a position saved with 0 workers does not restore under 2.
    {'data__num_workers': 2},
    # From the native files to prepared shards (or back): other pixels, not a moved folder.
    {'data__prepared_dir': '/data/prepared'},
    {'data__augment__hflip': True},
    {'model__dtype': 'bfloat16'},
    {'train__seed': 1},
    {'train__loss': 'focal'},
    {'optim__schedule': 'cosine'},
  ],
)
def test_fields_that_shape_the_run_may_not_change(smoke_config, tmp_path, fields):
  workdir = _trained_workdir(smoke_config, tmp_path / 'run')
  (name,) = fields
  with pytest.raises(UserError, match=name.replace('__', '.') + ' '):
    train.prepare_workdir(_changed(smoke_config, **fields), workdir)


def test_paths_readers_cadence_evaluation_checkpoints_and_devices_may_change(
  smoke_config, tmp_path, caplog
):
  smoke_config.data.prepared_dir = '/old/prepared'
  workdir = _trained_workdir(smoke_config, tmp_path / 'run')
  changed = _changed(
    smoke_config,
    data__root='/moved/root',
    data__prepared_dir='/moved/prepared',
    data__read_threads=2,
    data__prefetch_batches=4,
    data__skip_bad=True,
    model__init_from='/elsewhere',
    model__remat=True,
    train__num_steps=24,
    train__log_every_steps=1,
    train__eval_every_steps=0,
    eval__batch_size=32,
    eval__map_size=32,
    ckpt__every_steps=3,
    ckpt__max_to_keep=5,
    ckpt__async_save=False,
    parallel__api='pmap',
    parallel__num_devices=1,
    parallel__compilation_cache_dir='/cache',
  )
  with caplog.at_level(logging.WARNING):
    train.prepare_workdir(changed, workdir)
  # The schedule is constant: a longer run changes no learning rate, so nothing to warn about.
  assert 'train.num_steps changed' not in caplog.text
  written = evaluate.load_workdir_config(workdir)
  assert written.train.num_steps == 24 and written.data.prepared_dir == '/moved/prepared'
  assert written.parallel.api == 'pmap'


def test_extending_a_cosine_run_warns_that_the_schedule_follows_the_new_length(
  smoke_config, tmp_path, caplog
):
  smoke_config.optim.schedule = 'cosine'
  workdir = _trained_workdir(smoke_config, tmp_path / 'run')
  with caplog.at_level(logging.WARNING):
    train.prepare_workdir(_changed(smoke_config, train__num_steps=24), workdir)
  assert 'train.num_steps changed from 12 to 24 on resuming from step 6: the cosine' in caplog.text


def test_a_workdir_without_a_checkpoint_starts_over_with_any_config(smoke_config, tmp_path):
  workdir = str(tmp_path / 'run')
  train.prepare_workdir(smoke_config, workdir)  # a run that stopped before its first checkpoint
  train.prepare_workdir(_changed(smoke_config, train__global_batch_size=16), workdir)
  assert evaluate.load_workdir_config(workdir).train.global_batch_size == 16


def test_every_process_refuses_and_only_process_0_writes(smoke_config, tmp_path, monkeypatch):
  """Each process of a multi-process run compares with the same config.json, so all refuse together (none is left
  waiting at a collective for one that stopped)."""
  workdir = _trained_workdir(smoke_config, tmp_path / 'run')
  before = open(f'{workdir}/config.json', 'rb').read()
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  with pytest.raises(UserError, match='data.seed 0 -> 1'):
    train.prepare_workdir(_changed(smoke_config, data__seed=1), workdir)
  train.prepare_workdir(_changed(smoke_config, train__num_steps=24), workdir)
  assert open(f'{workdir}/config.json', 'rb').read() == before


def test_a_nan_field_resumes_and_a_config_from_before_split_seed_keeps_its_seed(
  smoke_config, tmp_path
):
  config = _changed(smoke_config, data__chexpert__blank=float('nan'))
  workdir = _trained_workdir(config, tmp_path / 'run')
  train.check_resume_config(
    config.copy_and_resolve_references(), workdir
  )  # NaN then, NaN now: the same
  # A config.json written before data.split_seed: its data.seed chose the split, so that is the split seed.
  import json

  path = tmp_path / 'run' / 'config.json'
  values = json.loads(path.read_text())
  del values['data']['split_seed']
  values['data']['seed'] = 5
  path.write_text(json.dumps(values))
  with pytest.raises(UserError, match='data.split_seed 5 -> 0'):
    train.check_resume_config(_changed(config, data__seed=5), workdir)
  train.check_resume_config(_changed(config, data__seed=5, data__split_seed=5), workdir)
