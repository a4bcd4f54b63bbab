"""tf.data pipelines of same-expression pairs, single images and evaluation batches.

Most face sets are small (thousands of 112x112 grayscale images, a few tens of
MB), so every PNG is decoded once into a uint8 array (`face_images.load_images`)
and the pipelines only gather from that array: no per-step file IO or PNG
decoding. A set larger than memory comes as an `image_store.ImageStore` instead
(decoded once into a file): the pipelines gather the same rows from it, by the
same index tensors, through a `tf.numpy_function`, so the batches are the same.

All randomness is stateless and indexed by the batch number: batch b of a
pipeline is a pure function of (seed, b). The same seed therefore gives the same
sequence of batches regardless of thread scheduling, parallel map or prefetch
depth, and a run can be resumed at any step by skipping batches.

Batches are dicts of numpy arrays once iterated with `as_numpy_iterator`:
- `pair_dataset`: {"image_m", "image_n"} float32 (B, S, S, 1), "label" int32 (B,)
- `classification_dataset`: {"image"} float32 (B, S, S, 1), "label" int32 (B,)
- `eval_dataset`: {"image", "label", "mask"}; the last batch is padded, mask False
Every image is standardised per image (zero mean, unit variance), as in training.

TensorFlow is kept off any GPU at import: JAX owns the accelerator, and TF would
otherwise reserve most of its memory.
"""

import math
import os
from typing import Iterator, Sequence

import numpy as np

# Must be set before TensorFlow is first imported; setdefault keeps a user's choice.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import tensorflow as tf  # pylint: disable=g-import-not-at-top

from dicefer_jax.errors import DataError
from dicefer_jax.image_store import ImageStore


def _hide_gpus_from_tf() -> None:
  try:
    tf.config.set_visible_devices([], "GPU")
  except (RuntimeError, ValueError):
    # TF already initialised its devices elsewhere in this process: too late to
    # hide them, and nothing this module does would place work on them anyway.
    pass


_hide_gpus_from_tf()

# Streams of randomness within one seed, so pairs, augmentation and shuffling of
# the same seed never reuse the same random numbers.
_PAIR_STREAM = 1
_CLASSIFICATION_STREAM = 2
_SHUFFLE_STREAM = 3


# ------------------------------------------------------------------------------
# Loading.


# ------------------------------------------------------------------------------
# Shared pieces.


Images = np.ndarray | ImageStore


def _check_images_labels(images: Images, labels: Sequence[int]
                         ) -> tuple[Images, np.ndarray]:
  if not isinstance(images, ImageStore):  # a store is never read whole
    images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] != 1 or images.shape[1] != images.shape[2]:
    raise ValueError(
        f"images must have shape (N, S, S, 1) or (N, S, S), got {images.shape}")
  labels = np.asarray(labels)
  if labels.shape != (images.shape[0],):
    raise ValueError(
        f"labels must have shape ({images.shape[0]},), got {labels.shape}")
  if not np.issubdtype(labels.dtype, np.integer) or (labels < 0).any():
    raise ValueError("labels must be non-negative integers")
  if images.shape[0] == 0:
    raise DataError("the face set is empty: there are no images to batch")
  return images, labels.astype(np.int32)


def _image_gather(images: Images):
  """A function (int64 index tensor [K]) -> uint8 images (K, S, S, 1).

  An array becomes a graph constant gathered with tf.gather; a store is read by
  the same indices through numpy (stateless: the rows depend only on the index).
  """
  size = images.shape[1]
  if not isinstance(images, ImageStore):
    table = tf.constant(images)
    return lambda index: tf.gather(table, index)

  def gather(index):
    out = tf.numpy_function(images.gather, [index], tf.uint8, stateful=False)
    # numpy_function loses the static shape; augmentation needs the batch size.
    return tf.ensure_shape(out, index.shape.concatenate((size, size, 1)))

  return gather


def _check_batch_size(batch_size: int) -> int:
  if int(batch_size) != batch_size or batch_size < 1:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
  return int(batch_size)


def _base_seed(seed: int, stream: int) -> tf.Tensor:
  """A [2] int64 stateless seed for one stream of one user seed."""
  # A numpy hash spreads nearby user seeds (0, 1, 2) over unrelated RNG keys.
  key = np.random.default_rng([int(seed) & 0xFFFFFFFF, stream]).integers(
      0, 2**62, size=2, dtype=np.int64)
  return tf.constant(key, dtype=tf.int64)


def standardize(images: tf.Tensor) -> tf.Tensor:
  """Per-image standardisation of a float batch (B, S, S, C)."""
  return tf.image.per_image_standardization(images)


