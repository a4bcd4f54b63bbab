"""Multi-host training (`--config.distributed=True`): two processes, one result.

Each process of a job builds the same deterministic global batch and feeds only
its rows (`train.process_rows`) to its devices (`train.global_batch`); the
global batch, and so training, is that of one host. The end-to-end test runs
`experiments.run` as two JAX processes on localhost (2 CPU devices each, their
collectives over gloo, JAX 0.10's default for CPU), resuming a run that one
process with 4 devices started, and compares checkpoints and logged metrics
with that process's own continuation.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from dicefer_jax import checkpoints, config_fields, contract, environment, models, train
from dicefer_jax.errors import UserError
from experiments.configs import default, tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# As in tests/test_data_parallel.py: rounding (another reduction order across
# processes) stays within these; a wrong row or a missing all-reduce does not.
RTOL, ATOL = 1e-4, 1e-5
NUM_STEPS = 4


# ----------------------------------------------------------------------------
# Which rows each process feeds, and the one-process path.


@pytest.mark.parametrize("batch_size, processes", [(8, 1), (8, 2), (32, 4), (6, 3)])
def test_process_rows_tile_the_global_batch_in_order(batch_size, processes):
  """Catches overlapping or missing rows, or rows out of process order (the
  global batch would then differ from one host's, and so would training)."""
  rows = [train.process_rows(batch_size, p, processes) for p in range(processes)]
  fed = np.concatenate([np.arange(batch_size)[r] for r in rows])
  np.testing.assert_array_equal(fed, np.arange(batch_size))
  assert len({r.stop - r.start for r in rows}) == 1


def test_process_rows_refuse_a_batch_the_processes_cannot_share():
  with pytest.raises(UserError, match="cannot be split over 3 processes"):
    train.process_rows(8, 0, 3)


def test_one_process_global_batch_is_device_put():
  """Catches the multi-host path changing a one-host run: the batch must be the
  same arrays on the same sharding as `jax.device_put` gave before."""
  assert jax.process_count() == 1
  replicated, data = train.make_shardings()
  assert list(data.mesh.devices.flat) == jax.devices()
  assert replicated.mesh == data.mesh
  rng = np.random.default_rng(0)
  batch = dict(image=rng.normal(size=(8, 4, 4, 1)).astype(np.float32),
               label=rng.integers(0, 7, 8).astype(np.int32))
  ours, theirs = train.global_batch(batch, data), jax.device_put(batch, data)
  for key in batch:
    assert ours[key].sharding == theirs[key].sharding
    assert ours[key].dtype == theirs[key].dtype
    np.testing.assert_array_equal(np.asarray(ours[key]), np.asarray(theirs[key]))
    np.testing.assert_array_equal(np.asarray(ours[key]), batch[key])


def test_distributed_is_a_cosmetic_field_off_by_default():
  """Catches `distributed` fixing a workdir to one way of running (a job started on
  a pod could not be finished on one host) or counting as a result change (the
  protocol would retrain finished runs)."""
  assert default.get_config().distributed is False
  assert config_fields.may_change_in_workdir("distributed")
  assert not config_fields.changes_results("distributed")


def test_initialize_distributed_off_does_nothing():
  environment.initialize_distributed(False)
  assert not jax.distributed.is_initialized()


def test_initialize_distributed_passes_the_process_env_and_explains_failure(monkeypatch):
  """Catches DICEFER_NUM_PROCESSES / DICEFER_PROCESS_ID not reaching JAX, and JAX's
  bare ValueError (no cluster found) reaching the user as a traceback."""
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setenv(environment.NUM_PROCESSES_ENV, "2")
  monkeypatch.setenv(environment.PROCESS_ID_ENV, "1")
  environment.initialize_distributed(True)
  assert calls == [dict(num_processes=2, process_id=1)]

  def no_cluster(**kw):
    raise ValueError("coordinator_address should be defined.")
  monkeypatch.setattr(jax.distributed, "initialize", no_cluster)
  with pytest.raises(UserError, match="coordinator_address should be defined.*"
                     "JAX_COORDINATOR_ADDRESS"):
    environment.initialize_distributed(True)


def test_evaluate_takes_distributed_from_its_flag_and_protocol_refuses_it():
  """Catches evaluate refusing --config.distributed (a multi-host evaluation could
  not be started) or passing it on as an eval setting; and the protocol, which
  runs every run in one process, silently running once per host."""
  from experiments import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  from experiments import protocol  # pylint: disable=g-import-not-at-top
  assert evaluate_lib._eval_overrides(  # pylint: disable=protected-access
      {"distributed": True, "eval.mig.num_seeds": 5}) == {"mig.num_seeds": 5}
  with pytest.raises(UserError, match="--config.model.width: evaluate takes only"):
    evaluate_lib._eval_overrides({"model.width": 3})  # pylint: disable=protected-access
  config = tiny.get_config()
  protocol._single_host(config)  # pylint: disable=protected-access
  config.distributed = True
  with pytest.raises(UserError, match="the protocol runs on one host"):
    protocol._single_host(config)  # pylint: disable=protected-access


# ----------------------------------------------------------------------------
# Two processes on localhost.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir, data_dir, devices, process=None, port=None):
  """experiments.run (stage 1 of the tiny config, NUM_STEPS) as a child process."""
  env = dict(os.environ, PYTHONPATH=REPO, DICEFER_COMPILATION_CACHE="0", XLA_FLAGS=" ".join([
      f"--xla_force_host_platform_device_count={devices}",
      # Compiling is most of this test's time; every process uses the same flags.
      "--xla_backend_optimization_level=0"]))
  flags = ["--config=experiments/configs/tiny.py", f"--config.data_dir={data_dir}",
           f"--workdir={workdir}", "--stage=1", f"--config.stage1.num_steps={NUM_STEPS}",
           "--config.log_every=1", "--config.checkpoint_every=2"]
  if process is not None:
    env.update({"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                environment.NUM_PROCESSES_ENV: "2", environment.PROCESS_ID_ENV: str(process)})
    flags.append("--config.distributed=True")
  return subprocess.Popen([sys.executable, "-m", "experiments.run", *flags], cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs) -> list[str]:
  """Waits for every process (killing all if one fails or hangs); their stdouts."""
  outs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=400)
      assert p.returncode == 0, err[-3000:]
      outs.append(out)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return outs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """One process with 4 devices trains NUM_STEPS steps (checkpoints at 2 and 4).
  A 2-process job (2 devices each) starts from a copy of its step-2 checkpoint
  and config, and trains steps 3 and 4: a multi-host restore, two multi-host
  steps and a multi-host save. (Run one after the other: on 2 cores they are
  CPU-bound either way.)"""
  root = tmp_path_factory.mktemp("multihost")
  from conftest import write_tiny_faceset  # pylint: disable=g-import-not-at-top
  data_dir = write_tiny_faceset(str(root / "faces"))
  single, multi = str(root / "single"), str(root / "multi")
  out_single = _finish([_start(single, data_dir, 4)])[0]
  os.makedirs(checkpoints.stage_dir(multi, "stage1"))
  shutil.copy(os.path.join(single, "config.json"), multi)
  shutil.copytree(os.path.join(checkpoints.stage_dir(single, "stage1"), "2"),
                  os.path.join(checkpoints.stage_dir(multi, "stage1"), "2"))
  port = _free_port()
  out_multi = _finish([_start(multi, data_dir, 2, i, port) for i in (0, 1)])
  return dict(single=single, multi=multi, out_single=out_single, out_multi=out_multi)


def _final_state(workdir):
  """The final stage-1 state, read into this process's one device. The template is
  abstract: building a real initial state would compile ~170 small programs."""
  config = tiny.get_config()
  model = models.build_model(config.model, contract.NUM_CLASSES)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          jax.eval_shape(lambda: train.initial_state("stage1", config, model)))
  state, _ = checkpoints.restore_final(workdir, "stage1", template)
  return state


def _rows(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]


def test_two_processes_train_as_one_host(runs):
  """Catches each process feeding the wrong rows (the stage-1 loss depends on row
  order through its marginal permutation), a missing cross-process reduction, or
  a restore that reads something else: every metric of steps 3 and 4, and every
  expression-encoder parameter and statistic, equal the one-process run's."""
  single = {r["step"]: r for r in _rows(runs["single"])}
  multi = _rows(runs["multi"])
  assert [r["step"] for r in multi] == [3, 4]
  for row in multi:
    for key in ("loss", "mi_global", "mi_local", "l1", "grad_norm"):
      np.testing.assert_allclose(row[key], single[row["step"]][key], rtol=RTOL, atol=ATOL,
                                 err_msg=f"step {row['step']} {key}")
  a, b = _final_state(runs["multi"]), _final_state(runs["single"])
  assert int(a.step) == int(b.step) == NUM_STEPS
  for x, y in zip(jax.tree.leaves((a.params["exp_encoder"], a.batch_stats, a.rng)),
                  jax.tree.leaves((b.params["exp_encoder"], b.batch_stats, b.rng))):
    np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL)


