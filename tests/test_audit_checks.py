"""Tests of the audit's image checks, duplicate search and contact sheets
(data_tools/audit/image_checks.py, duplicates.py, contact_sheets.py).

Small inputs only (a synthetic set of 3 subjects x 7 expressions x 2 images,
hand-made frames, random hashes): the file runs in seconds on two shared cores.
"""

import os
import re

import cv2
import numpy as np
import pytest

from data_tools import synthetic
from data_tools.audit import contact_sheets
from data_tools.audit import duplicates
from data_tools.audit import findings
from data_tools.audit import image_checks
from dicefer_jax import contract
from dicefer_jax import face_images
from dicefer_jax import fileio
from dicefer_jax.errors import DataError

SIZE = contract.IMAGE_SIZE


@pytest.fixture(scope="module")
def face_set(tmp_path_factory):
  """(data_dir, records, images (N, 112, 112) uint8) of a small synthetic set."""
  path = str(tmp_path_factory.mktemp("audit") / "faces")
  synthetic.generate(path, num_subjects=3, images_per_cell=2, seed=0, workers=1)
  records = contract.read_manifest(path)
  images = face_images.load_images(path, records)[..., 0]
  return path, records, images


def _checkerboard(a: int, size: int = SIZE) -> np.ndarray:
  ii, jj = np.indices((size, size))
  return (((ii + jj) % 2) * a).astype(np.uint8)


def _laplacian_numpy(image: np.ndarray) -> np.ndarray:
  """The 4-neighbour Laplacian with OpenCV's default border (reflect-101,
  numpy's "reflect"), written without OpenCV."""
  p = np.pad(image.astype(np.float64), 1, mode="reflect")
  return p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4 * p[1:-1, 1:-1]


def _records(n: int, expressions=None) -> list[contract.Record]:
  expressions = expressions or ["neutral"] * n
  return [contract.Record(path=f"{e}/img{i:03d}.png", expression=e, subject=f"s{i % 3}")
          for i, e in enumerate(expressions)]


# ---------------------------------------------------------------------------
# Per-image measures.

def test_laplacian_variance_matches_hand_computation():
  """Catches a Laplacian taken in uint8 (negative responses clipped to 0), with
  another kernel size, or a variance of something else: a flat image is 0; a
  0/10 one-pixel checkerboard has a response of +-40 at every pixel (borders
  included: reflect-101 mirrors the opposite colour), so variance 1600."""
  flat = np.full((SIZE, SIZE), 77, np.uint8)
  assert image_checks.measure_image(flat).laplacian_var == 0
  assert image_checks.measure_image(_checkerboard(10)).laplacian_var == pytest.approx(
      1600)
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
  assert image_checks.measure_image(image).laplacian_var == pytest.approx(
      _laplacian_numpy(image).var(), rel=1e-9)


def test_other_sizes_are_measured_at_112():
  """Catches measuring a file at its own size: the Laplacian variance depends
  on scale, so a 224-pixel file must be measured as the 112-pixel face the
  training code sees."""
  rng = np.random.default_rng(1)
  big = cv2.GaussianBlur(rng.integers(0, 256, (224, 224), dtype=np.uint8), (0, 0), 2)
  small = face_images.resize_square(big, SIZE)
  assert image_checks.measure_image(big) == image_checks.measure_image(small)
  assert image_checks.measure_image(big[:, :, None]) == image_checks.measure_image(small)
  assert (image_checks.measure_image(big).laplacian_var
          != pytest.approx(cv2.Laplacian(big, cv2.CV_64F).var(), rel=0.05))


def test_brightness_measures_match_numpy():
  """Catches off-by-one percentiles from the histogram and shares counted with
  the wrong limit (< vs <=)."""
  rng = np.random.default_rng(2)
  image = np.clip(rng.normal(120, 70, (SIZE, SIZE)), 0, 255).astype(np.uint8)
  m = image_checks.measure_image(image)
  assert m.mean == pytest.approx(image.mean())
  assert m.p5 == np.percentile(image, 5, method="inverted_cdf")
  assert m.p95 == np.percentile(image, 95, method="inverted_cdf")
  assert m.black_share == pytest.approx(np.mean(image <= image_checks.BLACK_LEVEL))
  assert m.white_share == pytest.approx(np.mean(image >= image_checks.WHITE_LEVEL))
  assert 0 < m.black_share < 0.2 and 0 < m.white_share < 0.2


