"""Shared pytest fixtures: tiny face sets written into tmp_path."""

import os

import cv2
import numpy as np
import pytest

from dicefer_jax import contract
from experiments.configs import tiny

# Entry points the tests start (in process or as children) keep JAX's
# compilation cache out of the user's home cache: two test workers would write
# it at once, and JAX's cache writes are not atomic. test_compilation_cache.py
# turns it on for its own children, in a temporary directory.
os.environ.setdefault("DICEFER_COMPILATION_CACHE", "0")

# Small on purpose: the CI machine has 2 shared cores.
TINY_SUBJECTS = 6
TINY_IMAGES_PER_SUBJECT = 3


def write_tiny_faceset(data_dir: str) -> str:
  """A face set on disk: 7 classes x 6 subjects x 3 random 112x112 PNGs.

  Its manifest.csv follows the data contract, with subjects "s0".."s5", source
  "tiny" and no official split. Returns data_dir.
  """
  rng = np.random.default_rng(0)
  records = []
  for expression in contract.EXPRESSIONS:
    os.makedirs(os.path.join(data_dir, expression), exist_ok=True)
    for s in range(TINY_SUBJECTS):
      for k in range(TINY_IMAGES_PER_SUBJECT):
        path = f"{expression}/s{s}_{k}.png"
        image = rng.integers(0, 256, (contract.IMAGE_SIZE, contract.IMAGE_SIZE),
                             dtype=np.uint8)
        assert cv2.imwrite(os.path.join(data_dir, path), image)
        records.append(contract.Record(path=path, expression=expression,
                                       subject=f"s{s}", source="tiny"))
  contract.write_manifest(data_dir, records)
  return data_dir


@pytest.fixture
def tiny_faceset(tmp_path):
  """The tiny face set (`write_tiny_faceset`) in tmp_path; its directory (str)."""
  return write_tiny_faceset(str(tmp_path / "faces"))


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  """A finished tiny DICE-FER workdir (stage 3's final checkpoint), trained once
  per test module: prediction, serving and export only need its checkpoints,
  so each stage takes as few steps as a finished run can have."""
  # Imported here: conftest is loaded by every test, most of which never train.
  from experiments import run as run_lib  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("trained")
  config = tiny.get_config()
  config.data_dir = write_tiny_faceset(str(root / "faces"))
  config.stage1.num_steps = config.stage2.num_steps = config.stage3.num_steps = 2
  config.checkpoint_every = 2
  workdir = str(root / "wd")
  run_lib.run(config, workdir, "all")
  return workdir


@pytest.fixture
def tiny_config(tiny_faceset):
  config = tiny.get_config()
  config.data_dir = tiny_faceset
  return config
