r"""Classifies the facial expressions in photos, folders, videos or a camera.

  python -m experiments.predict --workdir=runs/demo --input=photos/ --output=faces.csv
  python -m experiments.predict --workdir=runs/demo --input=clip.mp4 \
      --output=clip.json --smooth=5 --annotate_dir=annotated/
  python -m experiments.predict --workdir=runs/demo --input=camera:0 \
      --output=live.csv --max_frames=300

Faces are found and aligned exactly as preprocessing does (MTCNN, five-point
alignment) and classified by the workdir's final checkpoint. One row per face:
source, frame (0 for photos), x1, y1, x2, y2, det_score, expression and one
probability column per class; a photo or frame without a face gets one row
with expression=no_face. Unreadable files are reported on stderr and skipped.
The output's extension picks CSV or JSON; an existing output is kept unless
--overwrite.
"""

from dicefer_jax import environment  # noqa: F401  (sets XLA flags; must come first)

import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import cv2
import numpy as np

from dicefer_jax import contract, face_images, fileio, prediction_io
from dicefer_jax.errors import UserError
from dicefer_jax.predictor import Predictor
from dicefer_jax.tracking import ProbabilitySmoother
from experiments import cli
from experiments.configs import default

WINDOW_NAME = "dicefer-jax (q quits)"


def display_available() -> bool:
  """Whether a window can be shown: on Linux only with an X or Wayland display."""
  if sys.platform.startswith("linux"):
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
  return True


def _warn(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def _labels(predictions, probabilities) -> list[str]:
  return [f"{contract.EXPRESSIONS[int(np.argmax(p))]} {float(np.max(p)):.2f}"
          for _, p in zip(predictions, probabilities)]


def _frame_rows(source, frame, predictions, probabilities) -> list[dict]:
  if not predictions:
    return [prediction_io.no_face_row(source, frame)]
  return prediction_io.face_rows(source, frame, [p.box for p in predictions],
                                 [p.det_score for p in predictions], probabilities)


def _progress(total, show: bool, unit: str):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, unit=unit, disable=not show, dynamic_ncols=True, file=sys.stderr)


def _still_images(predictor, paths, root, annotate_dir, show_progress) -> list[dict]:
  rows = []
  with _progress(len(paths), show_progress and root is not None, "img") as bar:
    for path in paths:
      bar.update(1)
      try:
        rgb = face_images.read_image(path)
      except face_images.UnreadableImage as e:
        _warn(f"skipped {path}: unreadable image ({e})")
        continue
      predictions = predictor.predict_image(rgb)
      probabilities = [p.probabilities for p in predictions]
      rows += _frame_rows(path, 0, predictions, probabilities)
      if annotate_dir:
        target = prediction_io.annotated_path(annotate_dir, path, root, ".png")
        if os.path.exists(target):
          _warn(f"not writing {target}: it exists (annotations never overwrite files)")
          continue
        canvas = prediction_io.annotate(rgb, [p.box for p in predictions],
                                        _labels(predictions, probabilities))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fileio.write_bytes_atomic(target, cv2.imencode(".png", canvas)[1].tobytes())
  return rows


class _VideoAnnotation:
  """An annotated video written next to nothing the user has: refuses an
  existing target, writes to a temporary name and renames at the end."""

  def __init__(self, target: str, fps: float):
    self.target = target
    self.fps = fps if fps and fps > 0 else 25.0
    self.tmp = fileio.temp_path(target)
    self.writer = None

  def write(self, canvas):
    if self.writer is None:
      os.makedirs(os.path.dirname(self.target) or ".", exist_ok=True)
      height, width = canvas.shape[:2]
      self.writer = cv2.VideoWriter(self.tmp, cv2.VideoWriter_fourcc(*"MJPG"), self.fps,
                                    (width, height))
    self.writer.write(canvas)

  def close(self):
    if self.writer is None:
      return
    self.writer.release()
    if os.path.exists(self.target):
      os.remove(self.tmp)
      _warn(f"not writing {self.target}: it appeared meanwhile")
    else:
      os.replace(self.tmp, self.target)


