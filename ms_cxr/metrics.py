"""Classification metrics on host numpy, finished with scikit-learn.

Conventions:
  * `probs` and `targets` are float [N, K] arrays over N images and K labels; functions with `_k` arguments take
    one label's [N] columns. Targets are 0/1 (>= 0.5 counts as positive) and NaN = unknown.
  * A NaN target is unknown and left out of that label's metric; the image still counts for the other labels.
  * A label whose known targets hold one class only has no AUROC (None) and is skipped in macro means, which list
    the labels they used and skipped. Other metrics that need both classes (operating points, DeLong) are None
    for such labels too; average precision only needs a positive.
  * Host numpy and scikit-learn only (no JAX): metrics run once per evaluation on gathered predictions.

Contents: per-label AUROC and average precision; Youden operating points and sensitivity/specificity at fixed
thresholds; expected calibration error and reliability curves; patient-level bootstrap confidence intervals for
AUROC; the paired DeLong test between two models.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from sklearn import metrics as sk_metrics

# Bootstrap resamples are processed in chunks of about this many (resample, image) weights: a few float64 arrays
# of 32 MB whatever the dataset size, large enough to keep numpy's per-call overhead negligible.
_BOOTSTRAP_CHUNK_ELEMENTS = 1 << 22


def _check_shapes(
  probs: np.ndarray, targets: np.ndarray, labels: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
  probs, targets = np.asarray(probs), np.asarray(targets, dtype=np.float64)
  if probs.shape != targets.shape or probs.shape[1:] != (len(labels),):
    raise ValueError(
      f'probs {probs.shape}, targets {targets.shape} and {len(labels)} labels disagree'
    )
  return probs, targets


def _known_1d(probs_k: np.ndarray, targets_k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """One label's scores and boolean targets over its known (non-NaN) entries."""
  probs_k, targets_k = np.asarray(probs_k), np.asarray(targets_k, dtype=np.float64)
  if probs_k.ndim != 1 or probs_k.shape != targets_k.shape:
    raise ValueError(f'expected two [N] arrays, got {probs_k.shape} and {targets_k.shape}')
  known = ~np.isnan(targets_k)
  return probs_k[known], targets_k[known] >= 0.5


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
  probs, targets = _check_shapes(probs, targets, labels)
  result = {}
  for k, label in enumerate(labels):
    scores, y = _known_1d(probs[:, k], targets[:, k])
    if y.all() or not y.any():
      result[label] = None
    else:
      result[label] = float(sk_metrics.roc_auc_score(y, scores))
  return result


def mean_auroc(per_class: dict[str, float | None]) -> float | None:
  """Macro mean over the labels that have an AUROC; None if none has."""
  values = [v for v in per_class.values() if v is not None]
  return float(np.mean(values)) if values else None


def per_class_average_precision(
  probs: np.ndarray, targets: np.ndarray, labels: Sequence[str]
) -> dict[str, float | None]:
  """Average precision (area under the precision-recall curve, scikit-learn's step-wise sum) of each label.

  Args:
    probs: float [N, K] predicted probabilities (or any monotone score).
    targets: float [N, K] of 0/1, NaN = unknown.
    labels: K names.

  Returns:
    label -> average precision over the label's known targets, or None where none of them is positive (recall is
    undefined). A label with positives only has AP 1.
  """
  probs, targets = _check_shapes(probs, targets, labels)
  result = {}
  for k, label in enumerate(labels):
    scores, y = _known_1d(probs[:, k], targets[:, k])
    result[label] = float(sk_metrics.average_precision_score(y, scores)) if y.any() else None
  return result


