"""Tests of the audit's review page (data_tools.audit.review) and the model-less app.

The API is driven with Starlette's TestClient over a small face set written
here (a few PNGs, a manifest and a hand-written findings.csv covering several
kinds). One end-to-end test serves the page with uvicorn on a loopback port
and drives it from the keyboard in headless chromium (Playwright, the system's
chromium); without chromium or Playwright it skips, except under CI, where it
fails.
"""

import hashlib
import json
import os
import threading
import time

import cv2
import numpy as np
import pytest

from dicefer_jax import contract
from dicefer_jax.errors import UserError

pytest.importorskip("starlette")
pytest.importorskip("httpx")

# pylint: disable=g-import-not-at-top,wrong-import-position
from starlette.testclient import TestClient

from conftest import chromium, free_port

from data_tools.audit import findings as findings_lib
from data_tools.audit import review
from dicefer_jax.webapp import app as webapp

# path -> (expression, subject) of the fixture's images.
IMAGES = {
    "happiness/a.png": ("happiness", "s1"),
    "anger/b.png": ("anger", "s2"),
    "sadness/c.png": ("sadness", "s1"),
    "fear/d.png": ("fear", ""),
    "neutral/e.png": ("neutral", "s3"),
    "neutral/f.png": ("neutral", "s4"),
    "happiness/g.png": ("happiness", "s3"),
    "sadness/h.png": ("sadness", "s2"),
    "surprise/unlisted.png": ("surprise", "s5"),  # in the manifest, in no finding
}
BLUR_A = ("happiness/a.png", findings_lib.BLUR)
BLUR_B = ("anger/b.png", findings_lib.BLUR)
DUP_E = ("neutral/e.png", findings_lib.DUPLICATE)
LABEL_H = ("sadness/h.png", findings_lib.LABEL)


def _findings():
  f = findings_lib.Finding
  return [
      f("anger/b.png", "blur", 0.5, "drop", "sharpness 12 < 40", (), "anger", "s2"),
      f("happiness/a.png", "blur", 0.9, "drop", "sharpness 3 < 40", (), "happiness", "s1"),
      f("sadness/c.png", "exposure", 0.7, "drop", "mean 250 > 235", (), "sadness", "s1"),
      f("fear/d.png", "framing", 0.4, "drop", "no face found", (), "fear", ""),
      f("neutral/e.png", "duplicate", 0.99, "drop", "hash distance 1 <= 4",
        ("neutral/f.png", "happiness/g.png"), "neutral", "s3"),
      f("sadness/h.png", "label", 0.8, findings_lib.relabel_suggestion("happiness"),
        "out-of-fold p(happiness) 0.91 vs p(sadness) 0.03", (), "sadness", "s2"),
  ]


def _write_faceset(root: str) -> str:
  """A face set with its audit/findings.csv; a file outside it to guard."""
  data_dir = os.path.join(root, "faces")
  rng = np.random.default_rng(0)
  records = []
  for path, (expression, subject) in IMAGES.items():
    os.makedirs(os.path.join(data_dir, os.path.dirname(path)), exist_ok=True)
    image = rng.integers(0, 256, (contract.IMAGE_SIZE, contract.IMAGE_SIZE), np.uint8)
    assert cv2.imwrite(os.path.join(data_dir, path), image)
    records.append(contract.Record(path, expression, subject, "fixture"))
  contract.write_manifest(data_dir, records)
  findings_lib.write_findings(review.default_paths(data_dir)["findings"], _findings())
  with open(os.path.join(root, "secret.png"), "wb") as f:
    f.write(b"not for the page")
  return data_dir


@pytest.fixture
def faceset(tmp_path):
  return _write_faceset(str(tmp_path))


def _client(data_dir: str) -> TestClient:
  return TestClient(review.build_review_app(data_dir))


def _decisions(data_dir: str) -> dict:
  """(path, kind) -> (decision, new_expression) of every row of reviewed.csv."""
  rows = findings_lib.read_findings(review.default_paths(data_dir)["reviewed"])
  return {(r.path, r.kind): (r.decision, r.new_expression) for r in rows}


def _expected(**decided) -> dict:
  """Every finding undecided except `decided` ({name: ((path, kind), value)})."""
  table = {(f.path, f.kind): ("", "") for f in _findings()}
  for key, value in decided.values():
    table[key] = value
  return table


def _post(client, key, decision, new_expression=""):
  path, kind = key
  return client.post("/audit/api/decision", json=dict(
      path=path, kind=kind, decision=decision, new_expression=new_expression))


