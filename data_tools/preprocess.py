r"""MTCNN preprocessing: raw face photos -> aligned 112x112 grayscale face set.

Reads a folder tree of raw photos, one folder per expression class

  RAW/Happy/*.jpg  RAW/Sad/*.png  ...   (names as in data_tools.labels, any case;
                                         contempt folders are skipped)

finds the face in each with MTCNN (facenet-pytorch), checks it, aligns it on its
five landmarks (eyes level, at fixed positions) and writes

  DIR/<expression>/<name>.png    112x112 8-bit grayscale faces
  DIR/manifest.csv               path, expression, subject, source, split, input
  DIR/rejects.csv                every input that was not kept, and why
  DIR/preprocess_progress.csv    the work log that makes reruns resumable

A photo is rejected when no face is found, the detection probability is below
--min_prob, the face is smaller than --min_face_size pixels, several faces are
found under --multi_face=reject, the landmarks do not fit a face shape
(--max_distortion), or the file cannot be read. Inputs are only read, never
changed, moved or deleted. A folder written by `python -m data_tools.capture`
carries capture_manifest.csv: subjects are taken from it.

Interrupted runs resume: rerunning the same command (also after kill -9) skips
every photo already done and then rewrites the manifest from all done items.
New photos added to RAW are picked up by a rerun.

Usage:
  python -m data_tools.preprocess --input_dir=Photos --output_dir=faces
  python -m data_tools.preprocess --input_dir=RAW --output_dir=faces \
      --min_face_size=60 --multi_face=reject --workers=4 --device=cpu

Dataset importers call `run_preprocess(records, output_dir)` directly. Torch is
imported only inside the worker processes, so importing this module is cheap
and keeps torch out of the caller's process.
"""

import collections
import csv
import dataclasses
import hashlib
import importlib.util
import io
import json
import multiprocessing
import os
import re
import sys
import threading
import time
import uuid
from typing import Any, Iterable, Sequence

import cv2
import numpy as np
from PIL import Image
from PIL import ImageOps

from data_tools.labels import canonical_expression
from dicefer_jax import contract
from dicefer_jax.errors import DataError, UserError

OUTPUT_SIZE = contract.IMAGE_SIZE  # 112

# Where the five MTCNN landmarks (left eye, right eye, nose tip, left and right
# mouth corner; "left" = image left) land in the 112x112 output. The ratios
# are those of the widely used ArcFace 112x112 template, made left-right
# symmetric (so the eyes are exactly level) and scaled from its eye distance
# of about 35 px down to 32 px: a face-recognition crop is tight at the chin,
# while for expressions the brows and a dropped jaw (surprise, fear) matter.
# Eyes at y=48 keep the brows and forehead in; the mouth at y=85 leaves room
# below for an open jaw.
FACE_TEMPLATE = np.array([
    [40.0, 48.0],   # left eye
    [72.0, 48.0],   # right eye
    [56.0, 66.3],   # nose tip
    [42.8, 84.9],   # left mouth corner
    [69.2, 84.9],   # right mouth corner
], dtype=np.float64)
_TEMPLATE_EYE_DISTANCE = float(FACE_TEMPLATE[1, 0] - FACE_TEMPLATE[0, 0])

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff",
                    ".ppm", ".pgm", ".gif")
PROGRESS_NAME = "preprocess_progress.csv"
REJECTS_NAME = "rejects.csv"
SETTINGS_NAME = "preprocess_settings.json"
LOCK_NAME = ".preprocess.lock"
CAPTURE_MANIFEST = "capture_manifest.csv"  # Written by data_tools.capture.
MULTI_FACE_POLICIES = ("largest", "most_confident", "reject")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_MAX_DISTORTION = 0.3

# Statuses in the progress log. "error" (an unexpected failure, or a file that
# went missing) is not final: the input is retried by the next run.
KEPT, REJECTED, ERROR = "kept", "rejected", "error"
# Reject reasons, as written to rejects.csv.
NO_FACE = "no_face"
LOW_PROBABILITY = "low_probability"
TOO_SMALL = "too_small"
SEVERAL_FACES = "several_faces"
IMPLAUSIBLE = "implausible_landmarks"
DISTORTED = "too_distorted"
UNREADABLE = "unreadable"
MISSING = "missing"

_PROGRESS_FIELDS = ("input", "expression", "subject", "source", "split", "status",
                    "output", "reason", "detail")
_REJECT_FIELDS = ("input", "expression", "subject", "source", "reason", "detail")
# Detection runs on a copy whose long side is at most this: a 4000 px phone
# photo would otherwise take seconds in MTCNN's image pyramid. Alignment still
# samples the full-resolution image.
_DETECT_MAX_SIDE = 1024