def youden_threshold(probs_k: np.ndarray, targets_k: np.ndarray) -> float:
  """The threshold maximising Youden's J = sensitivity + specificity - 1 over the ROC curve of one label.

  A prediction is positive when `score >= threshold`, so the threshold is one of the observed scores. Among
  thresholds with equal J the highest (fewest positive calls) is chosen.

  Args:
    probs_k: float [N] scores of one label.
    targets_k: float [N] of 0/1, NaN = unknown (left out).

  Returns:
    The threshold.

  Raises:
    ValueError: the known targets hold one class only.
  """
  scores, y = _known_1d(probs_k, targets_k)
  if y.all() or not y.any():
    raise ValueError('Youden threshold needs both classes among the known targets')
  # Keep every threshold: dropped collinear points could otherwise change which of tied maxima comes first.
  fpr, tpr, thresholds = sk_metrics.roc_curve(y, scores, drop_intermediate=False)
  # thresholds[0] is +inf (nothing called positive, J = 0); skipping it keeps the threshold an observed score and
  # loses nothing, since the last point (everything called positive) has J = 0 as well.
  best = int(np.argmax((tpr - fpr)[1:])) + 1
  return float(thresholds[best])


def sensitivity_specificity(
  probs_k: np.ndarray, targets_k: np.ndarray, threshold: float
) -> tuple[float | None, float | None]:
  """Sensitivity and specificity of one label when `score >= threshold` is called positive.

  Args:
    probs_k: float [N] scores of one label.
    targets_k: float [N] of 0/1, NaN = unknown (left out).
    threshold: the decision threshold.

  Returns:
    (sensitivity, specificity); either is None where the known targets have no positive (resp. negative).
  """
  scores, y = _known_1d(probs_k, targets_k)
  called = scores >= threshold
  sensitivity = float(called[y].mean()) if y.any() else None
  specificity = float((~called[~y]).mean()) if not y.all() else None
  return sensitivity, specificity


def operating_points(
  probs: np.ndarray,
  targets: np.ndarray,
  labels: Sequence[str],
  thresholds: Mapping[str, float | None] | None = None,
) -> dict[str, dict[str, float | None] | None]:
  """Threshold, sensitivity and specificity of each label.

  Args:
    probs: float [N, K] predicted probabilities.
    targets: float [N, K] of 0/1, NaN = unknown.
    labels: K names.
    thresholds: None picks each label's Youden threshold on these very predictions (optimistic: use it on a
      validation split). A mapping label -> threshold applies fixed thresholds instead, e.g.
      `{label: op['threshold'] for label, op in operating_points(val_probs, ...).items() if op}` chosen on
      validation and applied to test.

  Returns:
    label -> {'threshold', 'sensitivity', 'specificity'}, or None where no threshold exists: with
    thresholds=None a label whose known targets hold one class, with a mapping a label it lacks or maps to None.
    With fixed thresholds sensitivity (specificity) is None where the label has no known positive (negative).
  """
  probs, targets = _check_shapes(probs, targets, labels)
  result: dict[str, dict[str, float | None] | None] = {}
  for k, label in enumerate(labels):
    if thresholds is None:
      _, y = _known_1d(probs[:, k], targets[:, k])
      threshold = None if y.all() or not y.any() else youden_threshold(probs[:, k], targets[:, k])
    else:
      threshold = thresholds.get(label)
    if threshold is None:
      result[label] = None
      continue
    sensitivity, specificity = sensitivity_specificity(probs[:, k], targets[:, k], threshold)
    result[label] = {
      'threshold': float(threshold),
      'sensitivity': sensitivity,
      'specificity': specificity,
    }
  return result


class ReliabilityCurve(NamedTuple):
  """Per-bin statistics for a reliability diagram; empty bins hold NaN means and count 0."""

  bin_centers: np.ndarray  # float [B], (b + 0.5) / B
  mean_predicted: np.ndarray  # float [B], mean predicted probability in the bin ("confidence")
  observed_rate: np.ndarray  # float [B], fraction of positive targets in the bin ("accuracy")
  counts: np.ndarray  # int [B], known entries in the bin


