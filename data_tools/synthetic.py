"""The built-in synthetic face set: cartoon faces with identities and action units.

Renders 112x112 8-bit grayscale faces of many synthetic subjects showing the seven
canonical expressions, and writes them in the on-disk data contract
(`DIR/<expression>/<subject>_<expression>_<k>.png` plus `DIR/manifest.csv`), with a
contact sheet for people to look at.

It is meant to be a fair test of what DICE-FER claims, so it has the three things
that make real facial expression recognition hard:
- expressions built from facial action units (AUs) following the EMFACS
  prototypes, at random (often subtle) intensity and with occasional missing AUs,
  plus per-subject idiosyncrasies in how each expression is produced;
- nuisance: pose (yaw-like feature shift), scale and rotation jitter, lighting
  gradients, blur and sensor noise;
- identity confounders: resting traits that look like expression cues (a mouth
  that curves up or down, low or oblique brows, wide or narrow eyes, deep
  nasolabial folds, parted lips, thin lips), so a classifier that learns who a
  person is can be misled on people it has not seen.

Usage:
  python -m data_tools.synthetic --output_dir=DIR [--num_subjects=60]
      [--images_per_cell=10] [--seed=0] [--workers=N] [--overwrite]
      [--confounders=1.0]

`--confounders=0` renders the same people without their misleading resting
traits (an ablation: how much of a classifier's seen/unseen gap they cause).
`python -m data_tools.synthetic_probe --data_dir=DIR` measures that gap.

Library use (the training code, when no data directory is configured):
  from data_tools.synthetic import ensure_synthetic
  data_dir = ensure_synthetic("/tmp/faces", num_subjects=60, images_per_cell=10,
                              seed=0)

Every image's random stream is derived from (seed, subject, expression, k), so the
output is byte-identical for a seed whatever the number of workers.
"""

import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import os
import sys
import time
from typing import Callable, Optional, Sequence

import cv2
import numpy as np

from dicefer_jax import contract
from dicefer_jax.errors import UserError

# Bump when the renderer changes what it draws: ensure_synthetic regenerates sets
# made by another version instead of silently reusing them.
RENDER_VERSION = 1
SOURCE = "synthetic"
PARAMS_NAME = "synthetic.json"
CONTACT_SHEET_NAME = "contact_sheet.png"
SIZE = contract.IMAGE_SIZE
INTENSITY_RANGE = (0.3, 1.0)

# Action units used, in vector order.
AUS = (1, 2, 4, 5, 6, 7, 9, 12, 15, 16, 20, 23, 26)
_AU_INDEX = {au: i for i, au in enumerate(AUS)}
NUM_AUS = len(AUS)

# EMFACS prototypes (DESIGN.md, "Facts for the synthetic face set").
PROTOTYPES = {
    "neutral": (),
    "anger": (4, 5, 7, 23),
    "disgust": (9, 15, 16),
    "fear": (1, 2, 4, 5, 7, 20, 26),
    "happiness": (6, 12),
    "sadness": (1, 4, 15),
    "surprise": (1, 2, 5, 26),
}
# The AU that carries each expression; never dropped, so every image keeps its
# defining cue (dropping it would make the label noise, not a hard example).
_CORE = {"anger": 4, "disgust": 9, "fear": 20, "happiness": 12, "sadness": 15,
         "surprise": 26}
# AUs that real people add to a prototype (open-mouth anger, disgust with a
# frown, a laugh, ...). Each subject gets at most one habit per expression, which
# a classifier can learn for seen subjects only.
_HABITS = {
    "anger": (26, 9, 16),
    "disgust": (4, 7, 26),
    "fear": (15, 16),
    "happiness": (26, 5),
    "sadness": (7, 6, 16),
    "surprise": (16, 12),
}

# Salient resting traits that mimic an expression cue, and the AU each copies.
_TRAIT_AU = {
    "resting_smile": 12,     # mouth corners up: happiness
    "downturned_mouth": 15,  # corners down: sadness, disgust
    "low_brows": 4,          # heavy low brows: anger, sadness
    "worried_brows": 1,      # oblique brows: sadness, fear
    "wide_eyes": 5,          # surprise, fear, anger
    "narrow_eyes": 7,        # anger, fear
    "cheek_bags": 6,         # happiness
    "thin_lips": 23,         # anger
    "parted_lips": 26,       # surprise, fear
}
_TRAITS = tuple(_TRAIT_AU) + ("raised_brows", "nasolabial", "forehead_lines")

# Independent random streams (mixed into numpy SeedSequences with the user seed).
_SUBJECT_STREAM = 0x5B1EC7
_IMAGE_STREAM = 0x1A6E


@dataclasses.dataclass(frozen=True)
class SubjectParams:
  """Everything fixed about one synthetic person (canonical 112 px coordinates)."""

  subject_id: str
  index: int
  # Head shape.
  face_half_width: float
  jaw: float            # 1 = square jaw, lower = narrower, more pointed chin
  top_y: float          # top of the skull
  chin_y: float
  # Layout.
  eye_y: float
  eye_spacing: float    # half the distance between the eye centres
  eye_half_width: float
  eye_open: float       # half-height of the resting upper-lid opening
  canthal_tilt: float   # outer eye corner raised (+) or lowered (-), px
  iris_radius: float
  brow_gap: float       # eye centre to brow
  brow_thickness: float
  brow_length: float
  brow_arch: float
  nose_y: float         # nose base
  nose_half_width: float
  mouth_y: float        # lip line
  mouth_half_width: float
  upper_lip: float
  lower_lip: float
  # Tones (0..255 before lighting).
  skin: float
  background: float
  hair_tone: float
  brow_tone: float
  iris_tone: float
  lip_tone: float
  # Hair and accessories.
  hair_style: int       # 0 short, 1 side-swept, 2 long, 3 receding, 4 fringe
  hairline: float       # top of the skull to the hairline, px
  hair_volume: float
  hair_slant: float
  mustache: bool
  glasses: bool
  shade_side: int       # which side of the nose takes the bridge shadow
  # Identity confounders: a resting AU offset (things like a resting smile or
  # low heavy brows) drawn exactly like the expression's AU, plus wrinkles.
  rest_aus: tuple[float, ...]
  nasolabial: float
  forehead_lines: float
  # Per-expression AU multipliers (this person's way of showing it).
  style: tuple[tuple[float, ...], ...]


