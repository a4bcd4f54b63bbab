"""Tests of the dataset importers on tiny fixtures in each dataset's real layout.

Fixtures use the real file names and label formats (RAF-DB's misspelt
list_patition_label.txt, CK+'s float codes in *_emotion.txt, AffectNet's
N_exp.npy string arrays, ...), with a few small generated images. MTCNN never
runs here: the importers that need it get a fake `run_preprocess` that records
the items it is handed and writes a manifest like the real one would.
"""

import collections
import dataclasses
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from data_tools import importers
from dicefer_jax import contract
from dicefer_jax.errors import DataError, UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _image(path, shape=(40, 40), color=True, value=None, seed=0):
  """Writes a small random (or constant) image, creating folders."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(seed)
  full = shape + ((3,) if color else ())
  if value is None:
    image = rng.integers(0, 256, full, dtype=np.uint8)
  else:
    image = np.full(full, value, dtype=np.uint8)
  assert cv2.imwrite(path, image)
  return path


def _snapshot(root):
  """(path, size, mtime) of every file: inputs must come out untouched."""
  out = []
  for dirpath, _, files in os.walk(root):
    for f in files:
      p = os.path.join(dirpath, f)
      st = os.stat(p)
      out.append((p, st.st_size, st.st_mtime_ns))
  return sorted(out)


def _files_under(root):
  """Every file under root, relative, sorted (temp files included)."""
  return sorted(os.path.relpath(os.path.join(d, f), root)
                for d, _, files in os.walk(root) for f in files)


def _check_faces(out_dir, records):
  for r in records:
    image = cv2.imread(os.path.join(out_dir, r.path), cv2.IMREAD_UNCHANGED)
    assert image.shape == (112, 112) and image.dtype == np.uint8, r.path
    assert r.path.startswith(f"{r.expression}/")


@pytest.fixture
def fake_preprocess(monkeypatch):
  """Replaces MTCNN: records the items and writes one blank face per item."""
  calls = []

  def fake(items, output_dir, **kwargs):
    items = list(items)
    calls.append(dict(items=items, output_dir=output_dir, kwargs=kwargs))
    written = []
    for i, r in enumerate(items):
      rel = f"{r.expression}/face_{i:04d}.png"
      os.makedirs(os.path.join(output_dir, r.expression), exist_ok=True)
      cv2.imwrite(os.path.join(output_dir, rel), np.zeros((112, 112), np.uint8))
      written.append(dataclasses.replace(r, path=rel))
    contract.write_manifest(output_dir, written)
    # The real run_preprocess's summary keys that the importers read.
    return {"kept": len(written), "total_kept": len(written),
            "reasons": {"no_face": 2}}

  monkeypatch.setattr(importers.writer, "run_mtcnn", fake)
  return calls


def _import(name, root, out, **kwargs):
  kwargs.setdefault("show_progress", False)
  kwargs.setdefault("log", lambda *_: None)
  return importers.import_dataset(name, str(root), str(out), **kwargs)


# --------------------------------------------------------------------------- FER2013


def _fer2013(root, rows):
  os.makedirs(root, exist_ok=True)
  rng = np.random.default_rng(1)
  with open(os.path.join(root, "fer2013.csv"), "w") as f:
    f.write("emotion,pixels,Usage\n")
    for emotion, usage, npix in rows:
      pixels = " ".join(str(v) for v in rng.integers(0, 256, npix))
      f.write(f"{emotion},{pixels},{usage}\n")


FER_ROWS = [(0, "Training", 2304), (3, "Training", 2304), (6, "PublicTest", 2304),
            (4, "PrivateTest", 2304), (1, "Training", 2300),  # malformed pixels
            (2, "Training", 2304), (5, "PrivateTest", 2304)]


def test_fer2013_listing_maps_codes_and_usage(tmp_path):
  root = tmp_path / "fer2013"
  _fer2013(str(root), FER_ROWS)
  skipped = collections.Counter()
  records = importers.list_fer2013(str(root), skipped=skipped)
  got = [(r.expression, r.split) for r in records]
  assert got == [("anger", "train"), ("happiness", "train"), ("neutral", "test"),
                 ("sadness", "test"), ("fear", "train"), ("surprise", "test")]
  assert skipped == {"pixels are not 48x48": 1}
  assert all(r.subject == "" and r.source == "fer2013" for r in records)
  # The path names the CSV row (0-based data row), not a file.
  assert records[-1].path.endswith("fer2013.csv#6")
  # --root may also name the CSV itself.
  assert len(importers.list_fer2013(str(root / "fer2013.csv"))) == 6


def test_fer2013_every_code_and_bad_rows(tmp_path):
  """Catches a wrong or missing entry of the code table (disgust, code 1, is
  malformed in FER_ROWS) and rows with an unknown code or Usage being kept."""
  rows = [(code, "Training", 2304) for code in range(7)]
  rows += [(7, "Training", 2304), (-1, "PublicTest", 2304), (3, "Validation", 2304)]
  _fer2013(str(tmp_path), rows)
  skipped = collections.Counter()
  records = importers.list_fer2013(str(tmp_path), skipped=skipped)
  assert [r.expression for r in records] == [
      "anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral"]
  assert skipped == {"unknown emotion code": 2, "unknown Usage": 1}


def test_fer2013_writes_contract_directly_and_resumes(tmp_path):
  root = tmp_path / "fer2013"
  _fer2013(str(root), FER_ROWS)
  before = _snapshot(root)
  out = tmp_path / "out"
  result = _import("fer2013", root, out)
  records = contract.read_manifest(str(out))
  assert len(records) == 6 and result["written"]["num_images"] == 6
  assert records[0].path == "anger/fer2013_00000.png"
  assert {r.split for r in records} == {"train", "test"}
  _check_faces(str(out), records)
  # Bicubic upsampling keeps the 48x48 content: shrinking back recovers it. Every
  # face is checked against its own CSV row: a loader keyed by list position
  # instead of row number would shift the faces after the malformed row 4 (two
  # random images differ by about 85 on average).
  with open(root / "fer2013.csv") as f:
    rows = f.readlines()[1:]
  for r in records:
    row = int(r.path.split("_")[-1].split(".")[0])
    pixels = np.array(rows[row].split(",")[1].split(), np.uint8).reshape(48, 48)
    face = cv2.imread(str(out / r.path), cv2.IMREAD_GRAYSCALE)
    small = cv2.resize(face, (48, 48), interpolation=cv2.INTER_AREA)
    assert np.abs(small.astype(int) - pixels).mean() < 40, r.path
  assert _snapshot(root) == before
  # Only faces and the manifest: no temp file of the atomic writes is left.
  assert _files_under(str(out)) == sorted([r.path for r in records] +
                                          [contract.MANIFEST_NAME])

  # A second run into the same directory is refused without --resume.
  with pytest.raises(UserError, match="--resume"):
    _import("fer2013", root, out)
  # --resume keeps the faces on disk (marked here by blanking one) and writes
  # the missing ones: catches a resume that rewrites everything, or one that
  # lists missing faces in the manifest without writing them.
  blank = np.zeros((112, 112), np.uint8)
  cv2.imwrite(str(out / records[0].path), blank)
  os.remove(out / records[1].path)
  _import("fer2013", root, out, resume=True)
  assert not cv2.imread(str(out / records[0].path), cv2.IMREAD_GRAYSCALE).any()
  assert os.path.isfile(out / records[1].path)
  assert contract.read_manifest(str(out)) == records
  # --overwrite writes every face again: the blanked one comes back.
  _import("fer2013", root, out, overwrite=True)
  assert cv2.imread(str(out / records[0].path), cv2.IMREAD_GRAYSCALE).any()
  assert contract.read_manifest(str(out)) == records
  with pytest.raises(UserError, match="exclude"):
    _import("fer2013", root, out, resume=True, overwrite=True)


def test_fer2013_wrong_layout(tmp_path):
  with pytest.raises(DataError, match=r"expected fer2013\.csv .* under .*empty"):
    os.makedirs(tmp_path / "empty")
    importers.list_fer2013(str(tmp_path / "empty"))
  with open(tmp_path / "fer2013.csv", "w") as f:
    f.write("emotion,pixels\n0,1 2 3\n")
  with pytest.raises(DataError, match="lacks the column"):
    importers.list_fer2013(str(tmp_path))


# --------------------------------------------------------------------------- RAF-DB


def _rafdb(parent):
  basic = os.path.join(parent, "RAF-DB", "basic")
  lines = {"train_00001.jpg": 5, "train_00002.jpg": 1, "train_00003.jpg": 4,
           "test_0001.jpg": 7, "test_0002.jpg": 6, "test_0003.jpg": 3,
           "test_0004.jpg": 2}
  os.makedirs(os.path.join(basic, "EmoLabel"))
  with open(os.path.join(basic, "EmoLabel", "list_patition_label.txt"), "w") as f:
    for name, code in lines.items():
      f.write(f"{name} {code}\n")
    f.write("train_00004.jpg 2\n")  # listed but its image is missing
  for i, name in enumerate(lines):
    stem = os.path.splitext(name)[0]
    _image(os.path.join(basic, "Image", "aligned", f"{stem}_aligned.jpg"),
           shape=(100, 100), seed=i)
  # The unaligned originals sit beside them in the real archive; never read.
  _image(os.path.join(basic, "Image", "original", "train_00001.jpg"), shape=(60, 80))
  return basic


def test_rafdb_listing(tmp_path):
  basic = _rafdb(str(tmp_path))
  skipped = collections.Counter()
  records = importers.list_rafdb(basic, skipped=skipped)
  assert [(os.path.basename(r.path), r.expression, r.split) for r in records] == [
      ("train_00001_aligned.jpg", "sadness", "train"),
      ("train_00002_aligned.jpg", "surprise", "train"),
      ("train_00003_aligned.jpg", "happiness", "train"),
      ("test_0001_aligned.jpg", "neutral", "test"),
      ("test_0002_aligned.jpg", "anger", "test"),
      ("test_0003_aligned.jpg", "disgust", "test"),
      ("test_0004_aligned.jpg", "fear", "test")]
  assert skipped == {"aligned image missing": 1}
  # --root may be basic/ or the folder above it.
  assert importers.list_rafdb(os.path.dirname(basic)) == records


def test_rafdb_writes_gray_112_directly(tmp_path, fake_preprocess):
  basic = _rafdb(str(tmp_path))
  # A truncated download: the image exists but does not decode.
  with open(os.path.join(basic, "Image", "aligned", "test_0003_aligned.jpg"), "wb") as f:
    f.write(b"\xff\xd8 not a jpeg")
  out = tmp_path / "faces"
  result = _import("rafdb", basic, out, workers=2)
  records = contract.read_manifest(str(out))
  assert not fake_preprocess  # aligned faces skip MTCNN
  assert records[0] == contract.Record("sadness/rafdb_train_00001.png", "sadness",
                                       "", "rafdb", "train")
  assert collections.Counter(r.split for r in records) == {"train": 3, "test": 3}
  _check_faces(str(out), records)
  # The unreadable face is counted and left out of the manifest (which
  # read_manifest would otherwise reject for a missing file).
  assert result["failed"] == {"unreadable image": 1}
  assert "disgust" not in {r.expression for r in records}


def test_rafdb_wrong_layout_names_expected_file(tmp_path):
  os.makedirs(tmp_path / "basic")
  with pytest.raises(DataError) as e:
    importers.list_rafdb(str(tmp_path / "basic"))
  assert "RAF-DB: expected EmoLabel/list_patition_label.txt under" in str(e.value)
  assert str(tmp_path / "basic") in str(e.value)
  basic = _rafdb(str(tmp_path / "x"))
  with open(os.path.join(basic, "EmoLabel", "list_patition_label.txt"), "a") as f:
    f.write("train_00005.jpg happy\n")
  with pytest.raises(DataError, match="line 9"):
    importers.list_rafdb(basic)


@pytest.mark.parametrize("line,message", [
    ("train_00009.jpg 8\n", "label 8 is not in 1..7"),
    ("val_00009.jpg 1\n", "neither train_ nor test_"),
])
def test_rafdb_rejects_unknown_codes_and_splits(tmp_path, line, message):
  """Catches a lister that guesses at a label or split it does not know."""
  basic = _rafdb(str(tmp_path))
  with open(os.path.join(basic, "EmoLabel", "list_patition_label.txt"), "a") as f:
    f.write(line)
  with pytest.raises(DataError, match=message):
    importers.list_rafdb(basic)


# --------------------------------------------------------------------------- CK+


def _ckplus(root):
  """S005/001 disgust (5 frames), S005/002 unlabelled, S010/001 contempt,
  S010/002 happy with 3 frames, S011/001 surprise (4 frames)."""
  seqs = {("S005", "001"): (5, 3), ("S005", "002"): (4, None),
          ("S010", "001"): (6, 2), ("S010", "002"): (3, 5), ("S011", "001"): (4, 7)}
  for (subject, seq), (frames, code) in seqs.items():
    for k in range(1, frames + 1):
      _image(os.path.join(root, "cohn-kanade-images", subject, seq,
                          f"{subject}_{seq}_{k:08d}.png"),
             shape=(49, 64), color=False, seed=k)
    label_dir = os.path.join(root, "Emotion", subject, seq)
    os.makedirs(label_dir, exist_ok=True)  # the real archive has empty ones
    if code is not None:
      with open(os.path.join(label_dir, f"{subject}_{seq}_{frames:08d}_emotion.txt"),
                "w") as f:
        f.write(f"   {code:.7e}\n")
  # Finder litter from archives made on macOS.
  open(os.path.join(root, "cohn-kanade-images", "S005", "001", ".DS_Store"), "w").close()
  return root


def test_ckplus_listing_peak_and_neutral_frames(tmp_path):
  root = _ckplus(str(tmp_path / "CK+"))
  skipped = collections.Counter()
  records = importers.list_ckplus(root, skipped=skipped)
  got = [(os.path.basename(r.path), r.expression, r.subject) for r in records]
  assert got == [
      ("S005_001_00000001.png", "neutral", "S005"),
      ("S005_001_00000003.png", "disgust", "S005"),
      ("S005_001_00000004.png", "disgust", "S005"),
      ("S005_001_00000005.png", "disgust", "S005"),
      # 3 frames: the first is neutral, so only 2 peak frames remain.
      ("S010_002_00000001.png", "neutral", "S010"),
      ("S010_002_00000002.png", "happiness", "S010"),
      ("S010_002_00000003.png", "happiness", "S010"),
      ("S011_001_00000001.png", "neutral", "S011"),
      ("S011_001_00000002.png", "surprise", "S011"),
      ("S011_001_00000003.png", "surprise", "S011"),
      ("S011_001_00000004.png", "surprise", "S011")]
  assert skipped == {"sequence without an emotion file": 1,
                     "contempt sequence (no canonical class)": 1}
  assert all(r.split == "" and r.source == "ckplus" for r in records)
  assert all(os.path.isfile(r.path) for r in records)


def _ckplus_sequence(root, subject, seq, frames, code):
  for k in range(1, frames + 1):
    _image(os.path.join(root, "cohn-kanade-images", subject, seq,
                        f"{subject}_{seq}_{k:08d}.png"), shape=(8, 8), color=False)
  label_dir = os.path.join(root, "Emotion", subject, seq)
  os.makedirs(label_dir, exist_ok=True)
  with open(os.path.join(label_dir, f"{subject}_{seq}_{frames:08d}_emotion.txt"),
            "w") as f:
    f.write(f"   {code:.7e}\n")


def test_ckplus_every_code(tmp_path):
  """Catches a wrong entry of the code table: one sequence per code 0..7, each by
  a different subject so that subjects are checked to follow their folders."""
  root = str(tmp_path)
  for code in range(8):
    _ckplus_sequence(root, f"S{100 + code}", "001", 4, code)
  _ckplus_sequence(root, "S200", "001", 1, 5)  # too short for neutral + peak
  skipped = collections.Counter()
  records = importers.list_ckplus(root, skipped=skipped)
  peak = {r.subject: r.expression for r in records
          if not r.path.endswith("_00000001.png")}
  assert peak == {"S100": "neutral", "S101": "anger", "S103": "disgust",
                  "S104": "fear", "S105": "happiness", "S106": "sadness",
                  "S107": "surprise"}
  assert skipped == {"contempt sequence (no canonical class)": 1,
                     "sequence with fewer than 2 frames": 1}
  _ckplus_sequence(root, "S300", "001", 4, 8)
  with pytest.raises(DataError, match="code 8 is not in 0..7"):
    importers.list_ckplus(root)


def test_ckplus_goes_through_mtcnn(tmp_path, fake_preprocess):
  root = _ckplus(str(tmp_path / "CK+"))
  before = _snapshot(root)
  out = tmp_path / "faces"
  result = _import("ckplus", root, out, workers=3,
                   preprocess_options=dict(min_face_size=20, multi_face="largest"))
  (call,) = fake_preprocess
  assert call["output_dir"] == str(out)
  assert call["kwargs"] == dict(min_face_size=20, multi_face="largest", workers=3,
                                show_progress=False)
  assert [r.path for r in call["items"]] == [
      r.path for r in importers.list_ckplus(root)]
  assert result["written"]["num_subjects"] == 3
  assert result["skipped"] == {"sequence without an emotion file": 1,
                               "contempt sequence (no canonical class)": 1}
  assert {r.subject for r in contract.read_manifest(str(out))} == {"S005", "S010",
                                                                   "S011"}
  assert result["failed"] == {"MTCNN no_face (this run; see rejects.csv)": 2}
  assert _snapshot(root) == before
  # MTCNN runs resume from their own work log; starting over needs a new folder.
  with pytest.raises(UserError, match="--resume") as e:
    _import("ckplus", root, out)
  assert "--overwrite" not in str(e.value)
  with pytest.raises(UserError, match="--overwrite applies to directly written"):
    _import("ckplus", root, out, overwrite=True)
  _import("ckplus", root, out, resume=True)
  assert len(fake_preprocess) == 2


def test_mtcnn_keeping_no_face_is_one_line(tmp_path, monkeypatch):
  root = _ckplus(str(tmp_path / "CK+"))

  def rejects_all(items, output_dir, **kwargs):
    del output_dir, kwargs  # Writes no face at all.
    return {"kept": 0, "total_kept": 0, "reasons": {"no_face": len(items)}}

  monkeypatch.setattr(importers.writer, "run_mtcnn", rejects_all)
  with pytest.raises(DataError, match=r"MTCNN kept no face of 11 photos \(11 no_face\)"):
    _import("ckplus", root, tmp_path / "faces")


def test_ckplus_wrong_layout(tmp_path):
  os.makedirs(tmp_path / "cohn-kanade-images" / "S005")
  with pytest.raises(DataError, match=r"CK\+: expected Emotion/ under " +
                     str(tmp_path)):
    importers.list_ckplus(str(tmp_path))
  label = tmp_path / "Emotion" / "S005" / "001" / "S005_001_00000002_emotion.txt"
  os.makedirs(label.parent)
  label.write_text("happy\n")
  for k in (1, 2):
    _image(str(tmp_path / "cohn-kanade-images" / "S005" / "001" /
               f"S005_001_{k:08d}.png"), color=False)
  with pytest.raises(DataError, match="should hold one number"):
    importers.list_ckplus(str(tmp_path))


# --------------------------------------------------------------------------- Oulu-CASIA


def _oulu(root):
  seqs = {("P001", "Anger"): 5, ("P001", "Happiness"): 4, ("P002", "Surprise"): 12,
          ("P002", "Disgust"): 1}
  for (subject, cls), frames in seqs.items():
    for k in range(frames):
      _image(os.path.join(root, "OriginalImg", "VL", "Strong", subject, cls,
                          f"{k:03d}.jpeg"), shape=(48, 64), seed=k)
  # Other modalities/illuminations share the tree and must not leak in.
  _image(os.path.join(root, "OriginalImg", "NI", "Strong", "P001", "Anger", "000.jpeg"))
  _image(os.path.join(root, "OriginalImg", "VL", "Dark", "P001", "Anger", "000.jpeg"))
  return root


def test_oulu_listing_six_classes_by_default(tmp_path):
  root = _oulu(str(tmp_path / "Oulu"))
  records = importers.list_oulu(root)
  got = [(os.path.relpath(r.path, os.path.join(root, "OriginalImg")), r.expression,
          r.subject) for r in records]
  assert got == [
      ("VL/Strong/P001/Anger/002.jpeg", "anger", "P001"),
      ("VL/Strong/P001/Anger/003.jpeg", "anger", "P001"),
      ("VL/Strong/P001/Anger/004.jpeg", "anger", "P001"),
      ("VL/Strong/P001/Happiness/001.jpeg", "happiness", "P001"),
      ("VL/Strong/P001/Happiness/002.jpeg", "happiness", "P001"),
      ("VL/Strong/P001/Happiness/003.jpeg", "happiness", "P001"),
      ("VL/Strong/P002/Disgust/000.jpeg", "disgust", "P002"),
      ("VL/Strong/P002/Surprise/009.jpeg", "surprise", "P002"),
      ("VL/Strong/P002/Surprise/010.jpeg", "surprise", "P002"),
      ("VL/Strong/P002/Surprise/011.jpeg", "surprise", "P002")]
  assert "neutral" not in {r.expression for r in records}


def test_oulu_neutral_flag_and_mtcnn(tmp_path, fake_preprocess):
  root = _oulu(str(tmp_path / "Oulu"))
  skipped = collections.Counter()
  records = importers.list_oulu(os.path.join(root, "OriginalImg"),
                                include_neutral=True, skipped=skipped)
  neutral = [os.path.basename(r.path) for r in records if r.expression == "neutral"]
  assert neutral == ["000.jpeg", "000.jpeg", "000.jpeg"]
  assert skipped == {"sequence with fewer than 2 frame(s)": 1}  # 1-frame Disgust
  # Short sequence (4 frames): neutral 000, peak 001-003; never overlapping.
  happy = [os.path.basename(r.path) for r in records if r.expression == "happiness"]
  assert happy == ["001.jpeg", "002.jpeg", "003.jpeg"]
  result = _import("oulu", root, tmp_path / "faces",
                   list_options=dict(include_neutral=True))
  assert len(fake_preprocess[0]["items"]) == len(records)
  assert result["written"]["per_class"]["neutral"] == 3
  assert result["written"]["num_subjects"] == 2


def test_oulu_every_class_natural_order_and_condition(tmp_path):
  """Catches a lister that drops one of the six class folders, sorts frame
  names as strings (1, 10, 11, 12, 2, ... would make 7-9 the "peak"), or ignores
  the modality and illumination it is asked for."""
  root = str(tmp_path)
  classes = ("Anger", "Disgust", "Fear", "Happiness", "Sadness", "Surprise")
  for cls in classes:
    _image(os.path.join(root, "VL", "Strong", "P003", cls, "0.jpeg"), shape=(8, 8))
  for k in range(1, 13):
    _image(os.path.join(root, "VL", "Strong", "P004", "Fear", f"{k}.jpeg"),
           shape=(8, 8))
  _image(os.path.join(root, "VL", "Strong", "P004", "Contempt", "0.jpeg"), shape=(8, 8))
  _image(os.path.join(root, "NI", "Weak", "P005", "Sadness", "0.jpeg"), shape=(8, 8))
  skipped = collections.Counter()
  records = importers.list_oulu(root, skipped=skipped)
  assert [r.expression for r in records if r.subject == "P003"] == [
      "anger", "disgust", "fear", "happiness", "sadness", "surprise"]
  assert [os.path.basename(r.path) for r in records if r.subject == "P004"] == [
      "10.jpeg", "11.jpeg", "12.jpeg"]
  assert skipped == {"unknown class folder 'Contempt'": 1}
  assert "P005" not in {r.subject for r in records}
  other = importers.list_oulu(root, modality="NI", illumination="Weak")
  assert [(r.subject, r.expression) for r in other] == [("P005", "sadness")]


def test_oulu_wrong_layout(tmp_path):
  os.makedirs(tmp_path / "VL" / "Weak")
  with pytest.raises(DataError, match=r"expected VL/Strong/P001/Anger/000\.jpeg .* under "
                     + str(tmp_path)):
    importers.list_oulu(str(tmp_path))


# --------------------------------------------------------------------------- AffectNet


def _affectnet_npy(root):
  labels = {"train_set": {"0": "1", "1": "7", "2": "6", "3": None, "10": "0"},
            "val_set": {"0": "3", "1": "5"}}
  for part, items in labels.items():
    os.makedirs(os.path.join(root, part, "annotations"), exist_ok=True)
    for stem, code in items.items():
      _image(os.path.join(root, part, "images", f"{stem}.jpg"), shape=(56, 56))
      if code is not None:
        # The re-distribution stores the code as a 0-d string array.
        np.save(os.path.join(root, part, "annotations", f"{stem}_exp.npy"),
                np.array(code))
        np.save(os.path.join(root, part, "annotations", f"{stem}_val.npy"),
                np.array("0.25"))
  return root


def test_affectnet_npy_listing(tmp_path):
  root = _affectnet_npy(str(tmp_path / "AffectNet"))
  skipped = collections.Counter()
  records = importers.list_affectnet(root, skipped=skipped)
  got = [(os.path.relpath(r.path, root), r.expression, r.split) for r in records]
  assert got == [("train_set/images/0.jpg", "happiness", "train"),
                 ("train_set/images/2.jpg", "anger", "train"),
                 ("train_set/images/10.jpg", "neutral", "train"),
                 ("val_set/images/0.jpg", "surprise", "test"),
                 ("val_set/images/1.jpg", "disgust", "test")]
  assert skipped == {"contempt (no canonical class)": 1, "no _exp.npy annotation": 1}


def test_affectnet_aligned_direct_and_mtcnn(tmp_path, fake_preprocess):
  root = _affectnet_npy(str(tmp_path / "AffectNet"))
  out = tmp_path / "aligned"
  _import("affectnet", root, out, aligned=True)
  records = contract.read_manifest(str(out))
  assert not fake_preprocess
  # train_set and val_set both hold 0.jpg: the split keeps the names apart.
  assert [r.path for r in records] == [
      "happiness/affectnet_train_0.png", "anger/affectnet_train_2.png",
      "neutral/affectnet_train_10.png", "surprise/affectnet_test_0.png",
      "disgust/affectnet_test_1.png"]
  _check_faces(str(out), records)
  _import("affectnet", root, tmp_path / "mtcnn")
  assert len(fake_preprocess[0]["items"]) == 5
  with pytest.raises(UserError, match="--aligned applies to"):
    _import("rafdb", root, tmp_path / "x", aligned=True)


def test_affectnet_csv_form(tmp_path, fake_preprocess):
  root = tmp_path / "AffectNet"
  images = root / "Manually_Annotated" / "Manually_Annotated_Images"
  lists = root / "Manually_Annotated_file_lists"
  os.makedirs(lists)
  header = ("subDirectory_filePath,face_x,face_y,face_width,face_height,"
            "facial_landmarks,expression,valence,arousal\n")
  rows = {"training.csv": [("689/aa11.jpg", 4), ("689/bb22.jpg", 8),
                           ("12/cc33.jpg", 2), ("12/dd44.jpg", 10),
                           ("12/missing.jpg", 1)],
          "validation.csv": [("7/ee55.jpg", 9), ("7/ff66.jpg", 0), ("7/gg77.jpg", 11)]}
  for name, items in rows.items():
    with open(lists / name, "w") as f:
      f.write(header)
      for rel, code in items:
        if "missing" not in rel:
          # A bright face box at (20, 10) size 40x40 on a dark 80x80 image.
          path = _image(str(images / rel), shape=(80, 80), value=10)
          image = cv2.imread(path)
          image[10:50, 20:60] = 240
          cv2.imwrite(path, image)
        f.write(f'{rel},20,10,40,40,"1.0;2.0;3.0",{code},0.1,-0.2\n')
  skipped = collections.Counter()
  records = importers.list_affectnet(str(root), skipped=skipped)
  assert [(os.path.basename(r.path), r.expression, r.split) for r in records] == [
      ("aa11.jpg", "fear", "train"), ("cc33.jpg", "sadness", "train"),
      ("ff66.jpg", "neutral", "test")]
  # Codes 8-10 and unknown ones are dropped, never mistaken for a class (8,
  # "None", means none of the eight, not neutral).
  assert skipped == {"AffectNet code 8 (None)": 1, "AffectNet code 10 (Non-Face)": 1,
                     "AffectNet code 9 (Uncertain)": 1, "image missing": 1,
                     "unknown AffectNet code 11": 1}
  out = tmp_path / "faces"
  _import("affectnet", root, out, aligned=True)
  written = contract.read_manifest(str(out))
  assert len(written) == 3
  # --aligned on the CSV form crops the listed face box before resizing.
  face = cv2.imread(str(out / written[0].path), cv2.IMREAD_GRAYSCALE)
  assert face.mean() > 200


def test_affectnet_wrong_layout(tmp_path):
  with pytest.raises(DataError, match="AffectNet: expected train_set/images/"):
    importers.list_affectnet(str(tmp_path))


# --------------------------------------------------------------------------- folder


def test_folder_listing_and_mtcnn(tmp_path, fake_preprocess):
  root = tmp_path / "mine"
  _image(str(root / "Happy" / "a.jpg"))
  _image(str(root / "Happy" / "session2" / "b.png"))
  _image(str(root / "angry" / "c.jpg"))
  _image(str(root / "Contempt" / "d.jpg"))
  (root / "angry" / "notes.txt").write_text("not an image")
  os.makedirs(root / ".cache")
  skipped = collections.Counter()
  records = importers.list_folder(str(root), skipped=skipped)
  assert [(os.path.relpath(r.path, root), r.expression) for r in records] == [
      ("angry/c.jpg", "anger"), ("Happy/a.jpg", "happiness"),
      ("Happy/session2/b.png", "happiness")]
  assert skipped == {"class folder 'Contempt' is dropped (not one of the 7 classes)": 1}
  result = _import("folder", root, tmp_path / "faces")
  assert result["written"]["per_class"] == {"anger": 1, "happiness": 2}
  os.makedirs(root / "Bored")
  with pytest.raises(DataError, match="Bored"):
    importers.list_folder(str(root))


# --------------------------------------------------------------------------- common


def test_output_dir_rules(tmp_path):
  root = _rafdb(str(tmp_path))
  before = _snapshot(root)
  # The dataset itself, a folder inside it, or a link that resolves into it
  # (catches a check on the spelled path instead of the real one).
  os.symlink(os.path.join(root, "Image"), tmp_path / "link")
  for inside in (root, os.path.join(root, "faces"), str(tmp_path / "link" / "faces")):
    with pytest.raises(UserError, match="inside --root"):
      _import("rafdb", root, inside)
  assert _snapshot(root) == before
  # A sibling that merely shares the name's prefix is not inside.
  sibling = root.rstrip(os.sep) + "_faces"
  assert importers.check_output_dir(sibling, root) == os.path.realpath(sibling)
  # A folder of the user's own files is refused, and left exactly as it was:
  # catches a writer that checks only after writing, or not at all.
  out = tmp_path / "busy"
  os.makedirs(out)
  (out / "something.txt").write_text("x")
  with pytest.raises(UserError, match="not empty"):
    _import("rafdb", root, out)
  assert _files_under(str(out)) == ["something.txt"]
  (out / "file").write_text("x")
  with pytest.raises(UserError, match="is a file"):
    _import("rafdb", root, out / "file")
  with pytest.raises(UserError, match="--output_dir"):
    _import("rafdb", root, "")
  result = _import("rafdb", root, tmp_path / "never", dry_run=True)
  assert result["found"]["num_images"] == 7
  assert not os.path.exists(tmp_path / "never")


def test_list_dataset_dispatches_by_name(tmp_path):
  """Catches a dispatch table that sends a name to another dataset's lister or
  drops the lister's options."""
  root = _oulu(str(tmp_path / "Oulu"))
  assert importers.list_dataset("oulu", root, include_neutral=True) == (
      importers.list_oulu(root, include_neutral=True))
  basic = _rafdb(str(tmp_path))
  assert importers.list_dataset("rafdb", basic) == importers.list_rafdb(basic)
  with pytest.raises(UserError, match="unknown dataset 'jaffe'"):
    importers.list_dataset("jaffe", basic)
  with pytest.raises(UserError, match="unknown --dataset 'jaffe'"):
    _import("jaffe", basic, tmp_path / "out")


