"""The audit's HTML pages: one contact sheet per kind of finding, and an index.

`DIR/audit/<kind>.html` is a grid a person scrolls: each finding's image (and,
for duplicates, its related images beside it) with its path, label, subject,
score, detail and suggestion, largest score first. `DIR/audit/index.html` links
the sheets with their counts, shows the measure distributions and any extra
sections the caller passes (a class/subject balance table, say).

Images are referenced, never embedded: a thumbnail's src is the image's path
relative to DIR/audit ("../" + the manifest path, URL-quoted), so a sheet of
thousands of findings stays small and opens from the file system as is. Plain
static HTML with inline CSS; every text from the data is escaped.
"""

import collections
import html
import os
import urllib.parse
from typing import Optional, Sequence

from data_tools.audit import findings
from dicefer_jax import contract
from dicefer_jax import fileio
from dicefer_jax.errors import DataError

INDEX_NAME = "index.html"
# A sheet lists at most this many findings (the CSV has them all): a wrong
# threshold flagging a whole 100k-image set should not make a page no browser
# can scroll.
MAX_PER_SHEET = 2000
# Related images drawn beside a duplicate (a group can be large).
MAX_RELATED_SHOWN = 8

_TITLES = {
    findings.BLUR: "Blurred images",
    findings.EXPOSURE: "Badly exposed images",
    findings.FRAMING: "Badly framed faces",
    findings.DUPLICATE: "Duplicates",
    findings.LABEL: "Suspect labels",
}

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.5em; }
.note { color: #555; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
.card { border: 1px solid #ccc; border-radius: 4px; padding: 6px; width: 260px;
        font-size: 12px; background: #fafafa; }
.card.wide { width: 540px; }
.card img { width: 112px; height: 112px; image-rendering: pixelated;
            background: #ddd; display: block; }
.images { display: flex; flex-wrap: wrap; gap: 4px; }
figure { margin: 0; } figcaption { font-size: 10px; max-width: 112px;
        overflow-wrap: anywhere; color: #444; }
.path { font-family: monospace; overflow-wrap: anywhere; }
.drop { color: #b03a2e; font-weight: bold; } .keep { color: #1e8449; font-weight: bold; }
.relabel { color: #7d3c98; font-weight: bold; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc;
        padding: 3px 8px; text-align: left; }
.plots { display: flex; flex-wrap: wrap; gap: 10px; }
.plots img { width: 480px; }
"""


def sheet_name(kind: str) -> str:
  return f"{kind}.html"


def image_src(path: str) -> str:
  """A manifest path as seen from DIR/audit/, URL-quoted and HTML-escaped."""
  return html.escape("../" + urllib.parse.quote(path.replace(os.sep, "/"), safe="/"),
                     quote=True)


def _e(value) -> str:
  return html.escape(str(value), quote=True)


def _page(title: str, body: str) -> str:
  return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
          f"<title>{_e(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
          f"{body}\n</body>\n</html>\n")


def _suggestion_html(suggestion: str) -> str:
  css = suggestion.split(":")[0] if suggestion else ""
  css = css if css in findings.DECISIONS else ""
  return f"<span class=\"{css}\">{_e(suggestion or '-')}</span>"


def _thumbnail(path: str, caption: str) -> str:
  return (f"<figure><img src=\"{image_src(path)}\" loading=\"lazy\" alt=\"{_e(path)}\">"
          f"<figcaption>{caption}</figcaption></figure>")


def _card(finding: findings.Finding,
          records_by_path: dict[str, contract.Record]) -> str:
  images = [_thumbnail(finding.path, "this image")]
  for path in finding.related[:MAX_RELATED_SHOWN]:
    record = records_by_path.get(path)
    label = f"<br>{_e(record.expression)}" if record else ""
    images.append(_thumbnail(path, f"<span class=\"path\">{_e(path)}</span>{label}"))
  more = len(finding.related) - MAX_RELATED_SHOWN
  if more > 0:
    images.append(f"<span class=\"note\">+{more} more (see findings.csv)</span>")
  wide = " wide" if finding.related else ""
  score = f"{finding.score:.4g}"
  return (
      f"<div class=\"card{wide}\">\n<div class=\"images\">{''.join(images)}</div>\n"
      f"<div class=\"path\">{_e(finding.path)}</div>\n"
      f"<div>label <b>{_e(finding.expression or '?')}</b> &middot; subject "
      f"{_e(finding.subject or 'unknown')}</div>\n"
      f"<div>score {_e(score)} &middot; suggestion "
      f"{_suggestion_html(finding.suggestion)}</div>\n"
      f"<div class=\"note\">{_e(finding.detail)}</div>\n</div>")


def sheet_html(kind: str, kind_findings: Sequence[findings.Finding],
               records: Sequence[contract.Record] = (),
               max_items: int = MAX_PER_SHEET) -> str:
  """The contact sheet of one kind: its findings, largest score first.

  Args:
    kind: one of findings.KINDS.
    kind_findings: the findings of that kind (others are refused).
    records: the face set's records, to label related images (optional).
    max_items: at most this many cards (the page says how many were left out).
  """
  if kind not in findings.KINDS:
    raise DataError(f"unknown finding kind {kind!r}: use one of "
                    f"{', '.join(findings.KINDS)}")
  wrong = [f.kind for f in kind_findings if f.kind != kind]
  if wrong:
    raise DataError(f"the {kind} sheet was given a {wrong[0]} finding")
  ordered = findings.sort_findings(kind_findings)
  shown = ordered[:max(0, int(max_items))]
  records_by_path = {r.path: r for r in records}
  title = _TITLES.get(kind, kind)
  drops = sum(f.suggestion == findings.DROP for f in ordered)
  parts = [f"<p><a href=\"{INDEX_NAME}\">&larr; audit index</a></p>",
           f"<h1>{_e(title)} ({len(ordered)})</h1>",
           f"<p class=\"note\">Kind <code>{_e(kind)}</code>: largest score first; "
           f"{drops} suggested drop. Decide in findings.csv (column "
           "<code>decision</code>).</p>"]
  if len(shown) < len(ordered):
    parts.append(f"<p class=\"note\">Showing the first {len(shown)} of "
                 f"{len(ordered)}; findings.csv lists them all.</p>")
  if not ordered:
    parts.append("<p>No findings of this kind.</p>")
  parts.append("<div class=\"grid\">")
  parts.extend(_card(f, records_by_path) for f in shown)
  parts.append("</div>")
  return _page(f"audit: {title}", "\n".join(parts))


def index_html(all_findings: Sequence[findings.Finding],
               kinds: Sequence[str] = findings.KINDS,
               plots: Sequence[tuple[str, str]] = (),
               sections: Sequence[tuple[str, str]] = (),
               num_images: Optional[int] = None, title: str = "") -> str:
  """The audit's front page.

  Args:
    all_findings: every finding.
    kinds: the kinds that were checked (each gets a row and a sheet link).
    plots: (title, src) of figures, src relative to DIR/audit.
    sections: (title, html) extra sections; the title is escaped, the html is
      the caller's and inserted as is.
    num_images: images in the face set, when known.
    title: the page heading ("Face set audit" when empty).
  """
  by_kind = collections.Counter(f.kind for f in all_findings)
  drops = collections.Counter(f.kind for f in all_findings
                              if f.suggestion == findings.DROP)
  images = collections.defaultdict(set)
  for f in all_findings:
    images[f.kind].add(f.path)
  heading = title or "Face set audit"
  parts = [f"<h1>{_e(heading)}</h1>"]
  flagged = len({f.path for f in all_findings})
  of_set = f" of {num_images}" if num_images is not None else ""
  parts.append(f"<p>{flagged}{of_set} images have at least one finding; "
               f"{len(all_findings)} findings in all (findings.csv).</p>")
  rows = ["<tr><th>kind</th><th>findings</th><th>images</th>"
          "<th>suggested drop</th></tr>"]
  for kind in kinds:
    rows.append(
        f"<tr><td><a href=\"{_e(sheet_name(kind))}\">{_e(_TITLES.get(kind, kind))}"
        f"</a> (<code>{_e(kind)}</code>)</td><td>{by_kind[kind]}</td>"
        f"<td>{len(images[kind])}</td><td>{drops[kind]}</td></tr>")
  parts.append(f"<table>{''.join(rows)}</table>")
  if plots:
    parts.append("<h2>Measure distributions</h2>")
    parts.append("<p class=\"note\">Each histogram's dashed line is the threshold "
                 "in use; move it where the distribution says.</p>")
    parts.append("<div class=\"plots\">")
    parts.extend(f"<img src=\"{_e(src)}\" alt=\"{_e(t)}\" title=\"{_e(t)}\">"
                 for t, src in plots)
    parts.append("</div>")
  for section_title, section_html in sections:
    parts.append(f"<section><h2>{_e(section_title)}</h2>\n{section_html}\n</section>")
  return _page(heading, "\n".join(parts))


def write_contact_sheets(data_dir: str, all_findings: Sequence[findings.Finding],
                         *, records: Sequence[contract.Record] = (),
                         kinds: Sequence[str] = findings.KINDS,
                         plots: Sequence[tuple[str, str]] = (),
                         sections: Sequence[tuple[str, str]] = (),
                         max_per_sheet: int = MAX_PER_SHEET,
                         title: str = "") -> list[str]:
  """Writes DIR/audit/<kind>.html for each kind and DIR/audit/index.html.

  Every kind in `kinds` gets a sheet, an empty one when nothing was found, so
  no sheet of an earlier run is left showing stale findings.

  Args:
    data_dir: the face set directory DIR.
    all_findings: every finding (of any kinds).
    records: the face set's records (labels of related images; image count).
    kinds: the kinds that were checked.
    plots: (title, path) of figures to show on the index; a path is taken
      relative to the current directory and linked relative to DIR/audit.
    sections: (title, html) extra sections of the index (html inserted as is).
    max_per_sheet: at most this many cards per sheet.
    title: the index heading.

  Returns:
    The paths written, the sheets first, the index last.
  """
  unknown = [k for k in list(kinds) + [f.kind for f in all_findings]
             if k not in findings.KINDS]
  if unknown:
    raise DataError(f"unknown finding kind {unknown[0]!r}: use one of "
                    f"{', '.join(findings.KINDS)}")
  missing = sorted({f.kind for f in all_findings} - set(kinds))
  if missing:
    raise DataError(f"findings of kind {missing[0]!r} but no sheet for it: add it "
                    "to kinds")
  out_dir = findings.audit_dir(data_dir)
  os.makedirs(out_dir, exist_ok=True)
  written = []
  for kind in kinds:
    path = os.path.join(out_dir, sheet_name(kind))
    fileio.write_text_atomic(path, sheet_html(
        kind, [f for f in all_findings if f.kind == kind], records, max_per_sheet))
    written.append(path)
  plot_srcs = [(t, urllib.parse.quote(os.path.relpath(p, out_dir).replace(os.sep, "/"),
                                      safe="/"))
               for t, p in plots]
  index = os.path.join(out_dir, INDEX_NAME)
  fileio.write_text_atomic(index, index_html(
      all_findings, kinds, plot_srcs, sections,
      num_images=len(records) if records else None, title=title))
  written.append(index)
  return written
