"""The audit end to end: planted problems found, labels judged out of fold,
decisions applied without touching a user's files.

The checks' own measures are tested in test_audit_checks.py and the review
page in test_audit_review.py.
"""

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from data_tools import synthetic
from data_tools.audit import apply as apply_lib
from data_tools.audit import auditor
from data_tools.audit import findings as F
from data_tools.audit import framing
from data_tools.audit import label_check
from data_tools.audit import planting
from dicefer_jax import contract, data as data_lib
from dicefer_jax import face_detector
from dicefer_jax.errors import DataError, UserError
from experiments.configs import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_mtcnn = pytest.mark.skipif(not face_detector.mtcnn_installed(),
                                 reason="facenet-pytorch (the data extra) is not installed")


def _digests(root: str) -> dict:
  """Every file under root (outside audit/) -> its sha256."""
  out = {}
  for folder, dirs, names in os.walk(root):
    dirs[:] = [d for d in dirs if d != "audit"]
    for name in names:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def clean_set(tmp_path_factory):
  root = tmp_path_factory.mktemp("clean")
  out = str(root / "faces")
  synthetic.generate(out, num_subjects=8, images_per_cell=2, seed=3, workers=1)
  return out


@pytest.fixture(scope="module")
def planted_set(clean_set, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("planted") / "faces")
  counts = dict.fromkeys(planting.PROBLEMS, 2)
  planted = planting.plant_problems(clean_set, out, seed=0, counts=counts)
  return out, planted


def test_planting_spoils_only_what_it_says(clean_set, planted_set):
  out, planted = planted_set
  before, after = _digests(clean_set), _digests(out)
  changed = {p for p in before if p in after and before[p] != after[p]}
  spoiled = {p.path for p in planted if p.problem in
             ("blur", "dark", "bright", "black", "off_centre", "cut_off")}
  # The manifest changes (swapped labels, new rows); images only where spoiled.
  assert changed - {contract.MANIFEST_NAME} == spoiled
  new_files = set(after) - set(before) - {planting.PLANTED_NAME}
  copies = {p.path for p in planted if p.problem.endswith("duplicate")}
  assert new_files == copies
  by_path = {r.path: r for r in contract.read_manifest(out)}
  originals = {r.path: r for r in contract.read_manifest(clean_set)}
  for p in planted:
    if p.problem == "swapped_label":
      assert by_path[p.path].expression != originals[p.path].expression
    if p.problem == "cross_label_duplicate":
      assert by_path[p.path].expression != by_path[p.source].expression
  # Every planted image carries one problem.
  assert len({p.path for p in planted}) == len(planted)
  with pytest.raises(DataError, match="not empty"):
    planting.plant_problems(clean_set, out, counts=dict.fromkeys(planting.PROBLEMS, 1))


def test_scores_count_required_allowed_and_clean_images():
  planted = [planting.Planted("a.png", "black", (F.EXPOSURE,), (F.BLUR,)),
             planting.Planted("b.png", "blur", (F.BLUR,))]
  found = [F.Finding("a.png", F.EXPOSURE, 1.0), F.Finding("a.png", F.BLUR, 1.0),
           F.Finding("c.png", F.BLUR, 1.0)]
  scores = planting.score_findings(found, planted)
  # blur: b missed, a allowed (neutral), c clean (false positive).
  assert scores[F.BLUR] == dict(planted=1, found=2, true_positives=0, false_positives=1,
                                missed=1, precision=0.0, recall=0.0, top_precision=None)
  assert scores[F.EXPOSURE]["precision"] == 1.0 and scores[F.EXPOSURE]["recall"] == 1.0
  assert scores[F.LABEL]["precision"] is None and scores[F.LABEL]["recall"] is None
  # Ranked: the first `planted` findings by score.
  ranked = [F.Finding("b.png", F.BLUR, 0.9), F.Finding("c.png", F.BLUR, 0.5),
            F.Finding("d.png", F.BLUR, 2.0)]
  s = planting.score_findings(ranked, planted + [planting.Planted("d.png", "blur", (F.BLUR,))])
  assert s[F.BLUR]["top_precision"] == 1.0 and s[F.BLUR]["precision"] == 2 / 3


def test_label_findings_flag_the_swapped_labels():
  """Probabilities confident in the true class: confident learning flags exactly
  the images whose given label was swapped, and suggests the true one."""
  rng = np.random.default_rng(0)
  true = np.repeat(np.arange(7), 20)
  given = true.copy()
  swapped = rng.choice(len(true), 10, replace=False)
  given[swapped] = (true[swapped] + rng.integers(1, 7, 10)) % 7
  probabilities = np.full((len(true), 7), 0.02)
  probabilities[np.arange(len(true)), true] = 0.88
  records = [contract.Record(f"{i}.png", contract.EXPRESSIONS[g], f"s{i % 5}")
             for i, g in enumerate(given)]
  found = label_check.label_findings(records, probabilities)
  assert {f.path for f in found} == {f"{i}.png" for i in swapped}
  for f in found:
    i = int(f.path.split(".")[0])
    assert f.suggestion == f"relabel:{contract.EXPRESSIONS[true[i]]}"
    assert f.score == pytest.approx(1 - 0.02)


