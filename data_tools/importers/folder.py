"""Plain image folders: `ROOT/<Expression>/*.jpg|png|...`.

Class folder names are any spelling `data_tools.labels.canonical_expression`
knows (Happy, angry, Surprised, ...); a contempt folder is skipped. Images in
nested sub-folders of a class folder count too. No subjects, no split: the
faces go through MTCNN.
"""

import collections
import os

from data_tools import labels
from data_tools.importers import common
from dicefer_jax.contract import Record
from dicefer_jax.errors import DataError


def list_folder(root: str, *, skipped: collections.Counter | None = None) -> list[Record]:
  """`ROOT/<Expression>/*.jpg`: class folder names mapped by canonical_expression.

  Args:
    root: the folder holding one sub-folder per expression.
    skipped: filled with reason -> count for what is left out.

  Returns:
    One record per image, class folders and files in natural order.

  Raises:
    DataError: no class folders, a class folder name that is no known class, or
      no image at all.
  """
  root = common.check_root(root, "folder")
  if not os.path.isdir(root):
    raise DataError(f"folder: expected a directory of class folders, got the file {root}")
  records = []
  class_dirs = common.subdirs(root)
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
      # Pruning in place keeps os.walk out of hidden folders and makes it visit
      # the rest in natural order.
      dirnames[:] = sorted((d for d in dirnames if not d.startswith(".")),
                           key=common.natural_key)
      files.extend(os.path.join(dirpath, f)
                   for f in sorted(filenames, key=common.natural_key)
                   if common.is_image(f))
    if expression is None:
      common.count_skip(
          skipped, f"class folder {name!r} is dropped (not one of the 7 classes)",
          len(files))
      continue
    records.extend(Record(path=f, expression=expression, source="folder") for f in files)
  if not records and not (skipped and sum(skipped.values())):
    raise DataError(f"folder: the class folders under {root} hold no images "
                    f"({', '.join(common.IMAGE_EXTENSIONS)})")
  return records
