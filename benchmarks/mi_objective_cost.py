r"""What each MI objective (`loss.estimator`) costs a training step: XLA's FLOP count
and temporary memory of the compiled stage-1 / stage-2 step, per estimator.

InfoNCE scores every image against every code of the batch (B x B pairs), so its
concat critics cost B times DV's; the global critic is a small MLP, the local one
runs its 1x1 convs at every position of the map. Separable critics
(`--config.model.critic=separable`) embed each image and each code once and
score all pairs with one matmul, whatever the estimator. This compiles (never runs) the steps
at a config's sizes, on whatever device JAX has, and prints one JSON line each.

  python benchmarks/mi_objective_cost.py [--config=experiments/configs/default.py] \
      [--stages=stage1,stage2] [--estimators=dv,jsd,infonce] [--config.batch_size=32]
"""

from dicefer_jax import environment  # noqa: F401  (sets XLA/TF flags; must come first)

import json
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from dicefer_jax import contract, models, steps

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/default.py")
_STAGES = flags.DEFINE_list("stages", ["stage1", "stage2"], "Pair stages to compile.")
_ESTIMATORS = flags.DEFINE_list("estimators", ["dv", "jsd", "infonce"], "Objectives.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  base = _CONFIG.value
  model = models.build_model(base.model, contract.NUM_CLASSES)
  params, batch_stats = jax.eval_shape(
      lambda: models.init_variables(model, jax.random.PRNGKey(0), base.image_size))
  b, s = base.batch_size, base.image_size
  image = jax.ShapeDtypeStruct((b, s, s, 1), jnp.float32)
  batch = dict(image_m=image, image_n=image,
               label=jax.ShapeDtypeStruct((b,), jnp.int32))
  for stage in _STAGES.value:
    for estimator in _ESTIMATORS.value:
      config = base.copy_and_resolve_references()
      config.loss.estimator = estimator
      optimizers = steps.make_optimizers(config.train, stage)
      state = jax.eval_shape(lambda: steps.create_state(
          stage, params, batch_stats, optimizers, jax.random.PRNGKey(0)))
      started = time.time()
      critic_encoder = "id_encoder" if stage == "stage2" else "exp_encoder"
      compiled = jax.jit(steps.make_step(stage, model, config, optimizers)).lower(
          state, batch).compile()
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      memory = compiled.memory_analysis()
      print(json.dumps(dict(
          stage=stage, estimator=estimator, batch_size=b, image_size=s,
          width=config.model.width, critic=config.model.critic,
          # The critic stages this stage's critics score (and, in stage 2, whose map).
          local_stage=getattr(model, critic_encoder).local_stage,
          global_stage=getattr(model, critic_encoder).global_stage,
          **({"id_critic_input": config.model.id_critic_input}
             if stage == "stage2" else {}),
          gflops=round(float(cost.get("flops", float("nan"))) / 1e9, 1),
          temp_mib=round(getattr(memory, "temp_size_in_bytes", 0) / 2**20, 1),
          compile_s=round(time.time() - started, 1))), flush=True)


if __name__ == "__main__":
  app.run(main)
