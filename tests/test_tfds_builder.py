"""Tests of the `dicefer_faces` TFDS builder on tiny face sets built in tmp_path."""

import os

import cv2
import numpy as np
import pytest
import tensorflow_datasets as tfds

from dicefer_jax import contract, face_images, tfds_builder
from dicefer_jax.errors import DataError


def _examples(ds):
  return list(tfds.as_numpy(ds))


def test_subject_folds_load_by_name_string(tiny_faceset, tmp_path):
  data_dir = str(tmp_path / "tfds")
  name = f"dicefer_faces/face_dir={tiny_faceset},num_folds=3,fold=1,seed=0"
  train = _examples(tfds.load(name, split="train", data_dir=data_dir))
  test = _examples(tfds.load(name, split="test", data_dir=data_dir))

  # 7 classes x 6 subjects x 3 images, 2 of the 6 subjects held out.
  assert len(train) + len(test) == 126 and len(test) == 42
  train_subjects = {e["subject"].decode() for e in train}
  test_subjects = {e["subject"].decode() for e in test}
  assert not train_subjects & test_subjects
  assert train_subjects | test_subjects == {f"s{i}" for i in range(6)}

  example = test[0]
  assert example["image"].shape == (112, 112, 1)
  assert example["image"].dtype == np.uint8
  assert example["source"] == b"tiny"
  # Pixels and labels are the manifest's, losslessly.
  path = example["path"].decode()
  on_disk = cv2.imread(os.path.join(tiny_faceset, path), cv2.IMREAD_GRAYSCALE)
  np.testing.assert_array_equal(example["image"][..., 0], on_disk)
  assert contract.EXPRESSIONS[example["expression"]] == path.split("/")[0]

  builder = tfds.builder("dicefer_faces", face_dir=tiny_faceset, num_folds=3, fold=1,
                         data_dir=data_dir)
  info = builder.info
  assert info.features["expression"].names == list(contract.EXPRESSIONS)
  assert info.features["image"].shape == (112, 112, 1)
  assert info.supervised_keys == ("image", "expression")
  assert info.splits["train"].num_examples == len(train)
  assert info.metadata["split"]["kind"] == "subject"
  assert sorted(info.metadata["split"]["test_subjects"]) == sorted(test_subjects)

  # A prepared copy reads back by config name alone, without the face set.
  config_name = builder.builder_config.name
  assert config_name.startswith("faces-") and config_name.endswith("fold1of3-seed0")
  again = tfds.load(f"dicefer_faces/{config_name}", split="test", data_dir=data_dir,
                    as_supervised=True)
  assert sum(1 for _ in again) == 42

  # Another fold is a different config: its test subjects differ.
  other = tfds_builder.faces_config(tiny_faceset, num_folds=3, fold=2)
  assert other.name != config_name


def test_official_split_and_config_object(tmp_path):
  faces = str(tmp_path / "faces")
  rng = np.random.default_rng(0)
  records = []
  for i, expression in enumerate(contract.EXPRESSIONS):
    for split in ("train", "train", "test"):
      path = f"{expression}/{split}_{len(records)}.png"
      os.makedirs(os.path.join(faces, expression), exist_ok=True)
      # A 3-channel PNG of a gray face is tolerated and read as one channel.
      image = rng.integers(0, 256, (112, 112), dtype=np.uint8)
      if i == 0:
        image = np.repeat(image[..., None], 3, axis=-1)
      cv2.imwrite(os.path.join(faces, path), image)
      records.append(contract.Record(path, expression, source="rafdb", split=split))
  contract.write_manifest(faces, records)

  config = tfds_builder.faces_config(faces, num_folds=10, fold=7)
  assert config.split_kind == "official" and config.name.endswith("-official")
  data_dir = str(tmp_path / "tfds")
  test = _examples(tfds_builder.load(faces, "test", data_dir=data_dir, num_folds=10,
                                     fold=7))
  train = _examples(tfds.load("dicefer_faces", split="train", data_dir=data_dir,
                              builder_kwargs={"config": config}))
  assert len(train) == 14 and len(test) == 7
  assert all(e["path"].decode().split("/")[1].startswith("test_") for e in test)
  assert all(e["subject"] == b"" for e in train + test)
  assert {e["image"].shape for e in train} == {(112, 112, 1)}


def test_bad_face_sets_fail_with_one_line(tmp_path):
  os.makedirs(tmp_path / "empty")
  with pytest.raises(DataError, match="is empty"):
    tfds_builder.faces_config(str(tmp_path / "empty"))

  faces = str(tmp_path / "faces")
  os.makedirs(os.path.join(faces, "anger"))
  cv2.imwrite(os.path.join(faces, "anger", "a.png"), np.zeros((48, 48), np.uint8))
  contract.write_manifest(faces, [contract.Record("anger/a.png", "anger", "s1")])
  # One subject cannot fill 5 subject-held-out folds: caught before building.
  with pytest.raises(DataError, match="cannot fill 5"):
    tfds_builder.faces_config(faces)

  with open(os.path.join(faces, "anger", "b.png"), "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\nnot really a png")
  contract.write_manifest(faces, [contract.Record("anger/a.png", "anger", split="train"),
                                  contract.Record("anger/b.png", "anger", split="test")])
  builder = tfds.builder("dicefer_faces", face_dir=faces,
                         data_dir=str(tmp_path / "tfds"))
  with pytest.raises(DataError, match=r"cannot decode image .*b\.png"):
    builder.download_and_prepare()


def test_faces_of_another_size_are_resized_like_the_files_path(tmp_path):
  """Bug: the TFDS path refused a 48x48 face that training from the files resized."""
  faces = str(tmp_path / "faces")
  os.makedirs(os.path.join(faces, "anger"))
  rng = np.random.default_rng(0)
  records = []
  for i, split in enumerate(("train", "test")):
    # Colour and off-size: the files path turns both into 112x112 gray.
    image = rng.integers(0, 256, (48, 60, 3), dtype=np.uint8)
    cv2.imwrite(os.path.join(faces, "anger", f"{i}.png"), image)
    records.append(contract.Record(f"anger/{i}.png", "anger", split=split))
  contract.write_manifest(faces, records)
  ds = tfds_builder.load(faces, "train", data_dir=str(tmp_path / "tfds"))
  (example,) = _examples(ds)
  expected = face_images.load_images(faces, records[:1], contract.IMAGE_SIZE)[0]
  np.testing.assert_array_equal(example["image"], expected)
