"""DenseNet (Huang et al. 2017) in Flax linen, with the normalisation layer injected.

The layout and names follow torchvision's DenseNet-121 (conv0/norm0, denseblockN/denselayerM/{norm1,conv1,norm2,
conv2}, transitionN/{norm,conv}, norm5, classifier) so ImageNet weights convert one to one. The norm layer is a
`ModuleDef` (a partially applied module class) so size-specific BatchNorm drops in without touching the network.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ms_cxr.models import ssbn

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


class PointwiseConv(nn.Module):
  """A bias-free 1x1 convolution computed as a matrix product over channels.

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
    return jax.lax.dot_general(x, kernel[0, 0], (((x.ndim - 1,), (0,)), ((), ())))


def conv_factory(dtype: Any, pointwise_matmul: bool) -> ModuleDef:
  """The convolution DenseNet layers are built with, called as `conv(features, kernel_size, name=..., ...)`:
  bias-free, Kaiming-normal initialised; plain 1x1 ones as `PointwiseConv` when `pointwise_matmul`."""

  def conv(features: int, kernel_size: Sequence[int], *, name: str, **kwargs: Any) -> nn.Module:
    if pointwise_matmul and tuple(kernel_size) == (1, 1) and not kwargs:
      return PointwiseConv(features, dtype=dtype, name=name)
    return nn.Conv(
      features,
      tuple(kernel_size),
      use_bias=False,
      dtype=dtype,
      kernel_init=KERNEL_INIT,
      name=name,
      **kwargs,
    )

  return conv


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
  def __call__(self, features: Sequence[jax.Array]) -> jax.Array:
    x = features[0] if len(features) == 1 else jnp.concatenate(features, axis=-1)
    y = nn.relu(self.norm(name='norm1')(x))
    y = self.conv(self.bn_size * self.growth_rate, (1, 1), name='conv1')(y)
    y = nn.relu(self.norm(name='norm2')(y))
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
) -> dict[int, jax.Array]:
  """DenseNet features {block number (1-based): BN-ReLU'd block output} for blocks 1..last_block.

  A block's output is the map its transition's 1x1 convolution receives (`transitionB_norm` + ReLU), or
  `norm5` + ReLU for the last block. A function, not a module: called inside a compact method, its layers
  become children of the caller under torchvision's names (conv0, norm0, denseblockB_denselayerL,
  transitionB_norm/conv, norm5), so DenseNet and MS-ANet share variable paths.
  """
  layer_cls = nn.remat(DenseLayer) if remat else DenseLayer
  x = conv(num_init_features, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), name='conv0')(x)
  x = nn.relu(norm(name='norm0')(x))
  x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

  outputs = {}
  channels = num_init_features
  for block_index in range(last_block):
    block = f'denseblock{block_index + 1}'
    features = [x]
    for layer_index in range(block_sizes[block_index]):
      layer = layer_cls(
        growth_rate, bn_size, norm, conv, name=f'{block}_denselayer{layer_index + 1}'
      )
      features.append(layer(features))
      channels += growth_rate
    x = jnp.concatenate(features, axis=-1)
    if block_index + 1 < len(block_sizes):
      transition = f'transition{block_index + 1}'
      x = nn.relu(norm(name=f'{transition}_norm')(x))
      outputs[block_index + 1] = x
      if block_index + 1 == last_block:
        break  # later layers would be unused parameters
      channels = int(channels * compression)
      x = conv(channels, (1, 1), name=f'{transition}_conv')(x)
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    else:
      outputs[block_index + 1] = nn.relu(norm(name='norm5')(x))
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
    norm: normalisation ModuleDef, called as `norm(name=...)`; receives use_running_average, momentum, epsilon,
      dtype and axis_name, plus `size_px` for size-specific norms (SSBN).
    dtype: compute dtype; parameters stay float32.
    axis_name: mapped axis over which training-mode BatchNorm statistics are averaged (synchronised BN).
    bn_momentum: running-average momentum (Flax convention).
    bn_epsilon: BatchNorm epsilon (torchvision: 1e-5).
    remat: rematerialise dense layers, their input concatenation included, in the backward pass (activation
      memory linear rather than quadratic in block depth, for one more forward pass of the dense layers).
    pointwise_matmul: 1x1 convolutions as matrix products (`PointwiseConv`; same parameters, same function).
  """

  block_sizes: Sequence[int] = (6, 12, 24, 16)
  growth_rate: int = 32
  num_init_features: int = 64
  bn_size: int = 4
  compression: float = 0.5
  num_classes: int = 14
  norm: ModuleDef = nn.BatchNorm
  dtype: Any = jnp.float32
  axis_name: str | None = None
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  remat: bool = False
  pointwise_matmul: bool = True

  @nn.compact
  def __call__(
    self, x: jax.Array, *, train: bool, size_px: int | None = None, return_cam: bool = False
  ) -> jax.Array | dict[str, jax.Array]:
    """Logits [batch, num_classes] (float32) for uint8 images [batch, height, width, 1 or 3].

    With `return_cam`, a dict: `logits` and `cam` [batch, h, w, num_classes], the class activation map (the
    classifier applied at every position of the last feature map; its spatial mean is exactly the logit, as
    global average pooling and the classifier are both linear).
    """
    conv = conv_factory(self.dtype, self.pointwise_matmul)
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
