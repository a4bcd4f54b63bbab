"""A trained workdir as a standalone model: SavedModel, TFLite or ONNX.

  from dicefer_jax import export
  export.export_workdir("runs/demo", "saved_model", "runs/demo_savedmodel")

Every format computes what `Predictor.predict_faces` computes, from the same
input: uint8 (N, 112, 112, 1) aligned gray faces of the data contract in,
float32 (N, 7) probabilities in `contract.EXPRESSIONS` order out. The resize
to the model's `image_size` and the per-image standardisation are part of the
graph, so a consumer feeds contract faces and needs nothing of this project.

The resize is `face_images.resize_square` written as two matrix products (cv2's
INTER_AREA when shrinking, INTER_LINEAR when enlarging, both separable), then
rounded half up as cv2's uint8 output is. JAX has no area resize
(`jax.image.resize` does not offer one) and TFLite and ONNX have no area op
either, while a matrix product is one every format has. (TensorFlow's
`tf.image.resize(method="area")`, rounded half up, equals cv2's at 112 -> 32 and
112 -> 64; it is not used, so that every format computes the same thing.)

Formats:
  saved_model  jax2tf (StableHLO inside XlaCallModule), batch dimension
               polymorphic; the graph runs on TensorFlow alone.
  tflite       the TFLite converter over a plain-TensorFlow copy of the same
               network (`make_tf_probabilities_fn`), builtin ops only, batch
               dimension dynamic: the converter fails on jax2tf's StableHLO.
  onnx         tf2onnx over that plain-TensorFlow copy (tf2onnx cannot read
               XlaCallModule), opset `ONNX_OPSET`, batch dimension dynamic.

TensorFlow, tf2onnx and onnx are imported inside the functions that need them:
restoring a workdir must not import TensorFlow (see `train._input_pipeline`).
"""

import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from dicefer_jax import contract, train
from dicefer_jax import workdir as workdir_lib
from dicefer_jax.errors import UserError
from dicefer_jax.predictor import standardize

FORMATS = ("saved_model", "tflite", "onnx")
INPUT_NAME = "faces"
OUTPUT_NAME = "probabilities"
ONNX_OPSET = 17
# Overlaps this close to zero are float noise of i * scale, dropped as cv2's
# area table drops them.
_AREA_EPS = 1e-3


def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """The float32 (out_size, in_size) matrix M with M @ row == cv2.resize of a row.

  Shrinking: cv2.INTER_AREA, each output pixel the overlap-weighted mean of the
  input pixels its footprint covers. Enlarging: cv2.INTER_LINEAR with half-pixel
  centres and edge clamping. Both rules are separable, so a square image X
  resizes as M @ X @ M.T, as `face_images.resize_square` does it.
  """
  m = np.zeros((out_size, in_size), np.float64)
  if in_size == out_size:
    return np.eye(out_size, dtype=np.float32)
  if out_size < in_size:
    scale = in_size / out_size
    for i in range(out_size):
      lo, hi = i * scale, (i + 1) * scale
      for j in range(int(np.floor(lo)), min(in_size, int(np.ceil(hi)))):
        overlap = min(hi, j + 1) - max(lo, j)
        if overlap > _AREA_EPS:
          m[i, j] = overlap / scale
  else:
    scale = in_size / out_size
    for i in range(out_size):
      src = (i + 0.5) * scale - 0.5
      j = int(np.floor(src))
      frac = src - j
      if j < 0:
        j, frac = 0, 0.0
      if j >= in_size - 1:
        j, frac = in_size - 1, 0.0
      m[i, j] += 1 - frac
      if frac:
        m[i, j + 1] += frac
  return m.astype(np.float32)


def resize_and_standardize(faces: jnp.ndarray, image_size: int) -> jnp.ndarray:
  """uint8 (N, 112, 112, 1) faces -> the standardised float32 model input.

  Rounds the resized image to integers in [0, 255] (half up) because the Predictor feeds
  the model cv2's uint8 output, not the unrounded mean.
  """
  m = jnp.asarray(resize_matrix(faces.shape[1], image_size))
  x = faces[..., 0].astype(jnp.float32)
  x = jnp.einsum("ih,nhw,jw->nij", m, x, m)
  # Half up, as cv2's fixed-point rounding (add half, shift) rounds.
  x = jnp.clip(jnp.floor(x + 0.5), 0.0, 255.0)[..., None]
  return standardize(x)


def logits_params(config, state):
  """The parameters and batch statistics the probabilities depend on.

  Only E_exp and the head of the workdir's method: E_id and the critics do not
  reach the output, so they are left out of the exported model.
  """
  head = "baseline_head" if config.method == "baseline" else "classifier"
  return (dict(exp_encoder=state.params["exp_encoder"], head=state.params[head]),
          dict(exp_encoder=state.batch_stats["exp_encoder"]))


