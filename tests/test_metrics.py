"""Tests of ms_cxr.metrics against scikit-learn, hand-worked examples and slow reference implementations."""

import math

import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from ms_cxr import metrics

LABELS = ('a', 'b', 'c', 'd')


def _fixed_predictions(n=200, seed=0):
  """[n, 4] scores/targets with NaN targets; label 'c' has negatives only among its known targets."""
  rng = np.random.default_rng(seed)
  targets = (rng.random((n, 4)) < [0.3, 0.5, 0.0, 0.1]).astype(np.float64)
  targets[rng.random((n, 4)) < 0.2] = np.nan
  probs = 1 / (1 + np.exp(-(rng.normal(size=(n, 4)) + 2 * np.nan_to_num(targets) - 1)))
  # Rounding creates tied scores, which AUROC must count as half.
  return np.round(probs, 2), targets


def _sklearn_masked(score_fn, probs, targets, k):
  known = ~np.isnan(targets[:, k])
  return score_fn(targets[known, k], probs[known, k])


def test_auroc_and_average_precision_equal_sklearn_with_nan_masked():
  probs, targets = _fixed_predictions()
  auroc = metrics.per_class_auroc(probs, targets, LABELS)
  ap = metrics.per_class_average_precision(probs, targets, LABELS)
  for k in (0, 1, 3):
    label = LABELS[k]
    assert auroc[label] == pytest.approx(
      _sklearn_masked(sk_metrics.roc_auc_score, probs, targets, k), abs=1e-12
    )
    assert ap[label] == pytest.approx(
      _sklearn_masked(sk_metrics.average_precision_score, probs, targets, k), abs=1e-12
    )
  assert auroc['c'] is None and ap['c'] is None
  assert metrics.mean_auroc(auroc) == pytest.approx(np.mean([auroc[x] for x in 'abd']), abs=1e-15)


def test_average_precision_positives_only_is_one_and_shapes_checked():
  probs = np.array([[0.2], [0.7], [0.4]])
  assert metrics.per_class_average_precision(probs, np.array([[1.0], [1.0], [np.nan]]), 'x') == {
    'x': 1.0
  }
  with pytest.raises(ValueError, match='disagree'):
    metrics.per_class_average_precision(probs, np.ones((3, 2)), 'x')


# Hand-worked Youden example. Positives score 0.9, 0.7, 0.45, 0.3 and negatives 0.6, 0.4, 0.2, 0.1, 0.05 (the
# NaN-target image scoring 0.99 is left out). Calling score >= t positive, with 4 positives and 5 negatives:
#   t     TP FP  sens  spec  J = sens + spec - 1
#   0.9   1  0   0.25  1.0   0.25
#   0.7   2  0   0.50  1.0   0.50
#   0.6   2  1   0.50  0.8   0.30
#   0.45  3  1   0.75  0.8   0.55
#   0.4   3  2   0.75  0.6   0.35
#   0.3   4  2   1.00  0.6   0.60  <- maximum
#   0.2   4  3   1.00  0.4   0.40
# and lower thresholds only lose specificity.
YOUDEN_PROBS = np.array([0.9, 0.6, 0.7, 0.4, 0.45, 0.2, 0.3, 0.1, 0.05, 0.99])
YOUDEN_TARGETS = np.array([1, 0, 1, 0, 1, 0, 1, 0, 0, np.nan])


def test_youden_threshold_and_sensitivity_specificity_hand_worked():
  assert metrics.youden_threshold(YOUDEN_PROBS, YOUDEN_TARGETS) == 0.3
  assert metrics.sensitivity_specificity(YOUDEN_PROBS, YOUDEN_TARGETS, 0.3) == (1.0, 0.6)
  assert metrics.sensitivity_specificity(YOUDEN_PROBS, YOUDEN_TARGETS, 0.45) == (0.75, 0.8)
  assert metrics.sensitivity_specificity(YOUDEN_PROBS, YOUDEN_TARGETS, 0.5) == (0.5, 0.8)


