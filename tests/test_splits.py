"""Tests of official, pinned, subject-held-out, grouped and stratified splits.

Each test's docstring names the bug it catches. "Leak" means a person (subject id)
whose images sit in both the training and the test part of one split.
"""

import collections
import dataclasses
import json
import warnings

import numpy as np
import pytest

from dicefer_jax import contract
from dicefer_jax import splits
from dicefer_jax.contract import EXPRESSIONS, Record
from dicefer_jax.errors import DataError

# The kinds' names are part of the reports; callers compare against them.
KINDS = ("official", "subject", "grouped", "stratified", "subject_pinned")


def make_records(num_subjects=12, per_class=2, subject=True, split=None):
  """Records of num_subjects x 7 classes x per_class images, in a fixed order."""
  records = []
  for s in range(num_subjects):
    for expression in EXPRESSIONS:
      for k in range(per_class):
        records.append(Record(
            path=f"{expression}/s{s}_{k}.png", expression=expression,
            subject=f"s{s}" if subject else "",
            split=split(s) if split else ""))
  return records


def without_subject(records, indices):
  """A copy of records where the records at `indices` lost their subject id."""
  records = list(records)
  for i in indices:
    records[i] = dataclasses.replace(records[i], subject="")
  return records


def records_of_kind(kind):
  """A small face set for which `split_records` makes a `kind` k-fold."""
  pin = (lambda s: "train" if s in (2, 5, 8) else "") if kind == "subject_pinned" else None
  records = make_records(num_subjects=10, per_class=1,
                         subject=kind != "stratified", split=pin)
  if kind == "grouped":
    # Unknown images from several subjects, two of them from the same one.
    records = without_subject(records, [0, 9, 30, 31, 50])
  assert splits.split_kind(records) == kind
  return records


def known_subjects(records):
  return {r.subject for r in records if r.subject}


