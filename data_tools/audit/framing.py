"""Out-of-frame and badly cropped faces: MTCNN run again on every image.

An aligned face set (the on-disk contract) has every face at the alignment
template (`dicefer_jax.face_alignment.FACE_TEMPLATE`). The audit detects the
face again and measures how far its five landmarks are from the template:
  - no face: MTCNN finds none;
  - off centre: the landmarks' centre is more than `max_offset` template eye
    distances from where the set's faces are (`reference_of`);
  - too small / too large: the eye distance is outside
    [min_scale, max_scale] x the set's;
  - cut off: part of the face box or a landmark lies outside the image.
The image is padded with its edge grey and enlarged before detection, so a
face cut by the border is still found (and called cut off, not "no face").

A raw photo tree (not yet aligned) is judged instead by the rules preprocessing
applies (`face_quality.decide`: no face, too small, implausible landmarks, too
distorted), plus the cut-off rule on the chosen face.

Detection runs in spawned worker processes: torch and the TensorFlow the label
check trains with must not share a process (docs/design.md).
"""

import dataclasses
import multiprocessing
import os
from typing import Sequence

import numpy as np

from data_tools.audit import findings as findings_lib
from dicefer_jax import face_alignment, face_images, face_quality, fileio
from dicefer_jax.errors import DataError

# The border added around an aligned face before detection, as a share of its
# side: a face shifted by up to this much still has all of itself in view.
_PAD_FRACTION = 0.25
# MTCNN's smallest face is 12 px at its finest scale; doubling a 112 px face
# puts a template face (eye distance 32 px, face about 75 px) far above it and
# measurably steadies the landmarks of small faces.
_UPSCALE = 2.0
_NO_FACE_SCORE = 100.0  # no face is the worst framing there is


@dataclasses.dataclass(frozen=True)
class Thresholds:
  # Limits measured on the default synthetic set (4,389 images with planted
  # problems, seed 0): at 0.25 eye distances 17 clean faces were called off
  # centre, all between 0.25 and 0.28; a crop 10% of the side off centre is
  # 0.35-0.4 eye distances away, the planted ones 0.8-1.1.
  max_offset: float = 0.35   # eye distances between the landmark centre and the set's
  min_scale: float = 0.75    # eye distance / the set's eye distance
  max_scale: float = 1.35
  max_cut: float = 0.05      # share of the face box outside the image
  # Weaker detections count as no face. At 0.8, 17 clean synthetic faces were
  # "no clear face" (p 0.7-0.8); MTCNN's last stage gives non-faces far less.
  min_prob: float = 0.6


@dataclasses.dataclass
class Detection:
  """The best face MTCNN found in one image, in that image's pixels."""

  found: bool
  prob: float = 0.0
  box: np.ndarray | None = None        # (4,) x0, y0, x1, y1
  landmarks: np.ndarray | None = None  # (5, 2)
  width: int = 0
  height: int = 0
  error: str = ""


# --------------------------------------------------------------------------
# In the worker processes.

_detector = None


def _worker_init(torch_threads: int) -> None:
  global _detector
  _detector = None
  os.environ["DICEFER_AUDIT_TORCH_THREADS"] = str(torch_threads)


def _get_detector():
  global _detector
  if _detector is None:
    threads = int(os.environ.get("DICEFER_AUDIT_TORCH_THREADS", "1"))
    _detector = face_quality.make_detector(
        face_quality.Settings(min_face_size=12, device="cpu"), torch_threads=threads)
  return _detector


# The views of an aligned face MTCNN is shown, in order, until one shows a
# clear face: (border share, enlargement, equalise the histogram). The padded
# view comes first (a face cut by the border is still found). MTCNN's misses
# differ between views: of 135 clean synthetic faces the first view missed,
# the equalised one found 73%, and with the unpadded 1.5x view 81%.
_VIEWS = ((_PAD_FRACTION, _UPSCALE, False), (_PAD_FRACTION, _UPSCALE, True),
          (0.0, 1.5, False))


def _best_face(detector, gray: np.ndarray, pad_fraction: float, upscale: float,
               equalize: bool):
  """(prob, box, landmarks) of the most confident face of one view of `gray`,
  in `gray`'s coordinates, or None."""
  import cv2  # pylint: disable=g-import-not-at-top
  image = cv2.equalizeHist(gray) if equalize else gray
  pad = int(round(pad_fraction * max(gray.shape[:2])))
  if pad:
    image = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
  image = cv2.resize(image, None, fx=upscale, fy=upscale, interpolation=cv2.INTER_LINEAR)
  boxes, probs, landmarks = detector.detect(np.repeat(image[..., None], 3, axis=-1))
  if boxes is None or len(boxes) == 0:
    return None
  probs = np.asarray(probs, np.float64).reshape(-1)
  best = int(np.argmax(probs))
  box = np.asarray(boxes, np.float64).reshape(-1, 4)[best] / upscale - pad
  points = np.asarray(landmarks, np.float64).reshape(-1, 5, 2)[best] / upscale - pad
  return float(probs[best]), box, points


