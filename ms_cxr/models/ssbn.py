"""Size-specific batch normalisation (SSBN, Pereira et al. 2023).

One `SSBN` module stands where a BatchNorm would. It holds one BatchNorm branch per input size, named
`ssbn_<size>`, each with its own scale/shift (in `params`) and running statistics (in `batch_stats`); the
convolutions around it are shared by every size. The branch is chosen by `size_px`, a static module attribute, so
each resolution compiles its own program. Every branch is created at init, whatever size init runs at.

Helpers select or replace one size's variables as a unit (to fine-tune or add one size with everything else frozen),
and build the masks that keep a step which ran only some sizes from touching the others.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ms_cxr.models import batchnorm

PyTree = Any
_BRANCH = re.compile(r'^ssbn_(\d+)$')


def branch_name(size_px: int) -> str:
  return f'ssbn_{size_px}'


class SSBN(nn.Module):
  """BatchNorm with a dedicated scale/shift and running statistics per input size.

  Attributes:
    sizes: every input size the network is trained for; one branch each.
    size_px: the size of the images being normalised now (selects the branch).
    use_running_average, momentum, epsilon, dtype, axis_name, relu, custom_gradient: as for
      `batchnorm.BatchNorm` (the branches; their variables are `flax.linen.BatchNorm`'s).
  """

  sizes: Sequence[int]
  size_px: int | None = None
  use_running_average: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  axis_name: str | None = None
  relu: bool = False
  custom_gradient: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, moments: jax.Array | None = None) -> jax.Array:
    """Normalises x with the branch of `size_px`; `moments` as for `batchnorm.BatchNorm`."""
    if self.size_px not in self.sizes:
      raise ValueError(
        f'SSBN called at size_px={self.size_px}; its branches are {tuple(self.sizes)}'
      )
    branches = {
      size: batchnorm.BatchNorm(
        use_running_average=self.use_running_average,
        momentum=self.momentum,
        epsilon=self.epsilon,
        dtype=self.dtype,
        axis_name=self.axis_name,
        relu=self.relu,
        custom_gradient=self.custom_gradient,
        name=branch_name(size),
      )
      for size in self.sizes
    }
    if self.is_initializing():
      # Create every branch now: params and statistics exist for all sizes whatever size init ran at.
      for size, branch in branches.items():
        if size != self.size_px:
          branch(x, moments)
    return branches[self.size_px](x, moments)


def _path_sizes(path: tuple[Any, ...]) -> set[int]:
  sizes = set()
  for entry in path:
    key = getattr(entry, 'key', None)
    if isinstance(key, str):
      match = _BRANCH.match(key)
      if match:
        sizes.add(int(match.group(1)))
  return sizes


def size_mask(tree: PyTree, active_sizes: Iterable[int]) -> PyTree:
  """Python bools over `tree`: True for shared leaves and for the branches of `active_sizes`.

  A leaf under `ssbn_<s>` with `s` not active is False; everything else (convolutions, classifier) is True.
  """
  active = set(active_sizes)
  return jax.tree_util.tree_map_with_path(lambda path, _: not (_path_sizes(path) - active), tree)


def select_size(tree: PyTree, size_px: int) -> dict[tuple[str, ...], Any]:
  """One size's variables as a unit: {path to the branch leaf: value} for every `ssbn_<size_px>` leaf."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {
    tuple(str(getattr(e, 'key', e)) for e in path): value
    for path, value in leaves
    if size_px in _path_sizes(path)
  }


def replace_size(tree: PyTree, size_px: int, source: PyTree) -> PyTree:
  """`tree` with every `ssbn_<size_px>` leaf taken from `source` (a tree of the same structure)."""
  return jax.tree_util.tree_map_with_path(
    lambda path, mine, theirs: theirs if size_px in _path_sizes(path) else mine, tree, source
  )


def keep_inactive(new: PyTree, old: PyTree, mask: PyTree) -> PyTree:
  """Leaf-wise `new if mask else old` (mask of python bools, so the choice is made at trace time)."""
  return jax.tree.map(lambda n, o, m: n if m else o, new, old, mask)


def opt_state_mask(
  tx_init: Callable[[PyTree], PyTree], opt_state: PyTree, params_mask: PyTree
) -> PyTree:
  """Extends a params mask to the optimizer state: moments (and `scale_by_adam_per_leaf`'s counts) follow their
  parameter; shared counters (the learning-rate schedule's) always advance."""
  return optax.tree_utils.tree_map_params(
    tx_init, lambda _, m: m, opt_state, params_mask, transform_non_params=lambda _: True
  )


