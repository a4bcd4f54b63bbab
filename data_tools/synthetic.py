"""The built-in synthetic face set: cartoon faces with identities and action units.

Renders 112x112 8-bit grayscale faces of many synthetic subjects showing the seven
canonical expressions, and writes them in the on-disk data contract
(`DIR/<expression>/<subject>_<expression>_<k>.png` plus `DIR/manifest.csv`), with a
contact sheet for people to look at.

It is meant to be a fair test of what DICE-FER claims, so it has the three things
that make real facial expression recognition hard:
- expressions built from facial action units (AUs) following the EMFACS
  prototypes, at random (often subtle) intensity and with occasional missing AUs,
  plus per-subject idiosyncrasies in how each expression is produced;
- nuisance: pose (yaw-like feature shift), scale and rotation jitter, lighting
  gradients, blur and sensor noise;
- identity confounders: resting traits that look like expression cues (a mouth
  that curves up or down, low or oblique brows, wide or narrow eyes, deep
  nasolabial folds, parted lips, thin lips), so a classifier that learns who a
  person is can be misled on people it has not seen.

Usage:
  python -m data_tools.synthetic --output_dir=DIR [--num_subjects=60]
      [--images_per_cell=10] [--seed=0] [--workers=N] [--overwrite]
      [--confounders=1.0] [--expressions_per_subject=7]
      [--attribute_strength=0] [--clean_fraction=0.4]

`--confounders=0` renders the same people without their misleading resting
traits (an ablation: how much of a classifier's seen/unseen gap they cause).
`python -m data_tools.synthetic_probe --data_dir=DIR` measures that gap.

The confounded benchmark (experiments/configs/confounded.py) adds what real sets
such as CK+ and Oulu-CASIA have: who a person is predicts their expression.
- `--expressions_per_subject=K` (1..7; 7 = every expression, the default): each
  subject shows a seeded subset of K expressions, with uneven counts (its K x
  images_per_cell images split by a seeded Dirichlet, at least one each); every
  expression is still shown by at least two subjects.
- `--attribute_strength=s` (0..1; 0 = off, the default): an appearance attribute
  (glasses or long hair, drawn by the renderer as always) goes with one half of
  the expressions in a confounded cohort of subjects: those with it show mostly
  anger, disgust, fear and sadness, those without mostly the rest; s sets how
  exclusively (1: only). The other `--clean_fraction` of the subjects (default
  0.4) show expressions regardless of the attribute. The manifest pins the
  confounded cohort to training (`split=train`, the rest empty), so
  dicefer_jax.splits folds over, and tests on, the clean cohort only: a
  classifier that takes the attribute as a shortcut fails there.
data_tools/synthetic_subjects.py (`plan_subjects`) states the exact rules. With
both options off the set is byte for byte the balanced set of earlier versions.

Library use (the training code, when no data directory is configured):
  from data_tools.synthetic import ensure_synthetic
  data_dir = ensure_synthetic("/tmp/faces", num_subjects=60, images_per_cell=10,
                              seed=0)

Every image's random stream is derived from (seed, subject, expression, k), so the
output is byte-identical for a seed whatever the number of workers.

This module writes sets; the people and their action units are
data_tools/synthetic_subjects.py, drawing them data_tools/synthetic_faces.py
(on data_tools/synthetic_canvas.py). The names other code uses
(`make_subject(s)`, `render_face`, `image_rng`, `SubjectParams`, ...) are
importable from here too.
"""

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import re
import sys
import time
from typing import Callable, Optional, Sequence

import cv2
import numpy as np

# Also this module's API (tests and scripts import them from here): the
# renderer used to live in this file.
from data_tools.synthetic_canvas import SIZE
from data_tools.synthetic_faces import render_face
from data_tools.synthetic_subjects import AUS  # pylint: disable=unused-import
from data_tools.synthetic_subjects import expression_aus  # pylint: disable=unused-import
from data_tools.synthetic_subjects import image_rng
from data_tools.synthetic_subjects import make_subject  # pylint: disable=unused-import
from data_tools.synthetic_subjects import make_subjects
from data_tools.synthetic_subjects import MIN_SUBJECTS_PER_EXPRESSION
from data_tools.synthetic_subjects import NUM_AUS  # pylint: disable=unused-import
from data_tools.synthetic_subjects import plan_subjects
from data_tools.synthetic_subjects import PROTOTYPES  # pylint: disable=unused-import
from data_tools.synthetic_subjects import round_half_up
from data_tools.synthetic_subjects import SubjectParams
from data_tools.synthetic_subjects import SubjectPlan
from dicefer_jax import contract
from dicefer_jax import fileio
from dicefer_jax.errors import UserError

