"""Loading a face set for training: from the PNG files or through TFDS, same split."""

import numpy as np

from dicefer_jax import data as data_lib


def test_tfds_source_gives_the_same_split_as_the_files(tiny_config, tmp_path):
  from_files = data_lib.load_data(tiny_config)
  tiny_config.data_source = "tfds"
  tiny_config.tfds_dir = str(tmp_path / "tfds")
  from_tfds = data_lib.load_data(tiny_config)
  for part in ("train", "test"):
    a_images, b_images = getattr(from_files, f"{part}_images"), getattr(from_tfds, f"{part}_images")
    assert a_images.shape == b_images.shape == (a_images.shape[0], 32, 32, 1)
    # TFDS may order examples differently: compare as multisets of (subject, label, image).
    key = lambda d: sorted(zip(getattr(d, f"{part}_subjects"),
                               getattr(d, f"{part}_labels").tolist(),
                               [im.tobytes() for im in getattr(d, f"{part}_images")]))
    assert key(from_files) == key(from_tfds)
  assert not set(from_tfds.train_subjects) & set(from_tfds.test_subjects)
  np.testing.assert_array_equal(np.bincount(from_files.test_labels, minlength=7),
                                np.bincount(from_tfds.test_labels, minlength=7))
