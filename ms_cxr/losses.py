"""Multi-label losses with unknown labels masked out.

A label that is NaN contributes nothing to the loss and nothing to the gradient: it is replaced by 0
before any
arithmetic (so no NaN reaches the backward pass) and its term is multiplied by a 0 mask.

Losses return a (sum, count) pair rather than a mean so a data-parallel step can divide by the *global* count of
known labels: the result then equals one device computing the mean over the whole batch, whatever
the split.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
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
