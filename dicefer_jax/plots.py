"""Figures written next to evaluation metrics (matplotlib, headless)."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402


def confusion_matrix_png(confusion, class_names, path: str, title: str = "") -> str:
  """Row-normalised confusion matrix with the counts written in each cell."""
  confusion = np.asarray(confusion)
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