def test_youden_ties_pick_the_highest_threshold():
  # Scores 0.8, 0.35 positive, 0.4, 0.1 negative: J = 0.5 at t = 0.8 (sens 0.5, spec 1) and at t = 0.35
  # (sens 1, spec 0.5), 0 at t = 0.4; the higher threshold wins the tie.
  assert metrics.youden_threshold([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.8


def test_youden_needs_both_classes():
  with pytest.raises(ValueError, match='both classes'):
    metrics.youden_threshold([0.1, 0.4], [0.0, np.nan])


def test_operating_points_youden_and_fixed_thresholds():
  probs = np.stack([YOUDEN_PROBS, YOUDEN_PROBS], axis=1)
  targets = np.stack([YOUDEN_TARGETS, np.where(np.isnan(YOUDEN_TARGETS), np.nan, 0.0)], axis=1)
  youden = metrics.operating_points(probs, targets, ('x', 'neg_only'))
  assert youden == {
    'x': {'threshold': 0.3, 'sensitivity': 1.0, 'specificity': 0.6},
    'neg_only': None,
  }
  fixed = metrics.operating_points(probs, targets, ('x', 'neg_only'), {'x': 0.45, 'neg_only': 0.5})
  # The 9 known negatives of 'neg_only' have 6 scores below 0.5: specificity 6/9, no sensitivity.
  assert fixed == {
    'x': {'threshold': 0.45, 'sensitivity': 0.75, 'specificity': 0.8},
    'neg_only': {'threshold': 0.5, 'sensitivity': None, 'specificity': 6 / 9},
  }
  assert (
    metrics.operating_points(probs, targets, ('x', 'neg_only'), {'x': 0.45})['neg_only'] is None
  )


def test_expected_calibration_error_hand_worked():
  # Two bins, [0, 0.5) and [0.5, 1], over the 7 known entries (p = 0.4 has a NaN target and is left out):
  #   bin 0: p = 0.1, 0.2, 0.3 with targets 0, 0, 1 -> confidence 0.6 / 3 = 0.2, accuracy 1/3, gap 2/15
  #   bin 1: p = 0.8, 0.5, 0.9, 0.6 with targets 1, 1, 1, 0 -> confidence 2.8 / 4 = 0.7, accuracy 3/4, gap 1/20
  # ECE = 3/7 * 2/15 + 4/7 * 1/20 = 2/35 + 1/35 = 3/35.
  probs = np.array([[0.1, 0.5], [0.2, 0.9], [0.3, 0.6], [0.8, 0.4]])
  targets = np.array([[0, 1], [0, 1], [1, 0], [1, np.nan]])
  assert metrics.expected_calibration_error(probs, targets, num_bins=2) == pytest.approx(3 / 35)
  curve = metrics.reliability_curve(probs[:, 0], targets[:, 0], num_bins=4)
  np.testing.assert_allclose(curve.bin_centers, [0.125, 0.375, 0.625, 0.875])
  np.testing.assert_array_equal(curve.counts, [2, 1, 0, 1])
  np.testing.assert_allclose(curve.mean_predicted, [0.15, 0.3, np.nan, 0.8])
  np.testing.assert_allclose(curve.observed_rate, [0.0, 1.0, np.nan, 1.0])


def test_expected_calibration_error_near_zero_when_calibrated():
  rng = np.random.default_rng(0)
  probs = rng.random((50_000, 4))
  targets = (rng.random(probs.shape) < probs).astype(np.float64)
  assert metrics.expected_calibration_error(probs, targets) < 0.01
  # Systematically overconfident predictions (p^2 against a true rate p) are far from calibrated.
  assert metrics.expected_calibration_error(probs**2, targets) > 0.1


def test_expected_calibration_error_rejects_non_probabilities():
  with pytest.raises(ValueError, match=r'\[0, 1\]'):
    metrics.expected_calibration_error(np.array([[-1.0, 2.0]]), np.array([[0.0, 1.0]]))


def _patient_data(num_patients=12, seed=0):
  """Small [N, 3] problem: 1-3 images per patient, NaN targets, ties, a rare label and a negatives-only label."""
  rng = np.random.default_rng(seed)
  images_per_patient = rng.integers(1, 4, size=num_patients)
  patient_ids = np.repeat([f'p{i:02d}' for i in range(num_patients)], images_per_patient)
  rng.shuffle(patient_ids)
  n = patient_ids.size
  targets = (rng.random((n, 3)) < [0.4, 0.1, 0.0]).astype(np.float64)
  targets[rng.random((n, 3)) < 0.15] = np.nan
  targets[:2, 1] = [1.0, 0.0]  # 'rare' has both classes overall
  probs = np.round(rng.random((n, 3)) * 0.5 + 0.5 * np.nan_to_num(targets), 1)
  return probs, targets, patient_ids


def _slow_bootstrap(probs, targets, patient_ids, num_resamples, seed):
  """Explicit resampling: draw patients, concatenate all their images, score with scikit-learn."""
  uniques, patient = np.unique(patient_ids, return_inverse=True)
  rng = np.random.default_rng(seed)
  samples = np.full((num_resamples, probs.shape[1]), np.nan)
  for r in range(num_resamples):
    drawn = rng.integers(uniques.size, size=uniques.size)
    rows = np.concatenate([np.flatnonzero(patient == p) for p in drawn])
    for k in range(probs.shape[1]):
      t = targets[rows, k]
      known = ~np.isnan(t)
      y = t[known]
      if 0 < y.sum() < y.size:
        samples[r, k] = sk_metrics.roc_auc_score(y, probs[rows, k][known])
  return samples


def test_bootstrap_matches_explicit_patient_resampling():
  probs, targets, patient_ids = _patient_data()
  labels = ('common', 'rare', 'neg_only')
  slow = _slow_bootstrap(probs, targets, patient_ids, num_resamples=30, seed=3)
  fast = metrics.bootstrap_auroc_samples(
    probs, targets, labels, patient_ids, num_resamples=30, seed=3
  )
  np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)
  # The rare label is one-class in some resamples, and those are NaN in both; neg_only in all.
  assert 0 < np.isnan(slow[:, 1]).sum() < 30 and np.isnan(slow[:, 2]).all()

  ci = metrics.bootstrap_auroc_ci(
    probs, targets, labels, patient_ids, num_resamples=30, seed=3, alpha=0.1
  )
  for k, label in enumerate(labels[:2]):
    valid = slow[~np.isnan(slow[:, k]), k]
    lo, hi = np.percentile(valid, [5, 95])
    assert ci['per_label'][label]['lo'] == pytest.approx(lo, abs=1e-12)
    assert ci['per_label'][label]['hi'] == pytest.approx(hi, abs=1e-12)
    assert ci['per_label'][label]['num_resamples_used'] == valid.size
  assert ci['per_label']['neg_only'] == {
    'auroc': None,
    'lo': None,
    'hi': None,
    'num_resamples_used': 0,
  }
  # The mean's interval takes the resamples where both labels of the point estimate's mean are valid.
  both = ~np.isnan(slow[:, :2]).any(axis=1)
  lo, hi = np.percentile(slow[both, :2].mean(axis=1), [5, 95])
  assert ci['mean']['lo'] == pytest.approx(lo, abs=1e-12)
  assert ci['mean']['hi'] == pytest.approx(hi, abs=1e-12)
  assert ci['mean']['num_resamples_used'] == both.sum() < 30
  assert ci['mean']['labels_used'] == ['common', 'rare']
  assert ci['mean']['labels_skipped'] == ['neg_only']


def test_bootstrap_keeps_a_patients_images_together():
  # Each patient has one positive and one negative image, so a patient resample always holds both classes,
  # whereas resampling the 4 images independently would give one class in 1/8 of resamples.
  probs = np.array([[0.9], [0.1], [0.8], [0.2]])
  targets = np.array([[1.0], [0.0], [1.0], [0.0]])
  ci = metrics.bootstrap_auroc_ci(probs, targets, 'x', ['p1', 'p1', 'p2', 'p2'], num_resamples=200)
  assert ci['per_label']['x']['num_resamples_used'] == 200
  assert ci['per_label']['x']['lo'] == ci['per_label']['x']['hi'] == 1.0


def test_bootstrap_reproducible_with_seed_and_contains_point_estimate():
  rng = np.random.default_rng(1)
  patient_ids = rng.integers(200, size=500)
  targets = (rng.random((500, 3)) < 0.3).astype(np.float64)
  probs = 1 / (1 + np.exp(-(rng.normal(size=(500, 3)) + 1.5 * targets)))
  kwargs = dict(num_resamples=200)
  first = metrics.bootstrap_auroc_ci(probs, targets, 'xyz', patient_ids, seed=7, **kwargs)
  assert first == metrics.bootstrap_auroc_ci(probs, targets, 'xyz', patient_ids, seed=7, **kwargs)
  other = metrics.bootstrap_auroc_ci(probs, targets, 'xyz', patient_ids, seed=8, **kwargs)
  assert other['per_label']['x']['lo'] != first['per_label']['x']['lo']
  for entry in [*first['per_label'].values(), first['mean']]:
    assert entry['lo'] < entry['auroc'] < entry['hi']
    assert entry['hi'] - entry['lo'] < 0.2
    assert entry['num_resamples_used'] == 200


def _slow_delong(scores_a, scores_b, y):
  """DeLong (1988) straight from the structural-component definitions, O(m n)."""

  def components(scores):
    pos, neg = scores[y == 1], scores[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    return psi.mean(), psi.mean(axis=1), psi.mean(axis=0)

  auc_a, v10_a, v01_a = components(scores_a)
  auc_b, v10_b, v01_b = components(scores_b)
  m, n = v10_a.size, v01_a.size

  def cov(u, v):
    return np.sum((u - u.mean()) * (v - v.mean())) / (u.size - 1)

  s10 = cov(v10_a, v10_a) + cov(v10_b, v10_b) - 2 * cov(v10_a, v10_b)
  s01 = cov(v01_a, v01_a) + cov(v01_b, v01_b) - 2 * cov(v01_a, v01_b)
  var = s10 / m + s01 / n
  z = (auc_a - auc_b) / math.sqrt(var)
  return auc_a, auc_b, var, z, math.erfc(abs(z) / math.sqrt(2))


def test_delong_matches_quadratic_reference():
  # Scores on a coarse grid so both models have ties, within and across classes; the NaN target is left out.
  scores_a = np.array([0.9, 0.8, 0.8, 0.6, 0.4, 0.7, 0.5, 0.4, 0.3, 0.8, 0.2, 0.1, 0.5])
  scores_b = np.array([0.7, 0.9, 0.5, 0.5, 0.6, 0.5, 0.3, 0.2, 0.6, 0.4, 0.2, 0.3, 0.9])
  targets = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, np.nan])
  result = metrics.delong_test(scores_a, scores_b, targets)
  auc_a, auc_b, var, z, p = _slow_delong(scores_a[:12], scores_b[:12], targets[:12])
  assert result['auc_a'] == pytest.approx(auc_a, abs=1e-12)
  assert result['auc_b'] == pytest.approx(auc_b, abs=1e-12)
  assert result['auc_a'] == pytest.approx(sk_metrics.roc_auc_score(targets[:12], scores_a[:12]))
  assert result['diff'] == pytest.approx(auc_a - auc_b, abs=1e-12)
  assert result['var'] == pytest.approx(var, abs=1e-10)
  assert result['z'] == pytest.approx(z, abs=1e-10)
  assert result['p_value'] == pytest.approx(p, abs=1e-10)


