"""The per-device step under shard_map and pmap on 2 fake CPU devices equals one device on the whole
batch."""

import jax
import numpy as np
import pytest
from conftest import compiled_train_step, new_train_state

from ms_cxr import losses, models, parallel

NUM_LABELS = 5


def _batches(num=3, batch=8, size=32):
  rng = np.random.default_rng(0)
  out = []
  for _ in range(num):
    labels = (rng.random((batch, NUM_LABELS)) < 0.3).astype(np.float32)
    labels[rng.random((batch, NUM_LABELS)) < 0.2] = np.nan  # unknown labels, unevenly spread
    out.append(
      {
        f'image_{size}': rng.integers(0, 256, (batch, size, size, 1), dtype=np.uint8),
        'labels': labels,
      }
    )
  return out


def _train(config, api, num_devices):
  dp = parallel.DataParallel.create(api, num_devices)
  state = dp.replicate(new_train_state(config, NUM_LABELS, (32,)))
  step = compiled_train_step(dp, donate_state=True)
  step_losses = []
  for batch in _batches():
    state, metrics = step(state, dp.shard_batch(batch))
    step_losses.append(float(np.ravel(metrics['loss'])[0]))
  state = dp.unreplicate(state)
  return jax.device_get({'params': state.params, 'batch_stats': state.batch_stats}), step_losses


def _max_diff(a, b):
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))


@pytest.fixture
def config(smoke_config):
  # SGD with momentum: its update is linear in the gradient, so float-level gradient differences
  # stay
  # float-level (Adam divides by sqrt(v) and magnifies noise on near-zero gradients).
  smoke_config.optim.name = 'sgd'
  smoke_config.optim.learning_rate = 0.1
  return smoke_config


def test_two_devices_match_one_device_with_synchronised_batchnorm(config):
  assert jax.device_count() == 2
  single, single_losses = _train(config, 'shard_map', 1)
  sharded, sharded_losses = _train(config, 'shard_map', 2)
  pmapped, pmapped_losses = _train(config, 'pmap', 2)
  assert _max_diff(sharded, pmapped) < 1e-6
  assert _max_diff(single, sharded) < 1e-4
  np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
  np.testing.assert_allclose(pmapped_losses, single_losses, rtol=1e-5)
  # The steps really trained: parameters and running statistics moved.
  assert single['batch_stats']['norm5']['mean'].std() > 0


def test_shard_map_and_pmap_agree_with_adam(smoke_config):
  sharded, _ = _train(smoke_config, 'shard_map', 2)
  pmapped, _ = _train(smoke_config, 'pmap', 2)
  assert _max_diff(sharded, pmapped) < 1e-6


def test_batch_that_does_not_split_over_devices_is_an_error():
  dp = parallel.DataParallel.create('shard_map', 2)
  with pytest.raises(ValueError, match='does not split over 2 devices'):
    dp.shard_batch({'x': np.zeros((3, 2))})


def test_gradient_accumulation_sums_micro_batch_gradients(config):
  """accum_steps=2: two sequential half batches, BN statistics per half, gradients of the global mean loss."""
  import jax.numpy as jnp
  import optax

  batch = _batches(num=1)[0]
  dp = parallel.DataParallel.create('shard_map', 1)
  state = new_train_state(config, NUM_LABELS, (32,))
  step = compiled_train_step(dp, accum_steps={32: 2})
  result, _ = step(dp.replicate(state), dp.shard_batch(batch))

  # Reference without scan or collectives: the same model applied to each half in turn.
  plain = models.create_model(config.model, NUM_LABELS, (32,))
  count = np.sum(~np.isnan(batch['labels']))

  def half_loss(params, stats, images, labels):
    logits, updates = plain.apply(
      {'params': params, 'batch_stats': stats}, images, train=True, mutable=['batch_stats']
    )
    return losses.masked_bce_sum(logits, labels)[0] / count, updates['batch_stats']

  stats, total = state.batch_stats, jax.tree.map(jnp.zeros_like, state.params)
  for half in (slice(0, 4), slice(4, 8)):
    (_, stats), g = jax.value_and_grad(half_loss, has_aux=True)(
      state.params, stats, batch['image_32'][half], batch['labels'][half]
    )
    total = jax.tree.map(jnp.add, total, g)
  updates, _ = state.tx.update(total, state.opt_state, state.params)
  expected = optax.apply_updates(state.params, updates)
  assert _max_diff(jax.device_get(result.params), jax.device_get(expected)) < 1e-5
  assert _max_diff(jax.device_get(result.batch_stats), jax.device_get(stats)) < 1e-5
