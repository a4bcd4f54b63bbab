"""Drawing primitives of the synthetic face renderer (data_tools/synthetic_faces.py).

A `Canvas` is a 112x112 uint8 image plus one image's geometric nuisance: shapes
are given in canonical face coordinates and land where the posed face puts them.
`photometric_nuisance` degrades a finished image (lighting, blur, noise).

Changing what is drawn changes the cached sets: bump `RENDER_VERSION` in
data_tools/synthetic.py.
"""

import math

import cv2
import numpy as np

from dicefer_jax import contract

SIZE = contract.IMAGE_SIZE

_SHIFT = 4  # cv2 sub-pixel bits: coordinates are drawn with 1/16 px precision.
_ONE = float(1 << _SHIFT)
_AA = cv2.LINE_AA
# Pixel coordinates relative to the image centre, for the lighting gradient.
_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
_XX -= SIZE / 2.0
_YY -= SIZE / 2.0
U9 = np.linspace(-1.0, 1.0, 9)


def tone(value: float) -> int:
  """A gray level clipped to 0..255 and rounded."""
  return int(min(255.0, max(0.0, value)) + 0.5)


class Canvas:
  """A uint8 canvas plus the image's geometric nuisance (yaw, then an affine).

  Shapes are built in canonical face coordinates; `depth` says how far a point
  sits in front of the head outline, which is how much a yaw moves it sideways.
  """

  def __init__(self, background: float, matrix: np.ndarray, yaw: float,
               scale: float):
    self.img = np.full((SIZE, SIZE), tone(background), np.uint8)
    self.m = matrix
    self.yaw = yaw
    self.scale = scale

  def tf(self, pts: np.ndarray, depth: float) -> np.ndarray:
    """Canonical points -> image points (float pixels)."""
    pts = np.asarray(pts, np.float64)
    x = pts[..., 0] + self.yaw * depth
    y = pts[..., 1]
    m = self.m
    return np.stack([m[0, 0] * x + m[0, 1] * y + m[0, 2],
                     m[1, 0] * x + m[1, 1] * y + m[1, 2]], axis=-1)

  @staticmethod
  def fix(pts: np.ndarray) -> np.ndarray:
    """Image points -> cv2's fixed-point coordinates."""
    return np.round(pts * _ONE).astype(np.int32)

  def poly(self, pts, gray: float, depth: float = 0.0):
    cv2.fillPoly(self.img, [self.fix(self.tf(pts, depth))], tone(gray), _AA, _SHIFT)

  def line(self, pts, gray: float, depth: float = 0.0, thickness: int = 1):
    cv2.polylines(self.img, [self.fix(self.tf(pts, depth))], False, tone(gray),
                  thickness, _AA, _SHIFT)

  def ellipse(self, centre, axes, gray: float, depth: float = 0.0, n: int = 16):
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    pts = np.stack([centre[0] + axes[0] * np.cos(t), centre[1] + axes[1] * np.sin(t)], -1)
    self.poly(pts, gray, depth)

  def fill_eyeball(self, outline: np.ndarray, iris_centre, iris_radius: float,
                   white: float, iris_tone: float):
    """Sclera, iris and pupil clipped to the lid `outline`, blended in a patch.

    Blended rather than drawn shape over shape, so the iris is cut off by the
    lids (depth 0.6) without a mask over the whole image.
    """
    pts = self.tf(outline, 0.6)
    ic = self.tf(np.asarray(iris_centre), 0.65)
    x0 = max(0, int(math.floor(pts[:, 0].min())) - 1)
    y0 = max(0, int(math.floor(pts[:, 1].min())) - 1)
    x1 = min(SIZE, int(math.ceil(pts[:, 0].max())) + 2)
    y1 = min(SIZE, int(math.ceil(pts[:, 1].max())) + 2)
    if x1 - x0 < 2 or y1 - y0 < 2:
      return
    off = np.array([x0, y0], np.float64)
    eye_mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.fillPoly(eye_mask, [self.fix(pts - off)], 255, _AA, _SHIFT)
    iris_mask = np.zeros_like(eye_mask)
    c = self.fix(ic - off)
    r = iris_radius * self.scale
    cv2.circle(iris_mask, (int(c[0]), int(c[1])), int(r * _ONE), 255, -1, _AA, _SHIFT)
    pupil_mask = np.zeros_like(eye_mask)
    cv2.circle(pupil_mask, (int(c[0]), int(c[1])), int(0.45 * r * _ONE), 255, -1, _AA,
               _SHIFT)
    a_eye = eye_mask.astype(np.float32) * (1.0 / 255.0)
    a_iris = np.minimum(a_eye, iris_mask.astype(np.float32) * (1.0 / 255.0))
    a_pupil = np.minimum(a_eye, pupil_mask.astype(np.float32) * (1.0 / 255.0))
    patch = self.img[y0:y1, x0:x1].astype(np.float32)
    patch += (white - patch) * a_eye
    patch += (iris_tone - patch) * a_iris
    patch += (max(0.0, iris_tone - 25.0) - patch) * a_pupil
    self.img[y0:y1, x0:x1] = np.clip(patch + 0.5, 0, 255).astype(np.uint8)


def curve(x0, x1, y_of_u, u=U9):
  """Points (x(u), y(u)) with x running linearly from x0 to x1 over u in [-1,1]."""
  x = x0 + (u + 1.0) * 0.5 * (x1 - x0)
  return np.stack([x, y_of_u(u)], -1)


def quad(p0, p1, p2, n: int = 7) -> np.ndarray:
  """A quadratic Bezier from p0 to p2 pulled towards p1."""
  t = np.linspace(0.0, 1.0, n)[:, None]
  p0, p1, p2 = (np.asarray(p, np.float64) for p in (p0, p1, p2))
  return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2


def band(x, y_top, y_bottom) -> np.ndarray:
  """The polygon between two curves over the same x (top left to right, back)."""
  return np.concatenate([np.stack([x, y_top], -1), np.stack([x, y_bottom], -1)[::-1]])


def photometric_nuisance(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Lighting gradient, contrast and brightness, blur and sensor noise."""
  theta = rng.uniform(0.0, 2.0 * np.pi)
  g = rng.uniform(0.0, 0.35) / (SIZE / 2.0)
  contrast = rng.uniform(0.8, 1.15)
  bright = rng.uniform(-18.0, 18.0)
  f = img.astype(np.float32)
  f *= (1.0 + g * (math.cos(theta) * _XX + math.sin(theta) * _YY)) * contrast
  f += bright + 128.0 * (1.0 - contrast)
  sigma = rng.uniform(0.35, 1.2)
  f = cv2.GaussianBlur(f, (0, 0), sigma)
  f += rng.standard_normal((SIZE, SIZE), dtype=np.float32) * np.float32(
      rng.uniform(1.0, 6.0))
  return np.clip(f + 0.5, 0.0, 255.0).astype(np.uint8)
