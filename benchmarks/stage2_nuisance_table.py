r"""What does stage 2 teach z_id, if not identity? A Markdown table over folds,
from `benchmarks/stage2_identity.py --control --nuisance` lines.

Each line holds, for one fold, the held-out identity probe and the held-out-
people R^2 of each synthetic image's nuisance (pose, lighting, blur, noise;
`data_tools.synthetic_nuisance`) read from z_exp, from z_id at initialisation
(what stage 2 starts from) and from z_id after stage 2. The table gives their
means over the folds and the fold-by-fold change stage 2 made to z_id, with a
95% t-interval:

  for f in 0 1 2 3 4; do
    python benchmarks/stage2_identity.py \
        --workdir=runs/protocol_balanced/dicefer/fold$f --control --nuisance \
        --set=model.id_critic_input=exp_encoder --set=model.id_critic_stage=3 \
        | tail -1 > runs/stage2_nuisance/balanced_fold$f.json
  done
  python benchmarks/stage2_nuisance_table.py runs/stage2_nuisance/balanced_fold*.json
"""

import argparse
import json

import numpy as np
from scipy import stats


def _interval(d: np.ndarray, digits: int = 2, level: float = 0.95) -> str:
  """Mean and t-interval of fold-by-fold differences."""
  if len(d) < 2:
    return f"{d.mean():+.{digits}f}"
  low = high = d.mean()
  if d.std() > 0:
    low, high = stats.t.interval(level, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
  return f"{d.mean():+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def _load(paths):
  lines = []
  for path in paths:
    with open(path) as f:
      line = json.load(f)
    for part in ("id_encoder_at_init", "trained"):
      if "nuisance_r2" not in line.get(part, {}):
        raise SystemExit(f"{path}: no {part}.nuisance_r2: run stage2_identity.py with "
                         "--control --nuisance")
    lines.append(line)
  changes = {tuple(line["changes"]) for line in lines}
  if len(changes) > 1:
    raise SystemExit(f"the lines retrained stage 2 in different settings: {sorted(changes)}")
  return lines


def table(paths, attributes=()) -> str:
  """The table; `attributes`: the rows to show after identity (default: all)."""
  lines = _load(paths)
  untrained = [l["id_encoder_at_init"] for l in lines]
  trained = [l["trained"] for l in lines]
  names = list(trained[0]["nuisance_r2"]["z_id"])
  unknown = sorted(set(attributes) - set(names))
  if unknown:
    raise SystemExit(f"unknown attribute(s) {', '.join(unknown)}: choose from {', '.join(names)}")
  names = [n for n in names if n in attributes] if attributes else names
  column = lambda probes, code, name: np.array([p["nuisance_r2"][code][name] for p in probes])
  changes = " ".join(lines[0]["changes"]) or "the workdirs' own settings"
  out = [f"Stage 2 retrained ({lines[0]['steps']} steps; {changes}) in {len(lines)} "
         "fold(s). Identity: the held-out probe's accuracy (64 PCs); attributes: R^2 of "
         "a ridge read-out on held-out people (0 = no better than their mean).", "",
         "| | z_exp | z_id untrained | z_id after stage 2 | stage 2's change to z_id |",
         "|---|---|---|---|---|"]
  identity = lambda probes, code: np.array([p["pca_matched"][code] for p in probes])
  before, after = identity(untrained, "z_id"), identity(trained, "z_id")
  out.append(f"| identity (accuracy; chance {trained[0]['chance']:.3f}) | "
             f"{identity(trained, 'z_exp').mean():.3f} | {before.mean():.3f} | "
             f"{after.mean():.3f} | {_interval(after - before, digits=3)} |")
  for name in names:
    before, after = column(untrained, "z_id", name), column(trained, "z_id", name)
    out.append(f"| {name} | {column(trained, 'z_exp', name).mean():+.2f} | "
               f"{before.mean():+.2f} | {after.mean():+.2f} | {_interval(after - before)} |")
  return "\n".join(out)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("lines", nargs="+", help="stage2_identity.py output lines (JSON)")
  parser.add_argument("--attributes", default="", help="comma-separated rows to show "
                      "(default: every attribute)")
  args = parser.parse_args()
  print(table(args.lines, [a for a in args.attributes.split(",") if a]))


if __name__ == "__main__":
  main()