def make_probabilities_fn(config, model, state):
  """faces uint8 (N, 112, 112, 1) -> float32 (N, 7), in JAX, closed over the
  trained parameters: the function every format is converted from."""
  params, batch_stats = logits_params(config, state)
  baseline = config.method == "baseline"
  head_module = model.baseline_head if baseline else model.classifier
  image_size = int(config.image_size)

  def probabilities(faces):
    images = resize_and_standardize(faces, image_size)
    out = model.exp_encoder.apply(
        {"params": params["exp_encoder"], "batch_stats": batch_stats["exp_encoder"]},
        images, train=False)
    # The Predictor's heads: the baseline's on the pooled feature, stage 3's on z_exp.
    logits = head_module.apply({"params": params["head"]},
                               out.feature if baseline else out.code)
    return jax.nn.softmax(logits, axis=-1)

  return probabilities


# ---------------------------------------------------------------------------
# SavedModel and TFLite (jax2tf).


def _input_spec(tf):
  size = contract.IMAGE_SIZE
  return tf.TensorSpec((None, size, size, 1), tf.uint8, name=INPUT_NAME)


def write_saved_model(config, model, state, output: str) -> None:
  """The model as a TensorFlow SavedModel at `output` (a directory).

  Its `serving_default` signature takes `faces` uint8 (batch, 112, 112, 1),
  any batch size (jax2tf shape polymorphism), and returns `probabilities`.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top

  size = contract.IMAGE_SIZE
  converted = jax2tf.convert(make_probabilities_fn(config, model, state),
                             polymorphic_shapes=[f"(b, {size}, {size}, 1)"],
                             with_gradient=False)
  module = tf.Module()
  module.serve = tf.function(
      lambda faces: {OUTPUT_NAME: converted(faces)},
      input_signature=[_input_spec(tf)], autograph=False)
  tf.saved_model.save(module, output,
                      signatures={"serving_default": module.serve})


# ---------------------------------------------------------------------------
# TFLite and ONNX (plain TensorFlow ops).


def _batch_norm(x, params, stats, eps=1e-5):
  """Flax eval-mode BatchNorm folded into one multiply and one add (numpy)."""
  scale = 1.0 / np.sqrt(np.asarray(stats["var"], np.float64) + eps)
  if "scale" in params:
    scale = scale * np.asarray(params["scale"], np.float64)
  shift = -np.asarray(stats["mean"], np.float64) * scale
  if "bias" in params:
    shift = shift + np.asarray(params["bias"], np.float64)
  return x * scale.astype(np.float32) + shift.astype(np.float32)


def make_tf_probabilities_fn(config, state):
  """`make_probabilities_fn` in plain TensorFlow ops, for converters (tf2onnx)
  that cannot read jax2tf's XlaCallModule.

  It mirrors `models.ResNet18Encoder` (eval mode) and `models.Classifier` over
  the same parameters; tests/test_export.py holds it to the JAX model.

  Raises:
    UserError: a half-precision model (this copy computes in float32).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if config.model.half_precision:
    raise UserError("tflite and onnx export of a half_precision model is not "
                    "supported: export saved_model")
  params, stats = logits_params(config, state)
  enc, enc_stats = params["exp_encoder"], stats["exp_encoder"]
  trunk, trunk_stats = enc["trunk"], enc_stats["trunk"]
  image_size = int(config.image_size)
  m = resize_matrix(contract.IMAGE_SIZE, image_size)

  def conv(x, kernel, stride):
    # Flax pads k // 2 on every side; an explicit Pad + VALID conv is one
    # rule every converter maps the same way.
    k = kernel.shape[0] // 2
    x = tf.pad(x, [[0, 0], [k, k], [k, k], [0, 0]])
    return tf.nn.conv2d(x, np.asarray(kernel, np.float32), stride, "VALID")

  def block(x, p, s, stride):
    y = tf.nn.relu(_batch_norm(conv(x, p["conv1"]["kernel"], stride), p["bn1"], s["bn1"]))
    y = _batch_norm(conv(y, p["conv2"]["kernel"], 1), p["bn2"], s["bn2"])
    if "downsample_conv" in p:
      x = _batch_norm(conv(x, p["downsample_conv"]["kernel"], stride),
                      p["downsample_bn"], s["downsample_bn"])
    return tf.nn.relu(x + y)

  def dense(x, p):
    return tf.matmul(x, np.asarray(p["kernel"], np.float32)) + np.asarray(p["bias"], np.float32)

  def probabilities(faces):
    x = tf.cast(faces[..., 0], tf.float32)
    # Numpy arrays, not tensors made out here: a tensor captured from outside
    # the traced function would become a graph input of the ONNX model.
    x = tf.matmul(tf.matmul(m, x), m.T)
    x = tf.clip_by_value(tf.floor(x + 0.5), 0.0, 255.0)[..., None]
    mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
    std = tf.sqrt(tf.reduce_mean(tf.square(x - mean), axis=[1, 2, 3], keepdims=True))
    x = (x - mean) / tf.maximum(std, 1.0 / image_size)
    x = _batch_norm(conv(x, trunk["stem_conv"]["kernel"], 2), trunk["stem_bn"],
                    trunk_stats["stem_bn"])
    # Zero padding equals models.max_pool_3x3_s2's -inf padding after a ReLU.
    x = tf.pad(tf.nn.relu(x), [[0, 0], [1, 1], [1, 1], [0, 0]])
    x = tf.nn.max_pool2d(x, 3, 2, "VALID")
    for stage in range(1, 5):
      for b in range(1, 3):
        name = f"stage{stage}_block{b}"
        x = block(x, trunk[name], trunk_stats[name], 2 if stage > 1 and b == 1 else 1)
    feature = tf.reduce_mean(x, axis=[1, 2])
    if config.method == "baseline":
      h = feature
    else:
      h = dense(feature, enc["code"])
      if "code_norm" in enc_stats:
        h = _batch_norm(h, {}, enc_stats["code_norm"])
    head = params["head"]
    hidden = sorted((k for k in head if k.startswith("hidden")), key=lambda k: int(k[6:]))
    for name in hidden:
      h = tf.nn.relu(dense(h, head[name]))
    return tf.nn.softmax(dense(h, head["logits"]), axis=-1)

  return probabilities


