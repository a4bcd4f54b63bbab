"""Importers that turn public FER datasets, as their owners ship them, into face sets.

Every importer has two halves:

* `list_<name>(root, ...) -> list[Record]`: pure enumeration. It reads label files
  and directory listings only (no pixels), maps the dataset's labels onto the 7
  canonical classes of `dicefer_jax.contract.EXPRESSIONS`, keeps subject ids and
  the official train/test split where the dataset has them, and counts what it
  leaves out in an optional `skipped` Counter (reason -> count). A `Record.path`
  here names where the face comes from: the raw image file, or for FER2013 the
  CSV row that holds its pixels (`<csv>#<row>`).
* a write step (`import_dataset`): faces that are already aligned crops are
  written directly (grayscale, resized to 112x112, PNG); the others go through
  MTCNN detection and alignment (`data_tools.preprocess.run_preprocess`). Either
  way the output follows the on-disk contract: `OUT/<expression>/*.png` plus
  `OUT/manifest.csv`.

Expected layouts (ROOT is what `--root` points at):

folder     ROOT/<Expression>/*.jpg|png|...  (class folder names such as Happy,
           angry, Surprised; a contempt folder is skipped). No subjects, no
           split. -> MTCNN.
fer2013    ROOT/fer2013.csv (also ROOT/fer2013/fer2013.csv, or --root=the CSV),
           columns emotion,pixels,Usage; 48x48 pixels as space-separated ints;
           emotion 0 Angry 1 Disgust 2 Fear 3 Happy 4 Sad 5 Surprise 6 Neutral;
           Usage Training -> train, PublicTest and PrivateTest -> test. No
           subjects. Upsampled to 112 (bicubic) and written directly.
rafdb      RAF-DB basic: ROOT/EmoLabel/list_patition_label.txt (sic) with lines
           `train_00001.jpg 5` and ROOT/Image/aligned/train_00001_aligned.jpg
           (100x100 aligned colour); ROOT may be `basic/` or the folder above it.
           Labels 1 Surprise 2 Fear 3 Disgust 4 Happiness 5 Sadness 6 Anger
           7 Neutral; split from the train_/test_ prefix. No subjects. Resized
           to 112 (bicubic) and written directly.
ckplus     CK+: ROOT/cohn-kanade-images/S005/001/S005_001_00000001.png and
           ROOT/Emotion/S005/001/S005_001_00000011_emotion.txt (also
           ROOT/Emotion_labels/Emotion/) holding one float code: 0 neutral
           1 anger 2 contempt (dropped) 3 disgust 4 fear 5 happy 6 sadness
           7 surprise. Per labelled sequence the last 3 frames are the
           expression and the first frame is neutral; sequences without an
           emotion file are skipped. Subject = S###. No split. -> MTCNN.
oulu       Oulu-CASIA NIR&VIS: ROOT/VL/Strong/P001/Anger/000.jpeg (also
           ROOT/OriginalImg/VL/...); classes Anger Disgust Fear Happiness
           Sadness Surprise. The last 3 frames of each sequence (sorted by file
           name) are the expression. Neutral (the first frame) only with
           include_neutral: the paper's 6-class protocol has no neutral class.
           Subject = P###. No split. -> MTCNN.
affectnet  either the common re-distribution ROOT/train_set/images/N.jpg with
           ROOT/train_set/annotations/N_exp.npy (and val_set likewise), or the
           official CSV form ROOT/training.csv and ROOT/validation.csv (also
           under Manually_Annotated_file_lists/) with images under
           ROOT/Manually_Annotated_Images/<subDirectory_filePath> (also
           under Manually_Annotated/ or Manually_Annotated_compressed/). Codes
           0 Neutral 1 Happy 2 Sad 3 Surprise 4 Fear 5 Disgust 6 Anger;
           7 Contempt and 8-10 None/Uncertain/Non-Face are dropped. train_set
           and training.csv -> train, val_set and validation.csv -> test. No
           subjects. -> MTCNN, or with aligned=True written directly (the
           re-distribution's crops resized; the CSV form cropped to its face
           box first).

Inputs are never modified: outputs go to a separate directory, and a directory
that already holds files is only written with resume (keep the faces already
written, do the rest, rewrite the manifest at the end) or, for direct writers,
overwrite (write every face again). MTCNN runs resume through their own work log
(see data_tools.preprocess), so overwrite does not apply to them.
"""

