"""The audit's review page: a person decides keep, drop or relabel per finding.

  python -m data_tools.audit --data_dir=DIR --serve   # http://127.0.0.1:8000/audit/

Routes (added to the library's web app, `webapp.make_app(None, routes=...)`):

  GET  /, /audit          redirect to /audit/
  GET  /audit/            the page (static/review.html)
  GET  /audit/static/...  its script and style sheet
  GET  /audit/api/findings  the findings grouped by kind, largest score first,
                          with the decisions made so far
  GET  /audit/image?path=REL  an image of the face set that the findings or the
                          manifest name (anything else: 400 or 404)
  POST /audit/api/decision  {path, kind, decision, new_expression}; decision is
                          keep, drop, relabel or "" (undo)

Every decision is saved before it is answered: appended to a JSONL journal
(`DIR/audit/decisions.jsonl`, fsynced line by line; the last line for a
(path, kind) wins) and then the reviewed CSV (`DIR/audit/reviewed.csv`: every
findings row, decisions filled in: what `--apply` takes) is rewritten
atomically. A restarted server reads the journal back, so a crash or a reload
loses nothing. findings.csv and the images are only read.
"""

import dataclasses
import json
import logging
import math
import os
import threading
import time

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from data_tools.audit import findings as findings_lib
from dicefer_jax import contract, fileio
from dicefer_jax.errors import DataError, UserError

JOURNAL_NAME = "decisions.jsonl"
REVIEWED_NAME = "reviewed.csv"
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
# A decision is a few hundred bytes; anything far larger is not one.
MAX_DECISION_BYTES = 64 * 1024

_log = logging.getLogger(__name__)


class _BadRequest(Exception):
  """A refused decision; its message is the one line the page shows."""


def default_paths(data_dir: str) -> dict:
  """Where the review reads and writes by default: findings, journal, reviewed CSV."""
  audit = findings_lib.audit_dir(data_dir)
  return dict(findings=findings_lib.findings_path(data_dir),
              journal=os.path.join(audit, JOURNAL_NAME),
              reviewed=os.path.join(audit, REVIEWED_NAME))


def _suggested_expression(suggestion: str) -> str:
  """"happiness" for "relabel:happiness"; "" for keep, drop or a bad name."""
  kind, _, expression = suggestion.partition(":")
  if kind == findings_lib.RELABEL and expression in contract.EXPRESSIONS:
    return expression
  return ""


def _json_score(score: float):
  return score if math.isfinite(score) else None


