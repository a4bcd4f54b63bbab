"""Tests of the MTCNN preprocessing tool (data_tools.preprocess and its parts).

The face-selection rules, the worker's non-detector paths, the detector's
coordinate handling and the resumable bookkeeping are tested in this process
without torch (the alignment itself: test_face_alignment.py). Everything that
runs MTCNN runs in a subprocess: torch must not share a process with
TensorFlow (other test modules import it), and pytest collects every module
into one process.
"""

import csv
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from data_tools import face_quality
from data_tools import preprocess
from data_tools import preprocess_pool
from data_tools import preprocess_runs
from dicefer_jax import contract
from dicefer_jax import face_alignment
from dicefer_jax import face_detector
from dicefer_jax.errors import DataError, UserError
from dicefer_jax.face_alignment import FACE_TEMPLATE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=REPO, TF_ENABLE_ONEDNN_OPTS="0")
SETTINGS = face_quality.Settings()


def test_names_other_modules_use_stay_in_preprocess():
  """Catches a split that breaks data_tools.import_dataset, the importers or
  the benchmark, which take these from data_tools.preprocess."""
  for name in ("run_preprocess", "DEVICES", "MULTI_FACE_POLICIES",
               "DEFAULT_MAX_DISTORTION", "IMAGE_EXTENSIONS", "scan_folder_tree",
               "Settings", "main"):
    assert hasattr(preprocess, name), name
  assert preprocess.DEVICES == ("auto", "cpu", "cuda")
  assert preprocess.Settings is face_quality.Settings


def _face(x0, y0, size, prob):
  # A box and landmarks of a plausible frontal face at (x0, y0).
  landmarks = [x0, y0] + (FACE_TEMPLATE - 8) * size / 96
  return [x0, y0, x0 + size, y0 + size], prob, landmarks


def _detections(*faces, as_objects=True):
  boxes, probs, points = (np.array([f[i] for f in faces], dtype=np.float64)
                          for i in range(3))
  if as_objects:  # Like facenet-pytorch 2.5.3.
    boxes, probs, points = (a.astype(object) for a in (boxes, probs, points))
  return boxes, probs, points


def size_scale(landmarks):
  return (landmarks[1, 0] - landmarks[0, 0]) / 32


def test_decide_reasons():
  assert face_quality.decide(None, np.array([None], object), None, SETTINGS).reason == (
      face_quality.NO_FACE)
  low = face_quality.decide(*_detections(_face(10, 10, 100, 0.5)), SETTINGS)
  assert low.reason == face_quality.LOW_PROBABILITY and "0.500" in low.detail
  small = face_quality.decide(*_detections(_face(10, 10, 30, 0.99)), SETTINGS)
  assert small.reason == face_quality.TOO_SMALL
  kept = face_quality.decide(*_detections(_face(10, 10, 100, 0.99), as_objects=False),
                           SETTINGS)
  assert kept.status == face_quality.KEPT and kept.landmarks.shape == (5, 2)

  box, prob, landmarks = _face(10, 10, 100, 0.99)
  swapped = landmarks[[1, 0, 2, 4, 3]]  # Left and right exchanged.
  assert face_quality.decide(*_detections((box, prob, swapped)), SETTINGS).reason == (
      face_quality.IMPLAUSIBLE)
  outside = landmarks.copy()
  outside[2] = [400, 400]
  assert face_quality.decide(*_detections((box, prob, outside)), SETTINGS).reason == (
      face_quality.IMPLAUSIBLE)
  # A head turned 80 degrees: the face squeezed sideways, the nose tip (in
  # front of the eyes) and mouth shifted towards the turn.
  depth = np.array([0.0, 0.0, 0.6, 0.1, 0.1]) * 32 * size_scale(landmarks)
  turned = landmarks.copy()
  centre = landmarks[:, 0].mean()
  turned[:, 0] = centre + (landmarks[:, 0] - centre) * np.cos(np.deg2rad(80)) + (
      depth * np.sin(np.deg2rad(80)))
  decision = face_quality.decide(*_detections((box, prob, turned)), SETTINGS)
  assert decision.reason == face_quality.DISTORTED, decision


