"""The error type for problems a user can fix (bad input, bad config, missing checkpoint).

`ms_cxr.main` prints these as one line and exits non-zero; anything else is a bug and keeps its
traceback.
"""


class UserError(Exception):
  """Bad input or configuration; the message names the file, row or field and what was expected."""
