"""Size-specific BatchNorm: branches, parameter counts, and steps that leave other sizes untouched."""

import jax
import numpy as np
import optax
import pytest
from conftest import compiled_train_step, new_train_state

from ms_cxr import fusion, models, parallel, train
from ms_cxr.models import ssbn

SIZES = (32, 48, 64)
NUM_LABELS = 4


def _leaves(tree, size):
  return ssbn.select_size(jax.device_get(tree), size)


@pytest.fixture
def config():
  from configs import ssbn as ssbn_config

  config = ssbn_config.get_config('smoke')
  assert tuple(config.data.sizes) == SIZES
  config.data.labels = config.data.labels[:NUM_LABELS]
  return config


def test_full_ssbn_densenet121_has_the_papers_parameter_count():
  from configs import ssbn as ssbn_config

  config = ssbn_config.get_config('dataset=nih')
  model = models.create_model(config.model, 14, config.data.sizes)
  variables = jax.eval_shape(
    lambda: model.init(jax.random.key(0), np.zeros((1, 224, 224, 1), np.uint8), train=False)
  )
  count = train.count_params(variables['params'])
  # DenseNet-121 (6,968,206) plus a scale and shift for 41,824 BN channels at 2 more sizes.
  assert count == 6_968_206 + 2 * 83_648 == 7_135_502
  assert train.count_params(variables['batch_stats']) == 3 * 83_648


def test_every_branch_exists_in_both_collections_after_init(config):
  model = models.create_model(config.model, NUM_LABELS, SIZES)
  variables = model.init(jax.random.key(0), np.zeros((1, 32, 32, 1), np.uint8), train=False)
  norm0_params = variables['params']['norm0']
  norm0_stats = variables['batch_stats']['norm0']
  assert set(norm0_params) == set(norm0_stats) == {f'ssbn_{s}' for s in SIZES}
  assert set(norm0_params['ssbn_64']) == {'scale', 'bias'}
  assert set(norm0_stats['ssbn_64']) == {'mean', 'var'}
  per_size = {s: len(_leaves(variables['params'], s)) for s in SIZES}
  assert len(set(per_size.values())) == 1 and per_size[32] > 0


def test_ssbn_rejects_a_size_it_has_no_branch_for(config):
  model = models.create_model(config.model, NUM_LABELS, SIZES)
  variables = model.init(jax.random.key(0), np.zeros((1, 32, 32, 1), np.uint8), train=False)
  with pytest.raises(ValueError, match='size_px=40'):
    model.apply(variables, np.zeros((1, 40, 40, 1), np.uint8), train=False)


def _one_step(config, batch):
  dp = parallel.DataParallel.create('shard_map', 2)
  state = new_train_state(config, NUM_LABELS, SIZES)
  step = compiled_train_step(dp)
  before = jax.device_get(state)
  # Two steps, so Adam's moments of the trained size are non-zero and would move untouched params if unmasked.
  new = dp.replicate(state)
  for _ in range(2):
    new, _ = step(new, dp.shard_batch(batch))
  return before, jax.device_get(dp.unreplicate(new))


def _batch(sizes, n=4):
  rng = np.random.default_rng(0)
  batch = {f'image_{s}': rng.integers(0, 256, (n, s, s, 1), dtype=np.uint8) for s in sizes}
  batch['labels'] = (rng.random((n, NUM_LABELS)) < 0.5).astype(np.float32)
  return batch


def test_a_step_at_one_size_changes_only_that_sizes_branches(config):
  before, after = _one_step(config, _batch([48]))
  for size in SIZES:
    changed_stats = any(
      not np.array_equal(a, b)
      for a, b in zip(
        _leaves(before.batch_stats, size).values(),
        _leaves(after.batch_stats, size).values(),
        strict=True,
      )
    )
    assert changed_stats == (size == 48)
    for path, value in _leaves(before.params, size).items():
      if size == 48:
        continue
      np.testing.assert_array_equal(value, _leaves(after.params, size)[path])
  # Shared weights did train.
  assert not np.array_equal(before.params['conv0']['kernel'], after.params['conv0']['kernel'])
  assert not np.array_equal(
    before.params['norm0']['ssbn_48']['scale'], after.params['norm0']['ssbn_48']['scale']
  )