def _subject_rng(seed: int, index: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence([seed, _SUBJECT_STREAM, index]))


def image_rng(seed: int, subject_index: int, expression: str,
              k: int) -> np.random.Generator:
  """The random stream of one image: depends on nothing but its coordinates."""
  return np.random.default_rng(np.random.SeedSequence(
      [seed, _IMAGE_STREAM, subject_index, contract.expression_index(expression), k]))


def make_subject(index: int, seed: int, confounders: float = 1.0) -> SubjectParams:
  """Draws subject `index`; the same whatever the number of subjects asked for.

  `confounders` scales the resting cues only; every other trait (and so who the
  person is) is the same for any value.
  """
  r = _subject_rng(seed, index)
  u = r.uniform

  eye_y = u(47.0, 53.0)
  forehead = u(33.0, 39.0)
  nose_len = u(16.5, 21.0)
  mouth_gap = u(8.5, 11.5)
  chin_len = u(13.0, 17.0)
  top_y = eye_y - forehead
  nose_y = eye_y + nose_len
  mouth_y = nose_y + mouth_gap
  chin_y = mouth_y + chin_len
  # Centre the head vertically (as a face detector's crop would).
  dy = 57.0 - 0.5 * (top_y + chin_y)
  top_y, eye_y, nose_y, mouth_y, chin_y = (
      v + dy for v in (top_y, eye_y, nose_y, mouth_y, chin_y))

  face_half_width = u(29.0, 37.0)
  skin = u(105.0, 215.0)
  # Background differs from skin enough to see the head outline.
  background = u(35.0, 225.0)
  if abs(background - skin) < 25.0:
    background = skin - 40.0 if skin > 130.0 else skin + 40.0
  hair_tone = u(15.0, 190.0) if r.random() < 0.85 else u(190.0, 235.0)
  hair_style = int(r.integers(0, 5))

  # Confounders, in AU units (an AU at 1.0 is a full-intensity expression; the
  # subtlest expressions are 0.3). Everyone has some resting mouth curve and eye
  # opening; most people also have one to three salient traits, each as large
  # as a subtle expression, which is what misleads a classifier on strangers.
  c = confounders
  rest = np.zeros(NUM_AUS)
  mouth_curve = float(np.clip(r.normal(0.0, 0.18), -0.4, 0.4))
  rest[_AU_INDEX[12] if mouth_curve > 0 else _AU_INDEX[15]] = abs(mouth_curve)
  eyes = float(np.clip(r.normal(0.0, 0.15), -0.35, 0.35))
  rest[_AU_INDEX[5] if eyes > 0 else _AU_INDEX[7]] = abs(eyes)
  nasolabial = float(np.clip(r.exponential(0.08), 0.0, 0.3))
  forehead_lines = float(np.clip(r.exponential(0.06), 0.0, 0.3))
  n_traits = int(r.choice(4, p=(0.15, 0.35, 0.35, 0.15)))
  for trait in r.choice(len(_TRAITS), size=n_traits, replace=False):
    strength = u(0.25, 0.6)
    name = _TRAITS[trait]
    if name == "nasolabial":
      nasolabial = max(nasolabial, strength)
    elif name == "forehead_lines":
      forehead_lines = max(forehead_lines, strength)
    elif name == "raised_brows":
      rest[_AU_INDEX[1]] = max(rest[_AU_INDEX[1]], 0.6 * strength)
      rest[_AU_INDEX[2]] = max(rest[_AU_INDEX[2]], strength)
    else:
      au = _TRAIT_AU[name]
      rest[_AU_INDEX[au]] = max(rest[_AU_INDEX[au]], strength)
  rest = np.clip(rest * c, 0.0, 0.8)
  nasolabial *= c
  forehead_lines *= c

  # How this person produces each expression.
  style = np.zeros((len(contract.EXPRESSIONS), NUM_AUS))
  for e, name in enumerate(contract.EXPRESSIONS):
    for au in PROTOTYPES[name]:
      style[e, _AU_INDEX[au]] = u(0.6, 1.2)
    if name in _HABITS and r.random() < 0.35:
      style[e, _AU_INDEX[_HABITS[name][int(r.integers(len(_HABITS[name])))]]] = u(0.3, 0.6)
  for name, au in _CORE.items():
    e = contract.EXPRESSIONS.index(name)
    style[e, _AU_INDEX[au]] = max(style[e, _AU_INDEX[au]], 0.85)

  return SubjectParams(
      subject_id=f"s{index:03d}",
      index=index,
      face_half_width=face_half_width,
      jaw=u(0.55, 0.9),
      top_y=top_y,
      chin_y=chin_y,
      eye_y=eye_y,
      eye_spacing=u(12.0, 16.5),
      eye_half_width=u(5.0, 7.0),
      eye_open=u(2.3, 3.2),
      canthal_tilt=u(-1.0, 1.2),
      iris_radius=u(2.6, 3.3),
      brow_gap=u(6.0, 8.5),
      brow_thickness=u(1.3, 3.2),
      brow_length=u(11.0, 15.5),
      brow_arch=u(0.3, 2.2),
      nose_y=nose_y,
      nose_half_width=u(4.0, 6.5),
      mouth_y=mouth_y,
      mouth_half_width=u(8.5, 13.5),
      upper_lip=u(1.3, 3.0),
      lower_lip=u(1.8, 3.8),
      skin=skin,
      background=background,
      hair_tone=hair_tone,
      brow_tone=min(skin - 45.0, hair_tone + u(0.0, 40.0)),
      iris_tone=u(15.0, 80.0),
      lip_tone=skin - u(22.0, 55.0),
      hair_style=hair_style,
      hairline=u(3.0, 9.0) if hair_style != 4 else u(14.0, 19.0),
      hair_volume=u(2.0, 7.0),
      hair_slant=u(-7.0, 7.0) if hair_style == 1 else 0.0,
      mustache=bool(r.random() < 0.12),
      glasses=bool(r.random() < 0.12),
      shade_side=1 if r.random() < 0.5 else -1,
      rest_aus=tuple(float(v) for v in rest),
      nasolabial=nasolabial,
      forehead_lines=forehead_lines,
      style=tuple(tuple(float(v) for v in row) for row in style),
  )


