"""Multi-process runs: starting `jax.distributed` on a cluster, and the persistent compilation cache.

Both must happen before anything touches a device (`jax.devices()`, the first computation), so `ms_cxr.main`
calls them first. A run is multi-process when `config.parallel.multihost=True` or when `detect_cluster` recognises
a launcher that started several processes:

  * `slurm`: `srun` with more than one task (SLURM_JOB_ID, SLURM_PROCID, SLURM_STEP_NUM_TASKS > 1);
    JAX derives the coordinator (first node of the step), the number of processes and this process's id.
  * `tpu_pod`: a Cloud TPU pod slice or multislice (TPU_WORKER_HOSTNAMES or TPU_PROCESS_ADDRESSES naming more than
    one host, or MEGASCALE_NUM_SLICES > 1); JAX reads the rest from the TPU environment or metadata server. A plain
    TPU VM pod started with `gcloud ... ssh --worker=all` sets none of these: pass `--config.parallel.multihost=True`
    (launch/tpu_pod.sh does).
  * `kubernetes`: an Indexed Job (JOB_COMPLETION_INDEX) whose pods also get JAX_COORDINATOR_ADDRESS and
    JAX_NUM_PROCESSES > 1 (launch/k8s_job.yaml); the process id is the completion index.

What JAX cannot detect comes, in this order, from `config.parallel.coordinator_address` / `num_processes` /
`process_id` (empty or -1 = not set), then the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID (JOB_COMPLETION_INDEX on Kubernetes), then JAX's own cluster detection. On CPU the cross-process
collectives use gloo.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
from absl import logging

from ms_cxr.errors import UserError

CLUSTERS = ('slurm', 'tpu_pod', 'kubernetes')


def _int(value: str | None, default: int) -> int:
  try:
    return int(str(value).strip())
  except ValueError:
    return default


def _hosts(value: str | None) -> list[str]:
  return [h for h in (value or '').split(',') if h.strip()]


def detect_cluster(environ: Mapping[str, str]) -> str | None:
  """The launcher that started this process as one of several: 'slurm', 'tpu_pod', 'kubernetes', or None.

  Args:
    environ: the process environment (`os.environ`, or a plain dict in tests).

  Returns:
    None for a single process (including a SLURM job step or TPU VM with one task/host).
  """
  if 'SLURM_JOB_ID' in environ and 'SLURM_PROCID' in environ:
    # srun sets SLURM_STEP_NUM_TASKS for the job step. SLURM_NTASKS alone is the allocation's task count: the
    # batch script of an --ntasks=8 job has it, and run there without srun this is one process (rank 0), which must
    # not wait for seven others. A rank above 0 is one of several whatever the variables say.
    tasks = environ.get('SLURM_STEP_NUM_TASKS')
    if tasks is None:
      tasks = environ.get('SLURM_NTASKS') if _int(environ.get('SLURM_PROCID'), 0) > 0 else '1'
    if _int(tasks, 1) > 1:
      return 'slurm'
  tpu_hosts = environ.get('TPU_PROCESS_ADDRESSES') or environ.get('TPU_WORKER_HOSTNAMES')
  if len(_hosts(tpu_hosts)) > 1 or _int(environ.get('MEGASCALE_NUM_SLICES'), 1) > 1:
    return 'tpu_pod'
  if (
    'JOB_COMPLETION_INDEX' in environ
    and environ.get('JAX_COORDINATOR_ADDRESS')
    and _int(environ.get('JAX_NUM_PROCESSES'), 1) > 1
  ):
    return 'kubernetes'
  return None


def distributed_args(
  parallel: ml_collections.ConfigDict, environ: Mapping[str, str]
) -> dict[str, Any] | None:
  """Keyword arguments for `jax.distributed.initialize`, or None for a single-process run.

  Arguments left None are auto-detected by JAX (SLURM, Cloud TPU, MPI).

  Raises:
    UserError: an explicit process id outside [0, num_processes).
  """
  cluster = detect_cluster(environ)
  coordinator = parallel.coordinator_address or environ.get('JAX_COORDINATOR_ADDRESS') or None
  num_processes = parallel.num_processes
  if num_processes < 1:
    num_processes = _int(environ.get('JAX_NUM_PROCESSES'), -1)
  process_id = parallel.process_id
  if process_id < 0:
    process_id = _int(environ.get('JAX_PROCESS_ID'), -1)
  if process_id < 0 and cluster == 'kubernetes':
    process_id = _int(environ.get('JOB_COMPLETION_INDEX'), -1)
  if not (parallel.multihost or cluster or num_processes > 1):
    return None
  if num_processes >= 1 and process_id >= 0 and process_id >= num_processes:
    raise UserError(
      f'config.parallel.process_id={process_id} must be below num_processes={num_processes}'
    )
  return {
    'coordinator_address': coordinator,
    'num_processes': num_processes if num_processes >= 1 else None,
    'process_id': process_id if process_id >= 0 else None,
  }


def initialize(
  parallel: ml_collections.ConfigDict, environ: Mapping[str, str] | None = None
) -> bool:
  """Starts `jax.distributed` when the run is multi-process; call before anything touches a device.

  Args:
    parallel: `config.parallel` (multihost, coordinator_address, num_processes, process_id).
    environ: the environment to detect the cluster from (default `os.environ`).

  Returns:
    Whether the distributed runtime is running (also True when it was already started).
  """
  if jax.distributed.is_initialized():
    return True
  environ = os.environ if environ is None else environ
  args = distributed_args(parallel, environ)
  if args is None:
    return False
  platforms = jax.config.jax_platforms or environ.get('JAX_PLATFORMS', '')
  if not platforms or 'cpu' in platforms.split(','):
    # Cross-process collectives of the CPU backend (the default is none on some versions).
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  logging.info(
    'jax.distributed (%s): coordinator %s, %s processes, process id %s',
    detect_cluster(environ) or 'explicit',
    *(args[k] if args[k] is not None else 'auto' for k in args),
  )
  jax.distributed.initialize(**args)
  return True


def configure_compilation_cache(directory: str) -> None:
  """Persists compiled programs in `directory` ('' = off), so a restarted or repeated run skips compilation.

  Every program is cached, however small or quick to compile. On a cluster use a directory on a filesystem all
  hosts share (e.g. beside the workdirs): a job requeued after preemption, or the next job of a sweep with the
  same model and batch shapes, then starts training without recompiling.
  """
  if not directory:
    return
  jax.config.update('jax_compilation_cache_dir', os.path.abspath(os.path.expanduser(directory)))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  # -1: no minimum entry size, and no filesystem-specific override of it.
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
