"""DICOM decoding to the codebase's one image convention: uint8 grayscale, 0 = dark (air), 255 = bright (bone).

The grey-level pipeline follows the DICOM standard (PS3.3 C.11) in display order:

  1. stored values -> Modality LUT (Modality LUT Sequence, or RescaleSlope / RescaleIntercept), via pydicom;
  2. VOI transform into 0..255: a VOI LUT Sequence when present (pydicom's `apply_voi_lut` prefers it too), else
     the first WindowCenter / WindowWidth pair (with VOILUTFunction LINEAR, LINEAR_EXACT or SIGMOID, computed by
     pydicom's `apply_windowing`) when both values are there, finite and the width is at least 1, else a min-max
     stretch of the image itself. Writers do leave the window tags present but empty, or write a width of 0; such
     a window says nothing about the display, so it is treated as absent rather than as an error;
  3. MONOCHROME1 (low values = bright), or a Presentation LUT Shape of INVERSE, is inverted so that lungs are dark
     in every output. The two are one inversion, not two: PS3.3's DX Image module requires INVERSE exactly when
     the image is MONOCHROME1 (and IDENTITY with MONOCHROME2), so a MONOCHROME1 radiograph carrying INVERSE is
     inverted once, like any MONOCHROME1 file, while INVERSE on a MONOCHROME2 file inverts it.

Why min-max when the file has no VOI: it is a plain linear map that keeps the whole stored range (dense bone,
implants and burned-in markers are not clipped), and it is the normalisation the public VinDr-CXR / VinBigData
pipelines apply to these files, so models and published numbers carry over. Clipping at the 0.5 / 99.5
percentiles would give more contrast when a few outlier pixels dominate the range, at the cost of saturating real
anatomy in some images; it is not done here.

Compressed transfer syntaxes are decoded by whichever pydicom pixel-data plugins are installed (pillow handles
JPEG Baseline and JPEG 2000; pylibjpeg or GDCM add JPEG Lossless and JPEG-LS). Every failure raises ValueError
naming the file, and the transfer syntax when decoding fails.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

_GRAYSCALE = ('MONOCHROME1', 'MONOCHROME2')
_PIXEL_DATA = ('PixelData', 'FloatPixelData', 'DoubleFloatPixelData')


def read_dicom(path: str | os.PathLike) -> np.ndarray:
  """Decodes a single-frame grayscale DICOM to uint8, 0 = dark (air), 255 = bright (bone).

  Args:
    path: the DICOM file (any transfer syntax an installed pydicom plugin decodes).

  Returns:
    uint8 [Rows, Columns] after the Modality LUT, the first VOI LUT or usable window (else a min-max stretch) and,
    for MONOCHROME1 or Presentation LUT Shape INVERSE, inversion (see the module docstring).

  Raises:
    ValueError: naming the file when it is missing, not DICOM, truncated, has no pixel data, is multi-frame or
      not grayscale, or its pixel data cannot be decoded (the message names the transfer syntax).
  """
  ds = _read(path, stop_before_pixels=False)
  if not any(name in ds for name in _PIXEL_DATA):
    raise ValueError(f'{path}: no pixel data in the file')
  frames = int(ds.get('NumberOfFrames', 1) or 1)
  if frames > 1:
    raise ValueError(f'{path}: {frames} frames; only single-frame images are supported')
  photometric = str(ds.get('PhotometricInterpretation', '')).strip().upper()
  if photometric not in _GRAYSCALE:
    raise ValueError(
      f'{path}: PhotometricInterpretation {photometric!r} is not grayscale; expected one of {_GRAYSCALE}'
    )
  try:
    stored = ds.pixel_array
  except Exception as e:  # each pixel plugin raises its own types
    raise ValueError(
      f'{path}: cannot decode pixel data with transfer syntax {_syntax_name(ds)} '
      f'({type(e).__name__}: {e})'
    ) from None
  if stored.ndim != 2:
    raise ValueError(f'{path}: pixel data has shape {stored.shape}; expected [rows, columns]')

  try:
    values = apply_modality_lut(stored, ds)
    if ds.get('VOILUTSequence'):
      out = _apply_voi_lut_sequence(values, ds)
    elif (window := _window(ds)) is not None:
      out = _apply_window(values, ds, *window)
    else:
      out = _min_max(values)
  except (ValueError, TypeError, IndexError, KeyError, NotImplementedError, AttributeError) as e:
    # A malformed LUT (e.g. one without LUT Data) or window value (not a number) surfaces here as pydicom's own
    # error.
    raise ValueError(
      f'{path}: cannot apply the Modality / VOI LUT ({type(e).__name__}: {e})'
    ) from None
  shape = str(ds.get('PresentationLUTShape', '') or '').strip().upper()
  if photometric == 'MONOCHROME1' or shape == 'INVERSE':
    out = 255.0 - out
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def read_size(path: str | os.PathLike) -> tuple[int, int]:
  """Reads an image's size from its DICOM header only (the pixel data is not read).

  Args:
    path: the DICOM file.

  Returns:
    (Rows, Columns), i.e. (height, width) in pixels.

  Raises:
    ValueError: naming the file when it is missing, not DICOM or has no Rows / Columns.
  """
  ds = _read(path, stop_before_pixels=True)
  rows, columns = ds.get('Rows'), ds.get('Columns')
  if not rows or not columns:
    raise ValueError(f'{path}: DICOM header has no Rows / Columns (got {rows!r}, {columns!r})')
  return int(rows), int(columns)


def _read(path: str | os.PathLike, stop_before_pixels: bool) -> Dataset:
  """`dcmread` with errors turned into ValueError naming the file.

  pydicom reads a file cut inside encapsulated pixel data by warning and dropping the element, which would later
  look like "no pixel data"; the warnings are kept so that such a file is reported as truncated.
  """
  if not os.path.isfile(path):
    raise ValueError(f'{path}: no such file')
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    try:
      ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError as e:
      raise ValueError(f'{path}: not a DICOM file ({e})') from None
    except Exception as e:  # a damaged file can fail anywhere in the parser
      raise ValueError(f'{path}: cannot read DICOM ({type(e).__name__}: {e})') from None
  messages = [str(w.message) for w in caught]
  truncated = [m for m in messages if 'End of file' in m or 'end of file' in m]
  if truncated:
    raise ValueError(f'{path}: the file is truncated ({truncated[0]})')
  for w in caught:
    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
  return ds


def _syntax_name(ds: Dataset) -> str:
  uid = ds.file_meta.get('TransferSyntaxUID') if hasattr(ds, 'file_meta') else None
  return f'{uid.name} ({uid})' if uid else 'unknown (no TransferSyntaxUID)'


def _apply_voi_lut_sequence(values: np.ndarray, ds: Dataset) -> np.ndarray:
  """The first VOI LUT, its output stretched to 0..255 by the range of the table's own entries.

  The table's entries rather than its nominal bit depth (LUT Descriptor, 3rd value) set the scale, because some
  writers declare 16 bits for 12-bit tables, which would leave the image nearly black.
  """
  descriptor = ds.VOILUTSequence[0].LUTDescriptor
  entries, first = descriptor[0] or 2**16, descriptor[1]
  # LUT inputs are integers (the Modality LUT output of integer stored values).
  table = apply_voi(np.arange(first, first + entries, dtype=np.int64), ds).astype(np.float64)
  out = apply_voi(np.round(values).astype(np.int64), ds).astype(np.float64)
  lo, hi = table.min(), table.max()
  return (out - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(out)


def _window(ds: Dataset) -> tuple[float, float] | None:
  """The first (WindowCenter, WindowWidth) pair, or None when either is absent or empty, or the pair is unusable.

  Unusable: a value that is not finite, or a width below 1 (PS3.3 C.11.2.1.2 requires width >= 1).

  Raises:
    ValueError: a value that is there but is not a number.
  """
  center, width = (
    _first(ds[name]) if name in ds else None for name in ('WindowCenter', 'WindowWidth')
  )
  if center is None or width is None:
    return None
  if not (math.isfinite(center) and math.isfinite(width) and width >= 1.0):
    return None
  return center, width


def _first(element: DataElement) -> float | None:
  """An element's first value as a number; None when it has no value or that value is empty."""
  if element.VM == 0:
    return None
  value = element.value[0] if element.VM > 1 else element.value
  if value is None or (isinstance(value, str) and not value.strip()):
    return None
  return float(value)


def _apply_window(values: np.ndarray, ds: Dataset, center: float, width: float) -> np.ndarray:
  """One WindowCenter / WindowWidth pair, straight into 0..255.

  pydicom's `apply_windowing` maps the window onto the output range it infers from BitsStored and the rescale;
  handing it a dataset that declares 8-bit unsigned output makes that range 0..255 exactly, with the Modality LUT
  already applied to `values` (the window is in Modality LUT output units).
  """
  view = Dataset()
  view.PhotometricInterpretation = 'MONOCHROME2'
  view.BitsStored = 8
  view.PixelRepresentation = 0
  view.WindowCenter = center
  view.WindowWidth = width
  view.VOILUTFunction = str(ds.get('VOILUTFunction', '') or 'LINEAR')
  return apply_windowing(values, view)


def _min_max(values: np.ndarray) -> np.ndarray:
  values = values.astype(np.float64)
  lo, hi = values.min(), values.max()
  return (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