def split_quietly(records, **kwargs):
  """split_records with its (expected) leak warnings silenced."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    return splits.split_records(records, **kwargs)


def check_k_fold(records, num_folds, seed):
  """Asserts the k-fold invariants for every fold; returns the test parts."""
  kind = splits.split_kind(records)
  folds = splits.fold_assignments(records, num_folds=num_folds, seed=seed)
  assert folds.shape == (len(records),)
  assert sorted(set(folds.tolist())) == list(range(num_folds)), "an empty fold"
  tested = collections.Counter()
  tests = []
  for fold in range(num_folds):
    train, test, info = split_quietly(records, num_folds=num_folds, fold=fold,
                                      seed=seed)
    assert info.kind == kind
    assert test and train
    assert [id(r) for r in test] == [id(r) for r, k in zip(records, folds) if k == fold]
    assert len(train) + len(test) == len(records)
    assert not known_subjects(train) & known_subjects(test), "a known subject leaks"
    assert info.shared_subjects == ()
    assert set(info.train_subjects) == known_subjects(train)
    assert set(info.test_subjects) == known_subjects(test)
    assert (info.num_train, info.num_test) == (len(train), len(test))
    tested.update(id(r) for r in test)
    tests.append(test)
  assert tested == collections.Counter(id(r) for r in records), "not a partition"
  return tests


def test_subject_folds_hold_out_whole_subjects_and_cover_everything():
  """Catches: subject folds that leak people, overlap, or miss records."""
  records = make_records(num_subjects=12)
  tests = check_k_fold(records, num_folds=5, seed=3)
  _, _, info = splits.split_records(records, num_folds=5, fold=4, seed=3)
  assert (info.kind, info.fold, info.num_folds, info.seed) == ("subject", 4, 5, 3)
  assert "whole subjects" in info.note
  # 12 subjects over 5 folds: sizes 3,3,2,2,2 in some order.
  assert sorted(len(known_subjects(t)) for t in tests) == [2, 2, 2, 3, 3]


def test_one_missing_subject_keeps_known_subjects_whole():
  """Catches bug 1: one record without a subject id made the folds image-level,
  so every KNOWN subject leaked between train and test."""
  records = without_subject(make_records(num_subjects=12), [0, 20, 100])
  tests = check_k_fold(records, num_folds=5, seed=0)
  assert splits.split_kind(records) == "grouped"
  unknown = collections.Counter(
      r.path for t in tests for r in t if not r.subject)
  assert unknown == {records[i].path: 1 for i in (0, 20, 100)}
  for test in tests:
    # >= 2 whole subjects per fold, and each has every expression.
    assert {r.expression for r in test} == set(EXPRESSIONS)


def test_grouped_split_warns_with_the_count_of_images_without_subject():
  """Catches bug 1's silence: a split that may leak identity must say so, with the
  number of images lacking a subject id, in a warning and in SplitInfo.note."""
  records = without_subject(make_records(num_subjects=12), [0, 20, 100])
  with pytest.warns(UserWarning, match=r"3 of 168 images lack a subject id") as caught:
    _, _, info = splits.split_records(records, num_folds=5, fold=1)
  assert all(issubclass(w.category, splits.SplitWarning) for w in caught)
  assert info.kind == "grouped"
  assert "3 of 168 images lack a subject id" in info.note
  assert "\n" not in info.note


def test_grouped_folds_are_stratified_by_expression():
  """Catches grouped folds that ignore expressions: subjects who only show one
  expression must be spread so that every test fold sees both expressions."""
  records = []
  for s in range(10):
    expression = "happiness" if s < 5 else "anger"
    records += [Record(f"{expression}/s{s}_{k}.png", expression, f"s{s}")
                for k in range(4)]
  records += [Record(f"{e}/u{k}.png", e) for k in range(5) for e in ("happiness", "anger")]
  for seed in range(5):
    for test in check_k_fold(records, num_folds=5, seed=seed):
      by_expression = collections.defaultdict(set)
      for r in test:
        if r.subject:
          by_expression[r.expression].add(r.subject)
      # A random deal of the 10 subjects would often put two happy ones together.
      assert {e: len(s) for e, s in by_expression.items()} == {"happiness": 1, "anger": 1}
      assert collections.Counter(r.expression for r in test) == {"happiness": 5, "anger": 5}
  assert splits.split_kind(records) == "grouped"


def test_copies_of_an_image_without_subject_share_a_fold():
  """Catches image groups keyed by position instead of path: the same image listed
  twice must not end up on both sides."""
  records = make_records(num_subjects=6, per_class=1)
  copy = Record("happiness/unknown.png", "happiness")
  records = [copy] + records + [copy]
  for fold in range(3):
    _, test, _ = split_quietly(records, num_folds=3, fold=fold, seed=2)
    assert sum(r == copy for r in test) in (0, 2), "the copies were split apart"


def test_no_subjects_gives_balanced_stratified_folds_and_warns():
  """Catches bug 1's silence for a set without any subject id, and stratified folds
  whose classes or sizes are unbalanced."""
  # 7 classes of 3 images over 5 folds: 21 images, so fold sizes 4 or 5.
  records = make_records(num_subjects=3, per_class=1, subject=False)
  assert splits.split_kind(records) == "stratified"
  tests = check_k_fold(records, num_folds=5, seed=0)
  assert sorted(len(t) for t in tests) == [4, 4, 4, 4, 5]
  for expression in EXPRESSIONS:
    counts = [sum(r.expression == expression for r in t) for t in tests]
    assert max(counts) - min(counts) <= 1
  with pytest.warns(UserWarning, match="21 of 21 images lack a subject id"):
    _, _, info = splits.split_records(records, num_folds=5, fold=0)
  assert info.kind == "stratified"
  assert "21 of 21 images lack a subject id" in info.note


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", ["subject", "grouped", "stratified", "subject_pinned"])
def test_splits_are_deterministic_and_depend_on_the_seed(kind):
  """Catches unseeded folds (runs not reproducible) and a seed that is ignored."""
  records = records_of_kind(kind)
  a = splits.split_records(records, fold=1, seed=7)
  b = splits.split_records(records, fold=1, seed=7)
  assert a == b
  others = [{r.path for r in splits.split_records(records, fold=1, seed=s)[1]}
            for s in range(8, 12)]
  assert any(t != {r.path for r in a[1]} for t in others)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", ["subject", "grouped", "stratified", "subject_pinned"])
def test_folds_do_not_depend_on_manifest_order(kind):
  """Catches folds that change when the manifest's rows are reordered (stratified
  folds did): the same face set and seed must give the same folds."""
  records = records_of_kind(kind)
  shuffled = [records[i] for i in np.random.default_rng(0).permutation(len(records))]
  for fold in range(5):
    _, test_a, info_a = splits.split_records(records, fold=fold, seed=1)
    for other in (records[::-1], shuffled):
      _, test_b, info_b = splits.split_records(other, fold=fold, seed=1)
      assert sorted(r.path for r in test_a) == sorted(r.path for r in test_b)
      assert info_a == info_b
  # Order of the input is kept within each part.
  _, test_b, _ = splits.split_records(records[::-1], fold=2, seed=1)
  _, test_a, _ = splits.split_records(records, fold=2, seed=1)
  assert [r.path for r in test_b] == [r.path for r in test_a][::-1]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_random_face_sets_always_give_valid_folds():
  """Catches empty folds, lost or doubled records and leaking known subjects on
  uneven sets: big and tiny subjects, rare classes, few or many unknown images."""
  rng = np.random.default_rng(0)
  kinds = collections.Counter()
  for trial in range(42):
    # Trials cycle through the k-fold kinds: subject, grouped, stratified.
    min_subjects, max_subjects, min_unknown, max_unknown = [
        (2, 8, 0, 0), (1, 8, 1, 8), (0, 0, 2, 12)][trial % 3]
    # Odd trials use 3 of the 7 classes: some classes are then missing entirely.
    num_classes = 3 if trial % 2 else 7
    records = []
    for s in range(int(rng.integers(min_subjects, max_subjects + 1))):
      for k in range(int(rng.integers(1, 12))):
        expression = EXPRESSIONS[int(rng.integers(0, num_classes))]
        records.append(Record(f"{expression}/s{s}_{k}.png", expression, f"s{s}"))
    for k in range(int(rng.integers(min_unknown, max_unknown + 1))):
      expression = EXPRESSIONS[int(rng.integers(0, num_classes))]
      records.append(Record(f"{expression}/u{k}.png", expression))
    records = [records[i] for i in rng.permutation(len(records))]
    groups = len(known_subjects(records)) + sum(not r.subject for r in records)
    num_folds = int(rng.integers(2, min(groups, 6) + 1))
    kinds[splits.split_kind(records)] += 1
    check_k_fold(records, num_folds=num_folds, seed=trial)
  assert kinds == {"subject": 14, "grouped": 14, "stratified": 14}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_every_fold_gets_a_group_when_the_greedy_leaves_one_empty(monkeypatch):
  """Catches an empty test fold: on this set StratifiedGroupKFold alone leaves one
  of 9 folds empty (float ties in its score), so the repair has to step in."""
  sizes = [23, 16, 11, 5, 7, 23, 16, 12]
  records = [Record(f"neutral/s{s}_{k}.png", "neutral", f"s{s}")
             for s, size in enumerate(sizes) for k in range(size)]
  records.append(Record("happiness/u0.png", "happiness"))
  check_k_fold(records, num_folds=9, seed=2156)
  # Without the repair the same call leaves a fold empty: the test is not vacuous.
  monkeypatch.setattr(splits, "_fill_empty_folds", lambda folds, *_: folds)
  folds = splits.fold_assignments(records, num_folds=9, seed=2156)
  assert len(set(folds.tolist())) == 8


def test_empty_folds_are_filled_from_the_fold_with_most_groups():
  """Catches a fold left empty by the greedy grouped assignment (float ties): the
  repair moves the smallest group of the fold holding the most groups."""
  folds = np.array([0, 0, 0, 1])
  groups = np.array([5, 6, 6, 7])
  repaired = splits._fill_empty_folds(folds, groups, num_folds=3)
  assert repaired.tolist() == [2, 0, 0, 1]
  assert folds.tolist() == [0, 0, 0, 1]  # The input is left alone.


def test_official_split_ignores_folds():
  """Catches an official split that is refolded or loses its subjects in the info."""
  records = make_records(num_subjects=4, split=lambda s: "test" if s == 3 else "train")
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # No shared subjects: nothing to warn about.
    train, test, info = splits.split_records(records, num_folds=3, fold=2, seed=9)
  assert info.kind == "official"
  assert info.fold is None and info.num_folds is None and info.seed is None
  assert "ignored" in info.note
  assert {r.subject for r in test} == {"s3"}
  assert all(r.split == "train" for r in train)
  assert len(train) + len(test) == len(records)
  assert info.test_subjects == ("s3",)
  assert info.shared_subjects == ()
  assert info.as_dict()["test_subjects"] == ["s3"]


def test_official_split_with_shared_subjects_names_them():
  """Catches bug 2: subjects on both sides of a manifest's official split went
  unnoticed; they must be warned about (by name) and recorded in SplitInfo."""
  records = make_records(num_subjects=6, per_class=1,
                         split=lambda s: "test" if s >= 4 else "train")
  records = [dataclasses.replace(r, split="test")
             if r.subject in ("s0", "s1") and r.expression == "fear" else r
             for r in records]
  with pytest.warns(UserWarning, match=r"2 subject\(s\) in both train and test \(s0, s1\)"):
    _, _, info = splits.split_records(records)
  assert info.kind == "official"
  assert info.shared_subjects == ("s0", "s1")
  assert "2 subject(s) in both train and test" in info.note
  assert json.loads(json.dumps(info.as_dict()))["shared_subjects"] == ["s0", "s1"]


def test_official_split_with_many_shared_subjects_names_a_few_and_counts():
  """Catches bug 2's warning listing hundreds of names (or none): first few + count."""
  records = make_records(num_subjects=10, per_class=1, split=lambda s: "train")
  records = [dataclasses.replace(r, split="test") if r.expression == "neutral" else r
             for r in records]
  with pytest.warns(splits.SplitWarning) as caught:
    _, _, info = splits.split_records(records)
  message = str(caught[0].message)
  assert "10 subject(s) in both train and test (s0, s1, s2, s3, s4 and 5 more)" in message
  assert info.shared_subjects == tuple(f"s{s}" for s in range(10))