import collections
import concurrent.futures
import csv
import dataclasses
import os
import re
import sys
from typing import Callable, Iterable, Sequence

import cv2
import numpy as np

from data_tools import labels
from dicefer_jax import contract
from dicefer_jax.contract import Record
from dicefer_jax.errors import DataError, UserError

DATASETS = ("folder", "fer2013", "rafdb", "ckplus", "oulu", "affectnet")
TITLES = {
    "folder": "image folder", "fer2013": "FER2013", "rafdb": "RAF-DB",
    "ckplus": "CK+", "oulu": "Oulu-CASIA", "affectnet": "AffectNet",
}
# Importers whose faces are aligned crops already and skip MTCNN by default.
DIRECT = ("fer2013", "rafdb")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# Label codes of each dataset -> canonical class; None marks a class the 7-class
# protocol drops (contempt and AffectNet's non-expression codes).
FER2013_CODES = {0: "anger", 1: "disgust", 2: "fear", 3: "happiness", 4: "sadness",
                 5: "surprise", 6: "neutral"}
FER2013_USAGE = {"Training": "train", "PublicTest": "test", "PrivateTest": "test"}
RAFDB_CODES = {1: "surprise", 2: "fear", 3: "disgust", 4: "happiness", 5: "sadness",
               6: "anger", 7: "neutral"}
CKPLUS_CODES = {0: "neutral", 1: "anger", 2: None, 3: "disgust", 4: "fear",
                5: "happiness", 6: "sadness", 7: "surprise"}
OULU_CLASSES = {"anger": "anger", "disgust": "disgust", "fear": "fear",
                "happiness": "happiness", "sadness": "sadness", "surprise": "surprise"}
AFFECTNET_CODES = {0: "neutral", 1: "happiness", 2: "sadness", 3: "surprise",
                   4: "fear", 5: "disgust", 6: "anger", 7: None, 8: None, 9: None,
                   10: None}
AFFECTNET_DROPPED = {7: "contempt (no canonical class)", 8: "AffectNet code 8 (None)",
                     9: "AffectNet code 9 (Uncertain)", 10: "AffectNet code 10 (Non-Face)"}

# Peak frames taken from the end of each CK+ / Oulu-CASIA sequence: the
# sequences run from neutral onset to apex, so only the last frames show the
# expression at full intensity.
PEAK_FRAMES = 3


def _skip(skipped: collections.Counter | None, reason: str, n: int = 1) -> None:
  if skipped is not None and n:
    skipped[reason] += n


def _natural_key(name: str) -> list:
  """Sort key that orders `frame2` before `frame10` (zero padding is not universal)."""
  return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _is_image(name: str) -> bool:
  return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _subdirs(path: str) -> list[str]:
  """Visible sub-directories, naturally sorted (macOS archives add .DS_Store etc.)."""
  return sorted((d for d in os.listdir(path)
                 if not d.startswith(".") and os.path.isdir(os.path.join(path, d))),
                key=_natural_key)


def _images(path: str) -> list[str]:
  return sorted((f for f in os.listdir(path)
                 if _is_image(f) and os.path.isfile(os.path.join(path, f))),
                key=_natural_key)


def _check_root(root: str, title: str) -> str:
  if not root:
    raise UserError(f"{title}: pass --root=DIR, the folder the dataset was unpacked into")
  if not os.path.exists(root):
    raise DataError(f"{title}: --root {root} does not exist")
  return os.path.abspath(root)


def _first_existing(candidates: Iterable[str], isdir: bool = True) -> str | None:
  for c in candidates:
    if (os.path.isdir(c) if isdir else os.path.isfile(c)):
      return c
  return None


# ---------------------------------------------------------------------------
# Enumeration.
# ---------------------------------------------------------------------------


