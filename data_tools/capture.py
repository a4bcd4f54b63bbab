r"""Labelled webcam capture: one key press saves the current frame under a class.

This is the source report's image acquisition script made safe to use for a
long session. It reads a camera (or a video file), crops a square region,
shows it with the number of images saved per class, and on a key press saves
the cropped frame (original colour, JPEG) as `<output_dir>/<Expression>/<uuid>.jpg`:

  n Neutral   a Angry   h Happy   d Disgust   s Sad   p Surprise   f Fear
  q quit

Every save is also appended to `<output_dir>/capture_manifest.csv` (path,
expression, subject, timestamp) and flushed at once, so a crash loses nothing
and `python -m data_tools.preprocess --input_dir=<output_dir>` knows who is in
each photo. Existing files are never overwritten.

Usage:
  # Interactive, camera 0, one session per person:
  python -m data_tools.capture --output_dir=Photos --subject=alice

  # A recorded clip, crop 300x300 around (320,240):
  python -m data_tools.capture --output_dir=Photos --source=clip.mp4 \
      --crop_size=300 --crop_center=320,240

  # Headless (servers, tests, OpenCV without GUI): press keys at given frames
  # (0-based frame numbers); no window is opened.
  python -m data_tools.capture --output_dir=Photos --source=clip.mp4 \
      --keys=12:h,30:s,31:q
"""

import collections
import csv
import datetime
import errno
import os
import sys
import uuid
from typing import Mapping

from absl import app
from absl import flags
import cv2
import numpy as np

from data_tools.labels import canonical_expression
from dicefer_jax import fileio
from dicefer_jax.errors import UserError

# Key -> folder name, exactly as in the source report's capture script.
KEY_MAP = {
    "n": "Neutral",
    "a": "Angry",
    "h": "Happy",
    "d": "Disgust",
    "s": "Sad",
    "p": "Surprise",
    "f": "Fear",
}
QUIT_KEY = "q"
CAPTURE_MANIFEST = "capture_manifest.csv"
CAPTURE_FIELDS = ("path", "expression", "subject", "timestamp")
WINDOW_NAME = "dicefer capture"

_FLAGS = flags.FLAGS
flags.DEFINE_string(
    "output_dir", None,
    "Where to save: <output_dir>/<Expression>/<uuid>.jpg plus "
    "capture_manifest.csv. Created if missing; existing files are kept.")
flags.DEFINE_string(
    "source", "0",
    "Camera index (0, 1, ...) or path of a video file to read frames from.")
flags.DEFINE_string(
    "subject", "",
    "Id of the person in front of the camera (e.g. alice or s01), recorded per "
    "image in capture_manifest.csv so training can pair different people and "
    "evaluation can hold out whole subjects.")
flags.DEFINE_integer(
    "crop_size", 250, "Side of the square crop, in pixels of the camera frame.")
flags.DEFINE_string(
    "crop_center", None,
    "Crop centre as X,Y in pixels of the camera frame; default: frame centre.")
flags.DEFINE_string(
    "keys", None,
    "Headless mode: comma-separated FRAME:KEY presses, e.g. 12:h,30:s,31:q "
    "(0-based frame numbers; keys n a h d s p f, q quits). No window is "
    "opened. Without --keys a window is shown, which needs OpenCV with GUI "
    "support (opencv-python, not opencv-python-headless) and a display.")


def parse_source(source: str) -> int | str:
  """A camera index for an all-digit string, otherwise a video file path."""
  source = str(source).strip()
  if not source:
    raise UserError("--source is empty: pass a camera index (0) or a video file")
  return int(source) if source.isdigit() else source


