"""Classification metrics of predicted expressions against the truth."""

import numpy as np
from sklearn import metrics as sk_metrics

from dicefer_jax import contract


def classification_metrics(labels: np.ndarray, predictions: np.ndarray,
                           class_names=contract.EXPRESSIONS) -> dict:
  """Accuracy, macro-F1, per-class recall and the confusion matrix (rows = truth).

  Classes absent from `labels` get recall None (undefined), not 0.
  """
  labels = np.asarray(labels)
  predictions = np.asarray(predictions)
  k = len(class_names)
  confusion = sk_metrics.confusion_matrix(labels, predictions, labels=np.arange(k))
  support = confusion.sum(axis=1)
  recall = {name: (float(confusion[i, i] / support[i]) if support[i] else None)
            for i, name in enumerate(class_names)}
  present = np.unique(labels)
  return dict(
      accuracy=float(np.mean(labels == predictions)) if len(labels) else float("nan"),
      macro_f1=float(sk_metrics.f1_score(labels, predictions, labels=present,
                                         average="macro", zero_division=0)),
      per_class_recall=recall,
      confusion=confusion.tolist(),
      confusion_normalized=np.where(support[:, None] > 0,
                                    confusion / np.maximum(support[:, None], 1), 0.0).tolist(),
      class_names=list(class_names),
      num_examples=int(len(labels)),
  )
