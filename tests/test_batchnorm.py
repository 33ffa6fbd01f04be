"""batchnorm.BatchNorm against flax.linen.BatchNorm (+ ReLU): variables, outputs, statistics and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ms_cxr.models import batchnorm


class _Reference(nn.Module):
  use_running_average: bool = False
  axis_name: str | None = None
  relu: bool = False

  @nn.compact
  def __call__(self, x):
    y = nn.BatchNorm(
      self.use_running_average, momentum=0.9, epsilon=1e-5, axis_name=self.axis_name
    )(x)
    return nn.relu(y) if self.relu else y


class _Ours(nn.Module):
  use_running_average: bool = False
  axis_name: str | None = None
  relu: bool = False

  @nn.compact
  def __call__(self, x):
    return batchnorm.BatchNorm(
      self.use_running_average, momentum=0.9, epsilon=1e-5, axis_name=self.axis_name, relu=self.relu
    )(x)


def _inputs(shape=(4, 5, 6, 7)):
  x = jax.random.normal(jax.random.key(0), shape) * 2.0 + 0.5
  weights = jax.random.normal(jax.random.key(1), shape)
  return x, weights


def _trained_variables(module, x):
  """Variables with non-trivial scale, bias and running statistics (so every term of the gradient shows)."""
  variables = module.init(jax.random.key(0), x)
  params = jax.tree.map(
    lambda p: p + jnp.linspace(-0.4, 0.6, p.size).reshape(p.shape), variables['params']
  )
  stats = jax.tree.map(lambda s: s + jnp.linspace(0.1, 0.3, s.size), variables['batch_stats'])
  return {'params': params, 'batch_stats': stats}


@pytest.mark.parametrize('relu', [True, False])
@pytest.mark.parametrize('use_running_average', [False, True])
def test_same_variables_outputs_statistics_and_gradients_as_flax(relu, use_running_average):
  x, weights = _inputs()
  reference = _Reference(use_running_average, relu=relu)
  ours = _Ours(use_running_average, relu=relu)
  variables = _trained_variables(reference, x)
  init = ours.init(jax.random.key(0), x)
  assert jax.tree.structure(init) == jax.tree.structure(variables)
  for a, b in zip(
    jax.tree.leaves(init), jax.tree.leaves(reference.init(jax.random.key(0), x)), strict=True
  ):
    np.testing.assert_array_equal(a, b)

  def loss(module):
    def f(params, x):
      y, updates = module.apply({**variables, 'params': params}, x, mutable=['batch_stats'])
      return jnp.sum(y * weights), updates

    return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)

  (value, updates), grads = loss(ours)(variables['params'], x)
  (ref_value, ref_updates), ref_grads = loss(reference)(variables['params'], x)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(ref_updates), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))


def test_synchronised_statistics_and_gradients_match_flax_across_devices():
  """Under a mapped axis the batch statistics are averaged over devices, and so are their gradients' effect."""
  devices = jax.local_devices()[:2]
  if len(devices) < 2:
    pytest.skip('needs 2 devices (XLA_FLAGS=--xla_force_host_platform_device_count=2)')
  x, weights = _inputs((2, 4, 3, 3, 5))

  def grads_of(module_cls):
    module = module_cls(axis_name='batch', relu=True)
    variables = _trained_variables(module, x[0])

    def per_device(params, x, weights):
      def f(params, x):
        y, updates = module.apply({**variables, 'params': params}, x, mutable=['batch_stats'])
        return jnp.sum(y * weights), updates

      (value, updates), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, x)
      return value, updates, jax.lax.pmean(grads[0], 'batch'), grads[1]

    return jax.pmap(per_device, 'batch', in_axes=(None, 0, 0), devices=devices)(
      variables['params'], x, weights
    )

  ours, reference = grads_of(_Ours), grads_of(_Reference)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))


def test_bfloat16_output_with_float32_statistics():
  x, _ = _inputs()
  module = batchnorm.BatchNorm(dtype=jnp.bfloat16, relu=True)
  variables = module.init(jax.random.key(0), x)
  y, updates = module.apply(variables, x.astype(jnp.bfloat16), mutable=['batch_stats'])
  assert y.dtype == jnp.bfloat16
  assert updates['batch_stats']['mean'].dtype == jnp.float32
  reference = nn.relu(nn.BatchNorm(use_running_average=False).apply(variables, x, mutable=True)[0])
  np.testing.assert_allclose(np.asarray(y, np.float32), reference, rtol=2e-2, atol=2e-2)
  dx = jax.grad(lambda v: jnp.sum(module.apply(variables, v, mutable=True)[0]))(
    x.astype(jnp.bfloat16)
  )
  assert dx.dtype == jnp.bfloat16


class _GivenMoments(nn.Module):
  """_Ours, handed x's moments computed per part (the first 3 channels, the rest) and concatenated."""

  @nn.compact
  def __call__(self, x):
    parts = jnp.split(x, [3], axis=-1)
    moments = jnp.concatenate([batchnorm.moments(p) for p in parts], axis=-1)
    return batchnorm.BatchNorm(momentum=0.9, epsilon=1e-5, relu=True)(x, moments)


def test_given_moments_are_used_as_the_batch_statistics():
  """`moments` from the caller give exactly what BatchNorm computes itself: outputs, running-statistics updates
  and gradients (through the moments to x). A wrong shape is an error."""
  x, weights = _inputs()
  variables = _trained_variables(_Ours(relu=True), x)

  def run(module):
    def f(params, x):
      y, updates = module.apply({**variables, 'params': params}, x, mutable=['batch_stats'])
      return jnp.sum(y * weights), updates

    return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(variables['params'], x)

  (value, updates), grads = run(_GivenMoments())
  (ref_value, ref_updates), ref_grads = run(_Ours(relu=True))
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  for a, b in zip(
    jax.tree.leaves((updates, grads)), jax.tree.leaves((ref_updates, ref_grads)), strict=True
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(b).max()))
  with pytest.raises(ValueError, match=r'expected \(2, 7\)'):
    batchnorm.BatchNorm().init(jax.random.key(0), x, jnp.zeros((2, 6)))
