"""Train/test splits of a face set that hold out whole subjects.

Identity leaks into any test split that shares people with training: a model can
then score well by recognising faces instead of expressions, which is exactly the
confounder DICE-FER is meant to remove. So `split_records` picks, in order:

1. `official`: every record carries the dataset's own `split` column (train/test).
   Published numbers use it, so folds are ignored. Subjects on both sides are
   named in a `SplitWarning` and kept in `SplitInfo.shared_subjects`: the split
   stays the dataset's, but its scores are then not subject-independent.
2. `subject_pinned`: some records say `split=train` and all the others leave it
   empty. Their subjects are always in training; a seeded k-fold over the OTHER
   subjects makes the test folds (fold k tests the unpinned subjects of fold k and
   trains on the pinned ones plus the other unpinned). Every record needs a
   subject id, and a subject is pinned in all of its images or in none. The
   synthetic set's confounded benchmark (data_tools/synthetic.py) pins the
   cohort whose appearance predicts its expressions, so only the clean cohort is
   tested. Any other mix of split values (some `test` and some empty, say) is a
   DataError that says what to write.
3. `subject`: every record has a subject id. A seeded k-fold over SUBJECTS; the
   test fold holds out whole people.
4. `grouped`: some records have a subject id, some do not. A seeded k-fold over
   groups: each known subject is one group (held out whole) and each image without
   a subject is a group of its own; stratified by expression as far as the groups
   allow. The images without a subject may show people seen on the other side,
   which no one can check, so a `SplitWarning` gives their count.
5. `stratified`: no record has a subject id. Every image is its own group, so this
   is a seeded k-fold over images stratified by expression; same warning.

Every k-fold depends only on the set of records and the seed, never on the order of
the manifest's rows, and no fold is empty.

Pure Python and numpy (scikit-learn only for `grouped` folds, imported when used):
no TensorFlow, so data tools and tests can use it cheaply.
"""

from collections.abc import Hashable, Sequence
import dataclasses
import warnings

import numpy as np

from dicefer_jax.contract import Record
from dicefer_jax.errors import DataError

OFFICIAL_SPLITS = ("train", "test")
# The split value that pins a subject to training when the other records have none.
PINNED = "train"

# The kinds of split, as they appear in SplitInfo.kind and in reports.
OFFICIAL = "official"
SUBJECT = "subject"
GROUPED = "grouped"
STRATIFIED = "stratified"
SUBJECT_PINNED = "subject_pinned"
SPLIT_KINDS = (OFFICIAL, SUBJECT, GROUPED, STRATIFIED, SUBJECT_PINNED)
# fold_assignments' fold of a pinned record: in no test fold.
PINNED_FOLD = -1

# How many shared subjects a warning names before it only counts the rest.
_NAMED_SUBJECTS = 5


class SplitWarning(UserWarning):
  """A valid split whose test part may share people with its training part."""


@dataclasses.dataclass(frozen=True)
class SplitInfo:
  """How a split was made; small enough to log or write into a JSON report.

  Attributes:
    kind: one of SPLIT_KINDS: 'official', 'subject', 'grouped', 'stratified' or
      'subject_pinned'.
    fold: the held-out fold (None for the official split).
    num_folds: the number of folds (None for the official split).
    seed: the seed of the fold assignment (None for the official split).
    num_train: images in the training part.
    num_test: images in the test part.
    train_subjects: sorted subject ids of the training part (known ones only).
    test_subjects: sorted subject ids of the test part (known ones only).
    note: one line on why this kind was chosen and what it may leak.
    shared_subjects: sorted subject ids in both parts. Always empty for the k-fold
      kinds; for an official split, the dataset's own overlap.
    num_seen: images of training subjects held out of training to measure
      accuracy on seen people (`hold_out_seen`); 0 when none are. num_train
      counts the images that train.
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
  shared_subjects: tuple[str, ...] = ()
  num_seen: int = 0

  def as_dict(self) -> dict:
    d = dataclasses.asdict(self)
    for field in ("train_subjects", "test_subjects", "shared_subjects"):
      d[field] = list(getattr(self, field))
    return d


def split_kind(records: Sequence[Record]) -> str:
  """The kind of split `split_records` makes for these records (see SPLIT_KINDS).

  Raises:
    DataError: a split column that is neither official, nor pinning, nor empty,
      or pinning that is not by whole, known subjects (see `pinned_subjects`).
  """
  if records and all(r.split in OFFICIAL_SPLITS for r in records):
    return OFFICIAL
  if pinned_subjects(records):
    return SUBJECT_PINNED
  return _fold_kind(records)


def _describe_values(records: Sequence[Record]) -> str:
  """Counts of the split column's values, e.g. "3 'test', 5 empty"."""
  counts = {}
  for r in records:
    counts[r.split] = counts.get(r.split, 0) + 1
  return ", ".join(f"{n} {repr(v) if v else 'empty'}" for v, n in sorted(counts.items()))


