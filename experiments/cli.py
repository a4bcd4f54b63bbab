"""What every entry point shares: flag parsing and user errors as one line."""

import contextlib
import os
import sys
import traceback

from absl import flags
from ml_collections import config_flags

from dicefer_jax.errors import UserError

# Frames of these packages are the flag machinery, not the user's config file.
_MACHINERY = (os.sep + "ml_collections" + os.sep, os.sep + "absl" + os.sep)


def _one_line(error: Exception) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def _config_file_frame(error: Exception):
  """The innermost frame of the error's traceback inside a config file (its
  `get_config`, a function it called, or its module-level code), or None when it
  arose in the flag machinery itself."""
  frames = traceback.extract_tb(error.__traceback__)
  called_by_machinery = inside = False
  found = None
  for frame in frames:
    machinery = any(m in frame.filename for m in _MACHINERY)
    called_by_machinery = called_by_machinery or machinery
    # "<module>": the config file's top level, run when ml_collections loads it;
    # only below the machinery, since the caller's own frames come first.
    if (called_by_machinery and not machinery
        and frame.name in ("get_config", "<module>")):
      inside = True
    if inside and not machinery:
      found = frame
  return found


def _missing_key(error: Exception) -> str:
  """The field name of ml_collections' AttributeError/KeyError for a missing field.

  It wraps a KeyError in an AttributeError, and a near-miss's KeyError text has
  a second, 'Did you mean' line: str() of either is an escaped repr, not the name.
  """
  arg = error
  while isinstance(arg, BaseException) and arg.args:
    arg = arg.args[0]
  text = str(arg).strip()
  return text.splitlines()[0].strip("\"'") if text else type(error).__name__


def _overrides(argv) -> list[str]:
  """Dotted field names of `--config.a.b=...`-style arguments, in order."""
  names = []
  for arg in argv[1:]:
    name = arg.lstrip("-").split("=", 1)[0]
    if arg.startswith("-") and "." in name:
      names.append(name.split(".", 1)[1])
  return names


@contextlib.contextmanager
def _flag_errors_as_one_line(argv):
  """Turns what flag and config parsing raise into `error: <one line>`, exit 2.

  ml_collections raises AttributeError/KeyError/TypeError from deep inside for an
  override of a field that does not exist or of the wrong type. The same
  exceptions raised by a bug inside a config file's get_config are reported as
  that bug, with its file and line, not as an unknown field.
  """
  try:
    yield
  except flags.Error as e:
    _exit(f"{_one_line(e)} (see --help)")
  except Exception as e:  # pylint: disable=broad-except
    frame = _config_file_frame(e)
    if frame is not None:
      _exit(f"config file {os.path.basename(frame.filename)}: {type(e).__name__}: "
            f"{_one_line(e)} (at {frame.filename}:{frame.lineno})")
    if isinstance(e, (AttributeError, KeyError)):
      key = _missing_key(e)
      named = [o for o in _overrides(argv) if key in o.split(".")]
      field = named[0] if named else key
      _exit(f"config field {field!r} does not exist: list the fields with "
            "--helpfull or look in experiments/configs/default.py")
    if isinstance(e, (TypeError, ValueError)):
      _exit(f"bad config override: {_one_line(e)}")
    raise


def parse_flags(argv):
  """absl flag parsing where a bad flag or config override is one clear line."""
  with _flag_errors_as_one_line(argv):
    return flags.FLAGS(argv)


def define_config_file(name: str, default: str, help_string: str):
  """config_flags.DEFINE_config_file, whose errors are one line too.

  Defining the flag already parses its default config file with the command
  line's overrides, so a bad override can fail here, before `parse_flags`.
  """
  with _flag_errors_as_one_line(sys.argv):
    return config_flags.DEFINE_config_file(name, default, help_string, lock_config=True)


def define_config_dict(name: str, config, help_string: str):
  """config_flags.DEFINE_config_dict, whose override errors are one line too."""
  with _flag_errors_as_one_line(sys.argv):
    return config_flags.DEFINE_config_dict(name, config, help_string, lock_config=True)


def _exit(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def run_or_exit(fn, *args, **kwargs):
  """Calls fn; a UserError becomes `error: <one line>` on stderr and exit code 2."""
  try:
    return fn(*args, **kwargs)
  except UserError as e:
    _exit(str(e))