def test_round_robin_step_leaves_other_sizes_adam_moments_bit_identical(config):
  before, after = _one_step(config, _batch([64]))
  get = optax.tree_utils.tree_get
  for moment in ('mu', 'nu'):
    for size in (32, 48):
      for path, value in _leaves(get(before.opt_state, moment), size).items():
        np.testing.assert_array_equal(value, _leaves(get(after.opt_state, moment), size)[path])
    trained = _leaves(get(after.opt_state, moment), 64)
    assert any(np.any(v != 0) for v in trained.values())
  # Adam's step counts are per parameter: both steps counted for the shared weights and the 64 px branch only.
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
  (adam,) = [s for s in jax.tree.leaves(after.opt_state, is_leaf=is_adam) if is_adam(s)]
  assert int(adam.count['conv0']['kernel']) == 2
  for size in SIZES:
    assert {int(c) for c in _leaves(adam.count, size).values()} == {2 if size == 64 else 0}


def test_adam_bias_correction_counts_each_branchs_own_steps():
  """Round robin over two sizes with a constant gradient g: Adam's corrected moments are g and g^2, so every
  update is the learning rate times sign(g), for the branches as for the shared weights. A step count shared by
  all parameters would correct a branch's moments as if they had seen twice as many gradients."""
  params = {
    'conv': {'kernel': np.ones(3, np.float32)},
    'norm': {
      'ssbn_16': {'scale': np.ones(2, np.float32)},
      'ssbn_32': {'scale': np.ones(2, np.float32)},
    },
  }
  grads = jax.tree.map(lambda p: np.full_like(p, 0.5), params)
  optim = train.create_optimizer
  from configs import base

  for per_leaf in (True, False):
    tx = optim(base.get_config().optim, optax.constant_schedule(0.1), count_per_leaf=per_leaf)
    state, current, branch_updates = tx.init(params), params, []
    for step in range(30):
      size = (16, 32)[step % 2]
      mask = ssbn.size_mask(current, [size])
      updates, new_state = tx.update(grads, state, current)
      current = ssbn.keep_inactive(optax.apply_updates(current, updates), current, mask)
      state = ssbn.keep_inactive(new_state, state, ssbn.opt_state_mask(tx.init, state, mask))
      branch_updates.append(float(updates['norm'][f'ssbn_{size}']['scale'][0]))
      np.testing.assert_allclose(updates['conv']['kernel'], -0.1, rtol=1e-4)
    if per_leaf:
      np.testing.assert_allclose(branch_updates, -0.1, rtol=1e-4)
    else:
      assert min(branch_updates[-2:]) < -0.11  # 15 updates corrected as 30


def test_all_sizes_in_one_step_train_every_branch(config):
  before, after = _one_step(config, _batch(SIZES))
  for size in SIZES:
    assert not np.array_equal(
      before.params['norm5'][f'ssbn_{size}']['bias'], after.params['norm5'][f'ssbn_{size}']['bias']
    )


def test_replace_size_swaps_exactly_one_collection(config):
  model = models.create_model(config.model, NUM_LABELS, SIZES)
  a = model.init(jax.random.key(0), np.zeros((1, 32, 32, 1), np.uint8), train=False)['params']
  b = jax.tree.map(lambda x: x + 1.0, a)
  mixed = ssbn.replace_size(a, 48, b)
  for size, source in ((32, a), (48, b), (64, a)):
    for path, value in _leaves(mixed, size).items():
      np.testing.assert_array_equal(value, _leaves(source, size)[path])
  np.testing.assert_array_equal(mixed['conv0']['kernel'], a['conv0']['kernel'])


