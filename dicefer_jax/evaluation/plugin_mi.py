"""Plug-in mutual information of two discrete variables, with the Miller-Madow
bias correction.

It gives the MIG's critic estimates a counted companion: for fixed functions f
and g, I(X; Z) >= I(f(X); g(Z)) (data processing), and when f and g output labels
(a predicted expression, a predicted subject) the right side is a contingency
table to count, not a function to learn.
"""

import numpy as np

from dicefer_jax.evaluation.common import unavailable


def _entropy(counts) -> tuple[float, int]:
  """(plug-in entropy in nats, number of non-empty bins) of a count vector."""
  counts = np.asarray(counts, np.float64).ravel()
  counts = counts[counts > 0]
  p = counts / counts.sum()
  return float(-np.sum(p * np.log(p))), int(len(counts))


def contingency_table(a, b) -> np.ndarray:
  """Counts of each (a, b) value pair: rows = sorted values of a, columns = of b."""
  _, ai = np.unique(np.asarray(a), return_inverse=True)
  _, bi = np.unique(np.asarray(b), return_inverse=True)
  table = np.zeros((ai.max() + 1, bi.max() + 1), np.int64)
  np.add.at(table, (ai, bi), 1)
  return table


def plugin_mutual_information(a, b) -> dict:
  """I(a; b) in nats of paired discrete samples, by counting.

  plugin = H(a) + H(b) - H(a, b) of the empirical distribution (biased upward by
  about (m_a - 1)(m_b - 1) / 2N for independent variables); miller_madow adds each
  entropy's first-order correction (m - 1) / 2N, m = non-empty bins, N = samples:
  plugin + (m_a + m_b - m_ab - 1) / 2N. The correction assumes independent rows;
  with rows that reuse items it corrects too little.
  """
  a, b = np.asarray(a), np.asarray(b)
  if a.ndim != 1 or a.shape != b.shape:
    raise ValueError(f"want two label vectors of one length, got {a.shape} and {b.shape}")
  n = len(a)
  if n < 2:
    return unavailable(f"{n} sample(s): plug-in MI needs at least 2", plugin=None,
                       miller_madow=None, num_samples=n)
  table = contingency_table(a, b)
  h_a, m_a = _entropy(table.sum(axis=1))
  h_b, m_b = _entropy(table.sum(axis=0))
  h_ab, m_ab = _entropy(table)
  plugin = h_a + h_b - h_ab
  return dict(plugin=float(plugin),
              miller_madow=float(plugin + (m_a + m_b - m_ab - 1) / (2.0 * n)),
              num_samples=int(n), nonzero_cells=m_ab, values_a=m_a, values_b=m_b)
