"""Oulu-CASIA NIR&VIS: sequences from neutral to apex, one folder per class.

Layout: ROOT/VL/Strong/P001/Anger/000.jpeg (also ROOT/OriginalImg/VL/...);
classes Anger Disgust Fear Happiness Sadness Surprise. The last 3 frames of
each sequence (in natural file name order) are the expression. Neutral (the
first frame) only with include_neutral: the paper's 6-class protocol has no
neutral class. Subject = P###. No split. The faces go through MTCNN.
"""

import collections
import os

from data_tools.importers import common
from dicefer_jax.contract import Record
from dicefer_jax.errors import DataError

# Class folder name (lowercased) -> canonical class.
OULU_CLASSES = {"anger": "anger", "disgust": "disgust", "fear": "fear",
                "happiness": "happiness", "sadness": "sadness", "surprise": "surprise"}


def find_dir(root: str, modality: str, illumination: str) -> str:
  """The `<modality>/<illumination>` folder of subjects under `root`."""
  root = common.check_root(root, "Oulu-CASIA")
  rel = os.path.join(modality, illumination)
  found = common.first_existing([os.path.join(root, rel),
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
  base = find_dir(root, modality, illumination)
  subjects = common.subdirs(base)
  if not subjects:
    raise DataError(f"Oulu-CASIA: expected subject folders P001 ... under {base}")
  records = []
  for subject in subjects:
    for cls in common.subdirs(os.path.join(base, subject)):
      expression = OULU_CLASSES.get(cls.lower())
      seq_dir = os.path.join(base, subject, cls)
      if expression is None:
        common.count_skip(skipped, f"unknown class folder {cls!r}")
        continue
      frames = common.list_images(seq_dir)
      need = 2 if include_neutral else 1
      if len(frames) < need:
        common.count_skip(skipped, f"sequence with fewer than {need} frame(s)")
        continue
      # With neutral taken, the first frame must not double as a peak frame.
      peak = frames[-min(common.PEAK_FRAMES,
                         len(frames) - (1 if include_neutral else 0)):]
      if include_neutral:
        records.append(Record(path=os.path.join(seq_dir, frames[0]),
                              expression="neutral", subject=subject, source="oulu"))
      records.extend(Record(path=os.path.join(seq_dir, f), expression=expression,
                            subject=subject, source="oulu") for f in peak)
  return records
