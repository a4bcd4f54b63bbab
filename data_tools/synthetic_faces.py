"""Draws one synthetic face: a subject (data_tools/synthetic_subjects.py) showing
an expression, as a 112x112 uint8 grayscale image.

A face is drawn back to front in canonical coordinates (head centred, frontal)
onto a `Canvas` that applies the image's geometric nuisance (yaw, rotation,
scale, shift); photometric nuisance (lighting, contrast, blur, noise) is applied
to the finished image. Every facial part reads the same AU intensities, the
expression's plus the subject's resting confounder AUs, so a resting trait is
drawn exactly like the expression cue it mimics.

Changing what is drawn changes the cached sets: bump `RENDER_VERSION` in
data_tools/synthetic.py. The order of the random draws and of the drawing calls
is part of the output (each image's bytes are fixed by its seed).
"""

import dataclasses

import cv2
import numpy as np

from data_tools.synthetic_canvas import band
from data_tools.synthetic_canvas import Canvas
from data_tools.synthetic_canvas import curve
from data_tools.synthetic_canvas import photometric_nuisance
from data_tools.synthetic_canvas import quad
from data_tools.synthetic_canvas import SIZE
from data_tools.synthetic_canvas import U9
from data_tools.synthetic_subjects import AU_INDEX
from data_tools.synthetic_subjects import expression_aus
from data_tools.synthetic_subjects import SubjectParams

_CX = SIZE / 2.0  # the face's vertical axis in canonical coordinates
_U13 = np.linspace(-1.0, 1.0, 13)  # across the mouth, corner to corner
_U5 = np.linspace(0.0, 1.0, 5)  # along a brow, inner end to outer
_T_OUTLINE = np.linspace(0.0, 2.0 * np.pi, 48, endpoint=False)
_T_UPPER = np.linspace(np.pi, 2.0 * np.pi, 17)
_SIDES = (-1.0, 1.0)  # left and right of the face


def render_face(subject: SubjectParams, expression: str, intensity: float,
                rng: np.random.Generator, nuisance: bool = True) -> np.ndarray:
  """Renders one face: a (112, 112) uint8 grayscale image.

  `intensity` scales the expression's AUs (use something like U(0.3, 1.0));
  `rng` supplies the per-image variation (AU jitter and dropout, nuisance).
  `nuisance=False` draws the canonical face (frontal, centred, flat light, no
  blur or noise, no per-image AU variation): for tests and illustrations.
  """
  s = subject
  au = _face_aus(s, expression, intensity, rng, nuisance)
  cv, gaze = _posed_canvas(s, rng, nuisance)
  _draw_head(cv, s, au)
  _draw_forehead(cv, s, au)
  _draw_brows(cv, s, au)
  _draw_eyes(cv, s, au, gaze)
  nose = _draw_nose(cv, s, au)
  mouth = _mouth_shape(s, au)
  _draw_nasolabial_folds(cv, s, au, nose, mouth)
  _draw_chin_crease(cv, s, au, mouth)
  _draw_lips(cv, s, au, mouth)
  if s.mustache:
    _draw_mustache(cv, s, mouth)
  _draw_hair(cv, s)
  if s.glasses:
    _draw_glasses(cv, s)
  return photometric_nuisance(cv.img, rng) if nuisance else cv.img


def _face_aus(s: SubjectParams, expression: str, intensity: float,
              rng: np.random.Generator, nuisance: bool) -> dict[int, float]:
  """AU number -> intensity shown: the expression's plus the resting offsets."""
  a = expression_aus(s, expression, intensity, rng, variation=nuisance)
  a = a + np.asarray(s.rest_aus)
  return {k: float(a[i]) for k, i in AU_INDEX.items()}


def _posed_canvas(s: SubjectParams, rng: np.random.Generator,
                  nuisance: bool) -> tuple[Canvas, np.ndarray]:
  """The background canvas with this image's pose, and its gaze offset.

  Pose is rotation and scale about the image centre, a shift and a yaw.
  """
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
  return Canvas(background, m, yaw, scale), gaze


def _skull_centre_y(s: SubjectParams) -> float:
  return s.eye_y + 4.0