def test_partial_train_column_pins_subjects_instead_of_being_official():
  """Catches a half-filled split column (train on some images, empty on the
  rest) being used as if it were official, or ignored: its train subjects must
  be pinned to training and the rest folded."""
  records = make_records(num_subjects=6, split=lambda s: "train" if s else "")
  assert splits.split_kind(records) == "subject_pinned"
  with pytest.raises(DataError, match="1 subject"):
    splits.split_records(records, num_folds=3, fold=0)  # one unpinned subject
  records = make_records(num_subjects=6, split=lambda s: "train" if s > 2 else "")
  train, test, info = splits.split_records(records, num_folds=3, fold=0)
  assert info.kind == "subject_pinned" and info.num_folds == 3
  assert not known_subjects(train) & known_subjects(test)
  assert {"s3", "s4", "s5"} <= known_subjects(train)


def pinned_records(num_pinned=6, num_free=12):
  """Subjects p0.. pinned to training (split=train) and s0.. with no split, in an
  interleaved order (pinning must not depend on where rows are)."""
  pinned = make_records(num_subjects=num_pinned, split=lambda s: "train")
  pinned = [dataclasses.replace(r, subject="p" + r.subject[1:],
                                path=r.path.replace("/s", "/p")) for r in pinned]
  free = make_records(num_subjects=num_free)
  records = [r for pair in zip(pinned, free) for r in pair]
  return records + pinned[len(free):] + free[len(pinned):]


