"""Tests of prediction: dicefer_jax.Predictor, the tracker/smoother and experiments.predict.

One tiny workdir is trained once for the module. Everything that runs MTCNN
(torch) runs in one subprocess (`mtcnn_report`): torch next to TensorFlow,
which other test modules import into this process, segfaults.
"""

import csv
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from dicefer_jax import config_fields, contract, face_images, train
from dicefer_jax import workdir as workdir_lib
from dicefer_jax.errors import UserError
from dicefer_jax.predictor import Predictor
from dicefer_jax.tracking import iou, ProbabilitySmoother
from experiments.configs import default

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=REPO, TF_ENABLE_ONEDNN_OPTS="0", TF_CPP_MIN_LOG_LEVEL="2")


@pytest.fixture(scope="module")
def predictor(trained_workdir):
  return Predictor.from_workdir(trained_workdir)


def _faces(num, seed=1):
  return np.random.default_rng(seed).integers(0, 256, (num, 112, 112), dtype=np.uint8)


# --------------------------------------------------------------------------
# The Python API on aligned faces (no MTCNN).


def test_predict_faces_is_the_softmax_of_training_predict(trained_workdir, predictor):
  """Catches prediction that resizes, standardises or picks the head differently
  from training (`train.predict` on the same images), or scrambles the class
  order or the rows."""
  faces = _faces(5)
  probs = predictor.predict_faces(faces)
  config = workdir_lib.read_config(trained_workdir, default.get_config())
  model, state = train.restore_trained(config, trained_workdir)
  images = np.stack([face_images.resize_square(f, config.image_size) for f in faces])[..., None]
  logits = train.predict(config, model, state, images)["logits"]
  expected = np.exp(logits - logits.max(-1, keepdims=True))
  expected /= expected.sum(-1, keepdims=True)
  assert probs.dtype == np.float32 and probs.shape == (5, contract.NUM_CLASSES)
  np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  # The data contract's (N, 112, 112, 1) is the same input.
  np.testing.assert_array_equal(predictor.predict_faces(faces[..., None]), probs)


def test_padding_and_buckets_do_not_change_probabilities(trained_workdir, predictor):
  """Catches padding rows leaking into real ones, rows cut off wrongly, long
  inputs not split into max_batch chunks, or a compile per call instead of
  per power-of-two bucket."""
  faces = _faces(3, seed=2)
  together = predictor.predict_faces(faces)
  alone = np.concatenate([predictor.predict_faces(f[None]) for f in faces])
  np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)
  predictor.predict_faces(_faces(4, seed=3))      # same bucket as 3: no new compile
  assert {1, 4} <= predictor.compiled_batch_sizes and 3 not in predictor.compiled_batch_sizes
  small = Predictor.from_workdir(trained_workdir, max_batch=2)
  np.testing.assert_allclose(small.predict_faces(faces), together, rtol=1e-5, atol=1e-6)
  assert small.compiled_batch_sizes == {1, 2}   # chunks of 2 and 1, never above max_batch
  assert predictor.predict_faces(np.zeros((0, 112, 112), np.uint8)).shape == (0, 7)


def test_bad_faces_are_one_line_user_errors(predictor):
  """Catches a photo or float array passed as faces reaching XLA as a shape error."""
  for bad in (np.zeros((2, 64, 64), np.uint8), np.zeros((2, 112, 112), np.float32),
              np.zeros((112, 112, 3), np.uint8)):
    with pytest.raises(UserError, match="uint8"):
      predictor.predict_faces(bad)


def test_embed_gives_each_code_per_face(trained_workdir, predictor):
  """Catches embed returning codes of the wrong encoder or shape."""
  config = workdir_lib.read_config(trained_workdir)
  out = predictor.embed(_faces(3))
  assert set(out) == {"z_exp", "z_id", "feature"}
  assert out["z_exp"].shape == (3, config.model.exp_dim)
  assert out["z_id"].shape == (3, config.model.id_dim)
  assert out["feature"].shape[0] == 3 and out["feature"].ndim == 2
  assert not np.allclose(out["z_exp"][0], out["z_exp"][1])


