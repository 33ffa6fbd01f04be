"""Test setup: two fake CPU devices (before JAX starts), shared paths and fixtures."""

import os
import pathlib
import subprocess
import sys

os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=2'
).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
# Real sample data lives beside the checkout and is never copied into it (its licences forbid that).
SHARED_DATA = REPO.parent / 'shared' / 'data'


@pytest.fixture
def smoke_config():
  """The smoke-sized DenseNet config on the synthetic set."""
  from configs import densenet

  return densenet.get_config('smoke')


@pytest.fixture(scope='session', autouse=os.environ.get('MS_CXR_TEST_CACHE', '1') == '1')
def compilation_cache(tmp_path_factory):
  """Many tests compile the same tiny programs: a session-wide persistent cache compiles each once, here and
  in the runs tests start as subprocesses (`python -m ms_cxr.main ...`), which inherit it through the
  environment."""
  import jax

  cache = str(tmp_path_factory.mktemp('jax_cache'))
  jax.config.update('jax_compilation_cache_dir', cache)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', cache)
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '-1')


def new_train_state(config, num_labels, sizes):
  """A freshly initialised host train state for `config` (model built for the data-parallel axis)."""
  from ms_cxr import models, parallel, train

  model = models.create_model(config.model, num_labels, sizes, axis_name=parallel.AXIS)
  schedule = train.create_learning_rate_schedule(config.optim, 10)
  tx = train.create_optimizer(config.optim, schedule, count_per_leaf=config.model.norm == 'ssbn')
  return train.create_train_state(config, model, tx)


def compiled_train_step(dp, *, donate_state=False, accum_steps=None, **step_kwargs):
  """`train.train_step` with masked BCE, compiled for `dp`; extra keyword arguments go to the step."""
  import functools

  from ms_cxr import losses, parallel, train

  step = functools.partial(
    train.train_step,
    classification_loss=losses.masked_bce_sum,
    axis_name=parallel.AXIS,
    accum_steps=accum_steps or {},
    **step_kwargs,
  )
  return dp.compile(step, donate_state=donate_state)


def run_module(module: str, *args: str, timeout: float = 600, env: dict | None = None):
  """`python -m module args` from the checkout on the CPU, output captured (a CompletedProcess)."""
  return subprocess.run(
    [sys.executable, '-m', module, *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=timeout,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu', **(env or {})},
  )


def densenet_flops(preset, size_px, num_labels, *, pool_first=True):
  """2 x the multiply-adds of a DenseNet's convolutions and classifier, from its preset: the stem (7x7 stride 2
  on 3 channels), each dense layer's 1x1 bottleneck and 3x3 convolution, each transition's 1x1 convolution at
  the pooled (`pool_first`, this project) or the block's resolution (torchvision)."""
  growth, bn = preset['growth_rate'], preset['bn_size']
  side = -(-size_px // 2)  # stem output: 7x7 stride 2 padding 3
  macs = side * side * 7 * 7 * 3 * preset['num_init_features']
  side = -(-side // 2)  # max-pool 3x3 stride 2 padding 1
  channels = preset['num_init_features']
  for block, layers in enumerate(preset['block_sizes']):
    for _ in range(layers):
      macs += side * side * (channels * bn * growth + 9 * bn * growth * growth)
      channels += growth
    if block < len(preset['block_sizes']) - 1:
      out = channels // 2
      pooled = side // 2
      macs += (pooled * pooled if pool_first else side * side) * channels * out
      channels, side = out, pooled
  return 2 * (macs + channels * num_labels)
