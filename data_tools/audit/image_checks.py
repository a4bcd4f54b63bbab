"""Per-image quality measures (sharpness, exposure) and the audit findings they give.

Every measure is computed on the 112x112 grayscale face the training code sees.
`measure_images` takes arrays from any iterator (the caller decides how images
are read); `measure_face_set` reads a face set with a thread pool. `blur_findings`
and `exposure_findings` turn the measures into `findings.Finding` rows, and
`plot_measure_distributions` draws each measure's histogram with its threshold,
so a person can choose the thresholds by eye.

The defaults of `Thresholds` were chosen by measuring the default synthetic set
(60 subjects x 7 expressions x 10 images, seed 0: 4,200 images) and the real
portrait `skimage.data.astronaut()` (face cropped, grayscale, 112x112):

  measure             synthetic min / 1% / 50% / 99% / max    astronaut
  Laplacian variance  31.9 / 47.7 / 367 / 1206 / 2170         609-1003
  mean                38.0 / 59.3 / 132 / 200 / 214.5         143
  5th percentile      0 / 1 / 74 / 143 / 177
  95th percentile     92 / 118 / 195 / 255 / 255
  p95 - p5 spread     23 / 41 / 119 / 227 / 255               215
  share <= 5 (black)  0 / 0 / 0 / 0.094 / 0.567
  share >= 250        0 / 0 / 0 / 0.226 / 0.390

A Gaussian blur of sigma 1.5 / 2 / 3 pixels brings the synthetic faces'
Laplacian variance to a median of 10 / 5.4 / 2.6 (maxima 34 / 17 / 6.2) and the
astronaut's to 32 / 16 / 5.9; the astronaut shrunk to 48 pixels and enlarged
back (a low-resolution source such as FER-2013) keeps 90. So 20 flags faces
blurred by more than about sigma 1.7 and no synthetic original, nor an
upsampled low-resolution face. The exposure limits sit beyond every synthetic
image (whose lighting gradients are meant to be hard but usable), with a
margin: a set of aligned faces whose mean is below 30 or above 225 is not
usable, whatever the background.
"""

import concurrent.futures
import dataclasses
import io
import math
import os
from typing import Callable, Iterable, NamedTuple, Sequence, TypeVar

import cv2
import numpy as np

from data_tools.audit import findings
from dicefer_jax import contract
from dicefer_jax import face_images
from dicefer_jax import fileio
from dicefer_jax.errors import DataError

# Pixel levels counted as clipped: a few levels of slack, as JPEG ringing and
# sensor noise keep a clipped region from being exactly 0 or 255.
BLACK_LEVEL = 5
WHITE_LEVEL = 250
# The Laplacian variance of a flat image is 0; the blur score divides by it.
_MIN_VARIANCE = 1e-3

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Thresholds:
  """Where a measure becomes a finding (see the module docstring for why)."""

  # Blur: variance of the Laplacian below this.
  min_laplacian_var: float = 20.0
  # Too dark: mean below dark_mean, or even the brightest 5% below dark_p95.
  dark_mean: float = 30.0
  dark_p95: float = 60.0
  # Too bright: mean above bright_mean, or even the darkest 5% above bright_p5.
  bright_mean: float = 225.0
  bright_p5: float = 200.0
  # Clipped shares: more than a background explains (the synthetic set's dark
  # backgrounds reach 0.57 black; its white ones 0.39).
  max_black_share: float = 0.7
  max_white_share: float = 0.6
  # Too little contrast: p95 - p5 below this.
  min_spread: float = 16.0

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"threshold {field.name}={value!r} is not a finite number")
    if not 0 < self.min_laplacian_var:
      raise DataError(f"threshold min_laplacian_var={self.min_laplacian_var} must "
                      "be positive")
    for name in ("max_black_share", "max_white_share"):
      if not 0 <= getattr(self, name) < 1:
        raise DataError(f"threshold {name}={getattr(self, name)} must be a share "
                        "in [0, 1)")
    for name in ("dark_mean", "dark_p95", "bright_mean", "bright_p5", "min_spread"):
      if not 0 < getattr(self, name) < 255:
        raise DataError(f"threshold {name}={getattr(self, name)} must be a pixel "
                        "level between 0 and 255")


