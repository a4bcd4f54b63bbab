"""The evaluation figures: real PNGs of the expected size that show their data."""

import matplotlib
import numpy as np
import pytest
from PIL import Image

from dicefer_jax import contract, plots

# Both figures are 6.5 x 5.5 inches at 120 dpi.
FIGURE_SIZE = (780, 660)  # (width, height) in pixels


def _read_rgb(path):
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with Image.open(path) as image:
    assert image.size == FIGURE_SIZE
    return np.asarray(image.convert("RGB")).astype(int)


def _pixels_of(rgb, color, tolerance=2):
  """Boolean mask of the pixels within `tolerance` (per channel) of an RGB colour."""
  target = np.round(np.asarray(matplotlib.colors.to_rgb(color)) * 255).astype(int)
  return np.all(np.abs(rgb - target) <= tolerance, axis=-1)


def _distinct_colors(rgb):
  return len(np.unique(rgb.reshape(-1, 3), axis=0))


def test_confusion_matrix_png_draws_the_row_normalised_matrix(tmp_path):
  """Catches a blank or wrongly sized figure, and cells not coloured by the
  row-normalised fraction (a perfect row is the darkest blue, an empty cell the
  lightest)."""
  # Unequal row totals, so that normalising by anything but the row total (the
  # largest count, the grand total) gives other colours.
  confusion = np.diag([40, 5, 20, 10, 20, 30, 20])
  confusion[1, 2] = 15  # row 1: 5 of 20 right, 15/20 = 0.75 in one wrong cell
  path = str(tmp_path / "confusion.png")
  assert plots.confusion_matrix_png(confusion, contract.EXPRESSIONS, path, "t") == path
  rgb = _read_rgb(path)
  assert _distinct_colors(rgb) > 50
  blues = matplotlib.colormaps["Blues"]
  darkest = _pixels_of(rgb, blues(1.0)).sum()
  # 6 perfect diagonal cells of about 60x60 px each (less their count text) and the
  # colour bar's top: far more than the colour bar alone.
  assert darkest > 6 * 1500, darkest
  assert _pixels_of(rgb, blues(0.0)).sum() > 30 * 1500
  assert _pixels_of(rgb, blues(0.75)).sum() > 1500  # row 1's 15/20 cell


@pytest.mark.parametrize("shape,names", [((7, 6), contract.EXPRESSIONS),
                                         ((6, 6), contract.EXPRESSIONS),
                                         ((7, 7), contract.EXPRESSIONS[:3])])
def test_confusion_matrix_png_rejects_a_mismatched_matrix(tmp_path, shape, names):
  """Catches a matrix that silently loses classes or fails deep in matplotlib."""
  with pytest.raises(ValueError, match="confusion matrix of shape"):
    plots.confusion_matrix_png(np.ones(shape, int), names, str(tmp_path / "c.png"))


def _clusters(num_categories, per_category=30, seed=0):
  """Points of category i scattered around (i, 0): categories run left to right."""
  rng = np.random.default_rng(seed)
  centres = np.repeat(np.arange(num_categories, dtype=float), per_category)
  points = np.stack([centres + 0.1 * rng.normal(size=centres.size),
                     0.5 * rng.normal(size=centres.size)], axis=1)
  return points, centres.astype(int)


def test_embedding_png_colours_each_category_where_its_points_are(tmp_path):
  """Catches one colour for all points, colours swapped between categories,
  `order` being ignored, and unknown ("") points not drawn grey."""
  points, index = _clusters(3)
  names = np.array(["sadness", "anger", "happiness"])[index]
  names[::10] = ""  # some points of unknown category
  path = str(tmp_path / "embedding.png")
  # max_legend=0: no legend markers, so every coloured pixel is a data point.
  assert plots.embedding_png(points, names, path, order=["happiness", "anger"],
                             max_legend=0) == path
  rgb = _read_rgb(path)
  tab10 = matplotlib.colormaps["tab10"]
  # `order` first, then the rest sorted: happiness, anger, sadness.
  mean_x = {}
  for i, name in enumerate(["happiness", "anger", "sadness"]):
    mask = _pixels_of(rgb, tab10(i))
    assert mask.sum() > 50, (name, mask.sum())
    mean_x[name] = np.nonzero(mask)[1].mean()
  # sadness was drawn at x = 0, anger at 1, happiness at 2.
  assert mean_x["sadness"] < mean_x["anger"] < mean_x["happiness"], mean_x
  # Inside the axes only: the frame's anti-aliased edges hold light greys too.
  inside = rgb[40:600, 40:740]
  assert _pixels_of(inside, "lightgrey").sum() > 50


def test_embedding_png_gives_many_categories_distinct_colours(tmp_path):
  """Catches a palette that repeats colours once there are more than 10 or 20
  categories (e.g. tab10 indexed past its end)."""
  for num_categories in (15, 25):
    points, index = _clusters(num_categories, per_category=10)
    path = str(tmp_path / f"embedding{num_categories}.png")
    plots.embedding_png(points, [f"s{i:02d}" for i in index], path)
    rgb = _read_rgb(path)
    many = num_categories > 20
    cmap = matplotlib.colormaps["hsv" if many else "tab20"]
    colors = [cmap(i / num_categories) if many else cmap(i) for i in range(num_categories)]
    assert len({tuple(np.round(np.asarray(c) * 255)) for c in colors}) == num_categories
    for i, color in enumerate(colors):
      assert _pixels_of(rgb, color).sum() > 20, (num_categories, i)


def test_embedding_png_rejects_bad_inputs(tmp_path):
  path = str(tmp_path / "e.png")
  with pytest.raises(ValueError, match="want \\(n, 2\\)"):
    plots.embedding_png(np.zeros((5, 3)), ["a"] * 5, path)
  with pytest.raises(ValueError, match="one category per point"):
    plots.embedding_png(np.zeros((5, 2)), ["a"] * 4, path)
