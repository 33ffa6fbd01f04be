"""DenseNet: parameter counts of the published architecture, dtypes, input normalisation, the fast paths."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ms_cxr.models import batchnorm, densenet


def _variables(model, size=64):
  return jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 1), jnp.uint8), train=False)
  )


def _count(tree):
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def test_densenet121_has_torchvision_parameter_count():
  variables = _variables(densenet.DenseNet(num_classes=14, **densenet.PRESETS['densenet121']))
  assert _count(variables['params']) == 6_968_206
  # Running mean and variance for each of the 41,824 BatchNorm channels.
  assert _count(variables['batch_stats']) == 83_648
  assert variables['params']['classifier']['kernel'].shape == (1024, 14)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = densenet.DenseNet(num_classes=3, dtype=jnp.bfloat16, **densenet.PRESETS['densenet_tiny'])
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 32, 32, 1)), jnp.uint8)
  variables = model.init(jax.random.key(0), images, train=False)
  assert {x.dtype for x in jax.tree.leaves(variables['params'])} == {jnp.dtype(jnp.float32)}
  logits = model.apply(variables, images, train=False)
  assert logits.dtype == jnp.float32
  reference = densenet.DenseNet(num_classes=3, **densenet.PRESETS['densenet_tiny']).apply(
    variables, images, train=False
  )
  np.testing.assert_allclose(logits, reference, atol=0.1)


def test_normalize_images_repeats_gray_over_channels_with_imagenet_stats():
  images = jnp.asarray([[[[0]], [[255]]]], jnp.uint8)  # [1, 2, 1, 1]
  out = np.asarray(densenet.normalize_images(images))
  assert out.shape == (1, 2, 1, 3)
  np.testing.assert_allclose(
    out[0, 0, 0], -np.array(densenet.IMAGENET_MEAN) / densenet.IMAGENET_STD, rtol=1e-6
  )
  np.testing.assert_allclose(
    out[0, 1, 0], (1 - np.array(densenet.IMAGENET_MEAN)) / densenet.IMAGENET_STD, rtol=1e-6
  )


def test_remat_gives_the_same_gradients():
  kwargs = dict(num_classes=2, **densenet.PRESETS['densenet_tiny'])
  images = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 32, 32, 1)), jnp.uint8)
  plain, remat = densenet.DenseNet(**kwargs), densenet.DenseNet(remat=True, **kwargs)
  variables = plain.init(jax.random.key(0), images, train=False)

  def grads(model):
    def loss(params):
      logits, _ = model.apply(
        {**variables, 'params': params}, images, train=True, mutable=['batch_stats']
      )
      return jnp.sum(logits**2)

    return jax.grad(loss)(variables['params'])

  # Up to float32 rounding: rematerialised layers take BatchNorm+ReLU's gradient from autodiff, the others from
  # batchnorm.normalize_relu (the same function, summed in another order). The last block normalises 2 values per
  # channel (batch 2, 1 x 1 px), which amplifies rounding to a few 1e-4 of the largest gradient.
  expected, actual = jax.tree.leaves(grads(plain)), jax.tree.leaves(grads(remat))
  largest = max(float(np.abs(b).max()) for b in expected)
  for a, b in zip(actual, expected, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * largest)


def _module_types(model, images):
  """The classes of the modules `model.init` calls."""
  seen = set()

  def record(next_fun, args, kwargs, context):
    seen.add(type(context.module))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    model.init(jax.random.key(0), images, train=False)
  return seen


@pytest.mark.parametrize(
  'shape, window, strides, padding',
  [
    ((2, 9, 10, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),
    ((1, 8, 8, 2), (2, 3), (1, 2), ((0, 1), (1, 1))),
  ],
)
def test_max_pool_matches_flax_values_and_gradients(shape, window, strides, padding):
  x = jax.random.normal(jax.random.key(0), shape)  # no ties
  weights = jax.random.normal(jax.random.key(1), nn.max_pool(x, window, strides, padding).shape)

  def loss(pool):
    return lambda v: jnp.sum(pool(v) * weights)

  ours = lambda v: densenet.max_pool(v, window, strides, padding)  # noqa: E731
  theirs = lambda v: nn.max_pool(v, window, strides=strides, padding=padding)  # noqa: E731
  np.testing.assert_array_equal(ours(x), theirs(x))
  np.testing.assert_allclose(jax.grad(loss(ours))(x), jax.grad(loss(theirs))(x), rtol=1e-6)


def test_max_pool_gradient_goes_to_the_first_maximum_of_each_window():
  """Ties (the stem pools ReLU outputs, so zeros tie) send the gradient to the first maximum in row-major window
  order, as torch's MaxPool2d does: overlapping windows here each pick their own first maximum."""
  x = jnp.array([[5.0, 5.0, 1.0], [5.0, 2.0, 5.0], [1.0, 5.0, 5.0]]).reshape(1, 3, 3, 1)
  y, vjp = jax.vjp(lambda v: densenet.max_pool(v, (2, 2), (1, 1), ((0, 0), (0, 0))), x)
  np.testing.assert_array_equal(y[0, :, :, 0], [[5.0, 5.0], [5.0, 5.0]])
  (dx,) = vjp(jnp.array([1.0, 10.0, 100.0, 1000.0]).reshape(1, 2, 2, 1))
  # Windows (row-major): top-left and bottom-left pick (0, 0) and (1, 0); top-right picks (0, 1); bottom-right
  # picks (1, 2).
  np.testing.assert_array_equal(
    dx[0, :, :, 0], [[1.0, 10.0, 0.0], [100.0, 0.0, 1000.0], [0.0, 0.0, 0.0]]
  )