def _journal(data_dir: str) -> list:
  with open(review.default_paths(data_dir)["journal"]) as f:
    return [json.loads(line) for line in f]


def _tree_digest(root: str, skip=()) -> dict:
  digests = {}
  for folder, _, names in os.walk(root):
    for name in names:
      full = os.path.join(folder, name)
      if os.path.relpath(full, root) not in skip:
        with open(full, "rb") as f:
          digests[os.path.relpath(full, root)] = hashlib.sha256(f.read()).hexdigest()
  return digests


# --------------------------------------------------------------------------
# The API.


def test_each_decision_is_in_the_journal_and_the_csv_at_once(faceset):
  """Catches a decision answered before it is saved, a reviewed CSV that lags
  the journal, a first decision that does not win over a later one, and an
  undo that leaves the old decision in the CSV."""
  with _client(faceset) as client:
    answer = _post(client, BLUR_A, "drop")
    assert answer.status_code == 200, answer.text
    assert answer.json()["decided"] == 1 and answer.json()["total"] == 6
    assert _decisions(faceset) == _expected(a=(BLUR_A, ("drop", "")))
    assert _journal(faceset)[-1]["decision"] == "drop"

    assert _post(client, LABEL_H, "relabel", "happiness").status_code == 200
    assert _decisions(faceset) == _expected(a=(BLUR_A, ("drop", "")),
                                            h=(LABEL_H, ("relabel", "happiness")))
    # The last decision for a finding wins.
    assert _post(client, BLUR_A, "keep").status_code == 200
    assert _decisions(faceset) == _expected(a=(BLUR_A, ("keep", "")),
                                            h=(LABEL_H, ("relabel", "happiness")))
    # Undo: the finding is undecided again, the others stay.
    answer = _post(client, BLUR_A, "")
    assert answer.status_code == 200 and answer.json()["decided"] == 1
    assert _decisions(faceset) == _expected(h=(LABEL_H, ("relabel", "happiness")))
    assert [e["decision"] for e in _journal(faceset)] == ["drop", "relabel", "keep", ""]


def test_a_restarted_app_shows_earlier_decisions(faceset):
  """Catches decisions kept only in memory (lost on a crash or restart)."""
  with _client(faceset) as client:
    _post(client, DUP_E, "drop")
    _post(client, LABEL_H, "relabel", "happiness")
    _post(client, BLUR_B, "keep")
    _post(client, BLUR_B, "")
  os.remove(review.default_paths(faceset)["reviewed"])   # rebuilt from the journal
  with _client(faceset) as client:
    data = client.get("/audit/api/findings").json()
    assert (data["decided"], data["total"]) == (2, 6)
    shown = {(i["path"], i["kind"]): (i["decision"], i["new_expression"])
             for g in data["kinds"] for i in g["items"]}
    assert shown == _expected(e=(DUP_E, ("drop", "")),
                              h=(LABEL_H, ("relabel", "happiness")))
    assert _decisions(faceset) == shown
    assert _post(client, BLUR_A, "drop").json()["decided"] == 3


def test_findings_grouped_by_kind_largest_score_first(faceset):
  """Catches groups out of KINDS order, a kind sorted by path instead of
  score, and cards without their near-duplicates' labels or suggested label."""
  with _client(faceset) as client:
    data = client.get("/audit/api/findings").json()
  assert [(g["kind"], g["count"]) for g in data["kinds"]] == [
      ("blur", 2), ("exposure", 1), ("framing", 1), ("duplicate", 1), ("label", 1)]
  assert [i["path"] for i in data["kinds"][0]["items"]] == ["happiness/a.png",
                                                           "anger/b.png"]
  [dup] = data["kinds"][3]["items"]
  assert dup["related"] == [
      dict(path="neutral/f.png", expression="neutral", subject="s4"),
      dict(path="happiness/g.png", expression="happiness", subject="s3")]
  [label] = data["kinds"][4]["items"]
  assert (label["suggested_expression"], label["expression"]) == ("happiness", "sadness")
  assert data["reviewed_path"] == os.path.join(faceset, "audit", "reviewed.csv")
  assert data["classes"] == list(contract.EXPRESSIONS)


