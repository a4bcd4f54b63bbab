"""Tests of the five-landmark face alignment (dicefer_jax.face_alignment).

Every face of a face set, and every face a predictor sees, is cut by
align_face: a wrong sign or a swapped axis here silently changes all faces.
The expected numbers are worked out by hand in the comments.
"""

import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from dicefer_jax import face_alignment
from dicefer_jax.face_alignment import FACE_TEMPLATE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _similarity(angle_deg, scale, tx, ty):
  a = np.deg2rad(angle_deg)
  return np.array([[scale * np.cos(a), -scale * np.sin(a), tx],
                   [scale * np.sin(a), scale * np.cos(a), ty]])


def _dots_image(points, shape, radius, channels=3):
  image = np.zeros(shape + (channels,), np.uint8)
  for x, y in points:
    cv2.circle(image, (int(round(x)), int(round(y))), radius, (255,) * channels, -1,
               cv2.LINE_AA)
  return image


def _blob_centre(face, x, y, half=6):
  # Intensity-weighted centre of the bright blob near (x, y).
  x0, y0 = int(x) - half, int(y) - half
  patch = face[y0:y0 + 2 * half + 1, x0:x0 + 2 * half + 1].astype(np.float64)
  ys, xs = np.mgrid[0:patch.shape[0], 0:patch.shape[1]]
  return (x0 + (xs * patch).sum() / patch.sum(), y0 + (ys * patch).sum() / patch.sum())


def test_template_onto_itself_is_the_identity():
  """Catches a fit that shifts, scales or turns a face already in place."""
  m, distortion = face_alignment.similarity_to_template(FACE_TEMPLATE)
  np.testing.assert_allclose(m, [[1, 0, 0], [0, 1, 0]], atol=1e-4)
  assert distortion < 1e-5


def test_shifted_template_is_shifted_back():
  """Catches a translation with the wrong sign or the x/y offsets swapped."""
  # Landmarks = template + (10, -5): the map back is x - 10, y + 5.
  m, distortion = face_alignment.similarity_to_template(FACE_TEMPLATE + [10.0, -5.0])
  np.testing.assert_allclose(m, [[1, 0, -10], [0, 1, 5]], atol=1e-4)
  assert distortion < 1e-5


def test_rotated_scaled_shifted_template_is_mapped_back_by_hand_computed_matrix():
  """Catches a fit that returns the forward map, a transposed rotation (turns
  faces the wrong way) or a wrong scale."""
  # Photo landmarks = the template turned 90 degrees (counter-clockwise in
  # x-right/y-down maths), scaled 2x and shifted by (100, 50):
  #   x' = -2y + 100,  y' = 2x + 50.
  # E.g. the left eye (40, 48) lands at (4, 130). Solving for x, y:
  #   x = (y' - 50) / 2 = 0.5 y' - 25,  y = (100 - x') / 2 = -0.5 x' + 50,
  # so M = [[0, 0.5, -25], [-0.5, 0, 50]].
  landmarks = np.stack([-2 * FACE_TEMPLATE[:, 1] + 100, 2 * FACE_TEMPLATE[:, 0] + 50], 1)
  np.testing.assert_allclose(landmarks[0], [4, 130])
  m, distortion = face_alignment.similarity_to_template(landmarks)
  np.testing.assert_allclose(m, [[0, 0.5, -25], [-0.5, 0, 50]], atol=1e-4)
  assert distortion < 1e-5
  np.testing.assert_allclose(face_alignment.transform_points(m, landmarks), FACE_TEMPLATE,
                             atol=1e-3)


def test_transform_points_applies_linear_part_then_offset():
  """Catches a transposed 2x2 part or a dropped translation column."""
  m = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
  # (1, 1) -> (1 + 2 + 3, 4 + 5 + 6); (2, 0) -> (2 + 3, 8 + 6).
  np.testing.assert_allclose(face_alignment.transform_points(m, [[1, 1], [2, 0]]),
                             [[6, 15], [5, 14]])


def test_distortion_is_in_template_eye_distances_whatever_the_photo_size():
  """Catches a misfit measured in photo pixels: the same face shape must
  score the same, small in a thumbnail or large in a 12 MP photo."""
  misshapen = FACE_TEMPLATE.copy()
  misshapen[2] += [6.0, 0.0]  # Nose tip off the face's middle.
  _, near = face_alignment.similarity_to_template(misshapen)
  _, far = face_alignment.similarity_to_template(
      face_alignment.transform_points(_similarity(-30, 7.0, 900, 400), misshapen))
  assert 0.02 < near < 0.5
  assert far == pytest.approx(near, rel=1e-3)


def test_degenerate_and_non_finite_landmarks_give_no_transform():
  """Catches a division by zero scale turning into an all-NaN or garbage face."""
  for landmarks in (np.full((5, 2), 50.0), np.where(np.eye(5, 2) > 0, np.nan, 1.0)):
    m, distortion = face_alignment.similarity_to_template(landmarks)
    assert m is None and distortion == float("inf")
  with pytest.raises(ValueError, match="degenerate"):
    face_alignment.align_face(np.zeros((200, 200), np.uint8), np.full((5, 2), 50.0))


