"""Identity leakage: how well a linear probe names the subject from a code.

`identity_probe` fits and tests the probe on different images of the same
people; `fit_pca` gives codes of different widths a common number of
principal components first, so that probes compare like with like.
"""

import numpy as np
from sklearn import linear_model
from sklearn import preprocessing

from dicefer_jax.evaluation.common import known_subjects, unavailable


def split_within_subjects(subjects, labels, test_fraction: float, seed: int
                          ) -> tuple[np.ndarray, np.ndarray]:
  """(train, test) indices with every subject on both sides.

  Each subject's images are ordered by expression (shuffled within) and dealt
  alternately, so the two sides of a subject hold similar expression mixes: the
  probe cannot name the person by the expressions they happened to pose.
  Subjects with fewer than 2 images, and unknown subjects, are left out.
  """
  subjects = known_subjects(subjects)
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  train, test = [], []
  for s in sorted(set(subjects) - {""}):
    members = np.flatnonzero(subjects == s)
    if len(members) < 2:
      continue
    members = rng.permutation(members)
    members = members[np.argsort(labels[members], kind="stable")]
    # Evenly spaced test positions (every other image at fraction 0.5), from a
    # random offset; at least one image on each side.
    pos = np.arange(len(members)) + rng.integers(len(members))
    is_test = np.floor((pos + 1) * test_fraction) > np.floor(pos * test_fraction)
    if not is_test.any():
      is_test[rng.integers(len(members))] = True
    if is_test.all():
      is_test[rng.integers(len(members))] = False
    test.extend(members[is_test])
    train.extend(members[~is_test])
  return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(test, dtype=np.int64))


def fit_subject_probe(codes, subjects, *, regularization: float = 1.0,
                      max_iter: int = 1000):
  """A linear probe naming the subject from a code: codes -> predicted subject ids.

  Logistic regression on inputs standardised with the fitting codes' statistics;
  the returned function is fixed (it never sees the codes it is applied to).
  """
  codes = np.asarray(codes, np.float64)
  scaler = preprocessing.StandardScaler().fit(codes)
  probe = linear_model.LogisticRegression(C=regularization, max_iter=max_iter)
  probe.fit(scaler.transform(codes), np.asarray(subjects))
  return lambda x: probe.predict(scaler.transform(np.asarray(x, np.float64)))


def identity_probe(codes, subjects, labels, *, test_fraction: float = 0.5, seed: int = 0,
                   regularization: float = 1.0, max_iter: int = 1000) -> dict:
  """Accuracy of a linear probe (logistic regression) naming the subject from `codes`.

  Trained on part of each subject's images, tested on the others of the same
  subjects (`split_within_subjects`). Inputs are standardised with the training
  part's statistics. `chance` is the majority-subject rate of the test part (the
  best constant guess); `chance_uniform` is 1 / number of subjects.
  """
  codes = np.asarray(codes, np.float64)
  subjects = known_subjects(subjects)
  train, test = split_within_subjects(subjects, labels, test_fraction, seed)
  ids = sorted(set(subjects[train]))
  if len(ids) < 2 or not len(test):
    return unavailable(
        f"{len(ids)} subject(s) with at least 2 images: a subject probe needs 2 or more",
        accuracy=None, chance=None, chance_uniform=None, num_subjects=len(ids))
  probe = fit_subject_probe(codes[train], subjects[train], regularization=regularization,
                            max_iter=max_iter)
  predicted = probe(codes[test])
  _, counts = np.unique(subjects[test], return_counts=True)
  return dict(accuracy=float(np.mean(predicted == subjects[test])),
              chance=float(counts.max() / counts.sum()),
              chance_uniform=1.0 / len(ids), num_subjects=len(ids),
              num_train=int(len(train)), num_test=int(len(test)),
              code_dim=int(codes.shape[1]))


def fit_pca(codes, num_components: int):
  """x -> its first `num_components` principal-component scores, the components
  fitted on `codes` (centred, not whitened: the probe standardises its inputs).

  Raises ValueError when `codes` cannot give that many components (fewer
  dimensions, or fewer rows than components + 1).
  """
  codes = np.asarray(codes, np.float64)
  if num_components > min(codes.shape[1], len(codes) - 1):
    raise ValueError(f"{num_components} principal components need at least that many "
                     f"dimensions and one more row, got codes of shape {codes.shape}")
  mean = codes.mean(axis=0)
  _, _, vt = np.linalg.svd(codes - mean, full_matrices=False)
  basis = vt[:num_components].T
  return lambda x: (np.asarray(x, np.float64) - mean) @ basis
