"""Shared pytest fixtures: tiny face sets written into tmp_path."""

import contextlib
import os
import shutil
import socket

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

# Headless chromium as the browser tests start it (no GPU, no sandbox in a
# container, no background traffic: the machine is offline).
CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync")


def missing_or_fail(reason: str):
  """Skips with `reason`, or fails under CI, where every test must run."""
  if os.environ.get("CI"):
    pytest.fail(f"{reason} (CI is set: install it, see .ci/run)")
  pytest.skip(reason)


def free_port() -> int:
  """A loopback port nothing listens on now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def chromium(extra_args=()):
  """The system's chromium driven by Playwright (never a downloaded browser);
  skips (fails under CI) when either is missing."""
  executable = shutil.which("chromium") or shutil.which("chromium-browser")
  if not executable:
    missing_or_fail("chromium is not installed (apt-get install chromium)")
  try:
    from playwright.sync_api import sync_playwright  # pylint: disable=g-import-not-at-top
  except ImportError:
    missing_or_fail("playwright is not installed: pip install -e '.[dev]'")
  with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=executable, headless=True,
                                args=[*CHROMIUM_ARGS, *extra_args])
    try:
      yield browser
    finally:
      browser.close()


# Small on purpose: the CI machine has 2 shared cores.
TINY_SUBJECTS = 6
TINY_IMAGES_PER_SUBJECT = 3


def file_bytes(folder) -> dict[str, bytes]:
  """Every file under `folder` (hidden ones too) by relative path: its bytes. For
  checks that a set was written byte for byte, or that inputs were not touched."""
  files = {}
  for root, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        files[os.path.relpath(path, folder)] = f.read()
  return files


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
