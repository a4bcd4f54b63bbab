r"""MTCNN preprocessing: raw face photos -> aligned 112x112 grayscale face set.

Reads a folder tree of raw photos, one folder per expression class

  RAW/Happy/*.jpg  RAW/Sad/*.png  ...   (names as in data_tools.labels, any case;
                                         contempt folders are skipped)

finds the face in each with MTCNN (facenet-pytorch), checks it, aligns it on its
five landmarks (eyes level, at fixed positions) and writes

  DIR/<expression>/<name>.png    112x112 8-bit grayscale faces
  DIR/manifest.csv               path, expression, subject, source, split, input
  DIR/rejects.csv                every input that was not kept, and why
  DIR/preprocess_progress.csv    the work log that makes reruns resumable

A photo is rejected when no face is found, the detection probability is below
--min_prob, the face is smaller than --min_face_size pixels, several faces are
found under --multi_face=reject, the landmarks do not fit a face shape
(--max_distortion), or the file cannot be read. Inputs are only read, never
changed, moved or deleted. A folder written by `python -m data_tools.capture`
carries capture_manifest.csv: subjects are taken from it.

Interrupted runs resume: rerunning the same command (also after kill -9) skips
every photo already done and then rewrites the manifest from all done items.
New photos added to RAW are picked up by a rerun.

Usage:
  python -m data_tools.preprocess --input_dir=Photos --output_dir=faces
  python -m data_tools.preprocess --input_dir=RAW --output_dir=faces \
      --min_face_size=60 --multi_face=reject --workers=4 --device=cpu

Dataset importers call `run_preprocess(records, output_dir)` directly. Torch is
imported only inside the worker processes, so importing this module is cheap
and keeps torch out of the caller's process.

This module holds the command line, the folder scan and `run_preprocess`; the
rest lives in
  dicefer_jax.face_detector   MTCNN (MTCNNDetector)
  dicefer_jax.face_alignment  the five-landmark alignment (align_face)
  data_tools.face_quality     which face is kept, reject reasons (decide)
  data_tools.preprocess_pool  the worker processes
  data_tools.preprocess_runs  progress log, lock, manifest and rejects
"""

import collections
import csv
import dataclasses
import os
import sys
import time
from typing import Any, Sequence

from data_tools import preprocess_pool
from data_tools import preprocess_runs
from data_tools.face_quality import DEFAULT_MAX_DISTORTION
from data_tools.face_quality import MULTI_FACE_POLICIES
from data_tools.face_quality import Settings
from data_tools.labels import canonical_expression
from dicefer_jax import contract
from dicefer_jax.errors import DataError, UserError
from dicefer_jax.face_detector import DEVICES

# DEVICES, DEFAULT_MAX_DISTORTION, MULTI_FACE_POLICIES and Settings are also
# this module's: the dataset importers take them from here.
__all__ = ("CAPTURE_MANIFEST", "DEFAULT_MAX_DISTORTION", "DEVICES", "IMAGE_EXTENSIONS",
           "MULTI_FACE_POLICIES", "ScanResult", "Settings", "main", "run_preprocess",
           "scan_folder_tree")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff",
                    ".ppm", ".pgm", ".gif")
CAPTURE_MANIFEST = "capture_manifest.csv"  # Written by data_tools.capture.


@dataclasses.dataclass
class ScanResult:
  """What scan_folder_tree found."""

  records: list[contract.Record]
  dropped: dict[str, int]  # class folder -> images skipped (e.g. contempt)
  ignored: int  # files that are not images


