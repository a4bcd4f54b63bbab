"""Throughput of the tf.data pipelines on a synthetic in-memory face set.

Prints pairs/s of `pair_dataset` (with and without augmentation) and images/s of
`classification_dataset`, batch 32 at 112 px by default:

  python benchmarks/input_pipeline_bench.py [--batch_size=32] [--image_size=112]

The set is random uint8 images held in memory, as `load_images` would return, so
this measures sampling, augmentation and standardisation, not PNG decoding.
"""

import os
import sys
import time

from absl import app
from absl import flags
import numpy as np

# Runnable from a checkout without `pip install -e .`: put the repo root first.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dicefer_jax import input_pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position

_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Pairs per batch.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 112, "Image side in pixels.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 2000, "Images in the synthetic set.")
_NUM_SUBJECTS = flags.DEFINE_integer("num_subjects", 40, "Subjects in the set.")
_SECONDS = flags.DEFINE_float("seconds", 5.0, "Timed duration of each measurement.")


def _rate(ds, batch_size: int, seconds: float) -> float:
  """Items per second of a dataset, after a warm-up that excludes tracing."""
  it = ds.as_numpy_iterator()
  for _ in range(5):
    next(it)
  batches = 0
  start = time.perf_counter()
  while time.perf_counter() - start < seconds:
    next(it)
    batches += 1
  return batches * batch_size / (time.perf_counter() - start)


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  n, size, batch = _NUM_IMAGES.value, _IMAGE_SIZE.value, _BATCH_SIZE.value
  images = rng.integers(0, 256, (n, size, size, 1), dtype=np.uint8)
  labels = rng.integers(0, 7, n)
  subjects = [f"s{i}" for i in rng.integers(0, _NUM_SUBJECTS.value, n)]
  print(f"{n} random {size}x{size} images, {_NUM_SUBJECTS.value} subjects, "
        f"batch {batch}")
  for augment in (True, False):
    ds = input_pipeline.pair_dataset(images, labels, subjects, batch_size=batch,
                                     seed=0, augment=augment)
    print(f"pair_dataset augment={augment}: "
          f"{_rate(ds, batch, _SECONDS.value):,.0f} pairs/s")
  ds = input_pipeline.classification_dataset(images, labels, batch_size=batch, seed=0)
  print(f"classification_dataset augment=True: "
        f"{_rate(ds, batch, _SECONDS.value):,.0f} images/s")


if __name__ == "__main__":
  app.run(main)
