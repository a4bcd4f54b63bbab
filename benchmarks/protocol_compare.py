r"""Variants from different protocol runs, side by side on the same folds.

`experiments.protocol` compares the variants of one invocation. A variant run
later in another workdir (a new setting, trained on the same data, folds and
split) is compared here instead, from each run's protocol.json: one row per
variant with its per-fold mean ± std, then every variant minus the reference
(the first), fold by fold, as a mean and 95% t-interval. Only folds every
variant finished are used, and the script refuses protocols whose splits
(another face set, fold count or split seed) or evaluation settings differ.
The numbers are experiments.protocol's own (`summarize`, `paired_differences`).

  python benchmarks/protocol_compare.py \
      --variant="random init, separable, InfoNCE=runs/protocol_random_init:dicefer" \
      --variant="compute-matched baseline=runs/protocol_confounded:baseline_matched" \
      --variant="random init, concat, DV=runs/protocol_confounded:dicefer_random_init" \
      > docs/results/random_init_confounded.md
"""

import argparse
import json
import os

from experiments import protocol

# experiments.protocol.METRICS keys, with protocol.HEADLINE's headers.
COLUMNS = ("accuracy", "seen_accuracy", "seen_gap", "leakage", "leakage_id", "retrieval")


def _read(spec: str) -> tuple[str, list[dict], dict]:
  """'LABEL=DIR:VARIANT' -> (label, its finished rows renamed LABEL, what must
  match between protocols: split and evaluation settings)."""
  label, sep, rest = spec.partition("=")
  directory, sep2, variant = rest.rpartition(":")
  if not (sep and sep2 and label and directory and variant):
    raise SystemExit(f"--variant={spec!r}: write LABEL=PROTOCOL_DIR:VARIANT")
  path = os.path.join(directory, "protocol.json")
  if not os.path.exists(path):
    raise SystemExit(f"{path} not found: run experiments.protocol there first")
  with open(path) as f:
    report = json.load(f)
  rows = [dict(row, variant=label) for row in protocol._done(report["rows"], variant)]  # pylint: disable=protected-access
  if not rows:
    raise SystemExit(f"{path} has no finished runs of variant {variant!r}")
  setting = dict(kind=report["split_kind"], note=report["split_note"],
                 data_dir=report["data_dir"], eval_settings=report.get("eval_settings"))
  return label, rows, setting


def table(specs: list[str]) -> str:
  read = [_read(spec) for spec in specs]
  settings = {json.dumps(setting, sort_keys=True) for _, _, setting in read}
  if len(settings) > 1:
    raise SystemExit("the protocols were run on different splits or evaluated "
                     "differently: " + " | ".join(sorted(settings)))
  folds = set.intersection(*({r["fold"] for r in rows} for _, rows, _ in read))
  if not folds:
    raise SystemExit("no fold was finished by every variant")
  rows = [r for _, variant_rows, _ in read for r in variant_rows if r["fold"] in folds]
  # The same means and fold-by-fold t-intervals as each protocol's own tables.
  variants = [protocol.Variant(label, "") for label, _, _ in read]
  summary = protocol.summarize(rows, variants)
  paired = protocol.paired_differences(rows, variants)
  split = json.loads(settings.pop())
  k = (split["eval_settings"] or {}).get("retrieval_k", "k")
  headers = {key: header.replace("@k", f"@{k}") for key, header in protocol.HEADLINE}
  present = [key for key in COLUMNS
             if all(summary[v.name][key]["mean"] is not None for v in variants)]
  digits = protocol._digits  # pylint: disable=protected-access
  head = ["| variant | " + " | ".join(headers[key] for key in present) + " |",
          "|---|" + "---|" * len(present)]
  lines = [f"{split['kind']} split ({split['note']}); folds "
           f"{', '.join(map(str, sorted(folds, key=str)))}. Mean ± std over folds:", "",
           *head]
  for v in variants:
    lines.append(f"| {v.name} | " + " | ".join(
        protocol._headline_cell(summary[v.name][key], digits(key))  # pylint: disable=protected-access
        for key in present) + " |")
  lines += ["", f"{variants[0].name} minus each variant, fold by fold: mean [95% "
            "t-interval]", "", *head]
  for v in variants[1:]:
    lines.append(f"| {v.name} | " + " | ".join(
        protocol._headline_difference(paired[v.name].get(key), digits(key))  # pylint: disable=protected-access
        for key in present) + " |")
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", action="append", required=True,
                      help="LABEL=PROTOCOL_DIR:VARIANT; the first is the reference")
  print(table(parser.parse_args().variant), end="")


if __name__ == "__main__":
  main()
