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
