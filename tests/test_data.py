"""Loading a face set for training: decoded once, split by config, files or TFDS."""

import numpy as np

from dicefer_jax import data as data_lib
from dicefer_jax import face_images


def test_tfds_source_gives_the_same_split_in_the_same_order(tiny_config, tmp_path):
  """Bug: the TFDS path returned its own example order, so switching data_source
  changed the training batches (and the config check had to refuse the switch).
  The held-out images of seen subjects come out the same way too."""
  tiny_config.seen_holdout = 0.25
  faces = data_lib.load_face_set(tiny_config.data_dir)
  from_files = data_lib.split_faces(tiny_config, faces)
  tiny_config.data_source = "tfds"
  tiny_config.tfds_dir = str(tmp_path / "tfds")
  from_tfds = data_lib.split_faces(tiny_config, faces)
  assert len(from_tfds.seen_labels) > 0
  for part in ("train", "test", "seen"):
    a, b = (getattr(from_files, f"{part}_images"), getattr(from_tfds, f"{part}_images"))
    assert a.shape == b.shape == (a.shape[0], 32, 32, 1)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(getattr(from_files, f"{part}_labels"),
                                  getattr(from_tfds, f"{part}_labels"))
    assert getattr(from_files, f"{part}_subjects") == getattr(from_tfds, f"{part}_subjects")
  assert not set(from_tfds.train_subjects) & set(from_tfds.test_subjects)


def test_a_face_set_is_decoded_once_per_image_size(tiny_config, monkeypatch):
  """Bug: every fold (and run then evaluate) decoded every image again."""
  calls = []
  original = face_images.load_images

  def counting(data_dir, records, size):
    calls.append(size)
    return original(data_dir, records, size)

  monkeypatch.setattr(face_images, "load_images", counting)
  faces = data_lib.load_face_set(tiny_config.data_dir)
  folds = []
  for fold in range(tiny_config.num_folds):
    tiny_config.fold = fold
    folds.append(data_lib.split_faces(tiny_config, faces))
  assert calls == [tiny_config.image_size]
  # The folds still differ and each row is the image of its record.
  assert len({tuple(sorted(set(f.test_subjects))) for f in folds}) == tiny_config.num_folds
  first = folds[0]
  np.testing.assert_array_equal(
      first.test_images, original(tiny_config.data_dir,
                                  [r for r in faces.records
                                   if r.subject in set(first.test_subjects)],
                                  tiny_config.image_size))
