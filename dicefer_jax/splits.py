"""Train/test splits of a face set that hold out whole subjects.

Identity leaks into any test split that shares people with training: a model can
then score well by recognising faces instead of expressions, which is exactly the
confounder DICE-FER is meant to remove. So `split_records` picks, in order:

1. `official`: every record carries the dataset's own `split` column (train/test).
   Published numbers use it, so folds are ignored.
2. `subject`: every record has a subject id. A seeded k-fold over SUBJECTS; the
   test fold holds out whole people.
3. `stratified`: some subject ids are missing. A seeded k-fold over images,
   stratified by expression so that every fold sees every class in proportion.

Pure Python and numpy: no TensorFlow, so data tools and tests can use it cheaply.
"""

import dataclasses
from typing import Sequence

import numpy as np

from dicefer_jax.contract import Record
from dicefer_jax.errors import DataError

OFFICIAL_SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class SplitInfo:
  """How a split was made; small enough to log or write into a JSON report.

  Attributes:
    kind: 'subject', 'stratified' or 'official'.
    fold: the held-out fold (None for the official split).
    num_folds: the number of folds (None for the official split).
    seed: the seed of the fold assignment (None for the official split).
    num_train: images in the training part.
    num_test: images in the test part.
    train_subjects: sorted subject ids of the training part (known ones only).
    test_subjects: sorted subject ids of the test part (known ones only).
    note: one line on why this kind was chosen.
  """

  kind: str
  fold: int | None
  num_folds: int | None
  seed: int | None
  num_train: int
  num_test: int
  train_subjects: tuple[str, ...]
  test_subjects: tuple[str, ...]
  note: str

  def as_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["train_subjects"] = list(self.train_subjects)
    d["test_subjects"] = list(self.test_subjects)
    return d


def split_kind(records: Sequence[Record]) -> str:
  """The kind of split `split_records` makes for these records."""
  if records and all(r.split in OFFICIAL_SPLITS for r in records):
    return "official"
  if records and all(r.subject for r in records):
    return "subject"
  return "stratified"


def _check_fold_args(num_folds: int, fold: int) -> None:
  if int(num_folds) != num_folds or num_folds < 2:
    raise DataError(f"num_folds={num_folds} is invalid: use an integer >= 2")
  if int(fold) != fold or not 0 <= fold < num_folds:
    raise DataError(
        f"fold={fold} is out of range for num_folds={num_folds}: use 0..{num_folds - 1}")


def subject_folds(subjects: Sequence[str], num_folds: int,
                  seed: int) -> dict[str, int]:
  """Seeded assignment of each distinct subject to one of `num_folds` folds.

  Subjects are sorted before shuffling so that the assignment depends only on the
  set of subjects and the seed, not on the order of the manifest. Fold sizes (in
  subjects) differ by at most one.
  """
  unique = sorted(set(subjects))
  if len(unique) < num_folds:
    raise DataError(
        f"{len(unique)} subject(s) cannot fill {num_folds} subject-held-out folds: "
        f"lower num_folds to at most {max(len(unique), 1)} or add subjects")
  order = np.random.default_rng(seed).permutation(len(unique))
  folds = {}
  for k, part in enumerate(np.array_split(order, num_folds)):
    for i in part:
      folds[unique[i]] = k
  return folds


def stratified_folds(labels: Sequence[int], num_folds: int, seed: int) -> np.ndarray:
  """Seeded fold index per image, stratified by label.

  Within each class the images are shuffled and dealt round-robin over the folds.
  The dealing starts where the previous class stopped, so classes whose size is
  not a multiple of num_folds do not all pile their remainder onto fold 0.
  """
  labels = np.asarray(labels)
  if len(labels) < num_folds:
    raise DataError(
        f"{len(labels)} image(s) cannot fill {num_folds} folds: lower num_folds "
        "or add images")
  rng = np.random.default_rng(seed)
  folds = np.empty(len(labels), dtype=np.int64)
  start = 0
  for label in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == label))
    folds[members] = (start + np.arange(len(members))) % num_folds
    start = (start + len(members)) % num_folds
  return folds


def fold_assignments(records: Sequence[Record], *, num_folds: int = 5,
                     seed: int = 0) -> np.ndarray:
  """Fold index (0..num_folds-1) of every record, by subject or stratified.

  Ignores any official split column: this is the k-fold view used when there is
  no official split (and by tests that check the folds partition the data).
  """
  _check_fold_args(num_folds, 0)
  if not records:
    raise DataError("cannot split an empty face set: the manifest lists no images")
  if all(r.subject for r in records):
    folds = subject_folds([r.subject for r in records], num_folds, seed)
    return np.array([folds[r.subject] for r in records], dtype=np.int64)
  return stratified_folds([r.label for r in records], num_folds, seed)


def _known_subjects(records: Sequence[Record]) -> tuple[str, ...]:
  return tuple(sorted({r.subject for r in records if r.subject}))


def split_records(records: Sequence[Record], *, num_folds: int = 5, fold: int = 0,
                  seed: int = 0) -> tuple[list[Record], list[Record], SplitInfo]:
  """Splits records into (train, test, info); see the module docstring for the kinds.

  Args:
    records: the records of one face set (e.g. from `contract.read_manifest`).
    num_folds: number of folds of the k-fold (ignored for an official split).
    fold: which fold is the test part (ignored for an official split).
    seed: seed of the fold assignment; the same seed gives the same folds.

  Returns:
    (train, test, info): train and test keep the input order of the records.

  Raises:
    DataError: empty records, fold out of range, fewer subjects (or images) than
      folds, or an official split with an empty train or test part.
  """
  _check_fold_args(num_folds, fold)
  records = list(records)
  if not records:
    raise DataError("cannot split an empty face set: the manifest lists no images")
  kind = split_kind(records)
  if kind == "official":
    train = [r for r in records if r.split == "train"]
    test = [r for r in records if r.split == "test"]
    if not train or not test:
      empty = "train" if not train else "test"
      raise DataError(
          f"the manifest's official split has no {empty!r} images: fix the split "
          "column or clear it to use subject-held-out folds")
    return train, test, SplitInfo(
        kind="official", fold=None, num_folds=None, seed=None,
        num_train=len(train), num_test=len(test),
        train_subjects=_known_subjects(train), test_subjects=_known_subjects(test),
        note="every record has an official train/test split; folds are ignored")

  folds = fold_assignments(records, num_folds=num_folds, seed=seed)
  train = [r for r, k in zip(records, folds) if k != fold]
  test = [r for r, k in zip(records, folds) if k == fold]
  if kind == "subject":
    note = (f"whole subjects held out: {len(_known_subjects(test))} of "
            f"{len(_known_subjects(records))} subjects in the test fold")
  else:
    missing = sum(1 for r in records if not r.subject)
    note = (f"{missing} of {len(records)} records lack a subject id, so the folds "
            "are over images stratified by expression; test subjects may also "
            "appear in training")
  return train, test, SplitInfo(
      kind=kind, fold=int(fold), num_folds=int(num_folds), seed=int(seed),
      num_train=len(train), num_test=len(test),
      train_subjects=_known_subjects(train), test_subjects=_known_subjects(test),
      note=note)
