"""The training loop end to end: stages, checkpoints, resume, evaluation, errors."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dicefer_jax import checkpoints, contract, models, steps, train
from dicefer_jax import data as data_lib
from dicefer_jax import workdir as workdir_lib
from dicefer_jax.errors import UserError
from experiments import evaluate as evaluate_lib
from experiments import run as run_lib
from experiments.configs import default

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _final_params(workdir, stage, config):
  model = models.build_model(config.model, contract.NUM_CLASSES)
  state, _ = checkpoints.restore_final(workdir, stage, train.initial_state(stage, config, model))
  return state


def _subprocess(args, **kwargs):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, **kwargs)


def _tiny_flags(data_dir, **overrides):
  flags = ["--config=experiments/configs/tiny.py", f"--config.data_dir={data_dir}"]
  return flags + [f"--config.{k}={v}" for k, v in overrides.items()]


def test_all_stages_then_evaluate_in_a_fresh_process(tiny_config, tmp_path):
  workdir = str(tmp_path / "wd")
  summary = run_lib.run(tiny_config, workdir, "all")
  for stage in train.DICEFER_STAGES:
    assert checkpoints.latest_step(workdir, stage) == tiny_config[stage].num_steps
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved["model"]["width"] == 4 and saved["data_dir"] == tiny_config.data_dir
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert {r["stage"] for r in rows} == set(train.DICEFER_STAGES)
  assert all("images_per_s" in r for r in rows if "loss" in r)
  assert os.listdir(os.path.join(workdir, "tensorboard"))

  result = _subprocess(["experiments.evaluate", f"--workdir={workdir}"], timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  metrics = json.load(open(os.path.join(workdir, "eval", "metrics.json")))
  assert metrics["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-9)
  assert set(metrics["per_class_recall"]) == set(contract.EXPRESSIONS)
  assert np.sum(metrics["confusion"]) == summary["num_test"]
  assert os.path.getsize(os.path.join(workdir, "eval", "confusion.png")) > 1000
  report = open(os.path.join(workdir, "eval", "report.md")).read()
  assert f"| accuracy | {metrics['accuracy']:.3f} |" in report
  assert "![confusion](confusion.png)" in report
  # The test split held out whole subjects.
  assert not set(metrics["split"]["train_subjects"]) & set(metrics["split"]["test_subjects"])

  # Rerunning a finished workdir redoes nothing and changes no checkpoint.
  before = _final_params(workdir, "stage3", tiny_config)
  run_lib.run(tiny_config, workdir, "all")
  after = _final_params(workdir, "stage3", tiny_config)
  assert all(np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(before.params), jax.tree.leaves(after.params)))


def test_resume_gives_the_same_parameters_as_an_uninterrupted_run(tiny_config, tmp_path):
  whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
  run_lib.run(tiny_config, whole, "1")
  short = tiny_config.copy_and_resolve_references()
  short.stage1.num_steps = 3   # "interrupted" after the step-3 checkpoint
  run_lib.run(short, parts, "1")
  run_lib.run(tiny_config, parts, "1")
  a = _final_params(whole, "stage1", tiny_config)
  b = _final_params(parts, "stage1", tiny_config)
  assert int(a.step) == int(b.step) == 6
  for x, y in zip(jax.tree.leaves((a.params, a.batch_stats, a.opt_state)),
                  jax.tree.leaves((b.params, b.batch_stats, b.opt_state))):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_kill_9_mid_stage_then_rerun_continues(tiny_faceset, tmp_path):
  workdir = str(tmp_path / "wd")
  flags = _tiny_flags(tiny_faceset, **{"stage1.num_steps": 100000, "checkpoint_every": 4,
                                       "log_every": 1})
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.Popen([sys.executable, "-m", "experiments.run", f"--workdir={workdir}",
                           "--stage=1", *flags], cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt_dir = checkpoints.stage_dir(workdir, "stage1")
  deadline = time.time() + 240
  try:
    while time.time() < deadline:
      done = [d for d in (os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else [])
              if d.isdigit() and int(d) >= 8]
      if done:
        break
      time.sleep(0.2)
    else:
      pytest.fail("no checkpoint appeared")
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  resumed_from = checkpoints.latest_step(workdir, "stage1")
  assert resumed_from >= 8
  finish = resumed_from + 3
  flags = _tiny_flags(tiny_faceset, **{"stage1.num_steps": finish, "checkpoint_every": 4,
                                       "log_every": 1})
  result = _subprocess(["experiments.run", f"--workdir={workdir}", "--stage=1", *flags],
                       timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"training steps {resumed_from}..{finish}" in result.stdout
  assert checkpoints.latest_step(workdir, "stage1") == finish
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  second_run = rows[-3:]
  assert [r["step"] for r in second_run] == [resumed_from + 1, resumed_from + 2, finish]


def test_stage_before_its_prerequisite_is_refused(tiny_config, tmp_path):
  with pytest.raises(UserError, match="run --stage=1 first"):
    run_lib.run(tiny_config, str(tmp_path / "wd"), "2")


def test_workdir_from_another_config_is_refused_and_untouched(tiny_config, tmp_path):
  workdir = str(tmp_path / "wd")
  run_lib.run(tiny_config, workdir, "1")
  listing = sorted(os.listdir(checkpoints.stage_dir(workdir, "stage1")))
  other = tiny_config.copy_and_resolve_references()
  other.model.exp_dim = 16
  with pytest.raises(UserError, match="another config.*model.exp_dim"):
    run_lib.run(other, workdir, "1")
  assert sorted(os.listdir(checkpoints.stage_dir(workdir, "stage1"))) == listing
  assert json.load(open(os.path.join(workdir, "config.json")))["model"]["exp_dim"] == 8


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(
    tiny_config, tmp_path):
  workdir = str(tmp_path / "wd")
  tiny_config.stage1.num_steps = 20
  tiny_config.checkpoint_every = 3
  tiny_config.log_every = 5

  def poisoned_make_step(stage, model, config, optimizers):
    real = steps.make_step(stage, model, config, optimizers)

    def step(state, batch):
      new_state, metrics = real(state, batch)
      bad = new_state.step >= 7   # step 7 onwards produces NaN
      metrics = dict(metrics, loss=jnp.where(bad, jnp.nan, metrics["loss"]),
                     finite=jnp.logical_and(metrics["finite"], ~bad))
      return new_state, metrics
    return step

  workdir_lib.save_config(tiny_config, workdir, default.get_config())
  data = data_lib.split_faces(tiny_config, data_lib.load_face_set(tiny_config.data_dir))
  with pytest.raises(train.TrainingDiverged, match="at step 7.*last good checkpoint \\(step 6\\)"):
    train.train_and_evaluate(tiny_config, workdir, ["stage1"], data,
                             make_step=poisoned_make_step)
  assert checkpoints.latest_step(workdir, "stage1") == 6


def test_bad_data_dir_is_one_line_and_exit_code_2(tmp_path):
  result = _subprocess(["experiments.run", f"--workdir={tmp_path / 'wd'}",
                        *_tiny_flags(str(tmp_path / "nowhere"))], timeout=120)
  assert result.returncode == 2
  lines = [l for l in result.stderr.strip().splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "does not exist" in lines[0]
  assert "Traceback" not in result.stderr


def test_evaluate_without_training_is_one_line(tmp_path):
  result = _subprocess(["experiments.evaluate", f"--workdir={tmp_path}"], timeout=120)
  assert result.returncode == 2
  assert "not a training workdir" in result.stderr and "Traceback" not in result.stderr


def test_stability_monitor_flags_collapse_and_divergence():
  monitor = train.StabilityMonitor("stage2", batch_size=32, patience=3)
  assert monitor(1, {"disc_accuracy": 0.6, "mi_global": 1.0}) == []
  for step in (2, 3):
    assert monitor(step, {"disc_accuracy": 1.0}) == []
  (warning,) = monitor(4, {"disc_accuracy": 1.0})
  assert "step 4" in warning and "collapsed" in warning
  assert monitor(5, {"disc_accuracy": 0.5}) == []
  (warning,) = monitor(6, {"mi_local": 1e3})
  assert "mi_local" in warning and "diverging" in warning


def test_warm_start_from_the_supervised_baseline(tiny_config, tmp_path):
  workdir = str(tmp_path / "wd")
  tiny_config.stage1.init_from = "baseline"
  assert train.stages_for(tiny_config, "all") == ["baseline", "stage1", "stage2", "stage3"]
  with pytest.raises(UserError, match="run --stage=baseline first"):
    run_lib.run(tiny_config, workdir, "1")
  run_lib.run(tiny_config, workdir, "baseline")
  warm = _final_params(workdir, "baseline", tiny_config)
  short = tiny_config.copy_and_resolve_references()
  short.stage1.num_steps = 0       # stage 1 with no steps hands on what it started from
  run_lib.run(short, str(tmp_path / "wd0"), "all")
  start = _final_params(str(tmp_path / "wd0"), "stage1", short)
  for a, b in zip(jax.tree.leaves(warm.params["exp_encoder"]),
                  jax.tree.leaves(start.params["exp_encoder"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_stage_trained_from_an_older_prerequisite_is_retrained(tiny_config, tmp_path):
  """Bug: after stage1.num_steps grew, stages 2 and 3 found their own final
  checkpoints, said "already complete", and the reported accuracy rested on the
  old E_exp."""
  workdir = str(tmp_path / "wd")
  run_lib.run(tiny_config, workdir, "all")
  old_stage2 = _final_params(workdir, "stage2", tiny_config)
  longer = tiny_config.copy_and_resolve_references()
  longer.stage1.num_steps = tiny_config.stage1.num_steps + 2
  run_lib.run(longer, workdir, "1")
  # Evaluation refuses the out-of-date stages instead of reporting them.
  with pytest.raises(UserError, match="stage2 was trained from an older stage1"):
    evaluate_lib.evaluate(workdir)

  run_lib.run(longer, workdir, "all")
  assert checkpoints.read_meta(workdir, "stage2")["lineage"] == {"stage1": 8}
  assert checkpoints.read_meta(workdir, "stage3")["lineage"] == {"stage1": 8, "stage2": 4}
  new_stage2 = _final_params(workdir, "stage2", longer)
  # Stage 2 restarted from the new E_exp: its frozen copy of E_exp changed.
  assert not all(np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(old_stage2.params["exp_encoder"]),
      jax.tree.leaves(new_stage2.params["exp_encoder"])))
  # The superseded checkpoints were set aside, not deleted.
  aside = sorted(os.listdir(workdir_lib.superseded_dir(workdir)))
  assert [name.split("-")[0] for name in aside] == ["stage2", "stage3"]
  for name in aside:
    steps_kept = os.listdir(os.path.join(workdir_lib.superseded_dir(workdir), name))
    assert str(tiny_config[name.split("-")[0]].num_steps) in steps_kept
  assert evaluate_lib.evaluate(workdir)["step"] == longer.stage3.num_steps


def test_eval_batch_size_must_split_over_the_devices(tiny_config, monkeypatch):
  """Bug: eval batches are sharded over the devices, but eval_batch_size was never
  checked against the device count (only batch_size was)."""
  model = models.build_model(tiny_config.model, contract.NUM_CLASSES)
  state = train.initial_state("stage3", tiny_config, model)
  monkeypatch.setattr(train.jax, "device_count", lambda: 3)
  with pytest.raises(UserError, match="eval_batch_size=16 is not divisible by the 3"):
    train.predict(tiny_config, model, state, np.zeros((4, 32, 32, 1), np.uint8))
