"""`--apply`: a reviewed findings CSV in, a cleaned manifest out, beside the old one.

Nothing is deleted, moved or edited: not an image, not manifest.csv. The
cleaned manifest (`DIR/manifest.cleaned.csv` by default) lists the images
kept, relabelled ones under their new expression, with three more columns:
`audit_action` (keep / relabel), `audit_reason` and `original_expression`.
Beside it, `<name>.changes.csv` names every image dropped or relabelled, what
the person decided and which findings led there. Train on the cleaned set with
`--config.data_dir=DIR/manifest.cleaned.csv` (a face set may be named by a
manifest CSV in its directory: `contract.face_set_location`).

Per image the decisions of all its findings combine: drop wins over relabel,
relabel over keep; two relabels to different expressions are a conflict the
person must settle (one clear error line).
"""

import csv
import dataclasses
import io
import os

from data_tools.audit import findings as F
from dicefer_jax import contract, fileio
from dicefer_jax.errors import DataError, UserError

DEFAULT_OUTPUT = "manifest.cleaned.csv"
EXTRA_FIELDS = ("audit_action", "audit_reason", "original_expression")
CHANGE_FIELDS = ("path", "action", "expression", "new_expression", "subject", "kinds",
                 "details")


@dataclasses.dataclass(frozen=True)
class Applied:
  manifest: str        # the cleaned manifest written
  changes: str         # the changes CSV written
  kept: int            # images in the cleaned manifest (relabelled included)
  dropped: int
  relabelled: int
  undecided: int       # findings without a decision (their images are kept)


def _action_per_path(reviewed: list[F.Finding], known: set[str], source: str) -> dict:
  """path -> (action, new expression, [findings decided]) from the decisions."""
  unknown = sorted({f.path for f in reviewed} - known)
  if unknown:
    raise DataError(f"{source} names {len(unknown)} image(s) not in the manifest, e.g. "
                    f"{unknown[0]!r}: apply it to the face set it was made for")
  actions = {}
  for f in reviewed:
    if not f.decision:
      continue
    action, new, why = actions.get(f.path, (F.KEEP, "", []))
    why = why + [f]
    if f.decision == F.DROP or action == F.DROP:
      action, new = F.DROP, ""
    elif f.decision == F.RELABEL:
      if action == F.RELABEL and new != f.new_expression:
        raise DataError(f"{source}: {f.path} is relabelled both {new} and "
                        f"{f.new_expression}: keep one decision and apply again")
      action, new = F.RELABEL, f.new_expression
    actions[f.path] = (action, new, why)
  return actions


def _reason(why: list[F.Finding]) -> str:
  return " | ".join(f"{f.kind}: {f.detail}" if f.detail else f.kind for f in why)


def apply_decisions(data_dir: str, reviewed_csv: str, output: str = DEFAULT_OUTPUT
                    ) -> Applied:
  """Writes the cleaned manifest and its changes CSV (see the module docstring).

  Args:
    data_dir: the face set the findings are about.
    reviewed_csv: findings CSV with the decision column filled in.
    output: file name of the cleaned manifest, inside data_dir.

  Raises:
    UserError/DataError (one line): output names the original manifest or a
      file that exists, a decision is malformed or conflicting, a path is not
      in the manifest.
  """
  if os.path.basename(output) != output or not output.endswith(".csv"):
    raise UserError(f"--output={output!r}: give a file name ending in .csv; it is "
                    "written inside the face set's directory")
  if output == contract.MANIFEST_NAME:
    raise UserError(f"--output={output}: that is the original manifest, which the "
                    "audit never overwrites; choose another name")
  stem = output[:-len(".csv")]
  out_path = os.path.join(data_dir, output)
  changes_path = os.path.join(data_dir, f"{stem}.changes.csv")
  for path in (out_path, changes_path):
    if os.path.exists(path):
      raise UserError(f"{path} exists and is kept as it is: pass --output=NAME.csv "
                      "for a new cleaned manifest (or move the old one away)")
  records = contract.read_manifest(data_dir)
  reviewed = F.read_findings(reviewed_csv)
  actions = _action_per_path(reviewed, {r.path for r in records}, reviewed_csv)

  kept_rows, change_rows = [], []
  counts = {F.KEEP: 0, F.DROP: 0, F.RELABEL: 0}
  for r in records:
    action, new, why = actions.get(r.path, (F.KEEP, "", []))
    counts[action] += 1
    row = dataclasses.asdict(r)
    if action == F.DROP:
      change_rows.append(dict(path=r.path, action=F.DROP, expression=r.expression,
                              new_expression="", subject=r.subject,
                              kinds=";".join(sorted({f.kind for f in why})),
                              details=_reason(why)))
      continue
    row.update(audit_action=action, audit_reason=_reason(why) if why else "",
               original_expression=r.expression)
    if action == F.RELABEL:
      row["expression"] = new
      change_rows.append(dict(path=r.path, action=F.RELABEL, expression=r.expression,
                              new_expression=new, subject=r.subject,
                              kinds=";".join(sorted({f.kind for f in why})),
                              details=_reason(why)))
    kept_rows.append(row)
  if not kept_rows:
    raise UserError(f"{reviewed_csv} drops every image: nothing would be left to train on")

  # Written through the contract's writer (atomic, validated expressions),
  # under the new name: the original manifest is left alone.
  text = io.StringIO(newline="")
  writer = csv.DictWriter(text, fieldnames=list(contract.MANIFEST_FIELDS) + list(EXTRA_FIELDS),
                          extrasaction="ignore")
  writer.writeheader()
  for row in kept_rows:
    contract.expression_index(row["expression"])
    writer.writerow(row)
  changes = io.StringIO(newline="")
  change_writer = csv.DictWriter(changes, fieldnames=CHANGE_FIELDS)
  change_writer.writeheader()
  change_writer.writerows(change_rows)
  fileio.write_text_atomic(changes_path, changes.getvalue())
  fileio.write_text_atomic(out_path, text.getvalue())
  return Applied(manifest=out_path, changes=changes_path, kept=len(kept_rows),
                 dropped=counts[F.DROP], relabelled=counts[F.RELABEL],
                 undecided=sum(1 for f in reviewed if not f.decision))