def scan_folder_tree(input_dir: str, source: str | None = None,
                     subject_from_dir: bool = False) -> ScanResult:
  """Lists the raw photos of `input_dir/<Expression>/...` as Records.

  Record paths are absolute paths of the raw images. Subjects come from
  `input_dir/capture_manifest.csv` when present (the capture tool writes it),
  else, with subject_from_dir, from the first folder level under the class
  folder (RAW/Happy/<subject>/x.jpg), else they are empty.

  Raises:
    DataError: missing input_dir, an unknown class folder, or no photos.
  """
  if not input_dir or not os.path.isdir(input_dir):
    raise DataError(f"--input_dir={input_dir!r} is not a directory: pass the folder "
                    "holding one sub-folder of photos per expression")
  root = os.path.abspath(input_dir)
  if source is None:
    source = os.path.basename(root.rstrip(os.sep)) or "raw"
  subjects = _capture_subjects(root)
  records, dropped, ignored = [], collections.Counter(), 0
  class_dirs = sorted(d for d in os.listdir(root)
                      if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
  if not class_dirs:
    raise DataError(
        f"{input_dir} has no class folders: lay the photos out as "
        f"{input_dir}/<Expression>/*.jpg, e.g. {input_dir}/Happy/001.jpg")
  for class_dir in class_dirs:
    try:
      expression = canonical_expression(class_dir)
    except DataError as e:
      raise DataError(f"folder {os.path.join(input_dir, class_dir)}: {e}") from None
    for folder, dirs, names in os.walk(os.path.join(root, class_dir)):
      dirs[:] = sorted(d for d in dirs if not d.startswith("."))
      for name in sorted(names):
        if name.startswith("."):
          continue
        if not name.lower().endswith(IMAGE_EXTENSIONS):
          ignored += 1
          continue
        path = os.path.join(folder, name)
        if expression is None:
          dropped[class_dir] += 1
          continue
        rel = os.path.relpath(path, root)
        subject = subjects.get(os.path.normcase(os.path.normpath(rel)), "")
        if not subject and subject_from_dir:
          parts = os.path.normpath(rel).split(os.sep)
          subject = parts[1] if len(parts) > 2 else ""
        records.append(contract.Record(path=path, expression=expression,
                                       subject=subject, source=source))
  if not records:
    raise DataError(
        f"{input_dir} holds no photos ({', '.join(IMAGE_EXTENSIONS)}) in its "
        "class folders" + (f" besides dropped classes {sorted(dropped)}" if dropped else ""))
  return ScanResult(records, dict(dropped), ignored)


def _capture_subjects(root: str) -> dict[str, str]:
  path = os.path.join(root, CAPTURE_MANIFEST)
  if not os.path.isfile(path):
    return {}
  subjects = {}
  with open(path, newline="", encoding="utf-8") as f:
    for row in csv.DictReader(f):
      rel, subject = (row.get("path") or "").strip(), (row.get("subject") or "").strip()
      if rel and subject:
        subjects[os.path.normcase(os.path.normpath(rel))] = subject
  return subjects



# --------------------------------------------------------------------------
# The run.


def run_preprocess(items: Sequence[contract.Record], output_dir: str, *,
                   workers: int | None = None, min_face_size: int = 40,
                   min_prob: float = 0.9,
                   max_distortion: float = DEFAULT_MAX_DISTORTION,
                   multi_face: str = "largest", device: str = "auto",
                   show_progress: bool = True) -> dict[str, Any]:
  """Detects, aligns and writes the faces of raw photos into a face set.

  Args:
    items: one Record per raw photo: `path` is the photo (absolute, or
      relative to the current directory); expression (canonical), subject,
      source and split are carried into the manifest.
    output_dir: the face set to write (created if missing). Photos already
      done by an earlier run into it are skipped.
    workers: worker processes (default: the number of cores). Each builds
      one MTCNN and uses one torch thread.
    min_face_size: smallest accepted face, pixels (shorter side of the box).
    min_prob: smallest accepted MTCNN face probability.
    max_distortion: largest accepted landmark misfit after alignment, in eye
      distances (see dicefer_jax.face_alignment.similarity_to_template).
    multi_face: "largest", "most_confident" or "reject" (photos with more
      than one qualifying face are rejected).
    device: "auto" (CUDA when torch sees it), "cpu" or "cuda".
    show_progress: tqdm bar on stderr.

  Returns:
    {"kept", "rejected", "errors": counts for this run's photos; "skipped":
    photos done by earlier runs; "reasons": {reason: count} of this run's
    rejects and errors; "total_kept": faces now in the manifest; "manifest",
    "rejects": paths; "devices": where MTCNN ran; "seconds"}.

  Raises:
    DataError/UserError: bad records, a missing MTCNN stack, no CUDA for
      device="cuda", an output directory in use by another run.

  Workers are spawned processes (torch never enters the caller's process).
  As with any 'spawn' pool, the caller's main module is imported again in
  each worker: keep TensorFlow imports in the main module under
  `if __name__ == "__main__":`.
  """
  started = time.monotonic()
  settings = Settings(min_face_size=int(min_face_size), min_prob=float(min_prob),
                      max_distortion=float(max_distortion), multi_face=multi_face,
                      device=device)
  settings.validate()
  if workers is not None and workers < 1:
    raise UserError(f"--workers={workers}: must be >= 1")
  wanted = _records_by_input(items)

  output_dir = os.path.abspath(output_dir)
  try:
    os.makedirs(output_dir, exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot create --output_dir={output_dir}: {e.strerror or e}") from None
  lock = preprocess_runs.DirLock(output_dir)
  try:
    preprocess_runs.remove_stale_temp_files(output_dir)
    preprocess_runs.check_settings(output_dir, settings)
    log = preprocess_runs.ProgressLog(os.path.join(output_dir, preprocess_runs.PROGRESS_NAME))
    counts, reasons, devices = collections.Counter(), collections.Counter(), set()
    try:
      todo, skipped = preprocess_runs.pending_inputs(wanted, log.state, output_dir)
      if todo:
        tasks = [(key, output_dir, preprocess_runs.output_name(key, wanted[key].expression))
                 for key in todo]
        counts, reasons, devices = preprocess_pool.run_tasks(
            tasks, settings, workers, show_progress=show_progress,
            on_result=lambda result: log.write_result(wanted[result["input"]], result))
    finally:
      log.close()
      # Also after Ctrl-C or a worker failure: what is done is listed.
      total_kept = preprocess_runs.finalize(output_dir, log.state, wanted)
  finally:
    lock.release()
  return preprocess_runs.run_summary(counts, reasons, devices, skipped, total_kept,
                                     output_dir, started)


def _records_by_input(items: Sequence[contract.Record]) -> dict[str, contract.Record]:
  """One record per input photo, keyed by its absolute path; checks them.

  Raises:
    DataError: not a Record, an unknown expression, an empty path, one photo
      under two expressions, or none of the photos exists.
  """
  wanted: dict[str, contract.Record] = {}
  for record in items:
    if not isinstance(record, contract.Record):
      raise DataError(f"run_preprocess takes contract.Record items, got {type(record)}")
    contract.expression_index(record.expression)
    if not record.path:
      raise DataError(f"a record has an empty path: {record}")
    key = os.path.abspath(record.path)
    if key in wanted and wanted[key].expression != record.expression:
      raise DataError(f"{record.path} is listed as both {wanted[key].expression} and "
                      f"{record.expression}: give each photo one expression")
    wanted[key] = record
  if wanted and not any(os.path.isfile(k) for k in wanted):
    example = next(iter(wanted.values())).path
    raise DataError(f"none of the {len(wanted)} input photos exist, e.g. {example!r} "
                    f"(relative paths are taken from {os.getcwd()})")
  return wanted


# --------------------------------------------------------------------------
# Command line.


def _define_flags():
  # Defined only when run as a program: spawned workers import this module
  # again (as __mp_main__), and defining absl flags twice is an error.
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("input_dir", None,
                      "Folder of raw photos, one sub-folder per expression "
                      "(Happy/, Sad/, ...; see data_tools.labels for the names).")
  flags.DEFINE_string("output_dir", None,
                      "Face set to write: <expression>/*.png, manifest.csv, "
                      "rejects.csv. Rerunning into the same folder resumes.")
  flags.DEFINE_integer("min_face_size", 40,
                       "Smallest accepted face, in pixels of the photo (shorter "
                       "side of MTCNN's box).")
  flags.DEFINE_float("min_prob", 0.9, "Smallest accepted MTCNN face probability.")
  flags.DEFINE_float("max_distortion", DEFAULT_MAX_DISTORTION,
                     "Largest accepted landmark misfit: RMS distance between the "
                     "aligned landmarks and the template, in eye distances. A "
                     "frontal smiling face scores about 0.15, a head turned 45 "
                     "degrees about 0.2, 60 degrees about 0.3; wrong landmarks "
                     "score higher.")
  flags.DEFINE_enum("multi_face", "largest", MULTI_FACE_POLICIES,
                    "Photos with several faces: keep the largest, the most "
                    "confident, or reject the photo.")
  flags.DEFINE_integer("workers", None,
                       "Worker processes, each with its own MTCNN (default: "
                       "number of cores).")
  flags.DEFINE_enum("device", "auto", DEVICES,
                    "Where MTCNN runs: auto uses CUDA when torch sees a GPU.")
  flags.DEFINE_string("source", None,
                      "Value of the manifest's source column (default: the "
                      "input folder's name).")
  flags.DEFINE_bool("subject_from_dir", False,
                    "Take subjects from the folder level under the class "
                    "folder (RAW/Happy/<subject>/x.jpg) when no "
                    "capture_manifest.csv names them.")
  return flags.FLAGS


def main(argv, flag_values):
  """The command line: scans --input_dir, runs run_preprocess, prints a summary.

  Returns:
    The exit status: 0, 2 for a user error or no face kept, 130 on Ctrl-C.
  """
  if len(argv) > 1:
    print(f"error: unexpected arguments {' '.join(argv[1:])}", file=sys.stderr)
    return 2
  fv = flag_values
  try:
    if not fv.input_dir or not fv.output_dir:
      raise UserError("pass --input_dir=RAW (photos) and --output_dir=DIR (face set)")
    inp, out = os.path.realpath(fv.input_dir), os.path.realpath(fv.output_dir)
    if out == inp or out.startswith(inp + os.sep):
      raise UserError("--output_dir must not be --input_dir or inside it: the "
                      "inputs stay as they are; pick a separate folder")
    scan = scan_folder_tree(fv.input_dir, source=fv.source,
                            subject_from_dir=fv.subject_from_dir)
    for folder, n in sorted(scan.dropped.items()):
      print(f"skipping {n} photo(s) of dropped class {folder}", file=sys.stderr)
    if scan.ignored:
      print(f"ignoring {scan.ignored} file(s) that are not images", file=sys.stderr)
    summary = run_preprocess(
        scan.records, fv.output_dir, workers=fv.workers,
        min_face_size=fv.min_face_size, min_prob=fv.min_prob,
        max_distortion=fv.max_distortion, multi_face=fv.multi_face,
        device=fv.device, show_progress=True)
  except UserError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("interrupted: rerun the same command to resume", file=sys.stderr)
    return 130
  return report(summary)


def report(summary: dict) -> int:
  """Prints a run's summary (and warnings); the exit status it calls for."""
  reasons = ", ".join(f"{k} {v}" for k, v in sorted(summary["reasons"].items()))
  print(f"kept {summary['kept']}, rejected {summary['rejected']}"
        f"{f' ({reasons})' if reasons else ''}, errors {summary['errors']}, "
        f"skipped {summary['skipped']} already done; "
        f"{summary['total_kept']} faces in {summary['manifest']}; "
        f"rejects in {summary['rejects']} ({summary['seconds']} s)")
  if summary["errors"]:
    print(f"warning: {summary['errors']} photo(s) failed with errors (see "
          f"{summary['rejects']}); rerun to retry them", file=sys.stderr)
  if summary["total_kept"] == 0:
    print(f"error: no face was kept: see {summary['rejects']} for the reasons",
          file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _FLAG_VALUES = _define_flags()
  app.run(lambda argv: main(argv, _FLAG_VALUES))