def _draw_head(cv: Canvas, s: SubjectParams, au: dict[int, float]):
  """Long hair behind the head, neck, ears and the face outline (jaw drops open)."""
  fw, skull_cy = s.face_half_width, _skull_centre_y(s)
  jaw_drop = 4.5 * au[26] + 1.2 * au[16]
  chin_y = s.chin_y + jaw_drop
  if s.hair_style == 2:
    v = s.hair_volume + 3.0
    back = np.concatenate([
        np.stack([_CX + (fw + v) * np.cos(_T_UPPER),
                  skull_cy + (skull_cy - s.top_y + v) * np.sin(_T_UPPER)], -1),
        [[_CX + fw + v + 2.0, SIZE + 4.0], [_CX - fw - v - 2.0, SIZE + 4.0]]])
    cv.poly(back, s.hair_tone)

  cv.poly([[_CX - 0.5 * fw, chin_y - 16.0], [_CX + 0.5 * fw, chin_y - 16.0],
           [_CX + 0.55 * fw, SIZE + 4.0], [_CX - 0.55 * fw, SIZE + 4.0]], s.skin - 28.0)
  ear_h = 0.5 * (s.nose_y - s.eye_y) + 2.0
  for side in _SIDES:
    cv.ellipse((_CX + side * (fw - 0.5), 0.5 * (s.eye_y + s.nose_y)), (3.8, ear_h),
               s.skin - 14.0, depth=-0.5)

  # An egg on top, a jaw narrowing to the chin below.
  st, ct = np.sin(_T_OUTLINE), np.cos(_T_OUTLINE)
  lower = st > 0
  oy = np.where(lower, skull_cy + (chin_y - skull_cy) * st,
                skull_cy + (skull_cy - s.top_y) * st)
  ox = _CX + fw * ct * np.where(lower, 1.0 - (1.0 - s.jaw) * st ** 2, 1.0)
  cv.poly(np.stack([ox, oy], -1), s.skin)


def _draw_forehead(cv: Canvas, s: SubjectParams, au: dict[int, float]):
  """Forehead wrinkles and glabella furrows.

  Wrinkles: centre from AU1, sides from AU2, plus resting lines. Glabella:
  vertical furrows between the brows from AU4.
  """
  skin = s.skin
  brow_base = s.eye_y - s.brow_gap
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
          pts = np.stack([_CX + seg * 13.0, y0 + 1.2 * seg ** 2], -1)
          cv.line(pts, skin - 38.0 * w, depth=0.3)
  if au[4] > 0.15:
    for side in _SIDES:
      cv.line([[_CX + side * 2.2, brow_base + 1.5], [_CX + side * 1.6, brow_base + 6.5]],
              skin - 45.0 * min(1.0, au[4]), depth=0.5)


def _draw_brows(cv: Canvas, s: SubjectParams, au: dict[int, float]):
  """Both brows: raised inside (AU1) or outside (AU2), lowered and drawn
  together (AU4), pulled down inside by AU9 and AU7."""
  brow_base = s.eye_y - s.brow_gap
  uu = _U5  # 0 at the inner end, 1 at the outer end
  for side in _SIDES:
    ex = _CX + side * s.eye_spacing
    inner_x = ex - side * (s.eye_half_width + 1.0)
    bx = inner_x + side * uu * s.brow_length
    by = brow_base - s.brow_arch * np.sin(np.pi * np.clip(uu * 1.15, 0, 1))
    by = (by - 4.5 * au[1] * (1.0 - uu) ** 1.5 - 4.0 * au[2] * uu ** 1.2
          + au[4] * (2.2 + 1.6 * (1.0 - uu)) + 1.3 * au[9] * (1.0 - uu)
          + 0.6 * au[7] * (1.0 - uu))
    bx = bx - side * (2.0 * au[4] + 0.8 * au[9]) * (1.0 - uu)
    half = 0.5 * s.brow_thickness * (1.15 - 0.5 * uu)
    cv.poly(band(bx, by - half, by + half), s.brow_tone, depth=0.6)


