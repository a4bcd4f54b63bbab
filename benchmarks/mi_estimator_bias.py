r"""How far off is the MIG's DV critic? Its error on Gaussians of known MI.

Runs `mi_estimation.calibrate_estimator` (the evaluation's own estimator, same
critic settings) at given code widths and train/validation/held-out sizes,
over several critic seeds, and prints estimate - truth per true MI level. The
defaults are the demo's (64-d z_exp and z_id; the pair term's 1512/504/1344
rows and the identity term's 378/126/336 on its 840 test images).

  python benchmarks/mi_estimator_bias.py [--x_dim=64 --z_dim=64] \
      [--sizes=1512,504,1344] [--seeds=3] [--config.pca_dim=16 ...]
"""

from dicefer_jax import environment  # noqa: F401  (sets XLA/TF flags; must come first)

import dataclasses
import json

from absl import app
from absl import flags
import numpy as np

from dicefer_jax.evaluation import mi_estimation

_X_DIM = flags.DEFINE_integer("x_dim", 64, "Width of x (z_exp).")
_Z_DIM = flags.DEFINE_integer("z_dim", 64, "Width of z (z_exp of the partner, or z_id).")
_SIZES = flags.DEFINE_list("sizes", ["1512", "504", "1344"],
                           "Train, validation and held-out rows.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Critic seeds (each with its own data).")
_OVERRIDES = flags.DEFINE_multi_string(
    "config", [], "CriticSettings field=value, e.g. --config=num_steps=1000.")


def main(argv):
  del argv
  fields = {f.name: f.type for f in dataclasses.fields(mi_estimation.CriticSettings)}
  changes = {}
  for item in _OVERRIDES.value:
    name, _, value = item.partition("=")
    if name not in fields:
      raise app.UsageError(f"--config={item}: no CriticSettings field {name!r}")
    kind = {"int": int, "float": float, "bool": lambda v: v.lower() == "true"}[str(fields[name])]
    changes[name] = kind(value)
  settings = dataclasses.replace(mi_estimation.CriticSettings(), **changes)
  sizes = tuple(int(s) for s in _SIZES.value)
  runs = [mi_estimation.calibrate_estimator(_X_DIM.value, _Z_DIM.value, sizes,
                                            settings=settings, seed=seed)
          for seed in range(_SEEDS.value)]
  rows = []
  for i, level in enumerate(runs[0]["levels"]):
    errors = [r["levels"][i]["error"] for r in runs]
    rows.append(dict(truth=level["truth"], error_mean=float(np.mean(errors)),
                     error_std=float(np.std(errors, ddof=1)) if len(errors) > 1 else 0.0,
                     errors=errors,
                     raw_bounds=[r["levels"][i]["heldout_bound"] for r in runs]))
  print(json.dumps(dict(x_dim=_X_DIM.value, z_dim=_Z_DIM.value, sizes=sizes,
                        correlated_dims=runs[0]["correlated_dims"],
                        settings=settings.as_dict(), levels=rows), indent=2))


if __name__ == "__main__":
  app.run(main)