def make_subjects(num_subjects: int, seed: int,
                  confounders: float = 1.0) -> list[SubjectParams]:
  """The first `num_subjects` subjects for a seed (ids s000, s001, ...)."""
  return [make_subject(i, seed, confounders) for i in range(num_subjects)]


def expression_aus(subject: SubjectParams, expression: str, intensity: float,
                   rng: np.random.Generator, variation: bool = True) -> np.ndarray:
  """The AU intensities (before the subject's resting offsets) of one image.

  With `variation` off, exactly the subject's way of showing the expression at
  this intensity (no per-image jitter, dropout or micro-movements).
  """
  e = contract.expression_index(expression)
  aus = np.asarray(subject.style[e]) * intensity
  if not variation:
    return np.clip(aus, 0.0, 1.2)
  active = np.flatnonzero(aus)
  if active.size:
    # Each AU varies a little on its own: real AUs are not perfectly coupled.
    aus[active] *= rng.uniform(0.75, 1.2, size=active.size)
    # Occasional partial dropout: one non-core AU missing or nearly so.
    droppable = [i for i in active if AUS[i] != _CORE.get(expression)]
    if droppable and rng.random() < 0.3:
      aus[droppable[int(rng.integers(len(droppable)))]] *= rng.uniform(0.0, 0.2)
  # Micro-movements in any face, neutral included.
  if rng.random() < 0.4:
    aus[int(rng.integers(NUM_AUS))] += rng.uniform(0.0, 0.2)
  return np.clip(aus, 0.0, 1.2)


# ----------------------------------------------------------------------------
# Drawing.

_SHIFT = 4  # cv2 sub-pixel bits: coordinates are drawn with 1/16 px precision.
_ONE = float(1 << _SHIFT)
_AA = cv2.LINE_AA
_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
_XX -= SIZE / 2.0
_YY -= SIZE / 2.0
_U9 = np.linspace(-1.0, 1.0, 9)
_U13 = np.linspace(-1.0, 1.0, 13)
_U5 = np.linspace(0.0, 1.0, 5)
_T_OUTLINE = np.linspace(0.0, 2.0 * np.pi, 48, endpoint=False)
_T_UPPER = np.linspace(np.pi, 2.0 * np.pi, 17)


class _Canvas:
  """A uint8 canvas plus the image's geometric nuisance (yaw, then an affine).

  Shapes are built in canonical face coordinates; `depth` says how far a point
  sits in front of the head outline, which is how much a yaw moves it sideways.
  """

  def __init__(self, background: float, matrix: np.ndarray, yaw: float,
               scale: float):
    self.img = np.full((SIZE, SIZE), _c(background), np.uint8)
    self.m = matrix
    self.yaw = yaw
    self.scale = scale

  def tf(self, pts: np.ndarray, depth: float) -> np.ndarray:
    pts = np.asarray(pts, np.float64)
    x = pts[..., 0] + self.yaw * depth
    y = pts[..., 1]
    m = self.m
    return np.stack([m[0, 0] * x + m[0, 1] * y + m[0, 2],
                     m[1, 0] * x + m[1, 1] * y + m[1, 2]], axis=-1)

  @staticmethod
  def fix(pts: np.ndarray) -> np.ndarray:
    return np.round(pts * _ONE).astype(np.int32)

  def poly(self, pts, tone: float, depth: float = 0.0):
    cv2.fillPoly(self.img, [self.fix(self.tf(pts, depth))], _c(tone), _AA, _SHIFT)

  def line(self, pts, tone: float, depth: float = 0.0, thickness: int = 1):
    cv2.polylines(self.img, [self.fix(self.tf(pts, depth))], False, _c(tone),
                  thickness, _AA, _SHIFT)

  def circle(self, centre, radius: float, tone: float, depth: float = 0.0):
    c = self.fix(self.tf(np.asarray(centre), depth))
    cv2.circle(self.img, (int(c[0]), int(c[1])), max(1, int(radius * self.scale * _ONE)),
               _c(tone), -1, _AA, _SHIFT)

  def ellipse(self, centre, axes, tone: float, depth: float = 0.0, n: int = 16):
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    pts = np.stack([centre[0] + axes[0] * np.cos(t), centre[1] + axes[1] * np.sin(t)], -1)
    self.poly(pts, tone, depth)


def _c(tone: float) -> int:
  return int(min(255.0, max(0.0, tone)) + 0.5)


def _curve(x0, x1, y_of_u, u=_U9):
  """Points (x(u), y(u)) with x running linearly from x0 to x1 over u in [-1,1]."""
  x = x0 + (u + 1.0) * 0.5 * (x1 - x0)
  return np.stack([x, y_of_u(u)], -1)


def _quad(p0, p1, p2, n: int = 7) -> np.ndarray:
  """A quadratic Bezier from p0 to p2 pulled towards p1."""
  t = np.linspace(0.0, 1.0, n)[:, None]
  p0, p1, p2 = (np.asarray(p, np.float64) for p in (p0, p1, p2))
  return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2