def test_images_outside_the_audit_are_refused(faceset):
  """Catches an image route that serves any file: `..` traversal, absolute
  paths, files no finding or manifest names, and symlinks out of the set."""
  os.symlink(os.path.join(os.path.dirname(faceset), "secret.png"),
             os.path.join(faceset, "neutral", "link.png"))
  records = contract.read_manifest(faceset, check_files=False)
  contract.write_manifest(faceset, records + [contract.Record("neutral/link.png",
                                                              "neutral")])
  with _client(faceset) as client:
    good = client.get("/audit/image", params=dict(path="neutral/f.png"))
    assert good.status_code == 200
    with open(os.path.join(faceset, "neutral", "f.png"), "rb") as f:
      assert good.content == f.read()
    assert client.get("/audit/image", params=dict(
        path="surprise/unlisted.png")).status_code == 200   # named by the manifest
    for bad in ("../secret.png", "neutral/../../secret.png", "/etc/passwd",
                os.path.join(os.path.dirname(faceset), "secret.png"),
                "neutral\\..\\..\\secret.png", ""):
      answer = client.get("/audit/image", params=dict(path=bad))
      assert answer.status_code == 400, (bad, answer.status_code)
      assert answer.json()["error"]
    for unnamed in ("neutral/link.png", "audit/findings.csv", "manifest.csv",
                    "neutral/missing.png"):
      answer = client.get("/audit/image", params=dict(path=unnamed))
      assert answer.status_code == 404, (unnamed, answer.status_code)


def test_bad_decisions_are_refused_with_one_line(faceset):
  """Catches invalid decisions saved (or answered with a traceback): unknown
  finding or kind, unknown decision, relabel without a valid new label."""
  with _client(faceset) as client:
    cases = [
        (dict(path="happiness/a.png", kind="blur", decision="maybe"), "not one of"),
        (dict(path="nobody.png", kind="blur", decision="drop"), "no blur finding"),
        (dict(path="happiness/a.png", kind="label", decision="drop"), "no label finding"),
        (dict(path="happiness/a.png", kind="noise", decision="drop"), "unknown kind"),
        (dict(path="sadness/h.png", kind="label", decision="relabel"), "relabel needs"),
        (dict(path="sadness/h.png", kind="label", decision="relabel",
              new_expression="joy"), "relabel needs"),
        (dict(path="sadness/h.png", kind="label", decision="relabel",
              new_expression="sadness"), "labelled sadness already"),
        (dict(path="happiness/a.png", kind="blur", decision="drop",
              new_expression="anger"), "only for relabel"),
        (dict(path=["x"], kind="blur", decision="drop"), "must be a string"),
        ([1, 2], "JSON object"),
    ]
    for body, message in cases:
      answer = client.post("/audit/api/decision", json=body)
      assert answer.status_code == 400, (body, answer.text)
      error = answer.json()["error"]
      assert message in error and "\n" not in error, (body, error)
    answer = client.post("/audit/api/decision", content=b"{not json")
    assert answer.status_code == 400 and "not JSON" in answer.json()["error"]
  paths = review.default_paths(faceset)
  assert not os.path.exists(paths["journal"]) and not os.path.exists(paths["reviewed"])


def test_a_session_changes_neither_findings_nor_images(faceset):
  """Catches the review writing over findings.csv, the manifest or an image."""
  skip = {os.path.join("audit", "decisions.jsonl"), os.path.join("audit", "reviewed.csv")}
  before = _tree_digest(faceset)
  with _client(faceset) as client:
    _post(client, BLUR_A, "drop")
    _post(client, LABEL_H, "relabel", "happiness")
    _post(client, DUP_E, "keep")
    _post(client, DUP_E, "")
    client.get("/audit/image", params=dict(path="happiness/a.png"))
  assert _tree_digest(faceset, skip) == before
  assert set(_tree_digest(faceset)) == set(before) | skip


def test_a_cut_journal_line_is_skipped_and_later_lines_stay_readable(faceset):
  """Catches a crash mid-append making the journal unreadable, or the next
  decision glued onto the cut line (and so lost on the next start)."""
  paths = review.default_paths(faceset)
  with open(paths["journal"], "w") as f:
    f.write(json.dumps(dict(path="neutral/e.png", kind="duplicate", decision="drop",
                            new_expression="")) + "\n")
    f.write('{"path": "happiness/a.png", "kind": "blur", "deci')
  with _client(faceset) as client:
    # Resumed, and the CSV brought up to date before any new decision.
    assert _decisions(faceset) == _expected(e=(DUP_E, ("drop", "")))
    assert _post(client, BLUR_B, "keep").status_code == 200
  with _client(faceset):
    assert _decisions(faceset) == _expected(e=(DUP_E, ("drop", "")),
                                            b=(BLUR_B, ("keep", "")))


def test_review_refuses_to_write_over_its_findings(faceset):
  """Catches a reviewed CSV path that is the findings CSV itself."""
  findings_path = review.default_paths(faceset)["findings"]
  with pytest.raises(UserError, match="both the findings and the reviewed"):
    review.review_routes(faceset, reviewed_path=findings_path)
  with pytest.raises(UserError, match="not found"):
    review.review_routes(faceset, os.path.join(faceset, "audit", "none.csv"))


