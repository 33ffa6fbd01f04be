"""DenseNet (Huang et al. 2017) in Flax linen, with the normalisation layer injected.

The layout and names follow torchvision's DenseNet-121 (conv0/norm0, denseblockN/denselayerM/{norm1,conv1,norm2,
conv2}, transitionN/{norm,conv}, norm5, classifier) so ImageNet weights convert one to one. The norm layer is a
`ModuleDef` (a partially applied module class) so size-specific BatchNorm drops in without touching the network.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ms_cxr.models import batchnorm, ssbn

ModuleDef = Any


# ImageNet statistics: the stem expects them, so ImageNet-initialised weights see familiar inputs.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_images(images: jax.Array) -> jax.Array:
  """uint8 (or [0, 1] float) grayscale/RGB images [B, H, W, 1|3] -> ImageNet-normalised float32 [B,
  H, W, 3].

  Grayscale radiographs are repeated over three channels so the stem matches torchvision's (3 input channels).
  """
  x = images.astype(jnp.float32)
  if jnp.issubdtype(images.dtype, jnp.integer):
    x = x / 255.0
  if x.shape[-1] == 1:
    x = jnp.broadcast_to(x, (*x.shape[:-1], 3))
  return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


def _is_size_specific(norm: ModuleDef) -> bool:
  """Whether the norm takes the input size (SSBN) rather than ignoring it (plain BatchNorm)."""
  while isinstance(norm, functools.partial):
    norm = norm.func
  return isinstance(norm, type) and issubclass(norm, ssbn.SSBN)


KERNEL_INIT = nn.initializers.kaiming_normal()


@jax.custom_vjp
def pointwise_product(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x [..., in] times kernel [in, out]: a 1x1 convolution.

  The gradient is written out so that the kernel's is x^T dy over all positions, one matrix product on the
  layouts the forward pass left. Left to autodiff, XLA:CPU transposed the output gradient of every bottleneck first
  (a [25088, 128] copy costing 30-60 ms per dense layer of block 1 at 224 px, batch 8).
  """
  return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _pointwise_fwd(x, kernel):
  return pointwise_product(x, kernel), (x, kernel)


def _pointwise_bwd(residuals, dy):
  x, kernel = residuals
  dx = jax.lax.dot_general(dy, kernel, (((dy.ndim - 1,), (1,)), ((), ())))
  dkernel = jax.lax.dot_general(
    x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]), (((0,), (0,)), ((), ()))
  )
  return dx, dkernel


pointwise_product.defvjp(_pointwise_fwd, _pointwise_bwd)


def _conv(x: jax.Array, kernel: jax.Array, strides, padding) -> jax.Array:
  return jax.lax.conv_general_dilated(
    x, kernel, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )


def _same_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  pad_h, pad_w = kernel.shape[0] // 2, kernel.shape[1] // 2
  return _conv(x, kernel, (1, 1), ((pad_h, pad_h), (pad_w, pad_w)))


