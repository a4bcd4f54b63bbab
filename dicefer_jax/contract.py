"""The on-disk data contract shared by every producer and consumer of faces.

A preprocessed face set is a directory holding 112x112 8-bit grayscale PNGs under
`<dir>/<expression>/` and `<dir>/manifest.csv` with (at least) the columns
`path, expression, subject, source`, and optionally `split` (`train`/`test`, set only
where a dataset ships an official split). `path` is relative to the directory,
`subject` and `split` are empty when unknown. The synthetic set, MTCNN preprocessing and every importer write
this; the TFDS builder and the tf.data pair pipeline read only this.
"""

import csv
import dataclasses
import io
import os
from typing import Iterable, Sequence

from dicefer_jax import fileio
from dicefer_jax.errors import DataError

# Canonical classes, in label-index order. Never reorder: labels on disk and in
# checkpoints (classifier outputs) are indices into this tuple.
EXPRESSIONS = ("neutral", "anger", "disgust", "fear", "happiness", "sadness", "surprise")
NUM_CLASSES = len(EXPRESSIONS)
IMAGE_SIZE = 112
MANIFEST_NAME = "manifest.csv"
MANIFEST_FIELDS = ("path", "expression", "subject", "source", "split")


@dataclasses.dataclass(frozen=True)
class Record:
  """One face image of a data directory. `path` is relative to the directory."""

  path: str
  expression: str
  subject: str = ""
  source: str = ""
  split: str = ""

  @property
  def label(self) -> int:
    return expression_index(self.expression)


def expression_index(name: str) -> int:
  """Index of a canonical expression name; a clear error for anything else."""
  try:
    return EXPRESSIONS.index(name)
  except ValueError:
    raise DataError(
        f"unknown expression {name!r}: use one of {', '.join(EXPRESSIONS)}"
    ) from None


def face_set_location(data_dir: str) -> tuple[str, str]:
  """(image root, manifest file) of a face set.

  A face set is named by its directory (manifest `DIR/manifest.csv`) or by
  another manifest CSV inside that directory, such as the cleaned manifest
  `python -m data_tools.audit --apply` writes beside the original
  (`DIR/manifest.cleaned.csv`): paths are relative to the CSV's folder either way.
  """
  if data_dir and str(data_dir).lower().endswith(".csv") and os.path.isfile(data_dir):
    return os.path.dirname(os.path.abspath(data_dir)), str(data_dir)
  return data_dir, os.path.join(data_dir, MANIFEST_NAME) if data_dir else MANIFEST_NAME


def read_manifest(data_dir: str, check_files: bool = True) -> list[Record]:
  """Reads and validates `<data_dir>/manifest.csv` (or the manifest CSV `data_dir`
  names, see `face_set_location`).

  Raises DataError (one line, with what to do) for a missing or empty directory,
  a missing manifest or column, an unknown expression, or files that do not exist.
  """
  data_dir, manifest = face_set_location(data_dir)
  if not data_dir or not os.path.isdir(data_dir):
    raise DataError(
        f"data directory {data_dir!r} does not exist: pass --config.data_dir=DIR "
        "pointing at a preprocessed face set, or leave it empty to use the "
        "built-in synthetic set")
  if not os.path.isfile(manifest):
    if not os.listdir(data_dir):
      raise DataError(
          f"data directory {data_dir!r} is empty: write a face set into it with "
          "`python -m data_tools.synthetic` or `python -m data_tools.preprocess`")
    raise DataError(
        f"{manifest} not found: {data_dir!r} is not a preprocessed face set; "
        "create one with `python -m data_tools.preprocess` or an importer")
  with open(manifest, newline="") as f:
    reader = csv.DictReader(f)
    missing_cols = [c for c in ("path", "expression") if c not in (reader.fieldnames or [])]
    if missing_cols:
      raise DataError(
          f"{manifest} lacks the column(s) {', '.join(missing_cols)}: its header must "
          f"be {','.join(MANIFEST_FIELDS)}")
    records = []
    for line, row in enumerate(reader, start=2):
      expression = (row.get("expression") or "").strip()
      if expression not in EXPRESSIONS:
        raise DataError(
            f"{manifest} line {line}: unknown expression {expression!r}; use one of "
            f"{', '.join(EXPRESSIONS)}")
      records.append(Record(
          path=row["path"].strip(), expression=expression,
          subject=(row.get("subject") or "").strip(),
          source=(row.get("source") or "").strip(),
          split=(row.get("split") or "").strip()))
  if not records:
    raise DataError(f"{manifest} lists no images: the face set is empty")
  if check_files:
    missing = [r.path for r in records if not os.path.isfile(os.path.join(data_dir, r.path))]
    if missing:
      raise DataError(
          f"{manifest} names {len(missing)} missing file(s), e.g. {missing[0]!r}: "
          "restore them or regenerate the manifest")
  return records


def write_manifest(data_dir: str, records: Iterable[Record],
                   extra_fields: Sequence[str] = ()) -> str:
  """Writes `<data_dir>/manifest.csv` atomically (temp file + rename).

  Records may be dataclass Records or dicts with the contract's fields (plus
  `extra_fields`). Returns the manifest path.
  """
  os.makedirs(data_dir, exist_ok=True)
  fields = list(MANIFEST_FIELDS) + [f for f in extra_fields if f not in MANIFEST_FIELDS]
  manifest = os.path.join(data_dir, MANIFEST_NAME)
  text = io.StringIO(newline="")
  writer = csv.DictWriter(text, fieldnames=fields, extrasaction="ignore")
  writer.writeheader()
  for r in records:
    row = dataclasses.asdict(r) if dataclasses.is_dataclass(r) else dict(r)
    expression_index(row["expression"])
    writer.writerow(row)
  fileio.write_text_atomic(manifest, text.getvalue())
  return manifest
