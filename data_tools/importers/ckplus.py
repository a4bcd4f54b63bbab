"""CK+ (extended Cohn-Kanade): posed sequences from neutral onset to apex.

Layout: ROOT/cohn-kanade-images/S005/001/S005_001_00000001.png and
ROOT/Emotion/S005/001/S005_001_00000011_emotion.txt (also
ROOT/extended-cohn-kanade-images/cohn-kanade-images/ and
ROOT/Emotion_labels/Emotion/), the label file holding one float code:
0 neutral 1 anger 2 contempt (dropped) 3 disgust 4 fear 5 happy 6 sadness
7 surprise. Per labelled sequence the last 3 frames are the expression and the
first frame is neutral; sequences without an emotion file are skipped.
Subject = S###. No split. The faces go through MTCNN.
"""

import collections
import os

from data_tools.importers import common
from dicefer_jax.contract import Record
from dicefer_jax.errors import DataError

# None: contempt, which the 7-class protocol drops.
CKPLUS_CODES = {0: "neutral", 1: "anger", 2: None, 3: "disgust", 4: "fear",
                5: "happiness", 6: "sadness", 7: "surprise"}


def find_dirs(root: str) -> tuple[str, str]:
  """(image folder, emotion label folder) under `root`."""
  root = common.check_root(root, "CK+")
  images = common.first_existing([os.path.join(root, "cohn-kanade-images"),
                                  os.path.join(root, "extended-cohn-kanade-images",
                                               "cohn-kanade-images")])
  emotion = common.first_existing([os.path.join(root, "Emotion"),
                                   os.path.join(root, "Emotion_labels", "Emotion")])
  if images is None or emotion is None:
    missing = " and ".join(n for n, d in (("cohn-kanade-images/", images),
                                          ("Emotion/", emotion)) if d is None)
    raise DataError(f"CK+: expected {missing} under {root} (from "
                    "extended-cohn-kanade-images.zip and Emotion_labels.zip)")
  return images, emotion


def read_code(path: str, title: str) -> int:
  """The label code of a one-number text file such as '   3.0000000e+00'."""
  with open(path) as f:
    text = f.read().strip()
  try:
    value = float(text)
  except ValueError:
    raise DataError(
        f"{title}: {path} should hold one number, got {text[:40]!r}") from None
  if value != int(value):
    raise DataError(f"{title}: {path} holds {text!r}, not a whole-number code")
  return int(value)


def list_ckplus(root: str, *, skipped: collections.Counter | None = None) -> list[Record]:
  """CK+: per labelled sequence, the first frame (neutral) and the last 3 (peak).

  Args:
    root: the folder holding cohn-kanade-images/ and Emotion/.
    skipped: filled with reason -> count for sequences left out (unlabelled,
      contempt, fewer than 2 frames).

  Raises:
    DataError: a missing folder, or a label file that is not a code in 0..7.
  """
  images, emotion_dir = find_dirs(root)
  records = []
  subjects = common.subdirs(images)
  if not subjects:
    raise DataError(f"CK+: expected subject folders S005/... under {images}")
  for subject in subjects:
    for sequence in common.subdirs(os.path.join(images, subject)):
      seq_dir = os.path.join(images, subject, sequence)
      frames = common.list_images(seq_dir)
      label_dir = os.path.join(emotion_dir, subject, sequence)
      label_files = (sorted(f for f in os.listdir(label_dir)
                            if f.endswith("_emotion.txt") and not f.startswith("."))
                     if os.path.isdir(label_dir) else [])
      if not label_files:
        # Only 327 of CK+'s 593 sequences carry a validated emotion label.
        common.count_skip(skipped, "sequence without an emotion file")
        continue
      label_file = os.path.join(label_dir, label_files[-1])
      code = read_code(label_file, "CK+")
      if code not in CKPLUS_CODES:
        raise DataError(f"CK+: {label_file}: code {code} is not in 0..7")
      expression = CKPLUS_CODES[code]
      if expression is None:
        common.count_skip(skipped, "contempt sequence (no canonical class)")
        continue
      if len(frames) < 2:
        common.count_skip(skipped, "sequence with fewer than 2 frames")
        continue
      # Never let the neutral frame double as a peak frame in short sequences.
      peak = frames[-min(common.PEAK_FRAMES, len(frames) - 1):]
      records.append(Record(path=os.path.join(seq_dir, frames[0]), expression="neutral",
                            subject=subject, source="ckplus"))
      records.extend(Record(path=os.path.join(seq_dir, f), expression=expression,
                            subject=subject, source="ckplus") for f in peak)
  return records
