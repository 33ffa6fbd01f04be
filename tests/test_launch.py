"""The launchers in launch/: syntax, the Kubernetes manifest, the sweep expansion, and real multi-process runs.

Multi-process runs use jax.distributed on this machine (CPU, gloo): `launch/local.sh --num_processes=2`, each
process with one CPU device, against one process with two devices over the same global batches (launch/slurm.sbatch
under a stand-in `srun` runs in test_preemption.py). Every subprocess uses one persistent compilation cache.
"""

import glob
import importlib.util
import json
import os
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import yaml
from conftest import REPO

from ms_cxr import checkpointing, distributed, main

LAUNCH = REPO / 'launch'
SMOKE = '--config=configs/densenet.py:dataset=synthetic,smoke'
SMOKE_STEPS = 12
PER_STEP_LOSSES = ['--config.train.log_every_steps=1']
TIMEOUT = 600


# --------------------------------------------------------------------------------------------------
# Helpers (also used by test_preemption.py)
# --------------------------------------------------------------------------------------------------


def _env(tmp_path_factory, devices_per_process: int, **extra) -> dict[str, str]:
  """The environment of a launched run: CPU, `devices_per_process` devices, the session's compilation cache."""
  cache = tmp_path_factory.getbasetemp() / 'ms_cxr_subprocess_jax_cache'
  cache.mkdir(exist_ok=True)
  env = {
    **os.environ,
    'JAX_PLATFORMS': 'cpu',
    'PYTHON': sys.executable,
    'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices_per_process}',
    'JAX_COMPILATION_CACHE_DIR': str(cache),
    'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
    'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '-1',
  }
  env.update(extra)
  return env


def _run(command, env, **kwargs) -> subprocess.CompletedProcess:
  return subprocess.run(
    command,
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    timeout=TIMEOUT,
    **kwargs,
  )


def _final_state(workdir) -> tuple[int, dict]:
  """(step, host variables) of the latest checkpoint, read by the library in this one process whatever topology
  saved it (as `train.init_from` reads a multi-host run's checkpoint)."""
  steps = sorted(int(s) for s in os.listdir(f'{workdir}/checkpoints/latest') if s.isdigit())
  return steps[-1], jax.device_get(checkpointing.load_variables(str(workdir)))


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b, strict=True):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def _scalars(workdir, tag: str = 'train/loss') -> dict[int, float]:
  """{step: value} of one TensorBoard scalar over every event file of the workdir (runs resumed included)."""
  from tensorboardX.proto import event_pb2

  values: dict[int, float] = {}
  for path in sorted(glob.glob(f'{workdir}/tensorboard/events.out.tfevents.*')):
    data = open(path, 'rb').read()
    position = 0
    while position < len(data):  # TFRecord: length, CRC of length, record, CRC of record
      (length,) = struct.unpack('<Q', data[position : position + 8])
      event = event_pb2.Event.FromString(data[position + 12 : position + 12 + length])
      position += 16 + length
      for value in event.summary.value:
        if value.tag == tag:
          assert values.setdefault(event.step, value.simple_value) == value.simple_value, event.step
  return values


def _process_lines(output: str) -> list[str]:
  return sorted(
    line.split('] ', 1)[1] for line in output.splitlines() if ' device(s), process ' in line
  )


