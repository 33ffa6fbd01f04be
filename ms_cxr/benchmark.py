r"""Throughput and memory of the train step, the eval step and the input pipeline's host work.

  python -m ms_cxr.benchmark --what=train|eval|input [--config=configs/FILE.py[:ARGS]] \
    [--config.SECTION.FIELD=VALUE ...] [--sizes=224,448] [--batch=8] [--dtype=float32|bfloat16] \
    [--remat=false|true] [--steps=N] [--warmup=N] [--repeats=R] [--num_devices=1] \
    [--torch | --reference=torchvision] [--channels_last] [--peak_tflops=T]
  python -m ms_cxr.benchmark --what=input [--sizes=224,448,896] [--workers=0,1,2] [--data_root=DIR] \
    [--native_px=1024] [--max_images=32] [--stall_timeout_s=600]

Prints one JSON line on stdout per measured setting (messages and logs go to stderr). The default config is
configs/densenet.py (DenseNet-121, float32); `--batch` (default 8) sets both `train.global_batch_size` and
`eval.batch_size`, and `--dtype` / `--remat` set `model.dtype` / `model.remat`.

train, eval: the project's own `train.train_step` (donated state, the configured loss) or `train.eval_step`,
compiled through `parallel.DataParallel` over `--num_devices` devices (default 1), on one batch of random uint8
images held on the device (no input pipeline). Each size in `--sizes` (default: the config's `data.sizes`) is one
setting: compile (timed alone: `compile_time_s`), `--warmup` steps (default 2; the first is timed alone:
`first_step_s`), then `--repeats` (default 3) timed runs of `--steps` (default 5) steps, each ending in
`jax.block_until_ready`. `images_per_sec` is the median over the repeats of batch x steps / seconds (every repeat
is kept in `images_per_sec_repeats`), `step_time_ms` likewise; `loss` is the last train step's. Every line also
gives `cpu_ms_per_image` (CPU time of the timed windows per image: this process, plus its worker processes for
input) and `cpu_utilisation` (CPU seconds per wall second), which tell a busy shared machine from a slow step.

Model FLOPs (train, eval): `model_flops_per_image` counts 2 x the multiply-adds of the model's products and
convolutions from its jaxpr, 3 forward passes for a train step (twice that with MS-ANet's consistency loss, which
runs each image's transformed copy too) and one per test-time view (`eval.tta`) for an eval step
(ms_cxr/flops.py); `model_tflops_per_sec` is that times the median images/s, and `mfu` that over the devices'
peak, `peak_tflops_per_device`: `--peak_tflops`, else the vendor's dense figure for a known GPU or TPU in the
step's dtype (float32 on NVIDIA GPUs: TF32), else null (CPUs).

input: the host work of training's input pipeline, `pipeline.train_dataset` (decode, resize to the step's size,
augmentation: `_LoadTrainBatch`) with `data.num_workers` = each of `--workers`, at each size in `--sizes` (default
224,448,896), for two routes in one invocation:

  native     the image files as distributed: by default the 1024 px ChestX-ray14 PNG samples beside the
             checkout (../shared/data/nih, those whose side is `--native_px`), read with the NIH reader;
  prepared   the same images written first by `ms_cxr.data.prepare` (pre-resized to the largest size of
             `--sizes`) into a temporary folder and read back through `data.prepared_dir` (`arrayrecord:`
             references).

Both routes read the chosen images through a temporary ChestX-ray14 layout (symbolic links to the files, a
Data_Entry file with their rows, every image in the train split), so `datasets.load_split` and `prepare` see
exactly these images; the originals are neither copied nor changed. There are few samples, so the endless
training stream cycles over them. `startup_time_s` is the time to the first batch (worker start-up included);
then `--warmup` (default 32) batches are drained and `--repeats` windows of `--steps` (default 64) batches timed.
The windows are long because batches arrive in bursts: an element of the pipeline is a whole batch, and
`data.read_threads` of them are decoded side by side (in each worker process) and finish together.
`--data_root` may be any ChestX-ray14 folder, or a folder of PNG/JPEG files (searched recursively).

A setting that gives no batch for `--stall_timeout_s` (default 600) ends the run with one line on stderr and
exit status 3 instead of hanging.

Memory, in every line: `host_maxrss_bytes` (this process's peak resident memory since it started, from
`getrusage`) and its growth over the setting (`host_maxrss_delta_bytes`); `host_rss_peak_bytes`, the largest
resident memory sampled every 10 ms during the setting (this process plus its worker processes); for train and eval,
`device_*` from the device's `memory_stats()` where it has one (GPU: `peak_bytes_in_use` is the process-wide peak
so far, so run one size per invocation for a clean figure; null on CPU) and XLA's memory analysis of the compiled
step: `xla_argument_bytes`, `xla_output_bytes`, `xla_temp_bytes`, `xla_alias_bytes` and
`xla_peak_bytes` = argument + output + temp - alias.

Every line also records the device kind and count, library versions, CPU count and affinity, thread settings (the
thread-related environment variables; XLA's CPU backend runs one intra-op thread per CPU in the affinity mask),
the host allocator's settings (`host_memory`: GLIBC_TUNABLES and the kernel's transparent-huge-page mode; the
command re-executes itself with huge pages where they help, see ms_cxr/hugepages.py), the load average before
and after the setting, and a UTC timestamp.

Reference (`--torch`, or `--reference=torchvision`; train and eval): if torch and torchvision import, the same step
of torchvision's DenseNet (same blocks as the configured preset, same batch, size, number of labels and optimizer,
BCE with logits, `model.remat` as `memory_efficient`; `--channels_last` for the NHWC memory format) runs with
`torch.set_num_threads` set to XLA's thread count, its repeats alternating with the JAX step's (each repeat after
one untimed step, as the other framework ran last and took the host memory), and a final line per size gives
`jax_over_torch`, the ratio of the median images/s, and both utilisations (torch's model FLOPs from its FLOP
counter). On a GPU torch runs with cuDNN's autotuner and the fused optimizer, and JAX without preallocating
most of the GPU's memory (XLA_PYTHON_CLIENT_PREALLOCATE=false unless set). Without torch a one-line note on
stderr says how to install it, and the JAX figures are printed alone. Both run in one process, so each one's
host memory figures include what the other holds. See ms_cxr/benchmark_torch.py.

`--table=FILE` prints the train and eval lines of FILE (this command's output, one or several runs) as a Markdown
table, one row per JAX setting with the torch reference beside it, and exits.

Bad flags or values end with one line on stderr and exit status 2.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import functools
import json
import math
import os
import pathlib
import platform
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ml_collections
import numpy as np

from ms_cxr import cli, hugepages
from ms_cxr.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / 'configs' / 'densenet.py'
DEFAULT_DATA_ROOT = REPO.parent / 'shared' / 'data' / 'nih'
WHATS = ('train', 'eval', 'input')
DTYPES = ('float32', 'bfloat16')
REFERENCES = ('torchvision',)
ROUTES = ('native', 'prepared')
DEFAULT_INPUT_SIZES = (224, 448, 896)
DEFAULT_WORKERS = (0, 1, 2)
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')
# Environment variables that set thread counts of XLA, BLAS/OpenMP libraries or torch.
THREAD_VARIABLES = (
  'XLA_FLAGS',
  'JAX_PLATFORMS',
  'OMP_NUM_THREADS',
  'MKL_NUM_THREADS',
  'OPENBLAS_NUM_THREADS',
  'TF_NUM_INTRAOP_THREADS',
  'TF_NUM_INTEROP_THREADS',
)
_SAMPLE_INTERVAL_S = 0.01
_CHILDREN_EVERY = 50  # samples between refreshes of the child process list
EXIT_STALLED = 3
# Temporary folders of the running input benchmark, removed by the stall watchdog before it exits.
_TEMPORARY_DIRS: list[str] = []
# A fixed positive rate for the random labels (ChestX-ray14's most common finding is near 0.2).
_LABEL_RATE = 0.2

Record = dict[str, Any]
Emit = Callable[[Record], None]


@dataclasses.dataclass(frozen=True)
class Options:
  """What to measure and how (the command-line flags besides --config).

  Attributes:
    what: train | eval | input.
    sizes: input sides in px; empty = the config's `data.sizes` (train, eval) or 224, 448, 896 (input).
    batch: global batch (train and eval) or local batch (input).
    dtype: compute dtype (float32 | bfloat16); None keeps the config's.
    remat: rematerialise dense layers; None keeps the config's.
    steps: steps (input: batches) per timed repeat; None = 5 (train, eval) or 64 (input).
    warmup: untimed steps after compilation (input: batches after the first); None = 2 (train, eval) or 32
      (input).
    repeats: timed repeats; the median is reported.
    num_devices: devices of the data-parallel mesh (0 = all).
    workers: input only: `data.num_workers` values, each a setting.
    data_root: input only: a ChestX-ray14 folder or a folder of image files.
    native_px: input only: use the images whose longer side is this many px (0 = any).
    max_images: input only: at most this many images (the first in name order).
    reference: '' or 'torchvision' (train and eval): time torchvision's step alongside.
    channels_last: the torchvision reference runs in the channels-last memory format.
    stall_timeout_s: input only: exit with status 3 when no batch arrives for this long (a stuck pipeline).
    peak_tflops: train and eval: one device's peak TFLOP/s for the model FLOP utilisation; None = the
      vendor's figure for known accelerators (`flops.PEAK_TFLOPS`), none for CPUs.
  """

  what: str = 'train'
  sizes: tuple[int, ...] = ()
  batch: int = 8
  dtype: str | None = None
  remat: bool | None = None
  steps: int | None = None
  warmup: int | None = None
  repeats: int = 3
  num_devices: int = 1
  workers: tuple[int, ...] = DEFAULT_WORKERS
  data_root: str = os.fspath(DEFAULT_DATA_ROOT)
  native_px: int = 1024
  max_images: int = 32
  reference: str = ''
  channels_last: bool = False
  stall_timeout_s: float = 600.0
  peak_tflops: float | None = None


# (steps, warmup) when not given. Input batches arrive in bursts (Grain's reader threads finish batches side by
# side), so its windows are long and start after a few bursts.
DEFAULT_STEPS = {'train': (5, 2), 'eval': (5, 2), 'input': (64, 32)}


def with_defaults(options: Options) -> Options:
  """`options` with `steps` and `warmup` filled in for its `what`."""
  steps, warmup = DEFAULT_STEPS.get(options.what, DEFAULT_STEPS['train'])
  return dataclasses.replace(
    options,
    steps=steps if options.steps is None else options.steps,
    warmup=warmup if options.warmup is None else options.warmup,
  )


def validate(options: Options) -> None:
  """Raises UserError naming the first bad option."""
  if options.what not in WHATS:
    raise UserError(f'--what={options.what!r}; expected one of {WHATS}')
  bad_sizes = [s for s in options.sizes if s <= 0]
  if bad_sizes:
    raise UserError(f'--sizes has {bad_sizes}; every size must be a positive number of pixels')
  if len(set(options.sizes)) != len(options.sizes):
    raise UserError(f'--sizes={list(options.sizes)} lists a size twice')
  for name in ('batch', 'steps', 'repeats'):
    if getattr(options, name) <= 0:
      raise UserError(f'--{name}={getattr(options, name)} must be positive')
  if options.warmup < 0:
    raise UserError(f'--warmup={options.warmup} must be 0 or more')
  if options.num_devices < 0:
    raise UserError(f'--num_devices={options.num_devices} must be 0 (all) or more')
  if options.peak_tflops is not None and not options.peak_tflops > 0:
    raise UserError(f'--peak_tflops={options.peak_tflops} must be positive')
  if options.dtype is not None and options.dtype not in DTYPES:
    raise UserError(f'--dtype={options.dtype!r}; expected one of {DTYPES}')
  if options.reference and options.reference not in REFERENCES:
    raise UserError(f'--reference={options.reference!r}; expected one of {REFERENCES}')
  if options.reference and options.num_devices != 1:
    # The reference runs on one device; a ratio against a mesh of several would compare unequal hardware.
    raise UserError(
      f'--torch / --reference compare one device with one: expected --num_devices=1, got {options.num_devices}'
    )
  if options.what == 'input':
    if options.reference:
      raise UserError('--torch / --reference apply to --what=train or --what=eval, not input')
    if not options.workers or any(w < 0 for w in options.workers):
      raise UserError(f'--workers={list(options.workers)} must list numbers of 0 or more')
    if options.native_px < 0 or options.max_images <= 0:
      raise UserError('--native_px must be 0 (any) or more and --max_images positive')
    if options.stall_timeout_s <= 0:
      raise UserError(f'--stall_timeout_s={options.stall_timeout_s} must be positive')


def run(
  config: ml_collections.ConfigDict, options: Options, emit: Emit | None = None
) -> list[Record]:
  """Measures every setting of `options`; each record goes to `emit` (default: a JSON line on stdout) as soon
  as it is measured, and all are returned.

  Raises:
    UserError: a bad option or config, or no images to read (input).
  """
  options = with_defaults(options)
  validate(options)
  emit = emit or print_json
  records: list[Record] = []

  def keep(record: Record) -> None:
    records.append(record)
    emit(record)

  if options.what == 'input':
    _input_benchmark(config, options, keep)
  else:
    _step_benchmark(config, options, keep)
  return records


def print_json(record: Record) -> None:
  print(json.dumps(record), flush=True)


# --------------------------------------------------------------------------------------------------
# Environment and memory
# --------------------------------------------------------------------------------------------------


def _cpu_affinity() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def environment(devices: Sequence[Any] | None = None) -> Record:
  """Versions, CPUs and thread settings; the device fields when `devices` is given (the mesh's devices)."""
  import importlib.metadata

  def version(package: str) -> str | None:
    try:
      return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      return None

  env = {
    'platform': None,
    'device_kind': None,
    'device_count': None,
    'devices_available': None,
  }
  if devices is not None:
    import jax

    env.update(
      platform=devices[0].platform,
      device_kind=devices[0].device_kind,
      device_count=len(devices),
      devices_available=jax.device_count(),
    )
  env.update(
    jax_version=version('jax'),
    jaxlib_version=version('jaxlib'),
    flax_version=version('flax'),
    grain_version=version('grain'),
    numpy_version=version('numpy'),
    python_version=platform.python_version(),
    cpu_count=os.cpu_count(),
    cpu_affinity=_cpu_affinity(),
    threads={
      'xla_cpu_threads': _cpu_affinity(),
      **{name: os.environ.get(name) for name in THREAD_VARIABLES},
    },
    # Host allocator: transparent huge pages change XLA:CPU step times by ~20% (ms_cxr/hugepages.py).
    host_memory={
      'GLIBC_TUNABLES': os.environ.get('GLIBC_TUNABLES'),
      'transparent_hugepages': hugepages.thp_mode(),
    },
  )
  return env


def _maxrss_bytes() -> int:
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(peak if sys.platform == 'darwin' else peak * 1024)  # Linux reports KiB


def _rss_bytes(pid: int | str = 'self') -> int:
  """Resident memory of one process, from /proc (Linux); OSError where there is no such file."""
  with open(f'/proc/{pid}/statm', 'rb') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def _child_pids() -> list[int]:
  """This process's children (Grain's worker processes among them), from /proc (Linux)."""
  pids: set[int] = set()
  with contextlib.suppress(OSError):
    for task in os.listdir('/proc/self/task'):
      with contextlib.suppress(OSError), open(f'/proc/self/task/{task}/children') as f:
        pids.update(int(pid) for pid in f.read().split())
  return sorted(pids)


class HostMemory:
  """Peak resident memory over the spans run under `sampling()`, sampled every 10 ms by a thread.

  Reads /proc directly (a sample costs tens of microseconds, so the sampler does not slow what it measures);
  `with_children` adds the resident memory of child processes (their list refreshed every 0.5 s). Where /proc is
  missing, `host_rss_peak_bytes` is null.
  """

  def __init__(self, with_children: bool = False):
    self.with_children = with_children
    self.peak_rss: int | None = None
    self.maxrss_start = _maxrss_bytes()

  def _sample(self, children: Sequence[int]) -> None:
    try:
      total = _rss_bytes()
    except OSError:
      return
    for pid in children:
      with contextlib.suppress(OSError, ValueError):  # a worker that has just exited
        total += _rss_bytes(pid)
    self.peak_rss = max(self.peak_rss or 0, total)

  @contextlib.contextmanager
  def sampling(self) -> Iterator[None]:
    stop = threading.Event()

    def sample() -> None:
      children: list[int] = []
      count = 0
      while not stop.is_set():
        if self.with_children and count % _CHILDREN_EVERY == 0:
          children = _child_pids()
        self._sample(children)
        count += 1
        stop.wait(_SAMPLE_INTERVAL_S)

    thread = threading.Thread(target=sample, name='rss-sampler', daemon=True)
    thread.start()
    try:
      yield
    finally:
      stop.set()
      thread.join()
      self._sample(_child_pids() if self.with_children else [])

  def figures(self) -> Record:
    maxrss = _maxrss_bytes()
    return {
      'host_rss_peak_bytes': self.peak_rss,
      'host_maxrss_bytes': maxrss,
      'host_maxrss_delta_bytes': maxrss - self.maxrss_start,
    }


def _device_memory(device: Any) -> Record:
  stats = None
  with contextlib.suppress(Exception):  # backends without memory statistics raise or return None
    stats = device.memory_stats()
  stats = stats or {}
  return {
    'device_peak_bytes_in_use': stats.get('peak_bytes_in_use'),
    'device_bytes_in_use': stats.get('bytes_in_use'),
    'device_bytes_limit': stats.get('bytes_limit'),
  }


def _xla_memory(compiled: Any) -> Record:
  """XLA's memory analysis of the compiled step as `xla_*_bytes` (all None where the backend has none)."""
  from ms_cxr import train

  names = ('argument', 'output', 'temp', 'alias', 'peak')
  figures = (train.compiled_memory(compiled) if compiled is not None else None) or {}
  return {f'xla_{name}_bytes': figures.get(f'{name}_bytes') for name in names}


def _cpu_seconds(children: Sequence[int] = ()) -> float:
  """CPU time (user + system) of this process's threads plus that of the processes `children` so far."""
  total = time.process_time()
  for pid in children:
    with contextlib.suppress(OSError, ValueError, IndexError), open(f'/proc/{pid}/stat') as f:
      fields = f.read().rpartition(')')[2].split()  # fields 3.. of proc(5): utime, stime are 14, 15
      total += (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')
  return total


def _timing(
  images_per_step: int, seconds: Sequence[float], steps: int, cpu_seconds: Sequence[float]
) -> Record:
  """images/s, ms per step and CPU ms per image: the median over repeats, and every repeat.

  CPU time counts only while the work is scheduled, so on a shared machine `cpu_ms_per_image` moves far less with
  the load than images/s does (threads that spin while waiting still count); `cpu_utilisation` (CPU seconds per
  second) shows how many cores the work got.
  """
  images = images_per_step * steps
  rates = [images / s for s in seconds]
  step_ms = [1000.0 * s / steps for s in seconds]
  cpu_ms = [1000.0 * c / images for c in cpu_seconds]
  return {
    'images_per_sec': statistics.median(rates),
    'images_per_sec_repeats': rates,
    'step_time_ms': statistics.median(step_ms),
    'step_time_ms_repeats': step_ms,
    'cpu_ms_per_image': statistics.median(cpu_ms),
    'cpu_ms_per_image_repeats': cpu_ms,
    'cpu_utilisation': statistics.median(c / s for c, s in zip(cpu_seconds, seconds, strict=True)),
  }


def _utilisation(
  flops_per_image: int | None, images_per_sec: float, peak_tflops: float | None, device_count: int
) -> Record:
  """Model FLOPs per image, the model TFLOP/s they make at `images_per_sec`, and the model FLOP utilisation
  against `device_count` devices of `peak_tflops` each (None without a peak; see ms_cxr/flops.py)."""
  from ms_cxr import flops

  if flops_per_image is None:
    return {
      'model_flops_per_image': None,
      'model_tflops_per_sec': None,
      'peak_tflops_per_device': peak_tflops,
      'mfu': None,
    }
  return {
    'model_flops_per_image': flops_per_image,
    'model_tflops_per_sec': flops_per_image * images_per_sec / 1e12,
    'peak_tflops_per_device': peak_tflops,
    'mfu': flops.mfu(flops_per_image, images_per_sec, peak_tflops, device_count),
  }


def _stamp() -> Record:
  return {
    'load_average_end': list(os.getloadavg()),
    'timestamp': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
  }


# --------------------------------------------------------------------------------------------------
# train and eval: the project's compiled steps on synthetic batches
# --------------------------------------------------------------------------------------------------


def configure(
  config: ml_collections.ConfigDict, options: Options, sizes: Sequence[int]
) -> ml_collections.ConfigDict:
  """A copy of `config` with the options applied and `data.sizes` covering `sizes`.

  The model is built for the configured sizes plus the benchmarked ones (an SSBN model has a branch per size);
  a size's `train.accum_steps` entry is kept, and 1 for a size the config does not list.
  """
  from ms_cxr import train

  config = config.copy_and_resolve_references()
  config.train.global_batch_size = options.batch
  config.eval.batch_size = options.batch
  config.parallel.num_devices = options.num_devices
  config.model.init_from = ''  # random weights: speed and memory do not depend on them
  if options.dtype is not None:
    config.model.dtype = options.dtype
  if options.remat is not None:
    config.model.remat = options.remat
  try:
    accum = train.accum_steps_by_size(config)
  except ValueError:
    raise UserError(
      f'config.train.accum_steps={tuple(config.train.accum_steps)} needs one entry per size in '
      f'{tuple(config.data.sizes)}'
    ) from None
  all_sizes = tuple(sorted(set(config.data.sizes) | set(sizes)))
  config.data.sizes = all_sizes
  if config.train.accum_steps:
    config.train.accum_steps = tuple(accum.get(s, 1) for s in all_sizes)
  config.train.size_probs = ()
  return config


class JaxStep:
  """The project's train or eval step at one size, compiled for `dp`, on one synthetic batch."""

  def __init__(self, config: ml_collections.ConfigDict, what: str, size: int, dp: Any):
    import jax

    from ms_cxr import flops, losses, models, parallel, train
    from ms_cxr.data import pipeline

    self.what = what
    self.batch_size = config.train.global_batch_size
    num_labels = len(config.data.labels)
    model = models.create_model(
      config.model, num_labels, config.data.sizes, axis_name=parallel.AXIS
    )
    state = train.create_train_state(
      config, model, train.config_optimizer(config), load_init_from=False
    )
    self.num_params = train.count_params(state.params)
    # Forward passes per image: MS-ANet's consistency loss runs each image's transformed copy too; an eval step
    # runs each test-time view.
    if what == 'train':
      views = 2 if config.train.consistency_weight > 0 else 1
    else:
      views = 1 + len(train.tta_views(config))
    self.flops_per_image = flops.model_flops_per_image(
      model,
      {'params': state.params, 'batch_stats': state.batch_stats},
      size,
      what=what,
      views=views,
    )
    rng = np.random.default_rng([config.train.seed, size])
    images = rng.integers(0, 256, (self.batch_size, size, size, 1), dtype=np.uint8)
    batch = {pipeline.image_key(size): images}
    if what == 'train':
      batch['labels'] = (rng.random((self.batch_size, num_labels)) < _LABEL_RATE).astype(np.float32)
      loss = losses.classification_loss(
        config.train.loss,
        label_weights=tuple(config.train.label_weights),
        positive_rates=np.full(num_labels, _LABEL_RATE),
        focal_gamma=config.train.focal_gamma,
      )
      step = dp.compile(train.configured_train_step(config, loss), donate_state=True)
    else:
      batch['index'] = np.arange(self.batch_size, dtype=np.int32)
      batch['valid'] = np.ones(self.batch_size, np.bool_)
      step = dp.compile(
        functools.partial(train.eval_step, tta=train.tta_views(config)), sharded_output=True
      )
    self.state = dp.replicate(state)
    self.batch = dp.shard_batch(batch)
    jax.block_until_ready((self.state, self.batch))
    self._step = step
    self.compiled = None
    self.outputs = None

  def compile(self) -> float:
    """Lowers and compiles the step; returns the seconds it took."""
    start = time.perf_counter()
    self.compiled = self._step.lower(self.state, self.batch).compile()
    return time.perf_counter() - start

  def run(self, steps: int) -> float:
    """Runs `steps` steps back to back and waits for the last; returns the seconds."""
    import jax

    start = time.perf_counter()
    for _ in range(steps):
      if self.what == 'train':
        self.state, self.outputs = self.compiled(self.state, self.batch)
      else:
        self.outputs = self.compiled(self.state, self.batch)
    jax.block_until_ready((self.state, self.outputs))
    return time.perf_counter() - start

  def last_loss(self) -> float | None:
    if self.what != 'train':
      return None
    return float(np.ravel(np.asarray(self.outputs['loss']))[0])


def _torch_reference(options: Options) -> Any:
  """The torch runner module, or None (after a one-line note on stderr) when torch cannot be used."""
  if not options.reference:
    return None
  from ms_cxr import benchmark_torch

  problem = benchmark_torch.unavailable()
  if problem:
    print(f'note: {problem}; measuring JAX only. {benchmark_torch.INSTALL_HINT}', file=sys.stderr)
    return None
  return benchmark_torch


def _step_benchmark(config: ml_collections.ConfigDict, options: Options, emit: Emit) -> None:
  from ms_cxr import flops, parallel, train

  try:
    dp = parallel.DataParallel.create(config.parallel.api, options.num_devices)
  except ValueError as e:
    raise UserError(str(e)) from None
  sizes = options.sizes or tuple(config.data.sizes)
  config = configure(config, options, sizes)
  train.validate_config(config, dp)
  torch_module = _torch_reference(options)
  if torch_module is not None:
    problem = torch_module.unsupported(config)
    if problem:
      print(f'note: {problem}; measuring JAX only', file=sys.stderr)
      torch_module = None
  devices = list(dp.mesh.devices.flat)
  env = environment(devices)
  peak = options.peak_tflops or flops.peak_tflops(devices[0].device_kind, config.model.dtype)
  ratios = []
  for size in sizes:
    load_start = list(os.getloadavg())
    memory = HostMemory()
    with memory.sampling():
      runner = JaxStep(config, options.what, size, dp)
      compile_s = runner.compile()
      first_step_s = runner.run(1)
      if options.warmup > 1:
        runner.run(options.warmup - 1)
    reference = reference_memory = None
    if torch_module is not None:
      reference_memory = HostMemory()
      with reference_memory.sampling():
        reference = torch_module.TorchStep(
          config,
          options.what,
          size,
          channels_last=options.channels_last,
          num_threads=env['threads']['xla_cpu_threads'],
        )
        reference_first_s = reference.run(1)
        if options.warmup > 1:
          reference.run(options.warmup - 1)
    seconds, reference_seconds, cpu, reference_cpu = [], [], [], []
    for _ in range(options.repeats):  # alternating, so both see the same load on a shared machine
      with memory.sampling():
        if reference is not None:
          runner.run(1)  # untimed: the other step ran last and took the memory (and the huge pages)
        start = _cpu_seconds()
        seconds.append(runner.run(options.steps))
        cpu.append(_cpu_seconds() - start)
      if reference is not None:
        with reference_memory.sampling():
          reference.run(1)
          start = _cpu_seconds()
          reference_seconds.append(reference.run(options.steps))
          reference_cpu.append(_cpu_seconds() - start)
    timing = _timing(options.batch, seconds, options.steps, cpu)
    record = {
      'what': options.what,
      'framework': 'jax',
      'model': config.model.name,
      'norm': config.model.norm,
      'num_params': runner.num_params,
      'size': size,
      'batch': options.batch,
      'dtype': config.model.dtype,
      'remat': bool(config.model.remat),
      # The convolutions' formulations (ms_cxr/models/densenet.py): matrix products or XLA's convolutions.
      'pointwise_matmul': bool(config.model.get('pointwise_matmul', True)),
      'kernel_grad_matmul': bool(config.model.get('kernel_grad_matmul', True)),
      'parallel_api': config.parallel.api,
      'steps': options.steps,
      'warmup': options.warmup,
      'repeats': options.repeats,
      **timing,
      **_utilisation(runner.flops_per_image, timing['images_per_sec'], peak, len(devices)),
      'compile_time_s': compile_s,
      'first_step_s': first_step_s,
      'loss': runner.last_loss(),
      **memory.figures(),
      **_device_memory(devices[0]),
      **_xla_memory(runner.compiled),
      **env,
      'load_average_start': load_start,
      **_stamp(),
    }
    emit(record)
    del runner
    if reference is not None:
      reference_timing = _timing(options.batch, reference_seconds, options.steps, reference_cpu)
      reference_record = {
        **record,
        'framework': 'torch',
        'model': reference.model_name,
        'num_params': reference.num_params,
        'parallel_api': None,
        'pointwise_matmul': None,
        'kernel_grad_matmul': None,
        **reference_timing,
        **_utilisation(
          reference.flops_per_image,
          reference_timing['images_per_sec'],
          options.peak_tflops or flops.peak_tflops(reference.device_kind, config.model.dtype),
          1,
        ),
        'compile_time_s': None,  # eager: nothing is compiled; the first step is `first_step_s`
        'first_step_s': reference_first_s,
        'loss': reference.last_loss(),
        **reference_memory.figures(),
        **reference.device_memory(),
        **{k: None for k in _xla_memory(None)},
        'device_kind': reference.device_kind,
        'device_count': 1,
        'channels_last': options.channels_last,
        'threads': {**env['threads'], 'torch_num_threads': reference.num_threads},
        'torch_version': reference.torch_version,
        'torchvision_version': reference.torchvision_version,
        **_stamp(),
      }
      emit(reference_record)
      ratios.append(
        {
          'what': 'ratio',
          'of': options.what,
          'size': size,
          'batch': options.batch,
          'dtype': config.model.dtype,
          'remat': bool(config.model.remat),
          'channels_last': options.channels_last,
          'jax_model': record['model'],
          'torch_model': reference_record['model'],
          'jax_images_per_sec': record['images_per_sec'],
          'torch_images_per_sec': reference_record['images_per_sec'],
          'jax_over_torch': record['images_per_sec'] / reference_record['images_per_sec'],
          'jax_mfu': record['mfu'],
          'torch_mfu': reference_record['mfu'],
          'threads': reference_record['threads'],
          'timestamp': reference_record['timestamp'],
        }
      )
  for ratio in ratios:
    emit(ratio)


# --------------------------------------------------------------------------------------------------
# input: the training input pipeline's host work, native files vs prepared shards
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SourceImage:
  """One image to read, with the Data_Entry fields the temporary layout needs."""

  name: str  # file name in the layout (the ChestX-ray14 name when there is one)
  path: str  # the original file
  findings: tuple[str, ...]
  patient_id: str
  follow_up: str
  view: str
  side: int  # longer side of the original, px


def _image_side(path: str) -> int | None:
  from PIL import Image

  try:
    with Image.open(path) as img:
      return max(img.size)
  except (OSError, SyntaxError, ValueError):
    return None


def find_images(root: str, native_px: int, max_images: int) -> list[SourceImage]:
  """Up to `max_images` images under `root` whose longer side is `native_px` (0 = any), in name order.

  A ChestX-ray14 folder (a Data_Entry file at its top) is read with `ms_cxr.data.nih`; any other folder is searched
  for PNG/JPEG files.

  Raises:
    UserError: `root` is missing, unreadable, or holds no such image.
  """
  from ms_cxr.data import nih
  from ms_cxr.data.labels import NIH_LABELS

  if not os.path.isdir(root):
    raise UserError(f'--data_root={root!r} is not a folder')
  candidates: list[SourceImage] = []
  if any(os.path.isfile(os.path.join(root, name)) for name in nih.DATA_ENTRY_NAMES):
    try:
      records = nih.read_records(root, split='all', skip_missing_images=True)
    except ValueError as e:
      raise UserError(str(e)) from None
    for r in sorted(records, key=lambda r: r.id):
      findings = tuple(name for name, v in zip(NIH_LABELS, r.labels, strict=True) if v == 1)
      follow_up = r.study_id.rpartition('_')[2] or '0'
      candidates.append(SourceImage(r.id, r.image, findings, r.patient_id, follow_up, r.view, 0))
  else:
    paths = sorted(
      os.path.join(folder, name)
      for folder, _, names in os.walk(root)
      for name in names
      if name.lower().endswith(IMAGE_SUFFIXES)
    )
    candidates = [
      SourceImage(f'{i + 1:08d}_000.png', path, (), str(i + 1), '0', 'PA', 0)
      for i, path in enumerate(paths)
    ]
  chosen = []
  for image in candidates:
    side = _image_side(image.path)
    if side is None or (native_px and side != native_px):
      continue
    chosen.append(dataclasses.replace(image, side=side))
    if len(chosen) == max_images:
      break
  if not chosen:
    wanted = f'of {native_px} px ' if native_px else ''
    raise UserError(
      f'--data_root={root!r} has no readable image {wanted}(--native_px=0 takes any size)'
    )
  return chosen


def write_nih_layout(folder: pathlib.Path, sources: Sequence[SourceImage]) -> pathlib.Path:
  """A ChestX-ray14 folder holding exactly `sources` (symbolic links), all in train_val_list.txt."""
  (folder / 'images').mkdir(parents=True)
  for source in sources:
    os.symlink(os.path.abspath(source.path), folder / 'images' / source.name)
  with open(folder / 'Data_Entry_2017_v2020.csv', 'w', newline='', encoding='utf-8') as f:
    f.write(
      'Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,'
      'OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n'
    )
    writer = csv.writer(f, lineterminator='\n')
    for s in sources:
      findings = '|'.join(s.findings) or 'No Finding'
      writer.writerow(
        [s.name, findings, s.follow_up, s.patient_id, 0, 'M', s.view, s.side, s.side, 0.143, 0.143]
      )
  (folder / 'train_val_list.txt').write_text(''.join(f'{s.name}\n' for s in sources))
  return folder


def _input_config(
  config: ml_collections.ConfigDict, layout: pathlib.Path, views: Sequence[str]
) -> ml_collections.ConfigDict:
  from ms_cxr.data.labels import NIH_LABELS

  config = config.copy_and_resolve_references()
  config.data.dataset = 'nih'
  config.data.root = os.fspath(layout)
  config.data.prepared_dir = ''
  config.data.labels = NIH_LABELS
  config.data.val_fraction = 0.0  # every image in the train split
  config.data.nih.views = tuple(views)
  config.train.trainable_sizes = ()
  config.train.size_probs = ()
  config.train.accum_steps = ()
  return config


def _input_benchmark(config: ml_collections.ConfigDict, options: Options, emit: Emit) -> None:
  import tensorflow_datasets as tfds

  from ms_cxr.data import datasets, prepare

  tfds.disable_progress_bar()
  sizes = options.sizes or DEFAULT_INPUT_SIZES
  sources = find_images(options.data_root, options.native_px, options.max_images)
  env = environment()
  with tempfile.TemporaryDirectory(prefix='ms_cxr_benchmark_') as tmp:
    _TEMPORARY_DIRS.append(tmp)
    layout = write_nih_layout(pathlib.Path(tmp) / 'nih', sources)
    config = _input_config(config, layout, sorted({s.view for s in sources}))
    config.data.sizes = tuple(sorted(sizes))  # what the preparation at max(sizes) is read for
    native = datasets.load_split(config.data, 'train')
    prepared_dir = pathlib.Path(tmp) / 'prepared'
    start = time.perf_counter()
    with contextlib.redirect_stdout(
      sys.stderr
    ):  # TFDS prints its progress; stdout is JSON lines only
      prepare.prepare(
        config.data, prepared_dir, size=max(sizes), splits=('train',), num_workers=0, progress=False
      )
    prepare_s = time.perf_counter() - start
    prepared_config = config.copy_and_resolve_references()
    prepared_config.data.prepared_dir = os.fspath(prepared_dir)
    prepared = datasets.load_split(prepared_config.data, 'train')
    routes = {
      'native': (native, {'prepared_px': None, 'prepare_time_s': None}),
      'prepared': (prepared, {'prepared_px': max(sizes), 'prepare_time_s': prepare_s}),
    }
    for route, (records, extra) in routes.items():
      for size in sizes:
        for workers in options.workers:
          load_start = list(os.getloadavg())
          timing, memory = _time_input(records, config, size, workers, options, route)
          emit(
            {
              'what': 'input',
              'framework': 'grain',
              'route': route,
              'model': None,
              'size': size,
              'batch': options.batch,
              'dtype': None,
              'remat': None,
              'workers': workers,
              'prefetch_batches': config.data.prefetch_batches,
              'augment': bool(config.data.augment.enabled),
              'num_images': len(records),
              'native_px': sorted({s.side for s in sources}),
              **extra,
              'steps': options.steps,
              'warmup': options.warmup,
              'repeats': options.repeats,
              **timing,
              'compile_time_s': None,
              **memory,
              **env,
              'load_average_start': load_start,
              **_stamp(),
            }
          )


def _time_input(
  records: Sequence[Any],
  config: ml_collections.ConfigDict,
  size: int,
  workers: int,
  options: Options,
  route: str,
) -> tuple[Record, Record]:
  """Times the training stream at one size with `workers` worker processes: (timing, memory) figures."""
  from ms_cxr.data import pipeline

  config = config.copy_and_resolve_references()
  config.data.sizes = (size,)
  config.data.num_workers = workers
  config.train.global_batch_size = options.batch
  memory = HostMemory(with_children=True)
  seconds, cpu = [], []
  setting = f'route {route}, {size} px, {workers} workers'
  with (
    memory.sampling(),
    _Watchdog(options.stall_timeout_s, setting) as watchdog,
  ):
    start = time.perf_counter()
    iterator = iter(pipeline.train_dataset(records, config))
    try:
      first = watchdog.next(iterator)
      startup_s = time.perf_counter() - start
      shape = first[pipeline.image_key(size)].shape
      if shape != (options.batch, size, size, 1):
        raise AssertionError(f'the pipeline gave images of shape {shape} at {size} px')
      for _ in range(options.warmup):
        watchdog.next(iterator)
      workers_pids = _child_pids()  # Grain's workers (and multiprocessing's resource tracker)
      for _ in range(options.repeats):
        start, start_cpu = time.perf_counter(), _cpu_seconds(workers_pids)
        for _ in range(options.steps):
          watchdog.next(iterator)
        seconds.append(time.perf_counter() - start)
        cpu.append(_cpu_seconds(workers_pids) - start_cpu)
    finally:
      if hasattr(iterator, 'close'):  # stops Grain worker processes
        iterator.close()
  timing = _timing(options.batch, seconds, options.steps, cpu)
  return {**timing, 'startup_time_s': startup_s}, memory.figures()


class _Watchdog:
  """`next(iterator)` with a time limit: a pipeline stuck for `timeout_s` ends the process with a message.

  A stuck Grain iterator cannot be interrupted from Python, so the process kills its child processes (Grain's
  workers), removes its temporary folders and exits with status 3 rather than hang.
  """

  def __init__(self, timeout_s: float, setting: str):
    self.timeout_s = timeout_s
    self.setting = setting
    self._deadline = math.inf
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._watch, name='input-watchdog', daemon=True)

  def __enter__(self) -> _Watchdog:
    self._thread.start()
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self._stop.set()
    self._thread.join()

  def next(self, iterator: Iterator[Any]) -> Any:
    self._deadline = time.monotonic() + self.timeout_s
    try:
      return next(iterator)
    finally:
      self._deadline = math.inf

  def _watch(self) -> None:
    while not self._stop.wait(min(1.0, self.timeout_s)):
      if time.monotonic() > self._deadline:
        print(
          f'error: the input pipeline gave no batch for {self.timeout_s:g} s ({self.setting}); '
          'it looks stuck',
          file=sys.stderr,
          flush=True,
        )
        for pid in _child_pids():  # a stuck worker would outlive the exit
          with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        for folder in _TEMPORARY_DIRS:
          shutil.rmtree(folder, ignore_errors=True)
        os._exit(EXIT_STALLED)


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------


def _figure(value: float | None, spec: str) -> str:
  return '-' if value is None else format(value, spec)


def _convolutions(record: Record) -> str:
  """'products', 'XLA' or which of the two formulations a record's model used."""
  pointwise = record.get('pointwise_matmul', True)
  kernel_grad = record.get('kernel_grad_matmul', True)
  if pointwise and kernel_grad:
    return 'products'
  if not pointwise and not kernel_grad:
    return 'XLA'
  return 'products: 1x1' if pointwise else 'products: 3x3 and stem gradients'


def markdown_table(records: Sequence[Record]) -> str:
  """A Markdown table of train/eval records: one row per JAX setting, with the torch reference's images/s,
  utilisation and the ratio where the records hold them (the lines of one or several benchmark runs)."""

  def key(record: Record) -> tuple:
    return (record['what'], record['size'], record['batch'], record['dtype'], record['remat'])

  # Each JAX line with the torch line that follows it in the output (its reference, timed alongside).
  settings: list[tuple[Record, Record | None]] = []
  for r in records:
    if r.get('framework') == 'jax':
      settings.append((r, None))
    elif r.get('framework') == 'torch' and settings and key(settings[-1][0]) == key(r):
      settings[-1] = (settings[-1][0], r)
  rows = [
    '| what | model | device | size | batch | dtype | remat | convolutions | images/s | model TFLOP/s | MFU '
    '| torch images/s | torch MFU | JAX / torch | XLA peak GB | compile s |',
    '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r, torch in settings:
    model = (
      r['model'] if r.get('norm', 'batchnorm') == 'batchnorm' else f'{r["model"]} ({r["norm"]})'
    )
    peak = r.get('xla_peak_bytes')
    cells = [
      r['what'],
      model,
      f'{r.get("device_count") or 1} x {r.get("device_kind")}',
      str(r['size']),
      str(r['batch']),
      r['dtype'],
      'yes' if r['remat'] else 'no',
      _convolutions(r),
      _figure(r['images_per_sec'], '.1f'),
      _figure(r.get('model_tflops_per_sec'), '.3g'),
      _figure(r.get('mfu'), '.1%'),
      _figure(torch and torch['images_per_sec'], '.1f'),
      _figure(torch and torch.get('mfu'), '.1%'),
      _figure(torch and r['images_per_sec'] / torch['images_per_sec'], '.2f'),
      _figure(peak and peak / 1e9, '.2f'),
      _figure(r.get('compile_time_s'), '.0f'),
    ]
    rows.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(rows)


def read_records(path: str) -> list[Record]:
  """The JSON lines of `path` (benchmark output); UserError naming the line that is not a JSON object."""
  records = []
  try:
    with open(path, encoding='utf-8') as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise UserError(
            f'{path} line {number}: not a JSON line of the benchmark ({e.msg})'
          ) from None
        if not isinstance(record, dict) or 'what' not in record:
          raise UserError(f'{path} line {number}: not a benchmark record (no "what" field)')
        records.append(record)
  except OSError as e:
    raise UserError(f'--table={path}: {e.strerror}') from None
  return records


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _define_flags() -> None:
  from absl import flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file(
    'config',
    os.fspath(DEFAULT_CONFIG) if DEFAULT_CONFIG.is_file() else None,
    'Config file (default: configs/densenet.py); override fields with --config.SECTION.FIELD=VALUE.',
  )
  flags.DEFINE_enum(
    'what', 'train', WHATS, 'What to time: the train step, the eval step, or input.'
  )
  flags.DEFINE_list(
    'sizes', [], "Input sizes (px). Default: the config's data.sizes; input: 224,448,896."
  )
  flags.DEFINE_integer('batch', 8, 'Batch size (train/eval: global; input: per step).')
  flags.DEFINE_enum('dtype', None, DTYPES, "Compute dtype; default: the config's model.dtype.")
  flags.DEFINE_bool('remat', None, "Rematerialise dense layers; default: the config's model.remat.")
  flags.DEFINE_integer(
    'steps', None, 'Steps (input: batches) per timed repeat; default 5 (train, eval) or 64 (input).'
  )
  flags.DEFINE_integer(
    'warmup',
    None,
    'Untimed steps after compilation (input: batches after the first); default 2 (train, eval) or 32 (input).',
  )
  flags.DEFINE_integer('repeats', 3, 'Timed repeats; images/s is their median.')
  flags.DEFINE_integer('num_devices', 1, 'Devices of the data-parallel mesh (0 = all).')
  flags.DEFINE_list('workers', [str(w) for w in DEFAULT_WORKERS], 'input: data.num_workers values.')
  flags.DEFINE_string(
    'data_root',
    os.fspath(DEFAULT_DATA_ROOT),
    'input: a ChestX-ray14 folder, or a folder of PNG/JPEG files.',
  )
  flags.DEFINE_integer('native_px', 1024, 'input: use images whose longer side is this (0 = any).')
  flags.DEFINE_integer('max_images', 32, 'input: at most this many images.')
  flags.DEFINE_bool(
    'torch', False, "Also time torchvision's DenseNet step (--reference=torchvision)."
  )
  flags.DEFINE_enum('reference', None, REFERENCES, 'A reference implementation to time alongside.')
  flags.DEFINE_bool('channels_last', False, 'The torch reference uses the channels-last format.')
  flags.DEFINE_string(
    'table',
    None,
    'Print a Markdown table of the train/eval lines in this file (earlier output of this command) and exit.',
  )
  flags.DEFINE_float(
    'peak_tflops',
    None,
    "One device's peak TFLOP/s for the model FLOP utilisation (mfu); default: the vendor's figure for known "
    'GPUs and TPUs (ms_cxr/flops.py), none for CPUs.',
  )
  flags.DEFINE_float(
    'stall_timeout_s', 600.0, 'input: exit (status 3) when no batch arrives for this many seconds.'
  )


def _int_list(name: str, values: Sequence[str]) -> tuple[int, ...]:
  try:
    return tuple(int(v) for v in values)
  except ValueError:
    raise UserError(
      f'--{name}={",".join(values)} must be a comma-separated list of integers'
    ) from None


def options_from_flags(flag_values: Any) -> Options:
  return Options(
    what=flag_values.what,
    sizes=_int_list('sizes', flag_values.sizes),
    batch=flag_values.batch,
    dtype=flag_values.dtype,
    remat=flag_values.remat,
    steps=flag_values.steps,
    warmup=flag_values.warmup,
    repeats=flag_values.repeats,
    num_devices=flag_values.num_devices,
    workers=_int_list('workers', flag_values.workers),
    data_root=flag_values.data_root,
    native_px=flag_values.native_px,
    max_images=flag_values.max_images,
    reference='torchvision' if flag_values.torch else (flag_values.reference or ''),
    channels_last=flag_values.channels_last,
    stall_timeout_s=flag_values.stall_timeout_s,
    peak_tflops=flag_values.peak_tflops,
  )


def main(argv: Sequence[str]) -> None:
  from absl import flags, logging

  if not flags.FLAGS['verbosity'].present:  # stdout is JSON; keep stderr to warnings and errors
    logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {list(argv[1:])}')
  with cli.user_errors():
    with cli.flag_errors():
      config = flags.FLAGS.config
      if config is None:
        raise UserError('--config is required (configs/densenet.py was not found)')
      config.data  # noqa: B018 -- a config file that failed to load raises here
    if flags.FLAGS.table:
      print(markdown_table(read_records(flags.FLAGS.table)))
      return
    options = options_from_flags(flags.FLAGS)
    if options.reference:
      # On a GPU, JAX would otherwise take 75% of its memory at start-up and leave torch the rest.
      os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
    run(config, options)


if __name__ == '__main__':
  from absl import app

  hugepages.reexec_with_huge_pages()

  # Defining --config with a default file already parses it with the overrides on the command line.
  with cli.flag_errors():
    _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