def test_decide_multi_face_policies():
  big = _face(200, 10, 120, 0.95)
  sure = _face(10, 10, 80, 0.999)
  tiny = _face(10, 150, 20, 0.999)  # Below min_face_size: never counts.
  dets = _detections(big, sure, tiny)

  def pick(policy):
    return face_quality.decide(*dets, face_quality.Settings(multi_face=policy))

  assert pick("largest").landmarks[0, 0] > 200
  assert pick("most_confident").landmarks[0, 0] < 200
  several = pick("reject")
  assert several.reason == face_quality.SEVERAL_FACES and "2 faces" in several.detail
  assert face_quality.decide(*_detections(big, tiny),
                           face_quality.Settings(multi_face="reject")).status == "kept"


def test_read_image_rejects_truncated_files(tmp_path):
  path = str(tmp_path / "x.jpg")
  cv2.imwrite(path, np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
  assert preprocess_pool.read_image(path).shape == (64, 64, 3)
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(preprocess_pool.UnreadableImage, match="truncated"):
    preprocess_pool.read_image(path)


def test_scan_folder_tree(tmp_path):
  raw = tmp_path / "RAW"
  for rel in ("Happy/a.jpg", "Happy/s7/b.PNG", "sad/c.png", "Contempt/d.png"):
    (raw / rel).parent.mkdir(parents=True, exist_ok=True)
    (raw / rel).write_bytes(b"x")
  (raw / "Happy" / "notes.txt").write_text("x")
  (raw / "capture_manifest.csv").write_text(
      "path,expression,subject,timestamp\nHappy/a.jpg,happiness,alice,t\n")
  scan = preprocess.scan_folder_tree(str(raw), subject_from_dir=True)
  got = {(os.path.relpath(r.path, raw), r.expression, r.subject, r.source)
         for r in scan.records}
  assert got == {("Happy/a.jpg", "happiness", "alice", "RAW"),
                 ("Happy/s7/b.PNG", "happiness", "s7", "RAW"),
                 ("sad/c.png", "sadness", "", "RAW")}
  assert all(os.path.isabs(r.path) for r in scan.records)
  assert scan.dropped == {"Contempt": 1} and scan.ignored == 1

  (raw / "Bored").mkdir()
  with pytest.raises(DataError, match="Bored"):
    preprocess.scan_folder_tree(str(raw))
  with pytest.raises(DataError, match="not a directory"):
    preprocess.scan_folder_tree(str(tmp_path / "missing"))


def test_run_preprocess_checks_records(tmp_path):
  with pytest.raises(DataError, match="none of the 1 input photos exist"):
    preprocess.run_preprocess([contract.Record("nope.jpg", "fear")], str(tmp_path / "o"))
  photo = tmp_path / "p.jpg"
  photo.write_bytes(b"x")
  with pytest.raises(DataError, match="both"):
    preprocess.run_preprocess([contract.Record(str(photo), "fear"),
                               contract.Record(str(photo), "anger")], str(tmp_path / "o"))
  with pytest.raises(DataError, match="unknown expression"):
    preprocess.run_preprocess([contract.Record(str(photo), "Happy")], str(tmp_path / "o"))


def test_resume_bookkeeping_without_torch(tmp_path):
  # A progress log as a killed run leaves it: rows done, the last one cut
  # short. With everything done, no worker (and no torch) is started.
  out = tmp_path / "out"
  (out / "fear").mkdir(parents=True)
  photos = []
  for name in ("a", "b"):
    photos.append(tmp_path / f"{name}.jpg")
    photos[-1].write_bytes(b"raw")
  face_rel = preprocess_runs.output_name(str(photos[0]), "fear")
  cv2.imwrite(str(out / face_rel), np.zeros((112, 112), np.uint8))
  (out / "fear" / ".tmp-123-dead-x.png").write_bytes(b"half")
  with open(out / preprocess_runs.PROGRESS_NAME, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(preprocess_runs.PROGRESS_FIELDS)
    writer.writerow([str(photos[0]), "fear", "", "", "", "kept", face_rel, "", "p=1"])
    writer.writerow([str(photos[1]), "fear", "", "", "", "rejected", "", "no_face", ""])
    f.write(f"{tmp_path}/c.jpg,fear,,,,ke")  # Cut short by kill -9.
  items = [contract.Record(str(p), "fear", subject="s1", source="t") for p in photos]
  summary = preprocess.run_preprocess(items, str(out), show_progress=False)
  assert summary["skipped"] == 2 and summary["kept"] == summary["rejected"] == 0
  records = contract.read_manifest(str(out))
  assert [(r.path, r.expression, r.subject, r.source) for r in records] == [
      (face_rel, "fear", "s1", "t")]
  with open(out / preprocess_runs.REJECTS_NAME, newline="") as f:
    (reject,) = list(csv.DictReader(f))
  assert reject["input"] == str(photos[1]) and reject["reason"] == "no_face"
  assert not (out / "fear" / ".tmp-123-dead-x.png").exists()
  assert photos[0].read_bytes() == b"raw"
  # The log stays appendable after the cut row.
  with open(out / preprocess_runs.PROGRESS_NAME) as f:
    assert f.read().endswith("\n")


def test_relabelled_photo_is_redone_and_its_old_face_removed(tmp_path):
  """Catches a relabelled photo's old face staying in the manifest under its
  old class, or a done photo being redone."""
  out = tmp_path / "out"
  photos = {name: str(tmp_path / f"{name}.jpg") for name in ("kept", "moved", "failed")}
  old_face = preprocess_runs.output_name(photos["moved"], "fear")
  kept_face = preprocess_runs.output_name(photos["kept"], "fear")
  for rel in (old_face, kept_face):
    (out / rel).parent.mkdir(parents=True, exist_ok=True)
    (out / rel).write_bytes(b"png")
  state = {photos["kept"]: {"status": "kept", "expression": "fear", "output": kept_face},
           photos["moved"]: {"status": "kept", "expression": "fear", "output": old_face},
           photos["failed"]: {"status": "error", "expression": "fear", "output": ""}}
  wanted = {photos["kept"]: contract.Record(photos["kept"], "fear"),
            photos["moved"]: contract.Record(photos["moved"], "anger"),
            photos["failed"]: contract.Record(photos["failed"], "fear")}
  todo, skipped = preprocess_runs.pending_inputs(wanted, state, str(out))
  assert sorted(todo) == sorted([photos["moved"], photos["failed"]]) and skipped == 1
  assert not (out / old_face).exists() and (out / kept_face).exists()


def test_worker_answers_unusable_photos_without_building_mtcnn(tmp_path):
  """Catches a worker that builds MTCNN (seconds, torch) for photos it can
  refuse anyway, or that reports them with the wrong status: a missing file
  is an error (retried), an unreadable or tiny one a final reject."""
  preprocess_pool.init_worker(face_quality.Settings(min_face_size=40), None)
  truncated = tmp_path / "t.jpg"
  truncated.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  tiny = str(tmp_path / "tiny.png")
  cv2.imwrite(tiny, np.zeros((30, 200, 3), np.uint8))
  results = {name: preprocess_pool.process_task((path, str(tmp_path / "o"), "fear/x.png"))
             for name, path in (("missing", str(tmp_path / "nope.jpg")),
                                ("unreadable", str(truncated)), ("tiny", tiny))}
  assert (results["missing"]["status"], results["missing"]["reason"]) == ("error", "missing")
  assert (results["unreadable"]["status"], results["unreadable"]["reason"]) == (
      "rejected", "unreadable")
  assert (results["tiny"]["status"], results["tiny"]["reason"]) == ("rejected", "too_small")
  assert "200x30" in results["tiny"]["detail"]
  assert all(r["output"] == "" and r["device"] == "" for r in results.values())
  assert "detector" not in preprocess_pool._worker_state  # pylint: disable=protected-access
  assert not (tmp_path / "o").exists()


class _RecordingMTCNN:
  """Stands in for facenet-pytorch's MTCNN: one face in the middle of whatever
  it is given, as object arrays like facenet-pytorch 2.5.3 returns."""

  def __init__(self):
    self.seen_shapes = []

  def detect(self, image, landmarks):
    assert landmarks
    self.seen_shapes.append(image.shape)
    h, w = image.shape[:2]
    box = np.array([[w / 4, h / 4, 3 * w / 4, 3 * h / 4]], dtype=object)
    points = np.array([[[w / 2, h / 2]] * 5], dtype=object)
    return box, np.array([0.99], dtype=object), points


def _fake_detector(min_face_size=12):
  # The detection logic without the network: torch must stay out of this
  # process (see the module docstring).
  detector = face_detector.MTCNNDetector.__new__(face_detector.MTCNNDetector)
  detector.device, detector.min_face_size = "cpu", min_face_size
  detector.max_side = face_detector.DETECT_MAX_SIDE
  detector._mtcnn = _RecordingMTCNN()  # pylint: disable=protected-access
  return detector


def test_detector_reports_big_photos_in_their_own_pixels():
  """Catches boxes and landmarks left in the coordinates of the downscaled
  copy MTCNN sees: alignment samples the full photo, and would cut a face
  from the wrong place."""
  detector = _fake_detector()
  boxes, probs, points = detector.detect(np.zeros((3000, 4000, 3), np.uint8))
  assert detector._mtcnn.seen_shapes == [(768, 1024, 3)]  # pylint: disable=protected-access
  np.testing.assert_allclose(boxes, [[1000, 750, 3000, 2250]], rtol=1e-6)
  np.testing.assert_allclose(points[0], [[2000, 1500]] * 5, rtol=1e-6)
  assert boxes.dtype == probs.dtype == points.dtype == np.float64
  # A small photo is passed on as it is.
  boxes, _, _ = detector.detect(np.zeros((300, 200, 3), np.uint8))
  assert detector._mtcnn.seen_shapes[-1] == (300, 200, 3)  # pylint: disable=protected-access
  np.testing.assert_allclose(boxes, [[50, 75, 150, 225]])


def test_detector_skips_photos_below_its_smallest_face_and_refuses_non_rgb():
  """Catches the facenet-pytorch crash on images smaller than its smallest
  face (an empty image pyramid), and gray or float images passed through."""
  detector = _fake_detector(min_face_size=20)
  assert detector.detect(np.zeros((19, 400, 3), np.uint8)) == (None, None, None)
  assert not detector._mtcnn.seen_shapes  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="RGB"):
    detector.detect(np.zeros((100, 100), np.uint8))
  with pytest.raises(ValueError, match="RGB"):
    detector.detect(np.zeros((100, 100, 3), np.float32))


def test_detector_refuses_an_unknown_device_before_importing_torch():
  """Catches a typo'd device reaching torch (an obscure torch error)."""
  with pytest.raises(UserError, match="gpu"):
    face_detector.MTCNNDetector(device="gpu")


def test_import_does_not_load_torch():
  """Catches a module-level torch import in any part of the tool: the
  importers and training processes import it next to TensorFlow."""
  code = ("import sys, data_tools.preprocess, data_tools.preprocess_pool, "
          "data_tools.preprocess_runs, data_tools.face_quality; "
          "assert 'torch' not in sys.modules and 'facenet_pytorch' not in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=ENV,
                 timeout=60)


# --------------------------------------------------------------------------
# With MTCNN, on a real face (scikit-image's astronaut portrait).

_DETECT_SCRIPT = r"""
import json, sys
import cv2, numpy as np
from skimage import data
from data_tools import face_quality
from dicefer_jax.face_detector import MTCNNDetector
settings = face_quality.Settings()
detector = MTCNNDetector(min_face_size=settings.detector_min_face, device="cpu",
                         torch_threads=1)
detect = detector.detect

img = data.astronaut()
boxes, probs, points = detect(img)
report = {"boxes": boxes.tolist(), "probs": probs.tolist(), "points": points.tolist(),
          "device": detector.device}
# The same photo 4x as large: detected on a downscaled copy, reported in its
# own pixels.
_, _, big_points = detect(cv2.resize(img, (2048, 2048), interpolation=cv2.INTER_CUBIC))
report["big_points"] = big_points.tolist()
face = cv2.imread(sys.argv[1], cv2.IMREAD_UNCHANGED)
_, _, redetected = detect(cv2.cvtColor(face, cv2.COLOR_GRAY2RGB))
report["redetected"] = None if redetected is None else redetected.tolist()
# Two faces side by side: the multi-face policies on real detections.
crop = img[40:300, 110:340]
pair = np.ascontiguousarray(np.hstack([crop, crop]))
dets = detect(pair)
report["pair_faces"] = 0 if dets[0] is None else len(dets[0])
for policy in face_quality.MULTI_FACE_POLICIES:
  report[policy] = face_quality.decide(*dets, face_quality.Settings(multi_face=policy)).status
print(json.dumps(report))
"""


def _run_cli(raw, out, *extra):
  return subprocess.run(
      [sys.executable, "-m", "data_tools.preprocess", f"--input_dir={raw}",
       f"--output_dir={out}", "--workers=1", "--device=cpu", *extra],
      capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300)


def _snapshot(folder):
  files = {}
  for root, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        files[os.path.relpath(path, folder)] = (f.read(), os.stat(path).st_mtime_ns)
  return files


@pytest.fixture(scope="module")
def raw_photos(tmp_path_factory):
  from skimage import data  # pylint: disable=g-import-not-at-top
  raw = tmp_path_factory.mktemp("faces") / "RAW"
  (raw / "Happy").mkdir(parents=True)
  (raw / "Sad").mkdir()
  astronaut = data.astronaut()[:, :, ::-1]  # RGB -> BGR for cv2.
  cv2.imwrite(str(raw / "Happy" / "astronaut.png"), astronaut)
  cv2.imwrite(str(raw / "Happy" / "astronaut_300.jpg"),
              cv2.resize(astronaut, (300, 300), interpolation=cv2.INTER_AREA))
  gradient = np.tile(np.linspace(0, 255, 200, dtype=np.uint8), (200, 1))
  cv2.imwrite(str(raw / "Sad" / "gradient.png"), gradient)
  ok, jpeg = cv2.imencode(".jpg", astronaut)
  (raw / "Sad" / "truncated.jpg").write_bytes(jpeg.tobytes()[:len(jpeg) // 2])
  (raw / "capture_manifest.csv").write_text(
      "path,expression,subject,timestamp\nHappy/astronaut.png,happiness,eileen,t\n")
  return raw


def _require_mtcnn():
  # Not pytest.importorskip: that imports facenet_pytorch (and torch, triton)
  # into this process, which segfaults once another test module has imported
  # TensorFlow. mtcnn_installed only looks.
  if not face_detector.mtcnn_installed():
    pytest.skip("facenet-pytorch is not installed (pip install 'dicefer-jax[data]')")


def test_mtcnn_on_a_real_face(raw_photos, tmp_path):
  _require_mtcnn()
  before = _snapshot(raw_photos)
  out = tmp_path / "faces"
  res = _run_cli(raw_photos, out)
  assert res.returncode == 0, res.stderr
  assert "kept 2, rejected 2" in res.stdout

  records = {os.path.basename(r.path).split("-")[0]: r
             for r in contract.read_manifest(str(out))}
  assert set(records) == {"astronaut", "astronaut_300"}
  assert records["astronaut"].subject == "eileen"
  assert records["astronaut_300"].subject == ""
  for r in records.values():
    assert r.expression == "happiness" and r.source == "RAW" and r.split == ""
    assert r.path.startswith("happiness/") and r.path.endswith(".png")
    face = cv2.imread(str(out / r.path), cv2.IMREAD_UNCHANGED)
    assert face.shape == (112, 112) and face.dtype == np.uint8
  with open(out / "rejects.csv", newline="") as f:
    rejects = {os.path.basename(r["input"]): r["reason"] for r in csv.DictReader(f)}
  assert rejects == {"gradient.png": "no_face", "truncated.jpg": "unreadable"}

  # The detections themselves, and the aligned face re-detected.
  res = subprocess.run(
      [sys.executable, "-c", _DETECT_SCRIPT, str(out / records["astronaut"].path)],
      capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300)
  assert res.returncode == 0, res.stderr
  report = json.loads(res.stdout.strip().splitlines()[-1])
  assert len(report["boxes"]) == 1 and report["probs"][0] > 0.99
  assert report["device"] == "cpu"
  np.testing.assert_allclose(np.array(report["big_points"][0]) / 4, report["points"][0],
                             atol=3.0)
  (left_eye, right_eye, nose, mouth_left, mouth_right), = report["points"]
  x0, y0, x1, y1 = report["boxes"][0]
  assert left_eye[0] < right_eye[0] and mouth_left[0] < mouth_right[0]
  assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])
  assert all(x0 <= x <= x1 and y0 <= y <= y1 for x, y in report["points"][0])
  m, distortion = face_alignment.similarity_to_template(report["points"][0])
  aligned = face_alignment.transform_points(m, report["points"][0])
  assert abs(aligned[0, 1] - aligned[1, 1]) < 2.0 and distortion < 0.3
  # MTCNN finds the face again in the 112x112 output, eyes level and where
  # the template puts them.
  assert report["redetected"] is not None
  eyes = np.array(report["redetected"][0][:2])
  assert abs(eyes[0, 1] - eyes[1, 1]) < 2.0
  np.testing.assert_allclose(eyes, FACE_TEMPLATE[:2], atol=4.0)
  assert report["pair_faces"] == 2
  assert report["largest"] == report["most_confident"] == "kept"
  assert report["reject"] == "rejected"

  # A run killed mid-way: the log cut after the first row, mid-way through
  # the second, the manifest gone. The rerun finishes the rest.
  faces_before = {k: v[0] for k, v in _snapshot(out).items() if k.endswith(".png")}
  progress = out / preprocess_runs.PROGRESS_NAME
  lines = progress.read_text().splitlines(keepends=True)
  progress.write_text("".join(lines[:2]) + lines[2][:20])
  os.remove(out / "manifest.csv")
  res = _run_cli(raw_photos, out)
  assert res.returncode == 0, res.stderr
  assert "skipped 1 already done" in res.stdout
  assert len(contract.read_manifest(str(out))) == 2
  faces_after = {k: v[0] for k, v in _snapshot(out).items() if k.endswith(".png")}
  assert faces_after == faces_before  # Deterministic, same names.

  # Everything done: a rerun starts no MTCNN at all.
  res = _run_cli(raw_photos, out)
  assert res.returncode == 0, res.stderr
  assert "kept 0, rejected 0, errors 0, skipped 4" in res.stdout
  assert _snapshot(raw_photos) == before  # Inputs never touched.


def test_cli_errors_are_one_line(tmp_path):
  res = _run_cli(tmp_path / "missing", tmp_path / "out")
  assert res.returncode == 2
  assert res.stderr.strip().count("\n") == 0 and "not a directory" in res.stderr
  (tmp_path / "RAW" / "Bored").mkdir(parents=True)
  res = _run_cli(tmp_path / "RAW", tmp_path / "out")
  assert res.returncode == 2 and "Bored" in res.stderr
  res = _run_cli(tmp_path / "RAW", tmp_path / "RAW" / "out")
  assert res.returncode == 2 and "inside" in res.stderr
