"""Suspect labels: out-of-fold predictions ranked by confident learning.

Each image is judged by a classifier that never saw it: the face set is cut
into k folds (stratified by label; an image and its duplicates always share a
fold, so a copy cannot vouch for itself), and for each fold the project's own
supervised baseline (`method="baseline"`: the ResNet-18 trunk, input pipeline
and augmentation of training) is trained on the other folds and predicts the
held-out one. cleanlab's confident learning (`cleanlab.filter.find_label_issues`)
then picks the images whose given label the out-of-fold probabilities do not
support, ranked by self-confidence (the probability of the given label), and
the class the model prefers becomes the suggested label.

Each fold's model is an ordinary training workdir under
`DIR/audit/label_model/<key>/fold_<k>/`: an interrupted audit resumes it, and
a rerun on the same images, labels and config reuses it. The key hashes what
the models depend on (paths, labels, folds, config), so a relabelled set gets
new models and old ones are never overwritten.

Trains with TensorFlow's input pipeline: call it in a process without torch
(the framing check keeps MTCNN in worker processes for this reason).
"""

import hashlib
import json
import os
from typing import Sequence

import numpy as np

from data_tools.audit import findings as findings_lib
from dicefer_jax import contract, data as data_lib, face_images, fileio, splits
from dicefer_jax import workdir as workdir_lib
from dicefer_jax.errors import DataError, UserError


def check_label_config(config) -> None:
  """The label model must be the supervised baseline: one stage, no pairs."""
  if config.method != "baseline":
    raise UserError(f"the label model's config has method={config.method!r}: the "
                    "audit trains the supervised baseline; set method='baseline'")


def fold_of_images(labels: np.ndarray, groups: Sequence, num_folds: int, seed: int
                   ) -> np.ndarray:
  """Fold index per image: stratified by label, each group in one fold."""
  if num_folds < 2:
    raise UserError(f"--label_folds={num_folds}: at least 2 folds are needed so that "
                    "no image is judged by a model that saw it")
  return splits.grouped_folds(labels, list(groups), num_folds, seed)


def _model_key(records, folds, config) -> str:
  digest = hashlib.sha256()
  for r, f in zip(records, folds):
    digest.update(f"{r.path}\t{r.expression}\t{int(f)}\n".encode())
  digest.update(config.to_json(sort_keys=True).encode())
  return digest.hexdigest()[:12]


def _split_info(fold: int, num_folds: int, seed: int, n_train: int, n_test: int
                ) -> splits.SplitInfo:
  return splits.SplitInfo(kind="grouped", fold=fold, num_folds=num_folds, seed=seed,
                          num_train=n_train, num_test=n_test, train_subjects=(),
                          test_subjects=(),
                          note="audit label check: image folds, duplicates kept together")


def out_of_fold_probabilities(config, faces: data_lib.FaceSet, folds: np.ndarray,
                              model_root: str) -> np.ndarray:
  """(N, 7) class probabilities of every image from the model of its own fold.

  Args:
    config: the label model's config (method "baseline"); its image_size,
      model and baseline.num_steps set the cost.
    faces: the face set (records and decoded images).
    folds: fold index per record (`fold_of_images`).
    model_root: where the fold workdirs go (kept, for resuming and reuse).
  """
  # Imported here: the trainer brings JAX and TensorFlow, which the audit's
  # other checks do not need.
  from dicefer_jax import models, train  # pylint: disable=g-import-not-at-top
  check_label_config(config)
  images = faces.images(config.image_size)
  labels, subjects = face_images.labels_and_subjects(faces.records)
  subjects = np.asarray(subjects, dtype=object)
  model = models.build_model(config.model, contract.NUM_CLASSES)
  probabilities = np.full((len(labels), contract.NUM_CLASSES), np.nan, np.float32)
  num_folds = int(folds.max()) + 1
  for k in range(num_folds):
    test = np.flatnonzero(folds == k)
    trainset = np.flatnonzero(folds != k)
    fold_dir = os.path.join(model_root, f"fold_{k}")
    # The key already names the config: the saved copy documents the workdir.
    workdir_lib.save_config(config, fold_dir, config)
    data = data_lib.FaceData(
        faces.data_dir, _split_info(k, num_folds, config.split_seed, len(trainset), len(test)),
        images[trainset], labels[trainset], list(subjects[trainset]),
        images[test], labels[test], list(subjects[test]))
    print(f"label check: fold {k + 1}/{num_folds}: training on {len(trainset)} images, "
          f"judging {len(test)}", flush=True)
    writer = train.MetricWriter(fold_dir)
    try:
      state = train.train_stage("baseline", config, fold_dir, model, data, writer)
    finally:
      writer.close()
    logits = train.predict(config, model, state, images[test])["logits"]
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    probabilities[test] = p / p.sum(axis=1, keepdims=True)
  return probabilities


def label_findings(records: Sequence[contract.Record], probabilities: np.ndarray
                   ) -> list[findings_lib.Finding]:
  """LABEL findings for the images confident learning calls mislabelled.

  Score: 1 - p(given label), larger = the model believes the label less.
  """
  # Imported here: cleanlab imports scikit-learn and pandas (seconds).
  from cleanlab import filter as cleanlab_filter  # pylint: disable=g-import-not-at-top
  labels = np.array([r.label for r in records])
  probabilities = np.asarray(probabilities, np.float64)
  if probabilities.shape != (len(records), contract.NUM_CLASSES):
    raise DataError(f"expected ({len(records)}, {contract.NUM_CLASSES}) probabilities, "
                    f"got {probabilities.shape}")
  present = np.unique(labels)
  if len(present) < 2:
    return []
  # cleanlab needs every class it is told about to occur; a set without some
  # expression is judged among the classes it has.
  columns = probabilities[:, present]
  columns = columns / columns.sum(axis=1, keepdims=True)
  given = np.searchsorted(present, labels)
  # n_jobs=1: cleanlab's parallel path forks, and a forked JAX process can deadlock.
  issues = cleanlab_filter.find_label_issues(
      given, columns, return_indices_ranked_by="self_confidence", n_jobs=1)
  out = []
  for i in issues:
    r = records[i]
    best = int(present[np.argmax(columns[i])])
    p_given, p_best = float(columns[i, given[i]]), float(columns[i].max())
    suggested = contract.EXPRESSIONS[best]
    out.append(findings_lib.Finding(
        path=r.path, kind=findings_lib.LABEL, score=1.0 - p_given,
        suggestion=(findings_lib.relabel_suggestion(suggested)
                    if best != r.label else findings_lib.KEEP),
        detail=(f"labelled {r.expression} (p={p_given:.2f}); the out-of-fold model "
                f"says {suggested} (p={p_best:.2f})"),
        expression=r.expression, subject=r.subject))
  return out


def write_probabilities(path: str, records, probabilities: np.ndarray, folds) -> None:
  """The out-of-fold probabilities as JSON lines, for anyone re-ranking them."""
  lines = [json.dumps(dict(path=r.path, expression=r.expression, fold=int(f),
                           probabilities=[round(float(p), 6) for p in row]))
           for r, f, row in zip(records, folds, probabilities)]
  fileio.write_text_atomic(path, "\n".join(lines) + "\n")


def model_dir(audit_dir: str, records, folds, config) -> str:
  return os.path.join(audit_dir, "label_model", _model_key(records, folds, config))
