"""Mixed precision (`model.half_precision`): bfloat16 convolutions, float32 the rest.

What must hold (dicefer_jax/models.py): the ResNet trunks convolve in bfloat16;
parameters and optimizer state stay float32; BatchNorm statistics, the critics'
scores, the DV bound's logsumexp and the cross-entropies are float32; and a
model so configured still trains.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dicefer_jax import contract, models, steps
from experiments.configs import tiny

NUM_STEPS = 20


def _setup(stage: str, half_precision: bool = True):
  config = tiny.get_config()
  config.model.half_precision = half_precision
  model = models.build_model(config.model, contract.NUM_CLASSES)
  params, batch_stats = models.init_variables(model, jax.random.PRNGKey(0), config.image_size)
  optimizers = steps.make_optimizers(config.train, stage)
  state = steps.create_state(stage, params, batch_stats, optimizers, jax.random.PRNGKey(1))
  return config, model, state, steps.make_step(stage, model, config, optimizers)


def _batch(config, pairs: bool):
  rng = np.random.default_rng(0)
  b, s = config.batch_size, config.image_size
  image = lambda: jnp.asarray(rng.normal(size=(b, s, s, 1)).astype(np.float32))
  label = jnp.asarray(rng.integers(0, contract.NUM_CLASSES, b).astype(np.int32))
  if pairs:
    return dict(image_m=image(), image_n=image(), label=label)
  return dict(image=image(), label=label)


def _dtypes(tree) -> set[str]:
  return {str(x.dtype) for x in jax.tree.leaves(tree)}


def _convolution_operand_types(lowered_text: str) -> list[str]:
  """The element types of every convolution's operands in lowered StableHLO."""
  convs = re.findall(r"stablehlo\.convolution.*?:\s*\((tensor<[^)]*)\)\s*->", lowered_text)
  return [",".join(sorted(set(re.findall(r"x(bf16|f16|f32|f64)>", c)))) for c in convs]


def _primitive_dtypes(jaxpr) -> list[tuple[str, str]]:
  """(primitive, dtype of its first input) of every equation, nested jaxprs included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.invars and hasattr(eqn.invars[0].aval, "dtype"):
      found.append((eqn.primitive.name, str(eqn.invars[0].aval.dtype)))
    for param in eqn.params.values():   # jit, custom_vjp, ...: a (Closed)Jaxpr
      inner = getattr(param, "jaxpr", param)
      if hasattr(inner, "eqns"):
        found += _primitive_dtypes(inner)
  return found


@pytest.fixture(scope="module")
def trained():
  """The baseline in bfloat16, NUM_STEPS steps on one repeated batch."""
  config, _, state, step = _setup("baseline")
  batch = _batch(config, pairs=False)
  step = jax.jit(step)
  lowered = step.lower(state, batch)
  step = lowered.compile()   # compiled once; the loop reuses it
  losses, metrics = [], None
  for _ in range(NUM_STEPS):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return dict(state=state, losses=losses, metrics=metrics, hlo=lowered.as_text())


def test_bfloat16_baseline_learns_a_repeated_batch(trained):
  """Catches a half-precision step that does not train (a gradient lost in a
  cast, a NaN from a bfloat16 overflow): cross-entropy on 8 images it sees 20
  times falls well below its start (measured: 2.8 -> 0.1; chance is ln 7 = 1.95)."""
  losses = trained["losses"]
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.5 * losses[0] and losses[-1] < 1.0, losses


def test_parameters_optimizer_state_and_statistics_stay_float32(trained):
  """Catches bfloat16 leaking into what is stored: updates of 1e-3 x lr vanish
  in bfloat16's 8-bit mantissa, and checkpoints would change dtype."""
  state = trained["state"]
  assert _dtypes(state.params) == {"float32"}
  assert _dtypes(state.batch_stats) == {"float32"}
  assert _dtypes(state.opt_state) <= {"float32", "int32"}   # Adam's step count
  assert trained["metrics"]["loss"].dtype == jnp.float32
  # The statistics did move: BatchNorm ran in training mode on this batch.
  _, _, fresh, _ = _setup("baseline")
  assert not all(np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(fresh.batch_stats), jax.tree.leaves(state.batch_stats)))


def test_every_convolution_is_bfloat16_and_none_without_half_precision(trained):
  """Catches half_precision being ignored (the flag read nowhere, or a trunk
  built without its dtype): the compiled baseline step's convolutions, forward
  and backward, all take bfloat16 operands; the float32 model's take none."""
  types = _convolution_operand_types(trained["hlo"])
  assert len(types) > 20 and set(types) == {"bf16"}, types
  config, _, state, step = _setup("baseline", half_precision=False)
  types32 = _convolution_operand_types(
      jax.jit(step).lower(state, _batch(config, pairs=False)).as_text())
  assert len(types32) == len(types) and set(types32) == {"f32"}


def test_stage1_mutual_information_and_batchnorm_statistics_are_float32():
  """Catches the DV bound or BatchNorm computed in bfloat16: every exp, log and
  sum in the stage-1 step (logsumexp of the critics' scores, BatchNorm means and
  variances, their gradients) runs on float32, while its convolutions are bf16."""
  config, _, state, step = _setup("stage1")
  batch = _batch(config, pairs=True)
  jaxpr = jax.make_jaxpr(step)(state, batch).jaxpr
  prims = _primitive_dtypes(jaxpr)
  convs = {d for p, d in prims if p == "conv_general_dilated"}
  assert "bfloat16" in convs
  for name in ("exp", "log", "reduce_sum", "reduce_max", "logistic"):
    used = {d for p, d in prims if p == name}
    assert "bfloat16" not in used, (name, used)
  assert {d for p, d in prims if p in ("exp", "log")} == {"float32"}
  new_state, metrics = jax.eval_shape(step, state, batch)
  assert _dtypes(new_state.params) == _dtypes(new_state.batch_stats) == {"float32"}
  assert {str(metrics[k].dtype) for k in ("loss", "mi_global", "mi_local")} == {"float32"}