def pinned_subjects(records: Sequence[Record]) -> tuple[str, ...]:
  """Sorted ids of the subjects pinned to training by `split=train`; () if none.

  Only for a split column that is not official (not every record train/test).

  Raises:
    DataError: split values other than train and empty (in a column that is
      not official); pinning while some image lacks a subject id; a subject
      pinned in some of its images only.
  """
  values = {r.split for r in records}
  if not values - {""}:
    return ()
  if values - {PINNED, ""}:
    raise DataError(
        f"the manifest's split column holds {_describe_values(records)} values: "
        "write train/test on every image for an official split, train on some "
        "subjects and nothing on the others to always train on those and fold "
        "over the rest, or clear it for folds over all subjects")
  missing = sum(1 for r in records if not r.subject)
  if missing:
    raise DataError(
        f"the manifest pins subjects to training (split=train) but {missing} "
        f"image(s) lack a subject id: give every image a subject, or clear the "
        "split column")
  pinned = {r.subject for r in records if r.split == PINNED}
  mixed = sorted({r.subject for r in records if r.split != PINNED} & pinned)
  if mixed:
    raise DataError(
        f"{len(mixed)} subject(s) ({_some_names(mixed)}) have images with "
        "split=train and images without: pin a subject in all of its images or "
        "in none")
  return tuple(sorted(pinned))


def _fold_kind(records: Sequence[Record]) -> str:
  """The kind of k-fold for these records, whatever their split column says."""
  num_known = sum(1 for r in records if r.subject)
  if records and num_known == len(records):
    return SUBJECT
  return GROUPED if num_known else STRATIFIED


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


def stratified_folds(labels: Sequence[int], num_folds: int, seed: int,
                     keys: Sequence | None = None) -> np.ndarray:
  """Seeded fold index per image, stratified by label.

  Within each class the images are shuffled and dealt round-robin over the folds.
  The dealing starts where the previous class stopped, so classes whose size is
  not a multiple of num_folds do not all pile their remainder onto fold 0, and fold
  sizes differ by at most one.

  Args:
    labels: the class of each image.
    num_folds: the number of folds.
    seed: seed of the shuffle.
    keys: optional sortable key per image (e.g. its manifest row). The images are
      visited in key order, so the folds depend only on the set of keys and the
      seed; without keys they depend on the order of `labels` too. Input already
      in key order gives the same folds either way.

  Raises:
    DataError: fewer images than folds.
  """
  labels = np.asarray(labels)
  if len(labels) < num_folds:
    raise DataError(
        f"{len(labels)} image(s) cannot fill {num_folds} folds: lower num_folds "
        "or add images")
  order = np.arange(len(labels))
  if keys is not None:
    order = np.array(sorted(order, key=lambda i: keys[i]), dtype=np.int64)
  rng = np.random.default_rng(seed)
  folds = np.empty(len(labels), dtype=np.int64)
  start = 0
  for label in np.unique(labels):
    members = rng.permutation(order[labels[order] == label])
    folds[members] = (start + np.arange(len(members))) % num_folds
    start = (start + len(members)) % num_folds
  return folds


