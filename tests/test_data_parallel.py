"""Data parallelism: a step on 4 devices is the step on 1 device, batch and all.

Training shards each batch's rows over a 1-D "data" mesh and replicates the
state (`train.make_shardings`, `train.global_batch`). The claim checked here is
that this changes nothing but float rounding: same initial state, same batches,
three steps of stage 1, stage 2 and the baseline on a 4-device mesh and on a
1-device mesh give the same parameters, BatchNorm statistics, optimizer state
and metrics. In particular BatchNorm statistics are those of the global batch:
a per-device BatchNorm (each device normalising its own 2 rows) is run too, and
must fail the same comparison by orders of magnitude.

The 4 CPU devices exist only if XLA_FLAGS asks for them before JAX is imported,
so the comparison runs in a child process: this file run as a script.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_DEVICES = 4
NUM_STEPS = 3
STAGES = ("stage1", "stage2", "baseline")
# Tolerances, as np.allclose: |four - one| <= ATOL + RTOL * |one|. The 4-device
# program sums each batch reduction as 4 partial sums and an all-reduce, the
# 1-device one in one pass: float32 (eps 1.2e-7) rounding then differs, and grows
# through ~20 layers forward and back and 3 steps. Measured: parameters and
# statistics within ~2e-6 absolute, losses within ~4e-6, gradient norms within
# ~5e-6 relative; the worst part of any stage is at 1/4 of its tolerance. A
# per-device BatchNorm moves them ~10^4 tolerances (the loss by ~0.15, parameters
# by ~0.5). The optimizer state (SGD momentum, below) is a sum of raw gradients,
# whose nearly cancelling entries carry ~1e-4 absolute rounding error (parameters
# get it times the learning rate): its absolute tolerance is 100x larger.
RTOL, ATOL = 1e-4, 1e-5
ATOL_OPT_STATE = 1e-3
# SGD, not the config's Adam, for this comparison: Adam's first update is
# lr * g / (|g| + eps), which turns a gradient component that is rounding noise
# (the DV bound's gradient with respect to a critic's output bias is exactly 0)
# into a +-lr step whose sign differs between the two programs. SGD's update is
# linear in the gradient, so parameters differ exactly as much as the gradients
# do. The optimizer is an argument of the step, not part of what is sharded.
SGD_LEARNING_RATE = 0.01
SGD_MOMENTUM = 0.9  # so that there is an optimizer state to compare


PARTS = ("params", "batch_stats", "opt_state", "metrics")


def _allclose_ratio(a, b, atol: float = ATOL) -> float:
  """max over leaves of |a - b| / (atol + RTOL |b|): <= 1 means allclose."""
  import jax  # pylint: disable=g-import-not-at-top
  ratios = [0.0]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ratios.append(float(np.max(np.abs(x - y) / (atol + RTOL * np.abs(y)))))
  return max(ratios)


def _compare(four, one) -> dict:
  return {part: _allclose_ratio(four[i], one[i],
                                ATOL_OPT_STATE if part == "opt_state" else ATOL)
          for i, part in enumerate(PARTS)}


def _child() -> dict:
  """Runs every comparison on this process's devices; returns what it found."""
  from dicefer_jax import environment  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from dicefer_jax import contract, models, steps, train  # pylint: disable=g-import-not-at-top
  from experiments.configs import tiny  # pylint: disable=g-import-not-at-top

  assert jax.device_count() == NUM_DEVICES, jax.devices()
  config = tiny.get_config()
  model = models.build_model(config.model, contract.NUM_CLASSES)
  params, batch_stats = models.init_variables(model, jax.random.PRNGKey(0), config.image_size)
  b, s = config.batch_size, config.image_size
  rng = np.random.default_rng(0)
  image = lambda: rng.normal(size=(b, s, s, 1)).astype(np.float32)
  label = lambda: rng.integers(0, contract.NUM_CLASSES, b).astype(np.int32)
  pair_batches = [dict(image_m=image(), image_n=image(), label=label())
                  for _ in range(NUM_STEPS)]
  image_batches = [dict(image=image(), label=label()) for _ in range(NUM_STEPS)]
  meshes = {"one": train.make_shardings(jax.devices()[:1]), "four": train.make_shardings()}

  def run(stage, mesh):
    replicated, data_sharding = meshes[mesh]
    optimizers = {name: optax.sgd(SGD_LEARNING_RATE, momentum=SGD_MOMENTUM)
                  for name in steps.TRAINABLE[stage]}
    state = jax.device_put(steps.create_state(stage, params, batch_stats, optimizers,
                                              jax.random.PRNGKey(3)), replicated)
    step = jax.jit(steps.make_step(stage, model, config, optimizers))
    metrics, seen = [], {}
    for batch in pair_batches if stage in steps.PAIR_STAGES else image_batches:
      batch = train.global_batch(batch, data_sharding)
      if not seen:
        x = next(iter(batch.values()))
        seen = dict(
            batch_devices=len(x.sharding.device_set),
            shard_rows=sorted([s.index[0].start, s.index[0].stop]
                              for s in x.addressable_shards),
            # Compiling ahead of time is what the call below reuses.
            all_reduce="all-reduce" in step.lower(state, batch).compile().as_text())
      state, m = step(state, batch)
      metrics.append({k: v for k, v in m.items() if k != "finite"})
    leaf = jax.tree.leaves(state.params)[0]
    seen.update(state_devices=len(leaf.sharding.device_set),
                state_replicated=bool(leaf.sharding.is_fully_replicated))
    return jax.device_get((state.params, state.batch_stats, state.opt_state, metrics)), seen

  found = {}
  for stage in STAGES:
    one, _ = run(stage, "one")
    four, seen = run(stage, "four")
    found[stage] = dict(seen, **_compare(four, one))

  # The bug this test exists for: BatchNorm statistics per device. Each device's
  # rows are encoded on their own (what pmap or shard_map without a BatchNorm
  # axis_name computes); batch statistics are averaged over devices.
  encode = steps._encode  # pylint: disable=protected-access

  def per_device_encode(encoder, params, batch_stats, name, images, train):
    if not train:
      return encode(encoder, params, batch_stats, name, images, train)
    shards = images.reshape(NUM_DEVICES, -1, *images.shape[1:])
    out, stats = jax.vmap(
        lambda x: encode(encoder, params, batch_stats, name, x, True))(shards)
    return (jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), out),
            jax.tree.map(lambda a: a.mean(0), stats))

  steps._encode = per_device_encode  # pylint: disable=protected-access
  try:
    per_device, _ = run("baseline", "four")
  finally:
    steps._encode = encode  # pylint: disable=protected-access
  one, _ = run("baseline", "one")
  found["per_device_batchnorm"] = _compare(per_device, one)
  return found


