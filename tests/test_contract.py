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


def test_expressions_keep_their_label_order():
  """Catches a reordered or renamed class list: labels on disk and classifier
  outputs in checkpoints are indices into it."""
  assert contract.EXPRESSIONS == (
      "neutral", "anger", "disgust", "fear", "happiness", "sadness", "surprise")
  assert contract.NUM_CLASSES == 7
  assert [contract.expression_index(e) for e in contract.EXPRESSIONS] == list(range(7))
  with pytest.raises(DataError, match="unknown expression 'Happy'") as error:
    _ = contract.Record("a.png", "Happy").label
  assert "\n" not in str(error.value)


def test_round_trip_keeps_every_field(tmp_path):
  """Catches a writer or reader that drops a field (subject, source, split), writes
  the manifest non-atomically, or leaves it readable only by its owner."""
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
  """Catches bad face sets that give a traceback, or a message without the cause."""
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
  """Catches a failed write that truncates the old manifest or leaves a temp file."""
  contract.write_manifest(str(tmp_path), [_record(0)])
  before = (tmp_path / "manifest.csv").read_text()
  with pytest.raises(DataError):
    contract.write_manifest(str(tmp_path), [_record(1), _record(2, "contempt")])
  assert (tmp_path / "manifest.csv").read_text() == before
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".manifest")]


def test_read_fills_optional_columns_and_strips_spaces(tmp_path):
  """Catches manifests without the optional subject/source/split columns failing to
  read, and padded cells (from hand edits) becoming unknown subjects or splits."""
  _touch(str(tmp_path), [_record(0), _record(1, "anger")])
  with open(tmp_path / "manifest.csv", "w") as f:
    f.write("path,expression\nhappiness/0.png, happiness \n")
  assert contract.read_manifest(str(tmp_path)) == [
      contract.Record("happiness/0.png", "happiness")]
  with open(tmp_path / "manifest.csv", "w") as f:
    f.write("path,expression,subject,source,split\n"
            " anger/1.png ,anger, s7 , ck , test \n")
  assert contract.read_manifest(str(tmp_path)) == [
      contract.Record("anger/1.png", "anger", "s7", "ck", "test")]


def test_write_takes_dicts_and_extra_columns_that_reading_ignores(tmp_path):
  """Catches importers' dict rows or extra columns (e.g. a quality score) being
  dropped on write or leaking into the Records on read."""
  rows = [dict(path="fear/0.png", expression="fear", subject="s1", source="x",
               split="", quality="0.9")]
  _touch(str(tmp_path), [_record(0, "fear")])
  contract.write_manifest(str(tmp_path), rows, extra_fields=["quality"])
  header = (tmp_path / "manifest.csv").read_text().splitlines()[0]
  assert header == "path,expression,subject,source,split,quality"
  assert contract.read_manifest(str(tmp_path)) == [
      contract.Record("fear/0.png", "fear", "s1", "x")]


def test_read_without_file_checks_lists_missing_files(tmp_path):
  """Catches check_files=False being ignored, or dropping the rows whose files are
  missing, and the default check missing them."""
  records = [_record(0), _record(1, "anger", "")]
  contract.write_manifest(str(tmp_path), records)
  assert contract.read_manifest(str(tmp_path), check_files=False) == records
  with pytest.raises(DataError, match="names 2 missing file"):
    contract.read_manifest(str(tmp_path))
