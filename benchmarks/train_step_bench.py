r"""Training throughput of each stage's jit-compiled step (images/s), no input pipeline.

  python benchmarks/train_step_bench.py                       # the paper's size
  python benchmarks/train_step_bench.py --config=experiments/configs/demo.py

Prints compile time and steady-state images/s (pairs count as two images) per stage.
"""

from dicefer_jax import environment  # noqa: F401  (sets XLA/TF flags; must come first)

import time

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from dicefer_jax import contract, models, steps, train

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/default.py")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per stage (after compilation).")
_STAGES = flags.DEFINE_list("stages", ["stage1", "stage2", "stage3", "baseline"], "Stages.")


def main(_):
  config = _CONFIG.value
  model = models.build_model(config.model, contract.NUM_CLASSES)
  replicated, data_sharding = train.make_shardings()
  b, s = config.batch_size, config.image_size
  rng = np.random.default_rng(0)
  pair = dict(image_m=rng.normal(size=(b, s, s, 1)).astype(np.float32),
              image_n=rng.normal(size=(b, s, s, 1)).astype(np.float32),
              label=rng.integers(0, 7, b).astype(np.int32))
  single = dict(image=pair["image_m"], label=pair["label"])
  print(f"{jax.device_count()} x {jax.devices()[0].device_kind}, batch {b}, {s} px, "
        f"width {config.model.width}")
  for stage in _STAGES.value:
    state = jax.device_put(train.initial_state(stage, config, model), replicated)
    step = jax.jit(steps.make_step(stage, model, config,
                                   steps.make_optimizers(config.train, stage)),
                   donate_argnums=0)
    batch = jax.device_put(pair if stage in steps.PAIR_STAGES else single, data_sharding)
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(_STEPS.value):
      state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    per_step = (time.perf_counter() - t0) / _STEPS.value
    images = b * (2 if stage in steps.PAIR_STAGES else 1)
    print(f"{stage:9s} compile {compile_s:6.1f} s | {per_step * 1e3:8.1f} ms/step | "
          f"{images / per_step:8.1f} images/s")


if __name__ == "__main__":
  app.run(main)
