"""Face sets larger than memory: read from an on-disk store, same batches as in memory.

Streaming is forced with `stream_above_mb = 0` on the tiny face set; every
pipeline must then yield exactly (np.array_equal) the batches of the in-memory
path, from the start and resumed, and training must be fed the same batches.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dicefer_jax import contract, data as data_lib, image_store, models, train
from dicefer_jax import input_pipeline as ip


@pytest.fixture
def both(tiny_config, tmp_path):
  """(config, in-memory FaceData, streamed FaceData, streamed config)."""
  tiny_config.synthetic.cache_dir = str(tmp_path / "cache")
  faces = data_lib.load_face_set(tiny_config.data_dir)
  in_memory = data_lib.split_faces(tiny_config, faces)
  streamed_config = tiny_config.copy_and_resolve_references()
  streamed_config.stream_above_mb = 0
  streamed = data_lib.split_faces(streamed_config, faces)
  return tiny_config, in_memory, streamed, streamed_config


def _take(ds, k):
  it = ip.as_numpy_iterator(ds)
  return [next(it) for _ in range(k)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      assert np.array_equal(x[key], y[key]), key


def test_small_sets_stay_in_memory_and_threshold_zero_streams(both, tmp_path):
  config, in_memory, streamed, _ = both
  assert isinstance(in_memory.train_images, np.ndarray)
  assert isinstance(streamed.train_images, image_store.ImageStore)
  assert isinstance(streamed.test_images, image_store.ImageStore)
  # The decoded pixels are the in-memory path's, row for row.
  assert np.array_equal(np.asarray(streamed.train_images), in_memory.train_images)
  assert np.array_equal(np.asarray(streamed.test_images), in_memory.test_images)
  # Views index like the arrays do (the evaluator subsamples them).
  idx = np.array([5, 0, 3])
  assert np.array_equal(np.asarray(streamed.test_images[idx]), in_memory.test_images[idx])
  assert np.array_equal(streamed.train_images[2], in_memory.train_images[2])
  # One file per face set and size, reused by every fold and run.
  (name,) = os.listdir(tmp_path / "cache" / "image_stores")
  n = len(in_memory.train_labels) + len(in_memory.test_labels)
  assert os.path.getsize(tmp_path / "cache" / "image_stores" / name) == (
      n * config.image_size ** 2)
  assert image_store.should_stream(420_000, 112, 2048)  # AffectNet, 4.9 GiB
  assert not image_store.should_stream(n, config.image_size, 2048)


@pytest.mark.parametrize("stage", ["stage1", "stage3"])
def test_training_batches_are_identical_from_disk_and_when_resumed(both, stage):
  """stage1 reads pairs (pair_dataset), stage3 single images (classification)."""
  config, in_memory, streamed, streamed_config = both
  for start in (0, 3):
    a = _take(train.stage_dataset(stage, config, in_memory, start), 3)
    b = _take(train.stage_dataset(stage, streamed_config, streamed, start), 3)
    _assert_same_batches(a, b)
  # Resumed at step 3 = steps 3.. of an uninterrupted streamed run.
  _assert_same_batches(
      _take(train.stage_dataset(stage, streamed_config, streamed, 0), 5)[3:],
      _take(train.stage_dataset(stage, streamed_config, streamed, 3), 2))


def test_eval_batches_are_identical_from_disk(both):
  config, in_memory, streamed, _ = both
  for part in ("train", "test"):
    images_a = getattr(in_memory, f"{part}_images")
    images_b = getattr(streamed, f"{part}_images")
    labels = getattr(in_memory, f"{part}_labels")
    a = list(ip.as_numpy_iterator(ip.eval_dataset(images_a, labels, batch_size=16)))
    b = list(ip.as_numpy_iterator(ip.eval_dataset(images_b, labels, batch_size=16)))
    _assert_same_batches(a, b)
    assert sum(int(x["mask"].sum()) for x in b) == len(labels)


class _NullWriter:

  def write(self, *args):
    pass


def _recording_step(fed):
  """A make_step whose step records the batch it is fed (and trains nothing):
  what train_stage feeds is what this test is about, not the model."""
  def make_step(stage, model, config, optimizers):
    del stage, model, config, optimizers

    def step(state, batch):
      jax.debug.callback(lambda s, b: fed.append((int(s), jax.tree.map(np.asarray, b))),
                         state.step + 1, batch)
      return state.replace(step=state.step + 1), {"finite": jnp.array(True)}
    return step
  return make_step


def test_train_stage_is_fed_the_same_batches_from_disk_and_resumed(both, tmp_path):
  """train_stage on the streamed set, stopped at step 2 and resumed, is fed the
  in-memory pipeline's batches 0..3 (as the device-side arrays it steps on)."""
  config, in_memory, streamed, streamed_config = both
  model = models.build_model(config.model, contract.NUM_CLASSES)
  fed = []
  streamed_config.checkpoint_every = 2
  for num_steps in (2, 4):
    streamed_config.stage1.num_steps = num_steps
    train.train_stage("stage1", streamed_config, str(tmp_path / "wd"), model, streamed,
                      _NullWriter(), _recording_step(fed))
  jax.effects_barrier()
  assert [s for s, _ in fed] == [1, 2, 3, 4]
  _assert_same_batches(_take(train.stage_dataset("stage1", config, in_memory, 0), 4),
                       [b for _, b in fed])


def test_tfds_source_streams_the_same_pixels(both, tmp_path):
  _, in_memory, _, streamed_config = both
  streamed_config.data_source = "tfds"
  streamed_config.tfds_dir = str(tmp_path / "tfds")
  faces = data_lib.load_face_set(streamed_config.data_dir)
  from_tfds = data_lib.split_faces(streamed_config, faces)
  assert isinstance(from_tfds.train_images, image_store.ImageStore)
  assert np.array_equal(np.asarray(from_tfds.train_images), in_memory.train_images)
  assert np.array_equal(np.asarray(from_tfds.test_images), in_memory.test_images)