class ImageMeasure(NamedTuple):
  """The measures of one image (a tuple, in MEASURES order)."""

  laplacian_var: float
  mean: float
  p5: float
  p95: float
  black_share: float
  white_share: float


MEASURES = ImageMeasure._fields


@dataclasses.dataclass(frozen=True)
class MeasureTable:
  """Measures of many images: one float64 array per measure, row i = image i."""

  laplacian_var: np.ndarray
  mean: np.ndarray
  p5: np.ndarray
  p95: np.ndarray
  black_share: np.ndarray
  white_share: np.ndarray

  def __len__(self) -> int:
    return len(self.mean)

  @property
  def spread(self) -> np.ndarray:
    """p95 - p5: the contrast measure, robust to a few extreme pixels."""
    return self.p95 - self.p5

  @classmethod
  def from_rows(cls, rows: Sequence[ImageMeasure]) -> "MeasureTable":
    table = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(MEASURES))
    return cls(*(table[:, k].copy() for k in range(len(MEASURES))))


def as_face(image: np.ndarray) -> np.ndarray:
  """A 2-D uint8 image at the contract's size (the array the training code sees).

  Images of another size are resized with the contract's one resize rule: the
  Laplacian variance depends on scale (shrinking concentrates edges and raises
  it, enlarging spreads them and lowers it), so only at one size is it
  comparable with the thresholds.

  Raises:
    DataError: for an array that is not a uint8 grayscale image.
  """
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[2] == 1:
    image = image[:, :, 0]
  if image.ndim != 2 or image.dtype != np.uint8 or image.size == 0:
    raise DataError(f"expected a uint8 grayscale image (H, W) or (H, W, 1), got "
                    f"{image.dtype} {image.shape}")
  return face_images.resize_square(image, contract.IMAGE_SIZE)


def measure_image(image: np.ndarray) -> ImageMeasure:
  """The measures of one grayscale uint8 image (resized to 112x112 first).

  Percentiles are of the pixel values, "inverted CDF" style: the p-th
  percentile is the smallest level at or below which p% of the pixels lie
  (numpy's method="inverted_cdf"), read off the 256-bin histogram.
  """
  face = as_face(image)
  laplacian = cv2.Laplacian(face, cv2.CV_64F)
  counts = np.bincount(face.ravel(), minlength=256)
  n = face.size
  cumulative = np.cumsum(counts)
  p5, p95 = np.searchsorted(cumulative, (0.05 * n, 0.95 * n), side="left")
  levels = np.arange(256)
  return ImageMeasure(
      laplacian_var=float(laplacian.var()),
      mean=float(counts @ levels / n),
      p5=float(p5), p95=float(p95),
      black_share=float(counts[:BLACK_LEVEL + 1].sum() / n),
      white_share=float(counts[WHITE_LEVEL:].sum() / n))


def measure_images(images: Iterable[np.ndarray]) -> MeasureTable:
  """Measures every image of an iterator, in order."""
  return MeasureTable.from_rows([measure_image(image) for image in images])


def map_face_images(data_dir: str, records: Sequence[contract.Record],
                    fn: Callable[[np.ndarray], T], workers: int = 0) -> list[T]:
  """fn(face) for every record's image, decoded by `face_images.decode_face`.

  Threads decode and apply `fn` side by side (cv2 releases the GIL while
  decoding and filtering), and no more than one image per thread is held in
  memory. Pass a function doing several checks to read each file once.

  Returns:
    The results, result i being records[i]'s.

  Raises:
    DataError: naming the first file that is missing or cannot be decoded.
  """
  def one(record: contract.Record) -> T:
    return fn(face_images.decode_face(os.path.join(data_dir, record.path)))

  workers = workers or min(8, fileio.default_workers())
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    # list() re-raises the first worker error here, in record order.
    return list(pool.map(one, records))


def measure_face_set(data_dir: str, records: Sequence[contract.Record],
                     workers: int = 0) -> MeasureTable:
  """The measures of every record's image; row i is records[i]."""
  return MeasureTable.from_rows(map_face_images(data_dir, records, measure_image,
                                                workers))


def _check_aligned(records: Sequence[contract.Record], table: MeasureTable):
  if len(records) != len(table):
    raise DataError(f"{len(records)} records but {len(table)} measured images: "
                    "measure the same records the findings are for")


