"""What prediction reads and writes: photos, folders, videos, cameras; rows; drawings.

  kind = input_kind("clips/a.avi")           # "image", "folder", "video" or "camera"
  for index, rgb in video_frames("clips/a.avi", max_frames=100): ...
  rows = face_rows("a.avi", index, predictions) or [no_face_row("a.avi", index)]
  write_rows("out.csv", rows)                # or .json, same fields

No TensorFlow, no torch: cv2, Pillow and numpy only.
"""

import csv
import io
import os
from typing import Iterator, Sequence

import cv2
import numpy as np

from dicefer_jax import contract, fileio
from dicefer_jax.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".avi", ".mp4", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg",
                    ".wmv")
OUTPUT_EXTENSIONS = (".csv", ".json")
CAMERA_PREFIX = "camera:"
NO_FACE = "no_face"
BOX_COLUMNS = ("x1", "y1", "x2", "y2")
# One row per face (or per frame without one); a column per class probability.
COLUMNS = ("source", "frame", *BOX_COLUMNS, "det_score", "expression",
           *contract.EXPRESSIONS)


def input_kind(spec: str) -> str:
  """What `--input` names: "camera" (camera:N), "folder", "video" or "image".

  Raises:
    UserError: a path that does not exist, or a camera that is not a number.
  """
  if spec.startswith(CAMERA_PREFIX):
    camera_index(spec)
    return "camera"
  if os.path.isdir(spec):
    return "folder"
  if not os.path.isfile(spec):
    raise UserError(f"--input={spec}: no such file or folder (or use camera:0)")
  return "video" if spec.lower().endswith(VIDEO_EXTENSIONS) else "image"


def camera_index(spec: str) -> int:
  """N of "camera:N"."""
  text = spec[len(CAMERA_PREFIX):]
  if not text.isdigit():
    raise UserError(f"--input={spec}: a camera is camera:N with N a device number, "
                    "e.g. camera:0")
  return int(text)


def list_images(folder: str) -> list[str]:
  """Image files under `folder`, recursively, sorted; hidden files left out."""
  found = []
  for root, dirs, names in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    found.extend(os.path.join(root, n) for n in names
                 if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith("."))
  return sorted(found)


def open_video(source) -> cv2.VideoCapture:
  """cv2.VideoCapture of a video file or camera number.

  Raises:
    UserError: OpenCV cannot open it.
  """
  capture = cv2.VideoCapture(source)
  if not capture.isOpened():
    capture.release()
    what = f"camera {source}" if isinstance(source, int) else f"video {source}"
    raise UserError(f"cannot open {what}: not a readable video (or camera busy/absent)")
  return capture


def video_frames(capture: cv2.VideoCapture, max_frames: int | None = None
                 ) -> Iterator[tuple[int, np.ndarray]]:
  """(frame index from 0, uint8 RGB frame) until the video ends or max_frames."""
  index = 0
  while max_frames is None or index < max_frames:
    ok, bgr = capture.read()
    if not ok or bgr is None:
      return
    yield index, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    index += 1


def frame_count(capture: cv2.VideoCapture, max_frames: int | None) -> int | None:
  """The number of frames a progress bar expects (None when unknown)."""
  count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
  if count <= 0:
    return max_frames
  return min(count, max_frames) if max_frames else count


def face_rows(source: str, frame: int, boxes: Sequence, det_scores: Sequence[float],
              probabilities: np.ndarray) -> list[dict]:
  """One row (COLUMNS) per face of a frame; the expression is the top class."""
  rows = []
  for box, score, probs in zip(boxes, det_scores, np.asarray(probabilities)):
    row = {"source": source, "frame": frame,
           **{c: round(float(v), 2) for c, v in zip(BOX_COLUMNS, box)},
           "det_score": round(float(score), 6),
           "expression": contract.EXPRESSIONS[int(np.argmax(probs))]}
    row.update({name: float(p) for name, p in zip(contract.EXPRESSIONS, probs)})
    rows.append(row)
  return rows


def no_face_row(source: str, frame: int) -> dict:
  """The row of a frame where no face was found: empty box and probabilities."""
  row = dict.fromkeys(COLUMNS)
  row.update(source=source, frame=frame, expression=NO_FACE)
  return row


def check_output(path: str, overwrite: bool) -> None:
  """Refuses an output of an unknown format, or an existing one without overwrite."""
  if not path.lower().endswith(OUTPUT_EXTENSIONS):
    raise UserError(f"--output={path}: use a .csv or .json file name")
  if os.path.exists(path) and not overwrite:
    raise UserError(f"--output={path} exists: pass --overwrite to replace it, or "
                    "choose another file")


def write_rows(path: str, rows: Sequence[dict]) -> None:
  """Writes rows as CSV (COLUMNS, empty cells for None) or JSON (a list of objects)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if path.lower().endswith(".json"):
    fileio.write_json_atomic(path, [{c: row[c] for c in COLUMNS} for row in rows])
    return
  text = io.StringIO()
  writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({c: "" if row[c] is None else row[c] for c in COLUMNS})
  fileio.write_text_atomic(path, text.getvalue())


def annotate(image_rgb: np.ndarray, boxes: Sequence, labels: Sequence[str]) -> np.ndarray:
  """A BGR copy of the frame with each face's box and label drawn (for cv2 writers)."""
  canvas = cv2.cvtColor(np.ascontiguousarray(image_rgb), cv2.COLOR_RGB2BGR)
  thickness = max(1, round(max(canvas.shape[:2]) / 400))
  for box, label in zip(boxes, labels):
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    cv2.rectangle(canvas, (x1, y1), (x2, y2), (0, 255, 0), thickness)
    cv2.putText(canvas, label, (x1, max(12, y1 - 4)), cv2.FONT_HERSHEY_SIMPLEX,
                0.4 * thickness, (0, 255, 0), thickness, cv2.LINE_AA)
  return canvas


def annotated_path(annotate_dir: str, source: str, root: str | None, suffix: str) -> str:
  """Where the annotated copy of `source` goes: its path under `root` (its name
  when root is None) inside annotate_dir, ending in `.annotated<suffix>`."""
  rel = os.path.relpath(source, root) if root else os.path.basename(source)
  stem = os.path.splitext(rel)[0].replace(":", "_")
  return os.path.join(annotate_dir, stem + ".annotated" + suffix)