class Review:
  """The findings under review, the decisions made, and where both are saved.

  One lock covers a journal append and the CSV rewrite after it, so two
  decisions posted together are saved in one order in both files.
  """

  def __init__(self, data_dir: str, findings_path: str | None = None,
               journal_path: str | None = None, reviewed_path: str | None = None):
    defaults = default_paths(data_dir)
    self.data_dir = os.path.abspath(data_dir)
    self.findings_path = os.path.abspath(findings_path or defaults["findings"])
    self.journal_path = os.path.abspath(journal_path or defaults["journal"])
    self.reviewed_path = os.path.abspath(reviewed_path or defaults["reviewed"])
    if not os.path.isdir(self.data_dir):
      raise DataError(f"data directory {data_dir!r} does not exist: pass the face "
                      "set the audit ran on")
    if self.reviewed_path == self.findings_path:
      # The audit's own output is never written over.
      raise UserError(f"{self.findings_path} is both the findings and the reviewed "
                      "CSV: review a findings CSV under another name")
    self.findings = findings_lib.sort_findings(
        findings_lib.read_findings(self.findings_path))
    self._index = {}
    for f in self.findings:
      if (f.path, f.kind) in self._index:
        raise DataError(f"{self.findings_path} lists {f.path} twice for kind "
                        f"{f.kind}: rerun the audit")
      self._index[(f.path, f.kind)] = f
    self._manifest = self._read_manifest()
    # Only these files are ever served: the findings' images, their near-
    # duplicates, and the manifest's images.
    self._servable = set(self._manifest)
    for f in self.findings:
      self._servable.add(f.path)
      self._servable.update(f.related)
    # Decisions start from the findings CSV's own column (a reviewed copy may
    # be reviewed again); the journal overrides them.
    self._decisions = {key: (f.decision, f.new_expression)
                       for key, f in self._index.items() if f.decision}
    self._lock = threading.Lock()
    if self._load_journal():
      # A crash between a journal line and the CSV rewrite left the CSV behind.
      self._write_reviewed()

  # ------------------------------------------------------------------ reading

  def _read_manifest(self) -> dict:
    """path -> Record of the face set's manifest ({} when there is none: the
    findings alone still say what to show)."""
    try:
      records = contract.read_manifest(self.data_dir, check_files=False)
    except DataError as e:
      _log.warning("reviewing without the manifest: %s", e)
      return {}
    return {r.path: r for r in records}

  def _load_journal(self) -> int:
    """Applies the journal's entries in order; returns how many were applied.

    A line a crash cut short, or an entry for a finding the CSV no longer lists
    (the audit was run again), is skipped with a warning and kept on disk.
    """
    if not os.path.isfile(self.journal_path):
      return 0
    with open(self.journal_path, "rb") as f:
      data = f.read()
    if data and not data.endswith(b"\n"):
      # The next entry must start on a line of its own, not after the cut one.
      with open(self.journal_path, "ab") as f:
        f.write(b"\n")
        f.flush()
        os.fsync(f.fileno())
    applied, skipped = 0, 0
    for line in data.decode("utf-8", errors="replace").splitlines():
      if not line.strip():
        continue
      try:
        entry = json.loads(line)
        key, value = self._check(entry)
      except (ValueError, TypeError, AttributeError, _BadRequest):
        skipped += 1
        continue
      self._set(key, value)
      applied += 1
    if skipped:
      _log.warning("%s: skipped %d entr(ies) that are cut short or name no "
                   "finding of %s", self.journal_path, skipped, self.findings_path)
    return applied

  def _set(self, key, value) -> None:
    if value[0]:
      self._decisions[key] = value
    else:
      self._decisions.pop(key, None)

  def _check(self, entry) -> tuple:
    """((path, kind), (decision, new_expression)) of a posted or journalled entry.

    Raises:
      _BadRequest: one line saying what is wrong.
    """
    if not isinstance(entry, dict):
      raise _BadRequest('send a JSON object {"path", "kind", "decision", '
                        '"new_expression"}')
    fields = {}
    for name in ("path", "kind", "decision", "new_expression"):
      value = entry.get(name, "")
      if value is None:
        value = ""
      if not isinstance(value, str):
        raise _BadRequest(f"{name} must be a string, not {value!r}")
      fields[name] = value.strip()
    path, kind = fields["path"], fields["kind"]
    decision, new_expression = fields["decision"].lower(), fields["new_expression"]
    if kind not in findings_lib.KINDS:
      raise _BadRequest(f"unknown kind {kind!r}: use one of "
                        f"{', '.join(findings_lib.KINDS)}")
    finding = self._index.get((path, kind))
    if finding is None:
      raise _BadRequest(f"no {kind} finding for {path!r} in {self.findings_path}")
    if decision not in ("",) + findings_lib.DECISIONS:
      raise _BadRequest(f"decision {decision!r} is not one of "
                        f"{', '.join(findings_lib.DECISIONS)} (or empty to undo)")
    if decision == findings_lib.RELABEL:
      if new_expression not in contract.EXPRESSIONS:
        raise _BadRequest(f"relabel needs new_expression, one of "
                          f"{', '.join(contract.EXPRESSIONS)}; got {new_expression!r}")
      if new_expression == finding.expression:
        raise _BadRequest(f"{path} is labelled {new_expression} already: choose "
                          "keep, or relabel to another expression")
    elif new_expression:
      raise _BadRequest(f"new_expression is only for relabel, not for "
                        f"{decision or 'undo'}")
    return (path, kind), (decision, new_expression)

  # ------------------------------------------------------------------ answers

  def rows(self) -> list:
    """Every finding with its current decision: the reviewed CSV's rows."""
    rows = []
    for f in self.findings:
      decision, new_expression = self._decisions.get((f.path, f.kind), ("", ""))
      rows.append(dataclasses.replace(f, decision=decision,
                                      new_expression=new_expression))
    return rows

  def progress(self) -> dict:
    return dict(decided=len(self._decisions), total=len(self.findings))

  def _image_info(self, path: str) -> dict:
    record = self._manifest.get(path)
    return dict(path=path, expression=record.expression if record else "",
                subject=record.subject if record else "")

  def payload(self) -> dict:
    """What GET /audit/api/findings answers."""
    with self._lock:
      rows = self.rows()
      progress = self.progress()
    groups = []
    for kind in findings_lib.KINDS:
      items = [dict(path=f.path, kind=f.kind, score=_json_score(f.score),
                    suggestion=f.suggestion,
                    suggested_expression=_suggested_expression(f.suggestion),
                    detail=f.detail, expression=f.expression, subject=f.subject,
                    related=[self._image_info(p) for p in f.related],
                    decision=f.decision, new_expression=f.new_expression)
               for f in rows if f.kind == kind]
      if items:
        groups.append(dict(kind=kind, count=len(items),
                           decided=sum(1 for i in items if i["decision"]),
                           items=items))
    return dict(data_dir=self.data_dir, findings_path=self.findings_path,
                reviewed_path=self.reviewed_path, journal_path=self.journal_path,
                classes=list(contract.EXPRESSIONS),
                decisions=list(findings_lib.DECISIONS), kinds=groups, **progress)

  # ------------------------------------------------------------------ saving

  def _write_reviewed(self) -> None:
    findings_lib.write_findings(self.reviewed_path, self.rows())

  def _append_journal(self, entry: dict) -> None:
    os.makedirs(os.path.dirname(self.journal_path), exist_ok=True)
    created = not os.path.exists(self.journal_path)
    line = json.dumps(entry, ensure_ascii=False) + "\n"
    with open(self.journal_path, "a", encoding="utf-8") as f:
      f.write(line)
      f.flush()
      os.fsync(f.fileno())
    if created:
      # The new file's name must survive a crash too, not only its bytes.
      folder = os.open(os.path.dirname(self.journal_path), os.O_RDONLY)
      try:
        os.fsync(folder)
      finally:
        os.close(folder)

  def decide(self, entry) -> dict:
    """Validates and saves one decision (journal, then the reviewed CSV).

    Raises:
      _BadRequest: the entry names no finding or is not a valid decision.
    """
    (path, kind), (decision, new_expression) = self._check(entry)
    with self._lock:
      self._append_journal(dict(path=path, kind=kind, decision=decision,
                                new_expression=new_expression,
                                time=time.strftime("%Y-%m-%dT%H:%M:%S%z")))
      self._set((path, kind), (decision, new_expression))
      self._write_reviewed()
      progress = self.progress()
    return dict(path=path, kind=kind, decision=decision,
                new_expression=new_expression, reviewed_path=self.reviewed_path,
                **progress)

  # ------------------------------------------------------------------ images

  def image_file(self, rel: str) -> str:
    """The absolute path of a servable image.

    Raises:
      _BadRequest: not a plain relative path inside the face set (400).
      FileNotFoundError: not an image the findings or manifest name, or gone (404).
    """
    if not rel:
      raise _BadRequest("pass ?path=REL, an image path relative to the face set")
    parts = rel.replace("\\", "/").split("/")
    if "\x00" in rel or os.path.isabs(rel) or "\\" in rel or ".." in parts:
      raise _BadRequest(f"{rel!r} is not a path inside the face set")
    if rel not in self._servable:
      raise FileNotFoundError(rel)
    full = os.path.realpath(os.path.join(self.data_dir, rel))
    # A symlink inside the set may still point out of it.
    if os.path.commonpath([full, os.path.realpath(self.data_dir)]) != os.path.realpath(
        self.data_dir) or not os.path.isfile(full):
      raise FileNotFoundError(rel)
    return full