def reliability_curve(
  probs_k: np.ndarray, targets_k: np.ndarray, num_bins: int = 15
) -> ReliabilityCurve:
  """Equal-width binning of predicted probabilities against observed positive rates.

  Bin b holds the probabilities p with floor(p * num_bins) == b, i.e. [b / B, (b + 1) / B), the last bin
  including 1.

  Args:
    probs_k: float probabilities in [0, 1] of one label ([N]), or of several flattened together (any shape).
    targets_k: 0/1 targets of the same shape, NaN = unknown (left out).
    num_bins: B, the number of equal-width bins over [0, 1].

  Returns:
    The per-bin statistics.

  Raises:
    ValueError: shapes differ, num_bins < 1 or a probability lies outside [0, 1].
  """
  probs_k, targets_k = (
    np.asarray(probs_k, dtype=np.float64),
    np.asarray(targets_k, dtype=np.float64),
  )
  if probs_k.shape != targets_k.shape:
    raise ValueError(f'probs {probs_k.shape} and targets {targets_k.shape} differ')
  if num_bins < 1:
    raise ValueError(f'num_bins must be >= 1, got {num_bins}')
  known = ~np.isnan(targets_k)
  p, y = probs_k[known], (targets_k[known] >= 0.5).astype(np.float64)
  # Logits or percentages would silently land in the end bins: calibration is only defined for probabilities.
  if p.size and (p.min() < 0.0 or p.max() > 1.0):
    raise ValueError('calibration needs probabilities in [0, 1]')
  bins = np.minimum((p * num_bins).astype(np.int64), num_bins - 1)
  counts = np.bincount(bins, minlength=num_bins)
  with np.errstate(invalid='ignore', divide='ignore'):
    mean_predicted = np.bincount(bins, weights=p, minlength=num_bins) / counts
    observed_rate = np.bincount(bins, weights=y, minlength=num_bins) / counts
  centers = (np.arange(num_bins) + 0.5) / num_bins
  return ReliabilityCurve(centers, mean_predicted, observed_rate, counts)


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, num_bins: int = 15) -> float:
  """Expected calibration error pooled over all known (image, label) entries.

  Each entry is treated as one binary prediction with confidence p = its predicted probability of the positive
  class (not max(p, 1 - p) as in multi-class ECE). With equal-width bins over [0, 1] (see `reliability_curve`),

    ECE = sum_b (n_b / n) * |accuracy_b - confidence_b|,

  where n_b counts the entries in bin b, "accuracy" is the observed positive rate in the bin and "confidence" the
  mean predicted probability there. Empty bins contribute nothing.

  Args:
    probs: float probabilities in [0, 1], [N, K] (or any shape).
    targets: 0/1 targets of the same shape, NaN = unknown (left out).
    num_bins: the number of equal-width bins.

  Returns:
    The ECE in [0, 1].

  Raises:
    ValueError: no known target, or as `reliability_curve`.
  """
  curve = reliability_curve(np.ravel(probs), np.ravel(targets), num_bins)
  total = curve.counts.sum()
  if total == 0:
    raise ValueError('expected_calibration_error needs at least one known target')
  filled = curve.counts > 0
  gaps = np.abs(curve.observed_rate[filled] - curve.mean_predicted[filled])
  return float(np.sum(curve.counts[filled] * gaps) / total)


class _RankPlan(NamedTuple):
  """One label's data arranged for weighted Mann-Whitney AUROC under patient resampling."""

  neg_patient: np.ndarray  # int [n_neg], patient of each negative, negatives sorted by score
  pos_patient: np.ndarray  # int [n_pos], patient of each positive
  below: np.ndarray  # int [n_pos], number of negatives scoring strictly below each positive
  below_or_tied: np.ndarray  # int [n_pos], number of negatives scoring <= each positive


def _rank_plan(scores: np.ndarray, targets_k: np.ndarray, patient: np.ndarray) -> _RankPlan | None:
  known = ~np.isnan(targets_k)
  scores, y, patient = scores[known], targets_k[known] >= 0.5, patient[known]
  if y.all() or not y.any():
    return None
  order = np.argsort(scores[~y], kind='stable')
  neg_scores = scores[~y][order]
  return _RankPlan(
    neg_patient=patient[~y][order],
    pos_patient=patient[y],
    below=np.searchsorted(neg_scores, scores[y], side='left'),
    below_or_tied=np.searchsorted(neg_scores, scores[y], side='right'),
  )


