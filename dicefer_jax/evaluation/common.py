"""Helpers every evaluator shares: how a metric reports "cannot be computed",
mean and spread over seeds, bootstrap intervals, subject ids and subsampling."""

import numpy as np


def finite_or_none(x) -> float | None:
  """A float for JSON, or None for NaN/inf (json.dump would write invalid NaN)."""
  x = float(x)
  return x if np.isfinite(x) else None


def mean_std(values) -> dict:
  """Mean and sample std (ddof=1; 0.0 for a single value) of finite values."""
  values = [float(v) for v in values if v is not None and np.isfinite(v)]
  if not values:
    return dict(mean=None, std=None, n=0)
  std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
  return dict(mean=float(np.mean(values)), std=std, n=len(values))


def percentile_interval(values, level: float = 0.95) -> dict:
  """The central `level` percentile interval of bootstrap values (non-finite ones,
  e.g. a resample that drew no row, are left out and counted)."""
  values = np.asarray(values, np.float64)
  finite = values[np.isfinite(values)]
  if not len(finite):
    return dict(low=None, high=None, level=level, resamples=0,
                dropped=int(len(values)))
  tail = 100.0 * (1.0 - level) / 2.0
  low, high = np.percentile(finite, [tail, 100.0 - tail])
  return dict(low=float(low), high=float(high), level=level, resamples=int(len(finite)),
              dropped=int(len(values) - len(finite)))


def unavailable(reason: str, **fields) -> dict:
  """The report of a metric that cannot be computed: null values and why."""
  return dict(fields, reason=reason)


def known_subjects(subjects) -> np.ndarray:
  """Subject ids as an object array; "" (unknown) stays ""."""
  return np.asarray(["" if s is None else str(s) for s in subjects], dtype=object)


def subsample_by_subject(subjects, max_images: int, seed: int) -> np.ndarray:
  """Indices of at most `max_images` images with KNOWN subjects, spread evenly over
  subjects (each keeps up to ceil(max/num_subjects) images), sorted."""
  subjects = known_subjects(subjects)
  rng = np.random.default_rng(seed)
  ids = sorted(set(subjects) - {""})
  if not ids:
    return np.zeros(0, np.int64)
  per_subject = int(np.ceil(max_images / len(ids))) if max_images else None
  keep = []
  for s in ids:
    members = rng.permutation(np.flatnonzero(subjects == s))
    keep.extend(members[:per_subject])
  keep = np.sort(np.array(keep, dtype=np.int64))
  if max_images and len(keep) > max_images:
    keep = np.sort(rng.choice(keep, max_images, replace=False))
  return keep


def subsample(n: int, max_points: int, seed: int) -> np.ndarray:
  """Sorted indices of at most max_points of range(n), uniformly at random."""
  if not max_points or n <= max_points:
    return np.arange(n)
  return np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))
