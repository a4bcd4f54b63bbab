"""The bookkeeping that makes a preprocessing run safe to interrupt and rerun.

A face set written by data_tools.preprocess holds, besides the faces,

  preprocess_progress.csv   one row per finished photo, appended and flushed
                            at once, so it survives kill -9 (ProgressLog)
  preprocess_settings.json  the settings of the first run (check_settings)
  .preprocess.lock          held while a run writes (DirLock)
  manifest.csv, rejects.csv rewritten from the log at the end of every run,
                            also an interrupted one (finalize)

A rerun reads the log, skips every photo already done (pending_inputs) and
processes the rest.
"""

import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import sys
import time
from typing import Iterable, Sequence

from data_tools.face_quality import ERROR
from data_tools.face_quality import KEPT
from data_tools.face_quality import REJECTED
from data_tools.face_quality import Settings
from dicefer_jax import contract
from dicefer_jax import fileio
from dicefer_jax.errors import UserError

PROGRESS_NAME = "preprocess_progress.csv"
REJECTS_NAME = "rejects.csv"
SETTINGS_NAME = "preprocess_settings.json"
LOCK_NAME = ".preprocess.lock"

PROGRESS_FIELDS = ("input", "expression", "subject", "source", "split", "status",
                   "output", "reason", "detail")
REJECT_FIELDS = ("input", "expression", "subject", "source", "reason", "detail")


def output_name(key: str, expression: str) -> str:
  """The face's path in the face set, e.g. "fear/img_01-3f2a9c0d1e.png".

  Args:
    key: the absolute path of the input photo.
    expression: its canonical expression (the face's folder).
  """
  stem = os.path.splitext(os.path.basename(key))[0]
  stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")[:80] or "face"
  # The hash of the input path keeps names unique when different folders hold
  # files of the same name, and stable across reruns.
  digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:10]
  return f"{expression}/{stem}-{digest}.png"


def read_progress(path: str) -> dict[str, dict[str, str]]:
  """Last logged row per input; rows cut short by a crash are ignored."""
  state = {}
  if not os.path.isfile(path):
    return state
  with open(path, newline="", encoding="utf-8") as f:
    for row in csv.DictReader(f):
      if (None in row or any(row.get(k) is None for k in PROGRESS_FIELDS)
          or row["status"] not in (KEPT, REJECTED, ERROR)
          or row["expression"] not in contract.EXPRESSIONS):
        continue
      state[row["input"]] = row
  return state


class ProgressLog:
  """The work log: appends one row per finished input, flushed at once.

  Attributes:
    state: the last logged row per input (absolute path), from earlier runs
      and this one.
  """

  def __init__(self, path: str):
    self.state = read_progress(path)
    new = not os.path.isfile(path) or os.path.getsize(path) == 0
    if not new:
      with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        unterminated = f.read(1) != b"\n"
    self._file = open(path, "a", newline="", encoding="utf-8")
    if not new and unterminated:
      self._file.write("\n")  # End the row a crash cut short; it is skipped.
    self._writer = csv.DictWriter(self._file, fieldnames=PROGRESS_FIELDS)
    if new:
      self._writer.writeheader()
    self._file.flush()

  def write_result(self, record: contract.Record, result: dict[str, str]) -> None:
    """Logs a worker's result for `record` (input, status, output, reason, detail)."""
    row = {**dataclasses.asdict(record), **result}
    self._writer.writerow({k: row.get(k, "") for k in PROGRESS_FIELDS})
    # Flushed per row: a run killed with -9 loses at most the row being written.
    self._file.flush()
    self.state[result["input"]] = {k: str(row.get(k, "")) for k in PROGRESS_FIELDS}

  def close(self) -> None:
    self._file.close()


class DirLock:
  """Refuses a second concurrent run on the same output directory."""

  def __init__(self, output_dir: str):
    self._file = open(os.path.join(output_dir, LOCK_NAME), "a")
    try:
      import fcntl  # pylint: disable=g-import-not-at-top
    except ImportError:  # Windows: no lock, like before.
      return
    try:
      fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      self._file.close()
      raise UserError(f"another preprocessing run is writing to {output_dir}: wait "
                      "for it to finish or use another --output_dir") from None

  def release(self) -> None:
    self._file.close()


def remove_stale_temp_files(output_dir: str) -> None:
  """Removes the temporary files a worker killed mid-write left behind."""
  # Only fileio's temp names, only in this tool's own output folders, and
  # only while holding the directory lock (no live writer owns them).
  for folder in [output_dir] + [os.path.join(output_dir, e) for e in contract.EXPRESSIONS]:
    if os.path.isdir(folder):
      for name in os.listdir(folder):
        if fileio.is_temp_name(name):
          os.remove(os.path.join(folder, name))


