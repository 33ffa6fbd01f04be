"""Model construction from config."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from ms_cxr.models import batchnorm, densenet, msanet, ssbn

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def create_model(
  model_config: ml_collections.ConfigDict,
  num_labels: int,
  sizes: Sequence[int],
  axis_name: str | None = None,
) -> nn.Module:
  """Builds the configured network.

  Args:
    model_config: the `model` section of the config.
    num_labels: outputs of the multi-label head.
    sizes: every input size (px) the model will see; SSBN makes one branch per size.
    axis_name: device axis for synchronised BatchNorm statistics in training (None outside a mapped step).

  Returns:
    An unbound Flax module called as `model.apply(variables, images, train=..., size_px=...)`.

  Raises:
    ValueError: for an unknown model name or dtype.
  """
  presets = {**densenet.PRESETS, **msanet.PRESETS}
  if model_config.name not in presets:
    raise ValueError(
      f'config.model.name={model_config.name!r} is unknown; expected one of {sorted(presets)}'
    )
  if model_config.dtype not in DTYPES:
    raise ValueError(f'config.model.dtype={model_config.dtype!r}; expected one of {sorted(DTYPES)}')
  if model_config.norm == 'batchnorm':
    norm = batchnorm.BatchNorm
  elif model_config.norm == 'ssbn':
    norm = functools.partial(ssbn.SSBN, sizes=tuple(sizes))
  else:
    raise ValueError(f"config.model.norm={model_config.norm!r}; expected 'batchnorm' or 'ssbn'")
  common = dict(
    **presets[model_config.name],
    norm=norm,
    num_classes=num_labels,
    dtype=DTYPES[model_config.dtype],
    axis_name=axis_name,
    bn_momentum=model_config.bn_momentum,
    bn_epsilon=model_config.bn_epsilon,
    remat=model_config.remat,
    pointwise_matmul=model_config.get('pointwise_matmul', True),
    kernel_grad_matmul=model_config.get('kernel_grad_matmul', True),
  )
  if model_config.name in msanet.PRESETS:
    options = model_config.msanet
    return msanet.MSANet(
      **common,
      scales=tuple(options.scales),
      fusion=options.fusion,
      attention_pooling=options.attention_pooling,
      attention_gate=options.attention_gate,
    )
  return densenet.DenseNet(**common)


def attention_maps(model: nn.Module, variables, images, size_px: int | None = None):
  """Class-wise attention maps [B, h, w, K] (float32) for uint8 images, in inference mode.

  MS-ANet: its fused multi-scale attention map (`fused_cam`). DenseNet (standard BN or SSBN): the class activation
  map of the last feature map, whose spatial mean is the logit. Higher = more evidence for the label there.
  """
  if isinstance(model, msanet.MSANet):
    return model.apply(variables, images, train=False, size_px=size_px)['fused_cam']
  return model.apply(variables, images, train=False, size_px=size_px, return_cam=True)['cam']
