"""MS-ANet losses: class-imbalance-weighted BCE, focal BCE, and attention consistency under image transforms.

Every loss returns a (sum, count) pair, as `ms_cxr.losses` does, so a data-parallel step divides the global sum by
the global count; unknown labels (NaN) contribute neither loss nor gradient.

From Guo et al., "Visual Attention Consistency under Image Transforms for Multi-Label Image Classification" (CVPR
2019), which MS-ANet's abstract follows:
  - the consistency loss: mean squared difference between CAM(T(x)), the class activation maps of the transformed
    image, and T(CAM(x)), the same transform applied to the maps of the original (`attention_consistency_sum`);
    the CAMs come from the classifier weights under stop-gradient (see `ms_cxr.models.msanet`);
  - the weighted BCE: w_pos = exp(1 - p_k) on positives, w_neg = exp(p_k) on negatives, p_k the training positive
    rate of label k (`positive_rates`, `imbalance_weights`, `weighted_bce_sum`).
Reconstructed (MS-ANet's text is not public; each a function argument, so a config field):
  - transforms that keep the frame (`transform_images` / `transform_maps`): 'rescale' is a zoom about the centre
    within the same image size (Guo et al. resize the whole input instead), plus 'translate', 'rotate' and 'hflip'
    (a radiograph mirrored puts the heart on the wrong side, so it is not the default). `random_transform_params`
    defaults: zoom in U(1, 1.25) (zooming in keeps every output pixel inside the original, so T(CAM(x)) never
    needs a fill value), shifts up to ±10 % per axis, angles up to ±10°, flips always;
  - the mask of `attention_consistency_sum` (e.g. only labels present in the image); training masks out what
    'translate' and 'rotate' move out of the frame (`frame_mask`);
  - `cross_scale_consistency_sum`, agreement of the scales' maps with each other;
  - `focal_bce_sum` (Lin et al. 2017) as the alternative imbalance treatment;
  - a label with no known entries has no positive rate (NaN) and gets weights 1.

Geometry: a transform is defined in normalised coordinates (the image spans [-1, 1] on each axis, pixel centres at
(2i + 1) / n - 1, the convention of `jax.image.resize`), so the same parameters transform an image and a CAM of any
resolution consistently. Rotation is about the centre in those coordinates: rigid for square inputs (every input in
this codebase), a rotation with a stretch otherwise. Sampling is bilinear, zero outside the frame (`cval`).

Typical use in a train step (transform parameters drawn per step, both branches differentiated):
  params = random_transform_params(key, 'rescale', batch)
  out, out_t = apply(images), apply(transform_images(images, 'rescale', params))
  for cam, cam_t in zip(out['cams'], out_t['cams']):
    total, count = attention_consistency_sum(cam_t, transform_maps(cam, 'rescale', params))
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

TRANSFORMS = ('rescale', 'translate', 'rotate', 'hflip')


def positive_rates(label_matrix: np.ndarray) -> np.ndarray:
  """Positive rate p_k of each label over its known entries (host numpy).

  Args:
    label_matrix: [num_images, num_labels] in [0, 1] (soft labels count fractionally), NaN = unknown.

  Returns:
    float64 [num_labels]; NaN for a label with no known entry.
  """
  labels = np.asarray(label_matrix, np.float64)
  known = np.sum(~np.isnan(labels), axis=0)
  positives = np.nansum(labels, axis=0)
  return np.where(known > 0, positives / np.maximum(known, 1), np.nan)


def imbalance_weights(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Guo et al.'s class-imbalance weights (w_pos, w_neg) = (exp(1 - p), exp(p)), float32 [num_labels].

  A rare label (small p) weighs its positives up to e and its negatives down to 1. A NaN rate (a label never
  observed) gets weights 1, leaving that label's loss unweighted.
  """
  p = np.asarray(p, np.float64)
  w_pos = np.where(np.isnan(p), 1.0, np.exp(1.0 - p))
  w_neg = np.where(np.isnan(p), 1.0, np.exp(p))
  return w_pos.astype(np.float32), w_neg.astype(np.float32)


