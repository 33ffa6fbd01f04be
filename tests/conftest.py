"""Test setup: two fake CPU devices (before JAX starts), shared paths and fixtures."""

import os
import pathlib

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
  """Many tests compile the same tiny programs: a session-wide persistent cache compiles each once."""
  import jax

  jax.config.update('jax_compilation_cache_dir', str(tmp_path_factory.mktemp('jax_cache')))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
