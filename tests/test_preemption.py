"""SIGTERM mid-training: finish the step, checkpoint, exit with status 4; the same command then resumes and the
per-step losses are those of an uninterrupted run. In a multi-process run every process stops after the same step,
even when only one of them got the signal."""

import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO
from test_launch import (
  PER_STEP_LOSSES,
  SMOKE,
  SMOKE_STEPS,
  TIMEOUT,
  _env,
  _final_state,
  _free_port,
  _reference_run,
  _run,
  _scalars,
)

from ms_cxr import main, train


def test_preemption_status_is_distinct():
  assert main.EXIT_PREEMPTED == 4
  assert len({main.EXIT_USER_ERROR, main.EXIT_NON_FINITE, main.EXIT_PREEMPTED}) == 3
  assert not issubclass(train.Preempted, train.UserError)  # not reported as a bad input


def test_sigterm_sets_the_flag_and_the_previous_handler_comes_back():
  calls = []
  previous = signal.signal(signal.SIGTERM, lambda *_: calls.append('previous'))
  try:
    watch = train._PreemptionWatch()
    assert not watch.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
    assert watch.should_stop(2) and calls == []
    watch.restore()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
    assert calls == ['previous']
  finally:
    signal.signal(signal.SIGTERM, previous)


@pytest.fixture
def reference_run(tmp_path_factory):
  return _reference_run(tmp_path_factory)


def _checkpoint_steps(workdir) -> list[int]:
  return sorted(int(s) for s in os.listdir(f'{workdir}/checkpoints/latest') if s.isdigit())


def _run_until_step_then_signal(command, env, target, after_step: int = 2) -> tuple[int, str]:
  """Starts `command`; once step `after_step` is logged, SIGTERM to the pid `target()` returns. (status, output)."""
  process = subprocess.Popen(
    command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )
  lines = []
  try:
    for line in process.stdout:
      lines.append(line)
      match = re.search(rf'step (\d+)/{SMOKE_STEPS} ', line)
      if match and int(match.group(1)) >= after_step:
        os.kill(target(process), signal.SIGTERM)
        break
    lines.append(process.communicate(timeout=TIMEOUT)[0])
  finally:
    process.kill()
  return process.returncode, ''.join(lines)


def _stopped_steps(output) -> list[int]:
  return [int(s) for s in re.findall(r'preempted: SIGTERM: stopped after step (\d+) ', output)]


def test_sigterm_checkpoints_exits_4_and_the_rerun_continues_the_same_run(
  tmp_path, tmp_path_factory, reference_run
):
  reference, reference_losses = reference_run
  workdir = tmp_path / 'run'
  command = [sys.executable, '-m', 'ms_cxr.main', SMOKE, *PER_STEP_LOSSES, f'--workdir={workdir}']
  # Validation does not change training: skipping it here saves time, the losses still match the reference's.
  command += ['--mode=train', '--config.train.eval_every_steps=0']
  env = _env(tmp_path_factory, devices_per_process=2)
  marker = tmp_path / 'preempted'
  status, output = _run_until_step_then_signal(
    command, {**env, main.PREEMPTED_MARKER_ENV: str(marker)}, target=lambda p: p.pid
  )
  assert status == main.EXIT_PREEMPTED, output[-3000:]
  (stopped,) = _stopped_steps(output)
  assert 2 <= stopped < SMOKE_STEPS
  assert (
    f'stopped after step {stopped}' in marker.read_text()
  )  # for launchers (launch/slurm.sbatch)
  assert _checkpoint_steps(workdir)[-1] == stopped  # saved at the step it stopped at
  assert 'Traceback' not in output
  assert sorted(_scalars(workdir)) == list(range(1, stopped + 1))

  result = _run(command, env)
  assert result.returncode == 0, result.stdout[-3000:]
  assert f'resumed from step {stopped}' in result.stdout
  assert _checkpoint_steps(workdir)[-1] == SMOKE_STEPS
  # Bit-identical: same steps, same data order (the iterator position was saved), same losses and parameters.
  assert _scalars(workdir) == reference_losses
  step, state = _final_state(workdir)
  assert step == SMOKE_STEPS
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(_final_state(reference)[1]), strict=True):
    np.testing.assert_array_equal(a, b)


AGREEMENT = r"""
import os, signal, sys

import jax

from configs import base
from ms_cxr import distributed, train

port, process_id, every_steps = sys.argv[1:]
parallel = base.get_config().parallel
parallel.update(
  coordinator_address=f'127.0.0.1:{port}', num_processes=2, process_id=int(process_id),
  preemption_check_every_steps=int(every_steps),
)
assert distributed.initialize(parallel) and jax.process_count() == 2
watch = train._PreemptionWatch(parallel.preemption_check_every_steps)
for step in range(1, 21):
  if step == 3 and jax.process_index() == 1:
    os.kill(os.getpid(), signal.SIGTERM)  # only process 1 is signalled, during step 3
  if watch.should_stop(step):
    break
watch.restore()
print(f'process {jax.process_index()}: signalled {watch.received}, stopped after step {step}')
"""


@pytest.mark.parametrize('every_steps, expected_step', [(1, 3), (4, 4)])
def test_processes_agree_on_the_step_to_stop_at(tmp_path_factory, every_steps, expected_step):
  """Two jax.distributed processes (no model): only process 1 gets SIGTERM, both stop after the same step, the
  first checked step at or after the signal."""
  env = _env(tmp_path_factory, devices_per_process=1)
  port = str(_free_port())
  processes = [
    subprocess.Popen(
      [sys.executable, '-c', AGREEMENT, port, str(i), str(every_steps)],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in (0, 1)
  ]
  try:
    outputs = [p.communicate(timeout=TIMEOUT)[0] for p in processes]
  finally:
    for p in processes:
      p.kill()
  assert [p.returncode for p in processes] == [0, 0], outputs
  assert outputs[0].strip().splitlines()[-1] == (
    f'process 0: signalled False, stopped after step {expected_step}'
  )
  assert outputs[1].strip().splitlines()[-1] == (
    f'process 1: signalled True, stopped after step {expected_step}'
  )
