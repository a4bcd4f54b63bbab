"""Tests of the built-in synthetic face set (data_tools/synthetic.py and the
renderer it uses: synthetic_subjects.py, synthetic_faces.py, synthetic_canvas.py).

Small sets only (a few subjects, one or two images per cell): the whole file
should run in well under 20 s on two shared cores.
"""

import collections
import csv
import dataclasses
import hashlib
import json
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
from dicefer_jax import fileio
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
  """The canonical render (no pose, light or noise), as floats."""
  return synthetic.render_face(subject, expression, intensity,
                               np.random.default_rng(0), nuisance=False).astype(float)


def test_same_seed_same_bytes_whatever_the_workers(small_set, tmp_path):
  """Catches output that depends on the worker processes (a shared random
  stream, or state leaking from one image into the next)."""
  _generate(tmp_path / "again", workers=2)
  assert _image_bytes(small_set) == _image_bytes(tmp_path / "again")


def test_different_seed_different_images(small_set, tmp_path):
  """Catches a seed that does not reach every image's stream."""
  _generate(tmp_path / "other", seed=1)
  a, b = _image_bytes(small_set), _image_bytes(tmp_path / "other")
  assert a.keys() == b.keys()
  assert sum(a[k] != b[k] for k in a) == len(a)


def test_manifest_follows_the_contract(small_set):
  """Catches rows that break the data contract (paths, labels, subject ids,
  source) and missing or duplicated cells."""
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


def test_contact_sheet_shows_image_0_of_each_cell(small_set):
  """Catches a blank or shuffled contact sheet (its size alone says nothing)."""
  sheet = cv2.imread(str(small_set / "contact_sheet.png"), cv2.IMREAD_GRAYSCALE)
  label_w, header_h, tile = 44, 22, 112
  assert sheet.shape == (header_h + 3 * tile, label_w + 7 * tile)
  for i in range(3):
    for j, expression in enumerate(contract.EXPRESSIONS):
      img = cv2.imread(str(small_set / expression / f"s{i:03d}_{expression}_0.png"),
                       cv2.IMREAD_GRAYSCALE)
      y, x = header_h + i * tile, label_w + j * tile
      assert np.array_equal(sheet[y:y + tile, x:x + tile], img), (i, expression)