def _same_conv_by_taps(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`_same_conv` as one matrix product with all kernel taps side by side, then a sum of shifted slices.

  z = x @ [in, taps·out] gives every input position's contribution to each tap; the output at q sums tap (i, j)'s
  slice of z at q + (i - pad_h, j - pad_w). With 32 outputs per tap z is small, and XLA:CPU runs the product at
  its matrix-product rate where its convolution runs at about half that ([8, 56, 56, 128] -> 32: 18 vs 21 ms;
  at 28 px 3.2 vs 4.8 ms).
  """
  kh, kw, channels, features = kernel.shape
  _, height, width, _ = x.shape
  pad_h, pad_w = kh // 2, kw // 2
  stacked = kernel.transpose(2, 0, 1, 3).reshape(channels, kh * kw * features)
  z = jax.lax.dot_general(x, stacked, (((x.ndim - 1,), (0,)), ((), ())))
  z = jnp.pad(z, ((0, 0), (pad_h, pad_h), (pad_w, pad_w), (0, 0)))
  taps = [
    z[:, i : i + height, j : j + width, (i * kw + j) * features : (i * kw + j + 1) * features]
    for i in range(kh)
    for j in range(kw)
  ]
  return functools.reduce(jnp.add, taps)


def _materialized(x: jax.Array) -> jax.Array:
  """x, computed once into its own array: a product with the identity over the last axis, which XLA does not
  fuse into its consumers (its optimization barriers are gone before fusion). For a gradient read by several
  shifted slices, each of which XLA:CPU would otherwise recompute it for."""
  return jax.lax.dot_general(
    x, jnp.eye(x.shape[-1], dtype=x.dtype), (((x.ndim - 1,), (0,)), ((), ()))
  )


# The largest grid (height x width) whose 3x3 forward convolution `same_conv` computes by taps on the CPU. With
# 56 x 56 the train step ran 4% faster at 224 px and 2.5% at 448 px than with 28 x 28 (the two alternating in
# one process); 112 x 112 gained nothing more at 448 px.
TAPS_MAX_POSITIONS = 56 * 56


@jax.custom_vjp
def same_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Stride-1 convolution of NHWC x with an odd HWIO kernel, zero-padded to keep the size ('SAME').

  The kernel's gradient is one matrix product: x^T [in, N·H·W] against the output gradient shifted once per
  kernel tap and stacked on the channel axis [N·H·W, taps·out]. DenseNet's 3x3 convolutions have 32 outputs, so
  the shifted copies are small, and on XLA:CPU the product beats the backward convolution (with the layout
  transposes it needs) at every grid of 14 px and up: [8, 56, 56, 128] -> 32, 51 vs 77 ms. The input gradient is
  the product of the same shifted copies with the stacked kernel (a matrix product runs at about twice the
  rate of XLA:CPU's transposed convolution here). The forward pass is `_same_conv_by_taps` on the CPU for grids
  of up to TAPS_MAX_POSITIONS, XLA's convolution otherwise.
  """
  if x.shape[1] * x.shape[2] > TAPS_MAX_POSITIONS:
    return _same_conv(x, kernel)
  return jax.lax.platform_dependent(x, kernel, cpu=_same_conv_by_taps, default=_same_conv)


def _same_conv_fwd(x, kernel):
  return same_conv(x, kernel), (x, kernel)


def _same_conv_bwd(residuals, dy):
  x, kernel = residuals
  kh, kw, channels, features = kernel.shape
  _, height, width, _ = x.shape
  pad_h, pad_w = kh // 2, kw // 2
  # The incoming gradient once, as an array: XLA:CPU otherwise fuses its producer (in DenseNet, the sum of every
  # later layer's gradient for this feature map) into each tap's shifted copy below and computes it once per tap.
  dy = _materialized(dy)
  padded = jnp.pad(dy, ((0, 0), (pad_h, pad_h), (pad_w, pad_w), (0, 0)))
  # Tap (i, j) pairs input position q with output position q - (i - pad_h, j - pad_w).
  shifted = jnp.concatenate(
    [
      padded[:, 2 * pad_h - i : 2 * pad_h - i + height, 2 * pad_w - j : 2 * pad_w - j + width]
      for i in range(kh)
      for j in range(kw)
    ],
    axis=-1,
  ).reshape(-1, kh * kw * features)
  dkernel = jax.lax.dot_general(x.reshape(-1, channels), shifted, (((0,), (0,)), ((), ())))
  # dx[q] = sum over taps of dy[q - tap offset] @ kernel[tap]^T: one product with the same shifted copies.
  stacked = kernel.transpose(0, 1, 3, 2).reshape(kh * kw * features, channels)
  dx = jax.lax.dot_general(shifted, stacked, (((1,), (0,)), ((), ())))
  return dx.reshape(x.shape), dkernel.reshape(channels, kh, kw, features).transpose(1, 2, 0, 3)


same_conv.defvjp(_same_conv_fwd, _same_conv_bwd)


# The most memory the patches of one product in `_kernel_grad_by_patches` may take (more go band by band).
PATCH_BYTES = 64 * 2**20


def _kernel_grad_by_patches(x, dy, kernel_shape, strides, padding):
  """The kernel gradient of `_conv` as matrix products: the input's patches, channels first [kh·kw·in, N·h·w]
  (one strided slice of the padded input per tap, stacked), times the output gradient [N·h·w, out]. Channels
  first, each tap's slice is made of runs along the width, and the product is one XLA:CPU hands to its
  matrix library (a product contracting both operands' first axes goes to a slower path): DenseNet's stem at
  224 px, batch 8, 37 ms as patches [N·h·w, kh·kw·in], 27 ms this way. Where the patches would take more than
  PATCH_BYTES (at 896 px, batch 4, the stem's take 472 MB) they are made and used one band of output rows at a
  time, in a loop so that one band's patches exist at once."""
  kh, kw, channels, features = kernel_shape
  batch, out_h, out_w, _ = dy.shape
  (pad_top, pad_bottom), (pad_left, pad_right) = padding
  padded = jnp.pad(
    jnp.transpose(x, (3, 0, 1, 2)), ((0, 0), (0, 0), (pad_top, pad_bottom), (pad_left, pad_right))
  )
  span_w = strides[1] * (out_w - 1) + 1
  row_bytes = batch * out_w * kh * kw * channels * x.dtype.itemsize
  # Rows per band: the most that fit, among the divisors of out_h (equal bands, one loop body).
  band = max(
    [d for d in range(1, out_h + 1) if out_h % d == 0 and d * row_bytes <= PATCH_BYTES] or [1]
  )
  in_rows = strides[0] * (band - 1) + kh

  def band_product(first):
    rows = jax.lax.dynamic_slice_in_dim(padded, first * strides[0], in_rows, axis=2)
    patches = jnp.stack(
      [
        rows[:, :, i : i + strides[0] * (band - 1) + 1 : strides[0], j : j + span_w : strides[1]]
        for i in range(kh)
        for j in range(kw)
      ]
    )
    return jax.lax.dot_general(
      patches.reshape(kh * kw * channels, -1),
      jax.lax.dynamic_slice_in_dim(dy, first, band, axis=1).reshape(-1, features),
      (((1,), (0,)), ((), ())),
    )

  if band == out_h:
    dkernel = band_product(0)
  else:
    dkernel = jax.lax.fori_loop(
      0,
      out_h // band,
      lambda b, total: total + band_product(b * band),
      jnp.zeros((kh * kw * channels, features), jnp.result_type(x, dy)),
    )
  return dkernel.reshape(kh, kw, channels, features)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def patch_grad_conv(
  x: jax.Array,
  kernel: jax.Array,
  strides: tuple[int, int],
  padding: tuple[tuple[int, int], tuple[int, int]],
) -> jax.Array:
  """Convolution of NHWC x with an HWIO kernel (explicit padding), its kernel gradient on the CPU as one matrix
  product of the input's patches with the output gradient (`_kernel_grad_by_patches`); elsewhere, and for the
  input gradient, XLA's. For DenseNet's stem (7x7, stride 2, 3 -> 64 channels), whose few input channels make
  the patches small: XLA:CPU's backward convolution took 38 ms and a 5 ms layout transpose at 224 px, batch 8.
  """
  return _conv(x, kernel, strides, padding)


def _patch_grad_conv_fwd(x, kernel, strides, padding):
  return _conv(x, kernel, strides, padding), (x, kernel)


def _patch_grad_conv_bwd(strides, padding, residuals, dy):
  x, kernel = residuals
  _, vjp = jax.vjp(lambda x, kernel: _conv(x, kernel, strides, padding), x, kernel)

  def by_patches(x, dy):
    return _kernel_grad_by_patches(x, dy, kernel.shape, strides, padding)

  dkernel = jax.lax.platform_dependent(x, dy, cpu=by_patches, default=lambda x, dy: vjp(dy)[1])
  return vjp(dy)[0], dkernel  # XLA drops the input gradient where nothing uses it (the stem's)


patch_grad_conv.defvjp(_patch_grad_conv_fwd, _patch_grad_conv_bwd)


def _max_pool_forward(
  x: jax.Array, window: tuple[int, int], strides: tuple[int, int], padding
) -> jax.Array:
  return jax.lax.reduce_window(
    x,
    jnp.array(-jnp.inf, x.dtype),
    jax.lax.max,
    (1, *window, 1),
    (1, *strides, 1),
    ((0, 0), *padding, (0, 0)),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(
  x: jax.Array,
  window: tuple[int, int],
  strides: tuple[int, int],
  padding: tuple[tuple[int, int], tuple[int, int]],
) -> jax.Array:
  """Max-pooling of NHWC x over `window` with `strides`, padded with -inf (as torch's MaxPool2d and nn.max_pool).

  The gradient of each output goes to the first position of its window holding the maximum (row-major order,
  as in torch). Written out: the input gradient is the sum over window taps of the output gradient where that tap
  is the first maximum, each spread back onto the input grid by a strided pad, which XLA fuses into one pass.
  Left to autodiff, XLA:CPU tracked the argmax with an index array per dimension: the stem's pool (8 x 112 x 112 x
  64) took 114 ms forward and backward, 35 ms this way.
  """
  return _max_pool_forward(x, window, strides, padding)


def _max_pool_fwd(x, window, strides, padding):
  y = _max_pool_forward(x, window, strides, padding)
  return y, (x, y)


def _max_pool_bwd(window, strides, padding, residuals, dy):
  x, y = residuals
  (pad_top, pad_bottom), (pad_left, pad_right) = padding
  padded = jnp.pad(
    x, ((0, 0), (pad_top, pad_bottom), (pad_left, pad_right), (0, 0)), constant_values=-jnp.inf
  )
  out_h, out_w = y.shape[1], y.shape[2]
  span_h, span_w = strides[0] * (out_h - 1) + 1, strides[1] * (out_w - 1) + 1
  taps = [(i, j) for i in range(window[0]) for j in range(window[1])]
  # The first tap holding the maximum, per output (scanning backwards leaves the first match).
  first = jnp.full(y.shape, len(taps), jnp.int32)
  for t in reversed(range(len(taps))):
    i, j = taps[t]
    tap = padded[:, i : i + span_h : strides[0], j : j + span_w : strides[1]]
    first = jnp.where(tap == y, t, first)
  # The incoming gradient once, as an array: otherwise XLA:CPU fuses its producer (in DenseNet, the sum over a
  # dense block's layers) into every tap's term below and computes it once per tap.
  dy = _materialized(dy)
  zero = jnp.zeros((), dy.dtype)
  dpadded = jnp.zeros(padded.shape, dy.dtype)
  for t, (i, j) in enumerate(taps):
    spread = (
      (0, 0, 0),
      (i, padded.shape[1] - i - span_h, strides[0] - 1),
      (j, padded.shape[2] - j - span_w, strides[1] - 1),
      (0, 0, 0),
    )
    dpadded = dpadded + jax.lax.pad(jnp.where(first == t, dy, zero), zero, spread)
  height, width = x.shape[1], x.shape[2]
  return (dpadded[:, pad_top : pad_top + height, pad_left : pad_left + width],)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def _conv_kernel(module: nn.Module, x: jax.Array, kernel_size, features: int, dtype: Any):
  """x and nn.Conv's `kernel` parameter [kh, kw, in, out] of `module` (same initialiser), both in `dtype`."""
  kernel = module.param('kernel', KERNEL_INIT, (*kernel_size, x.shape[-1], features), jnp.float32)
  return nn.dtypes.promote_dtype(x, kernel, dtype=dtype)


class PatchGradConv(nn.Module):
  """A bias-free convolution with explicit padding through `patch_grad_conv` (on the CPU, its kernel gradient as
  one matrix product). The parameter is nn.Conv's: `kernel` [kh, kw, in, out], same initialiser."""

  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int]
  padding: tuple[tuple[int, int], tuple[int, int]]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x, kernel = _conv_kernel(self, x, self.kernel_size, self.features, self.dtype)
    return patch_grad_conv(x, kernel, self.strides, self.padding)


class PointwiseConv(nn.Module):
  """A bias-free 1x1 convolution computed as a matrix product over channels (`pointwise_product`).

  The parameter is nn.Conv's: `kernel` [1, 1, in, out], same initialiser, so checkpoints and converted weights do
  not care which one ran. XLA:CPU runs the product 2-3x faster than the convolution, forward and backward (a
  1x1 convolution on [8, 56, 56, 256] -> 128 channels, forward + backward: 75 ms as a product, 234 ms as a
  convolution on a 2-core CPU); DenseNet spends much of its step in 1x1 bottlenecks and transitions.
  """

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', KERNEL_INIT, (1, 1, x.shape[-1], self.features), jnp.float32)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    return pointwise_product(x, kernel[0, 0])


class SameConv(nn.Module):
  """A bias-free stride-1 convolution with an odd kernel and 'SAME' zero padding, through `same_conv` (its kernel
  gradient as one matrix product). The parameter is nn.Conv's: `kernel` [kh, kw, in, out], same initialiser."""

  features: int
  kernel_size: tuple[int, int]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x, kernel = _conv_kernel(self, x, self.kernel_size, self.features, self.dtype)
    return same_conv(x, kernel)


def conv_factory(dtype: Any, pointwise_matmul: bool, kernel_grad_matmul: bool) -> ModuleDef:
  """The convolution DenseNet layers are built with, called as `conv(features, kernel_size, name=..., ...)`:
  bias-free, Kaiming-normal initialised; plain 1x1 ones as `PointwiseConv` when `pointwise_matmul`, stride-1
  'SAME'-padded odd ones (DenseNet's 3x3) as `SameConv` and strided ones with explicit padding (the stem) as
  `PatchGradConv` when `kernel_grad_matmul`. All have nn.Conv's parameters and compute the same function."""

  def conv(features: int, kernel_size: Sequence[int], *, name: str, **kwargs: Any) -> nn.Module:
    kernel_size = tuple(kernel_size)
    if pointwise_matmul and kernel_size == (1, 1) and not kwargs:
      return PointwiseConv(features, dtype=dtype, name=name)
    same_padding = tuple((k // 2, k // 2) for k in kernel_size)
    if (
      kernel_grad_matmul
      and len(kernel_size) == 2
      and all(k % 2 == 1 for k in kernel_size)
      and set(kwargs) == {'padding'}
      and tuple(map(tuple, kwargs['padding'])) == same_padding
    ):
      return SameConv(features, kernel_size, dtype=dtype, name=name)
    if (
      kernel_grad_matmul
      and len(kernel_size) == 2
      and set(kwargs) == {'strides', 'padding'}
      and not isinstance(kwargs['padding'], str)
      and tuple(kwargs['strides']) != (1, 1)
    ):
      strides = tuple(kwargs['strides'])
      padding = tuple(tuple(p) for p in kwargs['padding'])
      return PatchGradConv(features, kernel_size, strides, padding, dtype=dtype, name=name)
    return nn.Conv(
      features,
      kernel_size,
      use_bias=False,
      dtype=dtype,
      kernel_init=KERNEL_INIT,
      name=name,
      **kwargs,
    )

  return conv


def block_moments(train: bool, axis_name: str | None) -> Callable[[jax.Array], jax.Array] | None:
  """`dense_features`' `moments`: `batchnorm.moments` over `axis_name` in training, None in inference."""
  return functools.partial(batchnorm.moments, axis_name=axis_name) if train else None


class DenseLayer(nn.Module):
  """BN-ReLU-Conv1x1 bottleneck then BN-ReLU-Conv3x3, producing `growth_rate` new feature maps.

  Called on the block's feature maps so far (the block input and each earlier layer's output), which it
  concatenates itself. Under remat the concatenation is then recomputed with the rest of the layer: what the
  backward pass keeps are those feature maps, shared by every later layer, so a block's activation memory grows
  linearly with its depth rather than quadratically (Pleiss et al. 2017, "Memory-Efficient Implementation of
  DenseNets").
  """

  growth_rate: int
  bn_size: int
  norm: ModuleDef
  conv: ModuleDef

  @nn.compact
  def __call__(
    self, features: Sequence[jax.Array], moments: Sequence[jax.Array] | None = None
  ) -> jax.Array:
    """The new feature maps from the block's feature maps so far (and, in training, their batch moments,
    `batchnorm.moments` of each, which norm1 then takes instead of reducing over the concatenation)."""
    x = features[0] if len(features) == 1 else jnp.concatenate(features, axis=-1)
    x_moments = None if moments is None else jnp.concatenate(moments, axis=-1)
    y = self.norm(name='norm1', relu=True)(x, x_moments)
    y = self.conv(self.bn_size * self.growth_rate, (1, 1), name='conv1')(y)
    y = self.norm(name='norm2', relu=True)(y)
    return self.conv(self.growth_rate, (3, 3), padding=((1, 1), (1, 1)), name='conv2')(y)


def dense_features(
  x: jax.Array,
  *,
  block_sizes: Sequence[int],
  growth_rate: int,
  num_init_features: int,
  bn_size: int,
  compression: float,
  last_block: int,
  norm: ModuleDef,
  conv: ModuleDef,
  remat: bool,
  moments: Callable[[jax.Array], jax.Array] | None = None,
) -> dict[int, jax.Array]:
  """DenseNet features {block number (1-based): BN-ReLU'd block output} for blocks 1..last_block.

  A block's output is the map its transition's 1x1 convolution receives (`transitionB_norm` + ReLU), or
  `norm5` + ReLU for the last block. A function, not a module: called inside a compact method, its layers
  become children of the caller under torchvision's names (conv0, norm0, denseblockB_denselayerL,
  transitionB_norm/conv, norm5), so DenseNet and MS-ANet share variable paths.

  `moments` (training: `batchnorm.moments` with the BN axis name bound) computes the batch moments of each
  feature map of a block once, as it is made; every later BatchNorm over a concatenation including it (the
  dense layers' norm1, the transition's, norm5) takes them from there. BatchNorm's statistics are per channel, so
  this computes the same function while the statistics' passes over a block's maps (forward and backward) are
  linear in the block's depth rather than quadratic; with synchronised BN there is one collective per feature
  map instead of one per BatchNorm. None (inference) leaves each BatchNorm to its running averages. With
  `remat` every BatchNorm computes its own statistics (see below).
  """
  layer_cls = nn.remat(DenseLayer) if remat else DenseLayer
  if remat:
    # Shared moments cost memory under remat: DenseNet-121 at 896 px, batch 4, needed 9.1 GB of temporaries with
    # them (more than without remat) and 4.0 GB without, each rematerialised layer reducing its own input again.
    moments = None
  # Rematerialised layers leave BatchNorm+ReLU to autodiff (batchnorm.BatchNorm.custom_gradient).
  layer_norm = functools.partial(norm, custom_gradient=False) if remat else norm
  x = conv(num_init_features, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), name='conv0')(x)
  x = norm(name='norm0', relu=True)(x)
  x = max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))

  outputs = {}
  channels = num_init_features
  for block_index in range(last_block):
    block = f'denseblock{block_index + 1}'
    features = [x]
    feature_moments = None if moments is None else [moments(x)]
    for layer_index in range(block_sizes[block_index]):
      layer = layer_cls(
        growth_rate, bn_size, layer_norm, conv, name=f'{block}_denselayer{layer_index + 1}'
      )
      features.append(layer(features, feature_moments))
      if feature_moments is not None:
        feature_moments.append(moments(features[-1]))
      channels += growth_rate
    x = jnp.concatenate(features, axis=-1)
    x_moments = None if feature_moments is None else jnp.concatenate(feature_moments, axis=-1)
    if block_index + 1 < len(block_sizes):
      transition = f'transition{block_index + 1}'
      x = norm(name=f'{transition}_norm', relu=True)(x, x_moments)
      outputs[block_index + 1] = x
      if block_index + 1 == last_block:
        break  # later layers would be unused parameters
      channels = int(channels * compression)
      # Pooled, then convolved: torchvision convolves first, but a 1x1 convolution and an average over 2x2
      # windows are both linear, one over channels and one over positions, so they commute; pooling first gives
      # the convolution a quarter of the positions (DenseNet-121 at 224 px: 0.46 of its 5.7 forward GFLOP per
      # image).
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
      x = conv(channels, (1, 1), name=f'{transition}_conv')(x)
    else:
      outputs[block_index + 1] = norm(name='norm5', relu=True)(x, x_moments)
  return outputs