def parse_keys(spec: str | None) -> dict[int, str]:
  """Parses `12:h,30:s,31:q` into {frame: key}."""
  if spec is None:
    return {}
  presses = {}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    frame, sep, key = part.partition(":")
    frame, key = frame.strip(), key.strip().lower()
    if not sep or not frame.isdigit() or len(key) != 1:
      raise UserError(
          f"--keys: cannot read {part!r}: write FRAME:KEY pairs like 12:h,31:q")
    if key not in KEY_MAP and key != QUIT_KEY:
      raise UserError(
          f"--keys: unknown key {key!r} in {part!r}: use one of "
          f"{', '.join(f'{k} ({v})' for k, v in KEY_MAP.items())} or q (quit)")
    if int(frame) in presses:
      raise UserError(f"--keys: frame {frame} is given twice: one key per frame")
    presses[int(frame)] = key
  if not presses:
    raise UserError("--keys is empty: write FRAME:KEY pairs like 12:h,31:q")
  return presses


def parse_center(spec: str | None) -> tuple[int, int] | None:
  """Parses `X,Y` into integer pixel coordinates."""
  if spec is None or not str(spec).strip():
    return None
  parts = [p.strip() for p in str(spec).split(",")]
  try:
    x, y = (int(round(float(p))) for p in parts)
  except ValueError:
    raise UserError(
        f"--crop_center={spec!r}: write it as X,Y in pixels, e.g. 320,240"
    ) from None
  return x, y


def crop_window(frame_shape: tuple[int, ...], crop_size: int,
                center: tuple[int, int] | None = None) -> tuple[int, int, int, int]:
  """Rows and columns (y0, y1, x0, x1) of the square crop in a frame.

  Raises UserError when the frame is smaller than the crop or the crop would
  leave the frame: a silently shifted or clipped crop would make the saved
  photos inconsistent.
  """
  height, width = frame_shape[:2]
  if crop_size <= 0:
    raise UserError(f"--crop_size={crop_size}: must be a positive number of pixels")
  if height < crop_size or width < crop_size:
    raise UserError(
        f"frame is {width}x{height}, smaller than the {crop_size}x{crop_size} "
        "crop: pass a smaller --crop_size or a higher camera resolution")
  if center is None:
    x0, y0 = (width - crop_size) // 2, (height - crop_size) // 2
  else:
    x0, y0 = center[0] - crop_size // 2, center[1] - crop_size // 2
    if x0 < 0 or y0 < 0 or x0 + crop_size > width or y0 + crop_size > height:
      raise UserError(
          f"--crop_center={center[0]},{center[1]} puts the {crop_size}x{crop_size} "
          f"crop outside the {width}x{height} frame: move it or shrink --crop_size")
  return y0, y0 + crop_size, x0, x0 + crop_size


def gui_available() -> bool:
  """Whether cv2 can open a window here (GUI backend built in and a display)."""
  info = cv2.getBuildInformation()
  for line in info.splitlines():
    if line.strip().startswith("GUI:") and line.split(":", 1)[1].strip() == "NONE":
      return False
  # Without a display, Qt/GTK backends abort the whole process (not an
  # exception we could catch), so check before calling imshow.
  if sys.platform.startswith("linux"):
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
  return True


