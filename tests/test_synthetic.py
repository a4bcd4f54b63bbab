"""Tests of the built-in synthetic face set (data_tools/synthetic.py and the
renderer it uses: synthetic_subjects.py, synthetic_faces.py, synthetic_canvas.py).

Small sets only (a few subjects, one or two images per cell): the whole file
should run in well under 20 s on two shared cores. The confounded benchmark's
plans (who shows which expressions) are checked on 100 subjects without
rendering them.
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

from conftest import file_bytes
from data_tools import synthetic
from data_tools import synthetic_subjects
from dicefer_jax import contract
from dicefer_jax import fileio
from dicefer_jax import splits
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


@pytest.mark.parametrize("kwargs", [
    dict(num_subjects=0), dict(num_subjects=1001), dict(images_per_cell=0),
    dict(confounders=-0.5), dict(confounders=3.5),
    dict(expressions_per_subject=0), dict(expressions_per_subject=8),
    dict(expressions_per_subject=2.5),
    # 3 subjects x 4 expressions: 12 pairs cannot give 7 expressions 2 subjects each.
    dict(expressions_per_subject=4),
    dict(attribute_strength=-0.1), dict(attribute_strength=1.5),
    dict(clean_fraction=0.0), dict(clean_fraction=1.0),
    # round(0.9 x 3) = 3 clean subjects: no confounded cohort to train on.
    dict(attribute_strength=1.0, clean_fraction=0.9),
])
def test_bad_arguments_are_user_errors(tmp_path, kwargs):
  """Catches bad arguments crashing with a traceback or writing anything."""
  with pytest.raises(UserError) as error:
    _generate(tmp_path / "x", **kwargs)
  assert "\n" not in str(error.value)
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


# ----------------------------------------------------------------------------
# The confounded benchmark: per-subject expression subsets, skewed counts, an
# appearance attribute that goes with the expression in a pinned cohort.

# The regression anchor of "options off = the balanced set of before": recorded
# with the generator as it was before the options existed (3 subjects x 2 images
# per cell, seed 0, one worker). The manifest and synthetic.json are pinned by
# their bytes: they fix which images exist, their names, labels, subjects, split
# column and intensities (so each image's random stream), and the parameters
# that decide whether a cached set is reused. The PNGs are pinned by mean and
# standard deviation, not bytes: blur and noise are float32 arithmetic that may
# round differently on another CPU (see _PINNED_NUISANCE_STATS); on the CPU that
# recorded them their sha256 were those below, for the record.
_BALANCED_MANIFEST_SHA256 = (
    "5f9f9fe0d46f6a9670ec6bf6fd1f5eddd66382240030d900f9f9d820ea8ede0e")
_BALANCED_PARAMS_SHA256 = (
    "621496669d4108417976406501921d3e6426e469e13e29e6caed0a4a850f5cc3")
_BALANCED_PNG_STATS = {  # path: (mean, std, sha256 on the recording CPU)
    "anger/s001_anger_1.png": (99.691, 38.716, "8f1d8a821a5d28b1672516df044d7c61"
                               "60d3a4b7cb8561c583d9d182a9183164"),
    "neutral/s000_neutral_0.png": (145.732, 32.037, "eb4bdfe7c6988d17992c99372aa6e97c"
                                   "fccb5204c207db303c8a2d480f065f1d"),
    "surprise/s002_surprise_0.png": (117.983, 62.977, "64ce1c19d851be3cf9afea148c9c5f43"
                                     "a7ee9f474086e2233e483a690fe80096"),
    "happiness/s002_happiness_1.png": (111.933, 60.025, "f74ae140d37d4506141e8686aaf976e1"
                                       "166b316d056417586da6523a0b012166"),
}


def _sha256(path):
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def test_options_off_give_the_balanced_set_of_before(small_set, tmp_path):
  """Catches the new options changing the balanced set: a different manifest
  (rows, order, split column, intensities), new keys in synthetic.json (a
  cached default set would no longer be reused), different images, or
  clean_fraction acting without an attribute. Compares options passed at their
  off values with options absent, byte for byte, and both with the anchor
  recorded before the options existed (see _BALANCED_MANIFEST_SHA256)."""
  _generate(tmp_path / "off", expressions_per_subject=7, attribute_strength=0.0,
            clean_fraction=0.9)
  assert file_bytes(tmp_path / "off") == file_bytes(small_set)
  assert _sha256(small_set / contract.MANIFEST_NAME) == _BALANCED_MANIFEST_SHA256
  assert _sha256(small_set / synthetic.PARAMS_NAME) == _BALANCED_PARAMS_SHA256
  for rel, (mean, std, _) in _BALANCED_PNG_STATS.items():
    img = cv2.imread(str(small_set / rel), cv2.IMREAD_UNCHANGED)
    assert img.mean() == pytest.approx(mean, abs=0.05), rel
    assert img.std() == pytest.approx(std, abs=0.05), rel


def _plans(num_subjects=100, k=3, strength=1.0, seed=0, images_per_cell=10,
           clean_fraction=0.4):
  subjects = synthetic.make_subjects(num_subjects, seed)
  return synthetic_subjects.plan_subjects(subjects, images_per_cell, seed, k, strength,
                                          clean_fraction)


@pytest.mark.parametrize("num_subjects, k, strength", [
    (7, 2, 0.0), (14, 1, 0.0), (14, 1, 1.0), (5, 3, 1.0), (30, 3, 1.0), (100, 3, 0.8),
    (40, 6, 0.5), (20, 7, 1.0)])
def test_every_subject_shows_k_expressions_and_every_expression_two_subjects(
    num_subjects, k, strength):
  """Catches subsets of the wrong size, an expression shown by fewer than two
  subjects (no same-expression pair of two people: the draw must repair it,
  which the tight cases 7 x 2 and 14 x 1 = 14 pairs always need), counts that do
  not add up to K x images_per_cell, and shown expressions with no image."""
  for seed in range(3):
    plans = _plans(num_subjects, k, strength, seed, images_per_cell=4)
    for p in plans:
      assert len(p.expressions) == k, p
      assert sum(p.counts) == k * 4, p
      assert all(n >= 1 for n in p.counts if n) and all(n >= 0 for n in p.counts)
    shows = collections.Counter(e for p in plans for e in p.expressions)
    assert set(shows) == set(contract.EXPRESSIONS)
    assert min(shows.values()) >= 2, shows


def test_counts_are_skewed_but_a_function_of_the_seed():
  """Catches equal counts (a subject's expressions not skewed, so only the
  subset would carry identity), counts drawn from an unseeded or shared stream
  (not reproducible), and a seed that does not reach the plan."""
  plans = _plans()
  assert plans == _plans()
  assert [p.counts for p in _plans(seed=1)] != [p.counts for p in plans]
  ratios = [max(p.counts) / min(n for n in p.counts if n) for p in plans]
  assert np.mean([r >= 2.0 for r in ratios]) > 0.5, ratios
  # Each subject's draws come from its own stream: the same subject plans alike
  # in a bigger set as long as the cohort and the cover leave it alone.
  clean_small = {p.subject_id: p for p in _plans(num_subjects=60, strength=0.0)}
  clean_big = {p.subject_id: p for p in _plans(num_subjects=100, strength=0.0)}
  same = [clean_small[i] == clean_big[i] for i in clean_small]
  assert np.mean(same) > 0.9


# The halves: with the attribute, a confounded subject favours these expressions.
_ATTRIBUTE_HALF = np.array([e in synthetic_subjects.ATTRIBUTE_EXPRESSIONS
                            for e in contract.EXPRESSIONS])


def _images(plans, pinned):
  """(attribute, label) of every image of one cohort."""
  attribute, labels = [], []
  for p in plans:
    if p.pinned == pinned:
      for label, n in enumerate(p.counts):
        attribute += [p.attribute] * n
        labels += [label] * n
  return np.array(attribute, bool), np.array(labels)


def _favoured_share(attribute, labels):
  """(share of images whose label is in the half their subject's attribute
  favours, that share minus its value if labels were independent of the
  attribute, given the cohort's label frequencies)."""
  in_attribute_half = _ATTRIBUTE_HALF[labels]
  share = np.mean(in_attribute_half == attribute)
  p = in_attribute_half.mean()
  return share, share - np.mean(np.where(attribute, p, 1.0 - p))


def _cramers_v(attribute, labels):
  """Cramer's V of the 2 x 7 table attribute x label (1: either decides the other)."""
  table = np.zeros((2, contract.NUM_CLASSES))
  np.add.at(table, (attribute.astype(int), labels), 1)
  table = table[:, table.sum(0) > 0]
  expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
  return float(np.sqrt(((table - expected) ** 2 / expected).sum() / table.sum()))


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_attribute_goes_with_expression_in_the_confounded_cohort_only(strength):
  """Catches an attribute that does not steer the confounded cohort's
  expressions (no shortcut), one that steers the clean cohort too (the test
  subjects would reward the shortcut), cohorts of the wrong size, and an
  attribute far more common in one cohort than the other.

  Thresholds from the strength s: a confounded subject draws a favoured
  expression with probability at least 3 / (3 + 4 (1 - s)) (the smaller half,
  3 expressions, against 4 at weight 1 - s); drawing without replacement and
  weighting the counts only raise the share of favoured images. The clean
  cohort's share is what independence gives, within 0.1 (40 subjects showing 3
  expressions: the excess stayed within +-0.06 over 8 seeds). Cramer's V of
  attribute x label is 1 at s = 1 in the confounded cohort; in the clean cohort it
  is what chance gives 40 subjects (0.2 to 0.32), never near 1.
  """
  for seed in range(3):
    plans = _plans(strength=strength, seed=seed)
    pinned = [p for p in plans if p.pinned]
    assert len(pinned) == 60
    attribute_rates = [np.mean([p.attribute for p in plans if p.pinned == cohort])
                       for cohort in (True, False)]
    assert abs(attribute_rates[0] - attribute_rates[1]) < 0.05, attribute_rates
    share, excess = _favoured_share(*_images(plans, pinned=True))
    assert share >= 3.0 / (3.0 + 4.0 * (1.0 - strength)) - 1e-9, (seed, share)
    assert excess > 0.1, (seed, excess)
    clean_share, clean_excess = _favoured_share(*_images(plans, pinned=False))
    assert abs(clean_excess) < 0.1, (seed, clean_share, clean_excess)
    if strength == 1.0:
      assert _cramers_v(*_images(plans, pinned=True)) > 0.99
      assert _cramers_v(*_images(plans, pinned=False)) < 0.5
  # The clean cohort ignores the strength: its plans are those of any strength.
  assert ([p for p in _plans(strength=strength) if not p.pinned] ==
          [p for p in _plans(strength=0.3) if not p.pinned])


def test_the_attribute_is_what_the_renderer_draws():
  """Catches an attribute that is not drawn (glasses or long hair must change
  the picture), and plans that change who a person is: subjects and pixels of
  a confounded set are those of the balanced set."""
  subjects = synthetic.make_subjects(40, 0)
  for s in subjects:
    assert synthetic_subjects.has_attribute(s) == (s.glasses or s.hair_style == 2)
  for field, value in (("glasses", True), ("hair_style", 2)):
    s = dataclasses.replace(subjects[0], glasses=False, hair_style=0)
    diff = np.abs(_canonical(dataclasses.replace(s, **{field: value}), "neutral")
                  - _canonical(s, "neutral"))
    # Both rims of the glasses alone change about 20,000 grey levels on this
    # face, long hair about 40,000: a plain change, not a faint one.
    assert diff.sum() > 10000.0, field
  assert 0.15 < np.mean([synthetic_subjects.has_attribute(s) for s in subjects]) < 0.5


@pytest.fixture(scope="module")
def confounded_set(tmp_path_factory):
  """14 subjects showing 2 expressions each, 2 images per expression on
  average, attribute at full strength, half of them clean."""
  path = tmp_path_factory.mktemp("confounded") / "set"
  _generate(path, num_subjects=14, images_per_cell=2, expressions_per_subject=2,
            attribute_strength=1.0, clean_fraction=0.5)
  return path


def test_confounded_set_follows_its_plan_and_pins_its_cohort(confounded_set):
  """Catches a manifest that does not match the plan (images of expressions a
  subject does not show, wrong counts), a split column that does not pin
  exactly the confounded cohort, and images that are not the balanced set's
  renders of their (seed, subject, expression, k): a plan may only select."""
  plans = {p.subject_id: p for p in _plans(14, 2, 1.0, 0, images_per_cell=2,
                                            clean_fraction=0.5)}
  subjects = {s.subject_id: s for s in synthetic.make_subjects(14, 0)}
  with open(confounded_set / contract.MANIFEST_NAME, newline="") as f:
    rows = list(csv.DictReader(f))
  counts = collections.Counter((r["subject"], r["expression"]) for r in rows)
  for sid, plan in plans.items():
    for expression, n in zip(contract.EXPRESSIONS, plan.counts):
      assert counts[(sid, expression)] == n, (sid, expression)
  for row in rows:
    plan = plans[row["subject"]]
    assert row["split"] == ("train" if plan.pinned else "")
    expression, subject = row["expression"], subjects[row["subject"]]
    k = int(row["path"].rsplit("_", 1)[1].split(".")[0])
    assert k < plan.counts[contract.expression_index(expression)]
    if k == 0:  # one image per cell is enough to show the streams are shared
      rng = synthetic.image_rng(0, subject.index, expression, k)
      intensity = rng.uniform(*synthetic.INTENSITY_RANGE) if expression != "neutral" else 0.0
      assert row["intensity"] == f"{intensity:.3f}"
      img = cv2.imread(os.path.join(confounded_set, row["path"]), cv2.IMREAD_UNCHANGED)
      assert np.array_equal(img, synthetic.render_face(subject, expression, intensity, rng))
  assert sum(p.pinned for p in plans.values()) == 7


def test_confounded_set_folds_test_clean_subjects_only(confounded_set):
  """Catches the end-to-end wiring failing: a generated confounded set whose
  manifest does not make dicefer_jax.splits pin the confounded cohort, so a
  fold would test a confounded subject (on whom the shortcut works)."""
  records = contract.read_manifest(str(confounded_set))
  assert splits.split_kind(records) == "subject_pinned"
  pinned = {r.subject for r in records if r.split == "train"}
  clean = {r.subject for r in records} - pinned
  tested = set()
  for fold in range(3):
    train, test, info = splits.split_records(records, num_folds=3, fold=fold, seed=0)
    assert {r.subject for r in test} <= clean
    assert pinned <= {r.subject for r in train}
    assert info.note.startswith("7 subjects always in training (split=train); "
                                "folds over the other 7")
    tested |= {r.subject for r in test}
  assert tested == clean


def test_same_confounded_set_whatever_the_workers(confounded_set, tmp_path):
  """Catches plans drawn inside the workers (from a stream that depends on
  which process renders which subject)."""
  _generate(tmp_path / "again", num_subjects=14, images_per_cell=2,
            expressions_per_subject=2, attribute_strength=1.0, clean_fraction=0.5,
            workers=2)
  assert file_bytes(tmp_path / "again") == file_bytes(confounded_set)


def test_ensure_synthetic_tells_the_options_apart(tmp_path, monkeypatch):
  """Catches a cached set reused for other options: a confounded set standing
  in for the balanced one (options absent from the wanted parameters were not
  compared), or the reverse; and a confounded set regenerated on every run."""
  out = tmp_path / "cache"
  kwargs = dict(expressions_per_subject=2, attribute_strength=1.0, clean_fraction=0.5)
  synthetic.ensure_synthetic(str(out), 7, 2, 0, **kwargs)
  params = json.loads((out / synthetic.PARAMS_NAME).read_text())
  assert (params["expressions_per_subject"], params["attribute_strength"],
          params["clean_fraction"]) == (2, 1.0, 0.5)

  def fail(*args, **kw):
    raise AssertionError("regenerated a set it should have reused")
  with monkeypatch.context() as m:
    m.setattr(synthetic, "generate", fail)
    synthetic.ensure_synthetic(str(out), 7, 2, 0, **kwargs)
    for other in (dict(), dict(kwargs, attribute_strength=0.5),
                  dict(kwargs, clean_fraction=0.6), dict(expressions_per_subject=2)):
      with pytest.raises(AssertionError, match="regenerated"):
        synthetic.ensure_synthetic(str(out), 7, 2, 0, **other)
  synthetic.ensure_synthetic(str(out), 7, 1, 0)  # the balanced set replaces it
  records = contract.read_manifest(str(out))
  assert len(records) == 7 * 7 and not any(r.split for r in records)
  # No stale image of the confounded plan (k above the balanced set's) is left.
  on_disk = {p for p in file_bytes(out) if p.endswith(".png")} - {"contact_sheet.png"}
  assert on_disk == {r.path for r in records}
  with monkeypatch.context() as m:
    m.setattr(synthetic, "generate", fail)
    synthetic.ensure_synthetic(str(out), 7, 1, 0, clean_fraction=0.2)  # no attribute


def test_synthetic_dir_names_only_options_that_are_on():
  """Catches the balanced set moving to another cache directory (it would be
  regenerated beside the old copy), and confounded sets sharing a name."""
  from experiments import face_sets  # pylint: disable=g-import-not-at-top
  from experiments.configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.synthetic.cache_dir = "/cache"
  assert face_sets.synthetic_dir(config) == "/cache/synthetic_n60_k10_seed0"
  config.synthetic.clean_fraction = 0.3  # no attribute: not part of the set
  assert face_sets.synthetic_dir(config) == "/cache/synthetic_n60_k10_seed0"
  config.synthetic.expressions_per_subject = 3
  assert face_sets.synthetic_dir(config) == "/cache/synthetic_n60_k10_seed0_e3"
  config.synthetic.attribute_strength = 1.0
  assert face_sets.synthetic_dir(config) == "/cache/synthetic_n60_k10_seed0_e3_a1_c0.3"
