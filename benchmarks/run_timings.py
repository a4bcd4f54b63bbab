r"""Where a training run's wall time went, per stage, as a Markdown table.

Reads the `timings_s` that `experiments.run` writes into a workdir's
train_metrics.json (dicefer_jax.train.train_stage documents the parts):

  python benchmarks/run_timings.py runs/demo/train_metrics.json
"""

import json
import sys

PARTS = ("setup", "first_step", "steps", "checkpoints")


def table(timings: dict) -> str:
  lines = ["| stage | total (s) | setup | first step (compiling) | other steps | "
           "checkpoints | unaccounted |", "|---|---|---|---|---|---|---|"]
  for stage, t in timings.items():
    if set(t) == {"total"}:  # test accuracy: one prediction pass
      lines.append(f"| {stage.replace('_', ' ')} | {t['total']:.1f} | | | | | |")
      continue
    rest = t["total"] - sum(t.get(p, 0.0) for p in PARTS)
    lines.append(f"| {stage} | {t['total']:.1f} | "
                 + " | ".join(f"{t.get(p, 0.0):.1f}" for p in PARTS) + f" | {rest:.1f} |")
  return "\n".join(lines)


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit("usage: python benchmarks/run_timings.py WORKDIR/train_metrics.json")
  with open(sys.argv[1]) as f:
    print(table(json.load(f)["timings_s"]))