def test_app_without_a_model(faceset):
  """Catches make_app(None) failing, predicting with no model, or the tool's
  routes not taking over "/"."""
  with TestClient(webapp.make_app(None)) as client:
    for answer in (client.post("/api/predict", content=b"x"), client.get("/api/model"),
                   client.get("/")):
      assert answer.status_code == 503
      assert answer.json()["error"].startswith("no model is loaded")
    assert client.get("/static/style.css").status_code == 200
  with _client(faceset) as client:
    assert client.post("/api/predict", content=b"x").status_code == 503
    root = client.get("/", follow_redirects=False)
    assert root.status_code in (302, 307) and root.headers["location"] == "/audit/"
    page = client.get("/")
    assert page.status_code == 200 and "/audit/static/review.js" in page.text
    for name in ("review.js", "review.css"):
      assert client.get(f"/audit/static/{name}").status_code == 200


# --------------------------------------------------------------------------
# The page, in headless chromium.


@pytest.fixture
def served(faceset):
  """The review app under uvicorn on a loopback port: (base URL, data_dir)."""
  import uvicorn  # pylint: disable=g-import-not-at-top
  port = free_port()
  server = uvicorn.Server(uvicorn.Config(review.build_review_app(faceset),
                                         host="127.0.0.1", port=port,
                                         log_level="warning"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  deadline = time.monotonic() + 30
  while not server.started:
    if time.monotonic() > deadline or not thread.is_alive():
      pytest.fail(f"the review server is not listening on port {port}")
    time.sleep(0.05)
  yield f"http://127.0.0.1:{port}", faceset
  server.should_exit = True
  thread.join(timeout=10)


@pytest.fixture
def browser_page():
  with chromium() as browser:
    yield browser.new_page(viewport=dict(width=1200, height=900))


def _card(key):
  return f'.card[data-path="{key[0]}"][data-kind="{key[1]}"]'


def test_keyboard_review_is_saved_and_survives_a_reload(served, browser_page):
  """Catches keys that decide nothing or the wrong card, a page that shows a
  decision the server did not save, a refusal the page hides, and marks lost
  on a reload."""
  base, data_dir = served
  page = browser_page
  page.goto(base + "/")
  page.wait_for_selector("body[data-loaded=true]")
  assert page.url == base + "/audit/"
  assert page.inner_text("#progress") == "0 / 6 decided"
  assert page.inner_text("#reviewed-path").startswith(
      os.path.join(data_dir, "audit", "reviewed.csv"))
  # The first card (the blur with the largest score) is selected.
  assert page.locator(".card.selected").get_attribute("data-path") == BLUR_A[0]
  assert page.locator(_card(DUP_E) + " figure.related").count() == 2

  page.keyboard.press("d")            # drop a, move to b
  page.keyboard.press("a")            # keep b, move to the exposure card
  for _ in range(3):                  # exposure -> framing -> duplicate -> label
    page.keyboard.press("]")
  assert page.locator(".card.selected").get_attribute("data-path") == LABEL_H[0]
  page.keyboard.press("r")            # relabel h to its suggested label
  for key in (BLUR_A, BLUR_B, LABEL_H):
    page.wait_for_selector(_card(key) + '[data-state="saved"]')
  page.wait_for_function(
      "document.getElementById('progress').textContent === '3 / 6 decided'")
  page.keyboard.press("6")            # relabel h to sadness, its own label: refused
  error = page.wait_for_selector(_card(LABEL_H) + '[data-state="error"] .state')
  assert "labelled sadness already" in error.inner_text()

  expected = _expected(a=(BLUR_A, ("drop", "")), b=(BLUR_B, ("keep", "")),
                       h=(LABEL_H, ("relabel", "happiness")))
  assert _decisions(data_dir) == expected

  page.reload()
  page.wait_for_selector("body[data-loaded=true]")
  assert page.inner_text("#progress") == "3 / 6 decided"
  shown = {}
  for card in page.locator(".card").all():
    key = (card.get_attribute("data-path"), card.get_attribute("data-kind"))
    shown[key] = (card.get_attribute("data-decision"),
                  card.get_attribute("data-new-expression"))
  assert shown == expected
  assert page.inner_text(_card(LABEL_H) + " .state") == "saved: relabel → happiness"
  # The first undecided card is selected after a reload.
  assert page.locator(".card.selected").get_attribute("data-path") == "sadness/c.png"