@pytest.mark.parametrize("num_folds, seed", [(5, 0), (3, 7), (12, 1)])
def test_pinned_subjects_always_train_and_folds_partition_the_others(num_folds, seed):
  """Catches pinned subjects landing in a test fold, folds over the unpinned
  subjects that overlap or miss one, a subject on both sides, fold_assignments
  disagreeing with split_records, and a note that does not say what was pinned."""
  records = pinned_records()
  pinned = {f"p{i}" for i in range(6)}
  free = {f"s{i}" for i in range(12)}
  assert splits.split_kind(records) == "subject_pinned"
  assert splits.pinned_subjects(records) == tuple(sorted(pinned))
  folds = splits.fold_assignments(records, num_folds=num_folds, seed=seed)
  assert sorted(set(folds.tolist())) == [-1] + list(range(num_folds))
  assert {r.subject for r, k in zip(records, folds) if k == -1} == pinned
  tested = collections.Counter()
  for fold in range(num_folds):
    with warnings.catch_warnings():
      warnings.simplefilter("error")  # nothing leaks: nothing to warn about
      train, test, info = splits.split_records(records, num_folds=num_folds,
                                               fold=fold, seed=seed)
    assert info.kind == "subject_pinned"
    assert (info.fold, info.num_folds, info.seed) == (fold, num_folds, seed)
    assert test and pinned <= known_subjects(train)
    assert known_subjects(test) <= free
    assert not known_subjects(train) & known_subjects(test)
    assert info.shared_subjects == ()
    assert [id(r) for r in test] == [id(r) for r, k in zip(records, folds) if k == fold]
    assert len(train) + len(test) == len(records)
    assert info.note.startswith("6 subjects always in training (split=train); folds "
                                "over the other 12")
    tested.update(known_subjects(test))
  assert tested == collections.Counter(free), "the folds do not partition the rest"


