"""Tests of data_tools/synthetic_nuisance.py (each synthetic image's pose and light,
recovered) and dicefer_jax/evaluation/attribute_probe.py (reading such
attributes from a code on people the read-out never saw)."""

import math
import os
import shutil

import cv2
import numpy as np
import pytest

from data_tools import synthetic
from data_tools import synthetic_nuisance
from data_tools import synthetic_subjects
from dicefer_jax import contract
from dicefer_jax.errors import UserError
from dicefer_jax.evaluation import attribute_probe


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
  path = tmp_path_factory.mktemp("nuisance") / "set"
  synthetic.generate(str(path), 2, 1, seed=3, workers=1)
  return path


def _relpaths(path):
  return [r.path for r in contract.read_manifest(str(path))]


def _replayed(subject, expression, k, seed):
  """The pose and light draws of one image, taken in the renderer's order by hand:
  the intensity, the expression's AU variation, the pose, the light."""
  rng = synthetic.image_rng(seed, subject.index, expression, k)
  intensity = 0.0 if expression == "neutral" else rng.uniform(*synthetic.INTENSITY_RANGE)
  synthetic_subjects.expression_aus(subject, expression, intensity, rng, variation=True)
  angle, scale = rng.uniform(-8.0, 8.0), rng.uniform(0.92, 1.08)
  shift, yaw = rng.uniform(-3.0, 3.0, size=2), rng.uniform(-3.5, 3.5)
  background, gaze = rng.normal(0.0, 12.0), rng.normal(0.0, 0.6, size=2)
  theta, gradient = rng.uniform(0.0, 2.0 * math.pi), rng.uniform(0.0, 0.35)
  contrast, bright, sigma = rng.uniform(0.8, 1.15), rng.uniform(-18.0, 18.0), rng.uniform(0.35, 1.2)
  rng.standard_normal((synthetic.SIZE, synthetic.SIZE), dtype=np.float32)
  noise = rng.uniform(1.0, 6.0)
  return dict(rotation_deg=angle, scale=scale, shift_x=shift[0], shift_y=shift[1], yaw=yaw,
              background_offset=background, gaze_x=gaze[0], gaze_y=gaze[1],
              light_x=gradient * math.cos(theta), light_y=gradient * math.sin(theta),
              contrast=contrast, brightness=bright, blur_sigma=sigma, noise_std=noise)


def test_each_value_is_its_own_draw(small_set):
  """Catches draws read off the wrong position (an AU jitter taken for the
  rotation), swapped components (shift x/y, light x/y) and rows out of order."""
  paths = _relpaths(small_set)[::-1]   # any order asked is the order returned
  got = synthetic_nuisance.recover(str(small_set), paths)
  assert got.paths == paths and got.values.shape == (14, len(synthetic_nuisance.NAMES))
  subjects = {s.subject_id: s for s in synthetic.make_subjects(2, 3)}
  for rel, row in zip(paths, got.values):
    expression, name = rel.split("/")
    subject_id, _, k = name[:-len(".png")].split("_")
    want = _replayed(subjects[subject_id], expression, int(k), seed=3)
    np.testing.assert_allclose(row, [want[n] for n in synthetic_nuisance.NAMES], rtol=1e-12)
  # Pose and light vary from image to image.
  assert (got.values.std(axis=0) > 0).all()


def test_an_edited_image_is_refused(small_set, tmp_path):
  """Catches recovering values for an image the renderer did not draw: the
  values would describe a face that is not there."""
  copy = tmp_path / "set"
  shutil.copytree(small_set, copy)
  rel = _relpaths(copy)[5]
  image = cv2.imread(str(copy / rel), cv2.IMREAD_GRAYSCALE)
  image[0, 0] ^= 1
  cv2.imwrite(str(copy / rel), image)
  with pytest.raises(UserError, match=rel.replace(".", r"\.")):
    synthetic_nuisance.recover(str(copy), [rel])
  assert synthetic_nuisance.recover(str(copy), [rel], check_images=False).values.shape == (1, 14)


def test_other_sets_and_names_are_refused(small_set, tmp_path):
  with pytest.raises(UserError, match="synthetic.json"):
    synthetic_nuisance.recover(str(tmp_path), ["anger/s000_anger_0.png"])
  with pytest.raises(UserError, match="not an image name"):
    synthetic_nuisance.recover(str(small_set), ["anger/photo.png"])
  with pytest.raises(UserError, match="not an image name"):   # subject beyond the set
    synthetic_nuisance.recover(str(small_set), ["anger/s007_anger_0.png"])


def _people(num_people=12, per_person=60, dim=32, seed=0):
  rng = np.random.default_rng(seed)
  subjects = np.repeat(np.arange(num_people), per_person)
  identity = rng.normal(size=(num_people, dim))[subjects]
  return rng, subjects, identity


def test_r2_of_a_known_linear_read_out():
  """x = 0.8 y + 0.6 noise beside identity columns: the best linear read-out has
  R^2 = 0.64; an attribute the code does not hold reads ~0. Catches a read-out
  scored on its own training images (R^2 near 1 for the noise column)."""
  rng, subjects, identity = _people()
  y = rng.normal(size=(len(subjects), 2))
  codes = np.concatenate([0.8 * y[:, :1] + 0.6 * rng.normal(size=(len(subjects), 1)),
                          identity], axis=1)
  r2 = attribute_probe.heldout_people_r2(codes, y, subjects, pca_dim=64)
  assert abs(r2[0] - 0.64) < 0.06
  assert abs(r2[1]) < 0.05
  # One attribute as a vector, or in whole numbers: the same read-out, as floats.
  assert attribute_probe.heldout_people_r2(codes, y[:, 0], subjects, pca_dim=64) == (
      pytest.approx([r2[0]]))
  steps = np.round(4 * y[:, :1]).astype(int)   # predictions must not be cut to ints
  assert attribute_probe.heldout_people_r2(codes, steps, subjects, pca_dim=64) == (
      pytest.approx(attribute_probe.heldout_people_r2(codes, steps.astype(float), subjects,
                                                      pca_dim=64)))


def test_a_per_person_attribute_is_not_read_off_identity():
  """An attribute constant within each person, and a code that only names the
  person: a read-out fitted on the same people would look perfect; on held-out
  people it cannot do better than their mean. Catches image-level splits and a
  penalty chosen on the held-out people's own images."""
  rng, subjects, identity = _people()
  per_person = rng.normal(size=12)[subjects][:, None]
  r2 = attribute_probe.heldout_people_r2(identity + 0.05 * rng.normal(size=identity.shape),
                                         per_person, subjects, pca_dim=64)
  assert r2[0] < 0.1


def test_too_few_people_is_one_clear_error():
  rng, subjects, identity = _people(num_people=5)
  with pytest.raises(ValueError, match="5 people"):
    attribute_probe.heldout_people_r2(identity, rng.normal(size=(len(subjects), 1)),
                                      subjects, pca_dim=8)
