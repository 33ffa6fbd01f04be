"""Checkpoints with orbax: train state + data-iterator position + metadata, latest and best kept
apart.

Layout under `<workdir>/checkpoints/`:
  latest/<step>/{state, data_iter, meta}   periodic saves, `ckpt.max_to_keep` newest kept
  best/<step>/{state, data_iter, meta}     the checkpoint with the highest validation mean AUROC (one kept)

`meta` (JSON) records the model name, the labels and the validation score, so a checkpoint restored under a config
it does not match is refused with a clear error instead of silently loading into the wrong model.
Orbax writes
each step to a temporary folder and renames it when complete, so an interrupted save never replaces
a good one.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from ms_cxr.errors import UserError

PyTree = Any


def checkpoint_meta(config: ml_collections.ConfigDict, **extra: Any) -> dict[str, Any]:
  """What a checkpoint must agree with to be restored under `config`."""
  return {'model': config.model.name, 'labels': list(config.data.labels), **extra}


def latest_step(workdir: str) -> int | None:
  """The newest complete step in `<workdir>/checkpoints/latest`, or None: read from the folder, with no manager to
  create and no cross-process barrier, so any process can ask before the run's Checkpointer exists."""
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints', 'latest')
  if not os.path.isdir(directory):
    return None
  steps = ocp.utils.checkpoint_steps(directory)
  return max(steps) if steps else None