@dataclasses.dataclass(frozen=True)
class Settings:
  """What decides whether a face is kept; recorded in preprocess_settings.json."""

  min_face_size: int = 40
  min_prob: float = 0.9
  max_distortion: float = DEFAULT_MAX_DISTORTION
  multi_face: str = "largest"
  device: str = "auto"

  def validate(self) -> None:
    if self.min_face_size < 1:
      raise UserError(f"--min_face_size={self.min_face_size}: must be >= 1 pixel")
    if not 0.0 <= self.min_prob <= 1.0:
      raise UserError(f"--min_prob={self.min_prob}: must be between 0 and 1")
    if self.max_distortion <= 0:
      raise UserError(f"--max_distortion={self.max_distortion}: must be > 0")
    if self.multi_face not in MULTI_FACE_POLICIES:
      raise UserError(f"--multi_face={self.multi_face!r}: use one of "
                      f"{', '.join(MULTI_FACE_POLICIES)}")
    if self.device not in DEVICES:
      raise UserError(f"--device={self.device!r}: use one of {', '.join(DEVICES)}")

  @property
  def detector_min_face(self) -> int:
    # MTCNN's own smallest face. Half the accepted size, so faces somewhat
    # too small are found and reported as too_small rather than no_face,
    # while large --min_face_size values still speed the detector up.
    return max(12, self.min_face_size // 2)


# --------------------------------------------------------------------------
# Pure geometry (cv2 + numpy only).


def similarity_to_template(landmarks5) -> tuple[np.ndarray | None, float]:
  """Least-squares similarity from five landmarks onto FACE_TEMPLATE.

  Returns:
    (M, distortion): M is the 2x3 matrix (rotation, uniform scale,
    translation; no shear or reflection) or None for degenerate landmarks.
    distortion is the RMS distance between the mapped landmarks and the
    template, in template eye distances: how far the face's shape is from
    what a similarity (i.e. without stretching) can align. It grows with head
    yaw/pitch and with wrong landmarks.
  """
  src = np.asarray(landmarks5, dtype=np.float64).reshape(5, 2)
  if not np.isfinite(src).all():
    return None, float("inf")
  # A huge RANSAC threshold makes every point an inlier, so the result is
  # OpenCV's Levenberg-Marquardt refinement over all five points: the plain
  # least-squares similarity, with no point dropped as an "outlier".
  m, _ = cv2.estimateAffinePartial2D(
      src.astype(np.float32), FACE_TEMPLATE.astype(np.float32),
      method=cv2.RANSAC, ransacReprojThreshold=1e6, refineIters=20)
  if m is None or not np.isfinite(m).all() or abs(np.linalg.det(m[:, :2])) < 1e-9:
    return None, float("inf")
  mapped = transform_points(m, src)
  rms = float(np.sqrt(np.mean(np.sum((mapped - FACE_TEMPLATE) ** 2, axis=1))))
  return m, rms / _TEMPLATE_EYE_DISTANCE


def transform_points(m: np.ndarray, points) -> np.ndarray:
  """Applies a 2x3 affine matrix to (N, 2) points."""
  points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
  return points @ np.asarray(m, np.float64)[:, :2].T + np.asarray(m, np.float64)[:, 2]


def _to_gray(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"expected a uint8 image, got {image.dtype}")
  if image.ndim == 2:
    return image
  if image.ndim == 3 and image.shape[2] == 1:
    return image[:, :, 0]
  if image.ndim == 3 and image.shape[2] == 3:
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
  if image.ndim == 3 and image.shape[2] == 4:
    return cv2.cvtColor(image, cv2.COLOR_RGBA2GRAY)
  raise ValueError(f"expected an HxW, HxWx3 or HxWx4 image, got {image.shape}")


def align_face(image_rgb: np.ndarray, landmarks5) -> np.ndarray:
  """Aligns a face on its five landmarks: uint8 (112, 112) grayscale.

  Args:
    image_rgb: uint8 RGB (H, W, 3) image (grayscale (H, W) works too).
    landmarks5: (5, 2) x, y pixel positions of left eye, right eye, nose tip,
      left and right mouth corner, as MTCNN returns them.

  Returns:
    The face warped by the least-squares similarity onto FACE_TEMPLATE (eyes
    level at fixed positions), grayscale, 112x112 uint8. Pixels outside the
    photo repeat its border.

  Raises:
    ValueError: degenerate landmarks (e.g. all in one point) or a bad image.
  """
  gray = _to_gray(image_rgb)
  points = np.asarray(landmarks5, dtype=np.float64).reshape(5, 2)
  m, _ = similarity_to_template(points)
  if m is None:
    raise ValueError("degenerate landmarks: no similarity maps them to the template")
  scale = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))
  if scale < 0.5:
    # Bilinear warping that shrinks by more than 2x aliases (skips pixels).
    # Shrink the face's neighbourhood with area averaging first, so the
    # warp itself is close to 1:1.
    inverse = cv2.invertAffineTransform(m)
    corners = transform_points(
        inverse, [[0, 0], [OUTPUT_SIZE, 0], [0, OUTPUT_SIZE], [OUTPUT_SIZE, OUTPUT_SIZE]])
    height, width = gray.shape
    x0 = int(np.clip(np.floor(corners[:, 0].min()) - 2, 0, width - 1))
    y0 = int(np.clip(np.floor(corners[:, 1].min()) - 2, 0, height - 1))
    x1 = int(np.clip(np.ceil(corners[:, 0].max()) + 2, x0 + 1, width))
    y1 = int(np.clip(np.ceil(corners[:, 1].max()) + 2, y0 + 1, height))
    region = gray[y0:y1, x0:x1]
    new_w = max(1, int(round(region.shape[1] * scale)))
    new_h = max(1, int(round(region.shape[0] * scale)))
    gray = cv2.resize(region, (new_w, new_h), interpolation=cv2.INTER_AREA)
    points = (points - [x0, y0]) * [new_w / region.shape[1], new_h / region.shape[0]]
    m, _ = similarity_to_template(points)
    if m is None:
      raise ValueError("degenerate landmarks after downscaling")
  return cv2.warpAffine(gray, m, (OUTPUT_SIZE, OUTPUT_SIZE), flags=cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_REPLICATE)