def test_bad_images_are_refused_with_one_line():
  """Catches silent measuring of a colour or float array as if it were gray."""
  with pytest.raises(DataError, match="uint8 grayscale"):
    image_checks.measure_image(np.zeros((SIZE, SIZE, 3), np.uint8))
  with pytest.raises(DataError, match="uint8 grayscale"):
    image_checks.measure_image(np.zeros((SIZE, SIZE), np.float32))
  with pytest.raises(DataError, match="min_laplacian_var"):
    image_checks.Thresholds(min_laplacian_var=0)
  with pytest.raises(DataError, match="2 records but 1"):
    image_checks.blur_findings(_records(2), image_checks.measure_images(
        [np.zeros((SIZE, SIZE), np.uint8)]))


def test_face_set_reader_keeps_record_order(face_set):
  """Catches threads returning rows in completion order instead of record order."""
  data_dir, records, images = face_set
  threaded = image_checks.measure_face_set(data_dir, records, workers=4)
  serial = image_checks.measure_images(images)
  for name in image_checks.MEASURES:
    np.testing.assert_array_equal(getattr(threaded, name), getattr(serial, name))


def test_blurred_faces_flagged_originals_not(face_set):
  """Catches a threshold above sharp synthetic faces or a score pointing the
  wrong way: every original passes; a sigma-3 Gaussian blur of each has a
  lower Laplacian variance, is flagged, and scores log10(20 / variance)."""
  _, records, images = face_set
  originals = image_checks.measure_images(images)
  assert image_checks.blur_findings(records, originals) == []
  blurred = image_checks.measure_images(cv2.GaussianBlur(i, (0, 0), 3) for i in images)
  assert np.all(blurred.laplacian_var < originals.laplacian_var)
  flagged = image_checks.blur_findings(records, blurred)
  assert [f.path for f in flagged] == [r.path for r in records]
  for f, value in zip(flagged, blurred.laplacian_var):
    assert f.kind == findings.BLUR and f.suggestion == findings.DROP
    assert f.score == pytest.approx(np.log10(20 / value)) and f.score > 0
    assert f"{value:.3g} < 20" in f.detail and "exposure" not in f.detail


def test_blur_threshold_boundary_and_score():
  """Catches <= instead of < at the threshold and a score not in decades."""
  table = image_checks.MeasureTable.from_rows([
      image_checks.ImageMeasure(20.0, 128, 60, 200, 0, 0),
      image_checks.ImageMeasure(2.0, 128, 60, 200, 0, 0),
      image_checks.ImageMeasure(0.0, 128, 60, 200, 0, 0)])
  flagged = image_checks.blur_findings(_records(3), table)
  assert [f.path for f in flagged] == ["neutral/img001.png", "neutral/img002.png"]
  assert flagged[0].score == pytest.approx(1.0)
  assert np.isfinite(flagged[1].score) and flagged[1].score > flagged[0].score


def test_exposure_frames_flagged_with_the_right_words(face_set):
  """Catches a missing or swapped exposure rule: black and dimmed faces are
  "too dark", white and washed-out ones "too bright", flat and faint ones "too
  little contrast" (and only that), while the synthetic faces pass."""
  _, records, images = face_set
  assert image_checks.exposure_findings(
      records, image_checks.measure_images(images)) == []
  face = images[0].astype(np.float64)
  frames = {
      "black": np.zeros((SIZE, SIZE), np.uint8),
      "white": np.full((SIZE, SIZE), 255, np.uint8),
      "grey": np.full((SIZE, SIZE), 128, np.uint8),
      "dim": (face * 0.15).astype(np.uint8),
      "washed": (235 + face * 0.08).astype(np.uint8),
      "faint": (120 + face * 0.05).astype(np.uint8),
  }
  recs = _records(len(frames))
  found = {f.path: f for f in image_checks.exposure_findings(
      recs, image_checks.measure_images(frames.values()))}
  detail = {name: found[r.path].detail for name, r in zip(frames, recs)}
  score = {name: found[r.path].score for name, r in zip(frames, recs)}
  assert detail["black"].startswith("too dark: mean 0.0 < 30")
  assert "too bright: mean 255.0 > 225" in detail["white"]
  assert detail["grey"] == "too little contrast: p95-p5 spread 0 < 16"
  assert "too dark" in detail["dim"] and "bright" not in detail["dim"]
  assert "too bright" in detail["washed"] and "dark" not in detail["washed"]
  assert "too little contrast" in detail["faint"]
  assert "dark" not in detail["faint"] and "bright" not in detail["faint"]
  # A black frame is as dark as can be: severity 1 (mean 0 against 30).
  assert score["black"] == pytest.approx(1.0) and score["white"] == pytest.approx(1.0)
  assert all(0 < s <= 1 for s in score.values())
  assert all(f.kind == findings.EXPOSURE and f.suggestion == findings.DROP
             for f in found.values())
  # Flat frames have no Laplacian response either; the blur finding says why.
  blur = image_checks.blur_findings(recs, image_checks.measure_images(frames.values()))
  assert blur and all(f.detail.endswith("see exposure)") for f in blur)


