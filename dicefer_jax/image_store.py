"""Decoded face images kept on disk and read by row, for sets larger than memory.

A small face set is decoded once into one uint8 array (`data.FaceSet.images`).
AffectNet-sized sets (~420,000 faces, ~5 GB at 112 px) are not: they are decoded
once, in chunks, into a raw uint8 file (`ImageStore`) under the cache root, and the
input pipelines gather the rows of each batch from it (through the page cache)
by the same indices they would gather from the array. The pixels are the very
bytes the in-memory path holds (the file is filled by `face_images.load_images`,
the same function), so every batch is bit-identical whichever path is taken.

Why a memmap and not the TFDS copy in array_record format: TFDS stores faces at
112x112 and a reader resizes that copy again, which differs from decoding the
original file at the config's size when a face set's images are not 112x112
(the files path); its random reads also decode a PNG per image per step. A raw
file of the decoded split has neither problem.

This module does not import TensorFlow: `input_pipeline` wraps `gather` in a
`tf.numpy_function`.
"""

import hashlib
import os
from typing import Callable, Sequence

import numpy as np

from dicefer_jax import contract, fileio

# Rows decoded per chunk while a store is written: bounds the memory of writing it
# (1024 x 112 x 112 bytes = 12 MB) without paying per-image overhead.
_CHUNK = 1024


class ImageStore:
  """uint8 images (N, S, S, 1) in a file on disk, read by row.

  Also a view of some of its rows (`store[rows]`), so that a split's train and
  test images are slices of one file per face set and image size.
  """

  def __init__(self, path: str, num: int, size: int, rows: np.ndarray | None = None):
    self.path, self._num, self.size = path, int(num), int(size)
    # Opened lazily: a view made in one process may be used in a child.
    self._array = None
    self._rows = None if rows is None else np.asarray(rows, dtype=np.int64)

  def _file(self) -> np.ndarray:
    if self._array is None:
      self._array = np.memmap(self.path, dtype=np.uint8, mode="r",
                              shape=(self._num, self.size, self.size, 1))
    return self._array

  @property
  def shape(self) -> tuple[int, int, int, int]:
    n = self._num if self._rows is None else len(self._rows)
    return (n, self.size, self.size, 1)

  @property
  def dtype(self):
    return np.dtype(np.uint8)

  @property
  def ndim(self) -> int:
    return 4

  def __len__(self) -> int:
    return self.shape[0]

  def gather(self, index) -> np.ndarray:
    """uint8 (len(index), S, S, 1): the images at `index` (positions in this view)."""
    index = np.asarray(index, dtype=np.int64)
    rows = index if self._rows is None else self._rows[index]
    # Fancy indexing a memmap copies just those rows out of the page cache.
    return np.asarray(self._file()[rows])

  def __getitem__(self, key):
    """An int gives one image (S, S, 1); anything else numpy would accept for the
    first axis (slice, index array, boolean mask) a view of those rows."""
    if isinstance(key, (int, np.integer)):
      return self.gather([key])[0]
    positions = np.arange(len(self))[key]
    rows = positions if self._rows is None else self._rows[positions]
    return ImageStore(self.path, self._num, self.size, rows)

  def __array__(self, dtype=None, copy=None):
    """The whole view in memory (for small views and tests only)."""
    del copy  # a fresh array is made either way
    out = self.gather(np.arange(len(self)))
    return out if dtype is None else out.astype(dtype)


def decoded_mb(num_images: int, size: int) -> float:
  """MiB that `num_images` decoded uint8 images of side `size` take in memory."""
  return num_images * size * size / 2**20


def should_stream(num_images: int, size: int, stream_above_mb: float) -> bool:
  """Whether a set is read from disk: decoded size above the threshold (0: always)."""
  return decoded_mb(num_images, size) > float(stream_above_mb)


def store_key(data_dir: str, records: Sequence[contract.Record], size: int,
              source: str) -> str:
  """A name for one face set's store: its directory, its manifest rows (in order),
  the image size and where the pixels come from. An edited manifest or another
  size gets a fresh file instead of a stale one."""
  h = hashlib.sha256(f"{os.path.abspath(data_dir)}\n{size}\n{source}\n".encode())
  for r in records:
    h.update(f"{r.path}\t{r.expression}\t{r.subject}\t{r.source}\t{r.split}\n".encode())
  return f"{source}-{size}px-{h.hexdigest()[:16]}"


def open_or_write(path: str, num: int, size: int,
                  fill: Callable[[np.ndarray], None]) -> ImageStore:
  """The store at `path`, written first by `fill(memmap)` when it is not there.

  The file is written under a temporary name and renamed into place
  (`fileio.temp_path`, as every file the project writes), so an interrupted
  write never leaves a file that looks complete.
  """
  expected = num * size * size
  if not (os.path.isfile(path) and os.path.getsize(path) == expected):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = fileio.temp_path(path)
    try:
      out = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(num, size, size, 1))
      fill(out)
      out.flush()
      del out
      os.replace(tmp, path)
    except BaseException:
      if os.path.exists(tmp):
        os.remove(tmp)
      raise
  return ImageStore(path, num, size)


def fill_from_files(data_dir: str, records: Sequence[contract.Record], size: int,
                    load_images: Callable) -> Callable[[np.ndarray], None]:
  """A `fill` decoding `records` in chunks with `load_images` (face_images.load_images)."""
  def fill(out: np.ndarray) -> None:
    for start in range(0, len(records), _CHUNK):
      chunk = records[start:start + _CHUNK]
      out[start:start + len(chunk)] = load_images(data_dir, chunk, size)
  return fill