class Checkpointer:
  """The run's two checkpoint managers (latest and best)."""

  def __init__(
    self, workdir: str, ckpt_config: ml_collections.ConfigDict, *, read_only: bool = False
  ):
    root = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self._root = root
    self._read_only = read_only

    def manager(name: str, max_to_keep: int) -> ocp.CheckpointManager:
      options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else max_to_keep,
        create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=ckpt_config.async_save and not read_only,
      )
      return ocp.CheckpointManager(
        os.path.join(root, name), options=options, item_names=('state', 'data_iter', 'meta')
      )

    self.latest = manager('latest', ckpt_config.max_to_keep)
    self.best = manager('best', 1)

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def best_step(self) -> int | None:
    return self.best.latest_step()

  def discard_best_after(self, step: int) -> list[int]:
    """Deletes the best checkpoints of steps after `step`, the step training continues from; returns their steps.

    The best save of a validation step comes before that step's latest save, so a run stopped between the two
    leaves best/ ahead of latest/. Such a checkpoint is not part of the run being resumed: kept, it would set the
    score to beat from a step not yet trained, and when the replayed step scores higher its save would collide with
    the step already there. Every process calls this (orbax deletes on the primary process and syncs the rest).
    """
    later = sorted(s for s in self.best.all_steps() if s > step)
    for s in later:
      self.best.delete(s)
    return later

  def best_score(self) -> float | None:
    """Validation mean AUROC of the best checkpoint, or None when there is none."""
    step = self.best_step()
    if step is None:
      return None
    meta = self.best.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    return meta.get('val_mean_auroc')

  def save(
    self,
    step: int,
    state: PyTree,
    data_iter: grain.DatasetIterator | None,
    meta: dict[str, Any],
    *,
    best: bool = False,
  ) -> None:
    """Saves `state` (and the iterator position) at `step` to latest, or to best."""
    items = {'state': ocp.args.StandardSave(state), 'meta': ocp.args.JsonSave(meta)}
    if data_iter is not None:
      items['data_iter'] = grain.checkpoint.CheckpointSave(data_iter)
    manager = self.best if best else self.latest
    if jax.process_count() > 1:
      # Orbax names its cross-process barrier after the step: two managers saving the same step at once (best and
      # latest at a validation step) would collide, so the other manager's save finishes first.
      (self.latest if best else self.best).wait_until_finished()
    manager.save(step, args=ocp.args.Composite(**items), force=True)

  def resolve_step(
    self, which: str = 'latest', step: int = -1
  ) -> tuple[ocp.CheckpointManager, int]:
    """Finds the checkpoint to restore: `step` if >= 0, else the latest or the best.

    Raises:
      UserError: when the workdir has no such checkpoint (naming the steps it has).
    """
    if step >= 0:
      for manager in (self.latest, self.best):
        if step in manager.all_steps():
          return manager, step
      available = sorted(set(self.latest.all_steps()) | set(self.best.all_steps()))
      raise UserError(
        f'no checkpoint at step {step} in {self._root}; available steps: {available or "none"}'
      )
    if which not in ('latest', 'best'):
      raise UserError(f"config.eval.checkpoint={which!r}; expected 'latest' or 'best'")
    manager = self.latest if which == 'latest' else self.best
    found = manager.latest_step()
    if found is None:
      latest = self.latest.all_steps()
      if which == 'best' and latest:
        raise UserError(
          f'no best checkpoint in {self._root}: best checkpoints are those that scored highest on validation, '
          f'and this run did not validate (train.eval_every_steps=0); it has checkpoints at steps '
          f'{sorted(latest)}: expected eval.checkpoint=latest or eval.step=N'
        )
      raise UserError(f'no {which} checkpoint in {self._root} (has this workdir been trained?)')
    return manager, found

  def restore(
    self,
    manager: ocp.CheckpointManager,
    step: int,
    abstract_state: PyTree,
    expected_meta: dict[str, Any],
    data_iter: grain.DatasetIterator | None = None,
  ) -> tuple[PyTree, dict[str, Any]]:
    """Restores state (and the iterator position, if given) after checking the metadata.

    Args:
      manager: from `resolve_step`.
      step: from `resolve_step`.
      abstract_state: shapes, dtypes and shardings of the state to restore into.
      expected_meta: `checkpoint_meta(config)`; model and labels must match.
      data_iter: the training iterator to move to the saved position, or None.

    Returns:
      (state, meta).

    Raises:
      UserError: the checkpoint was written for another model or other labels, or cannot be read.
    """
    location = os.path.join(str(manager.directory), str(step))
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    for key in ('model', 'labels'):
      if meta.get(key) != expected_meta[key]:
        raise UserError(
          f'checkpoint {location} was written with {key}={meta.get(key)!r} but the config has '
          f'{key}={expected_meta[key]!r}'
        )
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items['data_iter'] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise UserError(f'checkpoint {location} does not fit the configured model: {e}') from None
    return restored.state, meta

  def restore_variables(
    self,
    manager: ocp.CheckpointManager,
    step: int,
    sharding: jax.sharding.Sharding,
    expected_meta: dict[str, Any],
  ) -> dict[str, PyTree]:
    """{'params', 'batch_stats'} of a checkpoint (what evaluation needs), after checking the metadata.

    The state is restored as it was saved (its structure read from the checkpoint), so an optimizer state of
    another layout than this config's (other optim settings, or Adam's step counts before they were kept per
    parameter) does not stand in the way.

    Raises:
      UserError: the checkpoint was written for another model or other labels, or cannot be read.
    """
    saved = manager.item_metadata(step).state
    abstract = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding), saved
    )
    state, _ = self.restore(manager, step, abstract, expected_meta)
    return {'params': state['params'], 'batch_stats': state['batch_stats']}

  def wait(self) -> None:
    """Blocks until background saves have finished."""
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()


def abstract_like(tree: PyTree, sharding: jax.sharding.Sharding) -> PyTree:
  """Shape/dtype/sharding placeholders for restoring into `tree`'s structure."""
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x), sharding=sharding), tree
  )


def load_variables(workdir: str) -> dict[str, PyTree]:
  """{'params', 'batch_stats'} of a workdir's latest checkpoint, as host arrays, with no model needed.

  Raises:
    UserError: the workdir has no checkpoint.
  """
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints', 'latest')
  options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  if not os.path.isdir(directory):
    raise UserError(f'no checkpoints in {directory}')
  handlers = {'state': ocp.StandardCheckpointHandler()}
  with ocp.CheckpointManager(directory, options=options, item_handlers=handlers) as manager:
    step = manager.latest_step()
    if step is None:
      raise UserError(f'no checkpoints in {directory}')
    # Restored onto this process's first device whatever topology wrote it (a multi-host run's checkpoint
    # records its own mesh, which a single process cannot rebuild).
    saved = manager.item_metadata(step).state
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), saved
    )
    state = manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    ).state
  return {'params': state['params'], 'batch_stats': state['batch_stats']}