def render_face(subject: SubjectParams, expression: str, intensity: float,
                rng: np.random.Generator, nuisance: bool = True) -> np.ndarray:
  """Renders one face: a (112, 112) uint8 grayscale image.

  `intensity` scales the expression's AUs (use something like U(0.3, 1.0));
  `rng` supplies the per-image variation (AU jitter and dropout, nuisance).
  `nuisance=False` draws the canonical face (frontal, centred, flat light, no
  blur or noise, no per-image AU variation): for tests and illustrations.
  """
  s = subject
  a = expression_aus(s, expression, intensity, rng, variation=nuisance)
  a = a + np.asarray(s.rest_aus)
  au = {k: float(a[i]) for k, i in _AU_INDEX.items()}

  # Nuisance geometry: rotation and scale about the image centre, shift, yaw.
  if nuisance:
    angle = rng.uniform(-8.0, 8.0)
    scale = rng.uniform(0.92, 1.08)
    shift = rng.uniform(-3.0, 3.0, size=2)
    yaw = rng.uniform(-3.5, 3.5)
    background = s.background + rng.normal(0.0, 12.0)
    gaze = rng.normal(0.0, 0.6, size=2)
  else:
    angle, scale, shift, yaw = 0.0, 1.0, np.zeros(2), 0.0
    background = s.background
    gaze = np.zeros(2)
  m = cv2.getRotationMatrix2D((SIZE / 2.0, SIZE / 2.0), angle, scale)
  m[:, 2] += shift
  cv = _Canvas(background, m, yaw, scale)

  skin = s.skin
  cx = SIZE / 2.0
  fw = s.face_half_width
  eye_y, nose_y, mouth_y = s.eye_y, s.nose_y, s.mouth_y
  skull_cy = eye_y + 4.0
  jaw_drop = 4.5 * au[26] + 1.2 * au[16]
  chin_y = s.chin_y + jaw_drop

  # Long hair falls behind the head.
  if s.hair_style == 2:
    v = s.hair_volume + 3.0
    back = np.concatenate([
        np.stack([cx + (fw + v) * np.cos(_T_UPPER),
                  skull_cy + (skull_cy - s.top_y + v) * np.sin(_T_UPPER)], -1),
        [[cx + fw + v + 2.0, SIZE + 4.0], [cx - fw - v - 2.0, SIZE + 4.0]]])
    cv.poly(back, s.hair_tone)

  # Neck and ears.
  cv.poly([[cx - 0.5 * fw, chin_y - 16.0], [cx + 0.5 * fw, chin_y - 16.0],
           [cx + 0.55 * fw, SIZE + 4.0], [cx - 0.55 * fw, SIZE + 4.0]], skin - 28.0)
  ear_h = 0.5 * (nose_y - eye_y) + 2.0
  for side in (-1.0, 1.0):
    cv.ellipse((cx + side * (fw - 0.5), 0.5 * (eye_y + nose_y)), (3.8, ear_h),
               skin - 14.0, depth=-0.5)

  # Face outline: an egg on top, a jaw narrowing to the chin below.
  t = _T_OUTLINE
  st, ct = np.sin(t), np.cos(t)
  lower = st > 0
  oy = np.where(lower, skull_cy + (chin_y - skull_cy) * st,
                skull_cy + (skull_cy - s.top_y) * st)
  ox = cx + fw * ct * np.where(lower, 1.0 - (1.0 - s.jaw) * st ** 2, 1.0)
  cv.poly(np.stack([ox, oy], -1), skin)

  # Forehead wrinkles: centre from AU1, sides from AU2, plus resting lines.
  brow_base = eye_y - s.brow_gap
  centre_w = min(1.0, 0.8 * au[1] + s.forehead_lines)
  side_w = min(1.0, 0.8 * au[2] + s.forehead_lines)
  if centre_w > 0.12 or side_w > 0.12:
    for i in range(3):
      y0 = brow_base - 7.0 - 3.6 * i
      if y0 < s.top_y + s.hairline + 2.0:
        break
      xs = np.linspace(-1.0, 1.0, 7)
      for seg, w in ((xs[2:5], centre_w), (xs[:3], side_w), (xs[4:], side_w)):
        if w > 0.12:
          pts = np.stack([cx + seg * 13.0, y0 + 1.2 * seg ** 2], -1)
          cv.line(pts, skin - 38.0 * w, depth=0.3)

  # Glabella: vertical furrows (AU4), a horizontal crease at the nose root (AU9).
  if au[4] > 0.15:
    for side in (-1.0, 1.0):
      cv.line([[cx + side * 2.2, brow_base + 1.5], [cx + side * 1.6, brow_base + 6.5]],
              skin - 45.0 * min(1.0, au[4]), depth=0.5)

  # Brows.
  for side in (-1.0, 1.0):
    ex = cx + side * s.eye_spacing
    uu = _U5
    inner_x = ex - side * (s.eye_half_width + 1.0)
    bx = inner_x + side * uu * s.brow_length
    by = brow_base - s.brow_arch * np.sin(np.pi * np.clip(uu * 1.15, 0, 1))
    by = (by - 4.5 * au[1] * (1.0 - uu) ** 1.5 - 4.0 * au[2] * uu ** 1.2
          + au[4] * (2.2 + 1.6 * (1.0 - uu)) + 1.3 * au[9] * (1.0 - uu)
          + 0.6 * au[7] * (1.0 - uu))
    bx = bx - side * (2.0 * au[4] + 0.8 * au[9]) * (1.0 - uu)
    half = 0.5 * s.brow_thickness * (1.15 - 0.5 * uu)
    top = np.stack([bx, by - half], -1)
    bot = np.stack([bx, by + half], -1)[::-1]
    cv.poly(np.concatenate([top, bot]), s.brow_tone, depth=0.6)

  # Eyes.
  upper = s.eye_open * (1.0 + 0.9 * au[5] - 0.35 * au[7] - 0.3 * au[6]
                        - 0.15 * au[4] - 0.1 * au[9])
  upper = max(0.5, upper)
  lower = s.eye_open * 0.75 * (1.0 - 0.45 * au[7] - 0.45 * au[6] + 0.15 * au[5])
  lower = max(0.35, lower)
  lower_exp = max(0.25, 0.9 - 0.55 * au[7])
  for side in (-1.0, 1.0):
    ex = cx + side * s.eye_spacing
    ew = s.eye_half_width
    tilt = s.canthal_tilt
    up_pts = _curve(ex - side * ew, ex + side * ew,
                    lambda u: eye_y - upper * (1.0 - u * u) ** 0.7 * (1.0 + 0.12 * u)
                    - tilt * 0.5 * (u + 1.0))
    lo_pts = _curve(ex - side * ew, ex + side * ew,
                    lambda u: eye_y + lower * (1.0 - u * u) ** lower_exp
                    - tilt * 0.5 * (u + 1.0))
    _draw_eye(cv, np.concatenate([up_pts, lo_pts[::-1]]),
              (ex + gaze[0], eye_y + 0.3 + gaze[1] * 0.5), s, skin)
    cv.line(up_pts, s.iris_tone + 10.0, depth=0.6)
    cv.line(lo_pts[1:-1], skin - 30.0, depth=0.6)
    crease = up_pts[1:-1] - [0.0, 2.2 + 0.4 * s.eye_open]
    cv.line(crease, skin - 22.0 * (1.0 - 0.6 * min(1.0, au[5])), depth=0.6)
    # Cheek raise: a furrow under the lower lid and crow's feet.
    bag = min(1.0, 0.8 * au[6] + 0.3 * au[7])
    if bag > 0.1:
      cv.line(lo_pts[2:-2] + [0.0, 2.6], skin - 40.0 * bag, depth=0.6)
    if au[6] > 0.2:
      ox_ = ex + side * (ew + 1.2)
      for dy in (-1.6, 0.6, 2.6):
        cv.line([[ox_, eye_y + 0.3 * dy], [ox_ + side * 3.2, eye_y + dy]],
                skin - 42.0 * min(1.0, au[6]), depth=0.5)

  # Nose.
  nt = nose_y - 1.8 * au[9]
  nw = s.nose_half_width * (1.0 + 0.25 * au[9])
  sd = s.shade_side
  cv.line(_quad([cx + sd * 3.0, eye_y + 2.0], [cx + sd * 3.5, nt - 8.0],
                [cx + sd * nw * 0.9, nt - 3.0]), skin - 20.0, depth=0.8)
  for side in (-1.0, 1.0):
    cv.ellipse((cx + side * nw * 0.45, nt - 0.3), (1.5 * (1 + 0.3 * au[9]), 0.9),
               skin - 75.0, depth=1.0, n=10)
    cv.line(_quad([cx + side * nw * 0.75, nt - 4.0], [cx + side * (nw + 1.2), nt - 1.0],
                  [cx + side * nw * 0.55, nt + 1.2]), skin - 35.0, depth=0.9)
  if au[9] > 0.1:
    w9 = min(1.0, au[9])
    for i in range(3):
      y = eye_y + 2.5 + 2.0 * i
      cv.line([[cx - 3.5, y + 0.6], [cx, y], [cx + 3.5, y + 0.6]],
              skin - 45.0 * w9, depth=0.9)

  # Mouth geometry.
  mw = s.mouth_half_width * (1.0 + 0.2 * au[12] + 0.28 * au[20] - 0.2 * au[23]
                             - 0.15 * au[26] * (1.0 - min(1.0, au[20])))
  corner_dy = (-4.2 * au[12] + 3.4 * au[15] + 0.9 * au[20] + 0.8 * au[16]
               - 0.5 * au[6])
  centre_dy = -1.6 * au[9] + 0.4 * au[15]
  p = 2.0 + 2.0 * min(1.0, au[20])
  u = _U13
  au_ = np.abs(u)
  line = mouth_y + centre_dy * (1.0 - au_ ** p) + corner_dy * au_ ** p
  open_a = 6.5 * au[26] + 1.6 * max(0.0, au[12] - 0.55)
  gap_a = open_a * (1.0 - u * u) ** 0.6
  gap_16 = 3.5 * au[16] * (1.0 - u * u) ** 1.2
  top_open = line - 0.25 * gap_a
  bot_open = line + 0.75 * gap_a + gap_16
  thin = 1.0 - 0.55 * au[23] - 0.25 * au[20] - 0.2 * au[12]
  ul = s.upper_lip * max(0.25, thin) * (1.0 - u * u) ** 0.45 * (
      1.0 - 0.25 * np.exp(-(u / 0.18) ** 2))
  ll = s.lower_lip * max(0.3, thin + 0.1 * au[12] + 0.2 * au[16]) * (
      1.0 - u * u) ** 0.5
  mx = cx + u * mw

  # Nasolabial folds run from the nose wing to beside the mouth corner.
  fold = min(1.0, s.nasolabial + 0.7 * au[12] + 0.5 * au[6] + 0.6 * au[9]
             + 0.25 * au[20])
  if fold > 0.06:
    for side, cidx in ((-1.0, 0), (1.0, -1)):
      corner = np.array([mx[cidx], line[cidx]])
      p0 = [cx + side * (nw + 1.5), nt - 2.5 - 1.5 * au[6]]
      p2 = corner + [side * 2.8, 3.0]
      p1 = [cx + side * (mw + 3.5 + 1.5 * au[12]), 0.5 * (p0[1] + p2[1])]
      cv.line(_quad(p0, p1, p2), skin - 48.0 * fold, depth=0.5)

  # Chin crease under the lower lip (deepens with AU15/AU16).
  chin_w = min(1.0, 0.25 + 0.5 * au[15] + 0.4 * au[16])
  cy_ = bot_open[6] + ll[6] + 3.0
  cv.line(_quad([cx - 0.45 * mw, cy_], [cx, cy_ + 1.5], [cx + 0.45 * mw, cy_]),
          skin - 30.0 * chin_w, depth=0.6)

  # Lips, mouth interior, teeth.
  upper_lip = np.concatenate([np.stack([mx, top_open - ul], -1),
                              np.stack([mx, top_open], -1)[::-1]])
  lower_lip = np.concatenate([np.stack([mx, bot_open], -1),
                              np.stack([mx, bot_open + ll], -1)[::-1]])
  cv.poly(upper_lip, s.lip_tone, depth=0.7)
  cv.poly(lower_lip, s.lip_tone + 8.0, depth=0.7)
  gap = bot_open - top_open
  if gap.max() > 0.5:
    cv.poly(np.concatenate([np.stack([mx, top_open], -1),
                            np.stack([mx, bot_open], -1)[::-1]]), 38.0, depth=0.7)
    inner = slice(2, 11)
    teeth_h = np.minimum(gap[inner] * 0.45, 2.6)
    if teeth_h.max() > 0.4:
      cv.poly(np.concatenate([np.stack([mx[inner], top_open[inner]], -1),
                              np.stack([mx[inner], top_open[inner] + teeth_h], -1)[::-1]]),
              205.0, depth=0.7)
    if au[16] > 0.4:
      mid = slice(4, 9)
      cv.poly(np.concatenate([np.stack([mx[mid], bot_open[mid] - 1.4], -1),
                              np.stack([mx[mid], bot_open[mid]], -1)[::-1]]),
              185.0, depth=0.7)
  lip_line = np.stack([mx, 0.5 * (top_open + bot_open)], -1) if gap.max() <= 0.5 \
      else np.stack([mx, top_open], -1)
  cv.line(lip_line, s.lip_tone - 40.0 - 30.0 * min(1.0, au[23]), depth=0.7)

  if s.mustache:
    # A band above the upper lip, thickest in the middle.
    mu = _U9
    mxs = cx + mu * (mw * 0.85 + 1.0)
    base = np.interp(mxs, mx, top_open - ul) - 0.4
    height = 1.2 + 2.2 * (1.0 - mu * mu) ** 0.5
    cv.poly(np.concatenate([np.stack([mxs, base], -1),
                            np.stack([mxs, base - height], -1)[::-1]]),
            min(s.hair_tone, skin - 40.0), depth=0.75)

  _draw_hair(cv, s, fw, skull_cy)

  if s.glasses:
    for side in (-1.0, 1.0):
      ex = cx + side * s.eye_spacing
      gx, gy = s.eye_half_width + 3.0, s.eye_open + 3.5
      t = np.linspace(0.0, 2.0 * np.pi, 20)
      cv.line(np.stack([ex + gx * np.cos(t), eye_y + 0.5 + gy * np.sin(t)], -1),
              35.0, depth=0.8)
    cv.line([[cx - s.eye_spacing + s.eye_half_width + 3.0, eye_y - 0.5],
             [cx, eye_y - 1.5],
             [cx + s.eye_spacing - s.eye_half_width - 3.0, eye_y - 0.5]],
            35.0, depth=0.9)

  return _photometric(cv.img, rng) if nuisance else cv.img