def list_folder(root: str, *, skipped: collections.Counter | None = None) -> list[Record]:
  """`ROOT/<Expression>/*.jpg`: class folder names mapped by canonical_expression.

  Images in nested sub-folders of a class folder count too. Subjects are unknown.
  """
  root = _check_root(root, "folder")
  if not os.path.isdir(root):
    raise DataError(f"folder: expected a directory of class folders, got the file {root}")
  records = []
  class_dirs = _subdirs(root)
  if not class_dirs:
    raise DataError(
        f"folder: expected one sub-folder per expression (e.g. {root}/Happy/*.jpg) "
        f"under {root}; found none")
  for name in class_dirs:
    try:
      expression = labels.canonical_expression(name)
    except DataError as e:
      raise DataError(f"folder: class folder {os.path.join(root, name)}: {e}") from None
    files = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, name)):
      dirnames[:] = sorted((d for d in dirnames if not d.startswith(".")),
                           key=_natural_key)
      files.extend(os.path.join(dirpath, f)
                   for f in sorted(filenames, key=_natural_key) if _is_image(f))
    if expression is None:
      _skip(skipped, f"class folder {name!r} is dropped (not one of the 7 classes)",
            len(files))
      continue
    records.extend(Record(path=f, expression=expression, source="folder") for f in files)
  if not records and not (skipped and sum(skipped.values())):
    raise DataError(f"folder: the class folders under {root} hold no images "
                    f"({', '.join(IMAGE_EXTENSIONS)})")
  return records


def _fer2013_csv(root: str) -> str:
  root = _check_root(root, "FER2013")
  if os.path.isfile(root):
    return root
  found = _first_existing(
      [os.path.join(root, "fer2013.csv"), os.path.join(root, "fer2013", "fer2013.csv"),
       os.path.join(root, "icml_face_data.csv")], isdir=False)
  if found is None:
    raise DataError(f"FER2013: expected fer2013.csv (columns emotion,pixels,Usage) "
                    f"under {root}")
  return found


def _fer2013_rows(csv_path: str):
  """Yields (row index, emotion, pixels string, usage) of every data row."""
  with open(csv_path, newline="") as f:
    reader = csv.reader(f)
    header = [h.strip().lower() for h in next(reader, [])]
    missing = [c for c in ("emotion", "pixels", "usage") if c not in header]
    if missing:
      raise DataError(
          f"FER2013: {csv_path} lacks the column(s) {', '.join(missing)}: expected "
          "the header emotion,pixels,Usage")
    ie, ip, iu = header.index("emotion"), header.index("pixels"), header.index("usage")
    for i, row in enumerate(reader):
      if not row:
        continue
      if len(row) <= max(ie, ip, iu):
        yield i, "", "", ""
        continue
      yield i, row[ie].strip(), row[ip], row[iu].strip()


def _fer2013_pixels(text: str) -> np.ndarray | None:
  try:
    values = np.array(text.split(), dtype=np.int64)
  except ValueError:
    return None
  if values.size != 48 * 48 or values.min() < 0 or values.max() > 255:
    return None
  return values.astype(np.uint8).reshape(48, 48)


def list_fer2013(root: str, *, skipped: collections.Counter | None = None) -> list[Record]:
  """Rows of fer2013.csv; `path` is `<csv>#<row>` (row = 0-based data row)."""
  csv_path = _fer2013_csv(root)
  records = []
  for i, emotion, pixels, usage in _fer2013_rows(csv_path):
    try:
      expression = FER2013_CODES[int(emotion)]
    except (KeyError, ValueError):
      _skip(skipped, "unknown emotion code")
      continue
    if usage not in FER2013_USAGE:
      _skip(skipped, "unknown Usage")
      continue
    # Count the pixel string's tokens only; decoding waits for the write step.
    if len(pixels.split()) != 48 * 48:
      _skip(skipped, "pixels are not 48x48")
      continue
    records.append(Record(path=f"{csv_path}#{i}", expression=expression,
                          source="fer2013", split=FER2013_USAGE[usage]))
  if not records and not (skipped and sum(skipped.values())):
    raise DataError(f"FER2013: {csv_path} holds no rows")
  return records