def grouped_folds(labels: Sequence[int], groups: Sequence[Hashable], num_folds: int,
                  seed: int) -> np.ndarray:
  """Seeded fold index per image; each group in one fold, stratified by label.

  Uses scikit-learn's StratifiedGroupKFold, which places the groups greedily (most
  lopsided class mix first) where they keep every fold's class mix closest to the
  whole set's. Class balance is thus as good as the groups allow; fold sizes may
  differ by more than one group. Time grows with groups x folds: about 15 s for
  30,000 single-image groups over 10 folds.

  Args:
    labels: the class of each image.
    groups: sortable group key of each image; images with equal keys always share
      a fold.
    num_folds: the number of folds.
    seed: seed of the shuffle that orders groups with the same class mix.

  Returns:
    Fold index (0..num_folds-1) per image. It depends only on the (group, label)
    pairs and the seed, not on their order, and no fold is empty.

  Raises:
    DataError: fewer groups than folds.
  """
  labels = np.asarray(labels)
  unique = sorted(set(groups))
  if len(unique) < num_folds:
    raise DataError(
        f"{len(unique)} group(s) cannot fill {num_folds} folds: lower num_folds to "
        f"at most {max(len(unique), 1)} or add groups")
  # The splitter visits equally lopsided groups in the order of their ids.
  # Numbering the sorted groups by a seeded permutation is the shuffle: it
  # keeps the folds independent of input order and avoids shuffle=True, which
  # paired groups with the wrong class counts in older scikit-learn (fixed by its
  # PR #32540).
  number = dict(zip(unique, np.random.default_rng(seed).permutation(len(unique))))
  group_ids = np.array([number[g] for g in groups], dtype=np.int64)
  # The splitter refuses when every class has fewer images than folds. Such a set
  # cannot be stratified anyway, so it is then balanced by size alone (one class).
  _, class_sizes = np.unique(labels, return_counts=True)
  targets = labels if class_sizes.max() >= num_folds else np.zeros_like(labels)
  # Imported here: scikit-learn takes about a second to import, and only this
  # kind of split needs it.
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  splitter = model_selection.StratifiedGroupKFold(n_splits=num_folds, shuffle=False)
  folds = np.full(len(labels), -1, dtype=np.int64)
  with warnings.catch_warnings():
    # It warns when some class has fewer images than folds: that class simply
    # cannot be in every test fold, which is no news for small face sets.
    warnings.filterwarnings("ignore", message="The least populated class",
                            category=UserWarning)
    for k, (_, test) in enumerate(
        splitter.split(np.zeros((len(labels), 1)), targets, group_ids)):
      folds[test] = k
  return _fill_empty_folds(folds, group_ids, num_folds)


def _fill_empty_folds(folds: np.ndarray, groups: np.ndarray,
                      num_folds: int) -> np.ndarray:
  """A copy of `folds` in which no fold is empty, moving whole groups if needed.

  StratifiedGroupKFold puts a group into an empty fold whenever one is left (its
  score cannot get worse there), up to float ties between scores. This turns
  "no empty fold" into a guarantee: while a fold is empty, the smallest group
  (fewest images, then lowest id) of the fold holding the most groups moves there.
  Needs at least num_folds groups.
  """
  folds = np.array(folds, dtype=np.int64)
  groups = np.asarray(groups)
  while True:
    empty = np.flatnonzero(np.bincount(folds, minlength=num_folds) == 0)
    if not len(empty):
      return folds
    fold_of_group = dict(zip(groups.tolist(), folds.tolist()))
    groups_per_fold = np.bincount(list(fold_of_group.values()), minlength=num_folds)
    donor = int(np.argmax(groups_per_fold))
    if groups_per_fold[donor] < 2:
      raise DataError(f"{len(fold_of_group)} group(s) cannot fill {num_folds} folds: "
                      "lower num_folds")
    smallest = min((int(np.sum(groups == g)), g)
                   for g, k in fold_of_group.items() if k == donor)[1]
    folds[groups == smallest] = empty[0]


def _group_key(record: Record) -> tuple[str, str]:
  """The record's group: its subject, or else its own image.

  Images are keyed by path, so that copies of one image listed twice stay together.
  """
  return ("subject", record.subject) if record.subject else ("image", record.path)


def _row_key(record: Record) -> tuple[str, ...]:
  return (record.path, record.expression, record.subject, record.source, record.split)


