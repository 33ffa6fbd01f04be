"""Masked BCE: unknown labels contribute neither loss nor gradient."""

import jax
import jax.numpy as jnp
import numpy as np

from ms_cxr import losses


def _bce(logit, target):
  p = 1 / (1 + np.exp(-logit))
  return -(target * np.log(p) + (1 - target) * np.log(1 - p))


def test_masked_bce_matches_hand_computation():
  logits = jnp.array([[2.0, -1.0], [0.5, 3.0]])
  labels = jnp.array([[1.0, np.nan], [0.0, 1.0]])
  total, count = losses.masked_bce_sum(logits, labels)
  expected = _bce(2.0, 1) + _bce(0.5, 0) + _bce(3.0, 1)
  np.testing.assert_allclose(total, expected, rtol=1e-6)
  assert float(count) == 3.0
  weighted, _ = losses.masked_bce_sum(logits, labels, jnp.array([2.0, 5.0]))
  np.testing.assert_allclose(
    weighted, 2 * _bce(2.0, 1) + 2 * _bce(0.5, 0) + 5 * _bce(3.0, 1), rtol=1e-6
  )


def test_masked_label_changes_neither_loss_nor_gradient():
  rng = np.random.default_rng(0)
  features = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
  weights = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
  labels = jnp.asarray([[1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 1, 0]], jnp.float32)
  masked = labels.at[2, 1].set(jnp.nan)
  keep = jnp.ones_like(labels).at[2, 1].set(0.0)

  def masked_mean(w):
    total, count = losses.masked_bce_sum(features @ w, masked)
    return total / count

  def reference_mean(w):  # the same loss written with an explicit 0/1 weight and no NaN anywhere
    logits = features @ w
    per_entry = -(labels * jax.nn.log_sigmoid(logits) + (1 - labels) * jax.nn.log_sigmoid(-logits))
    return jnp.sum(per_entry * keep) / jnp.sum(keep)

  loss, grad = jax.value_and_grad(masked_mean)(weights)
  ref_loss, ref_grad = jax.value_and_grad(reference_mean)(weights)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-7)
  assert np.all(np.isfinite(grad))

  # Whatever the model predicts for the masked entry, loss and gradient stay the same.
  def loss_of_logits(logits):
    return losses.masked_bce_sum(logits, masked)[0]

  logits = features @ weights
  for moved in (logits.at[2, 1].set(-50.0), logits.at[2, 1].set(50.0)):
    np.testing.assert_allclose(loss_of_logits(moved), loss_of_logits(logits), rtol=1e-6)
    np.testing.assert_array_equal(jax.grad(loss_of_logits)(moved), jax.grad(loss_of_logits)(logits))
  assert float(jax.grad(loss_of_logits)(logits)[2, 1]) == 0.0