def test_fusion_rules_on_fixed_logits():
  logits = {
    224: np.array([[0.0, 2.0], [-1.0, 1.0]]),
    448: np.array([[2.0, -2.0], [1.0, 3.0]]),
  }
  sig = lambda x: 1 / (1 + np.exp(-np.asarray(x)))  # noqa: E731
  np.testing.assert_allclose(
    fusion.fuse(logits, 'mean_prob'), (sig(logits[224]) + sig(logits[448])) / 2
  )
  np.testing.assert_allclose(fusion.fuse(logits, 'mean_logit'), sig([[1.0, 0.0], [0.0, 2.0]]))
  np.testing.assert_allclose(fusion.fuse(logits, 'max'), sig([[2.0, 2.0], [1.0, 3.0]]))
  np.testing.assert_allclose(
    fusion.fuse(logits, 'best_on_val', best_size=[448, 224]),
    np.stack([sig(logits[448])[:, 0], sig(logits[224])[:, 1]], axis=1),
  )
  # Validation: label 0 is ranked right by 448 only, label 1 by 224 only.
  val_logits = {224: np.array([[1.0, 1.0], [0.0, 0.0]]), 448: np.array([[0.0, 0.0], [1.0, 1.0]])}
  val_targets = np.array([[0.0, 1.0], [1.0, 0.0]])
  assert fusion.best_size_per_label(val_logits, val_targets, ('a', 'b')) == [448, 224]


def test_step_sizes_schedules():
  from ms_cxr.data import pipeline

  assert [pipeline.step_sizes(i, SIZES, 'round_robin') for i in range(4)] == [
    (32,),
    (48,),
    (64,),
    (32,),
  ]
  assert pipeline.step_sizes(5, SIZES, 'all') == SIZES
  draws = [
    pipeline.step_sizes(i, SIZES, 'random', (0.0, 0.25, 0.75), seed=1)[0] for i in range(400)
  ]
  assert draws == [
    pipeline.step_sizes(i, SIZES, 'random', (0.0, 0.25, 0.75), seed=1)[0] for i in range(400)
  ]
  assert 32 not in draws and 0.65 < draws.count(64) / 400 < 0.85


def test_adding_a_size_trains_only_its_branch(tmp_path):
  from configs import ssbn as ssbn_config
  from ms_cxr import checkpointing

  base = ssbn_config.get_config('smoke,sizes=224+448')
  base.train.num_steps = 4
  base.train.eval_every_steps = 0
  base.ckpt.async_save = False
  assert tuple(base.data.sizes) == (32, 48)
  train.train_and_evaluate(base, str(tmp_path / 'two_sizes'))
  before = checkpointing.load_variables(str(tmp_path / 'two_sizes'))

  added = ssbn_config.get_config('smoke')
  added.train.num_steps = 4
  added.train.eval_every_steps = 0
  added.ckpt.async_save = False
  added.model.init_from = str(tmp_path / 'two_sizes')
  added.train.trainable_sizes = (64,)
  train.train_and_evaluate(added, str(tmp_path / 'three_sizes'))
  after = checkpointing.load_variables(str(tmp_path / 'three_sizes'))

  # Everything the two-size model had is unchanged, statistics included.
  for collection in ('params', 'batch_stats'):
    for size in (32, 48):
      for path, value in _leaves(before[collection], size).items():
        np.testing.assert_array_equal(value, _leaves(after[collection], size)[path])
  np.testing.assert_array_equal(
    before['params']['conv0']['kernel'], after['params']['conv0']['kernel']
  )
  np.testing.assert_array_equal(
    before['params']['classifier']['kernel'], after['params']['classifier']['kernel']
  )
  # The new branch started from the nearest trained size (48) and then trained.
  new_scale = after['params']['norm5']['ssbn_64']['scale']
  assert not np.array_equal(new_scale, np.ones_like(new_scale))
  assert not np.array_equal(new_scale, before['params']['norm5']['ssbn_48']['scale'])
  assert not np.array_equal(
    after['batch_stats']['norm5']['ssbn_64']['mean'],
    before['batch_stats']['norm5']['ssbn_48']['mean'],
  )


