"""Evaluators: what a trained model is measured by, kept apart from the trainer.

Array-level metrics, each a function of arrays (not models), so that each can be
tested on inputs whose right answer is known:

- `classification`: accuracy, macro-F1, per-class recall, confusion.
- `mi_estimation`: mutual information by a freshly trained DV critic, its
  calibration on Gaussians of known MI, and the modified MIG built on it.
- `plugin_mi`: counted MI of two label vectors (Miller-Madow corrected), the
  MIG terms' data-processing bounds from predicted labels.
- `identity`: identity leakage, a linear probe naming the subject from a code,
  and the PCA that brings codes to one width.
- `retrieval`: expression agreement of nearest neighbours among other people.
- `embedding`: the 2-D t-SNE maps.
- `common`: reporting helpers they share.

`evaluator` runs them all on a trained model and its test split, with the
settings of `config.eval`; `codes_export` writes every image's codes to a file.
"""
