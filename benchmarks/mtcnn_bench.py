r"""MTCNN preprocessing throughput on 250x250 frames (the capture tool's crops).

Makes jittered 250x250 crops of scikit-image's astronaut portrait and pushes
them through data_tools.preprocess's worker pool in two ways:

  steady   worker processes as run_preprocess spawns them, each with its MTCNN
           built and warmed up before the clock starts; images/s over all
           workers = what a long run sustains (detect + check + align + PNG).
  end2end  run_preprocess itself into a fresh folder, process start-up
           (torch import, MTCNN build) included: what a short run sees.

Usage:
  python benchmarks/mtcnn_bench.py                      # workers 1 and 2, CPU
  python benchmarks/mtcnn_bench.py --workers=1,2,4 --num_images=200 \
      --device=cuda
  # Why run_preprocess gives each worker one torch thread:
  python benchmarks/mtcnn_bench.py --workers=1 --single_worker_threads=both

Needs the data extra (facenet-pytorch, torch) and scikit-image.
"""

import multiprocessing
import os
import sys
import tempfile
import time

from absl import app
from absl import flags
import cv2
import numpy as np

# Run as a script (`python benchmarks/mtcnn_bench.py`): make the repository
# importable without installing it.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data_tools import face_quality  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_tools import preprocess  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_tools import preprocess_pool  # pylint: disable=g-import-not-at-top,wrong-import-position
from dicefer_jax import contract  # pylint: disable=g-import-not-at-top,wrong-import-position
from dicefer_jax import face_detector  # pylint: disable=g-import-not-at-top,wrong-import-position
from dicefer_jax import fileio  # pylint: disable=g-import-not-at-top,wrong-import-position

_NUM_IMAGES = flags.DEFINE_integer("num_images", 60, "Frames per measurement.")
_WORKERS = flags.DEFINE_list("workers", ["1", "2"], "Worker process counts to measure.")
_DEVICE = flags.DEFINE_enum("device", "cpu", face_detector.DEVICES, "Where MTCNN runs.")
_TORCH_THREADS = flags.DEFINE_enum(
    "single_worker_threads", "one", ["both", "default", "one"],
    "torch intra-op threads for the 1-worker steady case: 'one' as "
    "run_preprocess does, 'default' torch's own choice (all cores), 'both'.")
_END2END = flags.DEFINE_bool("end2end", True, "Also time run_preprocess end to end.")


def make_frames(folder: str, num: int, seed: int = 0) -> list[str]:
  """Writes `num` jittered 250x250 JPEG crops around the astronaut's face."""
  from skimage import data  # pylint: disable=g-import-not-at-top
  image = data.astronaut()[:, :, ::-1]  # BGR for cv2.
  rng = np.random.default_rng(seed)
  paths = []
  for i in range(num):
    # Shift, zoom and brightness jitter, like a person moving in front of a
    # webcam; the face stays inside the crop.
    side = int(rng.integers(230, 300))
    x0 = int(np.clip(95 + rng.integers(-25, 26), 0, 512 - side))
    y0 = int(np.clip(0 + rng.integers(0, 30), 0, 512 - side))
    crop = cv2.resize(image[y0:y0 + side, x0:x0 + side], (250, 250),
                      interpolation=cv2.INTER_AREA)
    crop = cv2.convertScaleAbs(crop, alpha=float(rng.uniform(0.8, 1.2)))
    path = os.path.join(folder, f"{i:04d}.jpg")
    cv2.imwrite(path, crop)
    paths.append(path)
  return paths


_barrier = None


def _bench_init(settings, torch_threads, barrier):
  global _barrier
  _barrier = barrier
  preprocess_pool.init_worker(settings, torch_threads)


def _bench_shard(args):
  paths, out_dir = args
  # Warm-up: torch import, MTCNN build, first inference.
  preprocess_pool.process_one(paths[0], out_dir, "warmup/w.png")
  _barrier.wait()
  start = time.perf_counter()
  kept = 0
  for i, path in enumerate(paths):
    out_rel = f"happiness/{os.getpid()}-{i}.png"
    result = preprocess_pool.process_one(path, out_dir, out_rel)
    kept += result["status"] == face_quality.KEPT
  end = time.perf_counter()
  # perf_counter is system-wide monotonic on Linux, so starts and ends of
  # different processes compare.
  return start, end, len(paths), kept


def steady_throughput(paths, workers, device, torch_threads, out_dir):
  settings = face_quality.Settings(device=device)
  ctx = multiprocessing.get_context("spawn")
  barrier = ctx.Barrier(workers)
  shards = [(paths[i::workers], out_dir) for i in range(workers)]
  with ctx.Pool(workers, initializer=_bench_init,
                initargs=(settings, torch_threads, barrier)) as pool:
    results = pool.map(_bench_shard, shards, chunksize=1)
  start = min(r[0] for r in results)
  end = max(r[1] for r in results)
  done = sum(r[2] for r in results)
  kept = sum(r[3] for r in results)
  return done / (end - start), 1000 * (end - start) / done * workers, kept, done


def main(argv):
  del argv
  if not face_detector.mtcnn_installed():
    print("error: facenet-pytorch is not installed: pip install 'dicefer-jax[data]'",
          file=sys.stderr)
    return 2
  with tempfile.TemporaryDirectory(prefix="mtcnn_bench_") as tmp:
    frames = os.path.join(tmp, "frames")
    os.makedirs(frames)
    paths = make_frames(frames, _NUM_IMAGES.value)
    print(f"{len(paths)} frames 250x250, device={_DEVICE.value}, "
          f"{fileio.default_workers()} cores available")
    for workers in (int(w) for w in _WORKERS.value):
      thread_options = [1] if workers > 1 else {
          "both": [None, 1], "default": [None], "one": [1]}[_TORCH_THREADS.value]
      for threads in thread_options:
        out = tempfile.mkdtemp(dir=tmp)
        rate, ms, kept, done = steady_throughput(paths, workers, _DEVICE.value,
                                                 threads, out)
        label = "torch default threads" if threads is None else f"{threads} torch thread"
        print(f"steady   workers={workers} ({label}): {rate:6.1f} images/s "
              f"({ms:.1f} ms per image per process; {kept}/{done} kept)", flush=True)
      if _END2END.value:
        out = tempfile.mkdtemp(dir=tmp)
        items = [contract.Record(p, "happiness") for p in paths]
        start = time.perf_counter()
        summary = preprocess.run_preprocess(items, out, workers=workers,
                                            device=_DEVICE.value, show_progress=False)
        seconds = time.perf_counter() - start
        print(f"end2end  workers={workers}: {len(paths) / seconds:6.1f} images/s "
              f"({seconds:.1f} s incl. start-up; {summary['kept']}/{len(paths)} kept)",
              flush=True)
  return 0


if __name__ == "__main__":
  app.run(main)