def test_plots_written_atomically_with_flat_images(tmp_path):
  """Catches a log-scale histogram that fails on a zero variance (flat image)
  and plots left half-written or under temporary names."""
  rng = np.random.default_rng(3)
  images = [rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8) for _ in range(5)]
  images.append(np.zeros((SIZE, SIZE), np.uint8))
  table = image_checks.measure_images(images)
  written = image_checks.plot_measure_distributions(table, str(tmp_path / "audit"))
  assert len(written) == 7
  for _, path in written:
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert not [n for n in os.listdir(tmp_path / "audit") if fileio.is_temp_name(n)]


# ---------------------------------------------------------------------------
# Duplicates.

def _brute_force_pairs(hashes, max_distance):
  values = [int(h) for h in hashes]
  return {(i, j, bin(values[i] ^ values[j]).count("1"))
          for i in range(len(values)) for j in range(i + 1, len(values))
          if bin(values[i] ^ values[j]).count("1") <= max_distance}


@pytest.mark.parametrize("block,column_block", [(256, 4096), (7, 13), (1, 5)])
def test_blocked_hamming_search_equals_brute_force(block, column_block):
  """Catches tiles that skip or repeat pairs at block edges or on the diagonal
  (i < j only), and a wrong popcount: the same pairs and distances as a plain
  double loop, on random hashes with planted near copies (0-12 flipped bits)."""
  rng = np.random.default_rng(4)
  base = [int(v) for v in rng.integers(0, 2**63, 120, dtype=np.uint64) * 2 + 1]
  planted = []
  for k in range(60):
    flips = rng.choice(64, size=k % 13, replace=False)
    planted.append(base[k] ^ sum(1 << int(b) for b in flips))
  hashes = np.array(base + planted + [base[3], base[3]], dtype=np.uint64)
  for max_distance in (0, 5, 10):
    i, j, d = duplicates.hamming_pairs(hashes, max_distance, block, column_block)
    got = set(zip(i.tolist(), j.tolist(), d.tolist()))
    assert len(got) == len(i)
    assert got == _brute_force_pairs(hashes, max_distance)


def _table_and_records(images, expressions):
  return duplicates.hash_images(images), _records(len(images), expressions)


def test_unrelated_faces_are_not_grouped(face_set):
  """Catches near-duplicate calls on the perceptual hash alone: one person's
  expressions are within a few phash bits of each other (aligned faces), and
  must not be reported as the same picture."""
  _, records, images = face_set
  table = duplicates.hash_images(images)
  i, _, _ = duplicates.hamming_pairs(table.phash, 10)
  assert len(i) > 0  # the hash alone would have called some of them copies
  assert duplicates.duplicate_findings(records, table) == []


def test_exact_duplicate_pair(face_set):
  """Catches exact copies missed or scored below near ones, and a suggestion
  that drops both copies."""
  _, _, images = face_set
  table, recs = _table_and_records([images[0], images[5], images[0].copy()],
                                   ["happiness"] * 3)
  found = duplicates.duplicate_findings(recs, table)
  assert {f.path for f in found} == {recs[0].path, recs[2].path}
  by_path = {f.path: f for f in found}
  assert by_path[recs[0].path].suggestion == findings.KEEP  # first by path
  assert by_path[recs[2].path].suggestion == findings.DROP
  assert by_path[recs[0].path].related == (recs[2].path,)
  assert by_path[recs[2].path].related == (recs[0].path,)
  for f in found:
    assert f.kind == findings.DUPLICATE and f.score == 1.0
    assert f.detail.startswith("exact copy of 1 other image(s); group of 2")
    assert "all labelled happiness" in f.detail


def _jpeg(image, quality):
  ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
  assert ok
  return cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)