# Bump when what is drawn changes (synthetic_subjects, synthetic_faces or
# synthetic_canvas): ensure_synthetic regenerates sets made by another version
# instead of silently reusing them. tests/test_synthetic.py pins the pixels of
# this version.
RENDER_VERSION = 1
SOURCE = "synthetic"
PARAMS_NAME = "synthetic.json"
CONTACT_SHEET_NAME = "contact_sheet.png"
INTENSITY_RANGE = (0.3, 1.0)
# The confounded benchmark's options, at their "off" values (the balanced set).
# Recorded in synthetic.json only when on, so that the parameters of a balanced
# set, and so ensure_synthetic's reuse of sets cached by earlier versions, are
# unchanged; clean_fraction only matters (and is recorded) with an attribute.
ALL_EXPRESSIONS = len(contract.EXPRESSIONS)
NO_ATTRIBUTE = 0.0
DEFAULT_CLEAN_FRACTION = 0.4
_OPTION_KEYS = ("expressions_per_subject", "attribute_strength", "clean_fraction")

# Temporary files of interrupted writes, by their name: fileio's (`.tmp-<pid>-
# <hex>-<name>`), and those of earlier versions: the params file's
# (`.synthetic.json.tmp`) and contract.write_manifest's (`.manifest.<random>.csv`).
_LEGACY_PARAMS_TEMP = f".{PARAMS_NAME}.tmp"
_MANIFEST_TEMP = re.compile(r"^\.manifest\..+\.csv$")


def image_relpath(subject_id: str, expression: str, k: int) -> str:
  return f"{expression}/{subject_id}_{expression}_{k}.png"


def _planned_relpaths(plans: Sequence[SubjectPlan]) -> list[str]:
  return [image_relpath(p.subject_id, e, k) for p in plans
          for e, n in zip(contract.EXPRESSIONS, p.counts) for k in range(n)]


def _plans(num_subjects: int, images_per_cell: int, seed: int, confounders: float,
           expressions_per_subject: int, attribute_strength: float,
           clean_fraction: float,
           subjects: Optional[Sequence[SubjectParams]] = None) -> list[SubjectPlan]:
  """Which images each subject gets (synthetic_subjects.plan_subjects)."""
  if subjects is None:
    subjects = make_subjects(num_subjects, seed, confounders)
  return plan_subjects(list(subjects), images_per_cell, seed, expressions_per_subject,
                       attribute_strength, clean_fraction)


def _render_subject(job) -> tuple[list[dict], float]:
  """Renders and writes all images of one subject (runs in a worker process)."""
  output_dir, subject, plan, seed = job
  cv2.setNumThreads(1)  # one worker, one core
  start = time.perf_counter()
  rows = []
  split = "train" if plan.pinned else ""
  for expression, count in zip(contract.EXPRESSIONS, plan.counts):
    for k in range(count):
      rng = image_rng(seed, subject.index, expression, k)
      intensity = 0.0
      if expression != "neutral":
        intensity = float(rng.uniform(*INTENSITY_RANGE))
      img = render_face(subject, expression, intensity, rng)
      rel = image_relpath(subject.subject_id, expression, k)
      ok, buf = cv2.imencode(".png", img)
      if not ok:
        raise OSError(f"could not encode {rel}")
      fileio.write_bytes_atomic(os.path.join(output_dir, rel), buf.tobytes())
      rows.append({"path": rel, "expression": expression,
                   "subject": subject.subject_id, "source": SOURCE, "split": split,
                   "intensity": f"{intensity:.3f}"})
  return rows, time.perf_counter() - start


def _read_params(output_dir: str) -> Optional[dict]:
  path = os.path.join(output_dir, PARAMS_NAME)
  try:
    with open(path) as f:
      params = json.load(f)
  except (OSError, ValueError):
    return None
  if not isinstance(params, dict) or params.get("generator") != "data_tools.synthetic":
    return None
  return params


