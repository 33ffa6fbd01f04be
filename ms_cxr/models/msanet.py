"""MS-ANet (Xu, Li, Li, PeerJ Comput Sci 7:e541, 2021): multi-scale class activation maps, fused coarse-to-fine
into a class-wise attention that pools the finest features.

Only the paper's abstract is public: "multi-scale information fused iteratively to focus on likely disease regions",
trained with a loss that keeps attention consistent under image transforms, plus class-imbalance handling. The
attention is read as class activation maps (CAMs) in the manner of Guo et al., "Visual Attention Consistency under
Image Transforms for Multi-Label Image Classification" (CVPR 2019). The losses live in `ms_cxr.attention_losses`.

Network (one forward pass):
  1. DenseNet backbone with `densenet.DenseNet`'s layers and names (conv0, norm0, denseblockB_denselayerL,
     transitionB_norm/conv, norm5), so DenseNet checkpoints transplant one to one (`ssbn.transplant`). The feature
     map of dense block B is its output after BN-ReLU: `transitionB_norm` + ReLU for a block that has a transition
     (the map the transition's 1x1 conv receives, at the block's own resolution), `norm5` + ReLU for the last one.
     For DenseNet-121 at 224 px, blocks 2, 3, 4 give 512 x 28², 1024 x 14², 1024 x 7² (strides 8, 16, 32).
  2. Per scale, a 1x1-conv classifier (the CAM generator, `classifier_blockB`) maps features f to
     CAMs f · W (no bias, Guo et al.'s CAM); its logits are mean_space(f) · W + b, i.e. mean_space(CAM) + b, so each
     scale's prediction is exactly the pooled map the consistency loss constrains.
  3. The CAMs are fused coarse-to-fine: starting from the coarsest, the fused map is bilinearly upsampled to the
     next finer grid and mixed with that scale's CAM, class by class; the result (`fused_cam`) is on the grid of the
     finest used scale.
  4. The fused map, turned into spatial weights, re-weights the finest features per class before pooling; a final
     1x1-conv classifier (`classifier`) gives the fused logits, the model's prediction.

Stop-gradient (as the CAM loss of Guo et al. requires): CAMs are computed with `stop_gradient(W)`, logits with W
itself. The two are equal in value, but a loss on `cams` or `fused_cam` trains the backbone (and the fusion weights),
never a CAM generator; the CAM generators learn only from their scale logits. The attention of step 4 uses the
same stopped CAMs, so the fused-prediction loss does not train the CAM generators either; it trains the backbone,
the fusion weights and the final classifier.

Reconstructed choices (each an attribute, so a config field), not from the paper:
  scales=(2, 3, 4)        the last three dense blocks (strides 8, 16, 32), read after their BN-ReLU.
  fusion='learned'        per step of the coarse-to-fine iteration and per class, two mixing logits (initialised to
                          0, i.e. an equal mix) normalised by a softmax over {this scale's CAM, upsampled coarser
                          fused map}; a 2-way softmax is a sigmoid gate g, fused = g * cam + (1 - g) * up(coarser).
                          'mean': the plain average of all scales' CAMs on the finest grid, no parameters.
  attention_pooling='reweight'  the class-k fused map A_k becomes spatial weights a_k = g(A_k) / sum_space g(A_k)
                          and the fused logit is sum_space a_k * (f · V_k) + c_k for the finest features f and the
                          final classifier (V, c); equivalently the finest features pooled with class k's attention,
                          then classified. A constant map gives global average pooling, which is where training
                          starts. 'none': global average pooling, the fused map is not used for the prediction.
  attention_gate='sigmoid'  g = sigmoid (bounded weights; no single pixel can take all the mass); 'softmax':
                          g = exp, a spatial softmax per class (sharper).
  Heads, fusion and attention run in float32 whatever `dtype` is: they are small (num_classes outputs), and the
  consistency loss compares CAM values that bfloat16 would round to 3 significant digits.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ms_cxr.models import batchnorm, densenet

ModuleDef = Any

FUSIONS = ('learned', 'mean')
ATTENTION_POOLINGS = ('reweight', 'none')
ATTENTION_GATES = ('sigmoid', 'softmax')

# Backbones by name (the `densenet.PRESETS` fields MSANet shares with DenseNet): the full DenseNet-121 (the default
# attribute values) and the tiny one tests compile in seconds.
PRESETS = {
  'msanet_densenet121': dict(densenet.PRESETS['densenet121']),
  'msanet_small': dict(densenet.PRESETS['densenet_small']),
  'msanet_tiny': dict(densenet.PRESETS['densenet_tiny']),
}


class CAMHead(nn.Module):
  """A 1x1-conv classifier that returns class activation maps and the logits they pool to.

  Variables are laid out as `nn.Conv`'s: kernel [1, 1, channels, num_classes], bias [num_classes].
  `cams = features · stop_gradient(kernel)` (no bias) and `logits = mean_space(features) · kernel + bias`: equal in
  value to `mean_space(cams) + bias`, but a loss on the maps cannot move the kernel, a loss on the logits can.

  Attributes:
    num_classes: number of labels (maps).
  """

  num_classes: int

  @nn.compact
  def __call__(self, features: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(cams [B, h, w, K], logits [B, K]) for float32 features [B, h, w, C]."""
    kernel = self.param(
      'kernel',
      nn.initializers.lecun_normal(),
      (1, 1, features.shape[-1], self.num_classes),
      jnp.float32,
    )
    bias = self.param('bias', nn.initializers.zeros_init(), (self.num_classes,), jnp.float32)
    weights = kernel[0, 0]
    cams = jnp.einsum('bhwc,ck->bhwk', features, jax.lax.stop_gradient(weights))
    logits = jnp.mean(features, axis=(1, 2)) @ weights + bias
    return cams, logits


