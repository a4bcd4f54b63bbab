"""Retrieval: do a code's nearest neighbours among OTHER people share its expression?"""

import numpy as np

from dicefer_jax.evaluation.common import known_subjects, unavailable


def cross_subject_retrieval(codes, labels, subjects, *, k: int = 6, metric: str = "cosine",
                            chunk: int = 1024) -> dict:
  """Mean fraction of each query's k nearest neighbours that share its expression.

  Neighbours come from other subjects only (when both subjects are known; an
  image of unknown subject excludes only itself), so a code cannot score by
  finding the same person's other images. `chance` is the same fraction for k
  neighbours drawn at random from each query's candidates (its class's share of
  them), averaged over queries.
  """
  if metric not in ("cosine", "euclidean"):
    raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
  x = np.asarray(codes, np.float64)
  labels = np.asarray(labels)
  subjects = known_subjects(subjects)
  if metric == "cosine":
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  sq = np.sum(x * x, axis=1)
  known = subjects != ""
  precisions, chances = [], []
  for start in range(0, len(x), chunk):
    q = slice(start, min(start + chunk, len(x)))
    dist = sq[q, None] + sq[None, :] - 2.0 * x[q] @ x.T
    excluded = (subjects[q, None] == subjects[None, :]) & known[q, None] & known[None, :]
    excluded[np.arange(dist.shape[0]), np.arange(start, q.stop)] = True
    dist = np.where(excluded, np.inf, dist)
    num_candidates = np.sum(~excluded, axis=1)
    same = labels[q, None] == labels[None, :]
    for i in range(dist.shape[0]):
      kk = min(k, int(num_candidates[i]))
      if kk == 0:
        continue
      nearest = np.argpartition(dist[i], kk - 1)[:kk]
      precisions.append(np.mean(same[i, nearest]))
      chances.append(np.sum(same[i] & ~excluded[i]) / num_candidates[i])
  if not precisions:
    return unavailable("no query has a candidate neighbour from another subject",
                       precision_at_k=None, chance=None, k=k, metric=metric)
  return dict(precision_at_k=float(np.mean(precisions)), chance=float(np.mean(chances)),
              k=int(k), metric=metric, num_queries=len(precisions),
              cross_subject=bool(np.all(known)))
