"""From a face-set directory to in-memory train/test arrays.

`load_face_set` reads a manifest once and decodes each image once per image
size; `split_faces` cuts the fold a config asks for out of it. A process that
trains and evaluates many folds and variants (the protocol) loads the set once
and hands the same `FaceSet` to every run. Where the directory comes from (a
user's folder or the built-in synthetic set) is the entry point's business.
"""

import dataclasses
import os

import numpy as np

from dicefer_jax import contract, face_images, splits
from dicefer_jax.errors import DataError


class FaceSet:
  """A face set's records and, per image size, its decoded images (decoded once)."""

  def __init__(self, data_dir: str, records: list[contract.Record]):
    self.data_dir = data_dir
    self.records = list(records)
    self._images = {}

  def images(self, size: int) -> np.ndarray:
    """uint8 (N, size, size, 1), row i being records[i]; decoded on first use."""
    if size not in self._images:
      self._images[size] = face_images.load_images(self.data_dir, self.records, size)
    return self._images[size]


def load_face_set(data_dir: str) -> FaceSet:
  """Reads the manifest of a face set (checking every file exists).

  `data_dir` is the set's directory or a manifest CSV in it
  (`contract.face_set_location`); the FaceSet's data_dir is the image root."""
  root, _ = contract.face_set_location(data_dir)
  return FaceSet(root, contract.read_manifest(data_dir))


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
  """Where generated data (the synthetic set, prepared TFDS copies) is kept."""
  return (config.synthetic.cache_dir or os.environ.get("DICEFER_CACHE") or
          os.path.join(os.path.expanduser("~"), ".cache", "dicefer_jax"))


def _tfds_part(config, faces: FaceSet, part: str, records: list[contract.Record]):
  """(images, labels, subjects) of one split read through the dicefer_faces builder,
  in the order of `records` (the files path's order), so that both sources train
  on the very same batches."""
  # Imported here: tensorflow_datasets takes seconds to import, and only this
  # data source needs it.
  from dicefer_jax import tfds_builder  # pylint: disable=g-import-not-at-top
  ds = tfds_builder.load(faces.data_dir, part,
                         data_dir=config.tfds_dir or os.path.join(cache_root(config), "tfds"),
                         fold=config.fold, num_folds=config.num_folds, seed=config.split_seed)
  by_path = {}
  for ex in ds.as_numpy_iterator():
    by_path[ex["path"].decode()] = face_images.resize_square(ex["image"][:, :, 0],
                                                             config.image_size)
  missing = [r.path for r in records if r.path not in by_path]
  if missing:
    raise DataError(f"the prepared TFDS copy lacks {len(missing)} image(s) of the "
                    f"{part} split (e.g. {missing[0]}): delete the stale copy in "
                    f"{config.tfds_dir or 'the tfds cache'} or set --config.tfds_dir")
  images = np.stack([by_path[r.path] for r in records])[..., None]
  labels, subjects = face_images.labels_and_subjects(records)
  return images.astype(np.uint8), labels, subjects


def split_faces(config, faces: FaceSet) -> FaceData:
  """The train/test split of `faces` that config.fold/num_folds/split_seed name."""
  train, test, info = splits.split_records(
      faces.records, num_folds=config.num_folds, fold=config.fold, seed=config.split_seed)
  if config.data_source == "tfds":
    return FaceData(faces.data_dir, info, *_tfds_part(config, faces, "train", train),
                    *_tfds_part(config, faces, "test", test))
  if config.data_source != "files":
    raise DataError(f"data_source={config.data_source!r} is unknown: use 'files' or 'tfds'")
  index = {id(r): i for i, r in enumerate(faces.records)}
  images = faces.images(config.image_size)

  def arrays(records):
    rows = np.array([index[id(r)] for r in records], dtype=np.int64)
    labels, subjects = face_images.labels_and_subjects(records)
    return images[rows], labels, subjects

  return FaceData(faces.data_dir, info, *arrays(train), *arrays(test))