class _CaptureWriter:
  """Saves crops and appends their manifest rows; never overwrites anything."""

  def __init__(self, output_dir: str, subject: str):
    self.output_dir = output_dir
    self.subject = subject
    self.saved = 0
    try:
      os.makedirs(output_dir, exist_ok=True)
      for folder in KEY_MAP.values():
        os.makedirs(os.path.join(output_dir, folder), exist_ok=True)
      manifest = os.path.join(output_dir, CAPTURE_MANIFEST)
      self._check_manifest_header(manifest)
      # Append only: earlier sessions' rows stay. Each row is flushed and
      # fsynced as it is written (_flush), so a crash loses nothing.
      self._manifest = open(manifest, "a", newline="", encoding="utf-8")
    except OSError as e:
      raise UserError(
          f"cannot write to --output_dir={output_dir!r}: {e.strerror or e}") from None
    self._writer = csv.DictWriter(self._manifest, fieldnames=CAPTURE_FIELDS)
    if self._manifest.tell() == 0:
      self._writer.writeheader()
      self._flush()

  @staticmethod
  def _check_manifest_header(manifest: str) -> None:
    if not os.path.isfile(manifest) or os.path.getsize(manifest) == 0:
      return
    with open(manifest, newline="", encoding="utf-8") as f:
      header = next(csv.reader(f), [])
    if tuple(header) != CAPTURE_FIELDS:
      raise UserError(
          f"{manifest} has the header {','.join(header)!r}, not "
          f"{','.join(CAPTURE_FIELDS)!r}: it was not written by this tool; "
          "use another --output_dir")

  def existing_counts(self) -> collections.Counter:
    """Images already in each class folder (from earlier sessions too)."""
    counts = collections.Counter()
    for folder in KEY_MAP.values():
      names = os.listdir(os.path.join(self.output_dir, folder))
      # Not the hidden temp files an interrupted save leaves (".tmp-...jpg").
      counts[folder] = sum(n.lower().endswith(".jpg") and not n.startswith(".")
                           for n in names)
    return counts

  def _flush(self) -> None:
    self._manifest.flush()
    os.fsync(self._manifest.fileno())

  def save(self, crop: np.ndarray, folder: str) -> str:
    """Writes one crop; returns its path relative to output_dir."""
    ok, encoded = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:
      raise UserError(
          f"OpenCV could not encode a {crop.shape} frame as JPEG; "
          f"{self.saved} image(s) saved before stay in {self.output_dir}")
    rel = os.path.join(folder, f"{uuid.uuid4()}.jpg")
    path = os.path.join(self.output_dir, rel)
    try:
      if os.path.exists(path):  # A uuid4 collision; never overwrite.
        raise FileExistsError(errno.EEXIST, "file exists", path)
      # Atomic, so an interrupted write never leaves a truncated JPEG under a
      # real name (the temp name starts with a dot: the preprocessing tool
      # and existing_counts skip it), and fsynced: a lost capture cannot be
      # taken again.
      fileio.write_bytes_atomic(path, encoded.tobytes(), fsync=True)
      self._writer.writerow({
          "path": rel.replace(os.sep, "/"),
          "expression": canonical_expression(folder),
          "subject": self.subject,
          "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(
              timespec="milliseconds"),
      })
      self._flush()
    except OSError as e:
      raise UserError(
          f"cannot save {path}: {e.strerror or e}; {self.saved} image(s) saved "
          f"before stay in {self.output_dir}") from None
    self.saved += 1
    return rel

  def close(self) -> None:
    self._manifest.close()


def _draw_counts(crop: np.ndarray, counts: Mapping[str, int]) -> np.ndarray:
  """A copy of the crop with the per-class totals and keys overlaid."""
  shown = crop.copy()
  key_of = {v: k for k, v in KEY_MAP.items()}
  for row, folder in enumerate(KEY_MAP.values()):
    text = f"{key_of[folder]} {folder}: {counts.get(folder, 0)}"
    org = (4, 14 + 14 * row)
    # Dark outline under light text, readable on any background.
    cv2.putText(shown, text, org, cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 3,
                cv2.LINE_AA)
    cv2.putText(shown, text, org, cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                (255, 255, 255), 1, cv2.LINE_AA)
  return shown


def _open_source(source: int | str) -> cv2.VideoCapture:
  if isinstance(source, str) and not os.path.isfile(source):
    raise UserError(
        f"video file {source!r} does not exist: pass --source=0 for the first "
        "camera or the path of a video file")
  # OpenCV and FFmpeg print their own multi-line warnings when a source
  # fails; the UserError below says it in one line, so silence them here.
  os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
  previous = cv2.utils.logging.getLogLevel()
  cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
  try:
    cap = cv2.VideoCapture(source)
  finally:
    cv2.utils.logging.setLogLevel(previous)
  if not cap.isOpened():
    cap.release()
    if isinstance(source, int):
      raise UserError(
          f"cannot open camera {source}: check it is connected and not used by "
          "another program, try another index, or pass --source=VIDEO_FILE")
    raise UserError(
        f"cannot open video file {source!r}: OpenCV cannot decode it; convert "
        "it (e.g. to MJPG .avi or H.264 .mp4) or pass a camera index")
  return cap


