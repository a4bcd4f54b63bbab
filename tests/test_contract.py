"""The on-disk data contract: round trip and one-line errors for bad face sets."""

import os

import pytest

from dicefer_jax import contract
from dicefer_jax.errors import DataError


def _record(i, expression="happiness", subject="s1"):
  return contract.Record(path=f"{expression}/{i}.png", expression=expression,
                         subject=subject, source="test")


def _touch(data_dir, records):
  for r in records:
    os.makedirs(os.path.join(data_dir, os.path.dirname(r.path)), exist_ok=True)
    open(os.path.join(data_dir, r.path), "wb").close()


def test_round_trip_keeps_every_field(tmp_path):
  records = [_record(0), _record(1, "anger", ""), contract.Record(
      "fear/2.png", "fear", "s2", "x", split="test")]
  _touch(str(tmp_path), records)
  contract.write_manifest(str(tmp_path), records)
  assert contract.read_manifest(str(tmp_path)) == records
  assert [r.label for r in records] == [4, 1, 3]
  mode = os.stat(tmp_path / "manifest.csv").st_mode & 0o777
  umask = os.umask(0)
  os.umask(umask)
  assert mode == 0o666 & ~umask
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".manifest")]


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty", "is empty"),
    ("no_manifest", "manifest.csv not found"),
    ("missing_files", "names 1 missing file"),
    ("unknown_expression", "unknown expression 'Happy'"),
    ("no_rows", "lists no images"),
    ("bad_header", "lacks the column"),
])
def test_bad_face_sets_give_one_line(tmp_path, case, message):
  data_dir = str(tmp_path / "faces")
  if case != "missing":
    os.makedirs(data_dir)
  if case == "no_manifest":
    open(os.path.join(data_dir, "x.png"), "wb").close()
  if case == "missing_files":
    records = [_record(0), _record(1)]
    _touch(data_dir, records[:1])
    contract.write_manifest(data_dir, records)
  manifest = os.path.join(data_dir, "manifest.csv")
  if case == "unknown_expression":
    with open(manifest, "w") as f:
      f.write("path,expression,subject,source\nhappy/0.png,Happy,s1,x\n")
  if case == "no_rows":
    with open(manifest, "w") as f:
      f.write("path,expression,subject,source\n")
  if case == "bad_header":
    with open(manifest, "w") as f:
      f.write("file,label\na.png,anger\n")
  with pytest.raises(DataError, match=message) as error:
    contract.read_manifest(data_dir)
  assert "\n" not in str(error.value)


def test_write_refuses_unknown_expressions_and_leaves_old_manifest(tmp_path):
  contract.write_manifest(str(tmp_path), [_record(0)])
  before = open(tmp_path / "manifest.csv").read()
  with pytest.raises(DataError):
    contract.write_manifest(str(tmp_path), [_record(1), _record(2, "contempt")])
  assert open(tmp_path / "manifest.csv").read() == before
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".manifest")]
