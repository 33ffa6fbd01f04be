"""The record every dataset reader returns.

A reader turns a dataset's native files (CSV rows, folders, DICOM headers) into a list of `Record`s. Everything
after the reader -- splitting, the Grain pipeline, evaluation, reports -- sees records only, so a
new dataset needs a
reader and nothing else.

Conventions (shared with torchxrayvision, so users' habits carry over):
  * `labels[k]` is 1.0 (present), 0.0 (absent) or NaN (unknown: masked out of the loss and of every metric).
  * Boxes are in image fractions, (x0, y0, x1, y1) with 0 <= x0 < x1 <= 1, so they hold at any rendered size.
  * Splits are made by patient: all images of `patient_id` fall on one side.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Box:
  """A finding's bounding box in image fractions (resolution independent)."""

  label: str
  x0: float
  y0: float
  x1: float
  y1: float


@dataclasses.dataclass(frozen=True, eq=False)
class Record:
  """One image of a dataset, as a reader returns it.

  Attributes:
    id: unique image id within the dataset (the file name for the real sets); the `id` column of
      `predictions.csv`.
    image: where the pixels come from: a file path, or `synthetic:<seed>:<index>` for the embedded
    set.
    labels: float32 [num_labels], 1 / 0 / NaN (unknown).
    patient_id: patient identifier; splits never separate one patient's images.
    study_id: study (visit) identifier.
    view: 'PA', 'AP', 'LATERAL' or '' when unknown.
    boxes: bounding boxes of findings where the dataset has them.
  """

  id: str
  image: str
  labels: np.ndarray
  patient_id: str
  study_id: str = ''
  view: str = ''
  boxes: tuple[Box, ...] = ()


def label_matrix(records: Sequence[Record], num_labels: int) -> np.ndarray:
  """Stacks the records' labels into a float32 [N, num_labels] matrix (NaN = unknown)."""
  if not records:
    return np.zeros((0, num_labels), np.float32)
  return np.stack([np.asarray(r.labels, np.float32) for r in records])