def _draw_eyes(cv: Canvas, s: SubjectParams, au: dict[int, float], gaze: np.ndarray):
  """Both eyes with lids, crease, and the cheek-raise furrow and crow's feet.

  Lids open with AU5 and close with AU7, AU6 (cheek raise), AU4 and AU9.
  """
  skin, eye_y = s.skin, s.eye_y
  upper = s.eye_open * (1.0 + 0.9 * au[5] - 0.35 * au[7] - 0.3 * au[6]
                        - 0.15 * au[4] - 0.1 * au[9])
  upper = max(0.5, upper)
  lower = s.eye_open * 0.75 * (1.0 - 0.45 * au[7] - 0.45 * au[6] + 0.15 * au[5])
  lower = max(0.35, lower)
  lower_exp = max(0.25, 0.9 - 0.55 * au[7])
  ew, tilt = s.eye_half_width, s.canthal_tilt
  for side in _SIDES:
    ex = _CX + side * s.eye_spacing
    up_pts = curve(ex - side * ew, ex + side * ew,
                    lambda u: eye_y - upper * (1.0 - u * u) ** 0.7 * (1.0 + 0.12 * u)
                    - tilt * 0.5 * (u + 1.0))
    lo_pts = curve(ex - side * ew, ex + side * ew,
                    lambda u: eye_y + lower * (1.0 - u * u) ** lower_exp
                    - tilt * 0.5 * (u + 1.0))
    cv.fill_eyeball(np.concatenate([up_pts, lo_pts[::-1]]),
                    (ex + gaze[0], eye_y + 0.3 + gaze[1] * 0.5), s.iris_radius,
                    white=min(250.0, skin + 40.0), iris_tone=s.iris_tone)
    cv.line(up_pts, s.iris_tone + 10.0, depth=0.6)
    cv.line(lo_pts[1:-1], skin - 30.0, depth=0.6)
    crease = up_pts[1:-1] - [0.0, 2.2 + 0.4 * s.eye_open]
    cv.line(crease, skin - 22.0 * (1.0 - 0.6 * min(1.0, au[5])), depth=0.6)
    bag = min(1.0, 0.8 * au[6] + 0.3 * au[7])
    if bag > 0.1:
      cv.line(lo_pts[2:-2] + [0.0, 2.6], skin - 40.0 * bag, depth=0.6)
    if au[6] > 0.2:
      ox = ex + side * (ew + 1.2)
      for dy in (-1.6, 0.6, 2.6):
        cv.line([[ox, eye_y + 0.3 * dy], [ox + side * 3.2, eye_y + dy]],
                skin - 42.0 * min(1.0, au[6]), depth=0.5)


@dataclasses.dataclass(frozen=True)
class _Nose:
  tip_y: float       # nose base, raised by AU9
  half_width: float  # widened by AU9


def _draw_nose(cv: Canvas, s: SubjectParams, au: dict[int, float]) -> _Nose:
  """Bridge shadow, nostrils, wings, and the nose wrinkle (AU9)."""
  skin, eye_y = s.skin, s.eye_y
  nt = s.nose_y - 1.8 * au[9]
  nw = s.nose_half_width * (1.0 + 0.25 * au[9])
  sd = s.shade_side
  cv.line(quad([_CX + sd * 3.0, eye_y + 2.0], [_CX + sd * 3.5, nt - 8.0],
                [_CX + sd * nw * 0.9, nt - 3.0]), skin - 20.0, depth=0.8)
  for side in _SIDES:
    cv.ellipse((_CX + side * nw * 0.45, nt - 0.3), (1.5 * (1 + 0.3 * au[9]), 0.9),
               skin - 75.0, depth=1.0, n=10)
    cv.line(quad([_CX + side * nw * 0.75, nt - 4.0], [_CX + side * (nw + 1.2), nt - 1.0],
                  [_CX + side * nw * 0.55, nt + 1.2]), skin - 35.0, depth=0.9)
  if au[9] > 0.1:
    w9 = min(1.0, au[9])
    for i in range(3):
      y = eye_y + 2.5 + 2.0 * i
      cv.line([[_CX - 3.5, y + 0.6], [_CX, y], [_CX + 3.5, y + 0.6]],
              skin - 45.0 * w9, depth=0.9)
  return _Nose(tip_y=nt, half_width=nw)


