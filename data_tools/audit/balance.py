"""Class and subject balance: counts per class and per subject, and which
expressions some subjects lack.

Training pairs are two images of the same expression from different people,
so an expression shown by fewer than two subjects yields no pair at all, and a
subject who lacks an expression never appears in that expression's pairs.
"""

import collections
import csv
import html
import io
from typing import Sequence

from dicefer_jax import contract, fileio


def balance_table(records: Sequence[contract.Record]) -> dict:
  """Counts per class, per subject and class, and what is missing.

  Returns:
    {"classes": {expression: n}, "subjects": {subject: {expression: n}},
     "missing": {subject: [expressions it lacks]},
     "subjects_per_class": {expression: number of subjects showing it},
     "unpairable": [expressions shown by fewer than two subjects],
     "unknown_subject_images": n}
  """
  classes = collections.Counter(r.expression for r in records)
  per_subject = collections.defaultdict(collections.Counter)
  unknown = 0
  for r in records:
    if r.subject:
      per_subject[r.subject][r.expression] += 1
    else:
      unknown += 1
  subjects = {s: {e: per_subject[s][e] for e in contract.EXPRESSIONS}
              for s in sorted(per_subject)}
  missing = {s: [e for e in contract.EXPRESSIONS if not counts[e]]
             for s, counts in subjects.items()}
  per_class = {e: sum(1 for counts in subjects.values() if counts[e])
               for e in contract.EXPRESSIONS}
  unpairable = ([e for e in contract.EXPRESSIONS if per_class[e] < 2] if subjects else [])
  return dict(classes={e: classes[e] for e in contract.EXPRESSIONS}, subjects=subjects,
              missing={s: m for s, m in missing.items() if m},
              subjects_per_class=per_class, unpairable=unpairable,
              unknown_subject_images=unknown)


def write_balance_csv(path: str, table: dict) -> None:
  """One row per subject: its count of each class and the classes it lacks."""
  text = io.StringIO(newline="")
  writer = csv.writer(text)
  writer.writerow(["subject", *contract.EXPRESSIONS, "total", "missing"])
  for subject, counts in table["subjects"].items():
    writer.writerow([subject, *(counts[e] for e in contract.EXPRESSIONS),
                     sum(counts.values()), ";".join(table["missing"].get(subject, []))])
  writer.writerow(["(all)", *(table["classes"][e] for e in contract.EXPRESSIONS),
                   sum(table["classes"].values()), ""])
  fileio.write_text_atomic(path, text.getvalue())


def balance_html(table: dict, max_subjects: int = 300) -> str:
  """The balance section of the audit's index page."""
  e = html.escape
  total = sum(table["classes"].values()) or 1
  head = "".join(f"<th>{e(x)}</th>" for x in contract.EXPRESSIONS)

  def row(title, cells):
    return f"<tr><th>{e(title)}</th>{''.join(f'<td>{c}</td>' for c in cells)}</tr>"

  counts = [table["classes"][x] for x in contract.EXPRESSIONS]
  rows = [row("images", counts), row("share", [f"{100 * c / total:.1f}%" for c in counts])]
  if table["subjects"]:
    rows.append(row("subjects showing it",
                    [table["subjects_per_class"][x] for x in contract.EXPRESSIONS]))
  parts = [f"<table><tr><th></th>{head}</tr>{''.join(rows)}</table>"]
  if table["unpairable"]:
    parts.append(f"<p><b>No training pairs possible</b> for {e(', '.join(table['unpairable']))}: "
                 "fewer than two subjects show it.</p>")
  if table["unknown_subject_images"]:
    parts.append(f"<p>{table['unknown_subject_images']} image(s) have no subject id.</p>")
  if table["missing"]:
    items = list(table["missing"].items())
    lines = "".join(f"<li>{e(s)}: lacks {e(', '.join(m))}</li>" for s, m in items[:max_subjects])
    more = (f"<li>... and {len(items) - max_subjects} more (balance.csv lists all)</li>"
            if len(items) > max_subjects else "")
    parts.append(f"<p>{len(items)} of {len(table['subjects'])} subjects lack some "
                 f"expression:</p><ul>{lines}{more}</ul>")
  elif table["subjects"]:
    parts.append(f"<p>Every one of the {len(table['subjects'])} subjects shows all "
                 "seven expressions.</p>")
  return "".join(parts)