def run_capture(source: int | str, output_dir: str,
                keys: Mapping[int, str] | None = None, *, subject: str = "",
                crop_size: int = 250, crop_center: tuple[int, int] | None = None,
                show: bool | None = None) -> dict[str, int]:
  """Runs a capture session.

  Args:
    source: camera index or video file path.
    output_dir: where class folders and capture_manifest.csv go.
    keys: headless key presses {0-based frame number: key}; when given, no
      window is opened and the session ends at `q`, at the end of the video,
      or after the last scripted key.
    subject: id recorded for every saved image.
    crop_size: side of the square crop.
    crop_center: (x, y) of the crop centre; default the frame centre.
    show: force a window on (True) or off (False); default: a window unless
      `keys` is given.

  Returns:
    Images saved in this session per folder name (Neutral, Angry, ...).

  Raises:
    UserError: the source cannot be opened or read, a frame is smaller than the
      crop, or a file cannot be written. Images saved before stay on disk.
  """
  keys = dict(keys or {})
  if show is None:
    show = not keys
  if show and not gui_available():
    raise UserError(
        "OpenCV here cannot open a window (no GUI backend or no display): pass "
        "--keys=FRAME:KEY,... to capture headless, or install opencv-python "
        "and run on a desktop")
  cap = _open_source(source)
  writer = _CaptureWriter(output_dir, subject)
  session = collections.Counter({folder: 0 for folder in KEY_MAP.values()})
  totals = writer.existing_counts()
  # Play files at their frame rate; a camera paces itself.
  delay_ms = 1
  if isinstance(source, str):
    fps = cap.get(cv2.CAP_PROP_FPS)
    delay_ms = max(1, int(round(1000 / fps))) if fps and fps > 0 else 30
  last_key_frame = max(keys) if keys else None
  frame_index = 0
  window = None
  try:
    while True:
      ok, frame = cap.read()
      if not ok or frame is None:
        if frame_index == 0:
          raise UserError(
              f"{source!r} opened but gave no frame: for a camera, check no "
              "other program uses it; for a file, check it is a video")
        break  # End of the video (or the camera went away).
      y0, y1, x0, x1 = crop_window(frame.shape, crop_size, crop_center)
      crop = np.ascontiguousarray(frame[y0:y1, x0:x1])
      if show:
        if window is None:
          cv2.namedWindow(WINDOW_NAME, cv2.WINDOW_AUTOSIZE)
          window = WINDOW_NAME
        cv2.imshow(WINDOW_NAME, _draw_counts(crop, totals))
        code = cv2.waitKey(delay_ms) & 0xFF
        key = chr(code).lower() if code != 0xFF else None
      else:
        key = keys.get(frame_index)
      if key == QUIT_KEY:
        break
      if key in KEY_MAP:
        folder = KEY_MAP[key]
        rel = writer.save(crop, folder)
        session[folder] += 1
        totals[folder] += 1
        print(f"[INFO] Saved: {os.path.join(output_dir, rel)}", flush=True)
      frame_index += 1
      if not show and last_key_frame is not None and frame_index > last_key_frame:
        break  # Every scripted key was pressed.
  finally:
    cap.release()
    writer.close()
    if window is not None:
      cv2.destroyWindow(window)
  missed = sorted(f for f in keys if f >= frame_index and keys[f] != QUIT_KEY)
  if missed and not show:
    print(f"warning: the video ended after {frame_index} frames; keys at frames "
          f"{', '.join(map(str, missed))} were not pressed", file=sys.stderr)
  return dict(session)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    if not _FLAGS.output_dir:
      raise UserError("pass --output_dir=DIR (where the class folders go)")
    counts = run_capture(
        parse_source(_FLAGS.source), _FLAGS.output_dir, parse_keys(_FLAGS.keys),
        subject=_FLAGS.subject.strip(), crop_size=_FLAGS.crop_size,
        crop_center=parse_center(_FLAGS.crop_center))
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  summary = ", ".join(f"{k} {v}" for k, v in counts.items() if v) or "nothing"
  print(f"saved {sum(counts.values())} image(s) in {_FLAGS.output_dir}: {summary}")
  return 0


if __name__ == "__main__":
  app.run(main)