def augment(images: tf.Tensor, seed: tf.Tensor, *,
            max_rotation_degrees: float = 15.0, flip: bool = True) -> tf.Tensor:
  """Random rotation and horizontal flip, independently per image.

  The rotation angle is uniform in [-max, max] degrees about the image centre,
  bilinear, reflecting at the border (no black corners for the model to learn
  about). Rotation and flip are folded into one projective transform, so the
  batch is resampled once.

  Args:
    images: float32 (B, S, S, C) with a static batch size.
    seed: a [2] integer stateless seed.
    max_rotation_degrees: the largest rotation; 0 disables rotation.
    flip: whether to flip half of the images horizontally.

  Returns:
    float32 (B, S, S, C).
  """
  batch, height, width = images.shape[0], images.shape[1], images.shape[2]
  rot_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  angles = tf.random.stateless_uniform(
      [batch], rot_seed, -max_rotation_degrees, max_rotation_degrees) * (math.pi / 180)
  if flip:
    sign = tf.where(tf.random.stateless_uniform([batch], flip_seed) < 0.5, -1.0, 1.0)
  else:
    sign = tf.ones([batch])
  # The op maps each OUTPUT pixel (x, y) to the input point it samples:
  #   in = R(angle) @ F @ (out - c) + c, with F = diag(sign, 1) the flip and c the
  # centre of the pixel grid.
  cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
  cos, sin = tf.cos(angles), tf.sin(angles)
  zeros = tf.zeros([batch])
  transforms = tf.stack([
      sign * cos, -sin, cx - sign * cos * cx + sin * cy,
      sign * sin, cos, cy - sign * sin * cx - cos * cy,
      zeros, zeros,
  ], axis=1)
  return tf.raw_ops.ImageProjectiveTransformV3(
      images=images, transforms=transforms,
      output_shape=tf.constant([height, width], tf.int32),
      fill_value=tf.constant(0.0), interpolation="BILINEAR", fill_mode="REFLECT")


def _prepare(images: tf.Tensor, seed: tf.Tensor | None, augment_images: bool,
             max_rotation_degrees: float, flip: bool) -> tf.Tensor:
  """uint8 batch -> float32, optionally augmented, always standardised."""
  x = tf.cast(images, tf.float32)
  if augment_images and (max_rotation_degrees > 0 or flip):
    x = augment(x, seed, max_rotation_degrees=max_rotation_degrees, flip=flip)
  return standardize(x)


# Parallel map calls and prefetched batches are fixed, and tf.data's autotuning
# is off. With autotuning on, deleting an iterator waited for the autotuner's
# thread, which sleeps between optimisations for periods that grow to about a
# minute: 36-41 s of an idle process at the end of the demo's 1,500-step baseline
# stage, 2-9 s at the end of short stages (measured with process_time ~0 during
# the wait). The batches are the same either way: every map is deterministic.
_PARALLEL_CALLS = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count() or 1)
_PREFETCH_BATCHES = 4