def test_delong_on_random_data_matches_quadratic_reference():
  rng = np.random.default_rng(5)
  y = (rng.random(300) < 0.3).astype(np.float64)
  scores_a = np.round(rng.normal(size=300) + y, 1)
  scores_b = np.round(0.5 * scores_a + rng.normal(size=300) + 0.5 * y, 1)
  result = metrics.delong_test(scores_a, scores_b, y)
  _, _, var, z, p = _slow_delong(scores_a, scores_b, y)
  assert result['var'] == pytest.approx(var, abs=1e-10)
  assert result['z'] == pytest.approx(z, abs=1e-10)
  assert result['p_value'] == pytest.approx(p, abs=1e-10)


def test_delong_standard_error_agrees_with_bootstrap():
  rng = np.random.default_rng(2)
  n = 4000
  y = (rng.random(n) < 0.25).astype(np.float64)
  shared = rng.normal(size=n)
  scores_a = 1.0 * y + shared + 0.5 * rng.normal(size=n)
  scores_b = 0.7 * y + shared + 0.8 * rng.normal(size=n)
  result = metrics.delong_test(scores_a, scores_b, y)
  # One image per patient: the bootstrap of the two models as two "labels" gives paired AUROC differences.
  samples = metrics.bootstrap_auroc_samples(
    np.stack([scores_a, scores_b], axis=1),
    np.stack([y, y], axis=1),
    ('a', 'b'),
    np.arange(n),
    num_resamples=2000,
    seed=0,
  )
  bootstrap_se = np.std(samples[:, 0] - samples[:, 1], ddof=1)
  assert math.sqrt(result['var']) == pytest.approx(bootstrap_se, rel=0.15)
  assert result['diff'] > 0 and result['p_value'] < 0.05


def test_delong_identical_scores():
  rng = np.random.default_rng(0)
  y = (rng.random(100) < 0.5).astype(np.float64)
  scores = rng.random(100) + y
  result = metrics.delong_test(scores, scores, y)
  assert result['diff'] == 0.0 and result['var'] == 0.0
  assert result['z'] == 0.0 and result['p_value'] == 1.0
  # A monotone transform ranks the images identically: the same AUROC, nothing to test.
  assert metrics.delong_test(scores, 2 * scores + 1, y)['p_value'] == 1.0


def test_delong_per_label():
  probs_a, targets = _fixed_predictions(seed=1)
  probs_b, _ = _fixed_predictions(seed=2)
  result = metrics.delong_per_label(probs_a, probs_b, targets, LABELS)
  assert result['c'] is None
  for k in (0, 1, 3):
    assert result[LABELS[k]] == metrics.delong_test(probs_a[:, k], probs_b[:, k], targets[:, k])
  with pytest.raises(ValueError, match='>= 2 known positives'):
    metrics.delong_test([0.1, 0.2, 0.3], [0.1, 0.2, 0.3], [1, 0, 0])
