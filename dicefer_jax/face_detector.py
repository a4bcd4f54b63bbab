"""MTCNN face detection (facenet-pytorch): boxes, probabilities, five landmarks.

Preprocessing builds one `MTCNNDetector` in each worker process; a predictor
can build one in its own process. torch and facenet-pytorch are imported only
when a detector is built, so importing this module is cheap and leaves torch
out of processes that never detect (torch next to TensorFlow in one process
can crash it).

  detector = MTCNNDetector(min_face_size=20, device="auto")
  boxes, probs, landmarks = detector.detect(image_rgb)
  if boxes is not None:
    face = face_alignment.align_face(image_rgb, landmarks[probs.argmax()])
"""

import importlib.util

import cv2
import numpy as np

from dicefer_jax.errors import UserError

# Where MTCNN runs: "auto" is CUDA when torch sees a GPU, else the CPU.
DEVICES = ("auto", "cpu", "cuda")
# Detection runs on a copy whose long side is at most this: a 4000 px phone
# photo would otherwise take seconds in MTCNN's image pyramid. Boxes and
# landmarks are scaled back, so alignment samples the full-resolution photo.
DETECT_MAX_SIDE = 1024


def mtcnn_installed() -> bool:
  """Whether facenet-pytorch is installed here (looks, does not import it)."""
  return importlib.util.find_spec("facenet_pytorch") is not None


def as_float_array(values, shape) -> np.ndarray:
  """MTCNN output as a float64 array of `shape`.

  facenet-pytorch 2.5.3 returns object arrays (and [None] for no face), which
  numpy arithmetic and comparisons do not handle like numbers.
  """
  return np.asarray(np.asarray(values, dtype=object).tolist(), dtype=np.float64).reshape(shape)


class MTCNNDetector:
  """One facenet-pytorch MTCNN, built once, reporting faces in image pixels.

  Building imports torch and loads the network weights: build one per process
  and reuse it for every image.

  Attributes:
    device: where the network runs, "cpu" or "cuda" ("auto" resolved).
    min_face_size: MTCNN's smallest face, in pixels of the image it sees
      (the photo, downscaled to `max_side` when larger).
    max_side: longest side of the image MTCNN sees.
  """

  def __init__(self, min_face_size: int = 20, device: str = "auto", *,
               torch_threads: int | None = None, max_side: int = DETECT_MAX_SIDE):
    """Builds the network.

    Args:
      min_face_size: smallest face MTCNN looks for (>= 1; larger is faster).
      device: one of DEVICES.
      torch_threads: if set, torch's intra-op thread count. It applies to
        the whole process: set it where the process is a worker of its own.
      max_side: photos with a longer side are downscaled for detection.

    Raises:
      UserError: an unknown device, device="cuda" when torch sees no CUDA
        device, or torch/facenet-pytorch not importable.
    """
    if device not in DEVICES:
      raise UserError(f"--device={device!r}: use one of {', '.join(DEVICES)}")
    if min_face_size < 1 or max_side < 1:
      raise ValueError(f"min_face_size={min_face_size} and max_side={max_side} "
                       "must be >= 1")
    try:
      import torch  # pylint: disable=g-import-not-at-top
      from facenet_pytorch import MTCNN  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise UserError(f"cannot import the MTCNN stack ({e}): install it with "
                      "pip install 'dicefer-jax[data]'") from None
    if torch_threads:
      torch.set_num_threads(torch_threads)
    if device == "auto":
      device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
      raise UserError("--device=cuda but torch sees no CUDA device: use "
                      "--device=cpu or --device=auto")
    self.device = device
    self.min_face_size = int(min_face_size)
    self.max_side = int(max_side)
    self._mtcnn = MTCNN(keep_all=True, device=torch.device(device),
                        min_face_size=self.min_face_size, post_process=False)
    self._mtcnn.eval()

  def detect(self, image_rgb: np.ndarray):
    """Finds the faces in one photo.

    Args:
      image_rgb: uint8 RGB (H, W, 3) image.

    Returns:
      (boxes, probs, landmarks): float64 arrays (N, 4) of x0, y0, x1, y1,
      (N,) face probabilities and (N, 5, 2) landmarks (left eye, right eye,
      nose tip, left and right mouth corner), in pixels of `image_rgb`; or
      (None, None, None) when no face is found.

    Raises:
      ValueError: not an (H, W, 3) uint8 image.
    """
    image_rgb = np.asarray(image_rgb)
    if image_rgb.dtype != np.uint8 or image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
      raise ValueError(f"expected a uint8 RGB (H, W, 3) image, got {image_rgb.dtype} "
                       f"{image_rgb.shape}")
    height, width = image_rgb.shape[:2]
    scale = min(1.0, self.max_side / max(height, width))
    small = image_rgb
    if scale < 1.0:
      small = cv2.resize(image_rgb, (max(1, round(width * scale)), max(1, round(height * scale))),
                         interpolation=cv2.INTER_AREA)
    if min(small.shape[:2]) < self.min_face_size:
      # MTCNN's image pyramid would be empty (and facenet-pytorch crashes).
      return None, None, None
    boxes, probs, points = self._mtcnn.detect(np.ascontiguousarray(small), landmarks=True)
    if boxes is None:
      return None, None, None
    boxes = as_float_array(boxes, (-1, 4)) / scale
    probs = as_float_array(probs, (-1,))
    points = as_float_array(points, (-1, 5, 2)) / scale
    return boxes, probs, points
