"""Tests of image loading and the tf.data pair, classification and eval pipelines."""

import collections
import os
import re

import cv2
import numpy as np
import pytest

from dicefer_jax import contract, face_images
from dicefer_jax import input_pipeline as ip
from dicefer_jax.errors import DataError

SIZE = 8  # Tiny images keep every pipeline test well under a second.
BITS = SIZE  # One row of SIZE pixels encodes the index in binary.


def coded_images(n):
  """uint8 (n, SIZE, SIZE, 1) whose pixels spell their own index.

  Pixel (0, 0) is always 255 and the rest of row 0 is 0, so the image never
  standardises to a constant; row 1 holds the bits of the index. Standardisation
  is affine per image, so thresholding at the midpoint of min and max recovers
  the bits afterwards.
  """
  assert n < 2**BITS
  images = np.zeros((n, SIZE, SIZE, 1), np.uint8)
  images[:, 0, 0, 0] = 255
  bits = (np.arange(n)[:, None] >> np.arange(BITS)) & 1
  images[:, 1, :, 0] = bits * 255
  return images


def decode(batch):
  """Indices of standardised coded images (B, SIZE, SIZE, 1)."""
  lo = batch.min(axis=(1, 2, 3), keepdims=True)
  hi = batch.max(axis=(1, 2, 3), keepdims=True)
  bits = (batch > (lo + hi) / 2)[:, 1, :, 0]
  return bits.astype(np.int64) @ (1 << np.arange(BITS))


def take(ds, k):
  it = ds.as_numpy_iterator()
  return [next(it) for _ in range(k)]


def assert_standardised(x):
  flat = x.reshape(x.shape[0], -1)
  np.testing.assert_allclose(flat.mean(axis=1), 0.0, atol=1e-4)
  np.testing.assert_allclose(flat.std(axis=1), 1.0, atol=1e-3)


# ------------------------------------------------------------------------------
# face_images: decoding the contract's files (shared by the files and TFDS paths)


def test_load_images_keeps_pixels_and_resizes(tiny_faceset):
  records = contract.read_manifest(tiny_faceset)[:5]
  full = face_images.load_images(tiny_faceset, records, 112)
  assert full.shape == (5, 112, 112, 1) and full.dtype == np.uint8
  first = cv2.imread(os.path.join(tiny_faceset, records[0].path), cv2.IMREAD_GRAYSCALE)
  np.testing.assert_array_equal(full[0, :, :, 0], first)
  small = face_images.load_images(tiny_faceset, records, 28)
  assert small.shape == (5, 28, 28, 1) and small.dtype == np.uint8
  np.testing.assert_array_equal(
      small[0, :, :, 0], cv2.resize(first, (28, 28), interpolation=cv2.INTER_AREA))


