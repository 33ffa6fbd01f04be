"""What every command-line entry point shares: a bad flag, config override or input ends as one line on stderr
and exit status 2, never a traceback.

  app.run(main, flags_parser=cli.parse_flags)     # flag and --config.X=V errors
  with cli.flag_errors(): ...                      # errors raised later by a lazily loaded config
  with cli.user_errors(): ...                      # UserError from the work itself
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator, Sequence

from absl import flags

from ms_cxr.errors import UserError

EXIT_USER_ERROR = 2
# What absl and ml_collections raise for a bad flag value, an unknown config field or a config file that fails.
# UserError: raised by a config file's get_config (an unknown dataset in its argument).
FLAG_ERRORS = (flags.Error, AttributeError, KeyError, TypeError, ValueError, UserError)


def one_line(error: BaseException, argv: Sequence[str] = ()) -> str:
  """A readable one-line message for a flag-parsing failure.

  An unknown config field names the override it came from, with ml_collections' spelling hint:
  `--config.train.num_stepz: the config has no field 'num_stepz'. Did you mean "num_steps" instead of ...?`
  """
  text = str(error.args[0]) if error.args else str(error)
  if isinstance(error, KeyError | AttributeError):
    key = re.search(r'[A-Za-z_]\w*', text)
    key = key.group(0) if key else text
    hint = re.search(r'Did you mean "[^"]+" instead of "[^"]+"\?', text)
    flag = next((a.split('=')[0] for a in argv if a.startswith('--config.') and key in a), key)
    return f'{flag}: the config has no field {key!r}.' + (f' {hint.group(0)}' if hint else '')
  if (
    'Error whilst parsing config file' in text
  ):  # the config file's own error, without its traceback
    text = text.strip().splitlines()[-1]
  return ' '.join(text.split())


def fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


@contextlib.contextmanager
def flag_errors(argv: Sequence[str] | None = None) -> Iterator[None]:
  """A bad flag or config override raised inside ends as one line and exit status 2."""
  try:
    yield
  except FLAG_ERRORS as e:
    fail(one_line(e, sys.argv if argv is None else argv))


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
  """A UserError raised inside ends as one line and exit status 2."""
  try:
    yield
  except UserError as e:
    fail(str(e))


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing for `app.run(..., flags_parser=parse_flags)`, with errors as one line (exit 2)."""
  with flag_errors(argv):
    return flags.FLAGS(argv)