def _draw_eye(cv: _Canvas, outline: np.ndarray, iris_centre, s: SubjectParams,
              skin: float):
  """Sclera and iris clipped to the lid opening, blended in a small patch."""
  pts = cv.tf(outline, 0.6)
  ic = cv.tf(np.asarray(iris_centre), 0.65)
  x0 = max(0, int(math.floor(pts[:, 0].min())) - 1)
  y0 = max(0, int(math.floor(pts[:, 1].min())) - 1)
  x1 = min(SIZE, int(math.ceil(pts[:, 0].max())) + 2)
  y1 = min(SIZE, int(math.ceil(pts[:, 1].max())) + 2)
  if x1 - x0 < 2 or y1 - y0 < 2:
    return
  off = np.array([x0, y0], np.float64)
  eye_mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
  cv2.fillPoly(eye_mask, [_Canvas.fix(pts - off)], 255, _AA, _SHIFT)
  iris_mask = np.zeros_like(eye_mask)
  c = _Canvas.fix(ic - off)
  r = s.iris_radius * cv.scale
  cv2.circle(iris_mask, (int(c[0]), int(c[1])), int(r * _ONE), 255, -1, _AA, _SHIFT)
  pupil_mask = np.zeros_like(eye_mask)
  cv2.circle(pupil_mask, (int(c[0]), int(c[1])), int(0.45 * r * _ONE), 255, -1, _AA,
             _SHIFT)
  a_eye = eye_mask.astype(np.float32) * (1.0 / 255.0)
  a_iris = np.minimum(a_eye, iris_mask.astype(np.float32) * (1.0 / 255.0))
  a_pupil = np.minimum(a_eye, pupil_mask.astype(np.float32) * (1.0 / 255.0))
  patch = cv.img[y0:y1, x0:x1].astype(np.float32)
  white = min(250.0, skin + 40.0)
  patch += (white - patch) * a_eye
  patch += (s.iris_tone - patch) * a_iris
  patch += (max(0.0, s.iris_tone - 25.0) - patch) * a_pupil
  cv.img[y0:y1, x0:x1] = np.clip(patch + 0.5, 0, 255).astype(np.uint8)