def _weighted_auroc(weights: np.ndarray, plan: _RankPlan) -> np.ndarray:
  """AUROC of one label in each resample, given [R, P] patient draw counts.

  Resampling with replacement repeats each image as often as its patient was drawn, so the resampled AUROC is
  the Mann-Whitney statistic with image weights w_i = count of i's patient:

    AUROC = sum_{pos i} w_i * (W_neg(s < s_i) + W_neg(s == s_i) / 2) / (W_pos * W_neg).

  With negatives sorted by score once, the negative weight below (or at most equal to) each positive is a prefix
  sum read at a precomputed position, O(N) per resample. All terms are integers or halves of integers below
  2**53, so the sums are exact in float64 and the result differs from the explicit resample by one rounding.

  Returns:
    float [R], NaN where the resample holds one class of this label only.
  """
  cum_neg = np.zeros((weights.shape[0], plan.neg_patient.size + 1))
  np.cumsum(weights[:, plan.neg_patient], axis=1, out=cum_neg[:, 1:])
  pos_weights = weights[:, plan.pos_patient]
  # cum_neg[below] + cum_neg[below_or_tied] = 2 * (weight strictly below) + (weight tied).
  twice_beaten = cum_neg[:, plan.below] + cum_neg[:, plan.below_or_tied]
  numerator = 0.5 * np.einsum('rp,rp->r', pos_weights, twice_beaten)
  denominator = pos_weights.sum(axis=1) * cum_neg[:, -1]
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(denominator > 0, numerator / denominator, np.nan)


def bootstrap_auroc_samples(
  probs: np.ndarray,
  targets: np.ndarray,
  labels: Sequence[str],
  patient_ids: Sequence[Any] | np.ndarray,
  *,
  num_resamples: int = 1000,
  seed: int = 0,
) -> np.ndarray:
  """Per-label AUROC in each patient-level bootstrap resample.

  Patients are indexed 0..P-1 in `np.unique(patient_ids)` order. With `rng = np.random.default_rng(seed)`,
  resample r = 0, 1, ... draws `rng.integers(P, size=P)`: P patients with replacement, each drawn patient bringing
  all of its images, as many times as it was drawn. The AUROC is computed from the draw counts as weights
  (`_weighted_auroc`) without materialising the resampled arrays, equal to scikit-learn's on them.

  Args:
    probs: float [N, K] predicted probabilities (or any monotone score).
    targets: float [N, K] of 0/1, NaN = unknown.
    labels: K names.
    patient_ids: [N] patient of each image (any sortable ids).
    num_resamples: R, the number of bootstrap resamples.
    seed: seeds `np.random.default_rng`; the output is a deterministic function of it.

  Returns:
    float [R, K]; NaN where the resample's known targets of a label hold one class.
  """
  probs, targets = _check_shapes(probs, targets, labels)
  patient_ids = np.asarray(patient_ids)
  if patient_ids.shape != probs.shape[:1]:
    raise ValueError(f'patient_ids {patient_ids.shape} do not match {probs.shape[0]} images')
  if num_resamples < 1:
    raise ValueError(f'num_resamples must be >= 1, got {num_resamples}')
  uniques, patient = np.unique(patient_ids, return_inverse=True)
  num_patients = uniques.size
  plans = [_rank_plan(probs[:, k], targets[:, k], patient) for k in range(len(labels))]
  rng = np.random.default_rng(seed)
  samples = np.full((num_resamples, len(labels)), np.nan)
  chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // max(probs.shape[0], num_patients, 1))
  for start in range(0, num_resamples, chunk):
    stop = min(start + chunk, num_resamples)
    # One draw per resample, in order, so the stream (and the result) does not depend on the chunk size.
    weights = np.stack(
      [
        np.bincount(rng.integers(num_patients, size=num_patients), minlength=num_patients)
        for _ in range(start, stop)
      ]
    ).astype(np.float64)
    for k, plan in enumerate(plans):
      if plan is not None:
        samples[start:stop, k] = _weighted_auroc(weights, plan)
  return samples


def _percentile_interval(values: np.ndarray, alpha: float) -> tuple[float | None, float | None]:
  if values.size == 0:
    return None, None
  lo, hi = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
  return float(lo), float(hi)


