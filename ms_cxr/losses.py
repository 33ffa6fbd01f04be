"""Multi-label losses with unknown labels masked out.

A label that is NaN contributes nothing to the loss and nothing to the gradient: it is replaced by 0
before any
arithmetic (so no NaN reaches the backward pass) and its term is multiplied by a 0 mask.

Losses return a (sum, count) pair rather than a mean so a data-parallel step can divide by the *global* count of
known labels: the result then equals one device computing the mean over the whole batch, whatever
the split.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax


def masked_bce_sum(
  logits: jax.Array, labels: jax.Array, label_weights: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """Binary cross-entropy summed over known labels.

  Args:
    logits: float [batch, num_labels].
    labels: float [batch, num_labels] in [0, 1] (soft labels allowed), NaN = unknown.
    label_weights: optional float [num_labels] multiplying each label's terms.

  Returns:
    (sum of weighted per-entry losses over known entries, number of known entries), both float32 scalars.
  """
  known = ~jnp.isnan(labels)
  targets = jnp.where(known, labels, 0.0)
  per_entry = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets)
  if label_weights is not None:
    per_entry = per_entry * label_weights
  mask = known.astype(jnp.float32)
  return jnp.sum(per_entry * mask), jnp.sum(mask)


LossFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
LOSSES = ('bce', 'weighted_bce', 'focal')


def classification_loss(
  name: str,
  *,
  label_weights: Sequence[float] = (),
  positive_rates: np.ndarray | None = None,
  focal_gamma: float = 2.0,
) -> LossFn:
  """The configured multi-label loss as `(logits, labels) -> (sum, count)` (NaN labels masked).

  Args:
    name: bce | weighted_bce (w_pos = exp(1 - p_k), w_neg = exp(p_k) from the training positive rates p_k, the
      class-imbalance weighting of MS-ANet) | focal (Lin et al. 2017).
    label_weights: optional per-label multipliers (bce only).
    positive_rates: p_k per label, needed by weighted_bce.
    focal_gamma: focal only.
  """
  from ms_cxr import attention_losses

  if name == 'bce':
    weights = jnp.asarray(label_weights, jnp.float32) if len(label_weights) else None
    return functools.partial(masked_bce_sum, label_weights=weights)
  if label_weights:
    raise ValueError(f'config.train.label_weights applies to the bce loss, not {name!r}')
  if name == 'weighted_bce':
    if positive_rates is None:
      raise ValueError('weighted_bce needs the training positive rates')
    w_pos, w_neg = attention_losses.imbalance_weights(positive_rates)
    return functools.partial(
      attention_losses.weighted_bce_sum, w_pos=jnp.asarray(w_pos), w_neg=jnp.asarray(w_neg)
    )
  if name == 'focal':
    return functools.partial(attention_losses.focal_bce_sum, gamma=focal_gamma)
  raise ValueError(f'config.train.loss={name!r}; expected one of {LOSSES}')
