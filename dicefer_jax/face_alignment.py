"""Five-landmark face alignment: a photo and its landmarks -> 112x112 gray face.

The faces of every face set, and the faces a predictor feeds to the model, are
made here, so training and prediction see faces cut the same way: the least-
squares similarity (rotation, uniform scale, translation) that maps the five
MTCNN landmarks onto FACE_TEMPLATE, applied to the grayscale photo.

Pure numpy and OpenCV; no torch, no TensorFlow.
"""

import cv2
import numpy as np

from dicefer_jax import contract

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
TEMPLATE_EYE_DISTANCE = float(FACE_TEMPLATE[1, 0] - FACE_TEMPLATE[0, 0])


def transform_points(m: np.ndarray, points) -> np.ndarray:
  """Applies a 2x3 affine matrix to (N, 2) points; returns (N, 2) float64."""
  points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
  return points @ np.asarray(m, np.float64)[:, :2].T + np.asarray(m, np.float64)[:, 2]


def similarity_to_template(landmarks5) -> tuple[np.ndarray | None, float]:
  """Least-squares similarity from five landmarks onto FACE_TEMPLATE.

  Args:
    landmarks5: (5, 2) x, y pixel positions of left eye, right eye, nose tip,
      left and right mouth corner.

  Returns:
    (M, distortion): M is the 2x3 matrix (rotation, uniform scale,
    translation; no shear or reflection) or None for degenerate landmarks.
    distortion is the RMS distance between the mapped landmarks and the
    template, in template eye distances: how far the face's shape is from
    what a similarity (i.e. without stretching) can align. It grows with head
    yaw/pitch and with wrong landmarks; it is inf when M is None.
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
  return m, rms / TEMPLATE_EYE_DISTANCE


def to_gray(image: np.ndarray) -> np.ndarray:
  """A uint8 image (H, W), (H, W, 1), RGB (H, W, 3) or RGBA (H, W, 4) as (H, W) gray.

  Raises:
    ValueError: not uint8, or not one of those shapes.
  """
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
  gray = to_gray(image_rgb)
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