def scale_by_adam_per_leaf(
  b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformation:
  """`optax.scale_by_adam` with a step count per parameter leaf, as PyTorch's Adam keeps one per parameter.

  A step that runs only some sizes leaves the other branches' moments as they were (`keep_inactive` with
  `opt_state_mask`); with one shared count their bias correction would still advance, so a branch trained on
  every third step would be corrected as if its moments had seen three times as many gradients (updates about
  1.6x too large after 300 steps, 1.2x after 3,000). Here the counts are a tree like the parameters, so the same
  masks keep a branch's count with its moments. A leaf updated on every step gets `optax.scale_by_adam`'s update
  (to float rounding: the bias correction is computed per leaf).
  """

  def init_fn(params):
    return optax.ScaleByAdamState(
      count=jax.tree.map(lambda _: jnp.zeros([], jnp.int32), params),
      mu=optax.tree.zeros_like(params),
      nu=optax.tree.zeros_like(params),
    )

  def update_fn(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count = jax.tree.map(optax.safe_increment, state.count)
    mu_hat = jax.tree.map(lambda m, c: optax.tree.bias_correction(m, b1, c), mu, count)
    nu_hat = jax.tree.map(lambda v, c: optax.tree.bias_correction(v, b2, c), nu, count)
    updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu_hat, nu_hat)
    return updates, optax.ScaleByAdamState(
      count=count, mu=mu, nu=optax.tree.cast_like(nu, state.nu)
    )

  return optax.GradientTransformation(init_fn, update_fn)


def counts_per_leaf(old_opt_state: PyTree, template: PyTree) -> PyTree:
  """An optimizer state with Adam's one step count (`optax.scale_by_adam`) in the layout of `template`, which has
  `scale_by_adam_per_leaf`'s counts: every leaf's count starts from the shared one (how the run so far was
  corrected), the moments are kept. For resuming a run saved before the counts were per parameter."""

  def is_adam(node):
    return isinstance(node, optax.ScaleByAdamState)

  def convert(new, old):
    if is_adam(new) and is_adam(old) and jnp.ndim(old.count) == 0 and isinstance(new.count, dict):
      # A fresh buffer per leaf: leaves sharing one would be freed twice when the train step donates the state.
      count = np.asarray(old.count)
      return optax.ScaleByAdamState(
        count=jax.tree.map(lambda _: jnp.array(count, copy=True), new.count), mu=old.mu, nu=old.nu
      )
    return old

  return jax.tree.map(convert, template, old_opt_state, is_leaf=is_adam)


def _branch_size(key: str) -> int | None:
  match = _BRANCH.match(key)
  return int(match.group(1)) if match else None


def transplant(
  target: PyTree, source: PyTree, size_px: int | None = None
) -> tuple[PyTree, dict[str, Any]]:
  """Copies `source` variables into `target` wherever they correspond, across norm layouts.

  A target leaf takes the source leaf at the same path and shape. Otherwise, under an `ssbn_<size>` branch, it
  takes the source branch of the nearest size (so a new size starts from a trained one), or the plain BatchNorm at
  that place when the source has no size branches (so SSBN starts from a single-scale model); a plain BatchNorm
  whose source has size branches takes the branch nearest `size_px` (the largest when None), so a single-scale
  model starts from an SSBN one. Anything else (a classifier for other labels) keeps its initial value.

  Args:
    target: nested dicts of arrays, e.g. {'params': ..., 'batch_stats': ...} of the new model.
    source: the same for the model to copy from.
    size_px: the input size a plain-BatchNorm target is for (chooses the source's size branch).

  Returns:
    (the new target, {'copied': n, 'kept': m, 'kept_paths': the '/'-joined paths of the m leaves kept}).
  """
  flat_source = {
    tuple(str(getattr(e, 'key', e)) for e in path): value
    for path, value in jax.tree_util.tree_flatten_with_path(source)[0]
  }
  # {source path without its size branch: {size: source path}}, for plain targets.
  branched: dict[tuple[str, ...], dict[int, tuple[str, ...]]] = {}
  for path in flat_source:
    for i, key in enumerate(path):
      size = _branch_size(key)
      if size is not None:
        branched.setdefault(path[:i] + path[i + 1 :], {})[size] = path
  counts: dict[str, Any] = {'copied': 0, 'kept': 0, 'kept_paths': []}

  def nearest(sizes: Iterable[int], size: int | None) -> list[int]:
    return sorted(sizes, key=lambda s: (abs(s - size), s) if size is not None else (-s, 0))

  def candidates(path: tuple[str, ...]):
    yield path
    has_branch = False
    for i, key in enumerate(path):
      size = _branch_size(key)
      if size is None:
        continue
      has_branch = True
      prefix = path[:i]
      sizes = {
        _branch_size(p[i])
        for p in flat_source
        if len(p) > i and p[:i] == prefix and _branch_size(p[i]) is not None
      }
      for other in nearest(sizes, size):
        yield path[:i] + (branch_name(other),) + path[i + 1 :]
      yield path[:i] + path[i + 1 :]  # a plain BatchNorm in the source
    if not has_branch and path in branched:
      by_size = branched[path]
      for other in nearest(by_size, size_px):
        yield by_size[other]

  def take(path, value):
    names = tuple(str(getattr(e, 'key', e)) for e in path)
    for candidate in candidates(names):
      found = flat_source.get(candidate)
      if found is not None and jnp.shape(found) == jnp.shape(value):
        counts['copied'] += 1
        # A fresh buffer per leaf: one source branch may seed several sizes, and leaves sharing a buffer
        # would be freed twice when the train step donates the state.
        return jnp.array(np.asarray(found), dtype=jnp.result_type(value))
    counts['kept'] += 1
    counts['kept_paths'].append('/'.join(names))
    return value

  return jax.tree_util.tree_map_with_path(take, target), counts


def trainable_mask(params: PyTree, trainable_sizes: Iterable[int]) -> PyTree:
  """True only for the `ssbn_<size>` leaves of `trainable_sizes` (everything else frozen)."""
  sizes = set(trainable_sizes)
  return jax.tree_util.tree_map_with_path(lambda path, _: bool(_path_sizes(path) & sizes), params)
