"""Image decoding, resizing and augmentation on the host (numpy + PIL), one documented
normalisation.

Every image leaves here as uint8 grayscale [size, size, 1]: 0 is black (air, lungs), 255 white (bone). The model
turns it into ImageNet-normalised float (ms_cxr.models.densenet.normalize_images), so the host ships 1 byte per
pixel to the device. Aspect ratio: the image is resized to a square (chest radiographs are near-square; CheXpert's
320-px short side is stretched), which keeps the whole field of view.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import ml_collections
import numpy as np
from PIL import Image

from ms_cxr.data import dicom, synthetic


def load(ref: str, sizes: Sequence[int]) -> dict[int, np.ndarray]:
  """Reads an image reference once and returns it at each size: {size: uint8 grayscale [size, size]}.

  Args:
    ref: a file path (PNG/JPEG, 8 or 16 bit, grayscale or RGB; DICOM via ms_cxr.data.dicom) or a
      `synthetic:<seed>:<index>` reference (rendered at each size from its resolution-independent
      description).
    sizes: output sides.

  Raises:
    ValueError: naming the file when it is missing, truncated or not an image.
  """
  if ref.startswith('synthetic:'):
    return {size: synthetic.load(ref, size) for size in sizes}
  if ref.startswith('arrayrecord:'):
    pixels = _load_prepared(ref)  # pre-resized to the prepared size
    return {size: resize(pixels, size) for size in sizes}
  if ref.lower().endswith(('.dcm', '.dicom')):
    pixels = dicom.read_dicom(ref)  # raises ValueError naming the file
    return {size: resize(pixels, size) for size in sizes}
  try:
    with Image.open(ref) as img:
      if _is_16_bit_colour(img):
        raise ValueError(
          f'{ref}: a 16-bit colour PNG, of which Pillow reads only the high byte of each sample (a 12-bit '
          'radiograph would keep 16 grey levels); save it as 16-bit grayscale or 8-bit'
        )
      img.load()
      pixels = to_uint8_grayscale(img)
  except (OSError, SyntaxError) as e:
    raise ValueError(f'{ref}: cannot read image ({e})') from None
  except ValueError as e:
    message = str(e)
    raise ValueError(
      message if message.startswith(ref) else f'{ref}: cannot read image ({e})'
    ) from None
  return {size: resize(pixels, size) for size in sizes}


def _is_16_bit_colour(img: Image.Image) -> bool:
  """A PNG with 16-bit colour (or grey + alpha) samples, which Pillow opens as 8-bit by dropping the low byte
  (16-bit grayscale it opens whole, as mode I;16)."""
  return (
    img.format == 'PNG'
    and img.mode in ('RGB', 'RGBA', 'LA')
    and any(';16' in str(tile.args) for tile in img.tile)
  )


# The first prepared image of a process is read under this lock. ms_cxr.data.prepare is imported lazily (it imports
# this module, and tensorflow-datasets, whose own imports and first example decoding go through lazy imports); a
# pipeline's reader threads all start on a prepared image at once, and left to race they can deadlock there.
_PREPARED_FIRST_READ = threading.Lock()
_prepared_ready = False


def _load_prepared(ref: str) -> np.ndarray:
  global _prepared_ready
  if not _prepared_ready:
    with _PREPARED_FIRST_READ:
      from ms_cxr.data import prepare

      pixels = prepare.load_prepared(ref)
      _prepared_ready = True
      return pixels
  from ms_cxr.data import prepare

  return prepare.load_prepared(ref)


def to_uint8_grayscale(img: Image.Image) -> np.ndarray:
  """PIL image of any common mode -> uint8 grayscale array.

  16-bit (and 32-bit integer) images are stretched from their own minimum to their maximum, as a DICOM without a
  window is (ms_cxr.data.dicom): one rule for every image of a dataset, whether its values fill the 16-bit range
  (as the PNG standard has them) or hold a detector's raw 12 or 14 bits. Scaling by a peak guessed from each
  image's maximum would map the same stored value to grey levels 16x apart in two images of one dataset.
  """
  if img.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
    arr = np.asarray(img, dtype=np.float64)
    lo, hi = arr.min(), arr.max()
    if hi <= lo:
      return np.zeros(arr.shape, np.uint8)
    return np.clip(np.round((arr - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
  if img.mode != 'L':
    img = img.convert('L')
  return np.asarray(img, dtype=np.uint8)


def resize(pixels: np.ndarray, size_px: int) -> np.ndarray:
  """Square resize with area-averaging when shrinking (no aliasing of fine findings), bilinear when
  growing."""
  if pixels.shape == (size_px, size_px):
    return pixels
  img = Image.fromarray(pixels)
  shrinking = min(pixels.shape) > size_px
  return np.asarray(img.resize((size_px, size_px), Image.BOX if shrinking else Image.BILINEAR))


def augment(
  pixels: np.ndarray, rng: np.random.Generator, config: ml_collections.ConfigDict
) -> np.ndarray:
  """Random small affine (rotate, scale, translate), optional horizontal flip, contrast/brightness
  jitter.

  Args:
    pixels: uint8 [size, size].
    rng: the per-example generator (Grain derives it from the pipeline seed and the example index).
    config: `data.augment`.
  """
  size = pixels.shape[0]
  angle = math.radians(rng.uniform(-config.max_rotate_deg, config.max_rotate_deg))
  scale = rng.uniform(*config.scale_range)
  tx, ty = rng.uniform(-config.max_translate, config.max_translate, size=2) * size
  # PIL's affine maps output to input coordinates: invert rotation+scale about the centre, then
  # shift.
  cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
  c = (size - 1) / 2.0
  matrix = (cos, sin, c - cos * c - sin * c - tx, -sin, cos, c + sin * c - cos * c - ty)
  img = Image.fromarray(pixels).transform(
    (size, size), Image.AFFINE, matrix, resample=Image.BILINEAR, fillcolor=0
  )
  out = np.asarray(img, dtype=np.float32)
  if config.hflip and rng.random() < 0.5:
    out = out[:, ::-1]
  if config.max_contrast > 0:
    gain = 1.0 + rng.uniform(-config.max_contrast, config.max_contrast)
    bias = rng.uniform(-config.max_contrast, config.max_contrast) * 255.0
    out = (out - 127.5) * gain + 127.5 + bias
  return np.clip(np.round(out), 0, 255).astype(np.uint8)