def detect_padded(detector, gray: np.ndarray, min_prob: float = Thresholds.min_prob
                  ) -> Detection:
  """The most confident face of a gray aligned image, in its own pixels
  (the first of `_VIEWS` that shows a clear face, else the most confident)."""
  h, w = gray.shape[:2]
  best = None
  for view in _VIEWS:
    found = _best_face(detector, gray, *view)
    if found is not None and (best is None or found[0] > best[0]):
      best = found
    if best is not None and best[0] >= min_prob:
      break
  if best is None:
    return Detection(False, width=w, height=h)
  return Detection(True, best[0], best[1], best[2], width=w, height=h)


def _detect_file(path: str) -> Detection:
  try:
    rgb = face_images.read_image(path)
  except face_images.UnreadableImage as e:
    return Detection(False, error=str(e))
  gray = face_alignment.to_gray(rgb)
  return detect_padded(_get_detector(), gray)


def _detect_raw_file(path: str) -> Detection:
  """A raw photo: detection as preprocessing runs it (no padding)."""
  try:
    rgb = face_images.read_image(path)
  except face_images.UnreadableImage as e:
    return Detection(False, error=str(e))
  boxes, probs, landmarks = _get_detector().detect(rgb)
  h, w = rgb.shape[:2]
  if boxes is None or len(boxes) == 0:
    return Detection(False, width=w, height=h)
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  probs = np.asarray(probs, np.float64).reshape(-1)
  landmarks = np.asarray(landmarks, np.float64).reshape(-1, 5, 2)
  best = int(np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))
  return Detection(True, float(probs[best]), boxes[best], landmarks[best], w, h)


# --------------------------------------------------------------------------
# In the calling process.