@pytest.mark.parametrize(
  'fast', [dict(pointwise_matmul=True), dict(kernel_grad_matmul=True)], ids=lambda f: next(iter(f))
)
def test_convolution_fast_paths_keep_the_parameters_and_the_function(fast):
  """1x1 convolutions as matrix products, 3x3 ones with their kernel gradient as one matrix product: the same
  variables (names, shapes, initial values) as nn.Conv, and the same logits and gradients up to float32
  rounding."""
  kwargs = dict(num_classes=3, **densenet.PRESETS['densenet_tiny'])
  images = jnp.asarray(np.random.default_rng(2).integers(0, 256, (4, 64, 64, 1)), jnp.uint8)
  plain = dict(pointwise_matmul=False, kernel_grad_matmul=False)
  as_conv = densenet.DenseNet(**plain, **kwargs)
  as_matmul = densenet.DenseNet(**{**plain, **fast}, **kwargs)
  fast_module = densenet.PointwiseConv if 'pointwise_matmul' in fast else densenet.SameConv
  assert fast_module in _module_types(as_matmul, images)
  assert fast_module not in _module_types(as_conv, images)
  variables = as_conv.init(jax.random.key(0), images, train=False)
  same = as_matmul.init(jax.random.key(0), images, train=False)
  assert jax.tree.structure(same) == jax.tree.structure(variables)
  for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(variables), strict=True):
    np.testing.assert_array_equal(a, b)
  assert variables['params']['transition1_conv']['kernel'].shape[:2] == (1, 1)

  def logits(model, params, train):
    return model.apply(
      {**variables, 'params': params}, images, train=train, mutable=['batch_stats']
    )[0]

  # Training mode (batch statistics): the same logits.
  np.testing.assert_allclose(
    logits(as_matmul, variables['params'], True),
    logits(as_conv, variables['params'], True),
    rtol=1e-4,
    atol=1e-5,
  )
  # Inference mode: the same loss and gradients.
  grads = [
    jax.value_and_grad(lambda p, m=m: jnp.sum(logits(m, p, False) ** 2))(variables['params'])
    for m in (as_conv, as_matmul)
  ]
  np.testing.assert_allclose(grads[0][0], grads[1][0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads[0][1]), jax.tree.leaves(grads[1][1]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.abs(b).max()))