def test_near_duplicates_found_and_ranked_below_exact(face_set):
  """Catches near-duplicate thresholds too tight for everyday copies: sensor
  noise, a brightness change and JPEG re-encodes of every face are grouped
  with it (some of them several phash bits away), as near (not exact) copies
  scoring below 1."""
  _, _, images = face_set
  rng = np.random.default_rng(5)
  distances = []
  for index, face in enumerate(images):
    copies = {
        "noise 4": np.clip(face + rng.normal(0, 4, face.shape), 0, 255).astype(np.uint8),
        "noise 8": np.clip(face + rng.normal(0, 8, face.shape), 0, 255).astype(np.uint8),
        "brighter": np.clip(face.astype(int) + 10, 0, 255).astype(np.uint8),
        "jpeg 70": _jpeg(face, 70),
        "jpeg 30": _jpeg(face, 30),
    }
    table = duplicates.hash_images([face] + list(copies.values()))
    groups = duplicates.find_duplicate_groups(table)
    assert [g.members for g in groups] == [tuple(range(len(copies) + 1))], index
    distances.extend(np.bitwise_count(table.phash[1:] ^ table.phash[0]).tolist())
  # The copies test the distance threshold, not only identical hashes.
  assert max(distances) >= 4
  table, recs = _table_and_records([images[0], _jpeg(images[0], 70)], ["sadness"] * 2)
  found = duplicates.duplicate_findings(recs, table)
  assert len(found) == 2
  for f in found:
    assert "near duplicate (phash distance" in f.detail and "exact" not in f.detail
    assert 0.8 < f.score < 1.0


def test_flat_frames_are_never_grouped():
  """Catches black or flat frames grouped as copies: their hashes are noise
  (and two black frames are the exposure check's business, not a duplicate)."""
  rng = np.random.default_rng(6)
  frames = [np.zeros((SIZE, SIZE), np.uint8), np.zeros((SIZE, SIZE), np.uint8),
            np.full((SIZE, SIZE), 255, np.uint8),
            np.clip(128 + rng.normal(0, 1, (SIZE, SIZE)), 0, 255).astype(np.uint8),
            np.clip(128 + rng.normal(0, 1, (SIZE, SIZE)), 0, 255).astype(np.uint8)]
  table, recs = _table_and_records(frames, None)
  assert duplicates.find_duplicate_groups(table) == []
  assert duplicates.duplicate_findings(recs, table) == []


def test_cross_label_group_keeps_the_majority_label(face_set):
  """Catches a cross-label group reported as a plain copy, or a suggestion
  that drops every copy: two happiness copies and one anger copy of the same
  face keep the first happiness path and drop the rest."""
  _, _, images = face_set
  face = images[3]
  copies = [face, _jpeg(face, 80), face.copy()]
  table = duplicates.hash_images(copies)
  recs = [contract.Record("anger/a.png", "anger"),
          contract.Record("happiness/b.png", "happiness"),
          contract.Record("happiness/c.png", "happiness")]
  found = {f.path: f for f in duplicates.duplicate_findings(recs, table)}
  assert found["happiness/b.png"].suggestion == findings.KEEP
  assert found["happiness/c.png"].suggestion == findings.DROP
  assert found["anger/a.png"].suggestion == findings.DROP
  for f in found.values():
    assert "same picture labelled happiness and anger: a label error" in f.detail
    assert "group of 3" in f.detail
    assert set(f.related) == set(found) - {f.path}
  assert found["anger/a.png"].score == 1.0  # exact copy of c
  assert found["happiness/b.png"].score < 1.0  # near copy only


def test_candidates_all_rejected_by_the_second_hash(face_set):
  """Catches a crash when every phash candidate fails the dhash check (an
  empty batch reaching the pixel check)."""
  _, records, images = face_set
  table = duplicates.hash_images(images)
  strict = duplicates.DuplicateThresholds(max_dhash_distance=0)
  assert duplicates.duplicate_findings(records, table, strict) == []
  no_pairs = np.zeros((0, 16, 16), np.float32)
  assert duplicates.local_difference(no_pairs, no_pairs).shape == (0,)


def test_tied_labels_keep_everything():
  """Catches a rule that picks a label when the group gives no majority."""
  assert duplicates.group_suggestions(["b", "a"], ["anger", "fear"]) == ["keep", "keep"]
  assert duplicates.group_suggestions(["b", "a", "c"], ["fear"] * 3) == [
      "drop", "keep", "drop"]
  assert duplicates.group_suggestions(["b", "a", "c"], ["anger", "fear", "anger"]) == [
      "keep", "drop", "drop"]


