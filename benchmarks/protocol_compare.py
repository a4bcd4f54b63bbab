r"""Variants from different protocol runs, side by side on the same folds.

`experiments.protocol` compares the variants of one invocation. A variant run
later in another workdir (a new setting, trained on the same data, folds and
split) is compared here instead, from each run's protocol.json: one row per
variant with its per-fold mean ± std, then every variant minus the reference
(the first), fold by fold, as a mean and 95% t-interval. Only folds every
variant finished are used, and the script refuses protocols whose splits
differ (another face set, fold count or split seed).

  python benchmarks/protocol_compare.py \
      --variant="random init, separable, InfoNCE=runs/protocol_random_init:dicefer" \
      --variant="compute-matched baseline=runs/protocol_confounded:baseline_matched" \
      --variant="random init, concat, DV=runs/protocol_confounded:dicefer_random_init" \
      > docs/results/random_init_confounded.md
"""

import argparse
import json
import os

import numpy as np
from scipy import stats

# (protocol.json metric key, column header, digits)
# (experiments.protocol.METRICS keys.)
COLUMNS = (("accuracy", "accuracy, unseen people", 3),
           ("seen_accuracy", "accuracy, seen people", 3),
           ("seen_gap", "seen - unseen (points)", 1),
           ("leakage", "identity leakage of the expression representation", 3),
           ("leakage_id", "identity leakage of z_id", 3),
           ("retrieval", "retrieval@6", 3))


def _read(spec: str) -> tuple[str, dict, dict]:
  """'LABEL=DIR:VARIANT' -> (label, {fold: metrics}, the protocol's split)."""
  label, sep, rest = spec.partition("=")
  directory, sep2, variant = rest.rpartition(":")
  if not (sep and sep2 and label and directory and variant):
    raise SystemExit(f"--variant={spec!r}: write LABEL=PROTOCOL_DIR:VARIANT")
  path = os.path.join(directory, "protocol.json")
  if not os.path.exists(path):
    raise SystemExit(f"{path} not found: run experiments.protocol there first")
  with open(path) as f:
    report = json.load(f)
  folds = {row["fold"]: row["metrics"] for row in report["rows"]
           if row["variant"] == variant and row.get("status") in ("ran", "reused")}
  if not folds:
    raise SystemExit(f"{path} has no finished runs of variant {variant!r}")
  split = dict(kind=report["split_kind"], note=report["split_note"],
               data_dir=report["data_dir"])
  return label, folds, split


def _mean_std(values, digits: int) -> str:
  v = np.asarray(values, np.float64)
  return f"{v.mean():.{digits}f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.{digits}f}"


def _interval(values, digits: int) -> str:
  d = np.asarray(values, np.float64)
  if len(d) < 2:
    return f"{d.mean():+.{digits}f}"
  half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
  return f"{d.mean():+.{digits}f} [{d.mean() - half:+.{digits}f}, {d.mean() + half:+.{digits}f}]"


def table(specs: list[str]) -> str:
  variants = [_read(spec) for spec in specs]
  splits = {json.dumps(split, sort_keys=True) for _, _, split in variants}
  if len(splits) > 1:
    raise SystemExit("the protocols were run on different splits: "
                     + " | ".join(sorted(splits)))
  folds = sorted(set.intersection(*(set(f) for _, f, _ in variants)), key=str)
  if not folds:
    raise SystemExit("no fold was finished by every variant")
  present = [c for c in COLUMNS
             if all(f[fold].get(c[0]) is not None for _, f, _ in variants for fold in folds)]
  split = json.loads(splits.pop())
  lines = [f"{split['kind']} split ({split['note']}); folds {', '.join(map(str, folds))}. "
           "Mean ± std over folds:", "",
           "| variant | " + " | ".join(header for _, header, _ in present) + " |",
           "|---|" + "---|" * len(present)]
  for label, f, _ in variants:
    lines.append(f"| {label} | " + " | ".join(
        _mean_std([f[fold][key] for fold in folds], digits)
        for key, _, digits in present) + " |")
  reference, ref_folds, _ = variants[0]
  lines += ["", f"{reference} minus each variant, fold by fold: mean [95% t-interval]", "",
            "| variant | " + " | ".join(header for _, header, _ in present) + " |",
            "|---|" + "---|" * len(present)]
  for label, f, _ in variants[1:]:
    lines.append(f"| {label} | " + " | ".join(
        _interval([ref_folds[fold][key] - f[fold][key] for fold in folds], digits)
        for key, _, digits in present) + " |")
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", action="append", required=True,
                      help="LABEL=PROTOCOL_DIR:VARIANT; the first is the reference")
  print(table(parser.parse_args().variant), end="")


if __name__ == "__main__":
  main()