@dataclasses.dataclass(frozen=True)
class _Mouth:
  """The mouth's shape, sampled at 13 points from the left to the right corner."""
  half_width: float
  x: np.ndarray           # sample x
  line: np.ndarray        # lip line (where closed lips meet)
  top_open: np.ndarray    # bottom edge of the upper lip
  bottom_open: np.ndarray  # top edge of the lower lip
  upper_lip: np.ndarray   # upper lip thickness
  lower_lip: np.ndarray   # lower lip thickness


def _mouth_shape(s: SubjectParams, au: dict[int, float]) -> _Mouth:
  """Where the lips are: corners up (AU12) or down (AU15), stretched (AU20),
  pressed thin (AU23), jaw dropped (AU26), lower lip depressed (AU16)."""
  mw = s.mouth_half_width * (1.0 + 0.2 * au[12] + 0.28 * au[20] - 0.2 * au[23]
                             - 0.15 * au[26] * (1.0 - min(1.0, au[20])))
  corner_dy = (-4.2 * au[12] + 3.4 * au[15] + 0.9 * au[20] + 0.8 * au[16]
               - 0.5 * au[6])
  centre_dy = -1.6 * au[9] + 0.4 * au[15]
  p = 2.0 + 2.0 * min(1.0, au[20])
  u = _U13
  au_ = np.abs(u)
  line = s.mouth_y + centre_dy * (1.0 - au_ ** p) + corner_dy * au_ ** p
  open_a = 6.5 * au[26] + 1.6 * max(0.0, au[12] - 0.55)
  gap_a = open_a * (1.0 - u * u) ** 0.6
  gap_16 = 3.5 * au[16] * (1.0 - u * u) ** 1.2
  thin = 1.0 - 0.55 * au[23] - 0.25 * au[20] - 0.2 * au[12]
  ul = s.upper_lip * max(0.25, thin) * (1.0 - u * u) ** 0.45 * (
      1.0 - 0.25 * np.exp(-(u / 0.18) ** 2))
  ll = s.lower_lip * max(0.3, thin + 0.1 * au[12] + 0.2 * au[16]) * (
      1.0 - u * u) ** 0.5
  return _Mouth(half_width=mw, x=_CX + u * mw, line=line,
                top_open=line - 0.25 * gap_a, bottom_open=line + 0.75 * gap_a + gap_16,
                upper_lip=ul, lower_lip=ll)


def _draw_nasolabial_folds(cv: Canvas, s: SubjectParams, au: dict[int, float],
                           nose: _Nose, mouth: _Mouth):
  """Folds from the nose wing to beside each mouth corner (resting depth plus
  AU12, AU6, AU9, AU20)."""
  fold = min(1.0, s.nasolabial + 0.7 * au[12] + 0.5 * au[6] + 0.6 * au[9]
             + 0.25 * au[20])
  if fold <= 0.06:
    return
  for side, corner_index in ((-1.0, 0), (1.0, -1)):
    corner = np.array([mouth.x[corner_index], mouth.line[corner_index]])
    p0 = [_CX + side * (nose.half_width + 1.5), nose.tip_y - 2.5 - 1.5 * au[6]]
    p2 = corner + [side * 2.8, 3.0]
    p1 = [_CX + side * (mouth.half_width + 3.5 + 1.5 * au[12]), 0.5 * (p0[1] + p2[1])]
    cv.line(quad(p0, p1, p2), s.skin - 48.0 * fold, depth=0.5)


def _draw_chin_crease(cv: Canvas, s: SubjectParams, au: dict[int, float],
                      mouth: _Mouth):
  """The crease under the lower lip (deepens with AU15/AU16)."""
  chin_w = min(1.0, 0.25 + 0.5 * au[15] + 0.4 * au[16])
  mid = len(mouth.x) // 2
  y = mouth.bottom_open[mid] + mouth.lower_lip[mid] + 3.0
  mw = mouth.half_width
  cv.line(quad([_CX - 0.45 * mw, y], [_CX, y + 1.5], [_CX + 0.45 * mw, y]),
          s.skin - 30.0 * chin_w, depth=0.6)


