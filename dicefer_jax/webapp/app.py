"""The web app: one static page and a JSON API over a `Predictor`.

  GET  /             the page (static/index.html)
  GET  /static/...   its script and style sheet
  GET  /api/model    which model is loaded (`describe_workdir`)
  POST /api/predict  an image (multipart form field, or the raw file as the
                     body) -> {"faces": [{"box", "det_score", "expression",
                     "probabilities": {class: p}}], "width", "height", ...}

Bad uploads are answered, never raised: not an image -> 400, over
`max_upload_bytes` -> 413, no face -> 200 with an empty list. Errors are JSON
{"error": "..."} and the page shows the message.

The page and the API are built here, in the library, so that a data tool can
serve its own pages from the same app (`routes=`) next to the predictor, or
without one: `make_app(None, routes=...)` serves the tool's routes and the
static files; the model's page and API then answer 503 (a tool's route for "/"
comes first and replaces that page).
"""

import io
import json
import logging
import os
import re
import threading
import time

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from dicefer_jax import contract, face_images
from dicefer_jax import workdir as workdir_lib
from dicefer_jax.errors import UserError

DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024   # 10 MiB: a phone photo is 2-6 MB
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")

_log = logging.getLogger(__name__)


class _TooLarge(Exception):
  pass


def describe_workdir(workdir: str, config) -> dict:
  """What the page shows about the loaded model.

  Test accuracy comes from `eval/metrics.json` (experiments.evaluate) when it
  exists, else from `train_metrics.json` (written at the end of training).

  Args:
    workdir: the trained workdir.
    config: its config (`workdir.read_config`).

  Returns:
    {"workdir", "method", "image_size", "test_accuracy", "accuracy_source",
     "classes"}; test_accuracy and accuracy_source are None when neither file
    has one.
  """
  accuracy, source = None, None
  for path, key in ((workdir_lib.eval_metrics_path(workdir), "accuracy"),
                    (workdir_lib.train_metrics_path(workdir), "test_accuracy")):
    try:
      with open(path) as f:
        value = json.load(f).get(key)
    except (OSError, ValueError, AttributeError):
      continue
    if isinstance(value, (int, float)):
      accuracy, source = float(value), os.path.relpath(path, workdir)
      break
  return dict(workdir=os.path.abspath(workdir), method=str(config.method),
              image_size=int(config.image_size), test_accuracy=accuracy,
              accuracy_source=source, classes=list(contract.EXPRESSIONS))


def _error(status: int, message: str) -> JSONResponse:
  return JSONResponse({"error": message}, status_code=status)


async def _read_body(request: Request, limit: int) -> bytes:
  """The request body, refused as soon as it passes `limit` bytes.

  Content-Length is checked first (no byte is read for an honest large
  upload); the running count catches chunked bodies that send no length.
  """
  declared = request.headers.get("content-length")
  if declared is not None and declared.isdigit() and int(declared) > limit:
    raise _TooLarge
  chunks, size = [], 0
  async for chunk in request.stream():
    size += len(chunk)
    if size > limit:
      raise _TooLarge
    chunks.append(chunk)
  return b"".join(chunks)


async def _upload_bytes(request: Request, limit: int) -> bytes:
  """The uploaded file: the first file of a multipart form, else the raw body."""
  body = await _read_body(request, limit)
  if not request.headers.get("content-type", "").startswith("multipart/form-data"):
    return body

  async def replay():
    return {"type": "http.request", "body": body, "more_body": False}

  # The form is parsed from the body already read (and size-checked) above.
  form = await Request(request.scope, replay).form(max_files=1, max_fields=10)
  try:
    for value in form.values():
      if isinstance(value, UploadFile):
        return await value.read()
  finally:
    await form.close()
  raise UserError("the form has no file: send the image as a file field")


def _face_json(face) -> dict:
  return dict(box=[round(float(v), 2) for v in face.box],
              det_score=round(float(face.det_score), 6),
              expression=face.expression,
              probabilities={c: float(p) for c, p in zip(contract.EXPRESSIONS,
                                                          face.probabilities)})


NO_MODEL_MESSAGE = ("no model is loaded: this server runs a data tool only; "
                    "serve a model with `python -m experiments.serve --workdir=DIR`")


def make_app(predictor, model_info: dict | None = None, *,
             max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, routes=()) -> Starlette:
  """The ASGI app serving the page and the API.

  Args:
    predictor: a `Predictor` (anything with `predict_image(rgb_array)`), or
      None for a data tool's server: then GET /, GET /api/model and
      POST /api/predict answer 503 with NO_MODEL_MESSAGE.
    model_info: what GET /api/model answers (`describe_workdir`); may be None
      without a predictor.
    max_upload_bytes: larger uploads get 413.
    routes: more Starlette routes (a data tool's own pages), tried before the
      page's, so a tool may take over "/".

  Returns:
    A Starlette app.
  """
  # One prediction at a time: the Predictor builds MTCNN lazily on its first
  # photo (two first requests would race to build it), torch's MTCNN modules
  # and the jit's trace-time bookkeeping are not documented as thread-safe,
  # and on CPU one prediction already uses the cores. Decoding, size checks
  # and JSON run outside the lock, in parallel.
  lock = threading.Lock()
  info = dict(model_info or {}, max_upload_bytes=int(max_upload_bytes))

  def predict(rgb: np.ndarray):
    with lock:
      return predictor.predict_image(rgb)

  async def no_model(request):
    return _error(503, NO_MODEL_MESSAGE)

  async def index(request):
    return FileResponse(os.path.join(STATIC_DIR, "index.html"),
                        headers={"Cache-Control": "no-cache"})

  async def model(request):
    return JSONResponse(info)

  async def predict_endpoint(request: Request):
    started = time.perf_counter()
    try:
      data = await _upload_bytes(request, max_upload_bytes)
    except _TooLarge:
      mb = max_upload_bytes / (1024 * 1024)
      return _error(413, f"the upload is larger than the {mb:g} MB limit")
    except UserError as e:
      return _error(400, str(e))
    except Exception as e:  # pylint: disable=broad-except
      # A malformed multipart body: the client's mistake, not a server error.
      return _error(400, f"could not read the upload: {e}")
    if not data:
      return _error(400, "the upload is empty: send an image file")
    try:
      rgb = await run_in_threadpool(face_images.read_image, io.BytesIO(data))
    except face_images.UnreadableImage as e:
      # Pillow names the file by its repr (<_io.BytesIO object at 0x...>).
      reason = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))
      return _error(400, f"not an image (JPEG, PNG, ...): {reason}")
    try:
      faces = await run_in_threadpool(predict, rgb)
    except UserError as e:
      return _error(400, str(e))
    except Exception:  # pylint: disable=broad-except
      # Logged with its traceback; the server keeps serving.
      _log.exception("prediction failed")
      return _error(500, "prediction failed: see the server's log")
    return JSONResponse(dict(
        faces=[_face_json(f) for f in faces], width=int(rgb.shape[1]),
        height=int(rgb.shape[0]),
        elapsed_ms=round(1000 * (time.perf_counter() - started), 1)))

  if predictor is None:
    # The demo page would only show errors without a model.
    index = model = predict_endpoint = no_model
  web_app = Starlette(routes=[
      *routes,
      Route("/", index),
      Route("/api/model", model),
      Route("/api/predict", predict_endpoint, methods=["POST"]),
      Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
  ])
  # For callers that built the app elsewhere (experiments.serve.build_app).
  web_app.state.predictor = predictor
  web_app.state.model_info = info
  return web_app