def _rafdb_root(root: str) -> str:
  root = _check_root(root, "RAF-DB")
  found = _first_existing(
      [os.path.join(root, "EmoLabel", "list_patition_label.txt"),
       os.path.join(root, "basic", "EmoLabel", "list_patition_label.txt")], isdir=False)
  if found is None:
    raise DataError(f"RAF-DB: expected EmoLabel/list_patition_label.txt under {root} "
                    "(point --root at RAF-DB's basic/ folder)")
  return os.path.dirname(os.path.dirname(found))


def list_rafdb(root: str, *, skipped: collections.Counter | None = None) -> list[Record]:
  """RAF-DB basic: label file lines `train_00001.jpg 5` -> aligned 100x100 images."""
  base = _rafdb_root(root)
  label_file = os.path.join(base, "EmoLabel", "list_patition_label.txt")
  image_dir = os.path.join(base, "Image", "aligned")
  if not os.path.isdir(image_dir):
    raise DataError(f"RAF-DB: expected the aligned faces in Image/aligned/ under {base}")
  records = []
  with open(label_file) as f:
    for line_no, line in enumerate(f, start=1):
      parts = line.split()
      if not parts:
        continue
      if len(parts) != 2 or not parts[1].isdigit():
        raise DataError(f"RAF-DB: {label_file} line {line_no}: expected "
                        f"'train_00001.jpg 5', got {line.strip()!r}")
      name, code = parts[0], int(parts[1])
      if code not in RAFDB_CODES:
        raise DataError(f"RAF-DB: {label_file} line {line_no}: label {code} is not "
                        "in 1..7")
      split = name.split("_", 1)[0]
      if split not in ("train", "test"):
        raise DataError(f"RAF-DB: {label_file} line {line_no}: {name!r} starts with "
                        "neither train_ nor test_")
      stem, ext = os.path.splitext(name)
      path = os.path.join(image_dir, f"{stem}_aligned{ext}")
      if not os.path.isfile(path):
        _skip(skipped, "aligned image missing")
        continue
      records.append(Record(path=path, expression=RAFDB_CODES[code], source="rafdb",
                            split=split))
  if not records and not (skipped and sum(skipped.values())):
    raise DataError(f"RAF-DB: {label_file} lists no images")
  return records


def _ckplus_dirs(root: str) -> tuple[str, str]:
  root = _check_root(root, "CK+")
  images = _first_existing([os.path.join(root, "cohn-kanade-images"),
                            os.path.join(root, "extended-cohn-kanade-images",
                                         "cohn-kanade-images")])
  emotion = _first_existing([os.path.join(root, "Emotion"),
                             os.path.join(root, "Emotion_labels", "Emotion")])
  if images is None or emotion is None:
    missing = " and ".join(n for n, d in (("cohn-kanade-images/", images),
                                          ("Emotion/", emotion)) if d is None)
    raise DataError(f"CK+: expected {missing} under {root} (from "
                    "extended-cohn-kanade-images.zip and Emotion_labels.zip)")
  return images, emotion


def _read_code(path: str, title: str) -> int:
  """The label code of a one-number text file such as '   3.0000000e+00'."""
  with open(path) as f:
    text = f.read().strip()
  try:
    value = float(text)
  except ValueError:
    raise DataError(f"{title}: {path} should hold one number, got {text[:40]!r}") from None
  if value != int(value):
    raise DataError(f"{title}: {path} holds {text!r}, not a whole-number code")
  return int(value)


