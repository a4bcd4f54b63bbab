"""AffectNet, in either of the forms it circulates in.

Layouts:

* the common re-distribution: ROOT/train_set/images/N.jpg with
  ROOT/train_set/annotations/N_exp.npy (a 0-d string array), and val_set/
  likewise;
* the official CSV form: ROOT/training.csv and ROOT/validation.csv (also under
  Manually_Annotated_file_lists/ or Manually_Annotated/Manually_Annotated_file_lists/)
  with images under ROOT/Manually_Annotated_Images/<subDirectory_filePath> (also
  under Manually_Annotated/ or Manually_Annotated_compressed/) and a face box
  per row.

Codes 0 Neutral 1 Happy 2 Sad 3 Surprise 4 Fear 5 Disgust 6 Anger; 7 Contempt
and 8-10 None/Uncertain/Non-Face are dropped. train_set and training.csv ->
train, val_set and validation.csv -> test. No subjects. The faces go through
MTCNN or, with aligned=True, are written directly (the re-distribution's crops
resized; the CSV form cropped to its face box first).
"""

import collections
import csv
import dataclasses
import os
from typing import Callable, Iterator

import numpy as np

from data_tools.importers import common
from dicefer_jax.contract import Record
from dicefer_jax.errors import DataError

# None marks a code the 7-class protocol drops; AFFECTNET_DROPPED says why.
AFFECTNET_CODES = {0: "neutral", 1: "happiness", 2: "sadness", 3: "surprise",
                   4: "fear", 5: "disgust", 6: "anger", 7: None, 8: None, 9: None,
                   10: None}
AFFECTNET_DROPPED = {7: "contempt (no canonical class)",
                     8: "AffectNet code 8 (None)",
                     9: "AffectNet code 9 (Uncertain)",
                     10: "AffectNet code 10 (Non-Face)"}