def _error(status: int, message: str) -> JSONResponse:
  return JSONResponse({"error": message}, status_code=status)


def review_routes(data_dir: str, findings_path: str | None = None,
                  decisions_path: str | None = None, *,
                  reviewed_path: str | None = None) -> list:
  """The review page's Starlette routes over a face set and its findings.

  Args:
    data_dir: the face set the audit ran on.
    findings_path: the audit's CSV (default DIR/audit/findings.csv); only read.
    decisions_path: the JSONL journal (default DIR/audit/decisions.jsonl);
      existing entries are resumed.
    reviewed_path: the CSV rewritten after every decision (default
      DIR/audit/reviewed.csv), the input of `--apply`.

  Returns:
    A list of routes for `webapp.make_app(..., routes=)`.

  Raises:
    UserError: no face set, no or a malformed findings CSV.
  """
  review = Review(data_dir, findings_path, decisions_path, reviewed_path)

  async def to_page(request):
    return RedirectResponse("/audit/", status_code=307)

  async def page(request):
    return FileResponse(os.path.join(STATIC_DIR, "review.html"),
                        headers={"Cache-Control": "no-cache"})

  async def findings(request):
    return JSONResponse(fileio.json_safe(await run_in_threadpool(review.payload)),
                        headers={"Cache-Control": "no-store"})

  async def image(request: Request):
    try:
      full = review.image_file(request.query_params.get("path", ""))
    except _BadRequest as e:
      return _error(400, str(e))
    except FileNotFoundError as e:
      return _error(404, f"{e} is not an image of this audit")
    return FileResponse(full)

  async def decision(request: Request):
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_DECISION_BYTES:
      return _error(413, "a decision is a small JSON object: this body is too large")
    body = await request.body()
    if len(body) > MAX_DECISION_BYTES:
      return _error(413, "a decision is a small JSON object: this body is too large")
    try:
      entry = json.loads(body)
    except ValueError:
      return _error(400, 'the body is not JSON: send {"path", "kind", "decision", '
                         '"new_expression"}')
    try:
      # Blocking file writes (fsync) stay off the event loop.
      saved = await run_in_threadpool(review.decide, entry)
    except _BadRequest as e:
      return _error(400, str(e))
    except OSError as e:
      _log.exception("saving a decision failed")
      return _error(500, f"could not save the decision: {e}")
    return JSONResponse(saved)

  route_list = [
      Route("/", to_page),
      Route("/audit", to_page),
      Route("/audit/", page),
      Route("/audit/api/findings", findings),
      Route("/audit/api/decision", decision, methods=["POST"]),
      Route("/audit/image", image),
      Mount("/audit/static", StaticFiles(directory=STATIC_DIR), name="audit_static"),
  ]
  return route_list