def _video(predictor, spec, kind, annotate_dir, smooth, max_frames, show_progress,
           show_window) -> list[dict]:
  if kind == "camera":
    capture = prediction_io.open_video(prediction_io.camera_index(spec))
  else:
    try:
      capture = prediction_io.open_video(spec)
    except UserError as e:
      _warn(f"skipped {spec}: {e}")
      return []
  annotation = None
  if annotate_dir:
    target = prediction_io.annotated_path(annotate_dir, spec, None, ".avi")
    if os.path.exists(target):
      _warn(f"not writing {target}: it exists (annotations never overwrite files)")
    else:
      annotation = _VideoAnnotation(target, capture.get(cv2.CAP_PROP_FPS))
  smoother = ProbabilitySmoother(smooth)
  rows = []
  rate, last = 0.0, time.time()
  total = prediction_io.frame_count(capture, max_frames) if kind == "video" else max_frames
  try:
    with _progress(total, show_progress, "frame") as bar:
      for index, rgb in prediction_io.video_frames(capture, max_frames):
        bar.update(1)
        predictions = predictor.predict_image(rgb)
        boxes = [p.box for p in predictions]
        _, probabilities = smoother.update(
            boxes, np.array([p.probabilities for p in predictions], np.float32).reshape(
                len(predictions), contract.NUM_CLASSES))
        rows += _frame_rows(spec, index, predictions, probabilities)
        if annotation is None and not show_window:
          continue
        canvas = prediction_io.annotate(rgb, boxes, _labels(predictions, probabilities))
        if annotation is not None:
          annotation.write(canvas)
        if show_window:
          now = time.time()
          rate = 0.9 * rate + 0.1 / max(now - last, 1e-6) if rate else 1.0 / max(now - last, 1e-6)
          last = now
          # The rate this machine keeps up with, smoothed over the last frames.
          cv2.putText(canvas, f"{rate:.1f} frames/s", (8, canvas.shape[0] - 10),
                      cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 2, cv2.LINE_AA)
          try:
            cv2.imshow(WINDOW_NAME, canvas)
            if cv2.waitKey(1) & 0xFF == ord("q"):
              break
          except cv2.error:
            _warn("no window: this OpenCV build has no GUI (opencv-python-headless)")
            show_window = False
  except KeyboardInterrupt:
    _warn(f"stopped at frame {len(rows) and rows[-1]['frame']}: writing what was seen")
  finally:
    capture.release()
    if annotation is not None:
      annotation.close()
    if show_window:
      cv2.destroyAllWindows()
  return rows


def predict(workdir: str, input_spec: str, output: str, *, overwrite: bool = False,
            max_frames: int | None = None, annotate_dir: str | None = None,
            smooth: int = 1, show_progress: bool = True,
            show_window: bool = False) -> list[dict]:
  """Runs a workdir's model over an input; writes and returns the rows.

  Args:
    workdir: a finished training workdir.
    input_spec: a photo, a folder (searched recursively), a video or camera:N.
    output: .csv or .json file.
    overwrite: replace an existing output.
    max_frames: stop videos and cameras after this many frames.
    annotate_dir: write annotated copies (photos as PNG, videos as MJPG .avi).
    smooth: average each tracked face's probabilities over this many frames.
    show_progress: tqdm bars on folders and videos.
    show_window: live window for a camera (only where a display exists).
  """
  prediction_io.check_output(output, overwrite)
  if smooth < 1:
    raise UserError(f"--smooth={smooth}: use 1 (off) or more frames")
  if max_frames is not None and max_frames < 1:
    raise UserError(f"--max_frames={max_frames}: use a positive number")
  kind = prediction_io.input_kind(input_spec)
  predictor = Predictor.from_workdir(workdir, default.get_config())
  if kind in ("image", "folder"):
    paths = (prediction_io.list_images(input_spec) if kind == "folder" else [input_spec])
    if not paths:
      raise UserError(f"--input={input_spec}: no image files in this folder "
                      f"({', '.join(prediction_io.IMAGE_EXTENSIONS)})")
    root = input_spec if kind == "folder" else None
    rows = _still_images(predictor, paths, root, annotate_dir, show_progress)
  else:
    rows = _video(predictor, input_spec, kind, annotate_dir, smooth, max_frames,
                  show_progress, show_window and kind == "camera" and display_available())
  prediction_io.write_rows(output, rows)
  faces = sum(r["expression"] != prediction_io.NO_FACE for r in rows)
  print(f"wrote {output}: {len(rows)} rows, {faces} faces", flush=True)
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  for name in ("workdir", "input", "output"):
    if not flags.FLAGS[name].value:
      raise app.UsageError(f"--{name} is required")
  logging.set_verbosity(logging.WARNING)
  cli.run_or_exit(predict, _WORKDIR.value, _INPUT.value, _OUTPUT.value,
                  overwrite=_OVERWRITE.value, max_frames=_MAX_FRAMES.value,
                  annotate_dir=_ANNOTATE_DIR.value, smooth=_SMOOTH.value,
                  show_progress=_PROGRESS.value, show_window=_SHOW.value)


if __name__ == "__main__":
  _WORKDIR = flags.DEFINE_string("workdir", None, "A finished training workdir.")
  _INPUT = flags.DEFINE_string("input", None,
                               "A photo, a folder of photos, a video file or camera:N.")
  _OUTPUT = flags.DEFINE_string("output", None, "Rows per face: a .csv or .json file.")
  _OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --output.")
  _MAX_FRAMES = flags.DEFINE_integer("max_frames", None,
                                     "Stop a video or camera after this many frames.")
  _ANNOTATE_DIR = flags.DEFINE_string(
      "annotate_dir", None, "Write annotated copies here (never over existing files).")
  _SMOOTH = flags.DEFINE_integer(
      "smooth", 1, "Average each tracked face's probabilities over N frames (1 = off).")
  _PROGRESS = flags.DEFINE_bool("progress", True, "Progress bars on stderr.")
  _SHOW = flags.DEFINE_bool("show", True, "Live window for camera:N when a display exists.")
  app.run(main, flags_parser=cli.parse_flags)