def test_read_config_without_defaults_restores_tuples(trained_workdir):
  """Catches a config read without defaults keeping JSON lists (ConfigDict then
  differs from the saved config and refuses later tuple assignments)."""
  as_saved = workdir_lib.read_config(trained_workdir)
  with_defaults = workdir_lib.read_config(trained_workdir, default.get_config())
  assert as_saved.model.classifier_hidden == (16,)
  assert config_fields.differences(as_saved, with_defaults) == []


def test_cli_refuses_to_overwrite_an_existing_output(trained_workdir, tmp_path):
  """Catches a rerun that silently replaces a results file a user kept."""
  output = tmp_path / "kept.csv"
  output.write_text("mine\n")
  image = tmp_path / "x.png"
  cv2.imwrite(str(image), np.zeros((50, 50), np.uint8))
  result = subprocess.run(
      [sys.executable, "-m", "experiments.predict", f"--workdir={trained_workdir}",
       f"--input={image}", f"--output={output}"],
      capture_output=True, text=True, cwd=REPO, env=ENV, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      f"error: --output={output} exists: pass --overwrite to replace it, or choose "
      "another file"]
  assert output.read_text() == "mine\n"


# --------------------------------------------------------------------------
# The smoother, on synthetic sequences.


def test_smoothing_over_one_frame_changes_nothing():
  """Catches --smooth=1 altering probabilities (it must be the identity)."""
  rng = np.random.default_rng(0)
  smoother = ProbabilitySmoother(1)
  for _ in range(4):
    probs = rng.dirichlet(np.ones(7), size=2).astype(np.float32)
    _, out = smoother.update([[0, 0, 10, 10], [50, 50, 60, 60]], probs)
    np.testing.assert_array_equal(out, probs)


def test_smoothing_averages_each_tracked_face_over_its_window():
  """Catches averaging across different faces, a window longer or shorter than
  N, or a track that survives a frame without its face."""
  smoother = ProbabilitySmoother(2)
  left, right = [0, 0, 10, 10], [100, 0, 110, 10]
  a0, b0, a1, b1, a2 = (np.eye(7, dtype=np.float32)[i] for i in range(5))
  ids0, out0 = smoother.update([left, right], [a0, b0])
  np.testing.assert_array_equal(out0, [a0, b0])
  # The faces swap order in the list and move a little: matched by IoU, not index.
  ids1, out1 = smoother.update([[101, 1, 111, 11], [1, 0, 11, 10]], [b1, a1])
  assert ids1 == [ids0[1], ids0[0]]
  np.testing.assert_allclose(out1, [(b0 + b1) / 2, (a0 + a1) / 2])
  # Window 2: frame 0 has left the average.
  _, out2 = smoother.update([[2, 0, 12, 10]], [a2])
  np.testing.assert_allclose(out2, [(a1 + a2) / 2])
  smoother.update(np.zeros((0, 4)), np.zeros((0, 7)))   # a frame without faces
  ids4, out4 = smoother.update([[2, 0, 12, 10]], [a0])
  assert ids4[0] not in ids0 + ids1
  np.testing.assert_array_equal(out4, [a0])
  assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(1 / 3)


# --------------------------------------------------------------------------
# With MTCNN, in one subprocess: scikit-image's astronaut portrait.

