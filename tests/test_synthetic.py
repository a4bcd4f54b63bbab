"""Tests of the built-in synthetic face set (data_tools/synthetic.py).

Small sets only (a few subjects, one or two images per cell): the whole file
should run in well under 20 s on two shared cores.
"""

import collections
import dataclasses
import os
import re
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

from data_tools import synthetic
from dicefer_jax import contract
from dicefer_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _generate(path, num_subjects=3, images_per_cell=2, seed=0, **kwargs):
  kwargs.setdefault("workers", 1)
  return synthetic.generate(str(path), num_subjects, images_per_cell, seed, **kwargs)


def _image_bytes(path):
  out = {}
  for r in contract.read_manifest(str(path)):
    with open(os.path.join(path, r.path), "rb") as f:
      out[r.path] = f.read()
  return out


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
  path = tmp_path_factory.mktemp("synthetic") / "set"
  _generate(path)
  return path


def _canonical(subject, expression, intensity=1.0):
  return synthetic.render_face(subject, expression, intensity,
                               np.random.default_rng(0), nuisance=False)


def test_same_seed_same_bytes_whatever_the_workers(small_set, tmp_path):
  _generate(tmp_path / "again", workers=2)
  assert _image_bytes(small_set) == _image_bytes(tmp_path / "again")


def test_different_seed_different_images(small_set, tmp_path):
  _generate(tmp_path / "other", seed=1)
  a, b = _image_bytes(small_set), _image_bytes(tmp_path / "other")
  assert a.keys() == b.keys()
  assert sum(a[k] != b[k] for k in a) == len(a)


def test_manifest_follows_the_contract(small_set):
  records = contract.read_manifest(str(small_set), check_files=True)
  assert len(records) == 3 * 2 * contract.NUM_CLASSES
  pattern = re.compile(r"^([a-z]+)/(s\d{3})_([a-z]+)_(\d+)\.png$")
  for r in records:
    m = pattern.match(r.path)
    assert m, r.path
    assert m.group(1) == m.group(3) == r.expression
    assert m.group(2) == r.subject
    assert r.source == "synthetic"
    img = cv2.imread(os.path.join(small_set, r.path), cv2.IMREAD_UNCHANGED)
    assert img is not None and img.shape == (112, 112) and img.dtype == np.uint8
  per_class = collections.Counter(r.expression for r in records)
  assert per_class == {e: 3 * 2 for e in contract.EXPRESSIONS}
  per_subject = collections.Counter(r.subject for r in records)
  assert per_subject == {"s000": 14, "s001": 14, "s002": 14}
  per_cell = collections.Counter((r.subject, r.expression) for r in records)
  assert set(per_cell.values()) == {2}
  assert os.path.isfile(small_set / "contact_sheet.png")
  sheet = cv2.imread(str(small_set / "contact_sheet.png"), cv2.IMREAD_GRAYSCALE)
  assert sheet.shape[0] >= 3 * 112 and sheet.shape[1] >= 7 * 112


def test_images_are_not_blank_and_intensities_recorded(small_set):
  with open(small_set / contract.MANIFEST_NAME) as f:
    header = f.readline().strip().split(",")
  assert "intensity" in header
  for r in contract.read_manifest(str(small_set))[:10]:
    img = cv2.imread(os.path.join(small_set, r.path), cv2.IMREAD_GRAYSCALE)
    assert img.std() > 10.0


def test_subject_is_independent_of_the_number_asked_for():
  assert synthetic.make_subjects(5, 3)[:2] == synthetic.make_subjects(2, 3)
  assert synthetic.make_subjects(2, 3) != synthetic.make_subjects(2, 4)