def _write_params(output_dir: str, params: dict):
  fileio.write_json_atomic(os.path.join(output_dir, PARAMS_NAME), params,
                           sort_keys=True)


def _recorded_plans(params: dict) -> list[SubjectPlan]:
  """The plans of the run that recorded these parameters ([] if unreadable)."""
  try:
    return _plans(int(params["num_subjects"]), int(params["images_per_cell"]),
                  int(params["seed"]), float(params.get("confounders", 1.0)),
                  int(params.get("expressions_per_subject", ALL_EXPRESSIONS)),
                  float(params.get("attribute_strength", NO_ATTRIBUTE)),
                  float(params.get("clean_fraction", DEFAULT_CLEAN_FRACTION)))
  except (KeyError, TypeError, ValueError, UserError):
    return []


def _recorded_relpaths(params: dict) -> list[str]:
  """The images a run with these recorded parameters wrote ([] if unreadable)."""
  return _planned_relpaths(_recorded_plans(params))


def _wanted_params(num_subjects, images_per_cell, seed, confounders,
                   expressions_per_subject=ALL_EXPRESSIONS,
                   attribute_strength=NO_ATTRIBUTE,
                   clean_fraction=DEFAULT_CLEAN_FRACTION) -> dict:
  params = {"generator": "data_tools.synthetic", "version": RENDER_VERSION,
            "num_subjects": int(num_subjects), "images_per_cell": int(images_per_cell),
            "seed": int(seed), "confounders": float(confounders)}
  if int(expressions_per_subject) != ALL_EXPRESSIONS:
    params["expressions_per_subject"] = int(expressions_per_subject)
  if float(attribute_strength) != NO_ATTRIBUTE:
    params["attribute_strength"] = float(attribute_strength)
    params["clean_fraction"] = float(clean_fraction)
  return params


def _temp_target(name: str) -> Optional[str]:
  """The file a temporary file named `name` was to become, or None if `name`
  is not one of the three kinds of temporary name above."""
  if fileio.is_temp_name(name):
    parts = name.split("-", 3)  # .tmp, pid, random, target
    return parts[3] if len(parts) == 4 else None
  if name == _LEGACY_PARAMS_TEMP:
    return PARAMS_NAME
  if _MANIFEST_TEMP.match(name):
    return contract.MANIFEST_NAME
  return None


def _existing_entries(output_dir: str) -> list[str]:
  """Files under output_dir (relative paths); empty folders do not count, nor
  do temporary files an interrupted write left (they never hold a finished file,
  and must not make a directory look foreign or busy)."""
  found = []
  for root, _, files in os.walk(output_dir):
    for name in files:
      if _temp_target(name) is None:
        found.append(os.path.relpath(os.path.join(root, name), output_dir))
  return sorted(found)


def _remove_own_temp_files(output_dir: str, own_paths: set[str]):
  """Deletes temporary files that were to become one of `own_paths` (relative).

  Left by an interrupted run of this generator. Only in its own folders and
  only for its own file names, so nothing another tool is writing is touched.
  """
  for folder in ("",) + contract.EXPRESSIONS:
    path = os.path.join(output_dir, folder)
    if not os.path.isdir(path):
      continue
    for name in os.listdir(path):
      target = _temp_target(name)
      if target is not None and os.path.join(folder, target) in own_paths:
        os.remove(os.path.join(path, name))


