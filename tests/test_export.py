"""Tests of dicefer_jax.export and experiments.export: each format against the JAX model.

One tiny DICE-FER workdir is trained and exported to every format once for the
module. The tiny config's image_size is 32, so the in-graph resize from 112 is
exercised. TFLite and ONNX need the `export` extra (tf2onnx, onnxruntime).
"""

import os
import subprocess
import textwrap
import sys

import cv2
import jax
import numpy as np
import pytest

from dicefer_jax import contract, export, train
from dicefer_jax import workdir as workdir_lib
from dicefer_jax.errors import UserError
from dicefer_jax.predictor import Predictor, standardize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=REPO, TF_ENABLE_ONEDNN_OPTS="0", TF_CPP_MIN_LOG_LEVEL="2")
# Measured differences are ~1e-7 for every format (float32 reordering only).
TOLERANCE = dict(saved_model=1e-4, onnx=1e-4, tflite=1e-4)


@pytest.fixture(scope="module")
def exported(trained_workdir, tmp_path_factory):
  """{format: path} of the workdir exported to every format, or the import
  error's text for a format whose converter is not installed."""
  root = tmp_path_factory.mktemp("exported")
  paths = {}
  for fmt in export.FORMATS:
    path = str(root / f"model.{fmt}")
    try:
      export.export_workdir(trained_workdir, fmt, path)
    except ImportError as e:
      path = f"not installed: {e}"
    paths[fmt] = path
  return paths


def _faces():
  """Random faces, the same faces at other brightness and contrast, a smooth face
  and a constant one (standardised to zeros, not NaN)."""
  rng = np.random.default_rng(7)
  faces = rng.integers(0, 256, (4, 112, 112), dtype=np.uint8)
  dim = (faces[:2] * 0.3 + 20).astype(np.uint8)
  bright = (faces[2:] * 0.5 + 120).astype(np.uint8)
  yy, xx = np.mgrid[0:112, 0:112]
  smooth = (127 + 100 * np.sin(xx / 5.0) * np.cos(yy / 9.0)).astype(np.uint8)[None]
  blank = np.full((1, 112, 112), 90, np.uint8)
  return np.concatenate([faces, dim, bright, smooth, blank])[..., None]


@pytest.fixture(scope="module")
def reference(trained_workdir):
  faces = _faces()
  return faces, Predictor.from_workdir(trained_workdir).predict_faces(faces)


def _run_saved_model(path, faces):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  serve = tf.saved_model.load(path).signatures["serving_default"]
  return serve(faces=tf.constant(faces))[export.OUTPUT_NAME].numpy()


def _run_tflite(path, faces):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  interpreter = tf.lite.Interpreter(model_path=path)
  index = interpreter.get_input_details()[0]["index"]
  interpreter.resize_tensor_input(index, faces.shape)
  interpreter.allocate_tensors()
  interpreter.set_tensor(index, faces)
  interpreter.invoke()
  return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def _run_onnx(path, faces):
  ort = pytest.importorskip("onnxruntime")
  session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
  return session.run([export.OUTPUT_NAME], {export.INPUT_NAME: faces})[0]


RUNNERS = dict(saved_model=_run_saved_model, tflite=_run_tflite, onnx=_run_onnx)


# --------------------------------------------------------------------------
# The in-graph resize.


@pytest.mark.parametrize("size", [32, 56, 64])
def test_resize_matrix_is_cv2_area_when_shrinking(size):
  """Catches an area rule other than cv2's (e.g. tf.image.resize's at 112 -> 32)."""
  image = np.random.default_rng(size).integers(0, 256, (112, 112), dtype=np.uint8)
  m = export.resize_matrix(112, size)
  ours = np.clip(np.floor(m @ image.astype(np.float32) @ m.T + 0.5), 0, 255)
  np.testing.assert_array_equal(ours, cv2.resize(image, (size, size),
                                                 interpolation=cv2.INTER_AREA))


def test_resize_matrix_is_cv2_bilinear_within_one_level_when_enlarging():
  image = np.random.default_rng(1).integers(0, 256, (112, 112), dtype=np.uint8)
  m = export.resize_matrix(112, 160)
  ours = np.clip(np.floor(m @ image.astype(np.float32) @ m.T + 0.5), 0, 255)
  ref = cv2.resize(image, (160, 160), interpolation=cv2.INTER_LINEAR).astype(np.float32)
  assert np.abs(ours - ref).max() <= 1


# --------------------------------------------------------------------------
# Each format against the JAX model.


