"""Fusing a multi-scale model's per-size predictions (and an ensemble's per-model predictions).

Rules, all from logits {size: [N, K]}:
  mean_prob    mean of the sizes' probabilities (default)
  mean_logit   sigmoid of the mean logit
  max          the largest probability over sizes
  best_on_val  per label, the probability of the size with the best AUROC on the validation split
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ms_cxr import metrics

# The first is the default (configs/base.py).
FUSIONS = ('mean_prob', 'mean_logit', 'max', 'best_on_val')


def sigmoid(x: np.ndarray) -> np.ndarray:
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def fuse(
  logits: Mapping[int, np.ndarray], rule: str, best_size: Sequence[int] | None = None
) -> np.ndarray:
  """Fused probabilities [N, K].

  Args:
    logits: {size: logits [N, K]}.
    rule: one of FUSIONS.
    best_size: for best_on_val, the chosen size of each label (see `best_size_per_label`).
  """
  sizes = sorted(logits)
  stacked = np.stack([np.asarray(logits[s], np.float64) for s in sizes])  # [S, N, K]
  if rule == 'mean_prob':
    return sigmoid(stacked).mean(axis=0)
  if rule == 'mean_logit':
    return sigmoid(stacked.mean(axis=0))
  if rule == 'max':
    return sigmoid(stacked).max(axis=0)
  if rule == 'best_on_val':
    if best_size is None or len(best_size) != stacked.shape[2]:
      raise ValueError('best_on_val needs one chosen size per label (from the validation split)')
    probs = sigmoid(stacked)
    return np.stack([probs[sizes.index(s), :, k] for k, s in enumerate(best_size)], axis=1)
  raise ValueError(f'fusion rule {rule!r}; expected one of {FUSIONS}')


def best_size_per_label(
  val_logits: Mapping[int, np.ndarray], val_targets: np.ndarray, labels: Sequence[str]
) -> list[int]:
  """Per label, the size whose validation AUROC is highest (the smallest size wins ties or no AUROC)."""
  sizes = sorted(val_logits)
  scores = [metrics.per_class_auroc(sigmoid(val_logits[s]), val_targets, labels) for s in sizes]
  chosen = []
  for label in labels:
    values = [-np.inf if sc[label] is None else sc[label] for sc in scores]
    chosen.append(sizes[int(np.argmax(values))])
  return chosen