@pytest.mark.parametrize("index", range(5))
def test_a_dot_at_one_landmark_lands_at_its_template_position(index):
  """Catches mirrored or transposed warps (a dot would land elsewhere) and a
  mix-up of which landmark goes where in the template."""
  forward = _similarity(20, 3.0, 320, 300)
  landmarks = face_alignment.transform_points(forward, FACE_TEMPLATE - 56)
  image = _dots_image([landmarks[index]], (640, 640), radius=6)
  face = face_alignment.align_face(image, landmarks)
  ys, xs = np.nonzero(face > 64)
  assert xs.size > 0, "the dot left the face"
  x, y = FACE_TEMPLATE[index]
  cx, cy = _blob_centre(face, x, y)
  assert abs(cx - x) < 1.0 and abs(cy - y) < 1.0
  # Nothing bright anywhere else.
  assert np.all(np.hypot(xs - x, ys - y) < 5)


@pytest.mark.parametrize("angle,scale", [(0, 1.0), (25, 2.5), (-40, 6.0)])
def test_all_landmarks_land_on_the_template_eyes_level(angle, scale):
  """Catches misplaced faces, also in the area-downscaling path (scale 6:
  the warp would otherwise shrink more than 2x) where the landmarks are
  rescaled to the shrunken region."""
  forward = _similarity(angle, scale, 300, 260)
  landmarks = face_alignment.transform_points(forward, FACE_TEMPLATE - 56)
  image = _dots_image(landmarks, (640, 640), radius=max(2, int(2 * scale)))
  face = face_alignment.align_face(image, landmarks)
  for (x, y) in FACE_TEMPLATE:
    cx, cy = _blob_centre(face, x, y)
    assert abs(cx - x) < 1.0 and abs(cy - y) < 1.0
  left, right = (_blob_centre(face, *FACE_TEMPLATE[i]) for i in (0, 1))
  assert abs(left[1] - right[1]) < 0.5


def test_large_faces_are_area_averaged_not_aliased():
  """Catches the downscaling path skipped: a face 6x the output size warped
  directly samples every 6th pixel, so fine texture (hair, stubble, noise)
  turns into speckle instead of its average."""
  fine = (np.indices((800, 800)).sum(0) % 2 * 255).astype(np.uint8)  # 1 px checkers.
  landmarks = face_alignment.transform_points(_similarity(0, 6.0, 400, 400),
                                              FACE_TEMPLATE - 56)
  face = face_alignment.align_face(fine, landmarks).astype(np.float64)
  assert abs(face.mean() - 127.5) < 5 and face.std() < 10


def test_output_is_112_gray_uint8_for_rgb_gray_and_rgba_input():
  """Catches colour output, a wrong size, or channels mishandled: a gray photo
  stored as RGB, gray or RGBA must give the same face."""
  landmarks = face_alignment.transform_points(_similarity(10, 2.0, 150, 150),
                                              FACE_TEMPLATE - 56)
  gray = np.random.default_rng(0).integers(0, 256, (300, 300), np.uint8)
  rgb = np.repeat(gray[:, :, None], 3, axis=2)
  rgba = np.concatenate([rgb, np.full((300, 300, 1), 255, np.uint8)], axis=2)
  faces = [face_alignment.align_face(image, landmarks)
           for image in (rgb, gray, gray[:, :, None], rgba)]
  for face in faces:
    assert face.shape == (112, 112) and face.dtype == np.uint8
    np.testing.assert_array_equal(face, faces[0])
  assert face_alignment.OUTPUT_SIZE == 112


def test_rgb_is_weighted_as_luma_not_averaged_or_read_as_bgr():
  """Catches BGR order (blue weighted as red) or a plain channel mean."""
  red = np.zeros((200, 200, 3), np.uint8)
  red[:, :, 0] = 200
  face = face_alignment.align_face(red, FACE_TEMPLATE + 40)
  # OpenCV's RGB->gray: 0.299 R + 0.587 G + 0.114 B = 0.299 * 200 = 59.8.
  assert (face == 60).all()


def test_non_uint8_or_odd_shapes_are_refused():
  """Catches float images silently wrapped or clipped into uint8."""
  with pytest.raises(ValueError, match="uint8"):
    face_alignment.align_face(np.zeros((200, 200, 3), np.float32), FACE_TEMPLATE + 40)
  with pytest.raises(ValueError, match="image"):
    face_alignment.align_face(np.zeros((200, 200, 2), np.uint8), FACE_TEMPLATE + 40)


def test_importing_alignment_and_detector_leaves_torch_out():
  """Catches a module-level torch/facenet import: it would put torch into
  every process that imports the library, next to TensorFlow."""
  code = ("import sys, dicefer_jax.face_alignment, dicefer_jax.face_detector; "
          "loaded = [m for m in ('torch', 'facenet_pytorch') if m in sys.modules]; "
          "assert not loaded, loaded")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO,
                 env=dict(os.environ, PYTHONPATH=REPO), timeout=120)
