"""benchmarks/stage2_nuisance_table.py: its README table against hand computations
on made-up stage2_identity.py lines."""

import importlib.util
import json
import os

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "benchmarks", "stage2_nuisance_table.py")
_spec = importlib.util.spec_from_file_location("stage2_nuisance_table", _PATH)
stage2_nuisance_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stage2_nuisance_table)


def _probe(z_id_identity, light_z_id, light_z_exp=0.0):
  r2 = lambda light: dict(light_x=light, shift_y=0.0)
  return dict(chance=0.125, pca_matched=dict(z_exp=0.9, z_id=z_id_identity, feature=0.8),
              nuisance_r2=dict(z_exp=r2(light_z_exp), z_id=r2(light_z_id), feature=r2(0.0)))


def _line(path, before, after, changes=("model.id_critic_stage=3",)):
  line = dict(changes=list(changes), steps=300, id_encoder_at_init=before, trained=after)
  path.write_text(json.dumps(line))
  return str(path)


def test_means_and_fold_by_fold_change(tmp_path):
  """Two folds: light_x in z_id 0.7 -> 0.1 and 0.6 -> 0.2, a change of -0.6 and
  -0.4: mean -0.5, 95% t-interval -0.5 +- 12.706 * 0.1 = [-1.77, +0.77].
  Catches the columns swapped (untrained for trained) and the change's sign."""
  paths = [_line(tmp_path / "f0.json", _probe(0.90, 0.7), _probe(0.80, 0.1, 0.05)),
           _line(tmp_path / "f1.json", _probe(0.80, 0.6), _probe(0.80, 0.2, 0.05))]
  rows = stage2_nuisance_table.table(paths).splitlines()
  assert "| light_x | +0.05 | +0.65 | +0.15 | -0.50 [-1.77, +0.77] |" in rows
  assert "| identity (accuracy; chance 0.125) | 0.900 | 0.850 | 0.800 | -0.050 [-0.685, +0.585] |" in rows
  only = stage2_nuisance_table.table(paths, ["shift_y"])
  assert "| shift_y |" in only and "light_x" not in only


def test_refuses_mixed_settings_and_lines_without_nuisance(tmp_path):
  a = _line(tmp_path / "a.json", _probe(0.9, 0.7), _probe(0.8, 0.1))
  b = _line(tmp_path / "b.json", _probe(0.9, 0.7), _probe(0.8, 0.1), changes=())
  with pytest.raises(SystemExit, match="different settings"):
    stage2_nuisance_table.table([a, b])
  bare = _probe(0.9, 0.7)
  del bare["nuisance_r2"]
  c = _line(tmp_path / "c.json", bare, _probe(0.8, 0.1))
  with pytest.raises(SystemExit, match="--control --nuisance"):
    stage2_nuisance_table.table([c])
  with pytest.raises(SystemExit, match="unknown attribute"):
    stage2_nuisance_table.table([a], ["pose"])
