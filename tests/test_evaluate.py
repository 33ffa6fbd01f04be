"""Evaluation of a workdir as `python -m ms_cxr.evaluate` sees it: its config.json, the command line, the config
checks evaluation makes (and the training-only ones it does not)."""

import json
import re

import pytest
from absl import flags

from ms_cxr import checkpointing, evaluate, models, parallel, train
from ms_cxr.errors import UserError


def _config_fields(config, prefix=''):
  """{dotted name: value} of every leaf field."""
  fields = {}
  for key, value in config.items():
    if hasattr(value, 'items'):
      fields.update(_config_fields(value, f'{prefix}{key}.'))
    else:
      fields[f'{prefix}{key}'] = value
  return fields


@pytest.fixture(scope='module')
def untrained_workdir(tmp_path_factory):
  """A smoke DenseNet's config.json, whose model.init_from no longer exists, and its initial state saved as
  step 1 (no training)."""
  from configs import densenet

  config = densenet.get_config('smoke')
  config.ckpt.async_save = False
  config.model.init_from = str(tmp_path_factory.mktemp('moved') / 'densenet121.pth')
  workdir = str(tmp_path_factory.mktemp('runs') / 'untrained')
  train.prepare_workdir(config, workdir)
  model = models.create_model(config.model, len(config.data.labels), config.data.sizes)
  state = train.create_train_state(
    config, model, train.config_optimizer(config), load_init_from=False
  )
  ckpt = checkpointing.Checkpointer(workdir, config.ckpt)
  ckpt.save(1, state, None, checkpointing.checkpoint_meta(config, step=1))
  ckpt.wait()
  ckpt.close()
  return workdir


def _quick(config):
  """A few images and no extras: what these tests check does not need them."""
  config.eval.max_images = 16
  config.eval.bootstrap_resamples = 0
  config.eval.plots = False
  config.eval.localization = False
  config.eval.heatmap_images = 0
  config.eval.val_thresholds = False
  return config


def test_workdir_config_has_tuples_wherever_the_defaults_do(untrained_workdir):
  from configs import base

  config = evaluate.load_workdir_config(untrained_workdir)
  defaults = _config_fields(base.get_config())
  loaded = _config_fields(config)
  tuple_fields = [name for name, value in defaults.items() if isinstance(value, tuple)]
  assert 'eval.tta' in tuple_fields and 'data.augment.scale_range' in tuple_fields
  for name in tuple_fields:
    assert isinstance(loaded[name], tuple), name
  assert loaded['data.sizes'] == (32,) and loaded['optim.step_boundaries'] == ()


@pytest.mark.parametrize('form', ['--workdir=DIR', '--workdir DIR'])
def test_command_line_loads_the_workdir_config_and_overrides_tuple_fields(untrained_workdir, form):
  workdir_args = [a.replace('DIR', untrained_workdir) for a in form.split(' ')]
  argv = [
    'evaluate',
    *workdir_args,
    '--config.eval.tta=hflip,zoom',
    '--config.data.augment.scale_range=(0.9, 1.1)',
  ]
  flag_values = flags.FlagValues()
  evaluate._define_flags(argv, flag_values)
  flag_values(argv)
  config = flag_values.config
  assert flag_values.workdir == untrained_workdir
  assert config.model.name == 'densenet_tiny' and config.data.sizes == (32,)
  assert config.parallel.coordinator_address == ''
  assert config.eval.tta == ('hflip,zoom',) and train.tta_views(config) == ('hflip', 'zoom')
  assert config.data.augment.scale_range == (0.9, 1.1)


@pytest.mark.parametrize('form', ['--config=FILE', '--config FILE'])
def test_command_line_config_file_in_either_form(form):
  argv = ['evaluate', *form.replace('FILE', 'configs/densenet.py:smoke').split(' '), '--workdir=x']
  flag_values = flags.FlagValues()
  evaluate._define_flags(argv, flag_values)
  flag_values(argv)
  assert flag_values.config.model.name == 'densenet_tiny'


def test_evaluation_needs_neither_init_from_nor_training_batch_checks(untrained_workdir):
  config = _quick(evaluate.load_workdir_config(untrained_workdir))
  with open(f'{untrained_workdir}/config.json') as f:
    assert json.load(f)['model']['init_from'] == config.model.init_from
  result = evaluate.evaluate(config, untrained_workdir)
  assert result['checkpoint_step'] == 1 and result['num_images'] == 16
  # A run trained on other devices: 3 images per device (of 2 here) do not split into 2 micro-batches.
  config.train.global_batch_size = 6
  config.train.accum_steps = (2,)
  with pytest.raises(UserError, match='accum_steps'):
    train.validate_config(config, parallel.DataParallel.create('shard_map', 0))
  assert evaluate.evaluate(config, untrained_workdir)['checkpoint_step'] == 1
  # What evaluation does use is still checked.
  config.eval.batch_size = 15
  with pytest.raises(
    UserError, match=r'config.eval.batch_size=15 must be a positive multiple of 2'
  ):
    evaluate.evaluate(config, untrained_workdir)