def _check_args(num_subjects: int, images_per_cell: int, confounders: float,
                expressions_per_subject=ALL_EXPRESSIONS, attribute_strength=NO_ATTRIBUTE,
                clean_fraction=DEFAULT_CLEAN_FRACTION):
  if num_subjects < 1 or num_subjects > 1000:
    raise UserError(f"--num_subjects={num_subjects}: use 1 to 1000 subjects")
  if images_per_cell < 1:
    raise UserError(f"--images_per_cell={images_per_cell}: use at least 1 image "
                    "per subject and expression")
  if not 0.0 <= confounders <= 3.0:
    raise UserError(f"--confounders={confounders}: use a scale from 0 (no identity "
                    "confounders) to 3")
  k = expressions_per_subject
  if isinstance(k, bool) or int(k) != k or not 1 <= k <= ALL_EXPRESSIONS:
    raise UserError(f"--expressions_per_subject={k}: use a whole number from 1 to "
                    f"{ALL_EXPRESSIONS} ({ALL_EXPRESSIONS} = every subject shows every "
                    "expression)")
  needed = MIN_SUBJECTS_PER_EXPRESSION * ALL_EXPRESSIONS
  if k < ALL_EXPRESSIONS and num_subjects * k < needed:
    raise UserError(
        f"--expressions_per_subject={int(k)} with --num_subjects={num_subjects} "
        f"gives {num_subjects * int(k)} (subject, expression) pairs, fewer than the "
        f"{needed} that let every expression be shown by two subjects: raise either")
  if not 0.0 <= attribute_strength <= 1.0:
    raise UserError(f"--attribute_strength={attribute_strength}: use 0 (no "
                    "attribute) to 1 (the attribute decides the expression half)")
  if not 0.0 < clean_fraction < 1.0:
    raise UserError(f"--clean_fraction={clean_fraction}: use a fraction strictly "
                    "between 0 and 1 of the subjects for the clean (tested) cohort")
  num_clean = round_half_up(clean_fraction * num_subjects)
  if attribute_strength > 0 and not 0 < num_clean < num_subjects:
    raise UserError(
        f"--clean_fraction={clean_fraction} of {num_subjects} subjects leaves "
        f"{num_clean} clean and {num_subjects - num_clean} confounded: both cohorts "
        "need a subject; change --clean_fraction or --num_subjects")


@dataclasses.dataclass(frozen=True)
class GenerateStats:
  num_images: int
  seconds: float
  images_per_second: float        # wall clock, all workers
  images_per_core_second: float   # rendering + PNG writing, per busy core
  workers: int


def generate(output_dir: str, num_subjects: int = 60, images_per_cell: int = 10,
             seed: int = 0, *, confounders: float = 1.0,
             expressions_per_subject: int = ALL_EXPRESSIONS,
             attribute_strength: float = NO_ATTRIBUTE,
             clean_fraction: float = DEFAULT_CLEAN_FRACTION, workers: int = 0,
             overwrite: bool = False,
             log: Optional[Callable[[str], None]] = None) -> GenerateStats:
  """Writes a synthetic face set into output_dir.

  Refuses (UserError) a directory that already holds files unless `overwrite`;
  even then it deletes only images that an earlier run of this generator wrote
  there (computed from that run's recorded parameters) and temporary files an
  interrupted run left for its own file names, never anything else. Every file
  is written atomically (fileio), so a killed run leaves no truncated image.
  `expressions_per_subject`, `attribute_strength` and `clean_fraction` make the
  confounded benchmark (module docstring); left at their defaults, the set is
  the balanced one.
  """
  options = (expressions_per_subject, attribute_strength, clean_fraction)
  _check_args(num_subjects, images_per_cell, confounders, *options)
  output_dir = os.path.abspath(output_dir)
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise UserError(f"--output_dir={output_dir} is a file, not a directory")
  existing = _existing_entries(output_dir) if os.path.isdir(output_dir) else []
  if existing and not overwrite:
    if os.path.isfile(os.path.join(output_dir, contract.MANIFEST_NAME)):
      what = f"already holds a face set ({contract.MANIFEST_NAME})"
    else:
      what = f"already holds {len(existing)} file(s), e.g. {existing[0]!r}"
    raise UserError(f"output directory {output_dir} {what}: pass --overwrite to "
                    "write into it anyway, or choose a new --output_dir")

  subjects = make_subjects(num_subjects, seed, confounders)
  plans = _plans(num_subjects, images_per_cell, seed, confounders, *options,
                 subjects=subjects)
  new_paths = _planned_relpaths(plans)
  old = _read_params(output_dir) if existing else None
  if existing and old is None:
    # Not a set this tool wrote: --overwrite may add files beside others but
    # never replaces one of them (a preprocessed set's manifest, say).
    ours = set(new_paths) | {contract.MANIFEST_NAME, CONTACT_SHEET_NAME, PARAMS_NAME}
    clash = [p for p in existing if p in ours]
    if clash:
      raise UserError(
          f"output directory {output_dir} holds {clash[0]!r}, which "
          "data_tools.synthetic did not write and would replace: choose a new "
          "--output_dir")
  if old is not None or not existing:
    # Our own directory (or one holding nothing but temporary files): remove
    # the stale images of an earlier, larger run and the temporary files of an
    # interrupted one.
    old_paths = _recorded_relpaths(old) if old is not None else []
    for rel in sorted(set(old_paths) - set(new_paths)):
      path = os.path.join(output_dir, rel)
      if os.path.isfile(path):
        os.remove(path)
    _remove_own_temp_files(output_dir, set(old_paths) | set(new_paths) | {
        contract.MANIFEST_NAME, CONTACT_SHEET_NAME, PARAMS_NAME})

  os.makedirs(output_dir, exist_ok=True)
  for expression in contract.EXPRESSIONS:
    os.makedirs(os.path.join(output_dir, expression), exist_ok=True)
  params = _wanted_params(num_subjects, images_per_cell, seed, confounders, *options)
  # Marked incomplete until the manifest is in place, so an interrupted run is
  # recognised as ours (and redone) rather than reused.
  _write_params(output_dir, dict(params, complete=False))

  jobs = [(output_dir, s, p, seed) for s, p in zip(subjects, plans)]
  workers = min(workers or fileio.default_workers(), len(jobs))
  start = time.perf_counter()
  rows_by_subject: list[list[dict]] = []
  busy = 0.0
  if workers <= 1:
    for job in jobs:
      rows, seconds = _render_subject(job)
      rows_by_subject.append(rows)
      busy += seconds
  else:
    # spawn, not fork: the caller may be a training process with JAX or
    # TensorFlow threads running, and forking those can deadlock.
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
      for rows, seconds in pool.map(_render_subject, jobs):
        rows_by_subject.append(rows)
        busy += seconds
  elapsed = time.perf_counter() - start

  records = [row for rows in rows_by_subject for row in rows]
  contract.write_manifest(output_dir, records, extra_fields=("intensity",))
  write_contact_sheet(output_dir, subjects[:12], images_per_cell)
  _write_params(output_dir, dict(params, complete=True, num_images=len(records)))
  stats = GenerateStats(
      num_images=len(records), seconds=elapsed,
      images_per_second=len(records) / max(elapsed, 1e-9),
      images_per_core_second=len(records) / max(busy, 1e-9), workers=workers)
  if log:
    log(f"wrote {stats.num_images} images of {num_subjects} subjects to {output_dir} "
        f"in {elapsed:.1f} s: {stats.images_per_second:.0f} images/s with "
        f"{workers} worker(s), {stats.images_per_core_second:.0f} images/s per core")
    pinned = sum(p.pinned for p in plans)
    if pinned:
      log(f"{pinned} confounded subjects pinned to training (split=train); "
          f"{num_subjects - pinned} clean subjects for the folds")
  return stats


