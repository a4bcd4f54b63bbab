"""Helpers every dataset lister shares: skip counts, sorting, listing, root checks.

Listers read directory listings and label files only, never pixels, so these
helpers look at names and file types and nothing else.
"""

import collections
import os
import re
from typing import Iterable

from dicefer_jax.errors import DataError, UserError

# The importers' own list, not data_tools.preprocess's: that module is imported
# only when MTCNN runs, and its list is longer (.ppm, .pgm, .gif), so using it
# would change what the listers find.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# Peak frames taken from the end of each CK+ / Oulu-CASIA sequence: the
# sequences run from neutral onset to apex, so only the last frames show the
# expression at full intensity.
PEAK_FRAMES = 3


def count_skip(skipped: collections.Counter | None, reason: str, n: int = 1) -> None:
  """Adds `n` to `skipped[reason]`; callers that pass no Counter do not count."""
  if skipped is not None and n:
    skipped[reason] += n


def natural_key(name: str) -> list:
  """Sort key that orders `frame2` before `frame10` (zero padding is not universal)."""
  return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def is_image(name: str) -> bool:
  """A visible file name with one of IMAGE_EXTENSIONS (any case)."""
  return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def subdirs(path: str) -> list[str]:
  """Visible sub-directories, naturally sorted (macOS archives add .DS_Store etc.)."""
  return sorted((d for d in os.listdir(path)
                 if not d.startswith(".") and os.path.isdir(os.path.join(path, d))),
                key=natural_key)


def list_images(path: str) -> list[str]:
  """Names of the image files directly in `path`, naturally sorted."""
  return sorted((f for f in os.listdir(path)
                 if is_image(f) and os.path.isfile(os.path.join(path, f))),
                key=natural_key)


def check_root(root: str, title: str) -> str:
  """The absolute --root; a missing flag is a UserError, a missing path a DataError."""
  if not root:
    raise UserError(f"{title}: pass --root=DIR, the folder the dataset was unpacked into")
  if not os.path.exists(root):
    raise DataError(f"{title}: --root {root} does not exist")
  return os.path.abspath(root)


def first_existing(candidates: Iterable[str], isdir: bool = True) -> str | None:
  """The first candidate that is a directory (or, with isdir=False, a file)."""
  for candidate in candidates:
    if (os.path.isdir(candidate) if isdir else os.path.isfile(candidate)):
      return candidate
  return None