def test_the_faces_tell_a_missing_resize_or_standardisation(trained_workdir, reference):
  """The format tests below compare on `_faces()`; this checks that a graph
  without the resize (nearest instead of cv2's area) or without the
  standardisation would miss their tolerance by far, so they would catch it."""
  faces, probs = reference
  config = workdir_lib.read_config(trained_workdir)
  model, state = train.restore_trained(config, trained_workdir)
  params, stats = export.logits_params(config, state)
  assert config.method != "baseline"  # the stage-3 head below

  def probabilities(images):
    out = model.exp_encoder.apply({"params": params["exp_encoder"],
                                   "batch_stats": stats["exp_encoder"]}, images, train=False)
    return np.asarray(jax.nn.softmax(
        model.classifier.apply({"params": params["head"]}, out.code), axis=-1))

  np.testing.assert_allclose(probabilities(export.resize_and_standardize(faces, 32)), probs,
                             atol=1e-5)
  m = export.resize_matrix(112, 32)
  x = faces.astype(np.float32)
  resized = np.clip(np.floor(np.einsum("ih,nhwc,jw->nijc", m, x, m) + 0.5), 0, 255)
  no_standardisation, no_resize = resized, standardize(x)
  for broken in (no_standardisation, no_resize):
    assert np.abs(probabilities(broken) - probs).max() > 100 * max(TOLERANCE.values())


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_exported_model_matches_the_predictor(exported, reference, fmt):
  """Catches a graph that resizes or standardises differently from
  `Predictor.predict_faces` (or not at all: see the test above), picks another
  head, or scrambles the class order or the rows."""
  path = exported[fmt]
  if path.startswith("not installed"):
    pytest.skip(path)
  faces, probs = reference
  got = RUNNERS[fmt](path, faces)
  assert got.shape == (len(faces), len(contract.EXPRESSIONS)) and got.dtype == np.float32
  assert np.abs(got - probs).max() < TOLERANCE[fmt]
  # Any batch size: the batch dimension is not fixed at export.
  np.testing.assert_allclose(RUNNERS[fmt](path, faces[3:4]), probs[3:4],
                             atol=TOLERANCE[fmt])


def test_saved_model_runs_on_tensorflow_alone(exported, reference):
  """The SavedModel is standalone: a process that imports only TensorFlow runs it.

  `import tensorflow` imports jax by itself where jax is installed (TF's lite
  module probes for it, tolerating ImportError), so the process hides jax and
  dicefer_jax as a machine with only TensorFlow installed would lack them.
  """
  faces, probs = reference
  tmp = os.path.dirname(exported["saved_model"])
  np.save(os.path.join(tmp, "faces.npy"), faces)
  script = textwrap.dedent(f"""
      import importlib.abc
      import sys

      class Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
          if name.split(".")[0] in ("jax", "jaxlib", "dicefer_jax"):
            raise ModuleNotFoundError(f"No module named {{name!r}}")
          return None

      sys.meta_path.insert(0, Hide())
      import numpy as np
      import tensorflow as tf
      serve = tf.saved_model.load({exported['saved_model']!r}).signatures["serving_default"]
      faces = np.load({os.path.join(tmp, 'faces.npy')!r})
      out = serve(faces=tf.constant(faces))["probabilities"].numpy()
      np.save({os.path.join(tmp, 'out.npy')!r}, out)
      leaked = sorted(m for m in sys.modules
                      if m.split(".")[0] in ("jax", "jaxlib", "dicefer_jax"))
      assert not leaked, leaked
      """)
  # cwd outside the repository, so dicefer_jax is not importable by accident.
  env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
  subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp, timeout=120)
  assert np.abs(np.load(os.path.join(tmp, "out.npy")) - probs).max() < 1e-4


# --------------------------------------------------------------------------
# The entry point.


def test_export_refuses_an_existing_output(trained_workdir, tmp_path):
  output = tmp_path / "model.onnx"
  output.write_text("keep me")
  with pytest.raises(UserError, match="--overwrite"):
    export.export_workdir(trained_workdir, "onnx", str(output))
  with pytest.raises(UserError, match="format"):
    export.export_workdir(trained_workdir, "pb", str(tmp_path / "x"))
  result = subprocess.run(
      [sys.executable, "-m", "experiments.export", f"--workdir={trained_workdir}",
       "--format=saved_model", f"--output={output}"],
      env=ENV, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith("error: ")
  assert "--overwrite" in result.stderr
  assert output.read_text() == "keep me"


def test_importing_export_does_not_import_tensorflow():
  """Restoring a workdir must keep TensorFlow out (see train._input_pipeline)."""
  script = ("import sys, dicefer_jax.export; "
            "assert 'tensorflow' not in sys.modules and 'tf2onnx' not in sys.modules")
  subprocess.run([sys.executable, "-c", script], check=True, env=ENV, cwd=REPO, timeout=120)
