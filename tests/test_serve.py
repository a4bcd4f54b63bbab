"""Tests of the web app: dicefer_jax.webapp's API and its page in a real browser.

One tiny workdir is trained once for the module. The app runs in one
subprocess (`server`): it uses MTCNN (torch), and torch next to TensorFlow,
which this process imports to train, segfaults. That subprocess first checks
the API with Starlette's TestClient and prints a report, then serves the same
app with uvicorn on a loopback port for the browser tests (Playwright driving
the system's chromium). Without chromium (or Playwright) the browser tests
skip, except under CI, where they fail.
"""

import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading

import cv2
import numpy as np
import pytest
from skimage import data as skimage_data

from conftest import chromium, free_port, missing_or_fail
from dicefer_jax import contract
from dicefer_jax import workdir as workdir_lib
from experiments.configs import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=REPO, TF_ENABLE_ONEDNN_OPTS="0", TF_CPP_MIN_LOG_LEVEL="2")
# Set to write the page's screenshot to docs/webapp.png (the README's picture).
SCREENSHOT_ENV = "DICEFER_UPDATE_SCREENSHOT"


def _web_extra_or_skip():
  for module in ("starlette", "uvicorn", "httpx", "python_multipart"):
    try:
      __import__(module)
    except ImportError:
      missing_or_fail(f"{module} is not installed: pip install -e '.[web,dev]'")


def _write_inputs(root: str) -> dict:
  """The photos and the fake camera clip the tests send, as files."""
  # 256 px: MTCNN still finds the astronaut's face, in a fraction of 512 px's time.
  face = cv2.resize(skimage_data.astronaut(), (256, 256), interpolation=cv2.INTER_AREA)
  paths = dict(face=os.path.join(root, "astronaut.jpg"),
               mirrored=os.path.join(root, "mirrored.jpg"),
               blank=os.path.join(root, "blank.jpg"),
               text=os.path.join(root, "notes.jpg"),
               clip=os.path.join(root, "camera.y4m"))
  bgr = np.ascontiguousarray(face[:, :, ::-1])
  cv2.imwrite(paths["face"], bgr)
  cv2.imwrite(paths["mirrored"], np.ascontiguousarray(bgr[:, ::-1]))
  cv2.imwrite(paths["blank"], np.full((200, 200, 3), 90, np.uint8))
  with open(paths["text"], "w") as f:       # a text file named like a photo
    f.write("these are notes, not a photo\n")
  # Chromium's fake camera plays a Y4M clip (I420 frames) in a loop.
  i420 = cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV_I420).tobytes()
  with open(paths["clip"], "wb") as f:
    f.write(b"YUV4MPEG2 W256 H256 F5:1 Ip A1:1 C420jpeg\n")
    for _ in range(5):
      f.write(b"FRAME\n" + i420)
  return paths


