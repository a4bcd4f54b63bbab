"""FER2013: one CSV of 48x48 grayscale faces.

Layout: ROOT/fer2013.csv (also ROOT/fer2013/fer2013.csv, ROOT/icml_face_data.csv,
or --root = the CSV itself), columns emotion,pixels,Usage; pixels are 48*48
space-separated ints. Emotion codes 0 Angry 1 Disgust 2 Fear 3 Happy 4 Sad
5 Surprise 6 Neutral; Usage Training -> train, PublicTest and PrivateTest ->
test. No subjects. The faces are upsampled to 112 (bicubic) and written
directly, without MTCNN.

A record's `path` names the CSV row that holds its pixels: `<csv>#<row>`, with
row the 0-based data row (the header not counted).
"""

import collections
import csv
import os
from typing import Callable, Iterator, Sequence

import numpy as np

from data_tools.importers import common
from dicefer_jax.contract import Record
from dicefer_jax.errors import DataError

FER2013_CODES = {0: "anger", 1: "disgust", 2: "fear", 3: "happiness", 4: "sadness",
                 5: "surprise", 6: "neutral"}
FER2013_USAGE = {"Training": "train", "PublicTest": "test", "PrivateTest": "test"}
FER2013_SIDE = 48


def find_csv(root: str) -> str:
  """The FER2013 CSV under (or at) `root`."""
  root = common.check_root(root, "FER2013")
  if os.path.isfile(root):
    return root
  found = common.first_existing(
      [os.path.join(root, "fer2013.csv"), os.path.join(root, "fer2013", "fer2013.csv"),
       os.path.join(root, "icml_face_data.csv")], isdir=False)
  if found is None:
    raise DataError(f"FER2013: expected fer2013.csv (columns emotion,pixels,Usage) "
                    f"under {root}")
  return found


def read_rows(csv_path: str) -> Iterator[tuple[int, str, str, str]]:
  """Yields (row index, emotion, pixels string, usage) of every data row.

  A row too short to hold all three columns yields empty strings, which the
  lister counts as an unknown code instead of failing the whole file.
  """
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


def decode_pixels(text: str) -> np.ndarray | None:
  """A row's pixel string as a 48x48 uint8 image; None if it is not one."""
  try:
    values = np.array(text.split(), dtype=np.int64)
  except ValueError:
    return None
  if values.size != FER2013_SIDE * FER2013_SIDE or values.min() < 0 or values.max() > 255:
    return None
  return values.astype(np.uint8).reshape(FER2013_SIDE, FER2013_SIDE)


def row_index(record: Record) -> int:
  """The CSV data row a FER2013 record names (`<csv>#<row>`)."""
  return int(record.path.rsplit("#", 1)[1])


def list_fer2013(root: str, *,
                 skipped: collections.Counter | None = None) -> list[Record]:
  """Rows of fer2013.csv; `path` is `<csv>#<row>` (row = 0-based data row).

  Args:
    root: the folder holding fer2013.csv, or the CSV itself.
    skipped: filled with reason -> count for rows left out (unknown emotion code
      or Usage, a pixel string that is not 48x48).
  """
  csv_path = find_csv(root)
  records = []
  for i, emotion, pixels, usage in read_rows(csv_path):
    try:
      expression = FER2013_CODES[int(emotion)]
    except (KeyError, ValueError):
      common.count_skip(skipped, "unknown emotion code")
      continue
    if usage not in FER2013_USAGE:
      common.count_skip(skipped, "unknown Usage")
      continue
    # Count the pixel string's tokens only; decoding waits for the write step.
    if len(pixels.split()) != FER2013_SIDE * FER2013_SIDE:
      common.count_skip(skipped, "pixels are not 48x48")
      continue
    records.append(Record(path=f"{csv_path}#{i}", expression=expression,
                          source="fer2013", split=FER2013_USAGE[usage]))
  if not records and not (skipped and sum(skipped.values())):
    raise DataError(f"FER2013: {csv_path} holds no rows")
  return records


def row_loader(records: Sequence[Record]) -> Callable[[Record], np.ndarray | None]:
  """A `load` for write_direct that reads the wanted rows in one pass over the CSV.

  All records must name rows of the same CSV (as list_fer2013's do).
  """
  wanted = {row_index(r) for r in records}
  pixels = {}
  if records:
    csv_path = records[0].path.rsplit("#", 1)[0]
    for i, _, text, _ in read_rows(csv_path):
      if i in wanted:
        pixels[i] = decode_pixels(text)
  return lambda record: pixels.get(row_index(record))
