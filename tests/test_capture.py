"""Tests of the labelled capture tool, driven headless by a generated video."""

import csv
import os
import subprocess
import sys
import uuid

import cv2
import numpy as np
import pytest

from data_tools import capture
from dicefer_jax import fileio
from dicefer_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_FRAMES = 40


def _frame_colour(i):
  # Each frame has its own flat colour (BGR), so a saved crop tells which
  # frame it came from even after two rounds of JPEG compression.
  return (6 * i, 250 - 6 * i, 100)


def _write_video(path, num_frames=NUM_FRAMES, size=(640, 480)):
  writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 25, size)
  assert writer.isOpened()
  for i in range(num_frames):
    frame = np.empty((size[1], size[0], 3), np.uint8)
    frame[:] = _frame_colour(i)
    cv2.putText(frame, f"{i:02d}", (20, 60), cv2.FONT_HERSHEY_SIMPLEX, 2,
                (255, 255, 255), 3)
    writer.write(frame)
  writer.release()
  return path


@pytest.fixture(scope="module")
def video(tmp_path_factory):
  return _write_video(str(tmp_path_factory.mktemp("video") / "clip.avi"))


def _rows(output_dir):
  with open(os.path.join(output_dir, capture.CAPTURE_MANIFEST), newline="") as f:
    return list(csv.DictReader(f))


def _assert_from_frame(path, i):
  crop = cv2.imread(path)
  assert crop.shape == (250, 250, 3)
  median = np.median(crop.reshape(-1, 3), axis=0)
  np.testing.assert_allclose(median, _frame_colour(i), atol=6)


def test_headless_capture_saves_labelled_frames(video, tmp_path):
  out = str(tmp_path / "Photos")
  counts = capture.run_capture(
      video, out, capture.parse_keys("12:h,30:s,31:h,35:q,38:n"), subject="alice")
  assert counts["Happy"] == 2 and counts["Sad"] == 1
  assert counts["Neutral"] == 0  # Frame 38 comes after q.
  assert sum(counts.values()) == 3
  for folder in capture.KEY_MAP.values():  # The report's folder names.
    assert os.path.isdir(os.path.join(out, folder))

  rows = _rows(out)
  assert [r["expression"] for r in rows] == ["happiness", "sadness", "happiness"]
  assert {r["subject"] for r in rows} == {"alice"}
  assert all(r["timestamp"] for r in rows)
  for row, frame in zip(rows, (12, 30, 31)):
    folder, name = row["path"].split("/")
    assert folder == {"happiness": "Happy", "sadness": "Sad"}[row["expression"]]
    assert name.endswith(".jpg")
    _assert_from_frame(os.path.join(out, row["path"]), frame)


def test_rerun_appends_and_keeps_existing_files(video, tmp_path):
  out = str(tmp_path / "Photos")
  capture.run_capture(video, out, {5: "f"}, subject="bob")
  before = {}
  for folder, _, names in os.walk(out):
    for name in names:
      with open(os.path.join(folder, name), "rb") as f:
        before[os.path.join(folder, name)] = f.read()
  counts = capture.run_capture(video, out, {7: "f", 8: "p"}, subject="carol")
  assert counts["Fear"] == 1 and counts["Surprise"] == 1
  for path, data in before.items():
    if path.endswith(".jpg"):
      with open(path, "rb") as f:
        assert f.read() == data
  rows = _rows(out)
  assert [(r["expression"], r["subject"]) for r in rows] == [
      ("fear", "bob"), ("fear", "carol"), ("surprise", "carol")]
  assert len(os.listdir(os.path.join(out, "Fear"))) == 2


def test_crop_center_and_size(video, tmp_path):
  out = str(tmp_path / "Photos")
  capture.run_capture(video, out, {3: "a"}, crop_size=100, crop_center=(60, 60))
  (row,) = _rows(out)
  crop = cv2.imread(os.path.join(out, row["path"]))
  assert crop.shape == (100, 100, 3)
  # The frame counter text (white, near the top-left corner) is in this crop.
  assert crop.max() > 200


def test_frame_smaller_than_crop_is_an_error(video, tmp_path):
  with pytest.raises(UserError, match="smaller than the 500x500 crop"):
    capture.run_capture(video, str(tmp_path / "o"), {1: "h"}, crop_size=500)
  with pytest.raises(UserError, match="outside"):
    capture.run_capture(video, str(tmp_path / "o"), {1: "h"}, crop_center=(10, 10))


def test_write_failure_keeps_earlier_frames(video, tmp_path, monkeypatch):
  out = str(tmp_path / "Photos")
  real_imencode = cv2.imencode
  calls = []

  def failing_imencode(*args, **kwargs):
    calls.append(1)
    if len(calls) > 1:
      return False, None
    return real_imencode(*args, **kwargs)

  monkeypatch.setattr(cv2, "imencode", failing_imencode)
  with pytest.raises(UserError, match="1 image"):
    capture.run_capture(video, out, {2: "h", 4: "h"})
  assert len(_rows(out)) == 1
  assert len(os.listdir(os.path.join(out, "Happy"))) == 1