def test_pinned_folds_are_the_subject_folds_of_the_unpinned_subjects():
  """Catches pinned subjects shifting the folds of the others: the test folds of
  a pinned set must be those of the unpinned subjects alone (so pinning a cohort
  changes what trains, never which clean subjects are tested together)."""
  records = pinned_records()
  alone = [r for r in records if r.split != "train"]
  for fold in range(4):
    _, test, _ = splits.split_records(records, num_folds=4, fold=fold, seed=3)
    _, test_alone, info = splits.split_records(alone, num_folds=4, fold=fold, seed=3)
    assert info.kind == "subject"
    assert [r.path for r in test] == [r.path for r in test_alone]


def _with_split(records, split_of):
  return [dataclasses.replace(r, split=split_of(i, r)) for i, r in enumerate(records)]


@pytest.mark.parametrize("case, message", [
    ("test_and_empty", r"holds \d+ empty, \d+ 'test' values: write train/test on every"),
    ("train_test_and_empty", r"holds \d+ empty, \d+ 'test', \d+ 'train' values"),
    ("unknown_value", r"holds \d+ empty, \d+ 'val' values"),
    ("pinned_without_subject", r"lack a subject id: give every image a subject"),
    ("unpinned_without_subject", r"lack a subject id: give every image a subject"),
    ("half_pinned_subject", r"1 subject\(s\) \(s3\) have images with split=train and "
                            r"images without: pin a subject in all of its images"),
])
def test_bad_split_columns_are_one_line_errors(case, message):
  """Catches mixes that are neither official, pinning nor empty being silently
  folded over (a `test` column half filled in, a typo'd value), pinning without
  subject ids (nothing to pin, or an image of a pinned person tested), and a
  subject pinned in some images only (that person would be on both sides):
  each must be one DataError line from every entry point, protocol's included."""
  records = make_records(num_subjects=8)
  if case == "test_and_empty":
    records = _with_split(records, lambda i, r: "test" if r.subject == "s0" else "")
  elif case == "train_test_and_empty":
    records = _with_split(records, lambda i, r: {"s0": "train", "s1": "test"}.get(
        r.subject, ""))
  elif case == "unknown_value":
    records = _with_split(records, lambda i, r: "val" if r.subject == "s0" else "")
  elif case == "pinned_without_subject":
    records = without_subject(
        _with_split(records, lambda i, r: "train" if r.subject == "s0" else ""), [0])
  elif case == "unpinned_without_subject":
    records = without_subject(
        _with_split(records, lambda i, r: "train" if r.subject == "s0" else ""), [50])
  else:
    records = _with_split(
        records, lambda i, r: "train" if r.subject == "s3" and r.expression != "fear"
        else "")
  calls = (splits.split_kind, splits.fold_assignments, splits.split_records)
  for call in calls:
    with pytest.raises(DataError, match=message) as error:
      call(records)
    assert "\n" not in str(error.value)