def test_each_image_is_the_render_its_manifest_row_describes(small_set):
  """Catches images written under the wrong name, intensities recorded wrongly
  (or not at all), and images not drawn from their own (seed, subject,
  expression, k) stream: re-renders every image from its row."""
  subjects = {s.subject_id: s for s in synthetic.make_subjects(3, 0)}
  with open(small_set / contract.MANIFEST_NAME, newline="") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 3 * 2 * contract.NUM_CLASSES
  for row in rows:
    expression, subject = row["expression"], subjects[row["subject"]]
    k = int(row["path"].rsplit("_", 1)[1].split(".")[0])
    rng = synthetic.image_rng(0, subject.index, expression, k)
    intensity = 0.0
    if expression != "neutral":
      intensity = rng.uniform(*synthetic.INTENSITY_RANGE)
    assert row["intensity"] == f"{intensity:.3f}", row
    img = cv2.imread(os.path.join(small_set, row["path"]), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(img, synthetic.render_face(subject, expression, intensity, rng))
    assert img.std() > 10.0, row["path"]  # not blank


def test_subject_is_independent_of_the_number_asked_for():
  """Catches subjects drawn from one shared stream (adding people would change
  everyone) and seeds that do not change the people."""
  assert synthetic.make_subjects(5, 3)[:2] == synthetic.make_subjects(2, 3)
  assert synthetic.make_subjects(2, 3) != synthetic.make_subjects(2, 4)


def test_subjects_differ_more_than_renders_of_one_subject():
  """Catches nuisance so strong that it drowns identity, and two subjects that
  render as the same face."""
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
  canon = [_canonical(s, "neutral") for s in subjects]
  for i in range(len(canon)):
    for j in range(i + 1, len(canon)):
      assert np.abs(canon[i] - canon[j]).mean() > 3.0


def _regions(s):
  """Row ranges of the canonical face: brows and forehead, eyes, lower face
  (nose wings, nasolabial folds, mouth, chin)."""
  eye, nose = int(round(s.eye_y)), int(round(s.nose_y))
  return {"brows": slice(0, eye - 4), "eyes": slice(eye - 4, eye + 6),
          "lower": slice(nose - 4, None)}


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
  """Catches AU12/AU6 drawn in the wrong place or not at all."""
  for s in synthetic.make_subjects(4, 0, confounders=0.0):
    diff = np.abs(_canonical(s, "happiness") - _canonical(s, "neutral"))
    reg = _regions(s)
    # Lip corners, lips and nasolabial folds; AU6 adds some around the eyes.
    assert diff[reg["lower"]].sum() > 0.5 * diff.sum()
    assert diff[reg["lower"]].sum() > diff[reg["eyes"]].sum()
    assert diff[reg["brows"]].sum() < 0.1 * diff.sum()


def test_surprise_raises_brows_and_opens_mouth():
  """Catches AU1/AU2 or AU26 drawn the wrong way (or not at all)."""
  for s in synthetic.make_subjects(4, 0, confounders=0.0):
    s = _clear_brows(s)
    neutral, surprise = _canonical(s, "neutral"), _canonical(s, "surprise")
    assert _brow_top(surprise, s) < _brow_top(neutral, s) - 2.0
    assert _mouth_darkness(surprise, s) > 1.2 * _mouth_darkness(neutral, s)


def test_anger_lowers_the_brows():
  """Catches AU4 drawn the wrong way (or not at all)."""
  for s in synthetic.make_subjects(4, 0, confounders=0.0):
    s = _clear_brows(s)
    assert _brow_top(_canonical(s, "anger"), s) > _brow_top(_canonical(s, "neutral"), s) + 1.0


def test_confounders_scale_only_the_resting_cues():
  """Catches --confounders changing who the people are (the ablation would then
  compare other people), a cue left on at 0, and people without resting cues."""
  with_traits = synthetic.make_subjects(30, 0)
  plain = synthetic.make_subjects(30, 0, confounders=0.0)
  rest = np.array([s.rest_aus for s in with_traits])
  assert (rest.max(axis=1) > 0.2).mean() > 0.5  # most people carry a resting cue
  assert np.mean([s.nasolabial > 0 or s.forehead_lines > 0 for s in with_traits]) > 0.5
  for a, b in zip(with_traits, plain):
    assert not np.any(b.rest_aus) and b.nasolabial == 0.0 and b.forehead_lines == 0.0
    assert dataclasses.replace(a, rest_aus=b.rest_aus, nasolabial=0.0,
                               forehead_lines=0.0) == b


def test_resting_traits_are_drawn_exactly_like_the_aus_they_copy():
  """Catches a renderer that ignores the resting AUs, scales them, or draws them
  another way than expression AUs: a neutral face with resting AUs must be, pixel
  for pixel, the same person without them showing those AUs as an expression."""
  neutral = contract.expression_index("neutral")
  for index in range(4):
    with_traits = synthetic.make_subject(index, 0)
    plain = synthetic.make_subject(index, 0, confounders=0.0)
    style = list(plain.style)
    style[neutral] = with_traits.rest_aus
    acting = dataclasses.replace(plain, style=tuple(style),
                                 nasolabial=with_traits.nasolabial,
                                 forehead_lines=with_traits.forehead_lines)
    face = _canonical(with_traits, "neutral")
    assert np.array_equal(face, _canonical(acting, "neutral"))
    assert not np.array_equal(face, _canonical(plain, "neutral"))


# Resting trait (its AU), the expression it mimics, the region both change, and
# the other AUs that move that region: they must be (nearly) absent at rest for
# the subject to be used, or their change would blur the comparison.
_MIMICRY = {
    "resting_smile": (12, "happiness", "lower", (6, 9, 15, 16, 20, 23, 26)),
    "downturned_mouth": (15, "sadness", "lower", (6, 9, 12, 16, 20, 23, 26)),
    "raised_brows": (2, "surprise", "brows", (4, 7, 9)),  # AU1 comes with it
    "low_brows": (4, "anger", "brows", (1, 2, 7, 9)),
}


@pytest.mark.parametrize("trait", sorted(_MIMICRY))
def test_resting_trait_changes_the_face_like_the_expression_it_mimics(trait):
  """Catches a renderer that ignores a confounder, draws it in another facial
  region, or draws it the opposite way: the same person with and without the
  trait (confounders 1 vs 0) must differ in the trait's region, in the
  direction in which the mimicked expression changes that person's face."""
  trait_au, expression, region, other_aus = _MIMICRY[trait]
  checked = 0
  for index in range(60):
    with_traits = synthetic.make_subject(index, 0)
    rest = dict(zip(synthetic.AUS, with_traits.rest_aus))
    if rest[trait_au] < 0.25 or any(rest[au] >= 0.1 for au in other_aus):
      continue
    plain = synthetic.make_subject(index, 0, confounders=0.0)
    rows = _regions(plain)[region]
    neutral = _canonical(plain, "neutral")[rows]
    trait_change = (_canonical(with_traits, "neutral")[rows] - neutral).ravel()
    cue_change = (_canonical(plain, expression, 0.5)[rows] - neutral).ravel()
    assert np.abs(trait_change).sum() > 500.0, (trait, index)
    cosine = trait_change @ cue_change / (
        np.linalg.norm(trait_change) * np.linalg.norm(cue_change))
    assert cosine > 0.5, (trait, index, cosine)
    checked += 1
  assert checked >= 2, f"only {checked} subject(s) with a clear {trait}"


@pytest.mark.parametrize("field, region", [("nasolabial", "lower"),
                                           ("forehead_lines", "brows")])
def test_resting_wrinkles_are_drawn_where_they_belong(field, region):
  """Catches a renderer that ignores the wrinkle confounders (not AUs, so the
  tests above miss them) or draws them elsewhere."""
  plain = _clear_brows(synthetic.make_subject(0, 0, confounders=0.0))
  diff = np.abs(_canonical(dataclasses.replace(plain, **{field: 0.5}), "neutral")
                - _canonical(plain, "neutral"))
  assert diff.sum() > 500.0
  assert diff[_regions(plain)[region]].sum() > 0.9 * diff.sum()


# The pixels of RENDER_VERSION 1. When a change to what is drawn is intended,
# bump synthetic.RENDER_VERSION (so cached sets are regenerated) and re-pin.
_PINNED_VERSION = 1
_PINNED_CANONICAL_SHA256 = (
    "6a114d5bb9b5fda172f0080c818ac50bfe2b57c963dd052e66da75230b764d04")
# (subject, expression): mean and standard deviation of image k=0 at intensity
# 0.7, seed 0. Statistics, not bytes: blur and noise are float32 arithmetic
# that may round differently on another CPU.
_PINNED_NUISANCE_STATS = {
    (0, "neutral"): (145.732, 32.037), (0, "surprise"): (168.64, 46.541),
    (1, "neutral"): (71.348, 49.021), (1, "surprise"): (88.152, 41.674),
    (2, "neutral"): (119.745, 56.982), (2, "surprise"): (86.497, 63.585),
}


def test_pixels_change_only_with_the_render_version():
  """Catches a change to the drawing (or to the subjects' draws) without a
  RENDER_VERSION bump: ensure_synthetic would silently reuse sets drawn by the
  old version. Subjects 0-5 cover every hair style, glasses and a mustache."""
  assert synthetic.RENDER_VERSION == _PINNED_VERSION, (
      "RENDER_VERSION changed: re-pin the values of this test")
  digest = hashlib.sha256()
  for s in synthetic.make_subjects(6, 0):
    for expression in contract.EXPRESSIONS:
      digest.update(synthetic.render_face(s, expression, 0.8, np.random.default_rng(0),
                                          nuisance=False).tobytes())
  assert digest.hexdigest() == _PINNED_CANONICAL_SHA256, (
      "canonical renders changed: bump synthetic.RENDER_VERSION and re-pin")
  for (index, expression), (mean, std) in _PINNED_NUISANCE_STATS.items():
    img = synthetic.render_face(synthetic.make_subject(index, 0), expression, 0.7,
                                synthetic.image_rng(0, index, expression, 0))
    assert img.mean() == pytest.approx(mean, abs=0.05), (index, expression)
    assert img.std() == pytest.approx(std, abs=0.05), (index, expression)


def test_refuses_a_non_empty_directory(tmp_path):
  """Catches writing into (or over) a user's folder without --overwrite, and
  --overwrite deleting files this tool did not write."""
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
  """Catches --overwrite replacing another tool's manifest."""
  out = tmp_path / "preprocessed"
  out.mkdir()
  (out / "manifest.csv").write_text("path,expression\n")
  with pytest.raises(UserError, match="did not write"):
    _generate(out, overwrite=True)
  assert (out / "manifest.csv").read_text() == "path,expression\n"


def test_overwrite_deletes_only_its_own_stale_images(tmp_path):
  """Catches stale images of a larger earlier run left beside a smaller set,
  and deleting files the generator did not write."""
  out = tmp_path / "set"
  _generate(out, num_subjects=3, images_per_cell=2)
  (out / "happiness" / "keep_me.png").write_bytes(b"x")
  _generate(out, num_subjects=2, images_per_cell=1, overwrite=True)
  assert not (out / "happiness" / "s002_happiness_0.png").exists()
  assert not (out / "happiness" / "s000_happiness_1.png").exists()
  assert (out / "happiness" / "keep_me.png").exists()
  assert len(contract.read_manifest(str(out))) == 2 * 7


def test_interrupted_writes_are_cleaned_up_and_never_make_a_folder_foreign(tmp_path):
  """Catches temporary files of an interrupted run (fileio's `.tmp-` names, and
  the `.synthetic.json.tmp` of earlier versions) making ensure_synthetic refuse
  its own directory or staying behind, and deleting temporary files that were
  not this generator's."""
  # Killed while writing its first file: only a temporary file is there.
  fresh = tmp_path / "fresh"
  fresh.mkdir()
  (fresh / f"{fileio.TEMP_PREFIX}1-0badf00d-{synthetic.PARAMS_NAME}").write_text("{")
  synthetic.ensure_synthetic(str(fresh), 2, 1, 0)
  assert not [n for n in os.listdir(fresh) if n.startswith(".")]

  # Killed mid-set, by this version and by an earlier one.
  out = tmp_path / "set"
  synthetic.ensure_synthetic(str(out), 2, 1, 0)
  leftovers = [out / "anger" / f"{fileio.TEMP_PREFIX}7-12345678-s001_anger_0.png",
               out / f".{synthetic.PARAMS_NAME}.tmp"]
  foreign = out / "anger" / f"{fileio.TEMP_PREFIX}7-12345678-notes.txt"
  for path in leftovers + [foreign]:
    path.write_bytes(b"partial")
  params = json.loads((out / synthetic.PARAMS_NAME).read_text())
  (out / synthetic.PARAMS_NAME).write_text(json.dumps(dict(params, complete=False)))
  synthetic.ensure_synthetic(str(out), 2, 1, 0)
  assert not any(path.exists() for path in leftovers)
  assert foreign.exists()
  assert json.loads((out / synthetic.PARAMS_NAME).read_text())["complete"]


def test_cli_refuses_in_one_line_with_exit_code_2(small_set):
  """Catches a traceback (or a silent overwrite) instead of a one-line error."""
  proc = subprocess.run(
      [sys.executable, "-m", "data_tools.synthetic", f"--output_dir={small_set}"],
      cwd=REPO, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and "already holds a face set" in lines[0]


def test_ensure_synthetic_generates_once_then_reuses(tmp_path, monkeypatch):
  """Catches regenerating a complete set (slow start of every run), and reusing
  one made with other parameters, by another RENDER_VERSION, or incomplete."""
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

  # Drawn by another version of the renderer: regenerated.
  with monkeypatch.context() as m:
    m.setattr(synthetic, "RENDER_VERSION", synthetic.RENDER_VERSION + 1)
    m.setattr(synthetic, "generate", fail)
    with pytest.raises(AssertionError, match="regenerated"):
      synthetic.ensure_synthetic(str(out), 2, 1, 0)

  # Other parameters: regenerated in place (it is our own directory).
  synthetic.ensure_synthetic(str(out), num_subjects=3, images_per_cell=1, seed=0)
  assert len(contract.read_manifest(str(out))) == 3 * 7
  # A missing image makes the set incomplete: regenerated.
  os.remove(out / "anger" / "s001_anger_0.png")
  synthetic.ensure_synthetic(str(out), num_subjects=3, images_per_cell=1, seed=0)
  assert (out / "anger" / "s001_anger_0.png").exists()


def test_ensure_synthetic_leaves_foreign_directories_alone(tmp_path):
  """Catches the cache overwriting a face set it did not write."""
  out = tmp_path / "faces"
  out.mkdir()
  (out / "manifest.csv").write_text("path,expression\n")
  with pytest.raises(UserError, match="did not write"):
    synthetic.ensure_synthetic(str(out), 2, 1, 0)
  assert (out / "manifest.csv").read_text() == "path,expression\n"


@pytest.mark.parametrize("kwargs", [dict(num_subjects=0), dict(num_subjects=1001),
                                    dict(images_per_cell=0), dict(confounders=-0.5),
                                    dict(confounders=3.5)])
def test_bad_arguments_are_user_errors(tmp_path, kwargs):
  """Catches bad arguments crashing with a traceback or writing anything."""
  with pytest.raises(UserError):
    _generate(tmp_path / "x", **kwargs)
  assert not (tmp_path / "x").exists()


def test_throughput_report():
  """Prints the render rate; fails only on a pathological slowdown (a renderer
  100x slower than now), so it stays stable on loaded shared cores."""
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