_MTCNN_SCRIPT = r"""
import json, os, sys
import cv2, numpy as np
from skimage import data
from data_tools import face_quality, preprocess_pool
from dicefer_jax import Predictor
from experiments import predict as predict_cli

workdir, root = sys.argv[1], sys.argv[2]
report = {}
photo = os.path.join(root, "astronaut.png")
cv2.imwrite(photo, data.astronaut()[:, :, ::-1])
predictor = Predictor.from_workdir(workdir)
faces = np.zeros((2, 112, 112), np.uint8)
predictor.predict_faces(faces); predictor.embed(faces)
report["heavy_before_detection"] = [
    m for m in ("torch", "facenet_pytorch", "tensorflow") if m in sys.modules]
found = predictor.predict_image(photo)
report["torch_after_detection"] = "torch" in sys.modules
report["num_faces"] = len(found)
face = found[0]
# Preprocessing's own worker, with its default settings, on the same file.
preprocess_pool.init_worker(face_quality.Settings(), 1)
kept = preprocess_pool.process_one(photo, os.path.join(root, "set"), "happiness/a.png")
report["preprocess_status"] = kept["status"]
expected = cv2.imread(os.path.join(root, "set", "happiness/a.png"), cv2.IMREAD_UNCHANGED)
report["crop_equal"] = bool(np.array_equal(face.face, expected))
report["probs_of_crop_equal"] = bool(np.allclose(
    face.probabilities, predictor.predict_faces(expected[None])[0], atol=1e-6))
report["face"] = {"box": face.box, "landmarks_shape": list(face.landmarks.shape),
                  "det_score": face.det_score, "expression": face.expression,
                  "probs_sum": float(face.probabilities.sum())}
report["array_input_same"] = bool(np.array_equal(
    predictor.predict_image(data.astronaut())[0].face, face.face))

# A folder: two resized copies, one blank image, one corrupt file.
folder = os.path.join(root, "photos")
os.makedirs(os.path.join(folder, "sub"))
rgb = data.astronaut()
cv2.imwrite(os.path.join(folder, "a.jpg"), cv2.resize(rgb, (250, 250))[:, :, ::-1])
cv2.imwrite(os.path.join(folder, "sub", "b.png"), cv2.resize(rgb, (300, 300))[:, :, ::-1])
cv2.imwrite(os.path.join(folder, "blank.png"), np.full((200, 200, 3), 90, np.uint8))
with open(os.path.join(folder, "corrupt.jpg"), "wb") as f:
  f.write(b"\xff\xd8\xff\xe0 not a jpeg")
predict_cli.predict(workdir, folder, os.path.join(root, "folder.csv"), show_progress=False,
                    annotate_dir=os.path.join(root, "annotated"))
report["annotated"] = sorted(os.path.relpath(os.path.join(d, n), os.path.join(root, "annotated"))
                             for d, _, ns in os.walk(os.path.join(root, "annotated")) for n in ns)

# A video: 3 frames with the face (moving a few pixels), 2 blank ones.
video = os.path.join(root, "clip.avi")
writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"MJPG"), 10, (250, 250))
big = cv2.resize(rgb, (260, 260))[:, :, ::-1]
for shift in (0, 4, 8):
  writer.write(np.ascontiguousarray(big[shift:shift + 250, shift:shift + 250]))
for _ in range(2):
  writer.write(np.full((250, 250, 3), 30, np.uint8))
writer.release()
predict_cli.predict(workdir, video, os.path.join(root, "clip.json"), show_progress=False,
                    annotate_dir=os.path.join(root, "annotated_video"))
annotated = cv2.VideoCapture(os.path.join(root, "annotated_video", "clip.annotated.avi"))
frames = []
while True:
  ok, frame = annotated.read()
  if not ok:
    break
  frames.append(frame.astype(np.float32))
source = cv2.VideoCapture(video)
originals = [source.read()[1].astype(np.float32) for _ in frames]
# How much the annotation changed each frame (JPEG noise aside): boxes and labels
# on the face frames, nothing on the blank ones.
report["annotated_video_change"] = [float(np.mean(np.abs(a - b) > 60))
                                    for a, b in zip(frames, originals)]
predict_cli.predict(workdir, video, os.path.join(root, "clip3.json"), show_progress=False,
                    smooth=3, max_frames=4)
print("REPORT " + json.dumps(report))
"""