def test_duplicate_input_errors(face_set):
  """Catches a manifest listing one path twice (its own duplicate) and
  misaligned hashes passing silently."""
  _, _, images = face_set
  table = duplicates.hash_images(images[:2])
  with pytest.raises(DataError, match="twice"):
    duplicates.duplicate_findings([contract.Record("x.png", "fear")] * 2, table)
  with pytest.raises(DataError, match="1 records but 2"):
    duplicates.duplicate_findings([contract.Record("x.png", "fear")], table)
  with pytest.raises(DataError, match="max_phash_distance"):
    duplicates.DuplicateThresholds(max_phash_distance=64)


# ---------------------------------------------------------------------------
# Contact sheets.

def _sample_findings():
  return [
      findings.Finding("happiness/a.png", findings.BLUR, 0.5, detail="blurry: 5 < 20",
                       expression="happiness", subject="s1"),
      findings.Finding("odd/<b>&x.png", findings.BLUR, 2.0, detail="x < y & z",
                       expression="anger"),
      findings.Finding("fear/c.png", findings.EXPOSURE, 1.0, detail="too dark",
                       expression="fear"),
      findings.Finding("fear/d.png", findings.DUPLICATE, 1.0, findings.KEEP,
                       related=("fear/e.png",), expression="fear"),
      findings.Finding("fear/e.png", findings.DUPLICATE, 1.0, findings.DROP,
                       related=("fear/d.png",), expression="fear"),
  ]


def test_contact_sheets_show_every_finding_escaped(tmp_path):
  """Catches findings missing from their sheet, unescaped paths (a `<` or `&`
  in a file name breaking the page), embedded images instead of relative
  links, and a sheet not ordered by score."""
  data_dir = str(tmp_path / "faces")
  all_findings = _sample_findings()
  written = contact_sheets.write_contact_sheets(
      data_dir, all_findings, kinds=(findings.BLUR, findings.EXPOSURE,
                                     findings.DUPLICATE),
      plots=[("blur <plot>", os.path.join(data_dir, "audit", "measure_x.png"))],
      sections=[("balance & more", "<table><tr><td>7</td></tr></table>")])
  audit = os.path.join(data_dir, "audit")
  assert sorted(os.listdir(audit)) == ["blur.html", "duplicate.html",
                                       "exposure.html", "index.html"]
  assert written[-1] == os.path.join(audit, "index.html")
  pages = {}
  for name in os.listdir(audit):
    with open(os.path.join(audit, name), encoding="utf-8") as f:
      pages[name] = f.read()
  for finding in all_findings:
    page = pages[f"{finding.kind}.html"]
    assert contact_sheets._e(finding.path) in page
    assert f'src="{contact_sheets.image_src(finding.path)}"' in page
  blur = pages["blur.html"]
  assert "odd/&lt;b&gt;&amp;x.png" in blur and "<b>&x" not in blur
  assert 'src="../odd/%3Cb%3E%26x.png"' in blur
  assert "x &lt; y &amp; z" in blur
  assert blur.index("odd/&lt;b&gt;") < blur.index("happiness/a.png")  # score 2 first
  assert "base64" not in "".join(pages.values())
  duplicate = pages["duplicate.html"]
  assert duplicate.count('src="../fear/e.png"') == 2  # its own card and d's
  index = pages["index.html"]
  for kind in ("blur", "exposure", "duplicate"):
    assert f'href="{kind}.html"' in index
  assert re.search(r"blur</code>\)</td><td>2</td>", index)
  assert 'src="measure_x.png"' in index and "blur &lt;plot&gt;" in index
  assert "<h2>balance &amp; more</h2>" in index
  assert "<table><tr><td>7</td></tr></table>" in index
  assert not [n for n in os.listdir(audit) if fileio.is_temp_name(n)]


def test_sheet_limit_and_empty_kinds(tmp_path):
  """Catches a stale sheet left from an earlier run for a kind with no
  findings now, and an unbounded sheet."""
  data_dir = str(tmp_path / "faces")
  many = [findings.Finding(f"neutral/{i:04d}.png", findings.BLUR, float(i))
          for i in range(30)]
  contact_sheets.write_contact_sheets(data_dir, many, max_per_sheet=10)
  with open(os.path.join(data_dir, "audit", "blur.html"), encoding="utf-8") as f:
    page = f.read()
  assert "Showing the first 10 of 30" in page
  assert "neutral/0029.png" in page and "neutral/0019.png" not in page
  contact_sheets.write_contact_sheets(data_dir, [])
  with open(os.path.join(data_dir, "audit", "blur.html"), encoding="utf-8") as f:
    assert "No findings of this kind." in f.read()
  with pytest.raises(DataError, match="no sheet"):
    contact_sheets.write_contact_sheets(data_dir, many, kinds=(findings.EXPOSURE,))
