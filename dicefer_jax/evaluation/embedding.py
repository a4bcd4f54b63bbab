"""2-D maps of codes (t-SNE) for the embedding figures."""

import numpy as np
from sklearn import manifold
import threadpoolctl


def tsne_2d(codes, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
  """2-D t-SNE of codes (standardised first); perplexity is capped below n/3."""
  x = np.asarray(codes, np.float64)
  x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-8)
  perplexity = float(min(perplexity, max(1.0, (len(x) - 1) / 3)))
  tsne = manifold.TSNE(2, perplexity=perplexity, init="pca", learning_rate="auto",
                       random_state=seed)
  # One OpenMP thread: on a busy machine (XLA's and TensorFlow's pools, other
  # processes) spinning OpenMP workers made a 40-point map take 10 s instead of
  # 0.1 s; for <= ~1000 points one thread is fast anyway.
  with threadpoolctl.threadpool_limits(1, user_api="openmp"):
    return tsne.fit_transform(x)