def check_settings(output_dir: str, settings: Settings) -> None:
  """Records the settings of a new face set; warns when a rerun's differ."""
  path = os.path.join(output_dir, SETTINGS_NAME)
  current = dataclasses.asdict(settings)
  current.pop("device")  # Where it ran does not change which faces are kept.
  if os.path.isfile(path):
    try:
      with open(path, encoding="utf-8") as f:
        previous = json.load(f)
    except (OSError, ValueError):
      previous = None
    if previous is not None and previous != current:
      changed = ", ".join(f"{k} {previous.get(k)} -> {v}" for k, v in current.items()
                          if previous.get(k) != v)
      print(f"warning: {output_dir} was started with other settings ({changed}); "
            "photos done then are not redone: use a fresh --output_dir to apply "
            "the new settings to all", file=sys.stderr)
    return
  fileio.write_json_atomic(path, current)


def pending_inputs(wanted: dict[str, contract.Record], state: dict[str, dict[str, str]],
                   output_dir: str) -> tuple[list[str], int]:
  """Which photos this run must process, and how many earlier runs finished.

  A photo is done when the log has it kept (and its face is still there) or
  rejected, under its current expression; "error" rows are retried. A kept
  photo relabelled since loses its old face, so the face does not stay in
  the manifest under its old class.

  Args:
    wanted: this run's records by absolute input path.
    state: the progress log's last row per input.
    output_dir: the face set (absolute).

  Returns:
    (inputs to process, sorted; the number skipped as done).
  """
  todo, skipped = [], 0
  for key, record in sorted(wanted.items()):
    done = state.get(key)
    if done is not None and done["status"] != ERROR:
      if done["expression"] == record.expression and (
          done["status"] == REJECTED
          or os.path.isfile(os.path.join(output_dir, done["output"]))):
        skipped += 1
        continue
      if done["status"] == KEPT and done["expression"] != record.expression:
        # The old face is ours to remove: only inside output_dir.
        stale = os.path.normpath(os.path.join(output_dir, done["output"]))
        if stale.startswith(output_dir + os.sep) and os.path.isfile(stale):
          os.remove(stale)
    todo.append(key)
  return todo, skipped


def _write_csv_atomic(path: str, fields: Sequence[str], rows: Iterable[dict]) -> None:
  buffer = io.StringIO(newline="")
  writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
  writer.writeheader()
  writer.writerows(rows)
  fileio.write_text_atomic(path, buffer.getvalue())


def finalize(output_dir: str, state: dict[str, dict[str, str]],
             wanted: dict[str, contract.Record]) -> int:
  """Rewrites manifest.csv and rejects.csv from every item done so far.

  Returns:
    The number of faces in the manifest.
  """
  faces, rejects = [], []
  for key, row in sorted(state.items()):
    record = wanted.get(key)
    # This run's records carry the latest subject/source/split.
    meta = (dataclasses.asdict(record) if record is not None
            and record.expression == row["expression"] else row)
    if row["status"] == KEPT:
      if os.path.isfile(os.path.join(output_dir, row["output"])):
        faces.append({"path": row["output"], "expression": row["expression"],
                      "subject": meta["subject"], "source": meta["source"],
                      "split": meta["split"], "input": key})
    else:
      rejects.append({"input": key, "expression": row["expression"],
                      "subject": meta["subject"], "source": meta["source"],
                      "reason": row["reason"], "detail": row["detail"]})
  faces.sort(key=lambda r: r["path"])
  contract.write_manifest(output_dir, faces, extra_fields=("input",))
  _write_csv_atomic(os.path.join(output_dir, REJECTS_NAME), REJECT_FIELDS, rejects)
  return len(faces)


def run_summary(counts, reasons, devices, skipped: int, total_kept: int,
                output_dir: str, started: float) -> dict:
  """What a preprocessing run (worker pool or Beam) reports; `started` is its
  time.monotonic() at the start."""
  return {
      "kept": counts[KEPT], "rejected": counts[REJECTED], "errors": counts[ERROR],
      "skipped": skipped, "reasons": dict(reasons), "total_kept": total_kept,
      "manifest": os.path.join(output_dir, contract.MANIFEST_NAME),
      "rejects": os.path.join(output_dir, REJECTS_NAME),
      "devices": sorted(devices), "seconds": round(time.monotonic() - started, 2),
  }
