"""From a face-set directory to train/test images, in memory or on disk.

`load_face_set` reads a manifest once and decodes each image once per image
size; `split_faces` cuts the fold a config asks for out of it. A process that
trains and evaluates many folds and variants (the protocol) loads the set once
and hands the same `FaceSet` to every run. Where the directory comes from (a
user's folder or the built-in synthetic set) is the entry point's business.

A set whose decoded images exceed `config.stream_above_mb` is not held in
memory: it is decoded once into an `image_store.ImageStore` file under the cache
root and its splits are views of that file, which the input pipelines gather
from by the same indices (bit-identical batches; see image_store.py).
"""

import dataclasses
import os

import numpy as np

from dicefer_jax import contract, face_images, image_store, splits
from dicefer_jax.errors import DataError


class FaceSet:
  """A face set's records and, per image size, its decoded images (decoded once)."""

  def __init__(self, data_dir: str, records: list[contract.Record]):
    self.data_dir = data_dir
    self.records = list(records)
    self._images = {}
    self._stores = {}

  def images(self, size: int) -> np.ndarray:
    """uint8 (N, size, size, 1), row i being records[i]; decoded on first use."""
    if size not in self._images:
      self._images[size] = face_images.load_images(self.data_dir, self.records, size)
    return self._images[size]

  def image_store(self, size: int, cache_dir: str) -> image_store.ImageStore:
    """The same images as `images(size)`, decoded once into a file under
    `cache_dir` (reused across runs) instead of memory."""
    if size not in self._stores:
      key = image_store.store_key(self.data_dir, self.records, size, "files")
      self._stores[size] = image_store.open_or_write(
          os.path.join(cache_dir, "image_stores", key + ".u8"), len(self.records), size,
          # Looked up at call time, so the in-memory path and the store share
          # one decoding function (and tests that count decodes see both).
          image_store.fill_from_files(self.data_dir, self.records, size,
                                      lambda *a: face_images.load_images(*a)))
    return self._stores[size]


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
  # uint8 (N, S, S, 1): an array, or a view of an on-disk store for a large set.
  train_images: np.ndarray | image_store.ImageStore
  train_labels: np.ndarray   # int32 (N,)
  train_subjects: list       # str per image, "" = unknown
  test_images: np.ndarray | image_store.ImageStore
  test_labels: np.ndarray
  test_subjects: list
  # Held-out images of training subjects (config.seen_holdout > 0), for accuracy
  # on seen people; None when none are held out.
  seen_images: np.ndarray | image_store.ImageStore | None = None
  seen_labels: np.ndarray | None = None
  seen_subjects: list | None = None


def cache_root(config) -> str:
  """Where generated data (the synthetic set, prepared TFDS copies) is kept."""
  return (config.synthetic.cache_dir or os.environ.get("DICEFER_CACHE") or
          os.path.join(os.path.expanduser("~"), ".cache", "dicefer_jax"))


def _tfds_examples(config, faces: FaceSet, part: str):
  """(path, image resized to config.image_size) of one split of the dicefer_faces
  builder, one at a time."""
  # Imported here: tensorflow_datasets takes seconds to import, and only this
  # data source needs it.
  from dicefer_jax import tfds_builder  # pylint: disable=g-import-not-at-top
  ds = tfds_builder.load(faces.data_dir, part,
                         data_dir=config.tfds_dir or os.path.join(cache_root(config), "tfds"),
                         fold=config.fold, num_folds=config.num_folds, seed=config.split_seed)
  for ex in ds.as_numpy_iterator():
    yield ex["path"].decode(), face_images.resize_square(ex["image"][:, :, 0],
                                                         config.image_size)


def _missing_error(config, part: str, missing: list[str]) -> DataError:
  return DataError(f"the prepared TFDS copy lacks {len(missing)} image(s) of the "
                   f"{part} split (e.g. {missing[0]}): delete the stale copy in "
                   f"{config.tfds_dir or 'the tfds cache'} or set --config.tfds_dir")


def _tfds_part(config, faces: FaceSet, part: str, records: list[contract.Record]):
  """(images, labels, subjects) of one split read through the dicefer_faces builder,
  in the order of `records` (the files path's order), so that both sources train
  on the very same batches."""
  by_path = dict(_tfds_examples(config, faces, part))
  missing = [r.path for r in records if r.path not in by_path]
  if missing:
    raise _missing_error(config, part, missing)
  images = np.stack([by_path[r.path] for r in records])[..., None]
  labels, subjects = face_images.labels_and_subjects(records)
  return images.astype(np.uint8), labels, subjects


def _tfds_store(config, faces: FaceSet, parts: dict) -> image_store.ImageStore:
  """The images of both TFDS splits in one on-disk store, row i = faces.records[i],
  written one example at a time (`parts`: split name -> its records)."""
  row = {r.path: i for i, r in enumerate(faces.records)}
  size = config.image_size

  def fill(out):
    seen = np.zeros(len(faces.records), dtype=bool)
    for part, records in parts.items():
      for path, image in _tfds_examples(config, faces, part):
        if path in row:
          out[row[path], :, :, 0] = image
          seen[row[path]] = True
      missing = [r.path for r in records if not seen[row[r.path]]]
      if missing:
        raise _missing_error(config, part, missing)

  # The TFDS copy is per fold, so the fold is part of the name.
  key = image_store.store_key(
      faces.data_dir, faces.records, size,
      f"tfds{config.fold}of{config.num_folds}s{config.split_seed}")
  return image_store.open_or_write(
      os.path.join(cache_root(config), "image_stores", key + ".u8"),
      len(faces.records), size, fill)


def split_faces(config, faces: FaceSet) -> FaceData:
  """The train/test split of `faces` that config.fold/num_folds/split_seed name."""
  train, test, info = splits.split_records(
      faces.records, num_folds=config.num_folds, fold=config.fold, seed=config.split_seed)
  train, seen, info = splits.hold_out_seen(train, float(config.seen_holdout),
                                           config.split_seed, info)
  if config.data_source not in ("files", "tfds"):
    raise DataError(f"data_source={config.data_source!r} is unknown: use 'files' or 'tfds'")
  stream = image_store.should_stream(len(faces.records), config.image_size,
                                     config.stream_above_mb)
  if config.data_source == "tfds" and not stream:
    # The held-out seen images come from the builder's train split, like the rest
    # of their subjects' images.
    return FaceData(faces.data_dir, info, *_tfds_part(config, faces, "train", train),
                    *_tfds_part(config, faces, "test", test),
                    *(_tfds_part(config, faces, "train", seen) if seen else ()))
  index = {id(r): i for i, r in enumerate(faces.records)}
  if not stream:
    images = faces.images(config.image_size)
  elif config.data_source == "tfds":
    images = _tfds_store(config, faces, {"train": train, "test": test})
  else:
    images = faces.image_store(config.image_size, cache_root(config))

  def arrays(records):
    rows = np.array([index[id(r)] for r in records], dtype=np.int64)
    labels, subjects = face_images.labels_and_subjects(records)
    return images[rows], labels, subjects

  return FaceData(faces.data_dir, info, *arrays(train), *arrays(test),
                  *(arrays(seen) if seen else ()))