def list_ckplus(root: str, *, skipped: collections.Counter | None = None) -> list[Record]:
  """CK+: per labelled sequence, the last 3 frames (peak) and the first (neutral)."""
  images, emotion_dir = _ckplus_dirs(root)
  records = []
  subjects = _subdirs(images)
  if not subjects:
    raise DataError(f"CK+: expected subject folders S005/... under {images}")
  for subject in subjects:
    for sequence in _subdirs(os.path.join(images, subject)):
      seq_dir = os.path.join(images, subject, sequence)
      frames = _images(seq_dir)
      label_dir = os.path.join(emotion_dir, subject, sequence)
      label_files = (sorted(f for f in os.listdir(label_dir)
                            if f.endswith("_emotion.txt") and not f.startswith("."))
                     if os.path.isdir(label_dir) else [])
      if not label_files:
        # Only 327 of CK+'s 593 sequences carry a validated emotion label.
        _skip(skipped, "sequence without an emotion file")
        continue
      code = _read_code(os.path.join(label_dir, label_files[-1]), "CK+")
      if code not in CKPLUS_CODES:
        raise DataError(f"CK+: {os.path.join(label_dir, label_files[-1])}: code "
                        f"{code} is not in 0..7")
      expression = CKPLUS_CODES[code]
      if expression is None:
        _skip(skipped, "contempt sequence (no canonical class)")
        continue
      if len(frames) < 2:
        _skip(skipped, "sequence with fewer than 2 frames")
        continue
      # Never let the neutral frame double as a peak frame in short sequences.
      peak = frames[-min(PEAK_FRAMES, len(frames) - 1):]
      def rec(frame, expr):
        return Record(path=os.path.join(seq_dir, frame), expression=expr,
                      subject=subject, source="ckplus")
      records.append(rec(frames[0], "neutral"))
      records.extend(rec(f, expression) for f in peak)
  return records


def _oulu_dir(root: str, modality: str, illumination: str) -> str:
  root = _check_root(root, "Oulu-CASIA")
  rel = os.path.join(modality, illumination)
  found = _first_existing([os.path.join(root, rel),
                           os.path.join(root, "OriginalImg", rel)])
  if found is None:
    raise DataError(f"Oulu-CASIA: expected {rel}/P001/Anger/000.jpeg ... under {root} "
                    "(or under its OriginalImg/ folder)")
  return found


def list_oulu(root: str, *, include_neutral: bool = False, modality: str = "VL",
              illumination: str = "Strong",
              skipped: collections.Counter | None = None) -> list[Record]:
  """Oulu-CASIA: the last 3 frames of each sequence; the first as neutral if asked.

  Args:
    root: the dataset folder holding VL/ (or OriginalImg/VL/).
    include_neutral: also take each sequence's first frame as neutral. Off by
      default: the paper's Oulu-CASIA protocol has 6 classes and no neutral.
    modality: VL (visible light, the usual choice) or NI (near infrared).
    illumination: Strong (the usual choice), Weak or Dark.
    skipped: filled with reason -> count for what is left out.
  """
  base = _oulu_dir(root, modality, illumination)
  subjects = _subdirs(base)
  if not subjects:
    raise DataError(f"Oulu-CASIA: expected subject folders P001 ... under {base}")
  records = []
  for subject in subjects:
    for cls in _subdirs(os.path.join(base, subject)):
      expression = OULU_CLASSES.get(cls.lower())
      seq_dir = os.path.join(base, subject, cls)
      if expression is None:
        _skip(skipped, f"unknown class folder {cls!r}")
        continue
      frames = _images(seq_dir)
      need = 2 if include_neutral else 1
      if len(frames) < need:
        _skip(skipped, f"sequence with fewer than {need} frame(s)")
        continue
      peak = frames[-min(PEAK_FRAMES, len(frames) - (1 if include_neutral else 0)):]
      if include_neutral:
        records.append(Record(path=os.path.join(seq_dir, frames[0]),
                              expression="neutral", subject=subject, source="oulu"))
      records.extend(Record(path=os.path.join(seq_dir, f), expression=expression,
                            subject=subject, source="oulu") for f in peak)
  return records


@dataclasses.dataclass(frozen=True)
class _AffectNetLayout:
  form: str  # "npy" or "csv"
  parts: tuple[tuple[str, str, str], ...]  # (split, label source, image dir)