def test_limit_spreads_over_classes(tmp_path):
  records = [contract.Record(f"{e}/{i}.png", e) for e in contract.EXPRESSIONS
             for i in range(10)]
  picked = importers.spread(records, 7)
  assert len(picked) == 7 and len({r.expression for r in picked}) == 7
  assert importers.spread(records, None) == records
  root = _rafdb(str(tmp_path))
  _import("rafdb", root, tmp_path / "faces", limit=2)
  assert len(contract.read_manifest(str(tmp_path / "faces"))) == 2


def test_format_summary_lists_classes_splits_and_skips():
  records = [contract.Record("a", "anger", "s1", split="train"),
             contract.Record("b", "anger", "s2", split="test"),
             contract.Record("c", "fear", "s1", split="train")]
  text = importers.format_summary("X", importers.summarize(records),
                                  {"image missing": 2})
  assert "X: 3 images" in text and "subjects: 2" in text
  assert "skipped 2: image missing" in text
  anger = next(line for line in text.splitlines() if line.strip().startswith("anger"))
  assert anger.split()[1:] == ["1", "1", "2"]  # test, train, total


def _cli(*args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_ENABLE_ONEDNN_OPTS="0")
  return subprocess.run([sys.executable, "-m", "data_tools.import_dataset", *args],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
                        check=False)


def test_cli_wrong_layout_is_one_line_exit_2(tmp_path):
  os.makedirs(tmp_path / "basic")
  proc = _cli("--dataset=rafdb", f"--root={tmp_path / 'basic'}",
              f"--output_dir={tmp_path / 'out'}")
  assert proc.returncode == 2
  assert proc.stderr.strip() == (
      f"error: RAF-DB: expected EmoLabel/list_patition_label.txt under "
      f"{tmp_path / 'basic'} (point --root at RAF-DB's basic/ folder)")
  assert "Traceback" not in proc.stderr


def test_cli_imports_fer2013_and_help(tmp_path):
  root = tmp_path / "fer"
  _fer2013(str(root), FER_ROWS)
  proc = _cli("--dataset=fer2013", f"--root={root}", f"--output_dir={tmp_path / 'o'}")
  assert proc.returncode == 0, proc.stderr
  assert "skipped 1: pixels are not 48x48" in proc.stdout
  assert len(contract.read_manifest(str(tmp_path / "o"))) == 6
  proc = _cli("--help")  # absl exits 1 after printing the help
  for name in importers.DATASETS:
    assert name in proc.stdout
  assert "list_patition_label.txt" in proc.stdout
