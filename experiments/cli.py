"""What every entry point shares: flag parsing and user errors as one line."""

import sys

from absl import flags

from dicefer_jax.errors import UserError


def _one_line(error: Exception, strip_quotes: bool = False) -> str:
  text = str(error).strip()
  if strip_quotes:  # KeyError/AttributeError repr their argument
    text = text.strip("\"'")
  return text.splitlines()[0] if text else type(error).__name__


def parse_flags(argv):
  """absl flag parsing where a bad flag or config override is one clear line.

  ml_collections raises AttributeError/KeyError/TypeError from deep inside for an
  override of a field that does not exist or of the wrong type.
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _exit(f"{_one_line(e)} (see --help)")
  except (AttributeError, KeyError) as e:
    _exit(f"config field {_one_line(e, strip_quotes=True)!r} does not exist: list the fields with "
          "--helpfull or look in experiments/configs/default.py")
  except (TypeError, ValueError) as e:
    _exit(f"bad config override: {_one_line(e)}")


def _exit(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def run_or_exit(fn, *args, **kwargs):
  """Calls fn; a UserError becomes `error: <one line>` on stderr and exit code 2."""
  try:
    return fn(*args, **kwargs)
  except UserError as e:
    _exit(str(e))