# The app in its own process: the TestClient checks, then uvicorn on argv[3].
_SERVER_SCRIPT = r"""
import concurrent.futures, json, sys
import numpy as np
from starlette.testclient import TestClient
from experiments import serve

workdir, inputs, port = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
app = serve.build_app(workdir)
predictor = app.state.predictor
read = lambda name: open(inputs[name], "rb").read()
report = {}

def ref(name):
  # Predictor.predict_image on the same bytes (read from the file).
  return [dict(box=list(f.box), probabilities=f.probabilities.tolist())
          for f in predictor.predict_image(inputs[name])]

report["ref"] = {name: ref(name) for name in ("face", "mirrored")}
with TestClient(app) as client:
  def post(name, **kw):
    r = client.post("/api/predict", **kw)
    return dict(status=r.status_code, json=r.json())
  report["raw"] = post("face", content=read("face"), headers={"content-type": "image/jpeg"})
  report["form"] = post("face", files={"image": ("a.jpg", read("face"), "image/jpeg")})
  report["text"] = post("text", content=read("text"))
  report["empty"] = post("text", content=b"")
  big = b"\xff" * (10 * 1024 * 1024 + 1)
  report["big"] = post("big", content=big)
  report["big_chunked"] = post("big", content=iter([big[:2 ** 20]] * 11))
  report["limit_exactly"] = post("big", content=b"x" * (10 * 1024 * 1024))
  report["blank"] = post("blank", content=read("blank"))
  names = ["face", "mirrored"] * 4
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    answers = list(pool.map(lambda n: post(n, content=read(n)), names))
  report["concurrent"] = [dict(name=n, **a) for n, a in zip(names, answers)]
  report["model"] = client.get("/api/model").json()
  page = client.get("/")
  report["page"] = dict(status=page.status_code, has_input='id="file-input"' in page.text)
  report["script_status"] = client.get("/static/app.js").status_code
print("REPORT " + json.dumps(report), flush=True)

import uvicorn
server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
server.run()
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  return _write_inputs(str(tmp_path_factory.mktemp("inputs")))


@pytest.fixture(scope="module")
def server(trained_workdir, inputs, tmp_path_factory):
  """(TestClient report, base URL of the running server)."""
  _web_extra_or_skip()
  port = free_port()
  log = open(tmp_path_factory.mktemp("log") / "server.log", "w+")
  proc = subprocess.Popen([sys.executable, "-c", _SERVER_SCRIPT, trained_workdir,
                           json.dumps(inputs), str(port)],
                          stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO, env=ENV)
  lines = queue.Queue()
  threading.Thread(target=lambda: [lines.put(l) for l in proc.stdout] + [lines.put(None)],
                   daemon=True).start()
  report = None
  try:
    while report is None:
      line = lines.get(timeout=240)
      if line is None:
        log.seek(0)
        pytest.fail(f"the server script exited {proc.wait()}: {log.read()[-3000:]}")
      if line.startswith("REPORT "):
        report = json.loads(line[len("REPORT "):])
    base = f"http://127.0.0.1:{port}"
    _wait_for_port(port, proc)
    yield report, base
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
      proc.kill()
    log.close()


def _wait_for_port(port, proc, timeout=30.0):
  import time  # pylint: disable=g-import-not-at-top
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      pytest.fail(f"the server exited {proc.returncode} before listening")
    try:
      socket.create_connection(("127.0.0.1", port), timeout=1).close()
      return
    except OSError:
      time.sleep(0.1)
  pytest.fail(f"nothing listens on port {port} after {timeout} s")


def _probs(face) -> np.ndarray:
  assert list(face["probabilities"]) == list(contract.EXPRESSIONS)
  return np.array([face["probabilities"][c] for c in contract.EXPRESSIONS])


# --------------------------------------------------------------------------
# The API (Starlette's TestClient, in the server's process).


def test_predict_returns_what_the_predictor_says(server):
  """Catches an API that decodes the upload differently from predict_image
  (another decoder, lost colour, EXIF), reorders or relabels the classes,
  moves the box, or handles multipart and raw bodies differently."""
  report, _ = server
  [expected] = report["ref"]["face"]
  for key in ("raw", "form"):
    answer = report[key]
    assert answer["status"] == 200, answer
    assert (answer["json"]["width"], answer["json"]["height"]) == (256, 256)
    [face] = answer["json"]["faces"]
    np.testing.assert_allclose(_probs(face), expected["probabilities"], atol=1e-6)
    np.testing.assert_allclose(face["box"], expected["box"], atol=0.01)
    assert face["expression"] == contract.EXPRESSIONS[int(np.argmax(_probs(face)))]
    assert face["det_score"] > 0.9


def test_bad_uploads_are_answered_not_raised(server):
  """Catches a non-image or empty upload reaching the model (500 or a crash),
  and a size limit that is missing, off by one, or skipped by a chunked body."""
  report, _ = server
  assert report["text"]["status"] == 400
  assert report["text"]["json"]["error"] == (
      "not an image (JPEG, PNG, ...): cannot identify image file")
  assert report["empty"]["status"] == 400 and "empty" in report["empty"]["json"]["error"]
  for key in ("big", "big_chunked"):
    assert report[key]["status"] == 413, report[key]
    assert "10 MB limit" in report[key]["json"]["error"]
  # Exactly at the limit is read, then refused as not an image.
  assert report["limit_exactly"]["status"] == 400


def test_no_face_is_an_empty_list(server):
  """Catches a photo without a face answered as an error instead of []."""
  report, _ = server
  assert report["blank"] == dict(status=200, json=report["blank"]["json"])
  assert report["blank"]["json"]["faces"] == []
  assert report["blank"]["json"]["width"] == 200


def test_concurrent_requests_get_their_own_results(server):
  """Catches requests in flight together mixing their results (shared buffers,
  a detector or batch used by two threads): each of 8 threads alternating two
  different photos must get its own photo's faces."""
  report, _ = server
  ref = {n: report["ref"][n][0] for n in ("face", "mirrored")}
  # The two photos do give different answers, so a mix-up would show.
  assert not np.allclose(ref["face"]["probabilities"], ref["mirrored"]["probabilities"],
                         atol=1e-6)
  assert abs(ref["face"]["box"][0] - ref["mirrored"]["box"][0]) > 5
  for answer in report["concurrent"]:
    assert answer["status"] == 200
    [face] = answer["json"]["faces"]
    expected = ref[answer["name"]]
    np.testing.assert_allclose(_probs(face), expected["probabilities"], atol=1e-6)
    np.testing.assert_allclose(face["box"], expected["box"], atol=0.01)


def test_model_info_is_the_workdirs(server, trained_workdir):
  """Catches the page describing another model, or an accuracy not read from
  the workdir's metrics."""
  report, _ = server
  with open(workdir_lib.train_metrics_path(trained_workdir)) as f:
    accuracy = json.load(f)["test_accuracy"]
  config = workdir_lib.read_config(trained_workdir)
  assert report["model"] == dict(
      workdir=os.path.abspath(trained_workdir), method="dicefer",
      image_size=config.image_size, test_accuracy=accuracy,
      accuracy_source="train_metrics.json", classes=list(contract.EXPRESSIONS),
      max_upload_bytes=10 * 1024 * 1024)
  assert report["page"] == dict(status=200, has_input=True)
  assert report["script_status"] == 200


