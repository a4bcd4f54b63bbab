"""What the audit found: one row per (image, kind of problem), and its CSV.

`DIR/audit/findings.csv` is the audit's output and, once a person has filled in
the `decision` column (in a spreadsheet or in the review page), the input of
`--apply`. Every check writes `Finding`s; nothing else of the audit is shared
between checks.

Columns:
  path        the image, relative to the face set (as in manifest.csv)
  kind        one of KINDS
  score       severity: larger is more suspect, comparable within a kind only
  suggestion  what the audit would do: keep, drop, or relabel:<expression>
  detail      one line a person reads (the measured value and its threshold)
  related     other paths, ";"-separated (near-duplicates of this image)
  expression  the image's label in the manifest
  subject     its subject ("" when unknown)
  decision    a person's decision: "", keep, drop or relabel
  new_expression  the label of a `relabel` decision
"""

import csv
import dataclasses
import io
import os
from typing import Iterable, Sequence

from dicefer_jax import contract, fileio
from dicefer_jax.errors import DataError

BLUR = "blur"            # too little sharp detail
EXPOSURE = "exposure"    # too dark, too bright or too little contrast
FRAMING = "framing"      # no face, or one off the template position, too small, cut off
DUPLICATE = "duplicate"  # exact or near-duplicate of another image (any label)
LABEL = "label"          # out-of-fold predictions disagree with the label
KINDS = (BLUR, EXPOSURE, FRAMING, DUPLICATE, LABEL)

KEEP, DROP, RELABEL = "keep", "drop", "relabel"
DECISIONS = (KEEP, DROP, RELABEL)

# Where the audit writes, inside the face set's directory, and its main output.
AUDIT_DIR = "audit"
FINDINGS_NAME = "findings.csv"

FIELDS = ("path", "kind", "score", "suggestion", "detail", "related", "expression",
          "subject", "decision", "new_expression")


@dataclasses.dataclass
class Finding:
  path: str
  kind: str
  score: float
  suggestion: str = DROP
  detail: str = ""
  related: tuple[str, ...] = ()
  expression: str = ""
  subject: str = ""
  decision: str = ""
  new_expression: str = ""

  def as_row(self) -> dict:
    row = dataclasses.asdict(self)
    row["score"] = f"{self.score:.6g}"
    row["related"] = ";".join(self.related)
    return row


def audit_dir(data_dir: str) -> str:
  """DIR/audit, where every file of the audit goes."""
  return os.path.join(data_dir, AUDIT_DIR)


def findings_path(data_dir: str) -> str:
  return os.path.join(audit_dir(data_dir), FINDINGS_NAME)


def relabel_suggestion(expression: str) -> str:
  contract.expression_index(expression)
  return f"{RELABEL}:{expression}"


def sort_findings(findings: Iterable[Finding]) -> list[Finding]:
  """By kind (KINDS order), then largest score first, then path: the order of
  the CSV, the contact sheets and the review page."""
  return sorted(findings, key=lambda f: (KINDS.index(f.kind), -f.score, f.path))


def findings_csv_text(findings: Sequence[Finding]) -> str:
  text = io.StringIO(newline="")
  writer = csv.DictWriter(text, fieldnames=FIELDS)
  writer.writeheader()
  for f in findings:
    writer.writerow(f.as_row())
  return text.getvalue()


def write_findings(path: str, findings: Sequence[Finding]) -> None:
  """Writes the CSV atomically (a reader never sees half a file)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fileio.write_text_atomic(path, findings_csv_text(findings))


def read_findings(path: str) -> list[Finding]:
  """Reads a findings CSV (the audit's or a person's edited copy).

  Raises DataError (one line, naming the file and line) for a missing file or
  column, an unknown kind, decision or expression, or a score that is not a number.
  """
  if not os.path.isfile(path):
    raise DataError(f"{path} not found: pass the findings CSV the audit wrote "
                    "(DIR/audit/findings.csv) or a reviewed copy of it")
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.DictReader(f)
    missing = [c for c in ("path", "kind") if c not in (reader.fieldnames or [])]
    if missing:
      raise DataError(f"{path} lacks the column(s) {', '.join(missing)}: its header "
                      f"must be {','.join(FIELDS)}")
    findings = []
    for line, row in enumerate(reader, start=2):
      where = f"{path} line {line}"
      kind = (row.get("kind") or "").strip()
      if kind not in KINDS:
        raise DataError(f"{where}: unknown kind {kind!r}; use one of {', '.join(KINDS)}")
      decision = (row.get("decision") or "").strip().lower()
      if decision not in ("",) + DECISIONS:
        raise DataError(f"{where}: decision {decision!r} is not one of "
                        f"{', '.join(DECISIONS)} (or empty for undecided)")
      new_expression = (row.get("new_expression") or "").strip()
      if decision == RELABEL:
        if not new_expression:
          raise DataError(f"{where}: decision relabel needs new_expression (one of "
                          f"{', '.join(contract.EXPRESSIONS)})")
        if new_expression not in contract.EXPRESSIONS:
          raise DataError(f"{where}: new_expression {new_expression!r} is not one of "
                          f"{', '.join(contract.EXPRESSIONS)}")
      try:
        score = float(row.get("score") or "nan")
      except ValueError:
        raise DataError(f"{where}: score {row.get('score')!r} is not a number") from None
      related = tuple(p for p in (row.get("related") or "").split(";") if p)
      findings.append(Finding(
          path=(row.get("path") or "").strip(), kind=kind, score=score,
          suggestion=(row.get("suggestion") or "").strip(),
          detail=(row.get("detail") or "").strip(), related=related,
          expression=(row.get("expression") or "").strip(),
          subject=(row.get("subject") or "").strip(), decision=decision,
          new_expression=new_expression))
  return findings
