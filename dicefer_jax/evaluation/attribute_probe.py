"""Per-image attributes in a code: R^2 of a linear read-out on people it never saw.

What a code carries besides identity and expression (pose, lighting, ...; for
the synthetic set `data_tools.synthetic_nuisance` recovers them) is asked the
way identity leakage is asked of it: a linear model on the code's principal
components. Here the people are split, not their images: a code that names the
person could otherwise score by recalling each person's typical attribute.
"""

import numpy as np
from sklearn import decomposition
from sklearn import linear_model
from sklearn import metrics
from sklearn import model_selection
from sklearn import pipeline
from sklearn import preprocessing


def heldout_people_r2(codes: np.ndarray, targets: np.ndarray, subjects, pca_dim: int,
                      num_splits: int = 4, alphas=tuple(np.logspace(-1, 5, 7))
                      ) -> np.ndarray:
  """Held-out-people R^2 of a ridge regression from codes to each target column.

  Standardised codes, their first `pca_dim` principal components (as the
  identity probe sees them), then ridge. Each group of people is predicted by a
  model fitted on the others (GroupKFold), whose penalty (one per target) was
  chosen the same way among those others: choosing it on the same people's
  images would reward remembering people, not reading the attribute.

  Args:
    codes: (N, D) one code per image.
    targets: (N, T) float attributes, one column each.
    subjects: (N,) who each image shows.
    pca_dim: principal components kept (fewer when D is smaller).
    num_splits: groups of people, outer and inner.
    alphas: the ridge penalties tried.

  Returns:
    (T,) R^2 per attribute on held-out people: 0 is what the training mean
    achieves, negative is worse.
  """
  subjects = np.asarray(subjects)
  targets = np.asarray(targets, np.float64).reshape(len(subjects), -1)
  num_people = len(np.unique(subjects))
  if num_people < num_splits + 2:
    raise ValueError(f"{num_people} people: reading attributes on held-out people "
                     f"with {num_splits} groups needs at least {num_splits + 2}")
  dim = min(pca_dim, codes.shape[1])
  make = lambda alpha: pipeline.make_pipeline(
      preprocessing.StandardScaler(), decomposition.PCA(dim, random_state=0),
      linear_model.Ridge(alpha=alpha))

  def group_cv_predictions(x, y, groups, alpha):
    return model_selection.cross_val_predict(
        make(alpha), x, y, groups=groups, cv=model_selection.GroupKFold(num_splits))

  predicted = np.zeros_like(targets)
  for fit, held in model_selection.GroupKFold(num_splits).split(codes, groups=subjects):
    x, y = codes[fit], targets[fit]
    inner = np.stack([metrics.r2_score(y, group_cv_predictions(x, y, subjects[fit], a),
                                       multioutput="raw_values") for a in alphas])
    best = np.asarray(alphas)[np.argmax(inner, axis=0)]
    for alpha in np.unique(best):
      cols = best == alpha
      fitted = make(alpha).fit(x, y[:, cols])
      predicted[np.ix_(held, cols)] = fitted.predict(codes[held]).reshape(len(held), -1)
  return metrics.r2_score(targets, predicted, multioutput="raw_values")
