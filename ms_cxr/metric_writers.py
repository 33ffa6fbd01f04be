"""Run logging: TensorBoard event files in the workdir plus a console line, from process 0 only."""

from __future__ import annotations

import time
from collections.abc import Mapping

import jax
from absl import logging


class MetricWriter:
  """Writes scalars to TensorBoard (`<workdir>/tensorboard/`) and a one-line console summary."""

  def __init__(self, workdir: str, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    if self.enabled:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(logdir=f'{workdir}/tensorboard', flush_secs=30)

  def write_scalars(self, step: int, scalars: Mapping[str, float], *, prefix: str = '') -> None:
    if not self.enabled:
      return
    for name, value in scalars.items():
      self._tb.add_scalar(f'{prefix}{name}', float(value), step)

  def log(self, message: str) -> None:
    if self.enabled:
      logging.info('%s', message)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class ReportProgress:
  """Images/s and ETA between calls."""

  def __init__(self, num_steps: int, global_batch_size: int, first_step: int):
    self.num_steps = num_steps
    self.global_batch_size = global_batch_size
    self._last_step = first_step
    self._last_time = time.perf_counter()

  def __call__(self, step: int) -> tuple[float, float]:
    """(images per second, seconds left) since the previous call."""
    now = time.perf_counter()
    steps = max(step - self._last_step, 1)
    seconds_per_step = (now - self._last_time) / steps
    self._last_step, self._last_time = step, now
    return self.global_batch_size / seconds_per_step, seconds_per_step * (self.num_steps - step)
