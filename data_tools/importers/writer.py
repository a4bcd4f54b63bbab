"""The write step every importer shares: from listed records to a face set.

Faces that are aligned crops already (FER2013, RAF-DB, AffectNet with
aligned=True) are written here directly: grayscale, resized to 112x112, PNG.
The others are handed to MTCNN (`data_tools.preprocess.run_preprocess`). Either
way the output follows the on-disk contract: `OUT/<expression>/*.png` plus
`OUT/manifest.csv`. This module also guards the output directory and counts
and formats what was found and written.
"""

import collections
import concurrent.futures
import dataclasses
import os
import sys
from typing import Callable, Sequence

import cv2
import numpy as np

from data_tools.importers import common
from data_tools.importers import fer2013
from dicefer_jax import contract
from dicefer_jax import fileio
from dicefer_jax.contract import Record
from dicefer_jax.errors import UserError

# Default cap on the threads of a direct write (the CLI's --workers help states
# it): a face is a few milliseconds of OpenCV work, so more threads mostly queue.
MAX_WRITE_THREADS = 8


def to_face(image: np.ndarray) -> np.ndarray:
  """Grayscale or BGR uint8 image of any size -> 112x112 grayscale uint8 face.

  Area averaging when shrinking (no aliasing), bicubic when enlarging (FER2013's
  48 px and RAF-DB's 100 px faces); a non-square image is stretched, since the
  direct writers only see crops that are square already.
  """
  if image.ndim == 3:
    image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
  size = contract.IMAGE_SIZE
  if image.shape == (size, size):
    return image
  shrink = image.shape[0] > size or image.shape[1] > size
  return cv2.resize(image, (size, size),
                    interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def write_png(path: str, face: np.ndarray) -> None:
  """Writes a PNG atomically, so an interrupted run never leaves a truncated
  file under its real name that a resumed run would keep."""
  ok, data = cv2.imencode(".png", face)
  if not ok:
    raise OSError(f"could not encode {path} as PNG")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fileio.write_bytes_atomic(path, data.tobytes())


def load_gray(record: Record) -> np.ndarray | None:
  """A record's image file as grayscale uint8; None if OpenCV cannot read it."""
  return cv2.imread(record.path, cv2.IMREAD_GRAYSCALE)


def write_direct(pairs: Sequence[tuple[Record, str]], output_dir: str,
                 load: Callable[[Record], np.ndarray | None], *,
                 workers: int | None = None, resume: bool = False,
                 failed: collections.Counter | None = None,
                 show_progress: bool = True) -> list[Record]:
  """Writes already-aligned faces as 112x112 grayscale PNGs, no face detection.

  Args:
    pairs: (source record, output path relative to output_dir) per face.
    output_dir: the face set directory.
    load: reads a source record's image (grayscale or BGR uint8), None if unreadable.
    workers: threads (OpenCV decodes and encodes outside the GIL); default: the
      usable cores, at most MAX_WRITE_THREADS.
    resume: keep output files that exist already instead of rewriting them.
    failed: filled with reason -> count for faces that could not be written.
    show_progress: a progress bar on stderr.

  Returns:
    The manifest records of the faces on disk, in the order of `pairs`.
  """
  def one(pair):
    source, rel = pair
    out = dataclasses.replace(source, path=rel)
    dst = os.path.join(output_dir, rel)
    if resume and os.path.isfile(dst):
      return out, None
    try:
      image = load(source)
    except (OSError, cv2.error):
      image = None
    if image is None or image.size == 0:
      return None, "unreadable image"
    write_png(dst, to_face(image))
    return out, None

  workers = workers or min(MAX_WRITE_THREADS, fileio.default_workers())
  progress = None
  if show_progress:
    try:
      import tqdm  # pylint: disable=g-import-not-at-top
      progress = tqdm.tqdm(total=len(pairs), unit="face", file=sys.stderr)
    except ImportError:
      progress = None
  records = []
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    for out, reason in pool.map(one, pairs):
      if out is not None:
        records.append(out)
      else:
        common.count_skip(failed, reason)
      if progress is not None:
        progress.update()
  if progress is not None:
    progress.close()
  return records


def run_mtcnn(records: Sequence[Record], output_dir: str, **kwargs) -> dict:
  """Hands the records to MTCNN (data_tools.preprocess.run_preprocess).

  Imported here, not at the top: preprocess brings the MTCNN machinery, which
  the listing and direct-write paths (and their tests) never need.
  """
  from data_tools import preprocess  # pylint: disable=g-import-not-at-top
  return preprocess.run_preprocess(records, output_dir, **kwargs)


def spread(records: Sequence[Record], limit: int | None) -> list[Record]:
  """At most `limit` records picked evenly over the enumeration order.

  Even spacing rather than the first N: enumerations are grouped by class or
  subject, so a prefix would hold one class only.
  """
  records = list(records)
  if not limit or limit >= len(records):
    return records
  picks = np.unique(np.linspace(0, len(records) - 1, int(limit)).round().astype(int))
  return [records[i] for i in picks]


def check_output_dir(output_dir: str, root: str, *, resume: bool = False,
                     overwrite: bool = False, can_overwrite: bool = True) -> str:
  """Refuses output directories that would touch inputs or clobber a face set.

  Args:
    output_dir: where the face set is to be written.
    root: the dataset; output_dir must not be it or lie inside it.
    resume: a non-empty output_dir is allowed (an import is continued).
    overwrite: a non-empty output_dir is allowed (its faces are written again).
    can_overwrite: False (MTCNN importers) leaves --overwrite out of the advice.

  Returns:
    The output directory's real path.

  Raises:
    UserError: output_dir is missing, a file, inside root, or not empty without
      resume or overwrite; or resume and overwrite are both set.
  """
  redo = "--overwrite to rewrite it, " if can_overwrite else ""
  if not output_dir:
    raise UserError("pass --output_dir=DIR, where the face set is written")
  if resume and overwrite:
    raise UserError("--resume and --overwrite exclude each other: pick one")
  out = os.path.realpath(output_dir)
  src = os.path.realpath(root)
  if out == src or out.startswith(src.rstrip(os.sep) + os.sep):
    raise UserError(f"--output_dir {output_dir} lies inside --root {root}: write the "
                    "face set elsewhere so the dataset stays untouched")
  if os.path.exists(out) and not os.path.isdir(out):
    raise UserError(f"--output_dir {output_dir} is a file, not a directory")
  if os.path.isdir(out) and not (resume or overwrite):
    if os.path.isfile(os.path.join(out, contract.MANIFEST_NAME)):
      raise UserError(
          f"{output_dir} already holds a face set ({contract.MANIFEST_NAME}): pass "
          f"--resume to finish it (faces written already are kept), {redo}or pick "
          "another --output_dir")
    if any(not n.startswith(".") for n in os.listdir(out)):
      raise UserError(
          f"{output_dir} is not empty: pass --resume to continue an interrupted "
          f"import into it, {redo.replace('rewrite', 'write over')}or pick an empty "
          "--output_dir")
  return out


def output_name(record: Record, dataset: str) -> str:
  """Relative output path of a directly written face; unique per source image."""
  if dataset == "fer2013":
    stem = f"fer2013_{fer2013.row_index(record):05d}"
  elif dataset == "rafdb":
    stem = "rafdb_" + os.path.splitext(os.path.basename(record.path))[0].replace(
        "_aligned", "")
  else:
    # AffectNet's file names repeat between train_set and val_set.
    stem = (f"{dataset}_{record.split or 'all'}_"
            f"{os.path.splitext(os.path.basename(record.path))[0]}")
  return f"{record.expression}/{stem}.png"


def summarize(records: Sequence[Record]) -> dict:
  """Counts per class and split, and the number of known subjects."""
  per_class = collections.Counter(r.expression for r in records)
  per_split = collections.Counter(r.split or "none" for r in records)
  table = {e: {} for e in contract.EXPRESSIONS if per_class[e]}
  for r in records:
    row = table[r.expression]
    row[r.split or "none"] = row.get(r.split or "none", 0) + 1
  return {
      "num_images": len(records),
      "per_class": {e: per_class[e] for e in contract.EXPRESSIONS if per_class[e]},
      "per_split": dict(sorted(per_split.items())),
      "per_class_split": table,
      "num_subjects": len({r.subject for r in records if r.subject}),
  }


def format_summary(title: str, summary: dict, skipped: dict | None = None) -> str:
  """A small table of counts per class and split, then subjects and skips."""
  splits = list(summary["per_split"])
  lines = [f"{title}: {summary['num_images']} images"]
  names = ["images"] if splits == ["none"] else splits
  header = f"  {'class':<10}" + "".join(f"{s:>8}" for s in names)
  if len(splits) > 1:
    header += f"{'total':>8}"
  lines.append(header)
  for expression, row in summary["per_class_split"].items():
    line = f"  {expression:<10}" + "".join(f"{row.get(s, 0):>8}" for s in splits)
    if len(splits) > 1:
      line += f"{sum(row.values()):>8}"
    lines.append(line)
  n = summary["num_subjects"]
  lines.append(f"  subjects: {n}" if n else
               "  subjects: none known (k-fold splits are stratified over images)")
  if "none" not in summary["per_split"]:
    lines.append("  split: official train/test")
  for reason, count in sorted((skipped or {}).items()):
    lines.append(f"  skipped {count}: {reason}")
  return "\n".join(lines)
