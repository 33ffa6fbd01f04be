"""Cluster detection, jax.distributed arguments and the compilation cache settings (no processes started)."""

import jax
import ml_collections
import pytest

from configs import base
from ms_cxr import distributed
from ms_cxr.errors import UserError

SRUN_4_TASKS = {
  'SLURM_JOB_ID': '123',
  'SLURM_PROCID': '2',
  'SLURM_LOCALID': '0',
  'SLURM_NTASKS': '4',
  'SLURM_STEP_NUM_TASKS': '4',
  'SLURM_STEP_NODELIST': 'gpu[01-02]',
}
K8S_POD_1 = {
  'JOB_COMPLETION_INDEX': '1',
  'JAX_COORDINATOR_ADDRESS': 'ms-cxr-0.ms-cxr:1234',
  'JAX_NUM_PROCESSES': '2',
  'KUBERNETES_SERVICE_HOST': '10.0.0.1',
}


@pytest.mark.parametrize(
  'environ, expected',
  [
    ({}, None),
    ({'HOME': '/root', 'PATH': '/usr/bin'}, None),
    (SRUN_4_TASKS, 'slurm'),
    # The batch script of a 4-task allocation (no srun): one process.
    (
      {
        'SLURM_JOB_ID': '123',
        'SLURM_PROCID': '0',
        'SLURM_NTASKS': '4',
        'SLURM_STEP_NUM_TASKS': '1',
      },
      None,
    ),
    ({'SLURM_JOB_ID': '123', 'SLURM_PROCID': '0', 'SLURM_NTASKS': '1'}, None),
    ({'SLURM_JOB_ID': '123', 'SLURM_PROCID': '1', 'SLURM_NTASKS': '2'}, 'slurm'),
    ({'SLURM_JOB_ID': '123', 'SLURM_NTASKS': '4'}, None),  # salloc shell: no task id
    # The batch script of an --ntasks=4 job, run without srun: one process.
    ({'SLURM_JOB_ID': '123', 'SLURM_PROCID': '0', 'SLURM_NTASKS': '4'}, None),
    ({'SLURM_JOB_ID': '123', 'SLURM_PROCID': '0', 'SLURM_NTASKS': 'lots'}, None),
    ({'TPU_WORKER_HOSTNAMES': 't1k-0,t1k-1,t1k-2,t1k-3', 'TPU_WORKER_ID': '3'}, 'tpu_pod'),
    ({'TPU_WORKER_HOSTNAMES': 'localhost', 'TPU_WORKER_ID': '0'}, None),  # a single-host TPU VM
    ({'TPU_PROCESS_ADDRESSES': '10.0.0.2:8476,10.0.0.3:8476'}, 'tpu_pod'),
    ({'MEGASCALE_COORDINATOR_ADDRESS': 'h0', 'MEGASCALE_NUM_SLICES': '2'}, 'tpu_pod'),
    ({'MEGASCALE_NUM_SLICES': '1'}, None),
    (K8S_POD_1, 'kubernetes'),
    ({'JOB_COMPLETION_INDEX': '0'}, None),  # an Indexed Job without a coordinator
    ({**K8S_POD_1, 'JAX_NUM_PROCESSES': '1'}, None),
  ],
)
def test_detect_cluster(environ, expected):
  assert distributed.detect_cluster(environ) == expected


def _parallel(**overrides) -> ml_collections.ConfigDict:
  parallel = base.get_config().parallel
  parallel.update(overrides)
  return parallel


def test_single_process_runs_do_not_start_jax_distributed():
  assert distributed.distributed_args(_parallel(), {}) is None
  assert (
    distributed.distributed_args(_parallel(), {'SLURM_JOB_ID': '1', 'SLURM_NTASKS': '1'}) is None
  )
  assert distributed.initialize(_parallel(), {}) is False
  assert not jax.distributed.is_initialized()


def test_slurm_and_tpu_leave_every_argument_to_jax_auto_detection():
  unset = {'coordinator_address': None, 'num_processes': None, 'process_id': None}
  assert distributed.distributed_args(_parallel(), SRUN_4_TASKS) == unset
  assert distributed.distributed_args(_parallel(multihost=True), {}) == unset


def test_kubernetes_process_id_is_the_completion_index():
  assert distributed.distributed_args(_parallel(), K8S_POD_1) == {
    'coordinator_address': 'ms-cxr-0.ms-cxr:1234',
    'num_processes': 2,
    'process_id': 1,
  }
  # An explicit JAX_PROCESS_ID (the manifest sets it from the same annotation) comes first.
  args = distributed.distributed_args(_parallel(), {**K8S_POD_1, 'JAX_PROCESS_ID': '0'})
  assert args['process_id'] == 0


def test_config_overrides_come_before_the_environment():
  parallel = _parallel(coordinator_address='10.1.2.3:5555', num_processes=4, process_id=3)
  assert distributed.distributed_args(parallel, K8S_POD_1) == {
    'coordinator_address': '10.1.2.3:5555',
    'num_processes': 4,
    'process_id': 3,
  }
  # num_processes > 1 alone makes a run multi-process.
  assert distributed.distributed_args(_parallel(num_processes=2, process_id=0), {}) == {
    'coordinator_address': None,
    'num_processes': 2,
    'process_id': 0,
  }
  with pytest.raises(UserError, match='process_id=2 must be below num_processes=2'):
    distributed.distributed_args(_parallel(multihost=True, num_processes=2, process_id=2), {})


def test_compilation_cache_caches_every_program():
  names = (
    'jax_compilation_cache_dir',
    'jax_persistent_cache_min_compile_time_secs',
    'jax_persistent_cache_min_entry_size_bytes',
  )
  before = {name: getattr(jax.config, name) for name in names}
  try:
    distributed.configure_compilation_cache('')
    assert {name: getattr(jax.config, name) for name in names} == before
    distributed.configure_compilation_cache('/tmp/ms_cxr_cache')
    assert jax.config.jax_compilation_cache_dir == '/tmp/ms_cxr_cache'
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
    assert jax.config.jax_persistent_cache_min_entry_size_bytes == -1
  finally:
    for name, value in before.items():
      jax.config.update(name, value)