def bootstrap_auroc_ci(
  probs: np.ndarray,
  targets: np.ndarray,
  labels: Sequence[str],
  patient_ids: Sequence[Any] | np.ndarray,
  *,
  num_resamples: int = 1000,
  seed: int = 0,
  alpha: float = 0.05,
) -> dict[str, Any]:
  """Patient-level bootstrap percentile intervals for each label's AUROC and for the macro mean.

  Resampling is by patient (see `bootstrap_auroc_samples`), since images of one patient are correlated. In each
  resample a label with one class present is skipped for that label. The macro mean's interval uses only the
  resamples in which every label of the point estimate's mean is valid, so that each resampled mean averages the
  same labels as the point estimate (a mean over fewer labels in some resamples would mix other quantities into
  the interval); how many resamples that left is reported. The interval is the (alpha/2, 1 - alpha/2) percentile
  range of the valid resampled values (numpy's linear interpolation).

  Args:
    probs: float [N, K] predicted probabilities (or any monotone score).
    targets: float [N, K] of 0/1, NaN = unknown.
    labels: K names.
    patient_ids: [N] patient of each image.
    num_resamples: the number of bootstrap resamples.
    seed: seeds `np.random.default_rng`; equal seeds give equal results.
    alpha: 1 - confidence level.

  Returns:
    A JSON-serialisable dict:
      'per_label': label -> {'auroc': point estimate or None, 'lo', 'hi' (None where no resample was valid),
        'num_resamples_used'};
      'mean': {'auroc': point macro mean, 'lo', 'hi', 'num_resamples_used', 'labels_used', 'labels_skipped'}
        (labels used or skipped by the point estimate);
      'num_resamples', 'seed', 'alpha'.
  """
  if not 0.0 < alpha < 1.0:
    raise ValueError(f'alpha must lie in (0, 1), got {alpha}')
  samples = bootstrap_auroc_samples(
    probs, targets, labels, patient_ids, num_resamples=num_resamples, seed=seed
  )
  point = per_class_auroc(probs, targets, labels)
  valid = ~np.isnan(samples)
  per_label = {}
  for k, label in enumerate(labels):
    lo, hi = _percentile_interval(samples[valid[:, k], k], alpha)
    per_label[label] = {
      'auroc': point[label],
      'lo': lo,
      'hi': hi,
      'num_resamples_used': int(valid[:, k].sum()),
    }
  used = np.asarray([point[label] is not None for label in labels], bool)
  complete = valid[:, used].all(axis=1) if used.any() else np.zeros(len(samples), bool)
  lo, hi = _percentile_interval(samples[complete][:, used].mean(axis=1), alpha)
  mean = {
    'auroc': mean_auroc(point),
    'lo': lo,
    'hi': hi,
    'num_resamples_used': int(complete.sum()),
    'labels_used': [label for label, v in point.items() if v is not None],
    'labels_skipped': [label for label, v in point.items() if v is None],
  }
  return {
    'per_label': per_label,
    'mean': mean,
    'num_resamples': num_resamples,
    'seed': seed,
    'alpha': alpha,
  }