def test_each_image_is_judged_by_a_model_that_never_saw_it(clean_set, tmp_path,
                                                          monkeypatch):
  from dicefer_jax import train  # pylint: disable=g-import-not-at-top
  faces = data_lib.load_face_set(clean_set)
  labels = np.array([r.label for r in faces.records])
  # Image 0 and image 1 are one duplicate group: they must share a fold.
  groups = list(range(len(labels)))
  groups[1] = 0
  folds = label_check.fold_of_images(labels, groups, 2, seed=0)
  assert folds[0] == folds[1]
  config = tiny.get_config()
  config.method = "baseline"
  config.baseline.num_steps = 2
  images = faces.images(config.image_size)
  seen_by_fold = []
  original = train.train_stage

  def spy(stage, cfg, workdir, model, data, writer, *args, **kwargs):
    seen_by_fold.append({images[i].tobytes() for i in range(len(images))
                         if any(np.array_equal(images[i], t) for t in data.train_images)})
    return original(stage, cfg, workdir, model, data, writer, *args, **kwargs)

  monkeypatch.setattr(train, "train_stage", spy)
  root = str(tmp_path / "models")
  probabilities = label_check.out_of_fold_probabilities(config, faces, folds, root)
  assert probabilities.shape == (len(labels), 7)
  np.testing.assert_allclose(probabilities.sum(1), 1.0, rtol=1e-5)
  for k, seen in enumerate(seen_by_fold):
    for i in np.flatnonzero(folds == k):
      assert images[i].tobytes() not in seen
  # A rerun reuses the finished fold models: same probabilities, no training.
  seen_by_fold.clear()
  again = label_check.out_of_fold_probabilities(config, faces, folds, root)
  np.testing.assert_allclose(again, probabilities, rtol=1e-6)
  config.method = "dicefer"
  with pytest.raises(UserError, match="baseline"):
    label_check.out_of_fold_probabilities(config, faces, folds, root)


