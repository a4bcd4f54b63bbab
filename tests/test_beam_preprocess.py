"""Tests of the Beam preprocessing pipeline (data_tools.beam_preprocess).

The pipeline must write exactly the face set data_tools.preprocess writes, so
the main test runs both on one raw tree and compares the two output folders
file by file. Both run as subprocesses: MTCNN brings torch, which must not
share a process with TensorFlow (other test modules import it), and the
subprocesses exercise the command lines too.
"""

import importlib.util
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from conftest import file_bytes
from dicefer_jax import contract
from dicefer_jax import face_detector

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=REPO, TF_ENABLE_ONEDNN_OPTS="0")


def _require_beam():
  # Looks without importing: apache_beam is large, and only the subprocesses
  # need it.
  if importlib.util.find_spec("apache_beam") is None:
    pytest.skip("apache-beam is not installed")


def _require_mtcnn():
  # Not pytest.importorskip: importing torch here can crash next to the
  # TensorFlow other test modules load (see test_preprocess.py).
  if not face_detector.mtcnn_installed():
    pytest.skip("facenet-pytorch is not installed (pip install 'dicefer-jax[data]')")


def _run(module, raw, out, *extra):
  return subprocess.run(
      [sys.executable, "-m", module, f"--input_dir={raw}", f"--output_dir={out}",
       "--device=cpu", *extra],
      capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300)


def _run_beam(raw, out, *extra):
  # FnApiRunner is the DirectRunner's in-process engine for batch pipelines.
  # Named directly because Beam's DirectRunner first tries Prism, a binary it
  # downloads from GitHub: a network fetch in a test.
  return _run("data_tools.beam_preprocess", raw, out, "--runner=FnApiRunner",
              "--direct_num_workers=1", *extra)


def _write_raw_tree(raw):
  """A raw photo tree as data_tools.preprocess reads it: a real portrait moved,
  scaled and turned, a photo without a face, a truncated file, a dropped
  class and a note."""
  from skimage import data  # pylint: disable=g-import-not-at-top
  for folder in ("Happy", "Sad", "Surprised", "Contempt"):
    (raw / folder).mkdir(parents=True)
  portrait = np.ascontiguousarray(data.astronaut()[:, :, ::-1])  # RGB -> BGR for cv2.
  height, width = portrait.shape[:2]

  def moved(angle, scale, shift, size):
    m = cv2.getRotationMatrix2D((width / 2, height / 2), angle, scale)
    m[:, 2] += shift
    return cv2.warpAffine(portrait, m, size, flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT)

  cv2.imwrite(str(raw / "Happy" / "astronaut.png"), portrait)
  cv2.imwrite(str(raw / "Happy" / "shifted.jpg"), moved(0, 1.0, (40, 25), (width, height)))
  cv2.imwrite(str(raw / "Surprised" / "scaled.png"), moved(0, 0.6, (0, 0), (360, 360)))
  cv2.imwrite(str(raw / "Sad" / "rotated.png"), moved(15, 1.0, (0, 0), (width, height)))
  noise = np.random.default_rng(0).integers(0, 256, (240, 240, 3), np.uint8)
  cv2.imwrite(str(raw / "Sad" / "noise.png"), noise)
  cv2.imwrite(str(raw / "Contempt" / "dropped.png"), noise)
  ok, jpeg = cv2.imencode(".jpg", portrait)
  assert ok
  (raw / "Sad" / "truncated.jpg").write_bytes(jpeg.tobytes()[:len(jpeg) // 2])
  (raw / "Sad" / "notes.txt").write_text("not a photo")
  (raw / "capture_manifest.csv").write_text(
      "path,expression,subject,timestamp\nHappy/astronaut.png,happiness,eileen,t\n")


def test_beam_writes_the_face_set_preprocess_writes(tmp_path):
  """Catches any difference between the pipeline's face set and
  data_tools.preprocess's on the same photos: a face's bytes or name, a
  manifest or rejects row, the bookkeeping that lets either tool resume the
  other's set."""
  _require_beam()
  _require_mtcnn()
  raw = tmp_path / "RAW"
  _write_raw_tree(raw)
  inputs = file_bytes(raw)

  pre = _run("data_tools.preprocess", raw, tmp_path / "pre", "--workers=1")
  assert pre.returncode == 0, pre.stderr
  beam = _run_beam(raw, tmp_path / "beam")
  assert beam.returncode == 0, beam.stderr
  summary = "kept 4, rejected 2 (no_face 1, unreadable 1), errors 0, skipped 0"
  assert summary in pre.stdout and summary in beam.stdout
  assert "skipping 1 photo(s) of dropped class Contempt" in beam.stderr
  assert "ignoring 1 file(s) that are not images" in beam.stderr

  pre_files, beam_files = file_bytes(tmp_path / "pre"), file_bytes(tmp_path / "beam")
  faces = sorted(p for p in beam_files if p.endswith(".png"))
  assert len(faces) == 4
  # Everything: PNG bytes, manifest.csv, rejects.csv, preprocess_settings.json,
  # the progress log (preprocess with one worker logs in input order, as the
  # pipeline does), and no task or result file of the run left behind.
  assert sorted(beam_files) == sorted(pre_files)
  for name in sorted(pre_files):
    assert beam_files[name] == pre_files[name], name

  records = {os.path.basename(r.path).split("-")[0]: r
             for r in contract.read_manifest(str(tmp_path / "beam"))}
  assert {k: (r.expression, r.subject, r.source) for k, r in records.items()} == {
      "astronaut": ("happiness", "eileen", "RAW"), "shifted": ("happiness", "", "RAW"),
      "rotated": ("sadness", "", "RAW"), "scaled": ("surprise", "", "RAW")}
  rejects = beam_files["rejects.csv"].decode()
  assert "Sad/noise.png,sadness,,RAW,no_face" in rejects
  assert "Sad/truncated.jpg,sadness,,RAW,unreadable" in rejects

  # data_tools.preprocess resumes the pipeline's set: nothing is redone.
  again = _run("data_tools.preprocess", raw, tmp_path / "beam", "--workers=1")
  assert again.returncode == 0, again.stderr
  assert "kept 0, rejected 0, errors 0, skipped 6 already done" in again.stdout
  assert file_bytes(tmp_path / "beam") == beam_files
  assert file_bytes(raw) == inputs  # Inputs never touched.


def test_command_line_refusals_and_no_torch_on_import(tmp_path):
  """Catches the pipeline writing into a folder someone else filled, flags
  of data_tools.preprocess that mean nothing under Beam being ignored, and a
  module-level torch import (torch belongs in DoFn.setup)."""
  _require_beam()
  raw = tmp_path / "RAW"
  (raw / "Happy").mkdir(parents=True)
  cv2.imwrite(str(raw / "Happy" / "a.png"), np.zeros((64, 64, 3), np.uint8))
  foreign = tmp_path / "mine"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("keep me")

  res = _run_beam(raw, foreign)
  assert res.returncode == 2
  assert res.stderr.strip().splitlines()[-1].startswith("error: ")
  assert "is not empty" in res.stderr
  assert sorted(os.listdir(foreign)) == ["notes.txt"]

  res = _run_beam(raw, tmp_path / "out", "--workers=2")
  assert res.returncode == 2 and "--direct_num_workers" in res.stderr
  assert not (tmp_path / "out").exists()

  code = ("import sys, data_tools.beam_preprocess; "
          "assert 'torch' not in sys.modules and 'facenet_pytorch' not in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=ENV, timeout=120)
