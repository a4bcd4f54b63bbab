r"""Prediction throughput: photos/s on a folder and frames/s on a video.

Makes 250x250 jittered crops of scikit-image's astronaut portrait (a folder of
JPEGs, and the same frames as an MJPG video) and times dicefer_jax.Predictor:

  with detection     predict_image per photo / frame: decode, MTCNN, align,
                     classify (what experiments.predict does per input)
  without detection  predict_faces only, on the faces already aligned: in
                     batches for the folder, one frame's faces per call for the video

Every path is warmed up (MTCNN built, every jit bucket compiled) before the clock.

Usage:
  python benchmarks/predict_bench.py                              # default model, random init
  python benchmarks/predict_bench.py --workdir=runs/demo --num_images=100

Needs the data extra (facenet-pytorch, torch) and scikit-image.
"""

import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dicefer_jax import environment  # noqa: F401  pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import cv2  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from dicefer_jax import contract, face_images, models, prediction_io, train  # pylint: disable=g-import-not-at-top,wrong-import-position
from dicefer_jax.predictor import Predictor  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.configs import default  # pylint: disable=g-import-not-at-top,wrong-import-position

_WORKDIR = flags.DEFINE_string("workdir", None,
                               "A trained workdir; default: the default config, random init.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 40, "Photos in the folder and frames in the video.")


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def make_frames(num: int, seed: int = 0) -> list[np.ndarray]:
  """`num` jittered 250x250 RGB crops around the astronaut's face."""
  from skimage import data  # pylint: disable=g-import-not-at-top
  image = data.astronaut()
  rng = np.random.default_rng(seed)
  frames = []
  for _ in range(num):
    size = int(rng.integers(280, 360))
    x0, y0 = int(rng.integers(40, 130)), int(rng.integers(0, 60))
    crop = image[y0:y0 + size, x0:x0 + size]
    frames.append(cv2.resize(crop, (250, 250), interpolation=cv2.INTER_AREA))
  return frames


def make_predictor() -> Predictor:
  if _WORKDIR.value:
    return Predictor.from_workdir(_WORKDIR.value, default.get_config())
  config = default.get_config()
  model = models.build_model(config.model, contract.NUM_CLASSES)
  stage = train.final_stage(config)
  return Predictor(config, model, train.initial_state(stage, config, model))


def rate(count: int, fn) -> float:
  start = time.perf_counter()
  fn()
  return count / (time.perf_counter() - start)


def main(argv):
  del argv
  frames = make_frames(_NUM_IMAGES.value)
  predictor = make_predictor()
  with tempfile.TemporaryDirectory() as tmp:
    paths = []
    for i, frame in enumerate(frames):
      paths.append(os.path.join(tmp, f"{i:04d}.jpg"))
      cv2.imwrite(paths[-1], frame[:, :, ::-1])
    video = os.path.join(tmp, "clip.avi")
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"MJPG"), 25, (250, 250))
    for frame in frames:
      writer.write(np.ascontiguousarray(frame[:, :, ::-1]))
    writer.release()

    # Warm-up: MTCNN built, the faces cut once, every bucket compiled.
    faces = [f.face for p in paths for f in predictor.detect(face_images.read_image(p))]
    faces = np.stack(faces)
    predictor.predict_faces(faces)
    predictor.predict_faces(faces[:1])
    predictor.predict_image(paths[0])

    folder_detect = rate(len(paths), lambda: [predictor.predict_image(face_images.read_image(p))
                                              for p in paths])
    folder_faces = rate(len(faces), lambda: predictor.predict_faces(faces))

    def video_detect():
      capture = prediction_io.open_video(video)
      for _, rgb in prediction_io.video_frames(capture):
        predictor.predict_image(rgb)
      capture.release()

    video_faces = rate(len(faces), lambda: [predictor.predict_faces(f[None]) for f in faces])
    video_rate = rate(len(frames), video_detect)

  config = predictor.config
  print(f"CPU: {cpu_model()} ({os.cpu_count()} logical cores); JAX on "
        f"{jax.devices()[0].platform}; MTCNN on {predictor._detector.device}")  # pylint: disable=protected-access
  print(f"model: {_WORKDIR.value or 'default config, random init'}, image_size "
        f"{config.image_size}, width {config.model.width}; {len(frames)} photos 250x250, "
        f"{len(faces)} faces found")
  print(f"folder, with detection (read+MTCNN+align+classify): {folder_detect:8.1f} images/s")
  print(f"folder, predict_faces only (batch {min(len(faces), predictor.max_batch)}):"
        f" {folder_faces:8.1f} faces/s")
  print(f"video,  with detection:                             {video_rate:8.1f} frames/s")
  print(f"video,  predict_faces only (one frame's face/call): {video_faces:8.1f} frames/s")


if __name__ == "__main__":
  app.run(main)
