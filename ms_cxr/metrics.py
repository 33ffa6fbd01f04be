"""Classification metrics on host numpy, finished with scikit-learn.

Conventions: a NaN target is unknown and left out of that label's metric; a label whose known
targets hold only one
class has no AUROC (None) and is skipped in the mean, which lists the labels it used.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn import metrics as sk_metrics


def per_class_auroc(
  probs: np.ndarray, targets: np.ndarray, labels: Sequence[str]
) -> dict[str, float | None]:
  """AUROC of each label over its known targets; None where only one class is present.

  Args:
    probs: float [N, K] predicted probabilities (or any monotone score).
    targets: float [N, K] of 0/1, NaN = unknown.
    labels: K names.

  Returns:
    label -> AUROC or None, in `labels` order.
  """
  probs, targets = np.asarray(probs), np.asarray(targets)
  if probs.shape != targets.shape or probs.shape[1:] != (len(labels),):
    raise ValueError(
      f'probs {probs.shape}, targets {targets.shape} and {len(labels)} labels disagree'
    )
  result = {}
  for k, label in enumerate(labels):
    known = ~np.isnan(targets[:, k])
    y = targets[known, k] >= 0.5
    if y.all() or not y.any():
      result[label] = None
    else:
      result[label] = float(sk_metrics.roc_auc_score(y, probs[known, k]))
  return result


def mean_auroc(per_class: dict[str, float | None]) -> float | None:
  """Macro mean over the labels that have an AUROC; None if none has."""
  values = [v for v in per_class.values() if v is not None]
  return float(np.mean(values)) if values else None