def test_transplant_starts_ssbn_from_a_single_scale_model():
  source = {'params': {'norm0': {'scale': np.full(3, 2.0)}, 'head': {'kernel': np.ones((2, 2))}}}
  target = {
    'params': {
      'norm0': {'ssbn_224': {'scale': np.ones(3)}, 'ssbn_448': {'scale': np.ones(3)}},
      'head': {'kernel': np.zeros((2, 5))},
    }
  }
  result, counts = ssbn.transplant(target, source)
  np.testing.assert_array_equal(result['params']['norm0']['ssbn_448']['scale'], np.full(3, 2.0))
  np.testing.assert_array_equal(result['params']['head']['kernel'], np.zeros((2, 5)))
  assert counts == {'copied': 2, 'kept': 1, 'kept_paths': ['params/head/kernel']}


def test_transplant_starts_a_single_scale_model_from_an_ssbn_one():
  """A plain BatchNorm takes the source's size branch nearest its own size, statistics included."""
  source = {
    'params': {'norm0': {f'ssbn_{s}': {'scale': np.full(3, float(s))} for s in (224, 448, 896)}},
    'batch_stats': {'norm0': {f'ssbn_{s}': {'mean': np.full(3, s + 0.5)} for s in (224, 448, 896)}},
  }
  target = {
    'params': {'norm0': {'scale': np.ones(3)}},
    'batch_stats': {'norm0': {'mean': np.zeros(3)}},
  }
  result, counts = ssbn.transplant(target, source, size_px=512)
  np.testing.assert_array_equal(result['params']['norm0']['scale'], np.full(3, 448.0))
  np.testing.assert_array_equal(result['batch_stats']['norm0']['mean'], np.full(3, 448.5))
  assert counts['kept'] == 0
  result, _ = ssbn.transplant(target, source)  # no size: the largest
  np.testing.assert_array_equal(result['params']['norm0']['scale'], np.full(3, 896.0))


def test_init_from_a_workdir_of_which_nothing_fits_is_an_error(tmp_path, monkeypatch):
  from ms_cxr import checkpointing
  from ms_cxr.errors import UserError

  other = {'params': {'conv0': {'kernel': np.ones((3, 3, 1, 8))}}}
  monkeypatch.setattr(checkpointing, 'load_variables', lambda workdir: other)
  target = {'params': {'conv0': {'kernel': np.zeros((7, 7, 1, 16))}}}
  with pytest.raises(UserError, match='none of its variables fits this model'):
    train.initialize_from(str(tmp_path), target)


def test_a_run_saved_with_one_adam_count_resumes_with_counts_per_parameter(tmp_path, monkeypatch):
  """A checkpoint whose Adam state has one step count (saved before the counts were per parameter) resumes:
  every parameter's count starts from the saved one, the moments are kept, and training goes on."""
  from configs import ssbn as ssbn_config
  from ms_cxr import checkpointing

  config = ssbn_config.get_config('smoke')
  config.train.num_steps = 3
  config.train.eval_every_steps = 0
  config.ckpt.async_save = False
  workdir = str(tmp_path / 'run')
  shared_count = lambda c: train.create_optimizer(  # noqa: E731
    c.optim, train.create_learning_rate_schedule(c.optim, c.train.num_steps), count_per_leaf=False
  )
  with monkeypatch.context() as patch:
    patch.setattr(train, 'config_optimizer', shared_count)
    train.train_and_evaluate(config, workdir)
  saved = checkpointing.load_variables(workdir)

  config.train.num_steps = 5
  state = train.train_and_evaluate(config, workdir)
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
  (adam,) = [
    s for s in jax.tree.leaves(jax.device_get(state.opt_state), is_leaf=is_adam) if is_adam(s)
  ]
  # Steps 4 and 5 ran round robin at two of the three sizes; the shared weights counted both.
  assert int(adam.count['conv0']['kernel']) == 5
  assert sorted(int(c) for c in jax.tree.leaves(adam.count['norm0'])) == [3, 3, 4, 4, 4, 4]
  assert not np.array_equal(saved['params']['conv0']['kernel'], state.params['conv0']['kernel'])