def _affectnet_layout(root: str) -> _AffectNetLayout:
  root = _check_root(root, "AffectNet")
  parts = []
  for folder, split in (("train_set", "train"), ("val_set", "test")):
    d = os.path.join(root, folder)
    if os.path.isdir(os.path.join(d, "images")):
      parts.append((split, os.path.join(d, "annotations"), os.path.join(d, "images")))
  if parts:
    return _AffectNetLayout("npy", tuple(parts))
  lists = next((d for d in (root, os.path.join(root, "Manually_Annotated_file_lists"),
                             os.path.join(root, "Manually_Annotated",
                                          "Manually_Annotated_file_lists"))
                if os.path.isfile(os.path.join(d, "training.csv"))
                or os.path.isfile(os.path.join(d, "validation.csv"))), None)
  images = _first_existing([os.path.join(root, "Manually_Annotated_Images"),
                            os.path.join(root, "Manually_Annotated",
                                         "Manually_Annotated_Images"),
                            os.path.join(root, "Manually_Annotated_compressed",
                                         "Manually_Annotated_Images")])
  for name, split in (("training.csv", "train"), ("validation.csv", "test")):
    if lists and os.path.isfile(os.path.join(lists, name)):
      parts.append((split, os.path.join(lists, name), images or root))
  if parts:
    return _AffectNetLayout("csv", tuple(parts))
  raise DataError(
      f"AffectNet: expected train_set/images/ and train_set/annotations/ (or val_set/), "
      f"or training.csv/validation.csv with Manually_Annotated_Images/, under {root}")


def _affectnet_code(value, where: str) -> int:
  try:
    return int(float(str(value).strip()))
  except ValueError:
    raise DataError(f"AffectNet: {where}: expression {value!r} is not a number") from None


def _affectnet_csv_rows(csv_path: str, image_dir: str):
  """Yields (image path, code, face box (x, y, w, h) or None) of a CSV list."""
  with open(csv_path, newline="") as f:
    reader = csv.DictReader(f)
    fields = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = fields
    missing = [c for c in ("subDirectory_filePath", "expression") if c not in fields]
    if missing:
      raise DataError(f"AffectNet: {csv_path} lacks the column(s) {', '.join(missing)}")
    for line_no, row in enumerate(reader, start=2):
      code = _affectnet_code(row["expression"], f"{csv_path} line {line_no}")
      try:
        box = tuple(int(float(row[k])) for k in
                    ("face_x", "face_y", "face_width", "face_height"))
      except (KeyError, TypeError, ValueError):
        box = None
      yield os.path.join(image_dir, row["subDirectory_filePath"].strip()), code, box


def _affectnet_items(root: str, skipped: collections.Counter | None):
  """(Record, face box or None) of every usable AffectNet image."""
  layout = _affectnet_layout(root)
  items = []

  def add(path, code, split, box):
    if code not in AFFECTNET_CODES:
      _skip(skipped, f"unknown AffectNet code {code}")
      return
    if AFFECTNET_CODES[code] is None:
      _skip(skipped, AFFECTNET_DROPPED[code])
      return
    if not os.path.isfile(path):
      _skip(skipped, "image missing")
      return
    items.append((Record(path=path, expression=AFFECTNET_CODES[code],
                         source="affectnet", split=split), box))

  for split, labels_at, image_dir in layout.parts:
    if layout.form == "csv":
      for path, code, box in _affectnet_csv_rows(labels_at, image_dir):
        add(path, code, split, box)
      continue
    if not os.path.isdir(labels_at):
      raise DataError(f"AffectNet: expected annotations/ beside {image_dir}")
    for name in _images(image_dir):
      stem = os.path.splitext(name)[0]
      exp_file = os.path.join(labels_at, f"{stem}_exp.npy")
      if not os.path.isfile(exp_file):
        _skip(skipped, "no _exp.npy annotation")
        continue
      value = np.load(exp_file, allow_pickle=False)
      add(os.path.join(image_dir, name),
          _affectnet_code(np.asarray(value).reshape(-1)[0], exp_file), split, None)
  return items


def list_affectnet(root: str, *,
                   skipped: collections.Counter | None = None) -> list[Record]:
  """AffectNet (either distribution); contempt and codes 8-10 are dropped."""
  return [r for r, _ in _affectnet_items(root, skipped)]


def list_dataset(name: str, root: str, *, skipped: collections.Counter | None = None,
                 **options) -> list[Record]:
  """Dispatches to `list_<name>`; options are passed on (e.g. include_neutral)."""
  if name not in DATASETS:
    raise UserError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}")
  lister = globals()[f"list_{name}"]
  return lister(root, skipped=skipped, **options)