def _draw_lips(cv: Canvas, s: SubjectParams, au: dict[int, float], mouth: _Mouth):
  """Lips, the open mouth's interior and teeth, and the line between the lips."""
  mx, top, bottom = mouth.x, mouth.top_open, mouth.bottom_open
  cv.poly(band(mx, top - mouth.upper_lip, top), s.lip_tone, depth=0.7)
  cv.poly(band(mx, bottom, bottom + mouth.lower_lip), s.lip_tone + 8.0, depth=0.7)
  gap = bottom - top
  is_open = gap.max() > 0.5
  if is_open:
    cv.poly(band(mx, top, bottom), 38.0, depth=0.7)
    inner = slice(2, 11)
    teeth_h = np.minimum(gap[inner] * 0.45, 2.6)
    if teeth_h.max() > 0.4:
      cv.poly(band(mx[inner], top[inner], top[inner] + teeth_h), 205.0, depth=0.7)
    if au[16] > 0.4:
      mid = slice(4, 9)
      cv.poly(band(mx[mid], bottom[mid] - 1.4, bottom[mid]), 185.0, depth=0.7)
  lip_line = np.stack([mx, top if is_open else 0.5 * (top + bottom)], -1)
  cv.line(lip_line, s.lip_tone - 40.0 - 30.0 * min(1.0, au[23]), depth=0.7)


def _draw_mustache(cv: Canvas, s: SubjectParams, mouth: _Mouth):
  """A band above the upper lip, thickest in the middle."""
  mu = U9
  xs = _CX + mu * (mouth.half_width * 0.85 + 1.0)
  base = np.interp(xs, mouth.x, mouth.top_open - mouth.upper_lip) - 0.4
  height = 1.2 + 2.2 * (1.0 - mu * mu) ** 0.5
  cv.poly(band(xs, base, base - height), min(s.hair_tone, s.skin - 40.0), depth=0.75)


def _draw_hair(cv: Canvas, s: SubjectParams):
  """The hair cap over the skull, down to a hairline that varies by style."""
  fw, skull_cy = s.face_half_width, _skull_centre_y(s)
  if s.hair_style == 3:
    # Receding: only tufts above the ears, along the head outline.
    for side in _SIDES:
      cv.ellipse((_CX + side * (fw + 0.5), skull_cy - 6.0),
                 (1.5 + 0.25 * s.hair_volume, 6.0), s.hair_tone)
    return
  v = s.hair_volume
  outer = np.stack([_CX + (fw + v) * np.cos(_T_UPPER),
                    skull_cy + (skull_cy - s.top_y + v) * np.sin(_T_UPPER)], -1)
  xr = np.linspace(1.0, -1.0, 15)
  hl_y = s.top_y + s.hairline
  temple = max(0.0, (skull_cy - 6.0) - hl_y)
  if s.hair_style == 4:
    inner_y = hl_y + 2.0 * xr ** 2 + temple * xr ** 8
  else:
    inner_y = hl_y + temple * xr ** 4 + s.hair_slant * xr
  inner = np.stack([_CX + xr * (fw - 0.8), inner_y], -1)
  cv.poly(np.concatenate([outer, inner]), s.hair_tone)


def _draw_glasses(cv: Canvas, s: SubjectParams):
  """Two rims around the eyes and a bridge."""
  eye_y = s.eye_y
  t = np.linspace(0.0, 2.0 * np.pi, 20)
  for side in _SIDES:
    ex = _CX + side * s.eye_spacing
    gx, gy = s.eye_half_width + 3.0, s.eye_open + 3.5
    cv.line(np.stack([ex + gx * np.cos(t), eye_y + 0.5 + gy * np.sin(t)], -1),
            35.0, depth=0.8)
  cv.line([[_CX - s.eye_spacing + s.eye_half_width + 3.0, eye_y - 0.5],
           [_CX, eye_y - 1.5],
           [_CX + s.eye_spacing - s.eye_half_width - 3.0, eye_y - 0.5]],
          35.0, depth=0.9)