def test_subjects_differ_more_than_renders_of_one_subject():
  subjects = synthetic.make_subjects(6, 0)
  def render(s, k):
    return synthetic.render_face(s, "neutral", 0.0,
                                 synthetic.image_rng(0, s.index, "neutral", k))
  within, between = [], []
  for s in subjects:
    a, b = render(s, 0).astype(float), render(s, 1).astype(float)
    within.append(np.abs(a - b).mean())
  for s, t in zip(subjects[:-1], subjects[1:]):
    between.append(np.abs(render(s, 0).astype(float) - render(t, 0)).mean())
  assert np.mean(between) > 1.5 * np.mean(within)
  # Canonical renders isolate identity: two people are never the same face.
  canon = [_canonical(s, "neutral").astype(float) for s in subjects]
  for i in range(len(canon)):
    for j in range(i + 1, len(canon)):
      assert np.abs(canon[i] - canon[j]).mean() > 3.0


def _regions(s):
  """Row ranges of the canonical face: brows and forehead, eyes, mouth."""
  eye, mouth = int(s.eye_y), int(s.mouth_y)
  return {"brows": slice(eye - 24, eye - 6), "eyes": slice(eye - 6, eye + 6),
          "mouth": slice(int(s.nose_y) + 3, mouth + 12)}


def _mouth_darkness(img, s):
  """How much darker than skin the mouth box is (lips, opening)."""
  rows = slice(int(s.mouth_y) - 5, int(s.mouth_y) + 11)
  cols = slice(int(56 - s.mouth_half_width - 3), int(56 + s.mouth_half_width + 3))
  return float(np.clip(s.skin - img[rows, cols].astype(float), 0.0, None).sum())


def _brow_top(img, s):
  """Mean row of the top edge of the outer brows (first pixel far below skin)."""
  tops = []
  for side in (-1, 1):
    inner = 56 + side * (s.eye_spacing - s.eye_half_width - 1.0)
    for f in (0.55, 0.7, 0.85):
      x = int(round(inner + side * f * s.brow_length))
      col = img[int(s.eye_y) - 26:int(s.eye_y) - 2, x].astype(float)
      dark = np.flatnonzero(col < s.skin - 45.0)
      assert dark.size, "no brow found"
      tops.append(int(s.eye_y) - 26 + dark[0])
  return float(np.mean(tops))


def _clear_brows(s):
  """The subject with thick dark brows and a bare forehead, to measure brows."""
  return dataclasses.replace(s, brow_thickness=2.6, brow_tone=s.skin - 80.0,
                             hair_style=3, glasses=False)


def test_happiness_changes_mostly_the_mouth():
  for s in synthetic.make_subjects(4, 0, confounders=0.0):
    neutral = _canonical(s, "neutral").astype(float)
    happy = _canonical(s, "happiness").astype(float)
    diff = np.abs(happy - neutral)
    reg = _regions(s)
    # Lip corners, lips and nasolabial folds; AU6 adds some around the eyes.
    assert diff[int(s.nose_y) - 6:].sum() / diff.sum() > 0.5
    assert diff[reg["mouth"]].sum() > diff[reg["eyes"]].sum()
    assert diff[reg["brows"]].sum() < 0.1 * diff.sum()


def test_surprise_raises_brows_and_opens_mouth():
  for s in synthetic.make_subjects(4, 0, confounders=0.0):
    s = _clear_brows(s)
    neutral, surprise = _canonical(s, "neutral"), _canonical(s, "surprise")
    assert _brow_top(surprise, s) < _brow_top(neutral, s) - 2.0
    assert _mouth_darkness(surprise, s) > 1.2 * _mouth_darkness(neutral, s)


def test_anger_lowers_the_brows():
  for s in synthetic.make_subjects(4, 0, confounders=0.0):
    s = _clear_brows(s)
    assert _brow_top(_canonical(s, "anger"), s) > _brow_top(_canonical(s, "neutral"), s) + 1.0


def test_confounders_mimic_expression_cues():
  subjects = synthetic.make_subjects(30, 0)
  rest = np.array([s.rest_aus for s in subjects])
  # Most people carry some resting cue; none of it without confounders.
  assert (rest.max(axis=1) > 0.2).mean() > 0.5
  assert not np.any(np.array([s.rest_aus for s in
                              synthetic.make_subjects(30, 0, confounders=0.0)]))


