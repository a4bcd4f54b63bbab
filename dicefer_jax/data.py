"""From a config to in-memory train/test arrays: data directory, split, images."""

import dataclasses
import os

import numpy as np

from dicefer_jax import contract, input_pipeline, splits


@dataclasses.dataclass
class FaceData:
  """A face set split into train and test, decoded at the config's image size."""

  data_dir: str
  split_info: splits.SplitInfo
  train_images: np.ndarray   # uint8 (N, S, S, 1)
  train_labels: np.ndarray   # int32 (N,)
  train_subjects: list       # str per image, "" = unknown
  test_images: np.ndarray
  test_labels: np.ndarray
  test_subjects: list


def synthetic_dir(config) -> str:
  """Where the built-in synthetic set for this config lives (generated once)."""
  s = config.synthetic
  root = (s.cache_dir or os.environ.get("DICEFER_CACHE") or
          os.path.join(os.path.expanduser("~"), ".cache", "dicefer_jax"))
  return os.path.join(root, f"synthetic_n{s.num_subjects}_k{s.images_per_cell}_seed{s.seed}")


def resolve_data_dir(config) -> str:
  """config.data_dir, or the built-in synthetic set when it is empty."""
  if config.data_dir:
    return config.data_dir
  from data_tools import synthetic  # pylint: disable=g-import-not-at-top
  s = config.synthetic
  return synthetic.ensure_synthetic(synthetic_dir(config), s.num_subjects,
                                    s.images_per_cell, s.seed)


def load_data(config) -> FaceData:
  data_dir = resolve_data_dir(config)
  records = contract.read_manifest(data_dir)
  train, test, info = splits.split_records(
      records, num_folds=config.num_folds, fold=config.fold, seed=config.split_seed)
  train_labels, train_subjects = input_pipeline.labels_and_subjects(train)
  test_labels, test_subjects = input_pipeline.labels_and_subjects(test)
  return FaceData(
      data_dir=data_dir, split_info=info,
      train_images=input_pipeline.load_images(data_dir, train, config.image_size),
      train_labels=train_labels, train_subjects=train_subjects,
      test_images=input_pipeline.load_images(data_dir, test, config.image_size),
      test_labels=test_labels, test_subjects=test_subjects)