def _resize_to(maps: jax.Array, height: int, width: int) -> jax.Array:
  """Bilinear resize of [B, h, w, K] maps to [B, height, width, K] (half-pixel centres)."""
  return jax.image.resize(maps, (maps.shape[0], height, width, maps.shape[-1]), method='bilinear')


class MSANet(nn.Module):
  """Multi-scale attention network on a DenseNet backbone (see the module docstring).

  Attributes:
    block_sizes, growth_rate, num_init_features, bn_size, compression: the backbone, as for `densenet.DenseNet`
      (defaults: DenseNet-121); `PRESETS` holds named sets.
    num_classes: number of labels.
    norm: normalisation ModuleDef, as for `densenet.DenseNet` (plain BatchNorm or an `ssbn.SSBN` partial, which
      receives `size_px`).
    dtype: backbone compute dtype; parameters, heads and outputs are float32.
    axis_name: mapped axis over which training-mode BatchNorm statistics are averaged.
    bn_momentum: running-average momentum (Flax convention).
    bn_epsilon: BatchNorm epsilon.
    remat: rematerialise dense layers in the backward pass.
    pointwise_matmul: 1x1 convolutions as matrix products (`densenet.PointwiseConv`).
    kernel_grad_matmul: 3x3 convolutions' kernel gradients as one matrix product (`densenet.SameConv`).
    scales: dense blocks (1-based, strictly increasing, so finest first) whose outputs get a CAM head.
    fusion: 'learned' (per-class softmax mixing, coarse-to-fine) or 'mean'.
    attention_pooling: 'reweight' (fused map re-weights the finest features per class) or 'none' (average pooling).
    attention_gate: 'sigmoid' or 'softmax', how the fused map becomes spatial weights under 'reweight'.
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
  scales: Sequence[int] = (2, 3, 4)
  fusion: str = 'learned'
  attention_pooling: str = 'reweight'
  attention_gate: str = 'sigmoid'

  def _check(self) -> None:
    scales = tuple(self.scales)
    if (
      not scales
      or list(scales) != sorted(set(scales))
      or not 1 <= scales[0] <= scales[-1] <= len(self.block_sizes)
    ):
      raise ValueError(
        f'MSANet.scales={scales}: expected strictly increasing dense block numbers in '
        f'1..{len(self.block_sizes)}'
      )
    for field, value, allowed in (
      ('fusion', self.fusion, FUSIONS),
      ('attention_pooling', self.attention_pooling, ATTENTION_POOLINGS),
      ('attention_gate', self.attention_gate, ATTENTION_GATES),
    ):
      if value not in allowed:
        raise ValueError(f'MSANet.{field}={value!r}; expected one of {allowed}')

  @nn.compact
  def __call__(
    self, images: jax.Array, *, train: bool, size_px: int | None = None
  ) -> dict[str, Any]:
    """Predictions and attention maps for uint8 images [B, H, W, 1 or 3].

    Args:
      images: uint8 (or [0, 1] float) images.
      train: batch statistics (and their update) in BatchNorm rather than running averages.
      size_px: selects the SSBN branch; defaults to the image height.

    Returns:
      A dict of float32 arrays: `logits` [B, K] (the fused prediction), `scale_logits` (one [B, K] per scale,
      finest first), `cams` (one [B, h_s, w_s, K] per scale, finest first) and `fused_cam` [B, h, w, K] on the
      finest scale's grid.
    """
    self._check()
    conv = densenet.conv_factory(self.dtype, self.pointwise_matmul, self.kernel_grad_matmul)
    norm = functools.partial(
      self.norm,
      use_running_average=not train,
      momentum=self.bn_momentum,
      epsilon=self.bn_epsilon,
      dtype=self.dtype,
      axis_name=self.axis_name if train else None,
    )
    # The same size forwarding as densenet.DenseNet: a static size selects the SSBN branch.
    if densenet._is_size_specific(self.norm):
      norm = functools.partial(norm, size_px=images.shape[1] if size_px is None else size_px)

    blocks = densenet.dense_features(
      densenet.normalize_images(images).astype(self.dtype),
      block_sizes=self.block_sizes,
      growth_rate=self.growth_rate,
      num_init_features=self.num_init_features,
      bn_size=self.bn_size,
      compression=self.compression,
      last_block=self.scales[-1],
      norm=norm,
      conv=conv,
      remat=self.remat,
      moments=densenet.block_moments(train, None if self.is_initializing() else self.axis_name),
    )
    features = [blocks[b].astype(jnp.float32) for b in self.scales]
    heads = [
      CAMHead(self.num_classes, name=f'classifier_block{b}')(f)
      for b, f in zip(self.scales, features, strict=True)
    ]
    cams = [cam for cam, _ in heads]
    _, height, width, _ = cams[0].shape

    if self.fusion == 'learned':
      fused = cams[-1]
      for i in reversed(range(len(cams) - 1)):
        mix_logits = self.param(
          f'fusion_block{self.scales[i]}', nn.initializers.zeros_init(), (2, self.num_classes)
        )
        mix = jax.nn.softmax(mix_logits, axis=0)
        upsampled = _resize_to(fused, cams[i].shape[1], cams[i].shape[2])
        fused = mix[0] * cams[i] + mix[1] * upsampled
    else:
      fused = jnp.mean(jnp.stack([_resize_to(cam, height, width) for cam in cams]), axis=0)

    class_maps = nn.Conv(self.num_classes, (1, 1), dtype=jnp.float32, name='classifier')(
      features[0]
    )
    if self.attention_pooling == 'reweight':
      if self.attention_gate == 'sigmoid':
        gates = jax.nn.sigmoid(fused)
        weights = gates / jnp.sum(gates, axis=(1, 2), keepdims=True)
      else:
        flat = fused.reshape(fused.shape[0], height * width, self.num_classes)
        weights = jax.nn.softmax(flat, axis=1).reshape(fused.shape)
      # The weights sum to 1 over space, so the classifier's bias passes through unchanged.
      logits = jnp.sum(weights * class_maps, axis=(1, 2))
    else:
      logits = jnp.mean(class_maps, axis=(1, 2))

    return {
      'logits': logits,
      'scale_logits': tuple(scale_logits for _, scale_logits in heads),
      'cams': tuple(cams),
      'fused_cam': fused,
    }
