"""Data parallelism: the device mesh, placing state and batches, and compiling a per-device step.

A step is written once, for one device, with collectives over the axis `'batch'` (pmap semantics: gradients,
metrics and BatchNorm statistics reduced with `lax.psum`/`lax.pmean`). `DataParallel.compile` turns it into

  * `api='shard_map'`: `jax.jit(jax.shard_map(step, mesh, ...))` over a 1-D mesh of all devices (default), or
  * `api='pmap'`: `jax.pmap(step, axis_name='batch')`,

so the same numerics run under either. Train state is replicated and donated; batches are split
along the
leading axis. Multi-host: each process passes its local batch and
`jax.make_array_from_process_local_data`
assembles the global array.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = 'batch'
APIS = ('shard_map', 'pmap')
PyTree = Any


@dataclasses.dataclass(frozen=True)
class DataParallel:
  """One data-parallel layout: which devices, and which compilation API."""

  mesh: Mesh
  api: str = 'shard_map'

  @classmethod
  def create(cls, api: str = 'shard_map', num_devices: int = 0) -> DataParallel:
    """A 1-D mesh over the first `num_devices` global devices (0 = all)."""
    if api not in APIS:
      raise ValueError(f'config.parallel.api={api!r}; expected one of {APIS}')
    devices = jax.devices()
    if num_devices:
      if num_devices > len(devices):
        raise ValueError(f'config.parallel.num_devices={num_devices} but only {len(devices)} exist')
      if jax.process_count() > 1 and num_devices != len(devices):
        raise ValueError('config.parallel.num_devices must be 0 (all devices) in a multi-host run')
      devices = devices[:num_devices]
    return cls(Mesh(np.asarray(devices), (AXIS,)), api)

  @property
  def num_devices(self) -> int:
    return self.mesh.devices.size

  @property
  def num_local_devices(self) -> int:
    return sum(d.process_index == jax.process_index() for d in self.mesh.devices.flat)

  def _sharded(self) -> NamedSharding:
    return NamedSharding(self.mesh, P(AXIS))

  def replicate(self, tree: PyTree) -> PyTree:
    """Host or single-device values -> the layout the compiled step takes for its state."""
    if self.api == 'pmap':
      n = self.num_devices
      stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *jnp.shape(x))), tree)
      return jax.device_put(stacked, self._sharded())
    return jax.device_put(tree, NamedSharding(self.mesh, P()))

  def unreplicate(self, tree: PyTree) -> PyTree:
    """The step's replicated output -> one copy (the checkpoint and host format)."""
    if self.api == 'pmap':
      return jax.tree.map(lambda x: x[0], tree)
    return tree

  def shard_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's batch -> a global array split over the devices along the batch axis."""

    def put(x):
      x = np.asarray(x)
      if self.api == 'pmap':
        local = self.num_local_devices
        if x.shape[0] % local:
          raise ValueError(f'local batch {x.shape[0]} does not split over {local} devices')
        x = x.reshape(local, x.shape[0] // local, *x.shape[1:])
      elif x.shape[0] % self.num_local_devices:
        raise ValueError(
          f'local batch {x.shape[0]} does not split over {self.num_local_devices} devices'
        )
      return jax.make_array_from_process_local_data(self._sharded(), x)

    return jax.tree.map(put, local_batch)

  def compile(
    self, step: Callable[..., Any], *, sharded_output: bool = False, donate_state: bool = False
  ) -> Callable[..., Any]:
    """Compiles `step(state, batch)` written for one device with collectives over `'batch'`.

    Args:
      step: the per-device function; its first argument is the (replicated) state, its second the batch.
      sharded_output: the output is per-example (split over devices) rather than replicated.
      donate_state: let the step reuse the state's buffers for its output (the caller drops the old state).

    Returns:
      The compiled function, taking `(replicate(state), shard_batch(batch))`.
    """
    donate = (0,) if donate_state else ()
    if self.api == 'pmap':
      return jax.pmap(step, axis_name=AXIS, donate_argnums=donate)
    out_spec = P(AXIS) if sharded_output else P()
    # check_vma=False: the step is written with explicit pmap-style collectives, so replicated
    # outputs
    # (psum/pmean results) are declared replicated by out_specs rather than inferred.
    mapped = jax.shard_map(
      step, mesh=self.mesh, in_specs=(P(), P(AXIS)), out_specs=out_spec, check_vma=False
    )
    return jax.jit(mapped, donate_argnums=donate)

  def gather(self, sharded: PyTree) -> PyTree:
    """A per-example output of the step -> host numpy over the global batch, on every process."""

    def fetch(x):
      x = multihost_utils.process_allgather(x, tiled=True) if jax.process_count() > 1 else x
      x = np.asarray(x)
      return x.reshape(-1, *x.shape[2:]) if self.api == 'pmap' else x

    return jax.tree.map(fetch, sharded)