def test_describe_workdir_prefers_evaluation_metrics(tmp_path):
  """Catches the evaluation's accuracy being ignored when it exists."""
  pytest.importorskip("starlette")
  from dicefer_jax.webapp import app as webapp  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  assert webapp.describe_workdir(str(tmp_path), config)["test_accuracy"] is None
  with open(workdir_lib.train_metrics_path(str(tmp_path)), "w") as f:
    json.dump(dict(test_accuracy=0.25), f)
  assert webapp.describe_workdir(str(tmp_path), config)["test_accuracy"] == 0.25
  os.makedirs(workdir_lib.eval_dir(str(tmp_path)))
  with open(workdir_lib.eval_metrics_path(str(tmp_path)), "w") as f:
    json.dump(dict(accuracy=0.5), f)
  info = webapp.describe_workdir(str(tmp_path), config)
  assert (info["test_accuracy"], info["accuracy_source"]) == (0.5, "eval/metrics.json")


def test_cli_reports_a_missing_workdir_in_one_line(tmp_path):
  """Catches experiments.serve starting (or tracing back) without a model."""
  result = subprocess.run(
      [sys.executable, "-m", "experiments.serve", f"--workdir={tmp_path / 'none'}"],
      capture_output=True, text=True, cwd=REPO, env=ENV, timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), lines


# --------------------------------------------------------------------------
# The page, in headless chromium.


@pytest.fixture(scope="module")
def browser(inputs):
  with chromium(["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                 f"--use-file-for-fake-video-capture={inputs['clip']}"]) as browser:
    yield browser


@pytest.fixture
def page(browser, server):
  _, base = server
  context = browser.new_context(viewport=dict(width=1200, height=900))
  context.grant_permissions(["camera"], origin=base)
  page = context.new_page()
  page.goto(base + "/")
  yield page
  context.close()


def test_page_shows_the_model(page, trained_workdir):
  """Catches a page that does not say which model answers."""
  page.wait_for_selector('dd[data-field="method"]')
  assert page.inner_text('dd[data-field="method"]') == "dicefer"
  assert page.inner_text('dd[data-field="workdir"]') == os.path.abspath(trained_workdir)
  assert "%" in page.inner_text('dd[data-field="test accuracy"]')


def test_uploaded_photo_gets_a_box_and_seven_bars(page, server, inputs, tmp_path):
  """Catches a page that uploads nothing, draws no box, or shows bars whose
  numbers are not the API's probabilities."""
  report, _ = server
  page.set_input_files("#file-input", inputs["face"])
  page.wait_for_selector(".result .face-box", timeout=60_000)
  assert page.locator(".result .face-box").count() == 1
  rows = page.locator(".result .face .bar-row")
  assert rows.count() == 7
  shown = [float(rows.nth(i).locator(".value").inner_text()) for i in range(7)]
  names = [rows.nth(i).get_attribute("data-class") for i in range(7)]
  assert names == list(contract.EXPRESSIONS)
  np.testing.assert_allclose(shown, report["ref"]["face"][0]["probabilities"], atol=6e-4)
  width = rows.nth(int(np.argmax(shown))).locator(".bar-fill").evaluate(
      "e => e.style.width")
  assert width == f"{100 * max(report['ref']['face'][0]['probabilities']):.1f}%"
  page.screenshot(path=str(tmp_path / "webapp.png"), full_page=True)
  if os.environ.get(SCREENSHOT_ENV):
    shutil.copy(tmp_path / "webapp.png", os.path.join(REPO, "docs", "webapp.png"))


def test_non_image_and_blank_photo_messages(page, inputs):
  """Catches an upload error or a faceless photo that leaves the page silent."""
  page.set_input_files("#file-input", inputs["text"])
  error = page.wait_for_selector(".result .message.error", timeout=30_000)
  assert error.inner_text().startswith("not an image")
  page.set_input_files("#file-input", inputs["blank"])
  empty = page.wait_for_selector(".result .message.empty", timeout=60_000)
  assert empty.inner_text() == "no face found"
  assert page.locator(".face-box").count() == 0


def test_webcam_frames_get_overlays_and_a_rate(page):
  """Catches a camera loop that sends no frames, draws no overlay, or shows no rate."""
  page.click("#camera-button")
  page.wait_for_function(
      "Number(document.getElementById('overlay').dataset.faces) >= 1", timeout=60_000)
  page.wait_for_function(
      "/^\\d+(\\.\\d)? frames\\/s$/.test(document.getElementById('rate').textContent)",
      timeout=60_000)
  assert page.locator("#live-faces .face .bar-row").count() == 7
  assert page.inner_text("#camera-button") == "Stop camera"
  page.click("#camera-button")
  assert page.inner_text("#camera-button") == "Start camera"