@pytest.mark.parametrize('max_positions', [10**6, 0], ids=['taps', 'convolution'])
def test_same_conv_matches_the_convolution_with_its_gradients(max_positions, monkeypatch):
  """`same_conv` (on the CPU: one product over all taps then shifted sums up to TAPS_MAX_POSITIONS, XLA's
  convolution above; the gradients as products with the tap-shifted output gradient) against
  lax.conv_general_dilated."""
  monkeypatch.setattr(densenet, 'TAPS_MAX_POSITIONS', max_positions)
  size = 8
  x = jax.random.normal(jax.random.key(0), (2, size, size + 1, 5))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 5, 4))
  weights = jax.random.normal(jax.random.key(2), (2, size, size + 1, 4))

  def reference(x, kernel):
    return jax.lax.conv_general_dilated(
      x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )

  def loss(conv):
    return jax.jit(jax.value_and_grad(lambda x, k: jnp.sum(conv(x, k) * weights), argnums=(0, 1)))

  np.testing.assert_allclose(
    densenet.same_conv(x, kernel), reference(x, kernel), rtol=1e-5, atol=1e-5
  )
  (value, grads), (ref_value, ref_grads) = (
    loss(densenet.same_conv)(x, kernel),
    loss(reference)(x, kernel),
  )
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for a, b in zip(grads, ref_grads, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))


class _Features(nn.Module):
  """`densenet.dense_features` in training mode, with each feature map's batch moments shared or not."""

  shared_moments: bool

  @nn.compact
  def __call__(self, x):
    norm = functools.partial(batchnorm.BatchNorm, use_running_average=False)
    return densenet.dense_features(
      x,
      block_sizes=(3, 2),
      growth_rate=4,
      num_init_features=6,
      bn_size=2,
      compression=0.5,
      last_block=2,
      norm=norm,
      conv=densenet.conv_factory(jnp.float32, True, True),
      remat=False,
      moments=densenet.block_moments(True, None) if self.shared_moments else None,
    )


def test_shared_feature_moments_give_the_same_function_statistics_and_gradients():
  """Each feature map's batch moments computed once and handed to every later BatchNorm over it: the same
  outputs, running-statistics updates and gradients as every BatchNorm reducing over its whole input."""
  x = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
  shared, alone = _Features(True), _Features(False)
  variables = alone.init(jax.random.key(1), x)

  def run(model):
    def f(params, x):
      out, updates = model.apply({**variables, 'params': params}, x, mutable=['batch_stats'])
      return sum(jnp.sum(jnp.sin(v)) for v in out.values()), updates

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(variables['params'], x)

  (value, updates), grads = run(shared)
  (ref_value, ref_updates), ref_grads = run(alone)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(ref_updates), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Up to float32 rounding, relative to the largest gradient: norm0's scale gradient nearly cancels (3e-4 where
  # others reach 40), so its own relative error is large for the same absolute rounding.
  largest = max(float(np.abs(b).max()) for b in jax.tree.leaves(ref_grads))
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * largest)


@pytest.mark.parametrize(
  'patch_bytes', [densenet.PATCH_BYTES, 2**10], ids=['at_once', 'band_by_band']
)
def test_patch_grad_conv_matches_the_convolution_with_its_gradients(patch_bytes, monkeypatch):
  """`patch_grad_conv` (the stem's 7x7 stride-2 convolution; on the CPU its kernel gradient as a product of the
  input's patches with the output gradient, all at once or one band of output rows at a time) against
  lax.conv_general_dilated: values and both gradients."""
  monkeypatch.setattr(densenet, 'PATCH_BYTES', patch_bytes)
  x = jax.random.normal(jax.random.key(0), (2, 17, 14, 3))
  kernel = jax.random.normal(jax.random.key(1), (7, 7, 3, 4))
  strides, padding = (2, 2), ((3, 3), (3, 3))

  def reference(x, kernel):
    return jax.lax.conv_general_dilated(
      x, kernel, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )

  def ours(x, kernel):
    return densenet.patch_grad_conv(x, kernel, strides, padding)

  weights = jax.random.normal(jax.random.key(2), reference(x, kernel).shape)

  def loss(conv):
    return jax.jit(jax.value_and_grad(lambda x, k: jnp.sum(conv(x, k) * weights), argnums=(0, 1)))

  np.testing.assert_allclose(ours(x, kernel), reference(x, kernel), rtol=1e-5, atol=1e-5)
  (value, grads), (ref_value, ref_grads) = loss(ours)(x, kernel), loss(reference)(x, kernel)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for a, b in zip(grads, ref_grads, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))