# ---------------------------------------------------------------------------
# Writing.
# ---------------------------------------------------------------------------


def to_face(image: np.ndarray) -> np.ndarray:
  """Grayscale uint8 image of any size -> 112x112 uint8 face.

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


def _write_png(path: str, face: np.ndarray) -> None:
  """Writes a PNG atomically so an interrupted run never leaves a truncated file
  that a resumed run would keep."""
  ok, data = cv2.imencode(".png", face)
  if not ok:
    raise OSError(f"could not encode {path} as PNG")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.partial"
  with open(tmp, "wb") as f:
    f.write(data.tobytes())
  os.replace(tmp, path)


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
    workers: threads (OpenCV decodes and encodes outside the GIL).
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
    _write_png(dst, to_face(image))
    return out, None

  workers = workers or min(8, os.cpu_count() or 1)
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
        _skip(failed, reason)
      if progress is not None:
        progress.update()
  if progress is not None:
    progress.close()
  return records


def _load_gray(record: Record) -> np.ndarray | None:
  return cv2.imread(record.path, cv2.IMREAD_GRAYSCALE)


def _square_crop(image: np.ndarray, box) -> np.ndarray:
  """The face box grown to a square about its centre, clipped to the image."""
  x, y, w, h = box
  side = max(w, h)
  cx, cy = x + w / 2, y + h / 2
  x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
  x0, y0 = max(x0, 0), max(y0, 0)
  return image[y0:y0 + side, x0:x0 + side]


def _run_preprocess(items, output_dir, **kwargs):
  """MTCNN via data_tools.preprocess, imported late: it pulls in torch, which the
  listing and direct-write paths (and their tests) never need."""
  from data_tools import preprocess  # pylint: disable=g-import-not-at-top
  return preprocess.run_preprocess(items, output_dir, **kwargs)


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

  can_overwrite=False (MTCNN importers) leaves --overwrite out of the advice.
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


def _output_name(record: Record, dataset: str) -> str:
  """Relative output path of a directly written face; unique per source image."""
  if dataset == "fer2013":
    stem = f"fer2013_{int(record.path.rsplit('#', 1)[1]):05d}"
  elif dataset == "rafdb":
    stem = "rafdb_" + os.path.splitext(os.path.basename(record.path))[0].replace(
        "_aligned", "")
  else:
    # AffectNet's file names repeat between train_set and val_set.
    stem = (f"{dataset}_{record.split or 'all'}_"
            f"{os.path.splitext(os.path.basename(record.path))[0]}")
  return f"{record.expression}/{stem}.png"


def _fer2013_loader(records: Sequence[Record]) -> Callable[[Record], np.ndarray | None]:
  """Reads the pixels of the wanted rows in one pass over the CSV."""
  wanted = {int(r.path.rsplit("#", 1)[1]) for r in records}
  pixels = {}
  if records:
    csv_path = records[0].path.rsplit("#", 1)[0]
    for i, _, text, _ in _fer2013_rows(csv_path):
      if i in wanted:
        pixels[i] = _fer2013_pixels(text)
  return lambda r: pixels.get(int(r.path.rsplit("#", 1)[1]))


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


def import_dataset(dataset: str, root: str, output_dir: str, *,
                   workers: int | None = None, limit: int | None = None,
                   resume: bool = False, overwrite: bool = False,
                   aligned: bool = False, dry_run: bool = False,
                   list_options: dict | None = None,
                   preprocess_options: dict | None = None,
                   show_progress: bool = True, log=print) -> dict:
  """Enumerates a dataset and writes it as a face set; returns a summary dict.

  Args:
    dataset: one of DATASETS.
    root: where the dataset was unpacked (see the module docstring).
    output_dir: the face set to write; see `check_output_dir` for the rules.
    workers: parallel workers of the write step.
    limit: import at most this many images, spread over the dataset (a quick trial).
    resume: continue an import into a non-empty output_dir: direct writers keep
      the faces already written, MTCNN skips the photos its work log lists.
    overwrite: direct writers only: write every face again over output_dir.
    aligned: AffectNet only: treat the images as aligned crops and write them
      directly instead of running MTCNN.
    dry_run: enumerate and report only; write nothing.
    list_options: extra arguments of `list_<dataset>` (e.g. include_neutral).
    preprocess_options: extra arguments of run_preprocess (min_face_size, ...).
    show_progress: progress bars on stderr.
    log: where the human-readable report goes.

  Raises:
    UserError/DataError: a wrong layout or bad arguments, with one line to show.
  """
  if dataset not in DATASETS:
    raise UserError(f"unknown --dataset {dataset!r}: use one of {', '.join(DATASETS)}")
  if aligned and dataset != "affectnet":
    raise UserError("--aligned applies to --dataset=affectnet only (FER2013 and RAF-DB "
                    "are always written directly, the others always need MTCNN)")
  title = TITLES[dataset]
  root = _check_root(os.path.expanduser(root or ""), title)
  output_dir = os.path.expanduser(output_dir or "")
  direct = dataset in DIRECT or aligned
  if overwrite and not direct:
    # MTCNN runs keep a work log in the output directory and resume from it;
    # starting over means a fresh directory, not deleting its bookkeeping.
    raise UserError(f"--overwrite applies to directly written faces only; {title} "
                    "goes through MTCNN, whose runs resume by themselves: rerun with "
                    "--resume, or pick an empty --output_dir to start over")
  if not dry_run:
    output_dir = check_output_dir(output_dir, root, resume=resume, overwrite=overwrite,
                                  can_overwrite=direct)
  skipped = collections.Counter()
  boxes = {}
  if dataset == "affectnet":
    items = _affectnet_items(root, skipped)
    records = [r for r, _ in items]
    boxes = {r.path: b for r, b in items if b is not None}
  else:
    records = list_dataset(dataset, root, skipped=skipped, **(list_options or {}))
  found = summarize(records)
  log(format_summary(f"{title} at {root}", found, skipped))
  if not records:
    raise DataError(f"{title}: nothing to import under {root} (everything was skipped)")
  records = spread(records, limit)
  if len(records) < found["num_images"]:
    log(f"--limit: importing {len(records)} of {found['num_images']} images")
  result = {"dataset": dataset, "root": root, "output_dir": output_dir,
            "found": found, "skipped": dict(skipped)}
  if dry_run:
    return result

  if direct:
    if dataset == "fer2013":
      load = _fer2013_loader(records)
    elif boxes:
      def load(r):
        image = _load_gray(r)
        return None if image is None or r.path not in boxes else _square_crop(
            image, boxes[r.path])
    else:
      load = _load_gray
    failed = collections.Counter()
    pairs = [(r, _output_name(r, dataset)) for r in records]
    written = write_direct(pairs, output_dir, load, workers=workers, resume=resume,
                           failed=failed, show_progress=show_progress)
    if not written:
      raise DataError(f"{title}: no face could be written ({dict(failed)})")
    manifest = contract.write_manifest(output_dir, written)
    result["failed"] = dict(failed)
  else:
    kwargs = dict(preprocess_options or {})
    if workers:
      kwargs["workers"] = workers
    stats = _run_preprocess(records, output_dir, show_progress=show_progress, **kwargs)
    result["preprocess"] = stats
    result["failed"] = {f"MTCNN {reason} (this run; see rejects.csv)": n
                        for reason, n in dict(stats.get("reasons") or {}).items()}
    manifest = os.path.join(output_dir, contract.MANIFEST_NAME)
    if not stats.get("total_kept", 1) or not os.path.isfile(manifest):
      reasons = ", ".join(f"{n} {r}" for r, n in (stats.get("reasons") or {}).items())
      raise DataError(f"{title}: MTCNN kept no face of {len(records)} photos "
                      f"({reasons or 'see rejects.csv'}); the rejects are listed in "
                      f"{os.path.join(output_dir, 'rejects.csv')}")
    written = contract.read_manifest(output_dir, check_files=False)
  result["written"] = summarize(written)
  log(format_summary(f"wrote {output_dir}", result["written"], result.get("failed")))
  log(f"manifest: {manifest}")
  return result