def blur_score(laplacian_var: float, thresholds: Thresholds) -> float:
  """log10(threshold / variance): positive when flagged, +1 per decade blurrier."""
  return math.log10(thresholds.min_laplacian_var / max(laplacian_var, _MIN_VARIANCE))


def blur_findings(records: Sequence[contract.Record], table: MeasureTable,
                  thresholds: Thresholds = Thresholds()) -> list[findings.Finding]:
  """A BLUR finding for each image whose Laplacian variance is below threshold.

  The variance grows with the square of the contrast, so a dark or flat image
  is flagged blurry too; its detail then points at the exposure finding,
  which is the one to read.
  """
  _check_aligned(records, table)
  out = []
  for i, record in enumerate(records):
    value = float(table.laplacian_var[i])
    if value < thresholds.min_laplacian_var:
      detail = (f"blurry: Laplacian variance {value:.3g} < "
                f"{thresholds.min_laplacian_var:g}")
      if exposure_problems(_row(table, i), thresholds):
        detail += " (badly exposed too, which lowers this measure: see exposure)"
      out.append(findings.Finding(
          path=record.path, kind=findings.BLUR,
          score=blur_score(value, thresholds), suggestion=findings.DROP,
          detail=detail, expression=record.expression, subject=record.subject))
  return out


def _row(table: MeasureTable, i: int) -> ImageMeasure:
  return ImageMeasure(*(float(getattr(table, name)[i]) for name in MEASURES))


def exposure_problems(measure: ImageMeasure,
                      thresholds: Thresholds = Thresholds()) -> list[tuple[str, float]]:
  """(text, severity) of each exposure limit the image breaks.

  Each severity is the distance past the limit as a fraction of the room
  beyond it (0 at the limit, 1 at the extreme: mean 0 for a dark limit), so
  severities of different measures are comparable.
  """
  t = thresholds
  problems = []
  if measure.mean < t.dark_mean:
    problems.append((f"too dark: mean {measure.mean:.1f} < {t.dark_mean:g}",
                     (t.dark_mean - measure.mean) / t.dark_mean))
  if measure.p95 < t.dark_p95:
    problems.append((f"too dark: 95th percentile {measure.p95:.0f} < {t.dark_p95:g}",
                     (t.dark_p95 - measure.p95) / t.dark_p95))
  if measure.black_share > t.max_black_share:
    problems.append((f"too dark: {measure.black_share:.0%} of pixels black > "
                     f"{t.max_black_share:.0%}",
                     (measure.black_share - t.max_black_share) / (1 - t.max_black_share)))
  if measure.mean > t.bright_mean:
    problems.append((f"too bright: mean {measure.mean:.1f} > {t.bright_mean:g}",
                     (measure.mean - t.bright_mean) / (255 - t.bright_mean)))
  if measure.p5 > t.bright_p5:
    problems.append((f"too bright: 5th percentile {measure.p5:.0f} > {t.bright_p5:g}",
                     (measure.p5 - t.bright_p5) / (255 - t.bright_p5)))
  if measure.white_share > t.max_white_share:
    problems.append((f"too bright: {measure.white_share:.0%} of pixels white > "
                     f"{t.max_white_share:.0%}",
                     (measure.white_share - t.max_white_share) / (1 - t.max_white_share)))
  spread = measure.p95 - measure.p5
  if spread < t.min_spread:
    problems.append((f"too little contrast: p95-p5 spread {spread:.0f} < "
                     f"{t.min_spread:g}", (t.min_spread - spread) / t.min_spread))
  return problems


def exposure_findings(records: Sequence[contract.Record], table: MeasureTable,
                      thresholds: Thresholds = Thresholds()) -> list[findings.Finding]:
  """An EXPOSURE finding for each image breaking any exposure limit.

  The detail names every limit broken ("too dark: mean 4.1 < 30; too little
  contrast: ..."); the score is the largest severity (`exposure_problems`).
  """
  _check_aligned(records, table)
  out = []
  for i, record in enumerate(records):
    problems = exposure_problems(_row(table, i), thresholds)
    if problems:
      out.append(findings.Finding(
          path=record.path, kind=findings.EXPOSURE,
          score=max(severity for _, severity in problems), suggestion=findings.DROP,
          detail="; ".join(text for text, _ in problems),
          expression=record.expression, subject=record.subject))
  return out


