"""Bad input policy: stop with an error naming the file and row, or skip and count (`data.skip_bad`).

Readers raise `ValueError('<file> row <n>: <what>')` for a row they cannot parse. Inside `collecting()`, the
per-row guard `ROW` turns such an error into a skipped row instead: the row is dropped, its message recorded, and
the reader goes on. Images that fail to decode are handled by the pipeline (ms_cxr.data.pipeline), which counts
them per batch. Outside `collecting()` nothing changes: the first bad row stops the run.

  with bad_input.collecting() as skipped:
    records = nih.read_records(root, split='train')
  print(len(skipped), skipped[:3])
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_SKIPPED: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
  'ms_cxr_skipped_rows', default=None
)


@contextlib.contextmanager
def collecting() -> Iterator[list[str]]:
  """Within this block, readers skip bad rows; yields the list their messages are appended to."""
  skipped: list[str] = []
  token = _SKIPPED.set(skipped)
  try:
    yield skipped
  finally:
    _SKIPPED.reset(token)


def skipping() -> bool:
  """Whether bad rows are being skipped (inside `collecting()`)."""
  return _SKIPPED.get() is not None


def skip(message: str) -> bool:
  """Records `message` and returns True when skipping; returns False (the caller raises) otherwise."""
  skipped = _SKIPPED.get()
  if skipped is None:
    return False
  skipped.append(message)
  return True


class _RowGuard:
  """`with ROW:` around one row's parsing: a ValueError skips the row when skipping, else propagates."""

  def __enter__(self) -> None:
    return None

  def __exit__(self, kind, error, traceback) -> bool:
    if kind is None or not issubclass(kind, ValueError):
      return False
    return skip(str(error))


ROW = _RowGuard()
