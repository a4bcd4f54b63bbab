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


def cache_root(config) -> str:
  return (config.synthetic.cache_dir or os.environ.get("DICEFER_CACHE") or
          os.path.join(os.path.expanduser("~"), ".cache", "dicefer_jax"))


def synthetic_dir(config) -> str:
  """Where the built-in synthetic set for this config lives (generated once)."""
  s = config.synthetic
  return os.path.join(cache_root(config),
                      f"synthetic_n{s.num_subjects}_k{s.images_per_cell}_seed{s.seed}")


def resolve_data_dir(config) -> str:
  """config.data_dir, or the built-in synthetic set when it is empty."""
  if config.data_dir:
    return config.data_dir
  from data_tools import synthetic  # pylint: disable=g-import-not-at-top
  s = config.synthetic
  return synthetic.ensure_synthetic(synthetic_dir(config), s.num_subjects,
                                    s.images_per_cell, s.seed)


def _tfds_split(config, data_dir: str, split: str):
  """(images, labels, subjects) of one split, read through the dicefer_faces builder."""
  from data_tools import tfds_builder  # pylint: disable=g-import-not-at-top
  ds = tfds_builder.load(data_dir, split, data_dir=config.get("tfds_dir") or
                         os.path.join(cache_root(config), "tfds"),
                         fold=config.fold, num_folds=config.num_folds, seed=config.split_seed)
  images, labels, subjects = [], [], []
  for ex in ds.as_numpy_iterator():
    images.append(input_pipeline.resize_square(ex["image"][:, :, 0], config.image_size))
    labels.append(ex["expression"])
    subjects.append(ex["subject"].decode())
  return (np.stack(images)[..., None].astype(np.uint8), np.asarray(labels, np.int32),
          subjects)


def load_data(config) -> FaceData:
  data_dir = resolve_data_dir(config)
  records = contract.read_manifest(data_dir)
  train, test, info = splits.split_records(
      records, num_folds=config.num_folds, fold=config.fold, seed=config.split_seed)
  if config.get("data_source", "files") == "tfds":
    # The same split, built into a TFDS dataset (prepared once, then reused).
    train_arrays = _tfds_split(config, data_dir, "train")
    test_arrays = _tfds_split(config, data_dir, "test")
    return FaceData(data_dir, info, *train_arrays, *test_arrays)
  train_labels, train_subjects = input_pipeline.labels_and_subjects(train)
  test_labels, test_subjects = input_pipeline.labels_and_subjects(test)
  return FaceData(
      data_dir=data_dir, split_info=info,
      train_images=input_pipeline.load_images(data_dir, train, config.image_size),
      train_labels=train_labels, train_subjects=train_subjects,
      test_images=input_pipeline.load_images(data_dir, test, config.image_size),
      test_labels=test_labels, test_subjects=test_subjects)
