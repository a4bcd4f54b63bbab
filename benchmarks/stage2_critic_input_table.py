r"""Does z_id learn identity when stage 2's critics score a map E_id cannot shape?
A Markdown table over a protocol's folds, from the runs' own output files.

For each fold of a finished protocol (`experiments.protocol`, whose `dicefer`
runs keep their stage-1 checkpoints), `benchmarks/stage2_identity.py` retrains
stage 2 alone from that fold's E_exp with the variant's config and writes one
JSON line; this script reads those lines beside the protocol's protocol.json:

  for f in 0 1 2 3 4; do
    python benchmarks/stage2_identity.py \
        --workdir=runs/protocol_balanced/dicefer/fold$f \
        --set=model.id_critic_input=exp_encoder --set=model.id_critic_stage=2 \
        | tail -1 > runs/stage2_critic_input/balanced_fold$f.json
  done
  python benchmarks/stage2_critic_input_table.py \
      --protocol=runs/protocol_balanced --variant=runs/stage2_critic_input/balanced

Columns, each the held-out identity probe of `experiments.evaluate` (the test
fold's people, 64 principal components; higher = more identity):
- z_exp: the expression code (the same in every column's run: E_exp is frozen);
- z_id untrained: E_id at initialisation, i.e. what stage 2 starts from (the
  protocol's `dicefer_warmup_only` run, which trains stage 2 for 0 steps);
- z_id, own maps: the protocol's `dicefer` run, whose critics scored E_id's own
  maps (the setting the protocol ran with);
- z_id, variant: the retrained stage 2.
The script refuses a variant line whose z_exp probe differs from the protocol's:
then the two did not start from the same E_exp or were not probed alike.
`--against=PREFIX` adds the fold-by-fold difference from another variant's lines.
"""

import argparse
import json
import os

import numpy as np
from scipy import stats


def _protocol_rows(protocol_dir: str) -> dict:
  with open(os.path.join(protocol_dir, "protocol.json")) as f:
    report = json.load(f)
  rows = {}
  for row in report["rows"]:
    if row.get("status") == "done" or row.get("metrics"):
      rows[(row["variant"], int(row["fold"]))] = row["metrics"]
  return rows


def _interval(values, level=0.95) -> str:
  d = np.asarray(values, np.float64)
  if len(d) < 2:
    return f"{d.mean():+.3f}"
  half = stats.t.ppf(0.5 + level / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
  return f"{d.mean():+.3f} [{d.mean() - half:+.3f}, {d.mean() + half:+.3f}]"


def _variant_line(prefix: str, fold: int) -> dict | None:
  path = f"{prefix}_fold{fold}.json"
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def table(protocol_dir: str, variant_prefix: str, against_prefix: str = "") -> str:
  rows = _protocol_rows(protocol_dir)
  folds = sorted(fold for (name, fold) in rows if name == "dicefer")
  per_fold, changes, against_changes = [], None, None
  for fold in folds:
    path = f"{variant_prefix}_fold{fold}.json"
    variant = _variant_line(variant_prefix, fold)
    if variant is None:
      continue
    changes = variant["changes"]
    dicefer, untrained = rows[("dicefer", fold)], rows[("dicefer_warmup_only", fold)]
    probe = variant["trained"]["pca_matched"]
    if abs(probe["z_exp"] - dicefer["leakage"]) > 1e-4:  # the line rounds to 4 places
      raise SystemExit(f"{path}: z_exp probe {probe['z_exp']} is not the protocol's "
                       f"{dicefer['leakage']} for fold {fold}: rerun it from "
                       f"{protocol_dir}/dicefer/fold{fold}")
    per_fold.append(dict(fold=fold, z_exp=dicefer["leakage"],
                         untrained=untrained["leakage_id"], own=dicefer["leakage_id"],
                         variant=probe["z_id"], chance=dicefer["leakage_chance"],
                         mi=variant["curve"][-1]))
    if against_prefix:
      other = _variant_line(against_prefix, fold)
      if other is None:
        raise SystemExit(f"{against_prefix}_fold{fold}.json is missing: --against "
                         "needs a line for every fold the variant has")
      against_changes = other["changes"]
      per_fold[-1]["against"] = other["trained"]["pca_matched"]["z_id"]
  if not per_fold:
    raise SystemExit(f"no {variant_prefix}_fold*.json for the folds of {protocol_dir}")
  cols = ("z_exp", "untrained", "own", "variant")
  lines = [f"Stage 2 retrained with {', '.join(changes)}; chance "
           f"{per_fold[0]['chance']:.3f}.", "",
           "| fold | z_exp | z_id untrained | z_id, own maps | z_id, variant | "
           "variant's last logged I_g, I_l (nats) |", "|---|---|---|---|---|---|"]
  for r in per_fold:
    lines.append(f"| {r['fold']} | " + " | ".join(f"{r[c]:.3f}" for c in cols)
                 + f" | {r['mi']['mi_global']:.2f}, {r['mi']['mi_local']:.2f} |")
  mean = lambda c: np.mean([r[c] for r in per_fold])
  std = lambda c: np.std([r[c] for r in per_fold], ddof=1) if len(per_fold) > 1 else 0.0
  lines.append("| mean ± std | " + " | ".join(f"{mean(c):.3f} ± {std(c):.3f}"
                                              for c in cols) + " | |")
  diff = lambda a, b: _interval([r[a] - r[b] for r in per_fold])
  lines += ["", "z_id with the variant minus ..., fold by fold: mean [95% t-interval]", "",
            "| z_exp | z_id untrained | z_id, own maps |", "|---|---|---|",
            f"| {diff('variant', 'z_exp')} | {diff('variant', 'untrained')} | "
            f"{diff('variant', 'own')} |"]
  if against_prefix:
    lines += ["", f"z_id with the variant minus z_id with {', '.join(against_changes)}: "
              f"{diff('variant', 'against')}"]
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--protocol", required=True, help="a finished protocol's workdir")
  parser.add_argument("--variant", required=True,
                      help="prefix of the variant's lines: PREFIX_fold<k>.json")
  parser.add_argument("--against", default="",
                      help="prefix of another variant's lines, compared fold by fold")
  args = parser.parse_args()
  print(table(args.protocol, args.variant, args.against))


if __name__ == "__main__":
  main()
