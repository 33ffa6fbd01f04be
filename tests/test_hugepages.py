"""The entry points' re-execution with glibc's transparent-huge-page tunable (ms_cxr/hugepages.py)."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from ms_cxr import hugepages

GLIBC = ('glibc', '2.36')


@pytest.mark.parametrize(
  'environ, libc, thp, system, reason',
  [
    ({}, GLIBC, 'madvise', 'linux', None),
    ({'MS_CXR_HUGE_PAGES': '0'}, GLIBC, 'madvise', 'linux', 'MS_CXR_HUGE_PAGES=0'),
    ({'MS_CXR_HUGE_PAGES': '1'}, GLIBC, 'madvise', 'linux', None),
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, GLIBC, 'madvise', 'linux', 'already'),
    ({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, GLIBC, 'madvise', 'linux', None),
    ({}, GLIBC, 'madvise', 'darwin', 'not Linux'),
    ({}, ('glibc', '2.34'), 'madvise', 'linux', 'not glibc >= 2.35'),
    ({}, ('', ''), 'madvise', 'linux', 'not glibc >= 2.35'),
    ({}, GLIBC, 'always', 'linux', 'transparent huge pages are always'),
    ({}, GLIBC, 'never', 'linux', 'transparent huge pages are never'),
    ({}, GLIBC, None, 'linux', 'transparent huge pages are unavailable'),
  ],
)
def test_why_not(environ, libc, thp, system, reason):
  got = hugepages.why_not(environ, libc, thp, system)
  if reason is None:
    assert got is None
  else:
    assert got is not None and reason in got


def test_environment_keeps_other_tunables():
  assert hugepages.environment_with_huge_pages({'A': 'b'}) == {
    'A': 'b',
    'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1',
  }
  env = hugepages.environment_with_huge_pages({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'})
  assert env['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'


def test_thp_mode_reads_the_bracketed_word(tmp_path):
  path = tmp_path / 'enabled'
  path.write_text('always [madvise] never\n')
  assert hugepages.thp_mode(str(path)) == 'madvise'
  path.write_text('garbage\n')
  assert hugepages.thp_mode(str(path)) is None
  assert hugepages.thp_mode(str(tmp_path / 'missing')) is None


_CHILD = textwrap.dedent(
  """
  import os, sys
  from ms_cxr import hugepages
  print('before', os.getpid(), flush=True)
  hugepages.reexec_with_huge_pages()
  print('after', os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:], flush=True)
  """
)


def _run_child(tmp_path, **env):
  script = tmp_path / 'child.py'
  script.write_text(_CHILD)
  environ = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', hugepages.SWITCH)}
  result = subprocess.run(
    [sys.executable, str(script), 'x', '--flag=1'],
    env={**environ, **env},
    capture_output=True,
    text=True,
    check=True,
    timeout=120,
  )
  return result.stdout.split('\n')


def test_reexec_keeps_the_command_line_and_pid(tmp_path):
  if hugepages.why_not({}, platform.libc_ver(), hugepages.thp_mode()) is not None:
    pytest.skip(hugepages.why_not({}, platform.libc_ver(), hugepages.thp_mode()))
  lines = _run_child(tmp_path)
  # The script runs twice in one process: before the re-execution, then again with the tunable set.
  before = [line for line in lines if line.startswith('before')]
  after = [line for line in lines if line.startswith('after')]
  assert len(before) == 2 and before[0] == before[1]
  assert after == [f"after {before[0].split()[1]} glibc.malloc.hugetlb=1 ['x', '--flag=1']"]


def test_switch_turns_it_off(tmp_path):
  lines = _run_child(tmp_path, MS_CXR_HUGE_PAGES='0')
  assert sum(line.startswith('before') for line in lines) == 1
  assert any(line.startswith('after') and 'hugetlb' not in line for line in lines)