def image_findings(records: Sequence[contract.Record], table: MeasureTable,
                   thresholds: Thresholds = Thresholds()) -> list[findings.Finding]:
  """Blur and exposure findings together."""
  return (blur_findings(records, table, thresholds)
          + exposure_findings(records, table, thresholds))


# (file stem, title, measure name, x label, thresholds drawn, log x)
_PLOTS = (
    ("laplacian_var", "blur: variance of the Laplacian", "laplacian_var",
     "variance of the Laplacian (log scale; lower is blurrier)",
     ("min_laplacian_var",), True),
    ("mean", "exposure: mean brightness", "mean", "mean pixel level",
     ("dark_mean", "bright_mean"), False),
    ("p95", "exposure: 95th percentile (too dark below the line)", "p95",
     "95th percentile pixel level", ("dark_p95",), False),
    ("p5", "exposure: 5th percentile (too bright above the line)", "p5",
     "5th percentile pixel level", ("bright_p5",), False),
    ("spread", "exposure: contrast", "spread", "p95 - p5 spread",
     ("min_spread",), False),
    ("black_share", "exposure: share of black pixels", "black_share",
     f"share of pixels <= {BLACK_LEVEL}", ("max_black_share",), False),
    ("white_share", "exposure: share of white pixels", "white_share",
     f"share of pixels >= {WHITE_LEVEL}", ("max_white_share",), False),
)


def _histogram_png(values: np.ndarray, title: str, xlabel: str,
                   lines: Sequence[tuple[str, float]], log_x: bool) -> bytes:
  # A bare Figure with its own Agg canvas, not pyplot: no global backend or
  # figure state, so it is safe beside other threads and other plotting code.
  # pylint: disable=g-import-not-at-top
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  # pylint: enable=g-import-not-at-top
  fig = Figure(figsize=(6.4, 3.6))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  values = np.asarray(values, dtype=np.float64)
  values = values[np.isfinite(values)]
  if log_x:
    # Zeros (flat images) are drawn at the smallest bin instead of vanishing.
    values = np.maximum(values, _MIN_VARIANCE)
    limits = [v for _, v in lines] + list(values)
    low, high = min(limits), max(limits)
    bins = np.logspace(np.log10(low), np.log10(high * 1.0001), 60) if high > low else 60
    ax.set_xscale("log")
  else:
    bins = 60
  if values.size:
    ax.hist(values, bins=bins, color="#4a78b0")
  for name, value in lines:
    # Flagged are the images beyond the line: below a min_/dark_ limit, above
    # a max_/bright_ one.
    below = name.startswith(("min_", "dark_"))
    flagged = int(np.sum(values < value if below else values > value))
    ax.axvline(value, color="#c0392b", linestyle="--",
               label=f"{name} = {value:g} ({flagged} flagged)")
  if lines:
    ax.legend(fontsize=8)
  ax.set_title(f"{title} ({values.size} images)", fontsize=10)
  ax.set_xlabel(xlabel)
  ax.set_ylabel("images")
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100)
  return buffer.getvalue()


def plot_measure_distributions(table: MeasureTable, out_dir: str,
                               thresholds: Thresholds = Thresholds(),
                               prefix: str = "measure_") -> list[tuple[str, str]]:
  """Writes one histogram PNG per measure, its threshold(s) as vertical lines.

  Args:
    table: the measures of a face set.
    out_dir: folder to write into (created if missing), e.g. DIR/audit.
    thresholds: the limits drawn.
    prefix: file names are `<prefix><measure>.png`.

  Returns:
    (title, path) of each PNG written, in a fixed order.
  """
  os.makedirs(out_dir, exist_ok=True)
  written = []
  for stem, title, measure, xlabel, limit_names, log_x in _PLOTS:
    values = table.spread if measure == "spread" else getattr(table, measure)
    lines = [(name, float(getattr(thresholds, name))) for name in limit_names]
    path = os.path.join(out_dir, f"{prefix}{stem}.png")
    fileio.write_bytes_atomic(path, _histogram_png(values, title, xlabel, lines, log_x))
    written.append((title, path))
  return written