# --------------------------------------------------------------------------------------------------
# Syntax and manifests
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'script', sorted(p.name for p in LAUNCH.iterdir() if p.suffix in ('.sh', '.sbatch'))
)
def test_shell_scripts_parse(script):
  result = subprocess.run(['bash', '-n', str(LAUNCH / script)], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


def test_every_launcher_exists():
  names = {p.name for p in LAUNCH.iterdir()}
  assert {'local.sh', 'slurm.sbatch', 'tpu_pod.sh', 'k8s_job.yaml', 'sweep.py'} <= names


def test_gpu_benchmark_script_runs_each_setting_and_tables_them(tmp_path):
  """The accelerator benchmark's four runs, on the CPU with a tiny DenseNet, from another folder; the two with
  torch beside JAX fail here (a stand-in interpreter) and run again without it."""
  tiny = [
    '--config.model.name=densenet_tiny',
    '--sizes=32',
    '--steps=1',
    '--warmup=0',
    '--repeats=1',
  ]
  python = tmp_path / 'python'
  python.write_text(
    '#!/usr/bin/env bash\n'
    'for a in "$@"; do [[ $a == --torch ]] && { echo "torch and JAX clash" >&2; exit 1; }; done\n'
    f'exec {shlex.quote(sys.executable)} "$@"\n'
  )
  python.chmod(0o755)
  result = subprocess.run(
    ['bash', str(LAUNCH / 'gpu_benchmark.sh'), 'out', '2', *tiny],
    cwd=tmp_path,
    env={**os.environ, 'PYTHON': str(python)},
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr
  lines = [
    json.loads(line) for line in (tmp_path / 'out' / 'benchmark.jsonl').read_text().splitlines()
  ]
  jax_lines = [r for r in lines if r.get('framework') == 'jax']
  assert [
    (r['norm'], r['dtype'], r['pointwise_matmul'], r['kernel_grad_matmul'], r['size'], r['batch'])
    for r in jax_lines
  ] == [
    ('batchnorm', 'bfloat16', True, True, 32, 2),
    ('ssbn', 'bfloat16', True, True, 32, 2),
    ('batchnorm', 'bfloat16', False, False, 32, 2),
    ('batchnorm', 'float32', True, True, 32, 2),
  ]
  log = (tmp_path / 'out' / 'benchmark.log').read_text()
  assert log.count('torch and JAX clash') == 2
  assert log.count(': exit 1') == 2 and log.count('without torch: exit 0') == 2
  assert log.count(': exit 0') == 4  # ssbn, XLA convolutions, and the two runs again without torch
  table = (tmp_path / 'out' / 'table.md').read_text().splitlines()
  assert table == result.stdout.splitlines() and len(table) == 2 + 4

  # No time left: every run is skipped and logged, and the table is empty.
  result = subprocess.run(
    ['bash', str(LAUNCH / 'gpu_benchmark.sh'), 'spent'],
    cwd=tmp_path,
    env={**os.environ, 'PYTHON': sys.executable, 'BUDGET_S': '0'},
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr
  assert (tmp_path / 'spent' / 'benchmark.log').read_text().count('skipped (budget spent)') == 4
  assert len(result.stdout.splitlines()) == 2


def _k8s_documents():
  with open(LAUNCH / 'k8s_job.yaml') as f:
    return {doc['kind']: doc for doc in yaml.safe_load_all(f)}


def test_k8s_manifest_is_a_consistent_indexed_job_with_a_headless_service():
  docs = _k8s_documents()
  service, job = docs['Service'], docs['Job']
  name = job['metadata']['name']
  pod = job['spec']['template']['spec']
  container = pod['containers'][0]
  env = {e['name']: e.get('value', e.get('valueFrom')) for e in container['env']}
  processes = int(env['JAX_NUM_PROCESSES'])

  assert service['spec']['clusterIP'] == 'None'
  assert service['metadata']['name'] == pod['subdomain']
  assert service['spec']['selector'] == {'job-name': name}
  assert job['spec']['completionMode'] == 'Indexed'
  assert job['spec']['completions'] == job['spec']['parallelism'] == processes > 1
  host, port = env['JAX_COORDINATOR_ADDRESS'].rsplit(':', 1)
  assert host == f'{name}-0.{pod["subdomain"]}'  # pod 0 of the Indexed Job, through the Service
  assert int(port) in [p['port'] for p in service['spec']['ports']]
  annotation = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
  assert env['JAX_PROCESS_ID'] == {'fieldRef': {'fieldPath': annotation}}
  assert container['command'] == ['python', '-m', 'ms_cxr.main']
  assert any(a.startswith('--config=') for a in container['args'])
  assert any(a.startswith('--workdir=') for a in container['args'])
  # podFailurePolicy needs restartPolicy Never and names the container it watches.
  assert pod['restartPolicy'] == 'Never'
  for rule in job['spec']['podFailurePolicy']['rules']:
    if 'onExitCodes' in rule:
      assert rule['onExitCodes']['containerName'] == container['name']
  # The exit statuses of ms_cxr.main: a bad config or a non-finite loss fails the Job; a preempted process (every
  # process saved the same step and stopped) is recreated without using up the retries.
  by_status = {
    code: rule['action']
    for rule in job['spec']['podFailurePolicy']['rules']
    for code in rule.get('onExitCodes', {}).get('values', [])
  }
  assert by_status == {
    main.EXIT_USER_ERROR: 'FailJob',
    main.EXIT_NON_FINITE: 'FailJob',
    main.EXIT_PREEMPTED: 'Ignore',
  }

  # What ms_cxr.distributed makes of pod 1's environment.
  pod_env = {'JOB_COMPLETION_INDEX': '1', 'JAX_PROCESS_ID': '1'}
  pod_env.update({k: v for k, v in env.items() if isinstance(v, str)})
  assert distributed.detect_cluster(pod_env) == 'kubernetes'
  parallel = __import__('configs.base', fromlist=['base']).get_config().parallel
  assert distributed.distributed_args(parallel, pod_env) == {
    'coordinator_address': env['JAX_COORDINATOR_ADDRESS'],
    'num_processes': processes,
    'process_id': 1,
  }


def test_tpu_pod_script_runs_main_on_every_worker():
  result = subprocess.run(
    [
      'bash',
      str(LAUNCH / 'tpu_pod.sh'),
      '--name=my-v4-32',
      '--zone=us-central2-b',
      '--dry_run',
      '--',
      '--config=configs/ssbn.py:dataset=nih',
      '--workdir=/mnt/runs/a b',
    ],
    capture_output=True,
    text=True,
  )
  assert result.returncode == 0, result.stderr
  command = shlex.split(result.stdout)
  assert command[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'my-v4-32']
  assert '--worker=all' in command and command[command.index('--zone') + 1] == 'us-central2-b'
  remote = shlex.split(next(c for c in command if c.startswith('--command=')).split('=', 1)[1])
  assert remote[:4] == ['cd', '$HOME/ms_cxr', '&&', 'python3']
  assert remote[4:] == [
    '-m',
    'ms_cxr.main',
    '--config=configs/ssbn.py:dataset=nih',
    '--workdir=/mnt/runs/a b',
    '--config.parallel.multihost=True',
  ]
  missing = subprocess.run(['bash', str(LAUNCH / 'tpu_pod.sh'), '--dry_run'], capture_output=True)
  assert missing.returncode == 2


# --------------------------------------------------------------------------------------------------
# Sweeps
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def sweep():
  spec = importlib.util.spec_from_file_location('sweep', LAUNCH / 'sweep.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_sweep_expands_the_grid_first_sweep_outermost(sweep):
  assert sweep.expand(['optim.learning_rate=1e-4,3e-4', 'train.seed=0,1']) == [
    {'optim.learning_rate': '1e-4', 'train.seed': '0'},
    {'optim.learning_rate': '1e-4', 'train.seed': '1'},
    {'optim.learning_rate': '3e-4', 'train.seed': '0'},
    {'optim.learning_rate': '3e-4', 'train.seed': '1'},
  ]
  assert sweep.expand([]) == [{}]
  assert sweep.parse_sweep('data.sizes=(224,),(224,448)') == ('data.sizes', ['(224,)', '(224,448)'])
  assert sweep.parse_sweep('--config.model.norm=ssbn') == ('model.norm', ['ssbn'])
  for bad in ('seed=0,1', 'train.seed', 'train.seed=0,,1', 'data.sizes=(224,'):
    with pytest.raises(ValueError):
      sweep.expand([bad])
  with pytest.raises(ValueError, match='swept twice'):
    sweep.expand(['train.seed=0', 'train.seed=1'])


def test_sweep_workdir_names(sweep):
  assert sweep.run_name({'optim.learning_rate': '1e-4', 'train.seed': '0'}) == (
    'learning_rate=1e-4_seed=0'
  )
  assert sweep.run_name({'data.seed': '1', 'train.seed': '2'}) == 'data.seed=1_train.seed=2'
  assert sweep.run_name({'data.sizes': '(224,448)'}) == 'sizes=224-448'
  with pytest.raises(ValueError, match='same workdir name'):
    sweep.plan('local', '', ['data.sizes=(224,),224'], 'runs')


def test_sweep_commands_for_each_launcher(sweep):
  specs = ['optim.learning_rate=1e-4,3e-4', 'train.seed=0,1']
  base = "--config=configs/ssbn.py:dataset=nih --config.data.root='/data/CXR 14'"
  main_args = [
    '--config=configs/ssbn.py:dataset=nih',
    '--config.data.root=/data/CXR 14',
    '--workdir=runs/sweep/learning_rate=3e-4_seed=1',
    '--config.optim.learning_rate=3e-4',
    '--config.train.seed=1',
  ]
  slurm = sweep.plan('slurm', base, specs, 'runs/sweep', ['--nodes=4'])
  assert [name for name, _ in slurm] == [
    'learning_rate=1e-4_seed=0',
    'learning_rate=1e-4_seed=1',
    'learning_rate=3e-4_seed=0',
    'learning_rate=3e-4_seed=1',
  ]
  assert slurm[3][1] == [
    'sbatch',
    '--job-name=ms-cxr-learning_rate=3e-4_seed=1',
    '--nodes=4',
    str(LAUNCH / 'slurm.sbatch'),
    *main_args,
  ]
  local = sweep.plan('local', base, specs, 'runs/sweep', ['--num_processes=2'])
  assert local[3][1] == [str(LAUNCH / 'local.sh'), '--num_processes=2', '--', *main_args]
  assert sweep.plan('local', base, specs, 'runs/sweep')[3][1] == [
    str(LAUNCH / 'local.sh'),
    *main_args,
  ]
  tpu = sweep.plan('tpu_pod', base, specs, 'runs/sweep', ['--name=pod', '--zone=z'])
  assert tpu[3][1] == [str(LAUNCH / 'tpu_pod.sh'), '--name=pod', '--zone=z', '--', *main_args]


def test_sweep_k8s_manifests_rename_the_job_service_and_coordinator(sweep, tmp_path):
  manifests = tmp_path / 'manifests'
  code = sweep.main(
    [
      '--launcher=k8s',
      '--base=--config=configs/densenet.py:dataset=nih',
      '--sweep=train.seed=0,1',
      '--workdir_root=/runs/sweep',
      f'--manifest_dir={manifests}',
    ]
  )
  assert code == 0
  paths = sorted(manifests.iterdir())
  assert [p.name for p in paths] == ['ms-cxr-000.yaml', 'ms-cxr-001.yaml']
  docs = {d['kind']: d for d in yaml.safe_load_all(paths[1].read_text())}
  pod = docs['Job']['spec']['template']['spec']
  env = {e['name']: e.get('value') for e in pod['containers'][0]['env']}
  assert docs['Job']['metadata']['name'] == docs['Service']['metadata']['name'] == 'ms-cxr-001'
  assert pod['subdomain'] == 'ms-cxr-001'
  assert docs['Service']['spec']['selector'] == {'job-name': 'ms-cxr-001'}
  assert env['JAX_COORDINATOR_ADDRESS'] == 'ms-cxr-001-0.ms-cxr-001:1234'
  assert pod['containers'][0]['args'] == [
    '--config=configs/densenet.py:dataset=nih',
    '--workdir=/runs/sweep/seed=1',
    '--config.train.seed=1',
  ]
  # Everything else is the template's.
  template = _k8s_documents()
  assert docs['Job']['spec']['podFailurePolicy'] == template['Job']['spec']['podFailurePolicy']
  assert not os.path.exists('/runs/sweep')


def test_sweep_prints_without_submitting(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      str(LAUNCH / 'sweep.py'),
      '--launcher=local',
      f'--base={SMOKE}',
      '--sweep=train.seed=0,1',
      '--sweep=optim.learning_rate=1e-3,2e-3,4e-3',
      f'--workdir_root={tmp_path}/sweep',
    ],
    capture_output=True,
    text=True,
  )
  assert result.returncode == 0, result.stderr
  commands = [shlex.split(line) for line in result.stdout.splitlines()]
  assert len(commands) == 6
  assert commands[0] == [
    str(LAUNCH / 'local.sh'),
    SMOKE,
    f'--workdir={tmp_path}/sweep/seed=0_learning_rate=1e-3',
    '--config.train.seed=0',
    '--config.optim.learning_rate=1e-3',
  ]
  assert not (tmp_path / 'sweep').exists()


# --------------------------------------------------------------------------------------------------
# local.sh process management (a stand-in for python, no training)
# --------------------------------------------------------------------------------------------------

FAKE_PYTHON = r"""#!/usr/bin/env bash
# python stand-in: `-c` runs the real interpreter; `-m ms_cxr.main ARGS` records its pid and arguments, then acts
# as $FAKE_MODE says for its process id.
if [[ $1 == -c ]]; then exec "$REAL_PYTHON" "$@"; fi
all="$*"
id=${all##*--config.parallel.process_id=}
echo "$$ $*" > "$FAKE_DIR/process.$id"
case "$FAKE_MODE.$id" in
  fail.1) sleep 0.5; exit 7 ;;
  fail.0) trap '' TERM; exec sleep 300 ;;  # ignores SIGTERM: only SIGKILL stops it
  preempt.*) sleep 300 > /dev/null 2>&1 & trap 'kill $!; exit 4' TERM; wait ;;
esac
"""


@pytest.fixture
def fake_python(tmp_path):
  path = tmp_path / 'python'
  path.write_text(FAKE_PYTHON)
  path.chmod(0o755)
  return path


def _fake_env(fake_python, mode):
  return {
    **os.environ,
    'PYTHON': str(fake_python),
    'REAL_PYTHON': sys.executable,
    'FAKE_DIR': str(fake_python.parent),
    'FAKE_MODE': mode,
    'KILL_GRACE': '1',
  }


def _recorded(directory, process_id) -> tuple[int, list[str]]:
  pid, *args = (directory / f'process.{process_id}').read_text().split()
  return int(pid), args


def test_local_sh_stops_the_others_when_one_process_fails(fake_python, tmp_path):
  result = _run(
    ['bash', str(LAUNCH / 'local.sh'), '--num_processes=2', '--', SMOKE, '--workdir=w'],
    _fake_env(fake_python, 'fail'),
  )
  assert result.returncode == 7, result.stdout
  assert 'process 1 exited with status 7; stopping the others' in result.stdout
  pid0, args0 = _recorded(tmp_path, 0)
  _, args1 = _recorded(tmp_path, 1)
  with pytest.raises(ProcessLookupError):  # killed (it ignored SIGTERM) and reaped
    os.kill(pid0, 0)
  coordinator = [a for a in args0 if a.startswith('--config.parallel.coordinator_address=')]
  assert len(coordinator) == 1 and coordinator[0].startswith(
    '--config.parallel.coordinator_address=127.0.0.1:'
  )
  for process_id, args in ((0, args0), (1, args1)):
    assert args == [
      '-m',
      'ms_cxr.main',
      SMOKE,
      '--workdir=w',
      '--config.parallel.multihost=True',
      coordinator[0],
      '--config.parallel.num_processes=2',
      f'--config.parallel.process_id={process_id}',
    ]


def test_local_sh_forwards_sigterm_and_exits_with_the_preemption_status(fake_python, tmp_path):
  process = subprocess.Popen(
    ['bash', str(LAUNCH / 'local.sh'), '--num_processes=2', '--', SMOKE, '--workdir=w'],
    cwd=REPO,
    env=_fake_env(fake_python, 'preempt'),
  )
  try:
    deadline = time.monotonic() + 60
    while not all((tmp_path / f'process.{i}').exists() for i in (0, 1)):
      assert time.monotonic() < deadline, 'the processes did not start'
      time.sleep(0.1)
    time.sleep(0.3)  # let both install their SIGTERM trap
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 4
  finally:
    process.kill()
  for process_id in (0, 1):
    with pytest.raises(ProcessLookupError):
      os.kill(_recorded(tmp_path, process_id)[0], 0)


def test_local_sh_rejects_a_bad_process_count():
  result = _run(['bash', str(LAUNCH / 'local.sh'), '--num_processes=0', '--', SMOKE], os.environ)
  assert result.returncode == 2
  assert 'must be a positive integer' in result.stdout


# --------------------------------------------------------------------------------------------------
# Real multi-process training
# --------------------------------------------------------------------------------------------------


def _reference_run(tmp_path_factory) -> tuple[str, dict[int, float]]:
  """The smoke run in one process with two devices, losses logged every step: what the multi-process runs (here
  and in test_preemption.py) and the interrupted runs are compared with. Runs once per session (the workdir is
  kept under the session's base temporary directory). Returns (workdir, {step: loss})."""
  workdir = tmp_path_factory.getbasetemp() / 'ms_cxr_reference_run'
  if not (workdir / 'eval' / 'test' / 'metrics.json').exists():
    result = _run(
      ['bash', str(LAUNCH / 'local.sh'), SMOKE, *PER_STEP_LOSSES, f'--workdir={workdir}'],
      _env(tmp_path_factory, devices_per_process=2),
    )
    assert result.returncode == 0, result.stdout[-3000:]
    lines = _process_lines(result.stdout)
    assert len(lines) == 1 and lines[0].endswith('on 2 cpu device(s), process 0 of 1'), lines
  losses = _scalars(workdir)
  assert sorted(losses) == list(range(1, SMOKE_STEPS + 1))
  assert len(set(losses.values())) == SMOKE_STEPS  # a real loss curve
  # Non-zero gradients: the runs compared with this one did train.
  assert min(_scalars(workdir, 'train/l2_grads').values()) > 0
  return str(workdir), losses


@pytest.fixture
def reference_run(tmp_path_factory):
  return _reference_run(tmp_path_factory)


def _check_against_reference(workdir, reference, *, log_every_steps: int) -> None:
  """Final checkpoint, test metrics and logged losses of `workdir` match the reference run's."""
  reference_workdir, reference_losses = reference
  with open(f'{workdir}/eval/test/metrics.json') as f:
    metrics = json.load(f)
  with open(f'{reference_workdir}/eval/test/metrics.json') as f:
    expected = json.load(f)
  assert metrics['checkpoint_step'] == expected['checkpoint_step'] == SMOKE_STEPS
  assert metrics['num_images'] == expected['num_images'] == 60
  assert metrics['mean_auroc'] == pytest.approx(expected['mean_auroc'], abs=1e-6)
  step, state = _final_state(workdir)
  assert step == SMOKE_STEPS
  _assert_trees_close(state, _final_state(reference_workdir)[1])
  # A logged loss is the mean over every step since the previous log line (steps fetched early, for a
  # validation or a checkpoint, count towards the next line).
  losses = _scalars(workdir)
  logged = list(range(log_every_steps, SMOKE_STEPS + 1, log_every_steps))
  assert sorted(losses) == logged
  for s, loss in losses.items():
    window = [reference_losses[k] for k in range(s - log_every_steps + 1, s + 1)]
    assert loss == pytest.approx(np.mean(window), rel=1e-5), s


def test_two_local_processes_train_like_one_process(tmp_path_factory, reference_run):
  workdir = tmp_path_factory.mktemp('two_processes') / 'run'
  result = _run(
    ['bash', str(LAUNCH / 'local.sh'), '--num_processes=2', '--', SMOKE, f'--workdir={workdir}'],
    _env(tmp_path_factory, devices_per_process=1),
  )
  assert result.returncode == 0, result.stdout[-3000:]
  lines = _process_lines(result.stdout)
  assert len(lines) == 2 and lines[0].endswith('on 2 cpu device(s), process 0 of 2'), lines
  assert lines[1].endswith('on 2 cpu device(s), process 1 of 2'), lines
  assert sorted(os.listdir(f'{workdir}/checkpoints/latest')) == ['12', '6']
  _check_against_reference(workdir, reference_run, log_every_steps=4)
  # Only process 0 prints the table.
  assert sum(line.startswith('mean AUROC ') for line in result.stdout.splitlines()) == 1


FAKE_SRUN = r"""#!/usr/bin/env bash
# srun stand-in: starts $SLURM_NTASKS copies of the command on this machine, with the variables srun sets per task
# ($FAKE_SRUN_STATUS set: runs nothing and exits with it, first writing $MS_CXR_PREEMPTED_MARKER as process 0
# would if $FAKE_SRUN_MARKER is set).
if [[ -n ${FAKE_SRUN_MARKER:-} ]]; then echo 'SIGTERM: stopped' > "$MS_CXR_PREEMPTED_MARKER"; fi
if [[ -n ${FAKE_SRUN_STATUS:-} ]]; then exit "$FAKE_SRUN_STATUS"; fi
while [[ $1 == -* ]]; do shift; done
n=${SLURM_NTASKS:-1}
pids=()
for ((i = 0; i < n; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_STEP_ID=0 SLURM_STEP_NUM_TASKS=$n SLURM_STEP_NUM_NODES=1 \
    SLURM_STEP_NODELIST=localhost "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || { rc=$?; if ((rc > status)); then status=$rc; fi; }
done
exit $status
"""
FAKE_SCONTROL = r"""#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/scontrol.calls"
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _slurm_env(tmp_path, tmp_path_factory, num_tasks: int = 2, **extra) -> dict[str, str]:
  """What sbatch gives the batch script (one node, localhost), with stand-ins for srun and scontrol on PATH."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir(exist_ok=True)
  for name, text in (('srun', FAKE_SRUN), ('scontrol', FAKE_SCONTROL)):
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  return _env(
    tmp_path_factory,
    devices_per_process=1,
    PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}',
    SLURM_JOB_ID='4242',
    SLURM_NTASKS=str(num_tasks),
    SLURM_JOB_NODELIST='localhost',
    SLURM_NODELIST='localhost',
    SLURM_SUBMIT_DIR=str(REPO),
    # JAX's SLURM detection takes the coordinator port from here (else from the job id).
    JAX_COORDINATOR_PORT=str(_free_port()),
    **extra,
  )


@pytest.mark.parametrize(
  'status, marker, requeued',
  [(4, False, True), (0, False, False), (2, False, False), (137, True, True), (4, True, True)],
)
def test_slurm_script_requeues_itself_only_when_preempted(
  tmp_path, tmp_path_factory, status, marker, requeued
):
  """Preempted: srun's status 4, or the marker of process 0 when srun reports a task it killed (137)."""
  env = _slurm_env(tmp_path, tmp_path_factory, FAKE_SRUN_STATUS=str(status))
  env['SLURM_SUBMIT_DIR'] = str(tmp_path)
  if marker:
    env['FAKE_SRUN_MARKER'] = '1'
  result = _run(['bash', str(LAUNCH / 'slurm.sbatch'), SMOKE, '--workdir=w'], env)
  assert result.returncode == (4 if requeued else status), result.stdout
  calls = tmp_path / 'bin' / 'scontrol.calls'
  assert (calls.read_text() if calls.exists() else '') == ('requeue 4242\n' if requeued else '')
  assert not list(tmp_path.glob('.ms_cxr_preempted.*'))  # the marker does not outlive the job step


def test_slurm_script_under_a_stand_in_srun(tmp_path, tmp_path_factory, reference_run):
  workdir = tmp_path / 'run'
  command = ['bash', str(LAUNCH / 'slurm.sbatch'), SMOKE, *PER_STEP_LOSSES, f'--workdir={workdir}']
  # Validation during training does not change it; skipping it saves time.
  command.append('--config.train.eval_every_steps=0')
  result = _run(command, _slurm_env(tmp_path, tmp_path_factory))
  assert result.returncode == 0, result.stdout[-3000:]
  assert result.stdout.count('jax.distributed (slurm)') == 2  # both tasks recognised the job step
  lines = _process_lines(result.stdout)
  assert len(lines) == 2 and lines[1].endswith('on 2 cpu device(s), process 1 of 2'), lines
  _check_against_reference(workdir, reference_run, log_every_steps=1)
