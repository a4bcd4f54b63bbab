"""A trained workdir as an expression classifier: faces or photos in, probabilities out.

  from dicefer_jax import Predictor
  predictor = Predictor.from_workdir("runs/demo")
  probs = predictor.predict_faces(faces)        # uint8 (N, 112, 112[, 1]) -> (N, 7)
  codes = predictor.embed(faces)                # z_exp, z_id, feature
  for face in predictor.predict_image("photo.jpg"):
    print(face.box, face.expression, face.probabilities)

Faces reach the model exactly as in training: aligned 112x112 gray faces of
the data contract, resized to `config.image_size` with
`face_images.resize_square` and standardised per image like
`input_pipeline.standardize`. Photos are cut into faces by the same library
code preprocessing uses (`face_quality.detect_and_align_all`: MTCNN with
preprocessing's default thresholds, `face_alignment.align_face`).

Neither this module nor `predict_faces`/`embed` imports TensorFlow or torch:
MTCNN (torch) is built on the first `predict_image`, and torch next to
TensorFlow in one process segfaults.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dicefer_jax import contract, face_images, face_quality, steps, train
from dicefer_jax import workdir as workdir_lib
from dicefer_jax.errors import UserError

# Column i of every probability array is EXPRESSIONS[i].
EXPRESSIONS = contract.EXPRESSIONS
DEFAULT_MAX_BATCH = 64


@dataclasses.dataclass(frozen=True)
class FacePrediction:
  """One face found in a photo and what the model says about it."""

  box: tuple[float, float, float, float]  # x1, y1, x2, y2 in photo pixels
  landmarks: np.ndarray                   # (5, 2) eyes, nose tip, mouth corners
  det_score: float                        # MTCNN's face probability
  probabilities: np.ndarray               # (7,) float32, in EXPRESSIONS order
  expression: str                         # the most probable class
  face: np.ndarray                        # the aligned uint8 (112, 112) face


def standardize(images: jnp.ndarray) -> jnp.ndarray:
  """tf.image.per_image_standardization of a float (B, S, S, C) batch, in JAX.

  (x - mean) / max(std, 1 / sqrt(S * S * C)) per image, as training's
  `input_pipeline.standardize`, so a blank image gives zeros, not NaN.
  """
  axes = tuple(range(1, images.ndim))
  num_values = int(np.prod(images.shape[1:]))
  mean = jnp.mean(images, axis=axes, keepdims=True)
  std = jnp.sqrt(jnp.mean(jnp.square(images - mean), axis=axes, keepdims=True))
  return (images - mean) / jnp.maximum(std, 1.0 / np.sqrt(num_values))


def _bucket(num: int, max_batch: int) -> int:
  """The padded batch size for `num` faces: the next power of two, at most max_batch."""
  return min(max_batch, 1 << max(0, num - 1).bit_length())


class Predictor:
  """A restored model that classifies aligned faces and faces in photos.

  Attributes:
    config: the config the model was trained with.
    max_batch: the largest batch one compiled call takes; longer inputs are
      cut into batches of this size.
    detection: face-finding thresholds for `predict_image` (preprocessing's
      defaults unless given).
    compiled_batch_sizes: the padded batch sizes compiled so far.
  """

  def __init__(self, config, model, state: steps.StageState, *,
               max_batch: int = DEFAULT_MAX_BATCH,
               detection: face_quality.Settings | None = None,
               torch_threads: int | None = 1):
    """Wraps a model and its trained state.

    Args:
      config: the training config (image_size, method).
      model: `models.build_model(config.model, ...)`.
      state: the final StageState (its params and batch_stats are used).
      max_batch: a power of two, the largest compiled batch.
      detection: MTCNN thresholds for `predict_image`; default
        `face_quality.Settings()`, what preprocessing uses by default.
      torch_threads: torch's thread count for MTCNN (1, like preprocessing's
        workers: faster on shared cores); None leaves torch's default.
    """
    if max_batch < 1 or max_batch & (max_batch - 1):
      raise UserError(f"max_batch={max_batch}: use a power of two")
    self.config = config
    self.max_batch = int(max_batch)
    self.detection = detection or face_quality.Settings()
    self.detection.validate()
    self.image_size = int(config.image_size)
    self.compiled_batch_sizes: set[int] = set()
    self._torch_threads = torch_threads
    self._detector = None
    self._params = jax.device_put(state.params)
    self._batch_stats = jax.device_put(state.batch_stats)
    logits_key = "baseline_logits" if config.method == "baseline" else "dicefer_logits"
    embed = steps.make_embed_fn(model)

    def forward(params, batch_stats, images):
      # Runs once per padded batch size (at trace time): records the buckets.
      self.compiled_batch_sizes.add(images.shape[0])
      out = embed(params, batch_stats, standardize(images.astype(jnp.float32)))
      return dict(probabilities=jax.nn.softmax(out[logits_key], axis=-1),
                  z_exp=out["z_exp"], z_id=out["z_id"], feature=out["feature"])

    self._forward = jax.jit(forward)

  @classmethod
  def from_workdir(cls, workdir: str, defaults=None, **kwargs) -> "Predictor":
    """The final checkpoint of a finished training workdir.

    Args:
      workdir: a workdir trained by `experiments.run`.
      defaults: a ConfigDict of today's defaults for fields the saved config
        predates (entry points pass `experiments.configs.default.get_config()`);
        None reads the saved config.json as it is.
      **kwargs: passed to the constructor (max_batch, detection, torch_threads).

    Raises:
      UserError: not a workdir, or its training is not finished.
    """
    config = workdir_lib.read_config(workdir, defaults)
    model, state = train.restore_trained(config, workdir)
    return cls(config, model, state, **kwargs)

  # ----------------------------------------------------------------------
  # Aligned faces.

  def _model_inputs(self, faces) -> np.ndarray:
    """Contract faces as uint8 (N, S, S, 1) at the model's image size."""
    faces = np.asarray(faces)
    if faces.ndim == 4 and faces.shape[-1] == 1:
      faces = faces[..., 0]
    size = contract.IMAGE_SIZE
    if faces.dtype != np.uint8 or faces.ndim != 3 or faces.shape[1:] != (size, size):
      raise UserError(f"expected aligned faces as uint8 (N, {size}, {size}) or "
                      f"(N, {size}, {size}, 1), got {faces.dtype} {faces.shape}")
    out = np.empty((len(faces), self.image_size, self.image_size, 1), np.uint8)
    for i, face in enumerate(faces):
      out[i, :, :, 0] = face_images.resize_square(face, self.image_size)
    return out

  def _run(self, faces) -> dict[str, np.ndarray]:
    images = self._model_inputs(faces)
    outputs = []
    for start in range(0, len(images), self.max_batch):
      chunk = images[start:start + self.max_batch]
      bucket = _bucket(len(chunk), self.max_batch)
      # Zero images pad the batch to its bucket, so each bucket compiles once;
      # their rows are cut off below (eval-mode BatchNorm: rows are independent).
      padded = np.zeros((bucket,) + chunk.shape[1:], np.uint8)
      padded[:len(chunk)] = chunk
      out = jax.device_get(self._forward(self._params, self._batch_stats, padded))
      outputs.append({k: np.asarray(v[:len(chunk)]) for k, v in out.items()})
    if not outputs:
      out = jax.eval_shape(self._forward, self._params, self._batch_stats,
                           jax.ShapeDtypeStruct((1,) + images.shape[1:], np.uint8))
      return {k: np.zeros((0,) + v.shape[1:], v.dtype) for k, v in out.items()}
    return {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}

  def predict_faces(self, faces) -> np.ndarray:
    """Expression probabilities of aligned faces.

    Args:
      faces: uint8 (N, 112, 112) or (N, 112, 112, 1) aligned gray faces, as
        the data contract stores them.

    Returns:
      float32 (N, 7), each row summing to 1, columns in EXPRESSIONS order.

    Raises:
      UserError: faces of another shape or dtype.
    """
    return self._run(faces)["probabilities"].astype(np.float32)

  def embed(self, faces) -> dict[str, np.ndarray]:
    """The expression code z_exp, identity code z_id and E_exp's pooled feature
    of aligned faces (same input as `predict_faces`), as numpy arrays (N, ...)."""
    out = self._run(faces)
    return {k: out[k] for k in ("z_exp", "z_id", "feature")}

  # ----------------------------------------------------------------------
  # Photos.

  def detect(self, image) -> list[face_quality.AlignedFace]:
    """Every usable face of a photo, aligned as preprocessing aligns it.

    Builds MTCNN (imports torch) on the first call.
    """
    rgb = as_rgb(image)
    if self._detector is None:
      self._detector = face_quality.make_detector(self.detection, self._torch_threads)
    return face_quality.detect_and_align_all(self._detector, rgb, self.detection)

  def predict_image(self, image) -> list[FacePrediction]:
    """Finds the faces of a photo and classifies each.

    Args:
      image: a file path, or a uint8 RGB (H, W, 3) or gray (H, W) array.

    Returns:
      One FacePrediction per usable face, largest first; [] when none.

    Raises:
      face_images.UnreadableImage: a path that is not a decodable image.
      UserError: an array of another shape or dtype, or no MTCNN installed.
    """
    faces = self.detect(image)
    if not faces:
      return []
    probabilities = self.predict_faces(np.stack([f.face for f in faces]))
    return [FacePrediction(box=tuple(float(v) for v in f.box), landmarks=f.landmarks,
                           det_score=f.det_score, probabilities=p,
                           expression=EXPRESSIONS[int(np.argmax(p))], face=f.face)
            for f, p in zip(faces, probabilities)]


def as_rgb(image) -> np.ndarray:
  """A photo path or uint8 array ((H, W), (H, W, 1), RGB or RGBA) as uint8 RGB (H, W, 3).

  Raises:
    face_images.UnreadableImage: a path that cannot be decoded.
    UserError: an array of another dtype or shape.
  """
  if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
    return face_images.read_image(image)
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise UserError(f"expected a uint8 image, got {image.dtype}")
  if image.ndim == 3 and image.shape[2] == 3:
    return image
  if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
    return np.repeat(image.reshape(image.shape[:2] + (1,)), 3, axis=2)
  if image.ndim == 3 and image.shape[2] == 4:
    return np.ascontiguousarray(image[:, :, :3])
  raise UserError(f"expected an RGB (H, W, 3) or gray (H, W) image, got {image.shape}")