def test_load_images_names_a_corrupt_file(tiny_faceset):
  records = contract.read_manifest(tiny_faceset)[:4]
  bad = os.path.join(tiny_faceset, records[2].path)
  with open(bad, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\nnot really a png")
  with pytest.raises(DataError, match="cannot decode image " + re.escape(bad)):
    face_images.load_images(tiny_faceset, records, 112)
  os.remove(bad)
  with pytest.raises(DataError, match=re.escape(bad) + " does not exist"):
    face_images.load_images(tiny_faceset, records, 112)


def test_labels_and_subjects(tiny_faceset):
  records = contract.read_manifest(tiny_faceset)
  labels, subjects = face_images.labels_and_subjects(records)
  assert labels.dtype == np.int32 and labels.shape == (len(records),)
  assert set(labels.tolist()) == set(range(contract.NUM_CLASSES))
  assert subjects[0] == "s0"


# ------------------------------------------------------------------------------
# pair_dataset


def small_set():
  """42 images: 3 classes, subjects s0..s4 (class 2 has one subject only), plus
  unknown-subject images in class 1."""
  labels, subjects = [], []
  for s in range(5):
    for _ in range(2):
      labels += [0, 1]
      subjects += [f"s{s}", f"s{s}"]
  labels += [1] * 6
  subjects += [""] * 6
  labels += [2] * 6
  subjects += ["s0"] * 6
  n = len(labels)
  return coded_images(n), np.array(labels), subjects


def test_pair_batches_have_static_shapes_and_dtypes():
  images, labels, subjects = small_set()
  ds = ip.pair_dataset(images, labels, subjects, batch_size=16, seed=0)
  spec = ds.element_spec
  assert spec["image_m"].shape == (16, SIZE, SIZE, 1)
  assert spec["image_n"].shape == (16, SIZE, SIZE, 1)
  assert spec["label"].shape == (16,)
  batch = take(ds, 1)[0]
  assert batch["image_m"].dtype == np.float32 and batch["label"].dtype == np.int32
  assert_standardised(batch["image_m"])
  assert_standardised(batch["image_n"])


def test_pairs_share_the_label_and_differ_in_subject():
  images, labels, subjects = small_set()
  ds = ip.pair_dataset(images, labels, subjects, batch_size=64, seed=1,
                       augment=False)
  partners = collections.defaultdict(set)
  for batch in take(ds, 8):
    m, n = decode(batch["image_m"]), decode(batch["image_n"])
    np.testing.assert_array_equal(labels[m], batch["label"])
    np.testing.assert_array_equal(labels[n], batch["label"])
    for i, j in zip(m, n):
      if subjects[i] and subjects[j] and labels[i] != 2:
        assert subjects[i] != subjects[j], (i, j)
      if labels[i] == 2:
        # Class 2 has one subject: any OTHER image of the class.
        assert i != j
      partners[i].add(j)
  # Unknown-subject images (indices 20..25) pair with anything else of class 1.
  unknown = [i for i in range(len(labels)) if not subjects[i]]
  assert any(p & set(unknown) for i, p in partners.items() if subjects[i] == "")
  assert all(i not in partners[i] for i in unknown)


def test_single_image_class_pairs_with_itself():
  images = coded_images(5)
  labels = np.array([0, 0, 0, 0, 3])
  sample = ip.pair_indices(labels, ["a", "b", "a", "b", "c"])
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  m, n, label = (t.numpy() for t in sample(tf.constant([0, 1], tf.int64), 200))
  assert set(label.tolist()) == {0, 3}
  np.testing.assert_array_equal(m[label == 3], 4)
  np.testing.assert_array_equal(n[label == 3], 4)
  subjects = np.array(["a", "b", "a", "b", "c"])
  assert (subjects[m[label == 0]] != subjects[n[label == 0]]).all()


def test_pair_labels_are_class_balanced():
  # Class 0 has 10x the images of the others: sampling must not follow that.
  labels = np.array([0] * 100 + [1] * 10 + [4] * 10 + [6] * 10)
  images = np.zeros((len(labels), 4, 4, 1), np.uint8)
  ds = ip.pair_dataset(images, labels, batch_size=100, seed=0, augment=False)
  counts = collections.Counter()
  for batch in take(ds, 40):
    counts.update(batch["label"].tolist())
  assert set(counts) == {0, 1, 4, 6}
  for c in counts.values():
    assert abs(c - 1000) < 150, counts


def test_pair_dataset_is_deterministic_per_seed():
  images, labels, subjects = small_set()
  make = lambda seed: take(ip.pair_dataset(images, labels, subjects, batch_size=8,
                                           seed=seed), 3)
  a, b, c = make(5), make(5), make(6)
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert any(not np.array_equal(x["image_m"], z["image_m"]) for x, z in zip(a, c))


def test_start_step_resumes_the_same_sequence():
  images, labels, subjects = small_set()
  full = take(ip.pair_dataset(images, labels, subjects, batch_size=4, seed=3), 3)
  resumed = take(ip.pair_dataset(images, labels, subjects, batch_size=4, seed=3,
                                 start_step=2), 1)[0]
  for key in resumed:
    np.testing.assert_array_equal(resumed[key], full[2][key])
  full = take(ip.classification_dataset(images, labels, batch_size=16, seed=3), 4)
  resumed = take(ip.classification_dataset(images, labels, batch_size=16, seed=3,
                                           start_step=3), 1)[0]
  for key in resumed:
    np.testing.assert_array_equal(resumed[key], full[3][key])


def test_augmentation_changes_images():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, 32, 32, 1), dtype=np.uint8)
  labels = np.zeros(6, np.int64)
  kwargs = dict(batch_size=16, seed=2)
  plain = take(ip.pair_dataset(images, labels, **kwargs, augment=False), 1)[0]
  rotated = take(ip.pair_dataset(images, labels, **kwargs, flip=False), 1)[0]
  flipped = take(ip.pair_dataset(images, labels, **kwargs,
                                 max_rotation_degrees=0.0), 1)[0]
  # Same seed, so the same images are drawn: only the augmentation differs.
  originals = plain["image_m"]
  assert not np.allclose(rotated["image_m"], originals, atol=1e-3)
  assert_standardised(rotated["image_m"])
  # Flip only: every image is its original or its exact mirror, both occur.
  same = np.isclose(flipped["image_m"], originals, atol=1e-4).all(axis=(1, 2, 3))
  mirror = np.isclose(flipped["image_m"], originals[:, :, ::-1],
                      atol=1e-4).all(axis=(1, 2, 3))
  assert (same | mirror).all()
  assert same.any() and mirror.any()
  # M and N are augmented independently: some pairs of the same image differ.
  assert not np.allclose(rotated["image_m"], rotated["image_n"])


def test_rotation_is_about_the_centre():
  # A bright centre dot stays at the centre under any rotation and flip.
  images = np.zeros((4, 33, 33, 1), np.float32)
  images[:, 16, 16, 0] = 1.0
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = ip.augment(tf.constant(images), tf.constant([3, 4], tf.int64)).numpy()
  assert (out[:, 16, 16, 0] > 0.5).all()
  assert (out.reshape(4, -1).argmax(axis=1) == 16 * 33 + 16).all()