def _midranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks of x, tied values sharing the mean of the ranks they span."""
  order = np.argsort(x, kind='stable')
  sorted_x = x[order]
  starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
  ends = np.r_[starts[1:], x.size]
  # A tie run at 0-based positions [start, end) spans ranks start + 1 .. end, whose mean is (start + end + 1) / 2.
  ranks = np.empty(x.size)
  ranks[order] = np.repeat(0.5 * (starts + ends + 1), ends - starts)
  return ranks


def _delong_components(scores: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
  """AUROC and its DeLong structural components V10 (per positive) and V01 (per negative).

  V10_i = mean_j psi(x_i, y_j) and V01_j = mean_i psi(x_i, y_j), with psi = 1, 1/2, 0 for x > y, x == y, x < y,
  x positive and y negative scores. Sun & Xu (2014) get them from midranks in O(N log N): the rank of a positive
  among all scores minus its rank among positives counts the negatives it beats (ties halved).
  """
  pos, neg = scores[y], scores[~y]
  m, n = pos.size, neg.size
  rank_all = _midranks(np.concatenate([pos, neg]))
  v10 = (rank_all[:m] - _midranks(pos)) / n
  v01 = 1.0 - (rank_all[m:] - _midranks(neg)) / m
  auc = (rank_all[:m].sum() - m * (m + 1) / 2) / (m * n)
  return float(auc), v10, v01


def delong_test(
  probs_a: np.ndarray, probs_b: np.ndarray, targets_k: np.ndarray
) -> dict[str, float]:
  """Paired DeLong test of AUROC(a) = AUROC(b) for two models scored on the same images of one label.

  DeLong, DeLong & Clarke-Pearson (1988), computed with the O(N log N) midrank algorithm of Sun & Xu (2014).
  The covariance of the two AUROCs is S10 / m + S01 / n, with S10 and S01 the sample covariances (ddof 1) of
  the structural components over the m positives and n negatives; z = diff / sqrt(var) and the two-sided p-value
  comes from the standard normal.

  Args:
    probs_a: float [N] scores of model a.
    probs_b: float [N] scores of model b on the same images.
    targets_k: float [N] of 0/1, NaN = unknown (left out).

  Returns:
    {'auc_a', 'auc_b', 'diff' (auc_a - auc_b), 'var' (variance of diff), 'z', 'p_value'}. With var == 0 (e.g.
    identically ranked scores) z is 0 and p is 1 when diff == 0, else z = +-inf and p = 0.

  Raises:
    ValueError: shapes differ, or fewer than two known positives or negatives (the covariances need two).
  """
  probs_a, probs_b = np.asarray(probs_a), np.asarray(probs_b)
  if probs_a.shape != probs_b.shape:
    raise ValueError(f'probs_a {probs_a.shape} and probs_b {probs_b.shape} differ')
  targets_k = np.asarray(targets_k, dtype=np.float64)
  known = ~np.isnan(targets_k)
  scores_a, y = _known_1d(probs_a, targets_k)
  scores_b = probs_b[known]
  m, n = int(y.sum()), int((~y).sum())
  if m < 2 or n < 2:
    raise ValueError(f'DeLong needs >= 2 known positives and negatives, got {m} and {n}')
  auc_a, v10_a, v01_a = _delong_components(scores_a, y)
  auc_b, v10_b, v01_b = _delong_components(scores_b, y)
  cov = np.cov(np.stack([v10_a, v10_b])) / m + np.cov(np.stack([v01_a, v01_b])) / n
  # Rounding can leave a tiny negative for (nearly) identical models; the variance is >= 0.
  var = max(float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]), 0.0)
  diff = auc_a - auc_b
  if var > 0:
    z = diff / math.sqrt(var)
    p_value = math.erfc(abs(z) / math.sqrt(2))
  elif diff == 0:
    z, p_value = 0.0, 1.0
  else:
    z, p_value = math.copysign(math.inf, diff), 0.0
  return {'auc_a': auc_a, 'auc_b': auc_b, 'diff': diff, 'var': var, 'z': z, 'p_value': p_value}


def delong_per_label(
  probs_a: np.ndarray, probs_b: np.ndarray, targets: np.ndarray, labels: Sequence[str]
) -> dict[str, dict[str, float] | None]:
  """`delong_test` for each label of two models' [N, K] predictions on the same images.

  Args:
    probs_a: float [N, K] scores of model a.
    probs_b: float [N, K] scores of model b.
    targets: float [N, K] of 0/1, NaN = unknown.
    labels: K names.

  Returns:
    label -> the `delong_test` dict, or None where the label has fewer than two known positives or negatives.
  """
  probs_a, targets = _check_shapes(probs_a, targets, labels)
  probs_b, _ = _check_shapes(probs_b, targets, labels)
  result: dict[str, dict[str, float] | None] = {}
  for k, label in enumerate(labels):
    _, y = _known_1d(probs_a[:, k], targets[:, k])
    if min(y.sum(), (~y).sum()) < 2:
      result[label] = None
    else:
      result[label] = delong_test(probs_a[:, k], probs_b[:, k], targets[:, k])
  return result