FaceBox = tuple[int, int, int, int]  # x, y, width, height in pixels


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where one AffectNet copy keeps its labels and images.

  Attributes:
    form: "npy" (the re-distribution) or "csv" (the official lists).
    parts: (split, label source, image folder) per part; the label source is the
      annotations/ folder (npy) or the CSV file (csv).
  """
  form: str
  parts: tuple[tuple[str, str, str], ...]


def find_layout(root: str) -> Layout:
  """Which form `root` holds, and where its parts are."""
  root = common.check_root(root, "AffectNet")
  parts = []
  for folder, split in (("train_set", "train"), ("val_set", "test")):
    d = os.path.join(root, folder)
    if os.path.isdir(os.path.join(d, "images")):
      parts.append((split, os.path.join(d, "annotations"), os.path.join(d, "images")))
  if parts:
    return Layout("npy", tuple(parts))
  lists = next((d for d in (root, os.path.join(root, "Manually_Annotated_file_lists"),
                             os.path.join(root, "Manually_Annotated",
                                          "Manually_Annotated_file_lists"))
                if os.path.isfile(os.path.join(d, "training.csv"))
                or os.path.isfile(os.path.join(d, "validation.csv"))), None)
  images = common.first_existing([
      os.path.join(root, "Manually_Annotated_Images"),
      os.path.join(root, "Manually_Annotated", "Manually_Annotated_Images"),
      os.path.join(root, "Manually_Annotated_compressed", "Manually_Annotated_Images")])
  for name, split in (("training.csv", "train"), ("validation.csv", "test")):
    if lists and os.path.isfile(os.path.join(lists, name)):
      parts.append((split, os.path.join(lists, name), images or root))
  if parts:
    return Layout("csv", tuple(parts))
  raise DataError(
      f"AffectNet: expected train_set/images/ and train_set/annotations/ (or val_set/), "
      f"or training.csv/validation.csv with Manually_Annotated_Images/, under {root}")


def parse_code(value, where: str) -> int:
  """An expression code as either form stores it: CSV text or a 0-d numpy string."""
  try:
    return int(float(str(value).strip()))
  except ValueError:
    raise DataError(f"AffectNet: {where}: expression {value!r} is not a number") from None


def read_csv_rows(csv_path: str,
                  image_dir: str) -> Iterator[tuple[str, int, FaceBox | None]]:
  """Yields (image path, code, face box or None) of every row of a CSV list."""
  with open(csv_path, newline="") as f:
    reader = csv.DictReader(f)
    fields = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = fields
    missing = [c for c in ("subDirectory_filePath", "expression") if c not in fields]
    if missing:
      raise DataError(f"AffectNet: {csv_path} lacks the column(s) {', '.join(missing)}")
    for line_no, row in enumerate(reader, start=2):
      code = parse_code(row["expression"], f"{csv_path} line {line_no}")
      try:
        box = tuple(int(float(row[k])) for k in
                    ("face_x", "face_y", "face_width", "face_height"))
      except (KeyError, TypeError, ValueError):
        box = None
      yield os.path.join(image_dir, row["subDirectory_filePath"].strip()), code, box


def list_with_face_boxes(
    root: str, skipped: collections.Counter | None = None
) -> list[tuple[Record, FaceBox | None]]:
  """(record, face box or None) of every usable image; boxes come with the CSV form."""
  layout = find_layout(root)
  items = []

  def add(path, code, split, box):
    if code not in AFFECTNET_CODES:
      common.count_skip(skipped, f"unknown AffectNet code {code}")
      return
    if AFFECTNET_CODES[code] is None:
      common.count_skip(skipped, AFFECTNET_DROPPED[code])
      return
    if not os.path.isfile(path):
      common.count_skip(skipped, "image missing")
      return
    items.append((Record(path=path, expression=AFFECTNET_CODES[code],
                         source="affectnet", split=split), box))

  for split, labels_at, image_dir in layout.parts:
    if layout.form == "csv":
      for path, code, box in read_csv_rows(labels_at, image_dir):
        add(path, code, split, box)
      continue
    if not os.path.isdir(labels_at):
      raise DataError(f"AffectNet: expected annotations/ beside {image_dir}")
    for name in common.list_images(image_dir):
      stem = os.path.splitext(name)[0]
      exp_file = os.path.join(labels_at, f"{stem}_exp.npy")
      if not os.path.isfile(exp_file):
        common.count_skip(skipped, "no _exp.npy annotation")
        continue
      value = np.load(exp_file, allow_pickle=False)
      add(os.path.join(image_dir, name),
          parse_code(np.asarray(value).reshape(-1)[0], exp_file), split, None)
  return items


def list_affectnet(root: str, *,
                   skipped: collections.Counter | None = None) -> list[Record]:
  """AffectNet (either form); contempt and codes 8-10 are dropped.

  Args:
    root: the folder holding train_set/ and val_set/, or the CSV lists.
    skipped: filled with reason -> count for what is left out.
  """
  return [record for record, _ in list_with_face_boxes(root, skipped)]


def square_crop(image: np.ndarray, box: FaceBox) -> np.ndarray:
  """The face box grown to a square about its centre, clipped to the image."""
  x, y, w, h = box
  side = max(w, h)
  cx, cy = x + w / 2, y + h / 2
  x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
  x0, y0 = max(x0, 0), max(y0, 0)
  return image[y0:y0 + side, x0:x0 + side]


def face_box_loader(
    boxes: dict[str, FaceBox],
    load_image: Callable[[Record], np.ndarray | None],
) -> Callable[[Record], np.ndarray | None]:
  """A `load` for write_direct that crops each image to its listed face box.

  Args:
    boxes: image path -> face box; an image without one counts as unreadable.
    load_image: reads a record's whole image.
  """
  def load(record: Record) -> np.ndarray | None:
    image = load_image(record)
    if image is None or record.path not in boxes:
      return None
    return square_crop(image, boxes[record.path])
  return load