def _finish(ds: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True
  options.autotune.enabled = False
  return ds.with_options(options).prefetch(_PREFETCH_BATCHES)


def _steps_from(start_step: int) -> tf.data.Dataset:
  if int(start_step) != start_step or start_step < 0:
    raise ValueError(f"start_step must be a non-negative integer, got {start_step}")
  return tf.data.Dataset.counter(start=int(start_step), dtype=tf.int64)


def as_numpy_iterator(ds: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
  """Iterates a dataset as dicts of numpy arrays (ready for jax.device_put)."""
  return ds.as_numpy_iterator()


# ------------------------------------------------------------------------------
# Pairs.


def _pair_tables(labels: np.ndarray, subjects: Sequence[str]) -> dict[str, np.ndarray]:
  """Index tables that let the graph draw a partner N for any image M in O(1).

  Images are sorted by (label, subject group), where an image of unknown subject
  is a group of its own. Each label then owns a contiguous run of `order`, and
  within it the images of M's subject form a contiguous block. N is drawn
  uniformly from the run with that block cut out: the same label, a different
  subject. If the label has one subject only, the block shrinks to M itself (any
  other image of the label); if the label has one image, N = M.
  """
  n = len(labels)
  group_ids: dict[str, int] = {}
  groups = np.empty(n, dtype=np.int64)
  for i, s in enumerate(subjects):
    # Known subjects get ids 0..K-1 and unknown images K, K+1, ... (made unique by
    # the offset n): two unknowns are never assumed to be the same person.
    groups[i] = group_ids.setdefault(s, len(group_ids)) if s else n + i
  order = np.lexsort((np.arange(n), groups, labels))
  sorted_labels = labels[order]
  sorted_groups = groups[order]
  rank = np.empty(n, dtype=np.int64)
  rank[order] = np.arange(n)

  num_labels = int(labels.max()) + 1
  label_count = np.bincount(labels, minlength=num_labels).astype(np.int64)
  label_offset = np.concatenate([[0], np.cumsum(label_count)[:-1]]).astype(np.int64)

  # Contiguous (label, group) blocks over the sorted order.
  boundary = np.ones(n, dtype=bool)
  boundary[1:] = (sorted_labels[1:] != sorted_labels[:-1]) | (
      sorted_groups[1:] != sorted_groups[:-1])
  block_id = np.cumsum(boundary) - 1
  block_first = np.flatnonzero(boundary)
  block_len = np.diff(np.append(block_first, n))
  sorted_start = block_first[block_id] - label_offset[sorted_labels]
  sorted_size = block_len[block_id]
  block_start = np.empty(n, dtype=np.int64)
  block_size = np.empty(n, dtype=np.int64)
  block_start[order] = sorted_start
  block_size[order] = sorted_size

  own_count = label_count[labels]
  single_subject = block_size == own_count
  # One subject for this label: exclude only M itself.
  block_start = np.where(single_subject, rank - label_offset[labels], block_start)
  block_size = np.where(single_subject, 1, block_size)
  # One image for this label: nothing to exclude, N = M.
  block_size = np.where(own_count == 1, 0, block_size)
  return dict(order=order.astype(np.int64), label_offset=label_offset,
              label_count=label_count, block_start=block_start,
              block_size=block_size)


def _uniform_index(seed: tf.Tensor, counts: tf.Tensor) -> tf.Tensor:
  """One uniform integer in [0, counts[i]) per entry of counts (int64)."""
  u = tf.random.stateless_uniform(tf.shape(counts), seed, dtype=tf.float64)
  draw = tf.cast(tf.floor(u * tf.cast(counts, tf.float64)), tf.int64)
  return tf.minimum(draw, tf.maximum(counts - 1, 0))


def pair_indices(labels: np.ndarray, subjects: Sequence[str] | None = None):
  """A function (seed [2], batch_size) -> (m, n, label) of sampled index pairs.

  Exposed for tests and tools that want the pairs without the images. Labels
  are drawn uniformly over the classes present; M uniformly within the label;
  N from a different subject when subjects are known (see `_pair_tables`).
  """
  labels = np.asarray(labels, dtype=np.int32)
  if subjects is None:
    subjects = [""] * len(labels)
  if len(subjects) != len(labels):
    raise ValueError(
        f"subjects must have length {len(labels)}, got {len(subjects)}")
  tables = {k: tf.constant(v) for k, v in _pair_tables(labels, subjects).items()}
  classes = tf.constant(np.unique(labels).astype(np.int64))
  num_classes = int(classes.shape[0])

  def sample(seed: tf.Tensor, batch_size: int):
    label_seed, m_seed, n_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 3))
    which = tf.random.stateless_uniform(
        [batch_size], label_seed, 0, num_classes, dtype=tf.int64)
    label = tf.gather(classes, which)
    offset = tf.gather(tables["label_offset"], label)
    count = tf.gather(tables["label_count"], label)
    m = tf.gather(tables["order"], offset + _uniform_index(m_seed, count))
    start = tf.gather(tables["block_start"], m)
    size = tf.gather(tables["block_size"], m)
    r = _uniform_index(n_seed, count - size)
    n = tf.gather(tables["order"], offset + r + tf.where(r >= start, size, 0))
    return m, n, tf.cast(label, tf.int32)

  return sample


def pair_dataset(images: Images, labels: Sequence[int],
                 subjects: Sequence[str] | None = None, *, batch_size: int,
                 seed: int, augment: bool = True,  # pylint: disable=redefined-outer-name
                 max_rotation_degrees: float = 15.0, flip: bool = True,
                 start_step: int = 0) -> tf.data.Dataset:
  """Infinite, class-balanced batches of same-expression pairs (M, N).

  Args:
    images: uint8 (N, S, S, 1) (or (N, S, S)), e.g. from `load_images`, or an
      `ImageStore` of them on disk.
    labels: expression index per image.
    subjects: subject id per image, "" where unknown (None: all unknown). M and N
      come from different subjects whenever that label has two or more.
    batch_size: pairs per batch.
    seed: the same seed gives the same sequence of batches.
    augment: random rotation and flip, independently for M and N.
    max_rotation_degrees: rotations are uniform in [-max, max] degrees.
    flip: random horizontal flips.
    start_step: index of the first batch. Batch b depends only on (seed, b), so
      a run resumed at step k with start_step=k sees exactly the batches an
      uninterrupted run would have.

  Returns:
    A dataset of {"image_m", "image_n": float32 (B, S, S, 1), "label": int32 (B,)},
    standardised per image, with static shapes.
  """
  images, labels = _check_images_labels(images, labels)
  batch_size = _check_batch_size(batch_size)
  sample = pair_indices(labels, subjects)
  gather = _image_gather(images)
  base = _base_seed(seed, _PAIR_STREAM)
  size = images.shape[1]

  def make_batch(step):
    pair_seed, m_seed, n_seed = tf.unstack(tf.random.experimental.stateless_split(
        tf.random.experimental.stateless_fold_in(base, step), 3))
    m, n, label = sample(pair_seed, batch_size)
    batch = {
        "image_m": _prepare(gather(m), m_seed, augment,
                            max_rotation_degrees, flip),
        "image_n": _prepare(gather(n), n_seed, augment,
                            max_rotation_degrees, flip),
        "label": label,
    }
    return {
        "image_m": tf.ensure_shape(batch["image_m"], (batch_size, size, size, 1)),
        "image_n": tf.ensure_shape(batch["image_n"], (batch_size, size, size, 1)),
        "label": tf.ensure_shape(batch["label"], (batch_size,)),
    }

  ds = _steps_from(start_step).map(
      make_batch, num_parallel_calls=_PARALLEL_CALLS, deterministic=True)
  return _finish(ds)


