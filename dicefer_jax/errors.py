"""User-facing errors.

Anything a user can cause (bad paths, bad manifests, bad flags, stages run out of
order) raises `UserError` with one line that says what is wrong and what to do.
Entry points catch it and print that line instead of a traceback.
"""


class UserError(Exception):
  """A problem with the user's input; its message is shown as one line."""


class DataError(UserError):
  """A data directory or manifest that does not follow the on-disk contract."""