def detect_all(paths: Sequence[str], *, raw: bool = False, workers: int | None = None,
               progress=None) -> list[Detection]:
  """MTCNN on every file, in `workers` spawned processes (torch stays out of
  this one). `progress(n)` is called with the number of files done so far."""
  workers = max(1, min(workers or fileio.default_workers(), len(paths) or 1))
  fn = _detect_raw_file if raw else _detect_file
  # Spawn, not fork: a forked child inherits TensorFlow's and XLA's threads.
  context = multiprocessing.get_context("spawn")
  results = []
  chunk = max(1, min(64, len(paths) // (4 * workers) or 1))
  with context.Pool(workers, initializer=_worker_init,
                    initargs=(max(1, fileio.default_workers() // workers),)) as pool:
    for detection in pool.imap(fn, paths, chunksize=chunk):
      results.append(detection)
      if progress is not None:
        progress(len(results))
  return results


def _cut_share(box: np.ndarray, width: int, height: int) -> float:
  """Share of the box's area outside the image."""
  x0, y0, x1, y1 = box
  area = max(x1 - x0, 1e-9) * max(y1 - y0, 1e-9)
  ix = max(0.0, min(x1, width) - max(x0, 0.0))
  iy = max(0.0, min(y1, height) - max(y0, 0.0))
  return float(1.0 - ix * iy / area)


@dataclasses.dataclass(frozen=True)
class Reference:
  """Where a face sits in this set's images, as fractions of the image width."""

  centre: tuple[float, float]
  eye_distance: float
  source: str   # "template" or "set median of N faces"


TEMPLATE_REFERENCE = Reference(
    tuple(face_alignment.FACE_TEMPLATE.mean(0) / face_alignment.OUTPUT_SIZE),
    face_alignment.TEMPLATE_EYE_DISTANCE / face_alignment.OUTPUT_SIZE, "template")
# Below this many detected faces the set's median is too noisy to stand for it.
_MIN_FACES_FOR_MEDIAN = 20


def reference_of(detections: Sequence[Detection], min_prob: float) -> Reference:
  """The median face position of the set's confident detections.

  For a set made by `data_tools.preprocess` this is the alignment template; an
  importer's crops (FER2013's, AffectNet's) or the synthetic renderer place
  faces their own way, and what is wrong is a face far from where the set's
  faces are, not from where ours would be.
  """
  centres, eyes = [], []
  for d in detections:
    if d.found and d.prob >= min_prob and d.width:
      centres.append(d.landmarks.mean(0) / d.width)
      eyes.append(np.linalg.norm(d.landmarks[1] - d.landmarks[0]) / d.width)
  if len(centres) < _MIN_FACES_FOR_MEDIAN:
    return TEMPLATE_REFERENCE
  return Reference(tuple(float(v) for v in np.median(centres, axis=0)),
                   float(np.median(eyes)), f"set median of {len(centres)} faces")


def aligned_measures(d: Detection, ref: Reference = TEMPLATE_REFERENCE) -> dict:
  """Offset (reference eye distances), scale and cut share of a found face."""
  eye_distance = ref.eye_distance * d.width
  offset = np.linalg.norm(d.landmarks.mean(0) - np.asarray(ref.centre) * d.width)
  scale = np.linalg.norm(d.landmarks[1] - d.landmarks[0]) / eye_distance
  outside = ((d.landmarks < 0) | (d.landmarks >= [d.width, d.height])).any(1).sum()
  return dict(offset=float(offset / eye_distance), scale=float(scale),
              cut=_cut_share(d.box, d.width, d.height), landmarks_outside=int(outside))


def judge_aligned(d: Detection, t: Thresholds, ref: Reference = TEMPLATE_REFERENCE
                  ) -> tuple[float, str] | None:
  """(score, detail) of a framing problem of an aligned face, or None when fine.
  The score is the worst criterion's value over its threshold (>1 = flagged)."""
  if d.error:
    return _NO_FACE_SCORE, f"unreadable: {d.error}"
  if not d.found or d.prob < t.min_prob:
    return _NO_FACE_SCORE, ("MTCNN found no face" if not d.found else
                            f"no clear face: p={d.prob:.2f} < {t.min_prob}")
  m = aligned_measures(d, ref)
  problems = []
  if m["offset"] > t.max_offset:
    problems.append((m["offset"] / t.max_offset,
                     f"off centre by {m['offset']:.2f} eye distances > {t.max_offset}"))
  if m["scale"] < t.min_scale:
    problems.append((t.min_scale / m["scale"],
                     f"too small: eye distance x{m['scale']:.2f} of the set's "
                     f"< {t.min_scale}"))
  if m["scale"] > t.max_scale:
    problems.append((m["scale"] / t.max_scale,
                     f"too large: eye distance x{m['scale']:.2f} of the set's "
                     f"> {t.max_scale}"))
  if m["cut"] > t.max_cut or m["landmarks_outside"]:
    problems.append((max(m["cut"] / t.max_cut, 1.0 + m["landmarks_outside"]),
                     f"cut off: {100 * m['cut']:.0f}% of the face box outside the image"
                     + (f", {m['landmarks_outside']} landmark(s) outside"
                        if m["landmarks_outside"] else "")))
  if not problems:
    return None
  problems.sort(key=lambda p: -p[0])
  return problems[0][0], "; ".join(p[1] for p in problems)


def judge_raw(d: Detection, t: Thresholds,
              settings: face_quality.Settings = face_quality.Settings()
              ) -> tuple[float, str] | None:
  """(score, detail) of a raw photo preprocessing would reject or that shows a
  cut-off face, or None when fine."""
  if d.error:
    return _NO_FACE_SCORE, f"unreadable: {d.error}"
  if not d.found:
    return _NO_FACE_SCORE, "MTCNN found no face"
  decision = face_quality.check_face(d.box, d.prob, d.landmarks, settings)
  if d.prob < settings.min_prob:
    return _NO_FACE_SCORE, f"no clear face: p={d.prob:.2f} < {settings.min_prob}"
  if decision.status != face_quality.KEPT:
    return 10.0, f"preprocessing would reject it: {decision.reason} ({decision.detail})"
  cut = _cut_share(d.box, d.width, d.height)
  if cut > t.max_cut:
    return cut / t.max_cut, f"cut off: {100 * cut:.0f}% of the face box outside the photo"
  return None


def framing_findings(records, detections: Sequence[Detection], t: Thresholds, *,
                     raw: bool = False) -> list[findings_lib.Finding]:
  """One FRAMING finding per badly framed image (records[i] <-> detections[i])."""
  if len(records) != len(detections):
    raise DataError(f"{len(records)} records but {len(detections)} detections")
  if raw:
    judge = lambda d: judge_raw(d, t)
  else:
    ref = reference_of(detections, t.min_prob)
    judge = lambda d: judge_aligned(d, t, ref)
  out = []
  for r, d in zip(records, detections):
    verdict = judge(d)
    if verdict is not None:
      score, detail = verdict
      out.append(findings_lib.Finding(path=r.path, kind=findings_lib.FRAMING,
                                      score=float(score), suggestion=findings_lib.DROP,
                                      detail=detail, expression=r.expression,
                                      subject=r.subject))
  return out
