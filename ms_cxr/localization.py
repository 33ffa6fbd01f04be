"""Localization of attention maps against annotated boxes: pointing game and IoU, per label.

A class-wise map [h, w] of an image is scored against the boxes of the same label on that image (ChestX-ray14's
`BBox_List_2017.csv`, VinDr's radiologist boxes, the synthetic set's finding boxes), only where the label is
present and boxed. Boxes are fractions of the image; map cell (r, c) covers rows r/h..(r+1)/h and columns
c/w..(c+1)/w of it.

  * pointing game (Zhang et al. 2016): a hit when the centre of the map's maximal cell lies inside a box of the
    label (optionally grown by `tolerance`, a fraction of the image side); the hit rate is hits / images. The
    maximum is taken on the map itself: bilinear upsampling peaks at that same centre, except that beyond the
    outermost centres it holds the edge values, so on an upsampled coarse map (DenseNet's 7 x 7 at 224 px) an
    edge or corner peak is a band of ties whose first pixel lies on the image border. A flat map (no maximum)
    is a miss, counted in `flat_maps`; among exactly tied cells the first in row-major order is taken.
  * IoU: the map upsampled bilinearly to a `grid` x `grid` raster of the image (the grid only sets the
    precision), min-max normalised to [0, 1] and thresholded at `threshold`, against the union of the label's
    boxes.

Runs on host numpy; the maps come from `ms_cxr.models.attention_maps` (MS-ANet's fused map, or DenseNet's class
activation map).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from ms_cxr.data.records import Box, Record


def upsample(map_hw: np.ndarray, grid: int) -> np.ndarray:
  """A float map [h, w] -> [grid, grid], bilinear (pixel centres aligned, as image resizing does)."""
  image = Image.fromarray(np.asarray(map_hw, np.float32), mode='F')
  return np.asarray(image.resize((grid, grid), Image.BILINEAR), np.float32)


def _centres(grid: int) -> np.ndarray:
  return (np.arange(grid, dtype=np.float64) + 0.5) / grid


def box_mask(boxes: Sequence[Box], grid: int, tolerance: float = 0.0) -> np.ndarray:
  """bool [grid, grid]: pixels whose centre lies in any box (each grown by `tolerance` of the side)."""
  centres = _centres(grid)
  mask = np.zeros((grid, grid), np.bool_)
  for box in boxes:
    rows = (centres >= box.y0 - tolerance) & (centres <= box.y1 + tolerance)
    cols = (centres >= box.x0 - tolerance) & (centres <= box.x1 + tolerance)
    mask |= rows[:, None] & cols[None, :]
  return mask


def pointed_at(map_hw: np.ndarray) -> tuple[float, float] | None:
  """(y, x), image fractions, of the centre of the map's maximal cell (the first of exact ties); None for a flat
  map, which points nowhere."""
  values = np.asarray(map_hw, np.float64)
  if not values.max() > values.min():
    return None
  row, col = np.unravel_index(int(np.argmax(values)), values.shape)
  return (row + 0.5) / values.shape[0], (col + 0.5) / values.shape[1]


def pointing_hit(map_hw: np.ndarray, boxes: Sequence[Box], tolerance: float = 0.0) -> bool:
  """Whether the map points inside one of `boxes`, each grown by `tolerance` of the side (False for a flat
  map)."""
  point = pointed_at(map_hw)
  if point is None:
    return False
  y, x = point
  return any(
    b.y0 - tolerance <= y <= b.y1 + tolerance and b.x0 - tolerance <= x <= b.x1 + tolerance
    for b in boxes
  )


def iou(map_hw: np.ndarray, boxes: Sequence[Box], grid: int, threshold: float = 0.5) -> float:
  """IoU of the map thresholded at `threshold` (after min-max normalisation) with the union of `boxes`."""
  up = upsample(map_hw, grid)
  lo, hi = float(up.min()), float(up.max())
  normalised = (up - lo) / (hi - lo) if hi > lo else np.zeros_like(up)
  predicted = normalised >= threshold
  truth = box_mask(boxes, grid)
  union = np.count_nonzero(predicted | truth)
  return float(np.count_nonzero(predicted & truth) / union) if union else 0.0


def boxed_images(records: Sequence[Record], labels: Sequence[str]) -> list[int]:
  """Indices of the records with at least one box of a label in `labels` whose target is positive."""
  column = {label: k for k, label in enumerate(labels)}
  out = []
  for i, record in enumerate(records):
    if any(b.label in column and record.labels[column[b.label]] == 1.0 for b in record.boxes or ()):
      out.append(i)
  return out


def score(
  maps: np.ndarray,
  records: Sequence[Record],
  labels: Sequence[str],
  *,
  grid: int = 224,
  threshold: float = 0.5,
  tolerance: float = 0.0,
) -> dict[str, Any]:
  """Pointing game and IoU per label over the records' boxes.

  Args:
    maps: float [N, h, w, K], one map per record and label (same order as `records` and `labels`).
    records: the images scored; their `boxes` give the ground truth.
    labels: the K label names (a box of another label is ignored).
    grid: raster side the maps are upsampled to for the IoU.
    threshold: IoU binarisation of the normalised map.
    tolerance: pointing-game margin around each box, a fraction of the image side.

  Returns:
    {'per_label': {label: {'num_images', 'pointing_game', 'flat_maps', 'mean_iou'}} (None where no image of the label is
    boxed), 'mean_pointing_game' and 'mean_iou' over labels with boxes, 'labels_without_boxes', and the settings.
  """
  maps = np.asarray(maps)
  if maps.ndim != 4 or maps.shape[0] != len(records) or maps.shape[-1] != len(labels):
    raise ValueError(
      f'maps of shape {maps.shape}: expected [{len(records)}, h, w, {len(labels)}] for the records and labels'
    )
  hits: dict[str, list[bool]] = {label: [] for label in labels}
  ious: dict[str, list[float]] = {label: [] for label in labels}
  flat: dict[str, int] = {label: 0 for label in labels}
  for i, record in enumerate(records):
    by_label: dict[str, list[Box]] = {}
    for box in record.boxes or ():
      by_label.setdefault(box.label, []).append(box)
    for k, label in enumerate(labels):
      boxes = by_label.get(label)
      if not boxes or record.labels[k] != 1.0:
        continue
      hits[label].append(pointing_hit(maps[i, :, :, k], boxes, tolerance))
      flat[label] += pointed_at(maps[i, :, :, k]) is None
      ious[label].append(iou(maps[i, :, :, k], boxes, grid, threshold))
  per_label = {
    label: {
      'num_images': len(hits[label]),
      'pointing_game': float(np.mean(hits[label])),
      'flat_maps': flat[label],
      'mean_iou': float(np.mean(ious[label])),
    }
    if hits[label]
    else None
    for label in labels
  }
  scored = [v for v in per_label.values() if v is not None]
  return {
    'per_label': per_label,
    'mean_pointing_game': float(np.mean([v['pointing_game'] for v in scored])) if scored else None,
    'mean_iou': float(np.mean([v['mean_iou'] for v in scored])) if scored else None,
    'labels_without_boxes': [label for label, v in per_label.items() if v is None],
    'grid': grid,
    'iou_threshold': threshold,
    'pointing_tolerance': tolerance,
  }