@dataclasses.dataclass(frozen=True)
class Decision:
  """What to do with one photo's detections."""

  status: str  # KEPT or REJECTED
  reason: str = ""
  detail: str = ""
  landmarks: np.ndarray | None = None  # (5, 2) of the chosen face when kept


def _as_float_array(values, shape) -> np.ndarray:
  # facenet-pytorch 2.5.3 returns object arrays (and [None] for no face).
  return np.asarray(np.asarray(values, dtype=object).tolist(), dtype=np.float64).reshape(shape)


def decide(boxes, probs, landmarks, settings: Settings) -> Decision:
  """Chooses the face to keep among MTCNN detections, or a reject reason.

  Args:
    boxes: (N, 4) x0, y0, x1, y1 per face, or None when none was found.
    probs: (N,) detection probabilities.
    landmarks: (N, 5, 2) landmarks per face.
    settings: thresholds and the multi-face policy.

  Faces below --min_prob are ignored. Among the rest the policy picks one
  (largest box, or most confident), or with `reject` refuses the photo when
  more than one face of at least --min_face_size is left. The chosen face
  must be at least --min_face_size pixels (shorter box side), its landmarks
  must be ordered like a face's and lie in its box, and its shape must fit
  the template within --max_distortion.
  """
  if boxes is None or len(boxes) == 0:
    return Decision(REJECTED, NO_FACE, "MTCNN found no face")
  boxes = _as_float_array(boxes, (-1, 4))
  probs = _as_float_array(probs, (-1,))
  landmarks = _as_float_array(landmarks, (-1, 5, 2))
  widths = boxes[:, 2] - boxes[:, 0]
  heights = boxes[:, 3] - boxes[:, 1]
  sizes = np.minimum(widths, heights)
  confident = np.flatnonzero(probs >= settings.min_prob)
  if confident.size == 0:
    return Decision(REJECTED, LOW_PROBABILITY,
                    f"best face p={probs.max():.3f} < --min_prob={settings.min_prob}")
  if settings.multi_face == "reject":
    big = confident[sizes[confident] >= settings.min_face_size]
    if big.size > 1:
      return Decision(REJECTED, SEVERAL_FACES,
                      f"{big.size} faces with p>={settings.min_prob} and "
                      f">={settings.min_face_size}px")
  if settings.multi_face == "most_confident":
    pick = confident[np.argmax(probs[confident])]
  else:
    pick = confident[np.argmax((widths * heights)[confident])]
  prob, size, points = probs[pick], sizes[pick], landmarks[pick]
  stats = f"p={prob:.4f} size={size:.0f}px"
  if size < settings.min_face_size:
    return Decision(REJECTED, TOO_SMALL,
                    f"face {size:.0f}px < --min_face_size={settings.min_face_size}")
  m, distortion = similarity_to_template(points)
  if m is None:
    return Decision(REJECTED, IMPLAUSIBLE, f"degenerate landmarks; {stats}")
  # Landmarks well outside the face box mean the landmark regression failed.
  x0, y0, x1, y1 = boxes[pick]
  margin_x, margin_y = 0.25 * widths[pick], 0.25 * heights[pick]
  outside = ((points[:, 0] < x0 - margin_x) | (points[:, 0] > x1 + margin_x) |
             (points[:, 1] < y0 - margin_y) | (points[:, 1] > y1 + margin_y))
  if outside.any():
    return Decision(REJECTED, IMPLAUSIBLE,
                    f"{int(outside.sum())} landmark(s) outside the face box; {stats}")
  # In the aligned frame a face has its eyes above the nose above the mouth,
  # and its left parts left of its right parts; anything else is a landmark
  # mix-up the least-squares fit would hide.
  left_eye, right_eye, nose, mouth_left, mouth_right = transform_points(m, points)
  ordered = (left_eye[0] < right_eye[0] and mouth_left[0] < mouth_right[0] and
             max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1]))
  if not ordered:
    return Decision(REJECTED, IMPLAUSIBLE, f"landmarks not in a face's order; {stats}")
  if distortion > settings.max_distortion:
    return Decision(REJECTED, DISTORTED,
                    f"landmark misfit {distortion:.3f} > --max_distortion="
                    f"{settings.max_distortion}; {stats}")
  return Decision(KEPT, "", f"{stats} distortion={distortion:.3f}", points)


# --------------------------------------------------------------------------
# Reading inputs.


class _Unreadable(Exception):
  pass


