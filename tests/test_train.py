"""End-to-end training on the synthetic set: resume equivalence, non-finite loss, evaluation
report."""

import csv
import json
import os

import jax
import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from ms_cxr import checkpointing, evaluate, losses, metrics, train
from ms_cxr.errors import UserError


def _final_params(workdir):
  """Parameters and batch statistics of the latest checkpoint, as host numpy."""
  import orbax.checkpoint as ocp

  with ocp.CheckpointManager(f'{workdir}/checkpoints/latest') as manager:
    step = manager.latest_step()
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
  return step, {'params': state['params'], 'batch_stats': state['batch_stats']}


def test_resumed_run_ends_where_an_uninterrupted_run_ends(smoke_config, tmp_path, monkeypatch):
  smoke_config.ckpt.async_save = False
  train.train_and_evaluate(smoke_config, str(tmp_path / 'straight'))

  # Preemption right after the step-6 checkpoint: the process dies, the same command runs again.
  original_save = checkpointing.Checkpointer.save

  def save_then_die(self, step, *args, best=False, **kwargs):
    original_save(self, step, *args, best=best, **kwargs)
    if step == 6 and not best:
      self.wait()
      raise KeyboardInterrupt('preempted')

  monkeypatch.setattr(checkpointing.Checkpointer, 'save', save_then_die)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(smoke_config, str(tmp_path / 'resumed'))
  assert _final_params(tmp_path / 'resumed')[0] == 6
  monkeypatch.setattr(checkpointing.Checkpointer, 'save', original_save)
  train.train_and_evaluate(smoke_config, str(tmp_path / 'resumed'))

  step_a, straight = _final_params(tmp_path / 'straight')
  step_b, resumed = _final_params(tmp_path / 'resumed')
  assert step_a == step_b == smoke_config.train.num_steps
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
    np.testing.assert_array_equal(a, b)
  # And training did change something: the restarted run is not trivially equal to its initial
  # state.
  assert not np.allclose(straight['params']['classifier']['kernel'], 0)


def test_non_finite_loss_stops_with_the_step_and_keeps_checkpoints(
  smoke_config, tmp_path, monkeypatch
):
  smoke_config.ckpt.async_save = False
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(smoke_config, workdir)
  before = _final_params(workdir)

  # Extended by 6 steps (a resumed run may change num_steps) with a loss that turns NaN.
  smoke_config.train.num_steps = 18
  classification_loss = losses.classification_loss
  nan_weights = (float('nan'),) * len(smoke_config.data.labels)
  monkeypatch.setattr(
    losses,
    'classification_loss',
    lambda name, **kwargs: classification_loss(name, **{**kwargs, 'label_weights': nan_weights}),
  )
  with pytest.raises(train.NonFiniteLossError, match='at step 13'):
    train.train_and_evaluate(smoke_config, workdir)
  after = _final_params(workdir)
  assert after[0] == before[0] == 12
  for a, b in zip(jax.tree.leaves(before[1]), jax.tree.leaves(after[1]), strict=True):
    np.testing.assert_array_equal(a, b)


def test_an_update_that_diverges_stops_before_it_is_validated_or_saved(smoke_config, tmp_path):
  """A finite loss with an update that blows the parameters up (SGD at 1e30): the step's state is neither scored
  on validation (which would fail on NaN probabilities) nor kept as the last good checkpoint."""
  config = smoke_config
  config.ckpt.async_save = False
  config.optim.name = 'sgd'
  config.optim.learning_rate = 1e30
  config.optim.schedule = 'constant'
  config.train.eval_every_steps = 1
  workdir = str(tmp_path / 'run')
  with pytest.raises(
    train.NonFiniteLossError,
    match=r'parameters diverged \(L2 norm inf\) at step 1; stopping. No checkpoint had been saved yet',
  ):
    train.train_and_evaluate(config, workdir)
  assert checkpointing.latest_step(workdir) is None
  assert not os.listdir(os.path.join(workdir, 'checkpoints', 'best'))