def weighted_bce_sum(
  logits: jax.Array, labels: jax.Array, w_pos: jax.Array, w_neg: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Class-weighted binary cross-entropy summed over known labels.

  Per entry: -(w_pos_k * y * log sigmoid(z) + w_neg_k * (1 - y) * log(1 - sigmoid(z))).

  Args:
    logits: float [batch, num_labels].
    labels: float [batch, num_labels] in [0, 1], NaN = unknown.
    w_pos: float [num_labels], weight of the positive term.
    w_neg: float [num_labels], weight of the negative term.

  Returns:
    (sum over known entries, number of known entries), float32 scalars; the mean divides by the count, not by the
    sum of weights.
  """
  known = ~jnp.isnan(labels)
  targets = jnp.where(known, labels, 0.0)
  logits = logits.astype(jnp.float32)
  per_entry = -(
    w_pos * targets * jax.nn.log_sigmoid(logits)
    + w_neg * (1 - targets) * jax.nn.log_sigmoid(-logits)
  )
  return jnp.sum(jnp.where(known, per_entry, 0.0)), jnp.sum(known.astype(jnp.float32))


def focal_bce_sum(
  logits: jax.Array, labels: jax.Array, gamma: float = 2.0, alpha: float | None = None
) -> tuple[jax.Array, jax.Array]:
  """Focal binary cross-entropy (Lin et al. 2017) summed over known labels; gamma=0, alpha=None is plain BCE.

  Args:
    logits: float [batch, num_labels].
    labels: float [batch, num_labels] in [0, 1], NaN = unknown.
    gamma: focusing exponent on (1 - p_t).
    alpha: weight of positives (1 - alpha for negatives), or None for no class weighting.

  Returns:
    (sum over known entries, number of known entries), float32 scalars.
  """
  known = ~jnp.isnan(labels)
  targets = jnp.where(known, labels, 0.0)
  per_entry = optax.sigmoid_focal_loss(
    logits.astype(jnp.float32), targets, alpha=alpha, gamma=gamma
  )
  return jnp.sum(jnp.where(known, per_entry, 0.0)), jnp.sum(known.astype(jnp.float32))


def _per_image(value, batch: int) -> jax.Array:
  return jnp.broadcast_to(jnp.asarray(value, jnp.float32), (batch,))


def _source_coordinates(
  transform: str, params: Mapping[str, jax.Array], batch: int, height: int, width: int
) -> tuple[jax.Array, jax.Array]:
  """Pixel coordinates (row, col), each [B, H, W], that every output pixel samples from in the input.

  The inverse transform is applied in pixel units around the centre; for these transforms that equals applying it
  in normalised coordinates, and identity, flips and whole-pixel shifts give exactly integral coordinates.
  """
  if transform not in TRANSFORMS:
    raise ValueError(f'transform={transform!r}; expected one of {TRANSFORMS}')
  centre_y, centre_x = (height - 1) / 2, (width - 1) / 2
  y = jnp.arange(height, dtype=jnp.float32)[None, :, None] - centre_y
  x = jnp.arange(width, dtype=jnp.float32)[None, None, :] - centre_x

  def column(value):  # a per-image value broadcast against [B, H, W]
    return _per_image(value, batch)[:, None, None]

  if transform == 'rescale':
    inverse = 1.0 / column(params['scale'])
    return y * inverse + centre_y, x * inverse + centre_x
  if transform == 'translate':
    # Fractions of the image size; positive moves content right (dx) and down (dy).
    return y - column(params['dy']) * height + centre_y, x - column(params['dx']) * width + centre_x
  if transform == 'rotate':
    # Positive angles turn content from +x towards +y (clockwise as displayed, rows growing downwards).
    angle = column(params['angle'])
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    source_y = cos * y - sin * x * (height / width)
    source_x = sin * y * (width / height) + cos * x
    return source_y + centre_y, source_x + centre_x
  flip = jnp.broadcast_to(jnp.asarray(params['flip'], bool), (batch,))[:, None, None]
  return jnp.broadcast_to(y + centre_y, (batch, height, width)), jnp.where(flip, -x, x) + centre_x


def _warp(arrays: jax.Array, transform: str, params: Mapping[str, jax.Array], cval) -> jax.Array:
  """Bilinear resampling of float [B, H, W, C] under the transform (values outside the frame are `cval`)."""
  batch, height, width, _ = arrays.shape
  rows, cols = _source_coordinates(transform, params, batch, height, width)

  def sample(channel, rows, cols):
    return jax.scipy.ndimage.map_coordinates(
      channel, (rows, cols), order=1, mode='constant', cval=cval
    )

  per_channel = jax.vmap(sample, in_axes=(-1, None, None), out_axes=-1)
  return jax.vmap(per_channel)(arrays, rows, cols)


def transform_images(
  images: jax.Array, transform: str, params: Mapping[str, jax.Array], cval: float = 0.0
) -> jax.Array:
  """Applies a geometric transform to images [B, H, W, C], keeping their size and dtype.

  Integer images are sampled in float32 and rounded back (the model normalises uint8 and float inputs differently,
  so the transformed batch must stay uint8).

  Args:
    images: uint8 or float [B, H, W, C].
    transform: one of `TRANSFORMS`.
    params: per transform, scalars or [B] arrays: 'rescale' {'scale': zoom factor, > 1 zooms in},
      'translate' {'dx', 'dy': fractions of width and height}, 'rotate' {'angle': radians}, 'hflip' {'flip': bool}.
    cval: value outside the original frame, a Python number (static under jit).

  Returns:
    The transformed images, same shape and dtype.
  """
  if not jnp.issubdtype(images.dtype, jnp.integer):
    return _warp(images, transform, params, cval).astype(images.dtype)
  info = jnp.iinfo(images.dtype)
  warped = _warp(images.astype(jnp.float32), transform, params, cval)
  return jnp.clip(jnp.round(warped), info.min, info.max).astype(images.dtype)


def transform_maps(
  maps: jax.Array, transform: str, params: Mapping[str, jax.Array], cval: float = 0.0
) -> jax.Array:
  """Applies the transform of `transform_images` (same parameters) to maps [B, h, w, K] of any resolution.

  Args:
    maps: float [B, h, w, K], e.g. CAMs.
    transform: one of `TRANSFORMS`.
    params: as for `transform_images`.
    cval: value outside the original frame, a Python number (static under jit).

  Returns:
    float [B, h, w, K].
  """
  return _warp(maps, transform, params, cval)


# Transforms that move part of the original frame out of view: T(CAM(x)) there is the fill value, not evidence.
FRAME_LEAVING = ('translate', 'rotate')


def frame_mask(
  maps: jax.Array, transform: str, params: Mapping[str, jax.Array]
) -> jax.Array | None:
  """Where T(CAM(x)) comes from inside the original frame, as float [B, h, w, 1] (1 inside, 0 outside), for the
  `mask` of `attention_consistency_sum`; None for transforms that keep every position inside (zoom in, flip).

  Outside the frame T(CAM(x)) is `cval` (0, a logit of p = 0.5) while CAM(T(x)) sees the black border the
  transform brought into the image; comparing the two there would train the maps toward the fill value.
  """
  if transform not in FRAME_LEAVING:
    return None
  ones = jnp.ones((*maps.shape[:3], 1), jnp.float32)
  return (transform_maps(ones, transform, params) > 0.5).astype(jnp.float32)


def random_transform_params(
  key: jax.Array,
  transform: str,
  batch: int,
  *,
  scale_range: tuple[float, float] = (1.0, 1.25),
  max_shift: float = 0.1,
  max_angle: float = math.radians(10.0),
  flip_prob: float = 1.0,
) -> dict[str, jax.Array]:
  """Per-image transform parameters drawn uniformly (traceable: a new draw every step from its key).

  Args:
    key: PRNG key.
    transform: one of `TRANSFORMS`.
    batch: number of images.
    scale_range: 'rescale' zoom factors (low, high).
    max_shift: 'translate' shifts in [-max_shift, max_shift] of the image size, per axis.
    max_angle: 'rotate' angles in [-max_angle, max_angle] radians.
    flip_prob: 'hflip' probability that an image is flipped.

  Returns:
    The `params` dict of `transform_images`, each entry [batch].
  """
  if transform == 'rescale':
    return {
      'scale': jax.random.uniform(key, (batch,), minval=scale_range[0], maxval=scale_range[1])
    }
  if transform == 'translate':
    dx, dy = jax.random.uniform(key, (2, batch), minval=-max_shift, maxval=max_shift)
    return {'dx': dx, 'dy': dy}
  if transform == 'rotate':
    return {'angle': jax.random.uniform(key, (batch,), minval=-max_angle, maxval=max_angle)}
  if transform == 'hflip':
    return {'flip': jax.random.bernoulli(key, flip_prob, (batch,))}
  raise ValueError(f'transform={transform!r}; expected one of {TRANSFORMS}')


def _to_common_grid(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Brings two [B, h, w, K] maps to the finer of their grids (bilinear upsampling of the coarser)."""
  if a.shape == b.shape:
    return a, b
  target = max(a.shape, b.shape, key=lambda s: s[1] * s[2])
  return tuple(jax.image.resize(m, target, method='bilinear') for m in (a, b))


def attention_consistency_sum(
  cams_of_transformed: jax.Array, transformed_cams: jax.Array, mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """Squared difference between CAM(T(x)) and T(CAM(x)), summed (Guo et al.'s consistency loss).

  Args:
    cams_of_transformed: float [B, h, w, K], the model's maps for the transformed images.
    transformed_cams: float [B, h', w', K], the transform applied to the maps of the original images; resized to
      the finer of the two grids if the shapes differ.
    mask: optional weights broadcastable to [B, h, w, K] on that grid, e.g. `labels[:, None, None, :] == 1` to
      constrain only labels present, or the transformed frame.

  Returns:
    (sum of squared differences, number of map entries counted), float32 scalars; sum / count is the MSE.
  """
  a, b = _to_common_grid(
    cams_of_transformed.astype(jnp.float32), transformed_cams.astype(jnp.float32)
  )
  squared = jnp.square(a - b)
  if mask is None:
    return jnp.sum(squared), jnp.asarray(squared.size, jnp.float32)
  mask = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), squared.shape)
  return jnp.sum(squared * mask), jnp.sum(mask)


def cross_scale_consistency_sum(cams: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Squared differences between every pair of scales' maps on the finest grid, summed (reconstructed).

  Args:
    cams: float [B, h_s, w_s, K] per scale.

  Returns:
    (sum over pairs and entries, number of pair entries), float32 scalars.
  """
  finest = max((c.shape for c in cams), key=lambda s: s[1] * s[2])
  maps = [jax.image.resize(c.astype(jnp.float32), finest, method='bilinear') for c in cams]
  total = jnp.zeros((), jnp.float32)
  for i in range(len(maps)):
    for j in range(i + 1, len(maps)):
      total += jnp.sum(jnp.square(maps[i] - maps[j]))
  pairs = len(maps) * (len(maps) - 1) // 2
  return total, jnp.asarray(pairs * math.prod(finest), jnp.float32)