@pytest.fixture(scope="module")
def mtcnn_report(trained_workdir, tmp_path_factory):
  root = tmp_path_factory.mktemp("mtcnn")
  result = subprocess.run([sys.executable, "-c", _MTCNN_SCRIPT, trained_workdir, str(root)],
                          capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  line = [l for l in result.stdout.splitlines() if l.startswith("REPORT ")][-1]
  return json.loads(line[len("REPORT "):]), root, result.stderr


def test_predict_faces_and_embed_import_neither_torch_nor_tensorflow(mtcnn_report):
  """Catches a module-level torch (or TensorFlow) import on the aligned-face
  path: torch costs seconds and segfaults next to TensorFlow; MTCNN (torch)
  must come only with the first predict_image, in a fresh process."""
  report, _, _ = mtcnn_report
  assert report["heavy_before_detection"] == []
  assert report["torch_after_detection"]


def test_predict_image_cuts_the_face_preprocessing_cuts(mtcnn_report):
  """Catches prediction detecting or aligning differently from preprocessing
  (other thresholds, another crop), so the model would see faces unlike its
  training faces; and path and array inputs that disagree."""
  report, _, _ = mtcnn_report
  assert report["num_faces"] == 1 and report["preprocess_status"] == "kept"
  assert report["crop_equal"] and report["probs_of_crop_equal"]
  assert report["array_input_same"]
  face = report["face"]
  x1, y1, x2, y2 = face["box"]
  assert 0 <= x1 < x2 <= 512 and 0 <= y1 < y2 <= 512
  assert face["landmarks_shape"] == [5, 2] and face["det_score"] > 0.9
  assert face["expression"] in contract.EXPRESSIONS
  assert face["probs_sum"] == pytest.approx(1.0, abs=1e-5)


def test_cli_folder_rows_no_face_and_corrupt_file(mtcnn_report):
  """Catches a folder run that stops at a corrupt file, drops photos without a
  face, misses subfolders, or writes probabilities that are not a distribution."""
  _, root, stderr = mtcnn_report
  with open(root / "folder.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == ["source", "frame", "x1", "y1", "x2", "y2", "det_score",
                           "expression", *contract.EXPRESSIONS]
  by_name = {os.path.relpath(r["source"], root / "photos"): r for r in rows}
  assert sorted(by_name) == ["a.jpg", "blank.png", "sub/b.png"]
  blank = by_name["blank.png"]
  assert blank["expression"] == "no_face" and blank["x1"] == "" and blank["neutral"] == ""
  for name in ("a.jpg", "sub/b.png"):
    row = by_name[name]
    probs = [float(row[c]) for c in contract.EXPRESSIONS]
    assert sum(probs) == pytest.approx(1.0, abs=1e-5)
    assert row["expression"] == contract.EXPRESSIONS[int(np.argmax(probs))]
    assert float(row["x2"]) > float(row["x1"]) and row["frame"] == "0"
  corrupt = [l for l in stderr.splitlines() if "corrupt.jpg" in l]
  assert len(corrupt) == 1 and corrupt[0].startswith("skipped ")
  report, _, _ = mtcnn_report
  assert report["annotated"] == ["a.annotated.png", "blank.annotated.png",
                                 "sub/b.annotated.png"]


def test_cli_video_has_a_row_per_frame_face_and_smooths(mtcnn_report):
  """Catches wrong frame numbers, frames without a face left out, and --smooth
  that does not average a tracked face over its last N frames."""
  _, root, _ = mtcnn_report
  rows = json.loads((root / "clip.json").read_text())
  assert [r["frame"] for r in rows] == [0, 1, 2, 3, 4]
  assert [r["expression"] == "no_face" for r in rows] == [False] * 3 + [True] * 2
  assert rows[3]["x1"] is None and rows[3]["neutral"] is None
  smoothed = json.loads((root / "clip3.json").read_text())
  assert [r["frame"] for r in smoothed] == [0, 1, 2, 3]
  raw = np.array([[r[c] for c in contract.EXPRESSIONS] for r in rows[:3]])
  got = np.array([[r[c] for c in contract.EXPRESSIONS] for r in smoothed[:3]])
  expected = np.stack([raw[0], raw[:2].mean(0), raw[:3].mean(0)])
  np.testing.assert_allclose(got, expected, atol=1e-6)
  assert not np.allclose(raw[1], raw[0], atol=1e-7)   # the frames do differ


def test_cli_video_annotation_draws_on_face_frames_only(mtcnn_report):
  """Catches an annotated video that is not written, drops frames, or draws
  boxes on frames where no face was found."""
  report, _, _ = mtcnn_report
  change = report["annotated_video_change"]
  assert len(change) == 5, change
  assert all(c > 0.002 for c in change[:3]) and all(c < 0.0005 for c in change[3:]), change