@pytest.mark.parametrize(
  'field, value, message',
  [
    (
      'iou_threshold',
      50,
      'config.eval.iou_threshold=50.0; expected a fraction of the map range in (0, 1]',
    ),
    ('iou_threshold', 0.0, 'config.eval.iou_threshold=0.0'),
    (
      'localization_grid',
      0,
      'config.eval.localization_grid=0; expected a positive number of pixels',
    ),
  ],
)
def test_localization_settings_are_checked_before_anything_loads(
  untrained_workdir, field, value, message
):
  config = _quick(evaluate.load_workdir_config(untrained_workdir))
  config.eval[field] = value
  with pytest.raises(UserError, match=re.escape(message)):
    evaluate.validate_eval_config(config, parallel.DataParallel.create('shard_map', 1))


@pytest.mark.parametrize(
  'overrides, refused',
  [
    ({'eval.checkpoint': 'best'}, 'eval.checkpoint=best'),
    ({'data.sizes': (32, 48), 'eval.fusion': 'best_on_val'}, 'eval.fusion=best_on_val'),
  ],
)
def test_nothing_is_chosen_on_the_split_being_scored(untrained_workdir, overrides, refused):
  config = _quick(evaluate.load_workdir_config(untrained_workdir))
  config.model.init_from = ''  # only the split check is under test here
  config.eval.split = config.eval.val_split = 'val'
  for name, value in overrides.items():
    section, field = name.split('.')
    config[section][field] = value
  with pytest.raises(
    UserError, match=r"config.eval.split='val' is also config.eval.val_split"
  ) as e:
    evaluate.evaluate(config, untrained_workdir)
  assert refused in str(e.value)


def test_the_validation_split_itself_may_be_scored_with_nothing_chosen_on_it(untrained_workdir):
  config = _quick(evaluate.load_workdir_config(untrained_workdir))
  config.model.init_from = ''
  config.eval.split = config.eval.val_split
  config.eval.checkpoint = 'best'
  config.eval.step = 1  # an explicit step: not the validation-chosen checkpoint
  config.eval.val_thresholds = True  # left out: they would be this split's own Youden points
  result = evaluate.evaluate(config, untrained_workdir)
  assert result['split'] == 'val'
  assert 'operating_points_val_threshold' not in result and result['operating_points']


def test_report_folder_names_the_checkpoint_and_is_replaced_whole(untrained_workdir, tmp_path):
  import os
  import shutil

  workdir = str(tmp_path / 'copy')
  shutil.copytree(untrained_workdir, workdir)
  config = _quick(evaluate.load_workdir_config(workdir))
  config.model.init_from = ''
  config.eval.step = 1
  evaluate.evaluate(config, workdir)
  report = os.path.join(workdir, 'eval', 'test_step1')
  assert os.path.isfile(os.path.join(report, 'metrics.json'))
  # A file of an earlier evaluation does not survive the next one in the same folder.
  stale = os.path.join(report, 'per_size.md')
  with open(stale, 'w') as f:
    f.write('an earlier evaluation\n')
  comparison = os.path.join(report, 'delong_copy_vs_other.md')
  with open(comparison, 'w') as f:
    f.write('a comparison\n')
  evaluate.evaluate(config, workdir)
  assert not os.path.exists(stale)
  assert open(comparison).read() == 'a comparison\n'  # compare's own results are kept
  folders = os.listdir(os.path.join(workdir, 'eval'))
  assert 'test_step1' in folders and not [f for f in folders if f.endswith(('.partial', '.old'))]

  config.eval.step = -1
  assert evaluate.report_name(config) == 'test'
  config.eval.checkpoint = 'best'
  assert evaluate.report_name(config) == 'test_best'
  config.eval.name = 'external'
  assert evaluate.report_name(config) == 'external'
  # What changes the numbers of a checkpoint's evaluation gets its own folder.
  config.eval.name = ''
  config.eval.tta = ('hflip,zoom',)
  assert evaluate.report_name(config) == 'test_tta-hflip-zoom_best'
  config.eval.tta = ()
  config.eval.fusion = 'max'
  assert evaluate.report_name(config) == 'test_best'  # one size: nothing is fused
  config.data.sizes = (32, 64)
  assert evaluate.report_name(config) == 'test_max_best'
  config.eval.ensemble_workdirs = 'a, b'
  config.eval.checkpoint = 'latest'
  assert (
    evaluate.report_name(config) == 'test_ensemble'
  )  # members fuse their sizes by mean probability


