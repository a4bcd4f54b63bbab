r"""Stage 1 from random weights, per MI estimator: the curves, from the runs' own logs.

Plots, against the step, what each stage-1 run logged in its metrics.jsonl: the DV
estimate of the global and local cross-MI terms (`mi_global`, `mi_local`, logged
as DV whatever objective trains), the local term's trained objective
(`objective_local`: the DV, JSD or InfoNCE value; the DV estimate on an
InfoNCE-trained separable critic is loose far below it, tests/test_mi.py) and
the L1 distance between the pair's codes (`l1`: near 0 when the codes have
collapsed to one point). Runs (demo size), with each critic form:

  for c in concat separable; do for e in dv jsd infonce; do
    python -m experiments.run --config=experiments/configs/demo.py \
        --workdir=runs/random_init_${c}_$e --stage=1 --config.stage1.init_from= \
        --config.model.critic=$c --config.loss.estimator=$e \
        --config.stage1.num_steps=600 --config.log_every=20
  done; done
  python benchmarks/random_init_curves.py \
      --runs="concat DV=runs/random_init_concat_dv,concat JSD=runs/random_init_concat_jsd,\
concat InfoNCE=runs/random_init_concat_infonce,separable DV=runs/random_init_separable_dv,\
separable JSD=runs/random_init_separable_jsd,\
separable InfoNCE=runs/random_init_separable_infonce" \
      [--reference="warm start=runs/demo"] --out=docs/random_init_curves.png
"""

import json
import os

from absl import app
from absl import flags
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

_RUNS = flags.DEFINE_list("runs", None, "LABEL=WORKDIR of each stage-1 run.", required=True)
_REFERENCE = flags.DEFINE_list("reference", [], "LABEL=WORKDIR drawn dashed (e.g. the "
                               "warm-started demo).")
_OUT = flags.DEFINE_string("out", None, "Where the PNG goes.", required=True)

PANELS = (("mi_global", "global cross-MI, DV (nats)"),
          ("mi_local", "local cross-MI, DV (nats)"),
          ("objective_local", "local term as trained (DV, JSD or InfoNCE)"),
          ("l1", "L1 between z_M and z_N"))


def stage1_rows(workdir: str) -> list[dict]:
  """The stage-1 rows of a workdir's metrics.jsonl, in step order."""
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return sorted((r for r in rows if r.get("stage") == "stage1" and "l1" in r),
                key=lambda r: r["step"])


def _pairs(specs):
  out = []
  for spec in specs:
    label, sep, workdir = spec.partition("=")
    if not sep:
      raise app.UsageError(f"{spec!r}: write LABEL=WORKDIR")
    out.append((label, workdir))
  return out


def main(argv):
  del argv
  fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4))
  for (label, workdir), dashed in ([(r, False) for r in _pairs(_RUNS.value)]
                                   + [(r, True) for r in _pairs(_REFERENCE.value)]):
    rows = stage1_rows(workdir)
    if not rows:
      raise app.UsageError(f"{workdir}: no stage-1 rows in metrics.jsonl")
    steps = [r["step"] for r in rows]
    for ax, (key, _) in zip(axes, PANELS):
      ax.plot(steps, [r[key] for r in rows], "--" if dashed else "-", label=label)
  for ax, (_, title) in zip(axes, PANELS):
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("stage-1 step")
  # Beside the panels, not over a curve.
  axes[-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
  fig.tight_layout()
  fig.savefig(_OUT.value, dpi=110, bbox_inches="tight")
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
