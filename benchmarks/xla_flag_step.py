r"""The baseline's ResNet-18 train step (the one `experiments.benchmark` compares with
PyTorch) under whatever XLA_FLAGS the process gets: for trying XLA:CPU flags.

Run it once per setting, alternating, on an idle machine; each run prints its
flags and the median images/s of its rounds:

  for i in 1 2; do for f in "" "--xla_cpu_use_onednn=true"; do
    XLA_FLAGS="--xla_cpu_experimental_ynn_fusion_type= $f" \
        python benchmarks/xla_flag_step.py
  done; done

(`dicefer_jax.environment` adds its `--xla_cpu_experimental_ynn_fusion_type=` only
when XLA_FLAGS does not set that flag.)
"""

from dicefer_jax import environment  # noqa: F401  (sets XLA/TF flags; must come first)

import argparse
import os
import time

import jax
import numpy as np

from dicefer_jax import contract, models, steps
from experiments import benchmark
from experiments.configs import default


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=6, help="steps per round")
  args = parser.parse_args()
  jax.config.update("jax_enable_compilation_cache", False)  # compile with these flags
  config = default.get_config()
  model = models.build_model(config.model, contract.NUM_CLASSES)
  state = benchmark._baseline_only_state(config, model)  # pylint: disable=protected-access
  rng = np.random.default_rng(0)
  b, s = config.batch_size, config.image_size
  batch = dict(image=rng.normal(size=(b, s, s, 1)).astype(np.float32),
               label=rng.integers(0, contract.NUM_CLASSES, b).astype(np.int32))
  step = jax.jit(steps.make_step("baseline", model, config,
                                 steps.make_optimizers(config.train, "baseline")),
                 donate_argnums=0).lower(state, batch).compile()
  run = benchmark._run_steps  # pylint: disable=protected-access
  state = run(step, state, batch, 2)  # warm-up
  rates = []
  for _ in range(args.rounds):
    start = time.perf_counter()
    state = run(step, state, batch, args.steps)
    rates.append(args.steps * b / (time.perf_counter() - start))
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}: {np.median(rates):.1f} img/s "
        f"(median of {args.rounds} rounds of {args.steps} steps; "
        f"{', '.join(f'{r:.1f}' for r in rates)}); {s} px, width {config.model.width}, "
        f"batch {b}", flush=True)


if __name__ == "__main__":
  main()