def test_an_ensemble_evaluated_into_a_member_keeps_the_members_own_report(
  untrained_workdir, tmp_path, monkeypatch
):
  """Two copies of one run as an ensemble, evaluated into the first: the member's report stays; the ensemble's
  has thresholds fixed on validation, and the evaluation's batch reaches the members."""
  import os
  import shutil

  members = [str(tmp_path / name) for name in ('a', 'b')]
  for member in members:
    shutil.copytree(untrained_workdir, member)
  config = _quick(evaluate.load_workdir_config(members[0]))
  config.model.init_from = ''
  own = evaluate.evaluate(config, members[0])
  config.eval.ensemble_workdirs = ','.join(members)
  config.eval.val_thresholds = True
  config.eval.batch_size = 6
  predict_run = evaluate._predict_run
  batches = []

  def recording(member_config, *args):
    batches.append(member_config.eval.batch_size)
    return predict_run(member_config, *args)

  monkeypatch.setattr(evaluate, '_predict_run', recording)
  ensemble = evaluate.evaluate(config, members[0])
  assert batches == [6, 6]  # the evaluation's batch, not the one each member was trained with
  assert {'test', 'test_ensemble'} <= set(os.listdir(os.path.join(members[0], 'eval')))
  with open(os.path.join(members[0], 'eval', 'test', 'metrics.json')) as f:
    assert json.load(f)['mean_auroc'] == own['mean_auroc']
  # Identical members: the ensemble is the member, and its thresholds come from validation.
  assert ensemble['mean_auroc'] == pytest.approx(own['mean_auroc'])
  assert [m['workdir'] for m in ensemble['ensemble']] == members
  assert set(ensemble['operating_points_val_threshold']) <= set(config.data.labels)
  assert ensemble['operating_points_val_threshold']


def test_main_evaluate_refuses_a_config_whose_model_differs_from_the_trained_one(untrained_workdir):
  """`main --mode=evaluate` with the config file again: a forgotten size or another model is an error, a
  change of how the model computes (remat) or of the evaluation is not."""
  config = evaluate.load_workdir_config(untrained_workdir)
  evaluate.check_trained_config(config, untrained_workdir)
  config.model.remat = True
  config.eval.split = 'val'
  evaluate.check_trained_config(config, untrained_workdir)
  config.data.sizes = (64,)
  config.model.bn_epsilon = 1e-3
  with pytest.raises(
    UserError,
    match=r'data.sizes \[32\] \(trained\) vs \[64\], model.bn_epsilon 1e-05 \(trained\) vs 0.001 '
    r'.*python -m ms_cxr.evaluate --workdir=',
  ):
    evaluate.check_trained_config(config, untrained_workdir)


def test_asking_for_the_best_checkpoint_of_a_run_that_never_validated(untrained_workdir):
  config = _quick(evaluate.load_workdir_config(untrained_workdir))
  config.eval.checkpoint = 'best'
  with pytest.raises(
    UserError, match=r'this run did not validate .*steps \[1\]: expected eval.checkpoint=latest'
  ):
    evaluate.evaluate(config, untrained_workdir)


def test_a_config_written_before_split_seed_keeps_its_split(tmp_path):
  """Before data.split_seed, data.seed chose the split too: such a workdir is evaluated on the split it was
  trained with."""
  from configs import densenet
  from ms_cxr import config_lib

  values = json.loads(config_lib.to_json(densenet.get_config('smoke')))
  del values['data']['split_seed']
  values['data']['seed'] = 3
  (tmp_path / 'config.json').write_text(json.dumps(values))
  config = evaluate.load_workdir_config(str(tmp_path))
  assert (config.data.seed, config.data.split_seed) == (3, 3)
  current = config_lib.upgrade_written({'data': {'seed': 3, 'split_seed': 0}})
  assert current['data']['split_seed'] == 0


def test_evaluation_restores_the_variables_whatever_the_optimizer_state(tmp_path):
  """An SSBN checkpoint whose Adam state has one step count (the layout before counts per parameter) still
  evaluates: evaluation restores the variables alone."""
  from configs import ssbn as ssbn_config

  config = ssbn_config.get_config('smoke')
  config.ckpt.async_save = False
  workdir = str(tmp_path / 'ssbn')
  train.prepare_workdir(config, workdir)
  model = models.create_model(config.model, len(config.data.labels), config.data.sizes)
  schedule = train.create_learning_rate_schedule(config.optim, config.train.num_steps)
  shared_count = train.create_optimizer(config.optim, schedule, count_per_leaf=False)
  state = train.create_train_state(config, model, shared_count, load_init_from=False)
  ckpt = checkpointing.Checkpointer(workdir, config.ckpt)
  ckpt.save(1, state, None, checkpointing.checkpoint_meta(config, step=1))
  ckpt.wait()
  ckpt.close()
  config = _quick(evaluate.load_workdir_config(workdir))
  result = evaluate.evaluate(config, workdir)
  assert result['checkpoint_step'] == 1 and len(result['per_size']) == 3
