"""Which detected faces of a photo are usable, and the one code path that cuts them.

`decide` turns MTCNN's detections of one photo into a `Decision`: the face
to align, or a reject reason as written to rejects.csv. `Settings` holds the
thresholds (the preprocessing flags) and is recorded with each face set.

Preprocessing and prediction cut faces through the same functions, so a model
sees at prediction time faces made exactly like those it was trained on:

  detector = make_detector(settings)
  decision, face = detect_and_align(detector, image_rgb, settings)   # one face
  faces = detect_and_align_all(detector, image_rgb, settings)        # every face

Importing this module does not import torch (only `make_detector` does).
"""

import dataclasses

import numpy as np

from dicefer_jax import face_detector
from dicefer_jax.errors import UserError
from dicefer_jax.face_alignment import align_face
from dicefer_jax.face_alignment import similarity_to_template
from dicefer_jax.face_alignment import transform_points
from dicefer_jax.face_detector import as_float_array
from dicefer_jax.face_detector import DEVICES

MULTI_FACE_POLICIES = ("largest", "most_confident", "reject")
DEFAULT_MAX_DISTORTION = 0.3

# What became of one photo, as in the progress log. "error" (an unexpected
# failure, or a file that went missing) is not final: the photo is retried by
# the next run.
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


@dataclasses.dataclass(frozen=True)
class Settings:
  """What decides whether a face is kept; recorded in preprocess_settings.json."""

  min_face_size: int = 40
  min_prob: float = 0.9
  max_distortion: float = DEFAULT_MAX_DISTORTION
  multi_face: str = "largest"
  device: str = "auto"

  def validate(self) -> None:
    """Raises UserError, naming the flag, for a value out of range."""
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


@dataclasses.dataclass(frozen=True)
class Decision:
  """What to do with one photo's detections."""

  status: str  # KEPT or REJECTED
  reason: str = ""
  detail: str = ""
  landmarks: np.ndarray | None = None  # (5, 2) of the chosen face when kept


def decide(boxes, probs, landmarks, settings: Settings) -> Decision:
  """Chooses the face to keep among MTCNN detections, or a reject reason.

  Args:
    boxes: (N, 4) x0, y0, x1, y1 per face, or None when none was found.
    probs: (N,) detection probabilities.
    landmarks: (N, 5, 2) landmarks per face.
    settings: thresholds and the multi-face policy.

  Returns:
    KEPT with the chosen face's landmarks, or REJECTED with a reason and a
    one-line detail.

  Faces below --min_prob are ignored. Among the rest the policy picks one
  (largest box, or most confident), or with `reject` refuses the photo when
  more than one face of at least --min_face_size is left. The chosen face
  must be at least --min_face_size pixels (shorter box side), its landmarks
  must be ordered like a face's and lie in its box, and its shape must fit
  the template within --max_distortion.
  """
  if boxes is None or len(boxes) == 0:
    return Decision(REJECTED, NO_FACE, "MTCNN found no face")
  boxes = as_float_array(boxes, (-1, 4))
  probs = as_float_array(probs, (-1,))
  landmarks = as_float_array(landmarks, (-1, 5, 2))
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
  return check_face(boxes[pick], probs[pick], landmarks[pick], settings)


def check_face(box, prob, points, settings: Settings) -> Decision:
  """Whether one detected face is usable: big enough, plausible landmarks, not
  too distorted (the rules of `decide` for the face it picked).

  Args:
    box: x0, y0, x1, y1 of the face.
    prob: its detection probability.
    points: its (5, 2) landmarks.
    settings: the thresholds.

  Returns:
    KEPT with the landmarks, or REJECTED with a reason and a one-line detail.
  """
  x0, y0, x1, y1 = (float(v) for v in np.asarray(box, np.float64).reshape(4))
  points = np.asarray(points, np.float64).reshape(5, 2)
  width, height = x1 - x0, y1 - y0
  size = min(width, height)
  stats = f"p={float(prob):.4f} size={size:.0f}px"
  if size < settings.min_face_size:
    return Decision(REJECTED, TOO_SMALL,
                    f"face {size:.0f}px < --min_face_size={settings.min_face_size}")
  m, distortion = similarity_to_template(points)
  if m is None:
    return Decision(REJECTED, IMPLAUSIBLE, f"degenerate landmarks; {stats}")
  # Landmarks well outside the face box mean the landmark regression failed.
  margin_x, margin_y = 0.25 * width, 0.25 * height
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


def make_detector(settings: Settings, torch_threads: int | None = None
                  ) -> face_detector.MTCNNDetector:
  """The MTCNN that `settings` asks for (imports torch; build one per process)."""
  return face_detector.MTCNNDetector(min_face_size=settings.detector_min_face,
                                     device=settings.device, torch_threads=torch_threads)


def detect_and_align(detector, image_rgb: np.ndarray, settings: Settings
                     ) -> tuple[Decision, np.ndarray | None]:
  """Preprocessing's path for one photo: detect, pick one face (`decide`), align.

  Returns:
    (decision, face): face is the aligned uint8 (112, 112) gray face when the
    decision is KEPT, else None.
  """
  decision = decide(*detector.detect(image_rgb), settings)
  if decision.status != KEPT:
    return decision, None
  return decision, align_face(image_rgb, decision.landmarks)


@dataclasses.dataclass(frozen=True)
class AlignedFace:
  """One usable face of a photo, cut as preprocessing cuts it."""

  box: np.ndarray        # (4,) x0, y0, x1, y1 in photo pixels
  landmarks: np.ndarray  # (5, 2) in photo pixels
  det_score: float       # MTCNN's face probability
  face: np.ndarray       # uint8 (112, 112) aligned gray face


def detect_and_align_all(detector, image_rgb: np.ndarray, settings: Settings
                         ) -> list[AlignedFace]:
  """Every usable face of a photo, aligned: prediction's path.

  The same detector call, thresholds (`check_face` on each face with
  p >= settings.min_prob) and `align_face` as `detect_and_align`; only the
  one-face policy is left out, since a photo may show several people. Faces
  come largest first, so the face `decide` picks under the default
  "largest" policy is first. A photo whose shorter side is below
  settings.min_face_size has no usable face (preprocessing rejects it too).
  """
  if min(np.asarray(image_rgb).shape[:2]) < settings.min_face_size:
    return []
  boxes, probs, landmarks = detector.detect(image_rgb)
  if boxes is None or len(boxes) == 0:
    return []
  boxes = as_float_array(boxes, (-1, 4))
  probs = as_float_array(probs, (-1,))
  landmarks = as_float_array(landmarks, (-1, 5, 2))
  areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  faces = []
  for i in np.argsort(-areas, kind="stable"):
    if probs[i] < settings.min_prob:
      continue
    if check_face(boxes[i], probs[i], landmarks[i], settings).status != KEPT:
      continue
    faces.append(AlignedFace(box=boxes[i], landmarks=landmarks[i],
                             det_score=float(probs[i]),
                             face=align_face(image_rgb, landmarks[i])))
  return faces
