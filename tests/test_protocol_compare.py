"""benchmarks/protocol_compare.py: variants of different protocol runs, fold by fold.

Its tables go into the README, so their numbers are checked against hand
computations on made-up protocol.json files.
"""

import importlib.util
import json
import os

import numpy as np
import pytest
from scipy import stats

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "benchmarks", "protocol_compare.py")
_spec = importlib.util.spec_from_file_location("protocol_compare", _PATH)
protocol_compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(protocol_compare)

SPLIT = dict(split_kind="subject", split_note="5 folds", data_dir="/faces")


def _protocol(directory, rows, **split):
  os.makedirs(directory, exist_ok=True)
  report = dict(SPLIT, **split, rows=[
      dict(variant=variant, fold=fold, status=status,
           metrics=dict(accuracy=acc, leakage=leak, leakage_id=None))
      for variant, fold, status, acc, leak in rows])
  with open(os.path.join(directory, "protocol.json"), "w") as f:
    json.dump(report, f)
  return str(directory)


def test_means_and_paired_differences_are_over_the_folds_both_finished(tmp_path):
  """Catches unpaired differences (means subtracted, or folds misaligned), a
  fold only one side finished entering the table, a diverged run counted, or
  the reference's sign flipped."""
  a = _protocol(tmp_path / "a", [("new", 0, "ran", 0.30, 0.90), ("new", 1, "ran", 0.40, 0.80),
                                 ("new", 2, "ran", 0.20, 0.95), ("new", 3, "ran", 0.9, 0.1)])
  b = _protocol(tmp_path / "b", [("base", 0, "reused", 0.50, 0.95),
                                 ("base", 1, "ran", 0.45, 0.90),
                                 ("base", 2, "ran", 0.41, 0.97),
                                 ("base", 3, "diverged", 0.0, 0.0),
                                 ("other", 0, "ran", 0.1, 0.1)])
  text = protocol_compare.table([f"new={a}:new", f"base={b}:base"])
  assert "folds 0, 1, 2." in text
  acc_new, acc_base = np.array([0.30, 0.40, 0.20]), np.array([0.50, 0.45, 0.41])
  assert f"| new | {acc_new.mean():.3f} ± {acc_new.std(ddof=1):.3f} |" in text
  d = acc_new - acc_base
  half = stats.t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3)
  assert f"| base | {d.mean():+.3f} [{d.mean() - half:+.3f}, {d.mean() + half:+.3f}] |" in text
  # leakage_id is None for a variant: that column is left out, not shown as nan.
  assert "z_id" not in text and "nan" not in text


def test_protocols_on_different_splits_are_refused(tmp_path):
  a = _protocol(tmp_path / "a", [("new", 0, "ran", 0.3, 0.9)])
  b = _protocol(tmp_path / "b", [("base", 0, "ran", 0.5, 0.9)], data_dir="/other")
  with pytest.raises(SystemExit, match="different splits"):
    protocol_compare.table([f"new={a}:new", f"base={b}:base"])


def test_a_variant_with_no_finished_run_is_refused(tmp_path):
  a = _protocol(tmp_path / "a", [("new", 0, "diverged", 0.3, 0.9)])
  with pytest.raises(SystemExit, match="no finished runs of variant 'new'"):
    protocol_compare.table([f"new={a}:new"])
  with pytest.raises(SystemExit, match="LABEL=PROTOCOL_DIR:VARIANT"):
    protocol_compare.table([f"{a}:new"])