def test_too_few_unpinned_subjects_for_the_folds():
  """Catches folds over the unpinned subjects that come out empty (or count the
  pinned ones) when too few subjects are left to fold over."""
  records = pinned_records(num_pinned=6, num_free=3)
  for split in (splits.split_records, splits.fold_assignments):
    with pytest.raises(DataError, match=(
        r"^3 subject\(s\) without split=train cannot fill 5 subject-held-out folds "
        r"\(6 more are pinned to training\): lower num_folds to at most 3")) as error:
      split(records, num_folds=5)
    assert "\n" not in str(error.value)


def test_split_kinds_are_the_documented_names():
  """Catches a renamed kind, which would silently break callers that compare it."""
  cases = [make_records(num_subjects=2, split=lambda s: "test" if s else "train")]
  cases += [records_of_kind(kind) for kind in KINDS[1:]]
  assert [splits.split_kind(r) for r in cases] == list(KINDS)
  assert splits.SPLIT_KINDS == KINDS
  assert (splits.OFFICIAL, splits.SUBJECT, splits.GROUPED, splits.STRATIFIED,
          splits.SUBJECT_PINNED) == KINDS


def test_official_split_without_test_images_is_an_error():
  """Catches a training run on an official split that has nothing to test on."""
  records = make_records(num_subjects=3, split=lambda s: "train")
  with pytest.raises(DataError, match="no 'test' images") as error:
    splits.split_records(records)
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_folds=5, fold=5), "out of range"),
    (dict(num_folds=5, fold=-1), "out of range"),
    (dict(num_folds=1, fold=0), "num_folds=1"),
    (dict(num_folds=2.5, fold=0), "num_folds=2.5"),
])
def test_bad_fold_arguments(kwargs, message):
  """Catches fold arguments that are accepted and then give an empty or odd split."""
  with pytest.raises(DataError, match=message) as error:
    splits.split_records(make_records(num_subjects=6), **kwargs)
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("kind, records, message", [
    ("subject", make_records(num_subjects=3),
     r"^3 subject\(s\) cannot fill 5 subject-held-out folds"),
    ("grouped", without_subject(make_records(num_subjects=2, per_class=1), [0]),
     (r"^3 group\(s\) \(2 subject\(s\) \+ 1 image\(s\) without a subject\) "
      r"cannot fill 5 folds")),
    ("stratified", make_records(num_subjects=1, per_class=1, subject=False)[:4],
     r"^4 image\(s\) cannot fill 5 folds"),
])
def test_too_few_groups_for_the_folds(kind, records, message):
  """Catches impossible fold counts that give empty folds or a traceback instead of
  one line saying what to lower."""
  assert splits.split_kind(records) == kind
  for split in (splits.split_records, splits.fold_assignments):
    with pytest.raises(DataError, match=message) as error:
      split(records, num_folds=5)
    assert "\n" not in str(error.value)
    assert "lower num_folds" in str(error.value)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_grouped_folds_with_every_class_rarer_than_the_folds():
  """Catches a library error leaking out for tiny mixed sets in which no class has
  as many images as there are folds (stratification is then impossible)."""
  records = [Record("happiness/a.png", "happiness", "s0"),
             Record("anger/b.png", "anger", "s1"),
             Record("happiness/c.png", "happiness"),
             Record("anger/d.png", "anger")]
  check_k_fold(records, num_folds=3, seed=0)
  assert splits.split_kind(records) == "grouped"


