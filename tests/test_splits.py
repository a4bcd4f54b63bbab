"""Tests of subject-held-out, stratified and official splits."""

import collections

import pytest

from dicefer_jax import contract
from dicefer_jax import splits
from dicefer_jax.contract import EXPRESSIONS, Record
from dicefer_jax.errors import DataError


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


def test_subject_folds_hold_out_whole_subjects_and_cover_everything():
  records = make_records(num_subjects=12)
  seen = collections.Counter()
  test_subject_counts = []
  for fold in range(5):
    train, test, info = splits.split_records(records, num_folds=5, fold=fold, seed=3)
    assert info.kind == "subject"
    assert (info.fold, info.num_folds, info.seed) == (fold, 5, 3)
    train_subjects = {r.subject for r in train}
    test_subjects = {r.subject for r in test}
    assert not train_subjects & test_subjects
    assert set(info.test_subjects) == test_subjects
    assert set(info.train_subjects) == train_subjects
    assert len(train) + len(test) == len(records)
    assert (info.num_train, info.num_test) == (len(train), len(test))
    seen.update(r.path for r in test)
    test_subject_counts.append(len(test_subjects))
  # Every record is tested exactly once across the folds.
  assert seen == collections.Counter(r.path for r in records)
  # 12 subjects over 5 folds: sizes 3,3,2,2,2 in some order.
  assert sorted(test_subject_counts) == [2, 2, 2, 3, 3]


def test_splits_are_deterministic_and_depend_on_the_seed():
  records = make_records(num_subjects=20, per_class=1)
  a = splits.split_records(records, fold=1, seed=7)
  b = splits.split_records(records, fold=1, seed=7)
  assert a == b
  others = [splits.split_records(records, fold=1, seed=s)[2].test_subjects
            for s in range(8, 12)]
  assert any(t != a[2].test_subjects for t in others)


def test_subject_folds_do_not_depend_on_manifest_order():
  records = make_records(num_subjects=10, per_class=1)
  _, test_a, _ = splits.split_records(records, fold=2, seed=1)
  _, test_b, _ = splits.split_records(records[::-1], fold=2, seed=1)
  assert {r.path for r in test_a} == {r.path for r in test_b}
  # Order of the input is kept within each part.
  assert [r.path for r in test_b] == [r.path for r in test_a][::-1]


def test_stratified_fallback_when_a_subject_is_missing():
  records = make_records(num_subjects=5, per_class=2)
  records[0] = Record(path=records[0].path, expression=records[0].expression)
  assert splits.split_kind(records) == "stratified"
  seen = collections.Counter()
  for fold in range(5):
    train, test, info = splits.split_records(records, num_folds=5, fold=fold)
    assert info.kind == "stratified"
    assert "lack a subject" in info.note
    # 10 images per class over 5 folds: each fold tests 2 of every class.
    assert collections.Counter(r.expression for r in test) == {
        e: 2 for e in EXPRESSIONS}
    assert len(train) + len(test) == len(records)
    seen.update(r.path for r in test)
  assert seen == collections.Counter(r.path for r in records)


def test_stratified_folds_spread_uneven_classes():
  # 7 classes of 3 images over 5 folds: 21 images, so fold sizes 4 or 5.
  records = make_records(num_subjects=3, per_class=1, subject=False)
  sizes = [len(splits.split_records(records, num_folds=5, fold=f)[1])
           for f in range(5)]
  assert sorted(sizes) == [4, 4, 4, 4, 5]


def test_official_split_ignores_folds():
  records = make_records(num_subjects=4, split=lambda s: "test" if s == 3 else "train")
  train, test, info = splits.split_records(records, num_folds=3, fold=2, seed=9)
  assert info.kind == "official"
  assert info.fold is None and info.num_folds is None
  assert "ignored" in info.note
  assert {r.subject for r in test} == {"s3"}
  assert all(r.split == "train" for r in train)
  assert info.test_subjects == ("s3",)
  assert info.as_dict()["test_subjects"] == ["s3"]


def test_partial_official_split_falls_back_to_folds():
  records = make_records(num_subjects=6, split=lambda s: "train" if s else "")
  assert splits.split_kind(records) == "subject"


def test_official_split_without_test_images_is_an_error():
  records = make_records(num_subjects=3, split=lambda s: "train")
  with pytest.raises(DataError, match="no 'test' images"):
    splits.split_records(records)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_folds=5, fold=5), "out of range"),
    (dict(num_folds=5, fold=-1), "out of range"),
    (dict(num_folds=1, fold=0), "num_folds=1"),
])
def test_bad_fold_arguments(kwargs, message):
  with pytest.raises(DataError, match=message):
    splits.split_records(make_records(num_subjects=6), **kwargs)


def test_fewer_subjects_than_folds():
  with pytest.raises(DataError, match="3 subject.*5 subject-held-out folds"):
    splits.split_records(make_records(num_subjects=3), num_folds=5)


def test_empty_records():
  with pytest.raises(DataError, match="empty"):
    splits.split_records([])


def test_split_of_a_manifest_on_disk(tiny_faceset):
  records = contract.read_manifest(tiny_faceset)
  train, test, info = splits.split_records(records, num_folds=3, fold=0, seed=0)
  assert info.kind == "subject"
  assert len(info.test_subjects) == 2 and len(info.train_subjects) == 4
  assert len(test) == 2 * 7 * 3 and len(train) == 4 * 7 * 3