def build_review_app(data_dir: str, findings_path: str | None = None,
                     decisions_path: str | None = None, *,
                     reviewed_path: str | None = None):
  """The library's web app without a model, serving only the review routes.

  Raises:
    UserError: the web extra is missing, or `review_routes` refuses the input.
  """
  try:
    from dicefer_jax.webapp import app as webapp  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(f"the review page needs the web extra ({e}): "
                    "pip install -e '.[web]'") from None
  routes = review_routes(data_dir, findings_path, decisions_path,
                         reviewed_path=reviewed_path)
  return webapp.make_app(None, routes=routes)


def serve(data_dir: str, findings_path: str | None = None,
          decisions_path: str | None = None, *, port: int = 8000,
          reviewed_path: str | None = None) -> None:
  """Runs the review page with uvicorn on 127.0.0.1 until interrupted.

  Loopback only: the page can change what the face set's reviewed CSV says.
  """
  web_app = build_review_app(data_dir, findings_path, decisions_path,
                             reviewed_path=reviewed_path)
  paths = default_paths(data_dir)
  import uvicorn  # pylint: disable=g-import-not-at-top
  print(f"reviewing {os.path.abspath(findings_path or paths['findings'])} on "
        f"http://127.0.0.1:{port}/audit/ ; decisions are saved to "
        f"{os.path.abspath(reviewed_path or paths['reviewed'])} (Ctrl-C stops)",
        flush=True)
  uvicorn.run(web_app, host="127.0.0.1", port=port, log_level="warning")