def read_image(path: str) -> np.ndarray:
  """Decodes an image file to uint8 RGB (H, W, 3), honouring EXIF rotation.

  Pillow, not cv2.imread: OpenCV returns a half-grey picture for a truncated
  JPEG with only a warning, Pillow raises. Raises _Unreadable.
  """
  try:
    with Image.open(path) as image:
      image.load()
      image = ImageOps.exif_transpose(image)
      rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    message = " ".join(str(e).split()) or type(e).__name__
    raise _Unreadable(message) from None
  if rgb.ndim != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
    raise _Unreadable(f"empty image {rgb.shape}")
  return rgb


@dataclasses.dataclass
class ScanResult:
  """What scan_folder_tree found."""

  records: list[contract.Record]
  dropped: dict[str, int]  # class folder -> images skipped (e.g. contempt)
  ignored: int  # files that are not images


def scan_folder_tree(input_dir: str, source: str | None = None,
                     subject_from_dir: bool = False) -> ScanResult:
  """Lists the raw photos of `input_dir/<Expression>/...` as Records.

  Record paths are absolute paths of the raw images. Subjects come from
  `input_dir/capture_manifest.csv` when present (the capture tool writes it),
  else, with subject_from_dir, from the first folder level under the class
  folder (RAW/Happy/<subject>/x.jpg), else they are empty.

  Raises:
    DataError: missing input_dir, an unknown class folder, or no photos.
  """
  if not input_dir or not os.path.isdir(input_dir):
    raise DataError(f"--input_dir={input_dir!r} is not a directory: pass the folder "
                    "holding one sub-folder of photos per expression")
  root = os.path.abspath(input_dir)
  if source is None:
    source = os.path.basename(root.rstrip(os.sep)) or "raw"
  subjects = _capture_subjects(root)
  records, dropped, ignored = [], collections.Counter(), 0
  class_dirs = sorted(d for d in os.listdir(root)
                      if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
  if not class_dirs:
    raise DataError(
        f"{input_dir} has no class folders: lay the photos out as "
        f"{input_dir}/<Expression>/*.jpg, e.g. {input_dir}/Happy/001.jpg")
  for class_dir in class_dirs:
    try:
      expression = canonical_expression(class_dir)
    except DataError as e:
      raise DataError(f"folder {os.path.join(input_dir, class_dir)}: {e}") from None
    for folder, dirs, names in os.walk(os.path.join(root, class_dir)):
      dirs[:] = sorted(d for d in dirs if not d.startswith("."))
      for name in sorted(names):
        if name.startswith("."):
          continue
        if not name.lower().endswith(IMAGE_EXTENSIONS):
          ignored += 1
          continue
        path = os.path.join(folder, name)
        if expression is None:
          dropped[class_dir] += 1
          continue
        rel = os.path.relpath(path, root)
        subject = subjects.get(os.path.normcase(os.path.normpath(rel)), "")
        if not subject and subject_from_dir:
          parts = os.path.normpath(rel).split(os.sep)
          subject = parts[1] if len(parts) > 2 else ""
        records.append(contract.Record(path=path, expression=expression,
                                       subject=subject, source=source))
  if not records:
    raise DataError(
        f"{input_dir} holds no photos ({', '.join(IMAGE_EXTENSIONS)}) in its "
        "class folders" + (f" besides dropped classes {sorted(dropped)}" if dropped else ""))
  return ScanResult(records, dict(dropped), ignored)


def _capture_subjects(root: str) -> dict[str, str]:
  path = os.path.join(root, CAPTURE_MANIFEST)
  if not os.path.isfile(path):
    return {}
  subjects = {}
  with open(path, newline="", encoding="utf-8") as f:
    for row in csv.DictReader(f):
      rel, subject = (row.get("path") or "").strip(), (row.get("subject") or "").strip()
      if rel and subject:
        subjects[os.path.normcase(os.path.normpath(rel))] = subject
  return subjects


# --------------------------------------------------------------------------
# Worker processes. Everything torch happens here, in spawned processes.

_worker_state: dict[str, Any] = {}


def _init_worker(settings: Settings, torch_threads: int | None,
                 parent_pid: int | None = None) -> None:
  # Only stores the arguments: an initializer that raises makes a Pool
  # respawn workers forever, so the detector is built by the first task.
  _worker_state.clear()
  _worker_state.update(settings=settings, torch_threads=torch_threads)
  if parent_pid is not None:
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True,
                     name="exit-with-parent").start()


def _exit_with_parent(parent_pid: int) -> None:
  # A parent killed with -9 cannot stop its pool, and spawned workers would
  # go on with the queued photos and then wait forever, each holding an
  # MTCNN. Re-parenting shows the parent is gone.
  while True:
    time.sleep(1.0)
    if os.getppid() != parent_pid:
      os._exit(1)


def _detector():
  """This process's MTCNN, built once."""
  if "mtcnn" in _worker_state:
    return _worker_state["mtcnn"]
  settings = _worker_state["settings"]
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from facenet_pytorch import MTCNN  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(f"cannot import the MTCNN stack ({e}): install it with "
                    "pip install 'dicefer-jax[data]'") from None
  if _worker_state.get("torch_threads"):
    # Parallelism comes from the worker processes (see _run_pool).
    torch.set_num_threads(_worker_state["torch_threads"])
  device = settings.device
  if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
  elif device == "cuda" and not torch.cuda.is_available():
    raise UserError("--device=cuda but torch sees no CUDA device: use "
                    "--device=cpu or --device=auto")
  mtcnn = MTCNN(keep_all=True, device=torch.device(device),
                min_face_size=settings.detector_min_face, post_process=False)
  mtcnn.eval()
  _worker_state.update(mtcnn=mtcnn, device=device)
  return mtcnn