def _crop():
  return np.full((250, 250, 3), 128, np.uint8)


def test_saves_are_fsynced_atomic_writes(tmp_path, monkeypatch):
  """Catches a save that skips the disk flush (a capture lost in a power cut
  cannot be taken again) or writes in place (a crash leaves half a JPEG)."""
  calls = []
  real_write = fileio.write_bytes_atomic

  def spy(path, data, **kwargs):
    calls.append((path, kwargs))
    real_write(path, data, **kwargs)

  monkeypatch.setattr(capture.fileio, "write_bytes_atomic", spy)
  writer = capture._CaptureWriter(str(tmp_path), "s1")  # pylint: disable=protected-access
  rel = writer.save(_crop(), "Happy")
  writer.close()
  assert calls == [(os.path.join(str(tmp_path), rel), {"fsync": True})]
  assert cv2.imread(os.path.join(str(tmp_path), rel)).shape == (250, 250, 3)


def test_a_name_collision_never_overwrites(tmp_path, monkeypatch):
  """Catches the never-overwrite check lost: a repeated name would replace
  an earlier capture."""
  fixed = uuid.UUID(int=7)
  monkeypatch.setattr(capture.uuid, "uuid4", lambda: fixed)
  writer = capture._CaptureWriter(str(tmp_path), "s1")  # pylint: disable=protected-access
  rel = writer.save(_crop(), "Happy")
  first = (tmp_path / rel).read_bytes()
  with pytest.raises(UserError, match="1 image"):
    writer.save(np.zeros((250, 250, 3), np.uint8), "Happy")
  writer.close()
  assert (tmp_path / rel).read_bytes() == first
  assert os.listdir(tmp_path / "Happy") == [os.path.basename(rel)]
  assert len(_rows(str(tmp_path))) == 1


def test_failed_write_leaves_no_file_and_no_row(tmp_path, monkeypatch):
  """Catches a failed save leaving a temp file or a manifest row that points
  at no image."""
  writer = capture._CaptureWriter(str(tmp_path), "s1")  # pylint: disable=protected-access

  def full_disk(*args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(os, "replace", full_disk)
  with pytest.raises(UserError, match="No space left"):
    writer.save(_crop(), "Sad")
  writer.close()
  assert os.listdir(tmp_path / "Sad") == []
  assert _rows(str(tmp_path)) == []


def test_leftover_temp_files_are_not_counted_as_captures(tmp_path):
  """Catches the per-class totals counting the hidden temp file a killed save
  leaves (its name ends in .jpg too)."""
  writer = capture._CaptureWriter(str(tmp_path), "s1")  # pylint: disable=protected-access
  writer.save(_crop(), "Fear")
  leftover = fileio.temp_path(str(tmp_path / "Fear" / "x.jpg"))
  with open(leftover, "wb") as f:
    f.write(b"half")
  assert writer.existing_counts()["Fear"] == 1
  writer.close()


@pytest.mark.parametrize("spec", ["12h", "x:h", "3:z", "1:h,1:s", ""])
def test_bad_keys(spec):
  with pytest.raises(UserError):
    capture.parse_keys(spec)


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run([sys.executable, "-m", "data_tools.capture", *args],
                        capture_output=True, text=True, cwd=REPO, env=env,
                        timeout=60)


def test_cli_errors_are_one_line(video, tmp_path):
  res = _cli(f"--output_dir={tmp_path / 'o'}", f"--source={tmp_path / 'no.avi'}",
             "--keys=1:h")
  assert res.returncode == 2
  assert res.stderr.strip().count("\n") == 0 and "does not exist" in res.stderr

  garbage = tmp_path / "garbage.mp4"
  garbage.write_bytes(b"not a video")
  res = _cli(f"--output_dir={tmp_path / 'o'}", f"--source={garbage}", "--keys=1:h")
  assert res.returncode == 2
  assert res.stderr.strip().count("\n") == 0 and "cannot open" in res.stderr

  # An output "directory" below a regular file cannot be created.
  blocker = tmp_path / "file"
  blocker.write_text("x")
  res = _cli(f"--output_dir={blocker / 'sub'}", f"--source={video}", "--keys=1:h")
  assert res.returncode == 2
  assert res.stderr.strip().count("\n") == 0 and "cannot write" in res.stderr

  res = _cli(f"--output_dir={tmp_path / 'ok'}", f"--source={video}",
             "--keys=1:d", "--subject=s1")
  assert res.returncode == 0, res.stderr
  assert "saved 1 image" in res.stdout
