"""BatchNorm with the ReLU that follows it fused in, and the gradient of the two written out.

`BatchNorm` has exactly `flax.linen.BatchNorm`'s variables (params `scale`, `bias`; batch_stats `mean`, `var`) and
statistics (float32, E[x^2] - E[x]^2, one `pmean` over `axis_name` for synchronised BN, no running-average
update at init), so checkpoints and converted torchvision weights do not care which one ran. With `relu=True` it
returns relu(BN(x)) through `normalize_relu`, whose backward pass reads the input and the output gradient twice
(once for the two per-channel sums, once for the input gradient) and keeps nothing but the input, which the
network holds anyway. Left to autodiff, XLA:CPU also stored x - mean for every BatchNorm and spent more passes
over it; DenseNet-121 normalises every feature map of a dense block once per later layer, so this is a large part
of its train step (8 x 56 x 56 x 256, forward and backward: 30 ms as nn.BatchNorm + ReLU, 23 ms here).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def moments(x: jax.Array, axis_name: str | None = None) -> jax.Array:
  """[2, channels] float32: the mean and the mean of squares of x over all axes but the last (channels),
  averaged over the mapped axis `axis_name` when given (synchronised BN: the global batch's moments).

  Per channel, so the moments of a concatenation along channels are the concatenation of its parts' moments:
  DenseNet computes them once per feature map and hands every later layer's BatchNorm the concatenation
  (`BatchNorm(...)(x, moments=...)`), instead of each layer reducing over all of its input again.
  """
  stacked = _local_moments(x)
  return stacked if axis_name is None else jax.lax.pmean(stacked, axis_name)


@jax.custom_vjp
def _local_moments(x: jax.Array) -> jax.Array:
  """`moments` of this device's x. The gradient is written out so that the backward pass keeps x alone: autodiff
  of mean(x^2) keeps 2x, a second full-size copy of every feature map it normalises."""
  x = x.astype(jnp.float32)
  axes = tuple(range(x.ndim - 1))
  return jnp.stack([jnp.mean(x, axis=axes), jnp.mean(jnp.square(x), axis=axes)])


def _local_moments_fwd(x):
  return _local_moments(x), x


def _local_moments_bwd(x, dmoments):
  count = x.size // x.shape[-1]
  dmean, dmean_square = dmoments[0] / count, dmoments[1] * (2.0 / count)
  return ((x.astype(jnp.float32) * dmean_square + dmean).astype(x.dtype),)


_local_moments.defvjp(_local_moments_fwd, _local_moments_bwd)


def _multiplier(var: jax.Array, scale: jax.Array, epsilon: float) -> jax.Array:
  return jax.lax.rsqrt(var + epsilon) * scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def normalize_relu(
  x: jax.Array,
  mean: jax.Array,
  var: jax.Array,
  scale: jax.Array,
  bias: jax.Array,
  epsilon: float,
) -> jax.Array:
  """relu((x - mean) * rsqrt(var + epsilon) * scale + bias) over the last axis (channels), in float32, returned
  in x's dtype; mean, var, scale and bias are [channels] float32.

  Differentiable in all five arrays. The gradients of mean and var come out as vectors, so the statistics' own
  gradient (and the collective of synchronised BN) stays with autodiff outside this function.
  """
  multiplier = _multiplier(var, scale, epsilon)
  # x * multiplier + shift rather than (x - mean) * multiplier + bias: the backward pass computes x - mean, and
  # XLA would otherwise share it with the forward pass by storing it, a full-size array per BatchNorm.
  y = x.astype(jnp.float32) * multiplier + (bias - mean * multiplier)
  return jnp.maximum(y, 0.0).astype(x.dtype)


def _normalize_relu_fwd(x, mean, var, scale, bias, epsilon):
  return normalize_relu(x, mean, var, scale, bias, epsilon), (x, mean, var, scale, bias)


def _normalize_relu_bwd(epsilon, residuals, dz):
  x, mean, var, scale, bias = residuals
  rstd = jax.lax.rsqrt(var + epsilon)
  multiplier = rstd * scale
  x32 = x.astype(jnp.float32)
  # The ReLU's mask and the two sums without x - mean as a full-size array: XLA would store it between its users.
  dy = jnp.where(x32 * multiplier > mean * multiplier - bias, dz.astype(jnp.float32), 0.0)
  axes = tuple(range(x.ndim - 1))
  sum_dy = jnp.sum(dy, axis=axes)
  sum_dy_centred = jnp.sum(dy * x32, axis=axes) - mean * sum_dy
  dx = (dy * multiplier).astype(x.dtype)
  dmean = -sum_dy * multiplier
  dvar = -0.5 * sum_dy_centred * scale * rstd**3
  return dx, dmean, dvar, sum_dy_centred * rstd, sum_dy


normalize_relu.defvjp(_normalize_relu_fwd, _normalize_relu_bwd)


class BatchNorm(nn.Module):
  """Batch normalisation over all axes but the last, optionally followed by a ReLU (`relu`).

  Attributes:
    use_running_average: normalise with the running statistics (inference) instead of the batch's.
    momentum: running-average momentum (Flax convention: new = momentum * old + (1 - momentum) * batch).
    epsilon: added to the variance.
    dtype: output dtype; statistics and normalisation are computed in float32.
    axis_name: mapped axis over which batch statistics are averaged (synchronised BN).
    relu: apply a ReLU to the output.
    custom_gradient: with `relu`, normalise through `normalize_relu` (its gradient written out); False leaves
      BatchNorm and ReLU to autodiff. Inside a rematerialised layer use False: measured on DenseNet-121 at 896 px
      (batch 4), the compiled step with rematerialised dense layers needed 8.1 GB of temporaries with the written
      gradient, as much as without remat, and 4.2 GB with autodiff's.
  """

  use_running_average: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = None
  axis_name: str | None = None
  relu: bool = False
  custom_gradient: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, moments: jax.Array | None = None) -> jax.Array:
    """Normalises x [..., channels]. In training, `moments` ([2, channels], `moments(x, axis_name)`) may be
    given when the caller has them already; they are then used as x's batch moments, unchecked."""
    channels = x.shape[-1]
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (channels,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (channels,), jnp.float32)
    scale = self.param('scale', nn.initializers.ones, (channels,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (channels,), jnp.float32)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      if moments is None:
        moments = self._moments(x)
      elif moments.shape != (2, channels):
        raise ValueError(
          f'moments of shape {moments.shape} for {channels} channels; expected (2, {channels})'
        )
      mean = moments[0]
      var = jnp.maximum(0.0, moments[1] - jnp.square(mean))
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    dtype = self.dtype or jnp.result_type(x, jnp.float32)
    if self.relu and self.custom_gradient:
      return normalize_relu(x, mean, var, scale, bias, self.epsilon).astype(dtype)
    y = (x.astype(jnp.float32) - mean) * _multiplier(var, scale, self.epsilon) + bias
    # nn.relu, not jnp.maximum: with the latter's derivative XLA no longer rematerialised the layer (as above).
    return (nn.relu(y) if self.relu else y).astype(dtype)

  def _moments(self, x: jax.Array) -> jax.Array:
    # No collective at init: there is no mapped axis then.
    return moments(x, None if self.is_initializing() else self.axis_name)