def _plain_tf_function(config, state):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  fn = make_tf_probabilities_fn(config, state)
  return tf.function(lambda faces: tf.identity(fn(faces), name=OUTPUT_NAME),
                     input_signature=[_input_spec(tf)], autograph=False)


def write_tflite(config, state, output: str) -> None:
  """The model as a .tflite file of TFLite builtin ops, batch dimension dynamic
  (resize the input tensor to the batch before allocating).

  Built from the plain-TensorFlow copy: the TFLite converter (TF 2.21) fails on
  jax2tf's StableHLO with a polymorphic batch ("'vhlo.dynamic_gather_v1' op is
  not part of the vhlo support yet").
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  serve = _plain_tf_function(config, state)
  converter = tf.lite.TFLiteConverter.from_concrete_functions(
      [serve.get_concrete_function()], serve)
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
  with open(output, "wb") as f:
    f.write(converter.convert())


def write_onnx(config, state, output: str) -> None:
  """The model as an ONNX file (tf2onnx, opset ONNX_OPSET), batch dimension
  dynamic; input `faces`, output `probabilities`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tf2onnx  # pylint: disable=g-import-not-at-top
  serve = _plain_tf_function(config, state)
  proto, _ = tf2onnx.convert.from_function(serve, input_signature=[_input_spec(tf)],
                                           opset=ONNX_OPSET)
  # tf2onnx names tensors after TF's ("faces:0", "Identity:0"): give consumers
  # the documented names.
  _rename_io(proto, {proto.graph.input[0].name: INPUT_NAME,
                     proto.graph.output[0].name: OUTPUT_NAME})
  with open(output, "wb") as f:
    f.write(proto.SerializeToString())


def _rename_io(proto, names: dict) -> None:
  """Renames graph inputs/outputs and every node reference to them."""
  for value in list(proto.graph.input) + list(proto.graph.output):
    value.name = names.get(value.name, value.name)
  for node in proto.graph.node:
    node.input[:] = [names.get(n, n) for n in node.input]
    node.output[:] = [names.get(n, n) for n in node.output]


# ---------------------------------------------------------------------------
# Entry point.


def export_model(config, model, state, fmt: str, output: str) -> None:
  """Writes a restored model in format `fmt` (one of FORMATS) at `output`."""
  if fmt == "saved_model":
    write_saved_model(config, model, state, output)
  elif fmt == "tflite":
    write_tflite(config, state, output)
  elif fmt == "onnx":
    write_onnx(config, state, output)
  else:
    raise UserError(f"format {fmt!r}: use one of {', '.join(FORMATS)}")


def export_workdir(workdir: str, fmt: str, output: str, *, defaults=None,
                   overwrite: bool = False) -> None:
  """Exports the final checkpoint of a finished workdir.

  Args:
    workdir: a workdir trained by `experiments.run`.
    fmt: one of FORMATS.
    output: the file (tflite, onnx) or directory (saved_model) to write.
    defaults: today's config defaults, as for `Predictor.from_workdir`.
    overwrite: replace an existing `output`; otherwise it is refused.

  Raises:
    UserError: unknown format, existing output, not a finished workdir.
  """
  if fmt not in FORMATS:
    raise UserError(f"format {fmt!r}: use one of {', '.join(FORMATS)}")
  if os.path.lexists(output) and not overwrite:
    raise UserError(f"{output} exists: pass --overwrite to replace it")
  config = workdir_lib.read_config(workdir, defaults)
  model, state = train.restore_trained(config, workdir)
  # Written beside the output first, so a failed conversion leaves the old one.
  parent = os.path.dirname(os.path.abspath(output))
  os.makedirs(parent, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=parent, prefix=".export-") as tmp:
    staged = os.path.join(tmp, os.path.basename(output))
    export_model(config, model, state, fmt, staged)
    if os.path.isdir(output) and not os.path.islink(output):
      shutil.rmtree(output)
    elif os.path.lexists(output):
      os.remove(output)
    os.replace(staged, output)