def test_best_checkpoint_ahead_of_the_resumed_step_is_replaced_not_collided_with(
  smoke_config, tmp_path, monkeypatch
):
  """A run stopped between a validation step's best save and its latest save leaves best/ ahead of latest/. The
  resumed run discards that checkpoint, so when the replayed step scores higher (as a replay whose reductions are
  not bit-reproducible can) its best save does not meet the step already there."""
  config = smoke_config
  config.ckpt.async_save = False
  config.train.num_steps = 6
  config.ckpt.every_steps = 3
  config.train.eval_every_steps = 6
  workdir = str(tmp_path / 'run')
  original_save = checkpointing.Checkpointer.save

  def save_best_then_die(self, step, *args, best=False, **kwargs):
    original_save(self, step, *args, best=best, **kwargs)
    if best:
      self.wait()
      raise KeyboardInterrupt('preempted')

  def saved(workdir):
    ckpt = checkpointing.Checkpointer(workdir, config.ckpt, read_only=True)
    try:
      return ckpt.latest_step(), ckpt.best_step(), ckpt.best_score()
    finally:
      ckpt.close()

  monkeypatch.setattr(checkpointing.Checkpointer, 'save', save_best_then_die)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, workdir)
  latest, best, first_score = saved(workdir)
  assert (latest, best) == (3, 6) and first_score is not None

  monkeypatch.setattr(checkpointing.Checkpointer, 'save', original_save)
  mean_auroc = metrics.mean_auroc
  monkeypatch.setattr(metrics, 'mean_auroc', lambda per_class: mean_auroc(per_class) + 0.01)
  train.train_and_evaluate(config, workdir)
  latest, best, score = saved(workdir)
  assert (latest, best) == (6, 6)
  assert score == pytest.approx(first_score + 0.01)


