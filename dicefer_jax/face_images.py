"""Decoding the face images of the on-disk contract into arrays, one way everywhere.

Training from the PNG files, the TFDS builder and prediction all turn a face
file into the same grayscale array through `decode_face`: a face set whose
images are not 112x112 is resized the same way whichever path reads it.
"""

import concurrent.futures
import os
from typing import Sequence

import cv2
import numpy as np
from PIL import Image
from PIL import ImageOps

from dicefer_jax import fileio
from dicefer_jax.contract import IMAGE_SIZE, Record
from dicefer_jax.errors import DataError


class UnreadableImage(Exception):
  """A file that is not a decodable image (truncated, not an image, ...)."""


def read_image(path: str) -> np.ndarray:
  """Decodes a photo file to uint8 RGB (H, W, 3), honouring EXIF rotation.

  Preprocessing and prediction read photos through this one function. Pillow,
  not cv2.imread: OpenCV returns a half-grey picture for a truncated JPEG with
  only a warning, Pillow raises.

  Raises:
    UnreadableImage: with a one-line reason.
  """
  try:
    with Image.open(path) as image:
      image.load()
      image = ImageOps.exif_transpose(image)
      rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    message = " ".join(str(e).split()) or type(e).__name__
    raise UnreadableImage(message) from None
  if rgb.ndim != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
    raise UnreadableImage(f"empty image {rgb.shape}")
  return rgb


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
  """A 2-D uint8 image at size x size: area interpolation when shrinking (it
  averages instead of aliasing), bilinear when enlarging (where area degenerates)."""
  if image.shape == (size, size):
    return image
  shrink = image.shape[0] >= size and image.shape[1] >= size
  return cv2.resize(image, (size, size),
                    interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def decode_face(path: str, size: int = IMAGE_SIZE) -> np.ndarray:
  """The face image at `path` as a (size, size) uint8 grayscale array.

  Color files are converted to gray (OpenCV's luma weights); files of another
  size are resized (`resize_square`).

  Raises:
    DataError: naming the file when it is missing or cannot be decoded.
  """
  if not os.path.isfile(path):
    raise DataError(f"image file {path} does not exist: restore it or regenerate "
                    "the manifest")
  image = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
  if image is None or image.size == 0:
    raise DataError(f"cannot decode image {path}: the file is corrupt or not an "
                    "image; re-create it or remove it from the manifest")
  return resize_square(image, size)


def labels_and_subjects(records: Sequence[Record]) -> tuple[np.ndarray, list[str]]:
  """The int32 label array and the subject list ("" = unknown) of records."""
  return (np.array([r.label for r in records], dtype=np.int32),
          [r.subject for r in records])


def load_images(data_dir: str, records: Sequence[Record],
                image_size: int = IMAGE_SIZE) -> np.ndarray:
  """Decodes every record's image once (`decode_face`).

  Args:
    data_dir: the face set directory; record paths are relative to it.
    records: the records to load, in the order wanted.
    image_size: side S of the returned images.

  Returns:
    uint8 array (N, S, S, 1), row i being records[i].

  Raises:
    DataError: naming the first file that is missing or cannot be decoded.
  """
  size = int(image_size)
  if size < 1:
    raise DataError(f"image_size={image_size} is invalid: use a positive integer")
  out = np.empty((len(records), size, size, 1), dtype=np.uint8)

  def load(i: int) -> None:
    out[i, :, :, 0] = decode_face(os.path.join(data_dir, records[i].path), size)

  # cv2 releases the GIL while decoding, so a few threads overlap file IO.
  workers = min(8, fileio.default_workers())
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    # list() re-raises the first worker error here, in record order.
    list(pool.map(load, range(len(records))))
  return out
