"""Helpers shared by the files in `configs/`: argument parsing and resolved-config output.

A config file is `get_config(arg)`; `arg` is the text after the colon in `--config=configs/FILE.py:ARG`, a
comma-separated list of `key=value` pairs and bare flags, e.g. `dataset=nih,size=448,smoke`.
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses `'key=value,flag'` into a ConfigDict, typed by `defaults`.

  Args:
    arg: the config argument, or None/'' for all defaults.
    **defaults: every accepted key and its default; the default's type converts the value (a bare `flag` means
      True for a bool key).

  Returns:
    A ConfigDict with every key of `defaults`.

  Raises:
    ValueError: naming an unknown key, a key given twice or a value that does not convert.
  """
  result = dict(defaults)
  seen = set()
  for item in (arg or '').split(','):
    item = item.strip()
    if not item:
      continue
    key, sep, value = item.partition('=')
    key = key.strip()
    if key not in defaults:
      raise ValueError(f'config argument {key!r} is unknown; expected one of {sorted(defaults)}')
    if key in seen:
      raise ValueError(f'config argument {key!r} is given twice in {arg!r}')
    seen.add(key)
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ValueError(f'config argument {key!r} needs a value ({key}=...)')
      result[key] = True
      continue
    value = value.strip()
    try:
      if isinstance(default, bool):
        if value.lower() not in ('true', 'false', '1', '0'):
          raise ValueError(value)
        result[key] = value.lower() in ('true', '1')
      elif isinstance(default, int):
        result[key] = int(value)
      elif isinstance(default, float):
        result[key] = float(value)
      else:
        result[key] = value
    except ValueError:
      raise ValueError(
        f'config argument {key}={value!r} is not a valid {type(default).__name__}'
      ) from None
  return ml_collections.ConfigDict(result)


def given(arg: str | None) -> set[str]:
  """The keys `arg` names (rather than leaves at their defaults)."""
  return {item.partition('=')[0].strip() for item in (arg or '').split(',') if item.strip()}


def refuse_with(arg: str | None, preset: str, *keys: str) -> None:
  """Raises ValueError when `arg` names both `preset` (a bare flag that sets these fields itself) and one of
  `keys`, which the preset would silently replace."""
  names = given(arg)
  clash = sorted(names & set(keys))
  if preset in names and clash:
    raise ValueError(
      f'config argument {preset!r} sets {" and ".join(clash)} itself; {arg!r} also gives '
      f'{" and ".join(clash)}: drop one (or override the field with --config.data.sizes=...)'
    )


def to_json(config: ml_collections.ConfigDict) -> str:
  """The resolved config as stable, human-readable JSON (tuples become lists)."""
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str) + '\n'


def upgrade_written(values: dict[str, Any]) -> dict[str, Any]:
  """A config as written to a workdir's config.json, brought to the current fields where their meaning moved.

  Before `data.split_seed` existed, `data.seed` also chose the split (the validation carve, the synthetic set's
  contents): such a config's split seed is its `data.seed`.
  """
  data = values.get('data')
  if isinstance(data, dict) and 'split_seed' not in data and 'seed' in data:
    values = {**values, 'data': {**data, 'split_seed': data['seed']}}
  return values
