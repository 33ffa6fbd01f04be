"""Model FLOPs: the multiply-adds of a model's matrix products and convolutions, counted from its jaxpr, and the
model FLOP utilisation (MFU) of a measured step.

`forward_flops` traces `model.apply` on one image (no compilation) and counts 2 x the multiply-adds of every
`dot_general` and `conv_general_dilated` in it, through nested jaxprs (jit, custom derivative rules, remat, scans
times their length; for `cond` the largest branch). Elementwise work (BatchNorm, ReLU, pooling, the concatenations)
is left out, as is usual for model FLOPs: on an accelerator it is bandwidth, not arithmetic. The count is of what
the forward pass computes, so formulations of one convolution that compute the same products (the CPU's 3x3
convolution by taps, 1x1 convolutions as matrix products) count the same, and a zero-padded border counts as
the convolution computes it. DenseNet-121 at 224 px: 5.20 GFLOP per image; torchvision's DenseNet-121 computes
5.67 (the often quoted 2.8-2.9 G multiply-adds), as it pools after each transition's 1x1 convolution and this
project before it (the same function: ms_cxr/models/densenet.py).

A train step's model FLOPs are 3 x forward (the backward pass computes the input and the weight gradient, each
costing one forward), whatever rematerialisation or the stem's unneeded input gradient actually cost: the usual
definition of MFU, which counts useful work only.

`PEAK_TFLOPS` holds vendors' dense (no sparsity) peak rates per device kind; `mfu` = achieved model FLOP/s over
the peak of the devices used.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core

# Dense peak TFLOP/s per device, by device kind (a regular expression searched in `device.device_kind`; first
# match wins, so more specific names come first). 'float32' is what float32 matrix products run at by default: on
# NVIDIA's Ampere and Hopper GPUs XLA uses TF32 tensor cores for them. From the vendors' data sheets.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
  (r'H200', {'bfloat16': 989.4, 'float32': 494.7}),
  (r'H100.*PCIe', {'bfloat16': 756.0, 'float32': 378.0}),
  (r'H100.*NVL', {'bfloat16': 835.5, 'float32': 417.5}),
  (r'H100', {'bfloat16': 989.4, 'float32': 494.7}),  # SXM
  (r'A100', {'bfloat16': 312.0, 'float32': 156.0}),
  (r'L40S', {'bfloat16': 362.1, 'float32': 183.0}),
  (r'A10G?\b', {'bfloat16': 125.0, 'float32': 62.5}),
  (r'TPU v6 lite|TPU v6e', {'bfloat16': 918.0}),
  (r'TPU v5 lite|TPU v5e', {'bfloat16': 197.0}),
  (r'TPU v5p|TPU v5', {'bfloat16': 459.0}),
  (r'TPU v4', {'bfloat16': 275.0}),
)

# Traced one image at a time: FLOPs scale linearly with the batch.
_COUNTED = ('dot_general', 'conv_general_dilated')


def peak_tflops(device_kind: str | None, dtype: str) -> float | None:
  """The dense peak TFLOP/s of one device of `device_kind` for `dtype` products, or None when unknown."""
  if not device_kind:
    return None
  for pattern, peaks in PEAK_TFLOPS:
    if re.search(pattern, device_kind):
      return peaks.get(dtype)
  return None


def _dot_flops(eqn: Any) -> int:
  lhs, rhs = (v.aval for v in eqn.invars)
  (_, rhs_contract), (_, rhs_batch) = eqn.params['dimension_numbers']
  rhs_free = [d for d in range(rhs.ndim) if d not in rhs_contract and d not in rhs_batch]
  return 2 * math.prod(lhs.shape) * math.prod(rhs.shape[d] for d in rhs_free)


def _conv_flops(eqn: Any) -> int:
  rhs = eqn.invars[1].aval
  out = eqn.outvars[0].aval
  out_features = rhs.shape[eqn.params['dimension_numbers'].rhs_spec[0]]
  # Each output element is a sum over the kernel's window and its group's input features.
  return 2 * math.prod(out.shape) * (math.prod(rhs.shape) // out_features)


def _sub_jaxprs(value: Any) -> list[Any]:
  if isinstance(value, jax_core.ClosedJaxpr):
    return [value.jaxpr]
  if isinstance(value, jax_core.Jaxpr):
    return [value]
  return []


def jaxpr_flops(jaxpr: Any) -> int:
  """2 x the multiply-adds of the products and convolutions in `jaxpr` (a Jaxpr or ClosedJaxpr)."""
  if isinstance(jaxpr, jax_core.ClosedJaxpr):
    jaxpr = jaxpr.jaxpr
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      total += _dot_flops(eqn)
    elif name == 'conv_general_dilated':
      total += _conv_flops(eqn)
    elif name == 'cond':
      total += max(jaxpr_flops(branch) for branch in eqn.params['branches'])
    elif name == 'while':
      raise ValueError(
        'the model has a while loop, whose trip count a jaxpr does not give; its FLOPs cannot be counted'
      )
    else:
      inner = sum(jaxpr_flops(sub) for value in eqn.params.values() for sub in _sub_jaxprs(value))
      total += inner * (eqn.params['length'] if name == 'scan' else 1)
  return total


def forward_flops(model: Any, variables: Any, size_px: int, *, channels: int = 1) -> int:
  """FLOPs of one image's forward pass (inference mode) through `model` at `size_px`.

  Args:
    model: an unbound module of `ms_cxr.models.create_model`.
    variables: its variables, or their shapes (`jax.eval_shape` of `model.init`).
    size_px: the input side.
    channels: the input's channels (the project's images are grayscale).
  """
  image = jax.ShapeDtypeStruct((1, size_px, size_px, channels), jnp.uint8)
  jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, image)
  return jaxpr_flops(jaxpr)


def model_flops_per_image(
  model: Any, variables: Any, size_px: int, *, what: str = 'train', views: int = 1
) -> int:
  """Model FLOPs per image of a train step (3 x forward) or an eval step (forward), times `views`, the forward
  passes per image (train: 2 with MS-ANet's consistency loss, which runs each image's transformed copy; eval:
  1 + the test-time views)."""
  forward = forward_flops(model, variables, size_px)
  return (3 if what == 'train' else 1) * forward * views


def mfu(
  flops_per_image: float, images_per_sec: float, peak_tflops_per_device: float | None, devices: int
) -> float | None:
  """Model FLOP utilisation: achieved model FLOP/s over the peak of `devices` devices (None without a peak)."""
  if not peak_tflops_per_device:
    return None
  return flops_per_image * images_per_sec / (peak_tflops_per_device * 1e12 * devices)