def _pinned_folds(records: Sequence[Record], pinned: Sequence[str], num_folds: int,
                  seed: int) -> np.ndarray:
  """Folds of a `subject_pinned` split: PINNED_FOLD for pinned records, else the
  subject_folds of the unpinned subjects."""
  pinned = set(pinned)
  free = sorted({r.subject for r in records} - pinned)
  if len(free) < num_folds:
    raise DataError(
        f"{len(free)} subject(s) without split=train cannot fill {num_folds} "
        f"subject-held-out folds ({len(pinned)} more are pinned to training): lower "
        f"num_folds to at most {max(len(free), 1)}, or pin fewer subjects")
  folds = subject_folds(free, num_folds, seed)
  return np.array([PINNED_FOLD if r.subject in pinned else folds[r.subject]
                   for r in records], dtype=np.int64)


def fold_assignments(records: Sequence[Record], *, num_folds: int = 5,
                     seed: int = 0) -> np.ndarray:
  """Fold index (0..num_folds-1) of every record, by subject, grouped or stratified.

  Ignores any official split column: this is the k-fold view used when there is
  no official split (and by tests that check the folds partition the data). A
  pinning split column (`subject_pinned`) is honoured: pinned records get
  PINNED_FOLD (-1, in no test fold) and the other subjects are folded.

  Raises:
    DataError: empty records, bad num_folds, fewer subjects, groups or images
      than folds, or a split column that is neither official, pinning nor empty.
  """
  _check_fold_args(num_folds, 0)
  records = list(records)
  if not records:
    raise DataError("cannot split an empty face set: the manifest lists no images")
  if split_kind(records) == SUBJECT_PINNED:
    return _pinned_folds(records, pinned_subjects(records), num_folds, seed)
  kind = _fold_kind(records)
  if kind == SUBJECT:
    folds = subject_folds([r.subject for r in records], num_folds, seed)
    return np.array([folds[r.subject] for r in records], dtype=np.int64)
  labels = [r.label for r in records]
  if kind == STRATIFIED:
    return stratified_folds(labels, num_folds, seed, keys=[_row_key(r) for r in records])
  groups = [_group_key(r) for r in records]
  num_subjects = len(_known_subjects(records))
  num_groups = len(set(groups))
  if num_groups < num_folds:
    raise DataError(
        f"{num_groups} group(s) ({num_subjects} subject(s) + "
        f"{num_groups - num_subjects} image(s) without a subject) cannot fill "
        f"{num_folds} folds: lower num_folds to at most {num_groups} or add subjects")
  return grouped_folds(labels, groups, num_folds, seed)


def _known_subjects(records: Sequence[Record]) -> tuple[str, ...]:
  return tuple(sorted({r.subject for r in records if r.subject}))


def _shared_subjects(train: Sequence[Record], test: Sequence[Record]) -> tuple[str, ...]:
  return tuple(sorted(set(_known_subjects(train)) & set(_known_subjects(test))))


def _some_names(names: Sequence[str]) -> str:
  """'a, b, c' or, for many names, 'a, b, c, d, e and 7 more'."""
  shown = ", ".join(names[:_NAMED_SUBJECTS])
  rest = len(names) - _NAMED_SUBJECTS
  return f"{shown} and {rest} more" if rest > 0 else shown