@pytest.mark.parametrize(
  'fields, message',
  [
    ({'ckpt.every_steps': 0}, r'config\.ckpt\.every_steps=0; expected a positive number of steps$'),
    ({'train.log_every_steps': 0}, r'config\.train\.log_every_steps=0; expected a positive'),
    ({'train.eval_every_steps': -1}, r'config\.train\.eval_every_steps=-1; expected .*0 = never'),
    (
      {'parallel.api': 'pjit'},
      r"config\.parallel\.api='pjit'; expected one of \('shard_map', 'pmap'\)",
    ),
    ({'parallel.num_devices': 3}, r'config\.parallel\.num_devices=3; expected 0 .* 2 device'),
    ({'parallel.num_devices': -1}, r'config\.parallel\.num_devices=-1; expected 0'),
    (
      {'train.loss': 'focal', 'train.label_weights': 1.0},  # one weight per label
      r"config\.train\.label_weights is set but config\.train\.loss='focal'; expected loss 'bce'",
    ),
    (
      {'model.norm': 'ssbn', 'data.sizes': (32, 48), 'eval.map_size': 40},
      r'config\.eval\.map_size=40; .*data\.sizes \(32, 48\).*expected one of them',
    ),
    ({'eval.map_size': 8}, r'config\.eval\.map_size=8; expected a size of at least 16 px'),
  ],
)
def test_bad_values_are_one_line_errors_before_anything_runs(
  smoke_config, tmp_path, fields, message
):
  for name, value in fields.items():
    section, field = name.split('.')
    if name == 'train.label_weights':
      value = (value,) * len(smoke_config.data.labels)
    smoke_config[section][field] = value
  with pytest.raises(UserError, match=message):
    train.train_and_evaluate(smoke_config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


@pytest.fixture(scope='module')
def trained_workdir(tmp_path_factory):
  from configs import densenet

  config = densenet.get_config('smoke')
  workdir = str(tmp_path_factory.mktemp('trained'))
  train.train_and_evaluate(config, workdir)
  return config, workdir


def test_metrics_json_equals_sklearn_on_predictions_csv(trained_workdir):
  config, workdir = trained_workdir
  result = evaluate.evaluate(config, workdir)
  with open(f'{workdir}/eval/test/metrics.json') as f:
    written = json.load(f)
  assert written == json.loads(json.dumps(result))
  assert written['checkpoint_step'] == config.train.num_steps
  assert written['num_images'] == config.data.synthetic.num_test
  with open(f'{workdir}/eval/test/predictions.csv') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == written['num_images'] and len({r['id'] for r in rows}) == len(rows)
  aurocs = []
  for label in written['labels']:
    targets = [float(r[f'{label}_target']) for r in rows if r[f'{label}_target'] != '']
    probs = [float(r[f'{label}_prob']) for r in rows if r[f'{label}_target'] != '']
    if len(set(targets)) < 2:
      assert written['per_class_auroc'][label] is None
      continue
    expected = sk_metrics.roc_auc_score(targets, probs)
    assert written['per_class_auroc'][label] == pytest.approx(expected, abs=1e-12)
    aurocs.append(expected)
  assert written['mean_auroc'] == pytest.approx(np.mean(aurocs), abs=1e-12)


def _val_mean_auroc(config, workdir, step):
  """Mean AUROC of checkpoint `step` on the validation split, as the run scored it to keep its best."""
  config = config.copy_and_resolve_references()
  config.eval.split = config.eval.val_split
  config.eval.step = step
  config.eval.name = f'val_step{step}'
  config.eval.val_thresholds = False
  config.eval.bootstrap_resamples = 0
  config.eval.plots = False
  config.eval.localization = False
  config.eval.heatmap_images = 0
  return evaluate.evaluate(config, workdir)['mean_auroc']


def test_evaluate_best_and_specific_steps(trained_workdir):
  config, workdir = trained_workdir
  config = config.copy_and_resolve_references()
  # Validation ran at steps 6 and 12; a later step becomes the best only with a strictly higher AUROC.
  val_auroc = {step: _val_mean_auroc(config, workdir, step) for step in (6, 12)}
  expected_best = 12 if val_auroc[12] > val_auroc[6] else 6
  ckpt = checkpointing.Checkpointer(workdir, config.ckpt, read_only=True)
  try:
    recorded = ckpt.best_score()
  finally:
    ckpt.close()
  assert recorded == pytest.approx(val_auroc[expected_best], abs=1e-6)
  config.eval.checkpoint = 'best'
  config.eval.name = 'best'
  assert evaluate.evaluate(config, workdir)['checkpoint_step'] == expected_best
  config.eval.checkpoint = 'latest'
  config.eval.name = 'latest'
  assert evaluate.evaluate(config, workdir)['checkpoint_step'] == config.train.num_steps == 12
  config.eval.step = 6
  config.eval.name = 'step6'
  assert evaluate.evaluate(config, workdir)['checkpoint_step'] == 6
  config.eval.step = 7
  with pytest.raises(UserError, match=r'no checkpoint at step 7 .*available steps: \[6, 12\]'):
    evaluate.evaluate(config, workdir)


def test_mismatched_checkpoint_is_refused(trained_workdir):
  config, workdir = trained_workdir
  config = config.copy_and_resolve_references()
  config.data.labels = tuple(config.data.labels[:3])
  with pytest.raises(UserError, match='was written with labels='):
    evaluate.evaluate(config, workdir)


def test_report_files_and_byte_identical_reevaluation(trained_workdir):
  config, workdir = trained_workdir
  config = config.copy_and_resolve_references()
  config.eval.name = 'twice'
  evaluate.evaluate(config, workdir)
  first = open(f'{workdir}/eval/twice/metrics.json', 'rb').read()
  evaluate.evaluate(config, workdir)
  assert open(f'{workdir}/eval/twice/metrics.json', 'rb').read() == first
  result = json.loads(first)
  for key in ('per_class_auroc_ci', 'per_class_ap', 'mean_auroc_ci', 'operating_points'):
    assert key in result
  for label, value in result['per_class_auroc'].items():
    interval = result['per_class_auroc_ci'][label]
    assert (value is None) == (interval is None)
    if interval is not None:
      assert interval[0] <= interval[1]
  table = open(f'{workdir}/eval/twice/table.md').read()
  assert '| mean AUROC |' in table and f'{result["mean_auroc"]:.4f}' in table
  rows = list(csv.reader(open(f'{workdir}/eval/twice/table.csv')))
  assert rows[0][0] == 'label' and [r[0] for r in rows[1:-2]] == result['labels']


def test_remat_keeps_dense_block_memory_linear(monkeypatch):
  """With remat the dense layers concatenate their inputs themselves, so the backward pass keeps each feature map
  once instead of every layer's growing concatenation. XLA's analysis of the compiled step (nothing runs): a
  narrow DenseNet with four 6-layer blocks at 128 px, batch 4, needs 0.74x the temporaries with remat (DenseNet-121
  at 896 px needs 0.49x, README; densenet_small's 2-6 layer blocks gain too little to tell, 0.92x). Without remat
  it would be 1.0x: a layer whose BatchNorm+ReLU keeps its written-out gradient under remat was not
  rematerialised by XLA (batchnorm.BatchNorm.custom_gradient)."""
  from configs import densenet as densenet_config
  from ms_cxr.models import densenet

  monkeypatch.setitem(
    densenet.PRESETS,
    'densenet_6x4',
    dict(block_sizes=(6, 6, 6, 6), growth_rate=16, num_init_features=32, bn_size=4),
  )
  temporaries = {}
  for remat in (False, True):
    config = densenet_config.get_config('smoke')
    config.model.name = 'densenet_6x4'
    config.model.remat = remat
    config.train.global_batch_size = 4
    config.data.sizes = (128,)
    temporaries[remat] = train.train_step_memory(config, 128)['temp_bytes']
  assert temporaries[True] <= 0.85 * temporaries[False]


def test_memory_summary_compiles_the_training_step_with_its_attention_terms():
  """The attention-consistency loss runs the transformed copy of the batch beside it, so MS-ANet's step with it
  needs more memory; the summary (`--mode=summary --memory`) compiles the step training runs, terms included."""
  from configs import msanet

  temporaries = {}
  for consistency in (0.0, 1.0):
    config = msanet.get_config(f'smoke,consistency={consistency}')
    config.train.global_batch_size = 4
    size = config.data.sizes[0]
    temporaries[consistency] = train.train_step_memory(config, size)['temp_bytes']
  assert temporaries[1.0] > 1.3 * temporaries[0.0]