def test_refuses_a_non_empty_directory(tmp_path):
  out = tmp_path / "busy"
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  with pytest.raises(UserError, match="--overwrite"):
    _generate(out)
  _generate(out, overwrite=True)
  assert (out / "notes.txt").read_text() == "mine"
  with pytest.raises(UserError, match="manifest.csv"):
    _generate(out)


def test_overwrite_never_replaces_a_foreign_face_set(tmp_path):
  out = tmp_path / "preprocessed"
  out.mkdir()
  (out / "manifest.csv").write_text("path,expression\n")
  with pytest.raises(UserError, match="did not write"):
    _generate(out, overwrite=True)
  assert (out / "manifest.csv").read_text() == "path,expression\n"


def test_overwrite_deletes_only_its_own_stale_images(tmp_path):
  out = tmp_path / "set"
  _generate(out, num_subjects=3, images_per_cell=2)
  (out / "happiness" / "keep_me.png").write_bytes(b"x")
  _generate(out, num_subjects=2, images_per_cell=1, overwrite=True)
  assert not (out / "happiness" / "s002_happiness_0.png").exists()
  assert not (out / "happiness" / "s000_happiness_1.png").exists()
  assert (out / "happiness" / "keep_me.png").exists()
  assert len(contract.read_manifest(str(out))) == 2 * 7


def test_cli_refuses_in_one_line_with_exit_code_2(small_set):
  proc = subprocess.run(
      [sys.executable, "-m", "data_tools.synthetic", f"--output_dir={small_set}"],
      cwd=REPO, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and "already holds a face set" in lines[0]


def test_ensure_synthetic_generates_once_then_reuses(tmp_path, monkeypatch):
  out = tmp_path / "cache"
  got = synthetic.ensure_synthetic(str(out), num_subjects=2, images_per_cell=1,
                                   seed=0)
  assert got == str(out)
  params = (out / synthetic.PARAMS_NAME).read_text()
  assert '"complete": true' in params and '"num_subjects": 2' in params

  def fail(*args, **kwargs):
    raise AssertionError("regenerated a set it should have reused")
  with monkeypatch.context() as m:
    m.setattr(synthetic, "generate", fail)
    assert synthetic.ensure_synthetic(str(out), 2, 1, 0) == str(out)

  # Other parameters: regenerated in place (it is our own directory).
  synthetic.ensure_synthetic(str(out), num_subjects=3, images_per_cell=1, seed=0)
  assert len(contract.read_manifest(str(out))) == 3 * 7
  # A missing image makes the set incomplete: regenerated.
  os.remove(out / "anger" / "s001_anger_0.png")
  synthetic.ensure_synthetic(str(out), num_subjects=3, images_per_cell=1, seed=0)
  assert (out / "anger" / "s001_anger_0.png").exists()


def test_ensure_synthetic_leaves_foreign_directories_alone(tmp_path):
  out = tmp_path / "faces"
  out.mkdir()
  (out / "manifest.csv").write_text("path,expression\n")
  with pytest.raises(UserError, match="did not write"):
    synthetic.ensure_synthetic(str(out), 2, 1, 0)
  assert (out / "manifest.csv").read_text() == "path,expression\n"


def test_bad_arguments_are_user_errors(tmp_path):
  with pytest.raises(UserError):
    _generate(tmp_path / "x", num_subjects=0)
  with pytest.raises(UserError):
    _generate(tmp_path / "y", images_per_cell=0)


def test_throughput_report():
  subject = synthetic.make_subject(0, 0)
  start = time.perf_counter()
  n = 0
  for expression in contract.EXPRESSIONS:
    for k in range(15):
      img = synthetic.render_face(subject, expression, 0.7,
                                  synthetic.image_rng(0, 0, expression, k))
      cv2.imencode(".png", img)
      n += 1
  rate = n / (time.perf_counter() - start)
  print(f"synthetic faces: {rate:.0f} images/s on one core (render + PNG encode)")
  assert rate > 20.0  # only catches a pathological slowdown