def test_critics_differ_only_where_the_gradient_is_zero(runs):
  """The critics match too, but for a handful of entries whose exact gradient is 0:
  the DV bound is unchanged by a constant added to every score, so a critic's
  output bias (and the bias of a hidden unit active on every input) gets a
  rounding-noise gradient, which Adam normalises to a step of about the learning
  rate, of either sign. Catches a critic trained on other data (most entries
  would differ)."""
  a, b = _final_state(runs["multi"]), _final_state(runs["single"])
  lr = tiny.get_config().train.learning_rate
  differ, total = 0, 0
  for name in ("exp_global_critic", "exp_local_critic"):
    for x, y in zip(jax.tree.leaves(a.params[name]), jax.tree.leaves(b.params[name])):
      close = np.isclose(x, y, rtol=RTOL, atol=ATOL)
      differ, total = differ + int((~close).sum()), total + close.size
      assert np.all(np.abs(x - y) <= 2 * lr * NUM_STEPS)   # Adam: ~lr per step
  assert differ <= 5 and total > 1000, (differ, total)


def test_one_process_writes_and_orbax_restores_and_saves(runs):
  """Catches every process appending its own copy of each metrics row or log line,
  or a checkpoint a process did not take part in (Orbax saves are collective);
  and `distributed` refused in a workdir made without it."""
  assert sorted(os.listdir(checkpoints.stage_dir(runs["multi"], "stage1"))) == ["2", "4"]
  assert len(_rows(runs["multi"])) == 2
  p0, p1 = runs["out_multi"]
  assert "training steps 2..4 on 4 cpu device(s) in 2 processes" in p0
  assert "training steps" not in p1 and "data:" not in p1
  assert "training steps 0..4 on 4 cpu device(s), 16 images/step" in runs["out_single"]
  saved = json.load(open(os.path.join(runs["multi"], "config.json")))
  assert saved["distributed"] is True