def test_rotation_angles_stay_in_range():
  # A dot right of the centre moves along a circle: its angle is the rotation.
  n, size, centre = 64, 65, 32
  images = np.zeros((n, size, size, 1), np.float32)
  images[:, centre, centre + 20, 0] = 1.0
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = ip.augment(tf.constant(images), tf.constant([0, 9], tf.int64),
                   max_rotation_degrees=15.0, flip=False).numpy()[..., 0]
  ys, xs = np.mgrid[0:size, 0:size]
  mass = out.sum(axis=(1, 2))
  dy = (out * ys).sum(axis=(1, 2)) / mass - centre
  dx = (out * xs).sum(axis=(1, 2)) / mass - centre
  angles = np.degrees(np.arctan2(dy, dx))
  assert (np.abs(angles) <= 15.5).all(), angles
  assert angles.max() - angles.min() > 15.0
  np.testing.assert_allclose(np.hypot(dx, dy), 20.0, atol=0.5)


# ------------------------------------------------------------------------------
# classification_dataset


def test_classification_dataset_shuffles_whole_epochs():
  images = coded_images(12)
  labels = np.arange(12) % 7
  ds = ip.classification_dataset(images, labels, batch_size=4, seed=0,
                                 augment=False)
  assert ds.element_spec["image"].shape == (4, SIZE, SIZE, 1)
  batches = take(ds, 6)
  seen = np.concatenate([decode(b["image"]) for b in batches])
  got_labels = np.concatenate([b["label"] for b in batches])
  np.testing.assert_array_equal(labels[seen], got_labels)
  assert sorted(seen[:12]) == list(range(12))
  assert sorted(seen[12:]) == list(range(12))
  assert list(seen[:12]) != list(range(12))
  assert list(seen[:12]) != list(seen[12:])
  again = np.concatenate([decode(b["image"]) for b in take(
      ip.classification_dataset(images, labels, batch_size=4, seed=0,
                                augment=False), 6)])
  np.testing.assert_array_equal(seen, again)


def test_classification_dataset_augments_and_standardises():
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (5, 16, 16, 1), dtype=np.uint8)
  labels = np.arange(5)
  a = take(ip.classification_dataset(images, labels, batch_size=5, seed=0), 1)[0]
  b = take(ip.classification_dataset(images, labels, batch_size=5, seed=0,
                                     augment=False), 1)[0]
  np.testing.assert_array_equal(a["label"], b["label"])
  assert not np.allclose(a["image"], b["image"])
  assert_standardised(a["image"])


# ------------------------------------------------------------------------------
# eval_dataset


def test_eval_dataset_pads_the_last_batch():
  images = coded_images(10)
  labels = np.arange(10) % 7
  batches = list(ip.eval_dataset(images, labels, batch_size=4).as_numpy_iterator())
  assert len(batches) == 3
  for b in batches:
    assert b["image"].shape == (4, SIZE, SIZE, 1) and b["image"].dtype == np.float32
    assert b["label"].dtype == np.int32 and b["mask"].dtype == bool
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(mask, [True] * 10 + [False] * 2)
  valid = np.concatenate([b["image"] for b in batches])[mask]
  np.testing.assert_array_equal(decode(valid), np.arange(10))
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[mask],
                                labels)
  assert_standardised(valid)
  np.testing.assert_array_equal(batches[-1]["image"][2:], 0.0)


def test_eval_dataset_exact_multiple_has_no_padding():
  batches = list(ip.eval_dataset(coded_images(8), np.zeros(8, int),
                                 batch_size=4).as_numpy_iterator())
  assert len(batches) == 2 and all(b["mask"].all() for b in batches)


# ------------------------------------------------------------------------------
# Input checks


def test_bad_inputs():
  with pytest.raises(DataError, match="empty"):
    ip.eval_dataset(np.zeros((0, 4, 4, 1), np.uint8), np.zeros(0, int), batch_size=2)
  with pytest.raises(ValueError, match="labels must have shape"):
    ip.pair_dataset(coded_images(4), np.zeros(3, int), batch_size=2, seed=0)
  with pytest.raises(ValueError, match="subjects must have length"):
    ip.pair_dataset(coded_images(4), np.zeros(4, int), ["a"], batch_size=2, seed=0)
  with pytest.raises(ValueError, match="batch_size"):
    ip.classification_dataset(coded_images(4), np.zeros(4, int), batch_size=0, seed=0)


def test_no_pipeline_autotunes():
  """Bug it catches: with tf.data autotuning on, deleting a training iterator
  waited for the autotuner's sleeping thread, up to about a minute of idle time
  between the demo's stages. Every training and evaluation pipeline must run
  with fixed parallelism instead."""
  images, labels, subjects = small_set()
  for ds in (ip.pair_dataset(images, labels, subjects, batch_size=4, seed=0),
             ip.classification_dataset(images, labels, batch_size=4, seed=0),
             ip.eval_dataset(images, labels, batch_size=4)):
    assert ds.options().autotune.enabled is False
    assert ds.options().deterministic is True
