"""RAF-DB basic: aligned 100x100 colour faces with one label file.

Layout: ROOT/EmoLabel/list_patition_label.txt (sic) with lines
`train_00001.jpg 5`, and ROOT/Image/aligned/train_00001_aligned.jpg; ROOT may be
`basic/` or the folder above it. Label codes 1 Surprise 2 Fear 3 Disgust
4 Happiness 5 Sadness 6 Anger 7 Neutral; the split comes from the train_/test_
prefix. No subjects. The faces are resized to 112 (bicubic) and written
directly, without MTCNN.
"""

import collections
import os

from data_tools.importers import common
from dicefer_jax.contract import Record
from dicefer_jax.errors import DataError

RAFDB_CODES = {1: "surprise", 2: "fear", 3: "disgust", 4: "happiness", 5: "sadness",
               6: "anger", 7: "neutral"}
# The file name as RAF-DB ships it, misspelling included.
LABEL_FILE = os.path.join("EmoLabel", "list_patition_label.txt")


def find_basic(root: str) -> str:
  """RAF-DB's basic/ folder: `root` itself or its basic/ sub-folder."""
  root = common.check_root(root, "RAF-DB")
  found = common.first_existing(
      [os.path.join(root, LABEL_FILE), os.path.join(root, "basic", LABEL_FILE)],
      isdir=False)
  if found is None:
    raise DataError(f"RAF-DB: expected EmoLabel/list_patition_label.txt under {root} "
                    "(point --root at RAF-DB's basic/ folder)")
  return os.path.dirname(os.path.dirname(found))


def list_rafdb(root: str, *, skipped: collections.Counter | None = None) -> list[Record]:
  """RAF-DB basic: label file lines `train_00001.jpg 5` -> aligned 100x100 images.

  Args:
    root: RAF-DB's basic/ folder or the folder above it.
    skipped: filled with reason -> count for listed images whose aligned file
      is missing.

  Raises:
    DataError: a missing label file or aligned folder, or a malformed line.
  """
  base = find_basic(root)
  label_file = os.path.join(base, LABEL_FILE)
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
        common.count_skip(skipped, "aligned image missing")
        continue
      records.append(Record(path=path, expression=RAFDB_CODES[code], source="rafdb",
                            split=split))
  if not records and not (skipped and sum(skipped.values())):
    raise DataError(f"RAF-DB: {label_file} lists no images")
  return records