def detect_faces(image_rgb: np.ndarray, settings: Settings):
  """MTCNN boxes (N,4), probs (N,), landmarks (N,5,2) in image pixels, or Nones."""
  mtcnn = _detector()
  height, width = image_rgb.shape[:2]
  scale = min(1.0, _DETECT_MAX_SIDE / max(height, width))
  small = image_rgb
  if scale < 1.0:
    small = cv2.resize(image_rgb, (max(1, round(width * scale)), max(1, round(height * scale))),
                       interpolation=cv2.INTER_AREA)
  if min(small.shape[:2]) < settings.detector_min_face:
    # MTCNN's image pyramid would be empty (and facenet-pytorch crashes).
    return None, None, None
  boxes, probs, points = mtcnn.detect(np.ascontiguousarray(small), landmarks=True)
  if boxes is None:
    return None, None, None
  boxes = _as_float_array(boxes, (-1, 4)) / scale
  probs = _as_float_array(probs, (-1,))
  points = _as_float_array(points, (-1, 5, 2)) / scale
  return boxes, probs, points


def _temp_path(path: str) -> str:
  # Not tempfile.mkstemp: its files are private (0600), and the face set is
  # meant to be shared; a plain open() honours the user's umask.
  folder, name = os.path.split(path)
  return os.path.join(folder, f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{name}")


def _write_bytes_atomic(path: str, data: bytes) -> None:
  """Writes via a temp file + os.replace: readers never see half a file."""
  tmp = _temp_path(path)
  try:
    with open(tmp, "xb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _write_png_atomic(path: str, face: np.ndarray) -> None:
  ok, encoded = cv2.imencode(".png", face)
  if not ok:
    raise OSError(f"PNG encoding failed for {path}")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  _write_bytes_atomic(path, encoded.tobytes())


def _process_task(task: tuple[str, str, str]) -> dict[str, str]:
  """Detects, checks, aligns and writes one input. Runs in a worker."""
  result = _process_one(*task)
  result["device"] = _worker_state.get("device", "")
  return result


def _process_one(input_path: str, output_dir: str, out_rel: str) -> dict[str, str]:
  settings = _worker_state["settings"]
  result = {"input": input_path, "output": "", "reason": "", "detail": ""}
  try:
    if not os.path.isfile(input_path):
      return {**result, "status": ERROR, "reason": MISSING, "detail": "file not found"}
    try:
      image = read_image(input_path)
    except _Unreadable as e:
      return {**result, "status": REJECTED, "reason": UNREADABLE, "detail": str(e)}
    if min(image.shape[:2]) < settings.min_face_size:
      return {**result, "status": REJECTED, "reason": TOO_SMALL,
              "detail": f"image {image.shape[1]}x{image.shape[0]} is smaller than "
                        f"--min_face_size={settings.min_face_size}"}
    decision = decide(*detect_faces(image, settings), settings)
    if decision.status != KEPT:
      return {**result, "status": REJECTED, "reason": decision.reason,
              "detail": decision.detail}
    face = align_face(image, decision.landmarks)
    _write_png_atomic(os.path.join(output_dir, out_rel), face)
    return {**result, "status": KEPT, "output": out_rel, "detail": decision.detail}
  except UserError:
    raise  # Setup problems (no CUDA, no facenet-pytorch) stop the run.
  except Exception as e:  # pylint: disable=broad-except
    # One odd photo must not end a long run; "error" is retried next time.
    message = " ".join(f"{type(e).__name__}: {e}".split())
    return {**result, "status": ERROR, "reason": "error", "detail": message[:300]}


# --------------------------------------------------------------------------
# The run: bookkeeping in the parent process.


def _output_name(key: str, expression: str) -> str:
  stem = os.path.splitext(os.path.basename(key))[0]
  stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")[:80] or "face"
  # The hash of the input path keeps names unique when different folders hold
  # files of the same name, and stable across reruns.
  digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:10]
  return f"{expression}/{stem}-{digest}.png"


def _read_progress(path: str) -> dict[str, dict[str, str]]:
  """Last logged state per input; rows cut short by a crash are ignored."""
  state = {}
  if not os.path.isfile(path):
    return state
  with open(path, newline="", encoding="utf-8") as f:
    for row in csv.DictReader(f):
      if (None in row or any(row.get(k) is None for k in _PROGRESS_FIELDS)
          or row["status"] not in (KEPT, REJECTED, ERROR)
          or row["expression"] not in contract.EXPRESSIONS):
        continue
      state[row["input"]] = row
  return state


class _ProgressLog:
  """Appends one row per finished input, flushed at once (survives kill -9)."""

  def __init__(self, path: str):
    new = not os.path.isfile(path) or os.path.getsize(path) == 0
    if not new:
      with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        unterminated = f.read(1) != b"\n"
    self._file = open(path, "a", newline="", encoding="utf-8")
    if not new and unterminated:
      self._file.write("\n")  # End the row a crash cut short; it is skipped.
    self._writer = csv.DictWriter(self._file, fieldnames=_PROGRESS_FIELDS)
    if new:
      self._writer.writeheader()
    self._file.flush()

  def write(self, row: dict[str, str]) -> None:
    self._writer.writerow({k: row.get(k, "") for k in _PROGRESS_FIELDS})
    self._file.flush()

  def close(self) -> None:
    self._file.close()


class _DirLock:
  """Refuses a second concurrent run on the same output directory."""

  def __init__(self, output_dir: str):
    self._file = open(os.path.join(output_dir, LOCK_NAME), "a")
    try:
      import fcntl  # pylint: disable=g-import-not-at-top
    except ImportError:  # Windows: no lock, like before.
      return
    try:
      fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      self._file.close()
      raise UserError(f"another preprocessing run is writing to {output_dir}: wait "
                      "for it to finish or use another --output_dir") from None

  def release(self) -> None:
    self._file.close()


def _write_csv_atomic(path: str, fields: Sequence[str], rows: Iterable[dict]) -> None:
  buffer = io.StringIO(newline="")
  writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
  writer.writeheader()
  writer.writerows(rows)
  _write_bytes_atomic(path, buffer.getvalue().encode("utf-8"))


def _remove_stale_temp_files(output_dir: str) -> None:
  # Left by a worker killed mid-write. Only this tool's own temp names, only
  # in its own output folders, and only while holding the directory lock.
  for folder in [output_dir] + [os.path.join(output_dir, e) for e in contract.EXPRESSIONS]:
    if os.path.isdir(folder):
      for name in os.listdir(folder):
        if name.startswith(".tmp-"):
          os.remove(os.path.join(folder, name))


def _check_settings(output_dir: str, settings: Settings) -> None:
  path = os.path.join(output_dir, SETTINGS_NAME)
  current = dataclasses.asdict(settings)
  current.pop("device")  # Where it ran does not change which faces are kept.
  if os.path.isfile(path):
    try:
      with open(path, encoding="utf-8") as f:
        previous = json.load(f)
    except (OSError, ValueError):
      previous = None
    if previous is not None and previous != current:
      changed = ", ".join(f"{k} {previous.get(k)} -> {v}" for k, v in current.items()
                          if previous.get(k) != v)
      print(f"warning: {output_dir} was started with other settings ({changed}); "
            "photos done then are not redone: use a fresh --output_dir to apply "
            "the new settings to all", file=sys.stderr)
    return
  _write_bytes_atomic(path, (json.dumps(current, indent=2) + "\n").encode("utf-8"))


def default_workers() -> int:
  """Cores this process may use."""
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:
    return max(1, os.cpu_count() or 1)


def run_preprocess(items: Sequence[contract.Record], output_dir: str, *,
                   workers: int | None = None, min_face_size: int = 40,
                   min_prob: float = 0.9,
                   max_distortion: float = DEFAULT_MAX_DISTORTION,
                   multi_face: str = "largest", device: str = "auto",
                   show_progress: bool = True) -> dict[str, Any]:
  """Detects, aligns and writes the faces of raw photos into a face set.

  Args:
    items: one Record per raw photo: `path` is the photo (absolute, or
      relative to the current directory); expression (canonical), subject,
      source and split are carried into the manifest.
    output_dir: the face set to write (created if missing). Photos already
      done by an earlier run into it are skipped.
    workers: worker processes (default: the number of cores). Each builds
      one MTCNN and uses one torch thread.
    min_face_size: smallest accepted face, pixels (shorter side of the box).
    min_prob: smallest accepted MTCNN face probability.
    max_distortion: largest accepted landmark misfit after alignment, in eye
      distances (see similarity_to_template).
    multi_face: "largest", "most_confident" or "reject" (photos with more
      than one qualifying face are rejected).
    device: "auto" (CUDA when torch sees it), "cpu" or "cuda".
    show_progress: tqdm bar on stderr.

  Returns:
    {"kept", "rejected", "errors": counts for this run's photos; "skipped":
    photos done by earlier runs; "reasons": {reason: count} of this run's
    rejects and errors; "total_kept": faces now in the manifest; "manifest",
    "rejects": paths; "devices": where MTCNN ran; "seconds"}.

  Raises:
    DataError/UserError: bad records, a missing MTCNN stack, no CUDA for
      device="cuda", an output directory in use by another run.

  Workers are spawned processes (torch never enters the caller's process).
  As with any 'spawn' pool, the caller's main module is imported again in
  each worker: keep TensorFlow imports in the main module under
  `if __name__ == "__main__":`.
  """
  started = time.monotonic()
  settings = Settings(min_face_size=int(min_face_size), min_prob=float(min_prob),
                      max_distortion=float(max_distortion), multi_face=multi_face,
                      device=device)
  settings.validate()
  if workers is not None and workers < 1:
    raise UserError(f"--workers={workers}: must be >= 1")

  # One entry per input photo, keyed by its absolute path.
  wanted: dict[str, contract.Record] = {}
  for record in items:
    if not isinstance(record, contract.Record):
      raise DataError(f"run_preprocess takes contract.Record items, got {type(record)}")
    contract.expression_index(record.expression)
    if not record.path:
      raise DataError(f"a record has an empty path: {record}")
    key = os.path.abspath(record.path)
    if key in wanted and wanted[key].expression != record.expression:
      raise DataError(f"{record.path} is listed as both {wanted[key].expression} and "
                      f"{record.expression}: give each photo one expression")
    wanted[key] = record
  if wanted and not any(os.path.isfile(k) for k in wanted):
    example = next(iter(wanted.values())).path
    raise DataError(f"none of the {len(wanted)} input photos exist, e.g. {example!r} "
                    f"(relative paths are taken from {os.getcwd()})")

  output_dir = os.path.abspath(output_dir)
  try:
    os.makedirs(output_dir, exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot create --output_dir={output_dir}: {e.strerror or e}") from None
  lock = _DirLock(output_dir)
  try:
    _remove_stale_temp_files(output_dir)
    _check_settings(output_dir, settings)
    progress_path = os.path.join(output_dir, PROGRESS_NAME)
    state = _read_progress(progress_path)

    todo, skipped = [], 0
    for key, record in sorted(wanted.items()):
      done = state.get(key)
      if done is not None and done["status"] != ERROR:
        if done["expression"] == record.expression and (
            done["status"] == REJECTED
            or os.path.isfile(os.path.join(output_dir, done["output"]))):
          skipped += 1
          continue
        if done["status"] == KEPT and done["expression"] != record.expression:
          # Relabelled since: the old face is ours to remove, so it does not
          # stay in the manifest under its old class.
          stale = os.path.normpath(os.path.join(output_dir, done["output"]))
          if stale.startswith(output_dir + os.sep) and os.path.isfile(stale):
            os.remove(stale)
      todo.append(key)

    counts = collections.Counter()
    reasons = collections.Counter()
    devices = set()
    log = _ProgressLog(progress_path)
    try:
      if todo:
        counts, reasons, devices = _run_pool(
            todo, wanted, output_dir, settings, workers, show_progress, log, state)
    finally:
      log.close()
      # Also after Ctrl-C or a worker failure: what is done is listed.
      total_kept = _finalize(output_dir, state, wanted)
  finally:
    lock.release()
  return {
      "kept": counts[KEPT], "rejected": counts[REJECTED], "errors": counts[ERROR],
      "skipped": skipped, "reasons": dict(reasons), "total_kept": total_kept,
      "manifest": os.path.join(output_dir, contract.MANIFEST_NAME),
      "rejects": os.path.join(output_dir, REJECTS_NAME),
      "devices": sorted(devices), "seconds": round(time.monotonic() - started, 2),
  }


def _run_pool(todo, wanted, output_dir, settings, workers, show_progress, log, state):
  if importlib.util.find_spec("facenet_pytorch") is None:
    raise UserError("facenet-pytorch is not installed in this environment: "
                    "pip install 'dicefer-jax[data]' (facenet-pytorch==2.5.3, torch)")
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  workers = min(workers or default_workers(), len(todo))
  tasks = [(key, output_dir, _output_name(key, wanted[key].expression)) for key in todo]
  counts, reasons, devices = collections.Counter(), collections.Counter(), set()
  ctx = multiprocessing.get_context("spawn")
  # One torch thread per worker, also for a single worker: MTCNN's small
  # convolutions gain little from intra-op threads, and when the cores are
  # shared (other workers, other jobs) OpenMP's spinning threads collapse:
  # one worker on a busy 2-core machine did 17 images/s with one thread and
  # 1 image/s with torch's default (benchmarks/mtcnn_bench.py).
  torch_threads = 1
  bar = tqdm(total=len(tasks), desc="MTCNN", unit="img", disable=not show_progress,
             dynamic_ncols=True, file=sys.stderr)
  try:
    with ctx.Pool(workers, initializer=_init_worker,
                  initargs=(settings, torch_threads, os.getpid())) as pool:
      for result in pool.imap_unordered(_process_task, tasks, chunksize=1):
        record = wanted[result["input"]]
        row = {**dataclasses.asdict(record), **result}
        row["input"] = result["input"]
        log.write(row)
        state[result["input"]] = {k: str(row.get(k, "")) for k in _PROGRESS_FIELDS}
        counts[result["status"]] += 1
        if result.get("device"):
          devices.add(result["device"])
        if result["status"] != KEPT:
          reasons[result["reason"]] += 1
        bar.update(1)
        bar.set_postfix(kept=counts[KEPT], rejected=counts[REJECTED],
                        errors=counts[ERROR], refresh=False)
      pool.close()
      pool.join()
  finally:
    bar.close()
  return counts, reasons, devices


def _finalize(output_dir: str, state: dict, wanted: dict) -> int:
  """Rewrites manifest.csv and rejects.csv from every item done so far."""
  faces, rejects = [], []
  for key, row in sorted(state.items()):
    record = wanted.get(key)
    # This run's records carry the latest subject/source/split.
    meta = (dataclasses.asdict(record) if record is not None
            and record.expression == row["expression"] else row)
    if row["status"] == KEPT:
      if os.path.isfile(os.path.join(output_dir, row["output"])):
        faces.append({"path": row["output"], "expression": row["expression"],
                      "subject": meta["subject"], "source": meta["source"],
                      "split": meta["split"], "input": key})
    else:
      rejects.append({"input": key, "expression": row["expression"],
                      "subject": meta["subject"], "source": meta["source"],
                      "reason": row["reason"], "detail": row["detail"]})
  faces.sort(key=lambda r: r["path"])
  contract.write_manifest(output_dir, faces, extra_fields=("input",))
  _write_csv_atomic(os.path.join(output_dir, REJECTS_NAME), _REJECT_FIELDS, rejects)
  return len(faces)


# --------------------------------------------------------------------------
# Command line.


def _define_flags():
  # Defined only when run as a program: spawned workers import this module
  # again (as __mp_main__), and defining absl flags twice is an error.
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("input_dir", None,
                      "Folder of raw photos, one sub-folder per expression "
                      "(Happy/, Sad/, ...; see data_tools.labels for the names).")
  flags.DEFINE_string("output_dir", None,
                      "Face set to write: <expression>/*.png, manifest.csv, "
                      "rejects.csv. Rerunning into the same folder resumes.")
  flags.DEFINE_integer("min_face_size", 40,
                       "Smallest accepted face, in pixels of the photo (shorter "
                       "side of MTCNN's box).")
  flags.DEFINE_float("min_prob", 0.9, "Smallest accepted MTCNN face probability.")
  flags.DEFINE_float("max_distortion", DEFAULT_MAX_DISTORTION,
                     "Largest accepted landmark misfit: RMS distance between the "
                     "aligned landmarks and the template, in eye distances. A "
                     "frontal smiling face scores about 0.15, a head turned 45 "
                     "degrees about 0.2, 60 degrees about 0.3; wrong landmarks "
                     "score higher.")
  flags.DEFINE_enum("multi_face", "largest", MULTI_FACE_POLICIES,
                    "Photos with several faces: keep the largest, the most "
                    "confident, or reject the photo.")
  flags.DEFINE_integer("workers", None,
                       "Worker processes, each with its own MTCNN (default: "
                       "number of cores).")
  flags.DEFINE_enum("device", "auto", DEVICES,
                    "Where MTCNN runs: auto uses CUDA when torch sees a GPU.")
  flags.DEFINE_string("source", None,
                      "Value of the manifest's source column (default: the "
                      "input folder's name).")
  flags.DEFINE_bool("subject_from_dir", False,
                    "Take subjects from the folder level under the class "
                    "folder (RAW/Happy/<subject>/x.jpg) when no "
                    "capture_manifest.csv names them.")
  return flags.FLAGS


def main(argv, flag_values):
  from data_tools import preprocess as lib  # pylint: disable=g-import-not-at-top
  # The library module, not this __main__ copy, so the workers unpickle
  # data_tools.preprocess functions.
  if len(argv) > 1:
    print(f"error: unexpected arguments {' '.join(argv[1:])}", file=sys.stderr)
    return 2
  fv = flag_values
  try:
    if not fv.input_dir or not fv.output_dir:
      raise UserError("pass --input_dir=RAW (photos) and --output_dir=DIR (face set)")
    inp, out = os.path.realpath(fv.input_dir), os.path.realpath(fv.output_dir)
    if out == inp or out.startswith(inp + os.sep):
      raise UserError("--output_dir must not be --input_dir or inside it: the "
                      "inputs stay as they are; pick a separate folder")
    scan = lib.scan_folder_tree(fv.input_dir, source=fv.source,
                                subject_from_dir=fv.subject_from_dir)
    for folder, n in sorted(scan.dropped.items()):
      print(f"skipping {n} photo(s) of dropped class {folder}", file=sys.stderr)
    if scan.ignored:
      print(f"ignoring {scan.ignored} file(s) that are not images", file=sys.stderr)
    summary = lib.run_preprocess(
        scan.records, fv.output_dir, workers=fv.workers,
        min_face_size=fv.min_face_size, min_prob=fv.min_prob,
        max_distortion=fv.max_distortion, multi_face=fv.multi_face,
        device=fv.device, show_progress=True)
  except UserError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("interrupted: rerun the same command to resume", file=sys.stderr)
    return 130
  reasons = ", ".join(f"{k} {v}" for k, v in sorted(summary["reasons"].items()))
  print(f"kept {summary['kept']}, rejected {summary['rejected']}"
        f"{f' ({reasons})' if reasons else ''}, errors {summary['errors']}, "
        f"skipped {summary['skipped']} already done; "
        f"{summary['total_kept']} faces in {summary['manifest']}; "
        f"rejects in {summary['rejects']} ({summary['seconds']} s)")
  if summary["errors"]:
    print(f"warning: {summary['errors']} photo(s) failed with errors (see "
          f"{summary['rejects']}); rerun to retry them", file=sys.stderr)
  if summary["total_kept"] == 0:
    print(f"error: no face was kept: see {summary['rejects']} for the reasons",
          file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _FLAG_VALUES = _define_flags()
  app.run(lambda argv: main(argv, _FLAG_VALUES))