def test_empty_records():
  """Catches an empty manifest giving an empty training run instead of an error."""
  for split in (splits.split_records, splits.fold_assignments):
    with pytest.raises(DataError, match="empty"):
      split([])


def test_split_of_a_manifest_on_disk(tiny_faceset):
  """Catches a mismatch between the manifest on disk and what the splits expect."""
  records = contract.read_manifest(tiny_faceset)
  train, test, info = splits.split_records(records, num_folds=3, fold=0, seed=0)
  assert info.kind == "subject"
  assert len(info.test_subjects) == 2 and len(info.train_subjects) == 4
  assert len(test) == 2 * 7 * 3 and len(train) == 4 * 7 * 3
  assert not set(info.test_subjects) & set(info.train_subjects)


def test_hold_out_seen_takes_a_share_of_each_training_subject_and_keeps_them_seen():
  records = make_records(num_subjects=6, per_class=2)          # 14 images each
  records = without_subject(records, [0, 1]) + [
      Record(path="happiness/lone.png", expression="happiness", subject="lone")]
  train, _, info = split_quietly(records, num_folds=2, fold=0, seed=3)
  fit, seen, held_info = splits.hold_out_seen(train, 0.2, seed=5, info=info)
  # Nothing lost, nothing duplicated, input order kept on both sides.
  assert sorted(r.path for r in fit + seen) == sorted(r.path for r in train)
  assert [r for r in train if r in fit] == fit and [r for r in train if r in seen] == seen
  per_subject = collections.Counter(r.subject for r in seen)
  for subject, n in collections.Counter(r.subject for r in train if r.subject).items():
    if n == 1:      # a one-image subject keeps its image: it must stay seen
      assert subject not in per_subject
    else:
      assert per_subject[subject] == max(1, round(0.2 * n))
  # Every held-out person is still in training; unknown people always train.
  assert {r.subject for r in seen} <= {r.subject for r in fit}
  assert all(r.subject for r in seen)
  assert (held_info.num_train, held_info.num_seen) == (len(fit), len(seen))
  assert held_info.test_subjects == info.test_subjects


def test_hold_out_seen_is_seeded_order_free_and_off_at_zero():
  records = make_records(num_subjects=4, per_class=3)
  paths = lambda rs: sorted(r.path for r in rs)
  _, seen, _ = splits.hold_out_seen(records, 0.3, seed=1, info=_INFO)
  _, again, _ = splits.hold_out_seen(records[::-1], 0.3, seed=1, info=_INFO)
  _, other, _ = splits.hold_out_seen(records, 0.3, seed=2, info=_INFO)
  assert paths(seen) == paths(again) != paths(other)
  fit, none, info = splits.hold_out_seen(records, 0.0, seed=1, info=_INFO)
  assert fit == records and none == [] and info.num_seen == 0
  with pytest.raises(DataError, match=r"seen_holdout=1.0 must be in \[0, 1\)"):
    splits.hold_out_seen(records, 1.0, seed=1, info=_INFO)


_INFO = splits.SplitInfo(kind="subject", fold=0, num_folds=2, seed=0, num_train=0,
                         num_test=0, train_subjects=(), test_subjects=(), note="")