# ------------------------------------------------------------------------------
# Single images.


def classification_dataset(images: Images, labels: Sequence[int], *,
                           batch_size: int, seed: int, augment: bool = True,  # pylint: disable=redefined-outer-name
                           max_rotation_degrees: float = 15.0, flip: bool = True,
                           start_step: int = 0) -> tf.data.Dataset:
  """Infinite batches of single images, reshuffled every epoch.

  Each epoch is a fresh seeded permutation of all images (so every image is seen
  once per epoch); batches run across epoch boundaries. Same augmentation and
  standardisation as `pair_dataset`; `start_step` resumes exactly as there.

  Returns:
    A dataset of {"image": float32 (B, S, S, 1), "label": int32 (B,)}.
  """
  images, labels = _check_images_labels(images, labels)
  batch_size = _check_batch_size(batch_size)
  gather = _image_gather(images)
  label_table = tf.constant(labels)
  num = images.shape[0]
  size = images.shape[1]
  shuffle_key = _base_seed(seed, _SHUFFLE_STREAM)[0]
  base = _base_seed(seed, _CLASSIFICATION_STREAM)

  def make_batch(step):
    k = step * batch_size + tf.range(batch_size, dtype=tf.int64)
    epoch, pos = k // num, k % num
    # One permutation per epoch, keyed by (seed, epoch). The raw op is used
    # because tf.random.experimental.index_shuffle mis-pads per-row [n, 2] seeds.
    seeds = tf.stack([tf.fill([batch_size], shuffle_key), epoch,
                      tf.zeros([batch_size], tf.int64)], axis=1)
    index = tf.raw_ops.RandomIndexShuffle(
        index=pos, seed=seeds,
        max_index=tf.fill([batch_size], tf.constant(num - 1, tf.int64)))
    image = _prepare(gather(index),
                     tf.random.experimental.stateless_fold_in(base, step),
                     augment, max_rotation_degrees, flip)
    return {"image": tf.ensure_shape(image, (batch_size, size, size, 1)),
            "label": tf.ensure_shape(tf.gather(label_table, index), (batch_size,))}

  ds = _steps_from(start_step).map(
      make_batch, num_parallel_calls=_PARALLEL_CALLS, deterministic=True)
  return _finish(ds)


# ------------------------------------------------------------------------------
# Evaluation.


def eval_dataset(images: Images, labels: Sequence[int], *,
                 batch_size: int) -> tf.data.Dataset:
  """One pass over all images in order, padded to whole batches.

  Image i is item i % B of batch i // B. The last batch is filled up with zero
  images (mask False, label 0) so every batch has the same static shape and a
  jitted eval step compiles once; weight metrics by the mask.

  Returns:
    A finite dataset of {"image": float32 (B, S, S, 1), "label": int32 (B,),
    "mask": bool (B,)}, standardised per image, not augmented.
  """
  images, labels = _check_images_labels(images, labels)
  batch_size = _check_batch_size(batch_size)
  gather = _image_gather(images)
  label_table = tf.constant(labels)
  num = images.shape[0]
  size = images.shape[1]

  def make_batch(step):
    index = step * batch_size + tf.range(batch_size, dtype=tf.int64)
    mask = index < num
    safe = tf.minimum(index, num - 1)
    image = tf.where(mask[:, None, None, None],
                     tf.cast(gather(safe), tf.float32), 0.0)
    label = tf.where(mask, tf.gather(label_table, safe), 0)
    return {"image": tf.ensure_shape(standardize(image), (batch_size, size, size, 1)),
            "label": tf.ensure_shape(label, (batch_size,)),
            "mask": tf.ensure_shape(mask, (batch_size,))}

  num_batches = -(-num // batch_size)
  ds = tf.data.Dataset.range(num_batches).map(
      make_batch, num_parallel_calls=_PARALLEL_CALLS, deterministic=True)
  return _finish(ds)