class DenseNet(nn.Module):
  """DenseNet classifier with a multi-label head (one logit per label, float32 out).

  Attributes:
    block_sizes: dense layers per block; (6, 12, 24, 16) is DenseNet-121.
    growth_rate: feature maps each dense layer adds.
    num_init_features: channels of the stem convolution.
    bn_size: bottleneck width as a multiple of growth_rate.
    compression: channel reduction of each transition.
    num_classes: number of labels.
    norm: normalisation ModuleDef (`batchnorm.BatchNorm` or an `ssbn.SSBN` partial), called as
      `norm(name=..., relu=True)` (every norm here is followed by a ReLU, which it applies itself);
      receives use_running_average, momentum, epsilon, dtype and axis_name, plus `size_px` for size-specific
      norms (SSBN).
    dtype: compute dtype; parameters stay float32.
    axis_name: mapped axis over which training-mode BatchNorm statistics are averaged (synchronised BN).
    bn_momentum: running-average momentum (Flax convention).
    bn_epsilon: BatchNorm epsilon (torchvision: 1e-5).
    remat: rematerialise dense layers, their input concatenation included, in the backward pass (activation
      memory linear rather than quadratic in block depth, for one more forward pass of the dense layers).
    pointwise_matmul: 1x1 convolutions as matrix products (`PointwiseConv`; same parameters, same function).
    kernel_grad_matmul: 3x3 convolutions' kernel gradients as one matrix product (`SameConv`; same parameters,
      same function).
  """

  block_sizes: Sequence[int] = (6, 12, 24, 16)
  growth_rate: int = 32
  num_init_features: int = 64
  bn_size: int = 4
  compression: float = 0.5
  num_classes: int = 14
  norm: ModuleDef = batchnorm.BatchNorm
  dtype: Any = jnp.float32
  axis_name: str | None = None
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  remat: bool = False
  pointwise_matmul: bool = True
  kernel_grad_matmul: bool = True

  @nn.compact
  def __call__(
    self, x: jax.Array, *, train: bool, size_px: int | None = None, return_cam: bool = False
  ) -> jax.Array | dict[str, jax.Array]:
    """Logits [batch, num_classes] (float32) for uint8 images [batch, height, width, 1 or 3].

    With `return_cam`, a dict: `logits` and `cam` [batch, h, w, num_classes], the class activation map (the
    classifier applied at every position of the last feature map; its spatial mean is exactly the logit, as
    global average pooling and the classifier are both linear).
    """
    conv = conv_factory(self.dtype, self.pointwise_matmul, self.kernel_grad_matmul)
    norm = functools.partial(
      self.norm,
      use_running_average=not train,
      momentum=self.bn_momentum,
      epsilon=self.bn_epsilon,
      dtype=self.dtype,
      # Synchronised BN: statistics over the global batch, so every replica normalises identically.
      axis_name=self.axis_name if train else None,
    )
    if _is_size_specific(self.norm):
      # The input side selects the SSBN branch; it is static (part of the shape), so each size compiles apart.
      norm = functools.partial(norm, size_px=x.shape[1] if size_px is None else size_px)
    x = dense_features(
      normalize_images(x).astype(self.dtype),
      block_sizes=self.block_sizes,
      growth_rate=self.growth_rate,
      num_init_features=self.num_init_features,
      bn_size=self.bn_size,
      compression=self.compression,
      last_block=len(self.block_sizes),
      norm=norm,
      conv=conv,
      remat=self.remat,
      moments=block_moments(train, None if self.is_initializing() else self.axis_name),
    )[len(self.block_sizes)]
    classifier = nn.Dense(self.num_classes, dtype=self.dtype, name='classifier')
    logits = classifier(jnp.mean(x, axis=(1, 2))).astype(jnp.float32)
    if return_cam:
      return {'logits': logits, 'cam': classifier(x).astype(jnp.float32)}
    return logits


# Architectures by name. The tiny and small presets keep the DenseNet structure (dense blocks,
# transitions,
# bottlenecks) at a size that compiles in seconds (tests) or trains in minutes on a CPU (demo).
PRESETS = {
  'densenet121': dict(block_sizes=(6, 12, 24, 16), growth_rate=32, num_init_features=64, bn_size=4),
  'densenet169': dict(block_sizes=(6, 12, 32, 32), growth_rate=32, num_init_features=64, bn_size=4),
  'densenet201': dict(block_sizes=(6, 12, 48, 32), growth_rate=32, num_init_features=64, bn_size=4),
  'densenet_small': dict(block_sizes=(2, 4, 6, 4), growth_rate=16, num_init_features=32, bn_size=4),
  'densenet_tiny': dict(block_sizes=(1, 1, 1, 1), growth_rate=8, num_init_features=16, bn_size=2),
}