def _draw_hair(cv: _Canvas, s: SubjectParams, fw: float, skull_cy: float):
  """The hair cap over the skull, down to a hairline that varies by style."""
  cx = SIZE / 2.0
  if s.hair_style == 3:
    # Receding: only tufts above the ears, along the head outline.
    for side in (-1.0, 1.0):
      cv.ellipse((cx + side * (fw + 0.5), skull_cy - 6.0),
                 (1.5 + 0.25 * s.hair_volume, 6.0), s.hair_tone)
    return
  v = s.hair_volume
  outer = np.stack([cx + (fw + v) * np.cos(_T_UPPER),
                    skull_cy + (skull_cy - s.top_y + v) * np.sin(_T_UPPER)], -1)
  xr = np.linspace(1.0, -1.0, 15)
  hl_y = s.top_y + s.hairline
  temple = max(0.0, (skull_cy - 6.0) - hl_y)
  if s.hair_style == 4:
    inner_y = hl_y + 2.0 * xr ** 2 + temple * xr ** 8
  else:
    inner_y = hl_y + temple * xr ** 4 + s.hair_slant * xr
  inner = np.stack([cx + xr * (fw - 0.8), inner_y], -1)
  cv.poly(np.concatenate([outer, inner]), s.hair_tone)


def _photometric(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
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


# ----------------------------------------------------------------------------
# Writing a face set.


def image_relpath(subject_id: str, expression: str, k: int) -> str:
  return f"{expression}/{subject_id}_{expression}_{k}.png"


def _all_relpaths(num_subjects: int, images_per_cell: int) -> list[str]:
  return [image_relpath(f"s{i:03d}", e, k)
          for i in range(num_subjects) for e in contract.EXPRESSIONS
          for k in range(images_per_cell)]


def _render_subject(job) -> tuple[list[dict], float]:
  """Renders and writes all images of one subject (runs in a worker process)."""
  output_dir, subject, images_per_cell, seed = job
  cv2.setNumThreads(1)  # one worker, one core
  start = time.perf_counter()
  rows = []
  for expression in contract.EXPRESSIONS:
    for k in range(images_per_cell):
      rng = image_rng(seed, subject.index, expression, k)
      intensity = 0.0
      if expression != "neutral":
        intensity = float(rng.uniform(*INTENSITY_RANGE))
      img = render_face(subject, expression, intensity, rng)
      rel = image_relpath(subject.subject_id, expression, k)
      ok, buf = cv2.imencode(".png", img)
      if not ok:
        raise OSError(f"could not encode {rel}")
      with open(os.path.join(output_dir, rel), "wb") as f:
        f.write(buf.tobytes())
      rows.append({"path": rel, "expression": expression,
                   "subject": subject.subject_id, "source": SOURCE, "split": "",
                   "intensity": f"{intensity:.3f}"})
  return rows, time.perf_counter() - start


def _read_params(output_dir: str) -> Optional[dict]:
  path = os.path.join(output_dir, PARAMS_NAME)
  try:
    with open(path) as f:
      params = json.load(f)
  except (OSError, ValueError):
    return None
  if not isinstance(params, dict) or params.get("generator") != "data_tools.synthetic":
    return None
  return params


def _write_params(output_dir: str, params: dict):
  tmp = os.path.join(output_dir, f".{PARAMS_NAME}.tmp")
  with open(tmp, "w") as f:
    json.dump(params, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, os.path.join(output_dir, PARAMS_NAME))


def _wanted_params(num_subjects, images_per_cell, seed, confounders) -> dict:
  return {"generator": "data_tools.synthetic", "version": RENDER_VERSION,
          "num_subjects": int(num_subjects), "images_per_cell": int(images_per_cell),
          "seed": int(seed), "confounders": float(confounders)}


def _existing_entries(output_dir: str) -> list[str]:
  """Files under output_dir (relative paths); empty folders do not count."""
  found = []
  for root, _, files in os.walk(output_dir):
    for name in files:
      found.append(os.path.relpath(os.path.join(root, name), output_dir))
  return sorted(found)


def _check_args(num_subjects: int, images_per_cell: int, confounders: float):
  if num_subjects < 1 or num_subjects > 1000:
    raise UserError(f"--num_subjects={num_subjects}: use 1 to 1000 subjects")
  if images_per_cell < 1:
    raise UserError(f"--images_per_cell={images_per_cell}: use at least 1 image "
                    "per subject and expression")
  if not 0.0 <= confounders <= 3.0:
    raise UserError(f"--confounders={confounders}: use a scale from 0 (no identity "
                    "confounders) to 3")


def _default_workers() -> int:
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:
    return max(1, os.cpu_count() or 1)


@dataclasses.dataclass(frozen=True)
class GenerateStats:
  num_images: int
  seconds: float
  images_per_second: float        # wall clock, all workers
  images_per_core_second: float   # rendering + PNG writing, per busy core
  workers: int


def generate(output_dir: str, num_subjects: int = 60, images_per_cell: int = 10,
             seed: int = 0, *, confounders: float = 1.0, workers: int = 0,
             overwrite: bool = False,
             log: Optional[Callable[[str], None]] = None) -> GenerateStats:
  """Writes a synthetic face set into output_dir.

  Refuses (UserError) a directory that already holds files unless `overwrite`;
  even then it deletes only images that an earlier run of this generator wrote
  there (computed from that run's recorded parameters), never anything else.
  """
  _check_args(num_subjects, images_per_cell, confounders)
  output_dir = os.path.abspath(output_dir)
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise UserError(f"--output_dir={output_dir} is a file, not a directory")
  existing = _existing_entries(output_dir) if os.path.isdir(output_dir) else []
  if existing and not overwrite:
    if os.path.isfile(os.path.join(output_dir, contract.MANIFEST_NAME)):
      what = f"already holds a face set ({contract.MANIFEST_NAME})"
    else:
      what = f"already holds {len(existing)} file(s), e.g. {existing[0]!r}"
    raise UserError(f"output directory {output_dir} {what}: pass --overwrite to "
                    "write into it anyway, or choose a new --output_dir")

  new_paths = _all_relpaths(num_subjects, images_per_cell)
  old = _read_params(output_dir) if existing else None
  if existing and old is None:
    # Not a set this tool wrote: --overwrite may add files beside others but
    # never replaces one of them (a preprocessed set's manifest, say).
    ours = set(new_paths) | {contract.MANIFEST_NAME, CONTACT_SHEET_NAME, PARAMS_NAME}
    clash = [p for p in existing if p in ours]
    if clash:
      raise UserError(
          f"output directory {output_dir} holds {clash[0]!r}, which "
          "data_tools.synthetic did not write and would replace: choose a new "
          "--output_dir")
  if old is not None:
    # Stale images of an earlier, larger synthetic run: ours, so remove them.
    try:
      old_paths = _all_relpaths(int(old["num_subjects"]), int(old["images_per_cell"]))
    except (KeyError, TypeError, ValueError):
      old_paths = []
    for rel in sorted(set(old_paths) - set(new_paths)):
      path = os.path.join(output_dir, rel)
      if os.path.isfile(path):
        os.remove(path)

  os.makedirs(output_dir, exist_ok=True)
  for expression in contract.EXPRESSIONS:
    os.makedirs(os.path.join(output_dir, expression), exist_ok=True)
  params = _wanted_params(num_subjects, images_per_cell, seed, confounders)
  # Marked incomplete until the manifest is in place, so an interrupted run is
  # recognised as ours (and redone) rather than reused.
  _write_params(output_dir, dict(params, complete=False))

  subjects = make_subjects(num_subjects, seed, confounders)
  jobs = [(output_dir, s, images_per_cell, seed) for s in subjects]
  workers = min(workers or _default_workers(), len(jobs))
  start = time.perf_counter()
  rows_by_subject: list[list[dict]] = []
  busy = 0.0
  if workers <= 1:
    for job in jobs:
      rows, seconds = _render_subject(job)
      rows_by_subject.append(rows)
      busy += seconds
  else:
    # spawn, not fork: the caller may be a training process with JAX or
    # TensorFlow threads running, and forking those can deadlock.
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
      for rows, seconds in pool.map(_render_subject, jobs):
        rows_by_subject.append(rows)
        busy += seconds
  elapsed = time.perf_counter() - start

  records = [row for rows in rows_by_subject for row in rows]
  contract.write_manifest(output_dir, records, extra_fields=("intensity",))
  write_contact_sheet(output_dir, subjects[:12], images_per_cell)
  _write_params(output_dir, dict(params, complete=True, num_images=len(records)))
  stats = GenerateStats(
      num_images=len(records), seconds=elapsed,
      images_per_second=len(records) / max(elapsed, 1e-9),
      images_per_core_second=len(records) / max(busy, 1e-9), workers=workers)
  if log:
    log(f"wrote {stats.num_images} images of {num_subjects} subjects to {output_dir} "
        f"in {elapsed:.1f} s: {stats.images_per_second:.0f} images/s with "
        f"{workers} worker(s), {stats.images_per_core_second:.0f} images/s per core")
  return stats


def write_contact_sheet(output_dir: str, subjects: Sequence[SubjectParams],
                        images_per_cell: int) -> str:
  """A grid of image k=0: one row per subject, one column per expression."""
  del images_per_cell  # k = 0 always exists
  tile, label_w, header_h = SIZE, 44, 22
  sheet = np.full((header_h + tile * len(subjects), label_w + tile * contract.NUM_CLASSES),
                  255, np.uint8)
  font = cv2.FONT_HERSHEY_SIMPLEX
  for j, expression in enumerate(contract.EXPRESSIONS):
    cv2.putText(sheet, expression, (label_w + j * tile + 4, 15), font, 0.42, 0, 1,
                cv2.LINE_AA)
  for i, subject in enumerate(subjects):
    y = header_h + i * tile
    cv2.putText(sheet, subject.subject_id, (3, y + tile // 2 + 4), font, 0.4, 0, 1,
                cv2.LINE_AA)
    for j, expression in enumerate(contract.EXPRESSIONS):
      path = os.path.join(output_dir, image_relpath(subject.subject_id, expression, 0))
      img = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
      if img is not None:
        sheet[y:y + tile, label_w + j * tile:label_w + (j + 1) * tile] = img
  path = os.path.join(output_dir, CONTACT_SHEET_NAME)
  cv2.imwrite(path, sheet)
  return path


def _is_complete(output_dir: str, params: dict) -> bool:
  """True when output_dir holds a finished set made with exactly these params."""
  old = _read_params(output_dir)
  if old is None or not old.get("complete"):
    return False
  if any(old.get(k) != v for k, v in params.items()):
    return False
  try:
    records = contract.read_manifest(output_dir, check_files=True)
  except UserError:
    return False
  expected = params["num_subjects"] * params["images_per_cell"] * contract.NUM_CLASSES
  return len(records) == expected and all(r.source == SOURCE for r in records)


def ensure_synthetic(output_dir: str, num_subjects: int = 60,
                     images_per_cell: int = 10, seed: int = 0, *,
                     confounders: float = 1.0, workers: int = 1,
                     log: Optional[Callable[[str], None]] = None) -> str:
  """Returns a directory holding the synthetic set, generating it only if needed.

  Reuses a complete set made there with the same parameters (recorded in
  synthetic.json beside the manifest); regenerates one this generator made with
  other parameters or left unfinished; refuses (UserError) a directory holding
  anything else. One worker by default: the default set takes about 10 s on one
  core, and worker processes would re-import the caller's main module (JAX,
  TensorFlow) to start.
  """
  _check_args(num_subjects, images_per_cell, confounders)
  output_dir = os.path.abspath(output_dir)
  params = _wanted_params(num_subjects, images_per_cell, seed, confounders)
  if _is_complete(output_dir, params):
    return output_dir
  if os.path.isdir(output_dir) and _existing_entries(output_dir) \
      and _read_params(output_dir) is None:
    raise UserError(
        f"{output_dir} holds files that data_tools.synthetic did not write: point "
        "the synthetic set at an empty or new directory")
  generate(output_dir, num_subjects, images_per_cell, seed, confounders=confounders,
           workers=workers, overwrite=True, log=log)
  return output_dir


# ----------------------------------------------------------------------------
# Command line.

def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("output_dir", None, "Directory to write the face set into.")
  flags.DEFINE_integer("num_subjects", 60, "Number of synthetic people.")
  flags.DEFINE_integer("images_per_cell", 10,
                       "Images per (subject, expression) pair.")
  flags.DEFINE_integer("seed", 0, "Random seed; the output is a function of it.")
  flags.DEFINE_integer("workers", 0, "Worker processes (0: one per available core).")
  flags.DEFINE_float("confounders", 1.0,
                     "Scale of the identity confounders (0 turns them off).")
  flags.DEFINE_bool("overwrite", False,
                    "Write into a directory that already holds files (only files "
                    "this tool wrote are ever deleted).")
  flags.mark_flag_as_required("output_dir")
  return flags.FLAGS


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    print(f"error: unexpected arguments {' '.join(argv[1:])}", file=sys.stderr)
    sys.exit(2)
  f = FLAGS
  try:
    generate(f.output_dir, f.num_subjects, f.images_per_cell, f.seed,
             confounders=f.confounders, workers=f.workers, overwrite=f.overwrite,
             log=print)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  FLAGS = _define_flags()
  app.run(main)