@pytest.fixture(scope="module")
def found():
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS=" ".join([
      f"--xla_force_host_platform_device_count={NUM_DEVICES}",
      # Compiling is most of this test's time. The LLVM backend's optimisation
      # level decides how fast the code runs, not how GSPMD partitions the
      # program, and both meshes are compiled with the same flags.
      "--xla_backend_optimization_level=0"]))
  result = subprocess.run([sys.executable, os.path.abspath(__file__)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("stage", STAGES)
def test_batch_is_sharded_over_four_devices_and_the_state_replicated(found, stage):
  """Catches a batch left on one device (a 4-device run that is secretly a 1-device
  one would pass the comparison below), or a state split across devices."""
  seen = found[stage]
  assert seen["batch_devices"] == NUM_DEVICES
  assert seen["shard_rows"] == [[0, 2], [2, 4], [4, 6], [6, 8]]
  assert seen["all_reduce"]  # the devices do talk: gradients and statistics are summed
  assert seen["state_devices"] == NUM_DEVICES and seen["state_replicated"]


@pytest.mark.parametrize("stage", STAGES)
def test_four_devices_give_the_one_device_step(found, stage):
  """Catches any difference sharding makes beyond rounding: BatchNorm statistics
  or a loss over each device's rows instead of the global batch, a gradient not
  summed over devices, a permutation drawn per device."""
  for part in PARTS:
    assert found[stage][part] <= 1.0, (
        f"{stage} {part}: {found[stage][part]:.3g}x the tolerance")


def test_per_device_batchnorm_would_fail_the_comparison(found):
  """The comparison is sharp enough: BatchNorm over each device's 2 rows misses the
  tolerance on the loss, the parameters, the statistics and the optimizer state by
  orders of magnitude."""
  per_device = found["per_device_batchnorm"]
  for part in PARTS:
    assert per_device[part] > 100.0, (part, per_device[part])


if __name__ == "__main__":
  print(json.dumps(_child()))