@needs_mtcnn
def test_framing_measures_a_shifted_face(clean_set, tmp_path):
  """Detection on the padded face maps back to image pixels: a face shifted by
  dx pixels is found dx pixels away from where its unshifted self is."""
  import cv2  # pylint: disable=g-import-not-at-top
  record = contract.read_manifest(clean_set)[0]
  gray = cv2.imread(os.path.join(clean_set, record.path), cv2.IMREAD_GRAYSCALE)
  shifted = cv2.warpAffine(gray, np.float32([[1, 0, 20], [0, 1, 0]]), (112, 112),
                           borderMode=cv2.BORDER_REPLICATE)
  paths = [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
  cv2.imwrite(paths[0], gray)
  cv2.imwrite(paths[1], shifted)
  # MTCNN runs in spawned workers: torch must not enter this process, which
  # other tests fill with TensorFlow.
  a, b = framing.detect_all(paths, workers=1)
  assert a.found and b.found
  moved = b.landmarks.mean(0) - a.landmarks.mean(0)
  assert moved[0] == pytest.approx(20, abs=3) and moved[1] == pytest.approx(0, abs=3)
  ref = framing.Reference(tuple(a.landmarks.mean(0) / 112),
                          float(np.linalg.norm(a.landmarks[1] - a.landmarks[0]) / 112), "x")
  assert framing.judge_aligned(a, framing.Thresholds(), ref) is None
  score, detail = framing.judge_aligned(b, framing.Thresholds(), ref)
  assert score > 1 and "off centre" in detail
  assert "torch" not in sys.modules


@needs_mtcnn
def test_audit_finds_the_planted_problems(planted_set):
  """Every check but the label model (whose suspects need a trained model; see
  test_label_findings_flag_the_swapped_labels) on the planted set."""
  out, planted = planted_set
  before = _digests(out)
  settings = auditor.AuditSettings(checks=(F.BLUR, F.EXPOSURE, F.FRAMING, F.DUPLICATE),
                                   workers=2)
  result = auditor.run_audit(out, settings, progress=False)
  scores = planting.score_findings(result.findings, planted,
                                   kinds=(F.BLUR, F.EXPOSURE, F.DUPLICATE, F.FRAMING))
  for kind in (F.BLUR, F.EXPOSURE, F.DUPLICATE):
    assert scores[kind]["recall"] == 1.0, (kind, scores[kind])
    assert scores[kind]["precision"] == 1.0, (kind, scores[kind])
  # MTCNN misses a few synthetic (cartoon) faces: a false "no face" now and then.
  assert scores[F.FRAMING]["recall"] == 1.0, scores[F.FRAMING]
  assert scores[F.FRAMING]["precision"] >= 0.5, scores[F.FRAMING]
  # Its outputs, and nothing of the user's changed.
  assert _digests(out) == before
  def key(f):
    return (f.path, f.kind, f.suggestion, f.detail, f.related, round(f.score, 4))
  assert [key(f) for f in F.read_findings(result.findings_path)] == [
      key(f) for f in result.findings]
  audit = os.path.join(out, "audit")
  for name in ("index.html", "blur.html", "balance.csv", "summary.json",
               "measure_laplacian_var.png"):
    assert os.path.isfile(os.path.join(audit, name)), name


def _reviewed(findings_list, decisions):
  out = []
  for f in findings_list:
    d = decisions.get((f.path, f.kind))
    if d:
      f = F.Finding(**{**f.__dict__, "decision": d[0], "new_expression": d[1]})
    out.append(f)
  return out


def test_apply_writes_a_cleaned_manifest_beside_the_old_one(clean_set, tmp_path):
  records = contract.read_manifest(clean_set)
  a, b, c = records[0].path, records[1].path, records[2].path
  found = [F.Finding(a, F.BLUR, 2.0, detail="var 3 < 20"),
           F.Finding(a, F.DUPLICATE, 1.0),
           F.Finding(b, F.LABEL, 0.9, suggestion="relabel:surprise", detail="model says"),
           F.Finding(c, F.EXPOSURE, 0.5)]
  reviewed = _reviewed(found, {(a, F.BLUR): ("keep", ""), (a, F.DUPLICATE): ("drop", ""),
                               (b, F.LABEL): ("relabel", "surprise")})
  csv_path = str(tmp_path / "reviewed.csv")
  F.write_findings(csv_path, reviewed)
  before = _digests(clean_set)
  done = apply_lib.apply_decisions(clean_set, csv_path)
  assert _digests(clean_set) == {**before, **{k: v for k, v in _digests(clean_set).items()
                                              if k.startswith("manifest.cleaned")}}
  assert (done.kept, done.dropped, done.relabelled, done.undecided) == (
      len(records) - 1, 1, 1, 1)
  cleaned = data_lib.load_face_set(done.manifest)
  assert cleaned.data_dir == os.path.abspath(clean_set)
  by_path = {r.path: r for r in cleaned.records}
  assert a not in by_path
  assert by_path[b].expression == "surprise"
  assert by_path[c].expression == records[2].expression  # undecided: kept as is
  assert cleaned.images(32).shape == (len(records) - 1, 32, 32, 1)
  with open(done.changes) as f:
    changes = f.read()
  assert a in changes and "drop" in changes and "surprise" in changes
  # Never overwrites: not the original manifest, not an earlier cleaned one.
  with pytest.raises(UserError, match="exists"):
    apply_lib.apply_decisions(clean_set, csv_path)
  with pytest.raises(UserError, match="original manifest"):
    apply_lib.apply_decisions(clean_set, csv_path, output="manifest.csv")


def test_apply_refuses_conflicts_and_strangers(clean_set, tmp_path):
  path = contract.read_manifest(clean_set)[0].path
  found = [F.Finding(path, F.LABEL, 0.9), F.Finding(path, F.DUPLICATE, 1.0)]
  conflicting = _reviewed(found, {(path, F.LABEL): ("relabel", "anger"),
                                  (path, F.DUPLICATE): ("relabel", "fear")})
  csv_path = str(tmp_path / "r.csv")
  F.write_findings(csv_path, conflicting)
  with pytest.raises(DataError, match="relabelled both"):
    apply_lib.apply_decisions(clean_set, csv_path, output="x.csv")
  F.write_findings(csv_path, [F.Finding("nope/none.png", F.BLUR, 1.0, decision="drop")])
  with pytest.raises(DataError, match="not in the manifest"):
    apply_lib.apply_decisions(clean_set, csv_path, output="y.csv")
  assert not os.path.exists(os.path.join(clean_set, "x.csv"))


def test_a_reviewed_findings_csv_is_kept_when_the_audit_runs_again(clean_set, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path / "faces")
  shutil.copytree(clean_set, data_dir, ignore=shutil.ignore_patterns("audit"))
  settings = auditor.AuditSettings(checks=(F.BLUR, F.EXPOSURE))
  first = auditor.run_audit(data_dir, settings, progress=False)
  person = [F.Finding("x.png", F.BLUR, 1.0, decision="drop")]
  F.write_findings(first.findings_path, person)
  auditor.run_audit(data_dir, settings, progress=False)
  kept = [n for n in os.listdir(os.path.join(data_dir, "audit"))
          if n.startswith("findings.reviewed-")]
  assert len(kept) == 1
  assert F.read_findings(os.path.join(data_dir, "audit", kept[0])) == person


def test_cli_audits_and_reports_bad_input_in_one_line(planted_set, tmp_path):
  out, _ = planted_set
  env = dict(os.environ, PYTHONPATH=REPO)
  bad = subprocess.run([sys.executable, "-m", "data_tools.audit",
                        f"--data_dir={tmp_path / 'missing'}", "--checks=blur"],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
  assert bad.returncode == 2
  assert bad.stderr.strip().startswith("error:") and len(bad.stderr.strip().splitlines()) == 1
  bad = subprocess.run([sys.executable, "-m", "data_tools.audit", f"--data_dir={out}",
                        "--checks=blur,typo"],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
  assert bad.returncode == 2 and "typo" not in bad.stdout and "--checks" in bad.stderr