def write_contact_sheet(output_dir: str, subjects: Sequence[SubjectParams],
                        images_per_cell: int) -> str:
  """A grid of image k=0: one row per subject, one column per expression (left
  white where the subject does not show the expression)."""
  del images_per_cell  # k = 0 exists wherever the subject shows the expression
  tile, label_w, header_h = SIZE, 44, 22
  sheet = np.full((header_h + tile * len(subjects), label_w + tile * contract.NUM_CLASSES),
                  255, np.uint8)
  font = cv2.FONT_HERSHEY_SIMPLEX
  for j, expression in enumerate(contract.EXPRESSIONS):
    cv2.putText(sheet, expression, (label_w + j * tile + 4, 15), font, 0.42, 0, 1,
                cv2.LINE_AA)
  for i, subject in enumerate(subjects):
    y = header_h + i * tile
    cv2.putText(sheet, subject.subject_id, (3, y + tile // 2 + 4), font, 0.4, 0, 1,
                cv2.LINE_AA)
    for j, expression in enumerate(contract.EXPRESSIONS):
      path = os.path.join(output_dir, image_relpath(subject.subject_id, expression, 0))
      # Checked first: OpenCV warns on stderr about every file it cannot open.
      img = cv2.imread(path, cv2.IMREAD_GRAYSCALE) if os.path.isfile(path) else None
      if img is not None:
        sheet[y:y + tile, label_w + j * tile:label_w + (j + 1) * tile] = img
  path = os.path.join(output_dir, CONTACT_SHEET_NAME)
  ok, buf = cv2.imencode(".png", sheet)
  if not ok:
    raise OSError(f"could not encode {path}")
  fileio.write_bytes_atomic(path, buf.tobytes())
  return path


def _is_complete(output_dir: str, params: dict) -> bool:
  """True when output_dir holds a finished set made with exactly these params."""
  old = _read_params(output_dir)
  if old is None or not old.get("complete"):
    return False
  # The option keys are compared even when absent from one side: a set made
  # with an option on must not stand in for the balanced set, nor vice versa.
  if any(old.get(k) != params.get(k) for k in set(params) | set(_OPTION_KEYS)):
    return False
  try:
    records = contract.read_manifest(output_dir, check_files=True)
  except UserError:
    return False
  expected = len(_recorded_relpaths(params))
  return len(records) == expected and all(r.source == SOURCE for r in records)


def ensure_synthetic(output_dir: str, num_subjects: int = 60,
                     images_per_cell: int = 10, seed: int = 0, *,
                     confounders: float = 1.0,
                     expressions_per_subject: int = ALL_EXPRESSIONS,
                     attribute_strength: float = NO_ATTRIBUTE,
                     clean_fraction: float = DEFAULT_CLEAN_FRACTION, workers: int = 1,
                     log: Optional[Callable[[str], None]] = None) -> str:
  """Returns a directory holding the synthetic set, generating it only if needed.

  Reuses a complete set made there with the same parameters (recorded in
  synthetic.json beside the manifest); regenerates one this generator made with
  other parameters or left unfinished; refuses (UserError) a directory holding
  anything else. One worker by default: the default set takes about 10 s on one
  core, and worker processes would re-import the caller's main module (JAX,
  TensorFlow) to start.
  """
  options = (expressions_per_subject, attribute_strength, clean_fraction)
  _check_args(num_subjects, images_per_cell, confounders, *options)
  output_dir = os.path.abspath(output_dir)
  params = _wanted_params(num_subjects, images_per_cell, seed, confounders, *options)
  if _is_complete(output_dir, params):
    return output_dir
  if os.path.isdir(output_dir) and _existing_entries(output_dir) \
      and _read_params(output_dir) is None:
    raise UserError(
        f"{output_dir} holds files that data_tools.synthetic did not write: point "
        "the synthetic set at an empty or new directory")
  generate(output_dir, num_subjects, images_per_cell, seed, confounders=confounders,
           expressions_per_subject=expressions_per_subject,
           attribute_strength=attribute_strength, clean_fraction=clean_fraction,
           workers=workers, overwrite=True, log=log)
  return output_dir


# ----------------------------------------------------------------------------
# Command line.

def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("output_dir", None, "Directory to write the face set into.")
  flags.DEFINE_integer("num_subjects", 60, "Number of synthetic people.")
  flags.DEFINE_integer("images_per_cell", 10,
                       "Images per (subject, expression) pair.")
  flags.DEFINE_integer("seed", 0, "Random seed; the output is a function of it.")
  flags.DEFINE_integer("workers", 0, "Worker processes (0: one per available core).")
  flags.DEFINE_float("confounders", 1.0,
                     "Scale of the identity confounders (0 turns them off).")
  flags.DEFINE_integer("expressions_per_subject", ALL_EXPRESSIONS,
                       "Expressions each subject shows (1-7), with uneven counts; "
                       "7 = every expression, images_per_cell each.")
  flags.DEFINE_float("attribute_strength", NO_ATTRIBUTE,
                     "0-1: how exclusively the confounded cohort's attribute (glasses "
                     "or long hair) picks its half of the expressions; 0 = off.")
  flags.DEFINE_float("clean_fraction", DEFAULT_CLEAN_FRACTION,
                     "With --attribute_strength: fraction of subjects in the clean, "
                     "tested cohort; the rest are pinned to training (split=train).")
  flags.DEFINE_bool("overwrite", False,
                    "Write into a directory that already holds files (only files "
                    "this tool wrote are ever deleted).")
  flags.mark_flag_as_required("output_dir")
  return flags.FLAGS


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    print(f"error: unexpected arguments {' '.join(argv[1:])}", file=sys.stderr)
    sys.exit(2)
  f = FLAGS
  try:
    generate(f.output_dir, f.num_subjects, f.images_per_cell, f.seed,
             confounders=f.confounders, expressions_per_subject=f.expressions_per_subject,
             attribute_strength=f.attribute_strength, clean_fraction=f.clean_fraction,
             workers=f.workers, overwrite=f.overwrite, log=print)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  FLAGS = _define_flags()
  app.run(main)
