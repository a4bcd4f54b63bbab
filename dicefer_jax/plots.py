"""Figures written next to evaluation metrics (matplotlib, headless)."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402


def confusion_matrix_png(confusion, class_names, path: str, title: str = "") -> str:
  """Row-normalised confusion matrix with the counts written in each cell.

  Args:
    confusion: (k, k) counts, rows the true class, columns the predicted one.
    class_names: the k class names, in the order of the rows.
    path: PNG to write.
    title: figure title ("confusion matrix" when empty).

  Returns:
    `path`.

  Raises:
    ValueError: `confusion` is not square or does not match `class_names`.
  """
  confusion = np.asarray(confusion)
  k = len(class_names)
  if confusion.shape != (k, k):
    # Checked here: a smaller matrix would fail deep in the cell loop, a larger
    # one would silently lose its last classes.
    raise ValueError(f"confusion matrix of shape {confusion.shape} does not match "
                     f"{k} class names: want ({k}, {k})")
  norm = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
  fig, ax = plt.subplots(figsize=(6.5, 5.5))
  im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
  ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
  ax.set_yticks(range(len(class_names)), class_names)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  for i in range(len(class_names)):
    for j in range(len(class_names)):
      ax.text(j, i, f"{confusion[i, j]}", ha="center", va="center",
              color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
  fig.colorbar(im, ax=ax, label="fraction of true class")
  ax.set_title(title or "confusion matrix")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def embedding_png(points, categories, path: str, title: str = "", order=None,
                  max_legend: int = 20) -> str:
  """2-D embedding (e.g. t-SNE) scattered and coloured by category.

  Args:
    points: (n, 2) coordinates.
    categories: one name per point (an expression, a subject id); "" is drawn
      grey as "unknown".
    path: PNG to write.
    title: figure title.
    order: optional legend order (e.g. the canonical expressions); categories
      not in it follow, sorted.
    max_legend: above this many categories the legend is left out (a legend of
      60 subjects hides the plot); colours then only tell neighbours apart.

  Returns:
    `path`.

  Raises:
    ValueError: `points` is not (n, 2), or `categories` does not have n names.
  """
  points = np.asarray(points)
  categories = np.asarray([str(c) for c in categories], dtype=object)
  if points.ndim != 2 or points.shape[1] != 2:
    raise ValueError(f"embedding points of shape {points.shape}: want (n, 2)")
  if len(categories) != len(points):
    raise ValueError(f"{len(categories)} categories for {len(points)} points: want "
                     "one category per point")
  present = set(categories) - {""}
  order = [c for c in (order or ()) if c in present]
  known = order + sorted(present - set(order))
  many = len(known) > 20
  cmap = plt.get_cmap("hsv" if many else "tab10" if len(known) <= 10 else "tab20")
  fig, ax = plt.subplots(figsize=(6.5, 5.5))
  unknown = categories == ""
  if unknown.any():
    ax.scatter(points[unknown, 0], points[unknown, 1], s=8, c="lightgrey", label="unknown")
  for i, c in enumerate(known):
    m = categories == c
    color = cmap(i / len(known)) if many else cmap(i)
    ax.scatter(points[m, 0], points[m, 1], s=8, color=color, label=c)
  if len(known) <= max_legend:
    ax.legend(fontsize=7, markerscale=2, loc="best", frameon=False)
  else:
    ax.text(0.01, 0.01, f"{len(known)} categories (legend omitted)",
            transform=ax.transAxes, fontsize=7)
  ax.set_xticks([])
  ax.set_yticks([])
  ax.set_title(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