def split_records(records: Sequence[Record], *, num_folds: int = 5, fold: int = 0,
                  seed: int = 0) -> tuple[list[Record], list[Record], SplitInfo]:
  """Splits records into (train, test, info); see the module docstring for the kinds.

  Warns (SplitWarning, also said in info.note) when the split may let people into
  both parts: images without a subject id, or an official split that shares
  subjects (named in info.shared_subjects).

  Args:
    records: the records of one face set (e.g. from `contract.read_manifest`).
    num_folds: number of folds of the k-fold (ignored for an official split).
    fold: which fold is the test part (ignored for an official split).
    seed: seed of the fold assignment; the same seed gives the same folds.

  Returns:
    (train, test, info): train and test keep the input order of the records.

  Raises:
    DataError: empty records, fold out of range, fewer subjects (or groups, or
      images) than folds, an official split with an empty train or test part, or
      a split column that is neither official, pinning nor empty.
  """
  _check_fold_args(num_folds, fold)
  records = list(records)
  if not records:
    raise DataError("cannot split an empty face set: the manifest lists no images")
  kind = split_kind(records)
  if kind == OFFICIAL:
    train = [r for r in records if r.split == "train"]
    test = [r for r in records if r.split == "test"]
    if not train or not test:
      empty = "train" if not train else "test"
      raise DataError(
          f"the manifest's official split has no {empty!r} images: fix the split "
          "column or clear it to use subject-held-out folds")
    shared = _shared_subjects(train, test)
    note = "every record has an official train/test split; folds are ignored"
    if shared:
      leak = (f"the official split has {len(shared)} subject(s) in both train and "
              f"test ({_some_names(shared)}): its test scores are not "
              "subject-independent")
      warnings.warn(leak, SplitWarning, stacklevel=2)
      note = f"{note}; {leak}"
    return train, test, SplitInfo(
        kind=OFFICIAL, fold=None, num_folds=None, seed=None,
        num_train=len(train), num_test=len(test),
        train_subjects=_known_subjects(train), test_subjects=_known_subjects(test),
        note=note, shared_subjects=shared)

  folds = fold_assignments(records, num_folds=num_folds, seed=seed)
  train = [r for r, k in zip(records, folds) if k != fold]
  test = [r for r, k in zip(records, folds) if k == fold]
  num_subjects = len(_known_subjects(records))
  if kind == SUBJECT:
    note = (f"whole subjects held out: {len(_known_subjects(test))} of "
            f"{num_subjects} subjects in the test fold")
  elif kind == SUBJECT_PINNED:
    num_pinned = len(pinned_subjects(records))
    note = (f"{num_pinned} subjects always in training (split=train); folds over "
            f"the other {num_subjects - num_pinned}: {len(_known_subjects(test))} "
            "of them in the test fold")
  else:
    missing = sum(1 for r in records if not r.subject)
    if kind == GROUPED:
      note = (f"{missing} of {len(records)} images lack a subject id: each is its "
              f"own group, so the {num_subjects} known subjects stay whole, but "
              "the people in those images may also appear on the other side")
    else:
      note = (f"{missing} of {len(records)} images lack a subject id: the folds are "
              "over images stratified by expression, so test people may also "
              "appear in training")
    warnings.warn(note, SplitWarning, stacklevel=2)
  return train, test, SplitInfo(
      kind=kind, fold=int(fold), num_folds=int(num_folds), seed=int(seed),
      num_train=len(train), num_test=len(test),
      train_subjects=_known_subjects(train), test_subjects=_known_subjects(test),
      note=note, shared_subjects=_shared_subjects(train, test))


def hold_out_seen(train: Sequence[Record], fraction: float, seed: int,
                  info: SplitInfo) -> tuple[list[Record], list[Record], SplitInfo]:
  """Splits the training part into (fit, seen, info): a seeded `fraction` of each
  known training subject's images is held out of training.

  Accuracy on those held-out images of SEEN people, against accuracy on the test
  fold's unseen people, shows how much a model leans on who someone is (on the
  confounded synthetic set, a shortcut through appearance). Every subject keeps at
  least one training image, so each held-out image's person is one the model saw;
  images without a subject always train. Both lists keep the input order, and the
  choice depends only on the records and the seed.

  Raises:
    DataError: fraction outside [0, 1).
  """
  if not 0.0 <= fraction < 1.0:
    raise DataError(f"seen_holdout={fraction} must be in [0, 1): the share of each "
                    "training subject's images held out to measure seen-people accuracy")
  train = list(train)
  held = np.zeros(len(train), dtype=bool)
  if fraction > 0:
    rng = np.random.default_rng(seed)
    by_subject = {}
    for i, r in enumerate(train):
      if r.subject:
        by_subject.setdefault(r.subject, []).append(i)
    for subject in sorted(by_subject):
      # Sorted by path, so the choice does not depend on the manifest's order.
      rows = sorted(by_subject[subject], key=lambda i: train[i].path)
      k = min(len(rows) - 1, max(1, int(round(fraction * len(rows)))))
      if k > 0:
        held[rng.choice(rows, size=k, replace=False)] = True
  fit = [r for r, h in zip(train, held) if not h]
  seen = [r for r, h in zip(train, held) if h]
  return fit, seen, dataclasses.replace(info, num_train=len(fit), num_seen=len(seen))
