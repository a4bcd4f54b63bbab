"""Writing files so that no reader, and no interrupted run, ever sees half of one.

Every file the project writes (images, manifests, configs, metrics, reports) goes
through `write_bytes_atomic`: the data lands in a temporary file beside the target
and is renamed over it, which is atomic on POSIX file systems. The temporary name
starts with `.tmp-`, so tools that list a folder skip it, and a crash leaves only
such a file behind, never a truncated image under its real name.
"""

import json
import os
import uuid

TEMP_PREFIX = ".tmp-"


def temp_path(path: str) -> str:
  """A unique temporary name in the target's folder (same file system: rename is atomic)."""
  folder, name = os.path.split(path)
  return os.path.join(folder, f"{TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-{name}")


def is_temp_name(name: str) -> bool:
  """Whether a file name is one of `temp_path`'s (left behind by a crash)."""
  return name.startswith(TEMP_PREFIX)


def write_bytes_atomic(path: str, data: bytes, *, fsync: bool = False) -> None:
  """Writes `data` to `path` through a temporary file and a rename.

  Not tempfile.mkstemp: its files are private (0600), and face sets and reports
  are meant to be shared; a plain open() honours the user's umask. `fsync` also
  flushes the data to disk before the rename (for captures a user cannot redo).
  """
  tmp = temp_path(path)
  try:
    with open(tmp, "xb") as f:
      f.write(data)
      if fsync:
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text_atomic(path: str, text: str) -> None:
  write_bytes_atomic(path, text.encode("utf-8"))


def json_safe(obj):
  """NaN/inf become null and numpy scalars Python numbers: json.dump would write
  NaN, which is not JSON, and fails on numpy integers."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  if isinstance(obj, dict):
    return {k: json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [json_safe(v) for v in obj]
  if isinstance(obj, (float, np.floating)):
    return float(obj) if np.isfinite(obj) else None
  if isinstance(obj, np.integer):
    return int(obj)
  if isinstance(obj, np.bool_):
    return bool(obj)
  return obj


def write_json_atomic(path: str, obj, *, sort_keys: bool = False) -> None:
  """`obj` as indented JSON (NaN/inf as null), written atomically."""
  write_text_atomic(path, json.dumps(json_safe(obj), indent=2, sort_keys=sort_keys) + "\n")


def default_workers() -> int:
  """Cores this process may use (its CPU affinity, where the OS tells it)."""
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:
    return max(1, os.cpu_count() or 1)
