"""Every image's codes in one .npz file, so that anyone can recompute a metric.

`code_table` predicts every image of a split (train and test) with a trained
model; `write_codes` saves it, refusing to overwrite a file. Arrays, one row
per image (training images first, then test images, each in split order):

  z_exp, z_id   float32 (N, d): the codes (absent for the baseline, which has no
                trained code head and no identity encoder; `missing` says why)
  feature       float32 (N, 8 * width): the pooled exp_encoder feature
  label         int32: the true expression (index into `class_names`)
  prediction    int32: the model's predicted expression
  subject       str: subject id ("" = unknown)
  is_test       bool: the image is in the test split
  path          str: the image's path relative to the face set's directory
and 0-d / 1-d strings: method, expression_representation, class_names, missing.
"""

import io
import os
import warnings

import numpy as np

from dicefer_jax import contract, face_images, fileio, splits, train
from dicefer_jax.errors import UserError
from dicefer_jax.evaluation import evaluator


def check_target(path: str) -> None:
  """Refuses, in one line, a target that is not a new .npz file in a folder."""
  if not path.endswith(".npz"):
    raise UserError(f"--export_codes={path}: name a .npz file (numpy adds the suffix "
                    "otherwise)")
  if os.path.exists(path):
    raise UserError(f"--export_codes={path} exists: it is never overwritten; remove it "
                    "or name another file")
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise UserError(f"--export_codes={path}: folder {folder} does not exist")


def split_paths(config, faces, data) -> tuple[list[str], list[str]]:
  """(train paths, test paths) of `data`, split from `faces` as data_lib.split_faces
  does (same function and arguments: each part keeps the records' order)."""
  with warnings.catch_warnings():   # split_faces has warned about this split already
    warnings.simplefilter("ignore", splits.SplitWarning)
    train_records, test_records, _ = splits.split_records(
        faces.records, num_folds=config.num_folds, fold=config.fold, seed=config.split_seed)
  for records, labels in ((train_records, data.train_labels),
                          (test_records, data.test_labels)):
    if not np.array_equal(face_images.labels_and_subjects(records)[0], labels):
      raise ValueError("the split's records do not line up with its images: paths "
                       "cannot be given")
  return [r.path for r in train_records], [r.path for r in test_records]


def code_table(config, model, state, data, paths=None) -> dict:
  """The arrays of the module docstring for every image of `data`'s split.

  `paths` = (train paths, test paths), or None to leave `path` out.
  """
  outs = [train.predict(config, model, state, images)
          for images in (data.train_images, data.test_images)]
  parts = [evaluator.expression_codes(config, out) for out in outs]
  (train_codes, missing, expression_repr), (test_codes, _, _) = parts
  table = {}
  for name, code in train_codes.items():
    if code is not None:
      table[name] = np.concatenate([code, test_codes[name]]).astype(np.float32)
  table.update(
      label=np.concatenate([data.train_labels, data.test_labels]).astype(np.int32),
      prediction=np.concatenate([o["prediction"] for o in outs]).astype(np.int32),
      subject=np.array(["" if s is None else str(s)
                        for s in list(data.train_subjects) + list(data.test_subjects)],
                       dtype=str),
      is_test=np.concatenate([np.zeros(len(data.train_labels), bool),
                              np.ones(len(data.test_labels), bool)]),
      method=np.array(config.method), expression_representation=np.array(expression_repr),
      class_names=np.array(contract.EXPRESSIONS),
      missing=np.array([f"{k}: {v}" for k, v in missing.items()], dtype=str))
  if paths is not None:
    table["path"] = np.array(list(paths[0]) + list(paths[1]), dtype=str)
  return table


def write_codes(path: str, table: dict) -> str:
  """Saves `table` as a compressed .npz at `path` (never over an existing file)."""
  check_target(path)
  buffer = io.BytesIO()
  np.savez_compressed(buffer, **table)
  fileio.write_bytes_atomic(path, buffer.getvalue())
  return path
