r"""The subject-independent protocol: every method, variant and fold, and one table.

  python -m experiments.protocol --config=experiments/configs/demo.py --folds=3 \
      --workdir=runs/protocol [--methods=dicefer,baseline] \
      [--sweep=loss.zeta=0.005,0.01,0.025] [--ablations=no_swap,delta0,no_stage2] \
      [--config.FIELD=VALUE ...] [--config.eval.mig.num_seeds=3 ...]

Each (variant, fold) trains and evaluates in its own workdir,
DIR/<variant>/fold<i> (DIR/<variant>/official when the data ships an official
split, which is then used once instead of folds), through experiments.run.run
and experiments.evaluate.evaluate in this process, which reads and decodes the
face set once for all of them. Variants:

- `dicefer`, `baseline`: the methods (--methods), on the given config;
- `<method>_<field>=<value>`: one per --sweep value (the baseline is swept only
  when the field can change it: it ignores loss.*, stage1-3.* and the critics);
- `dicefer_<ablation>`: DICE-FER with one ingredient off (--ablations; the table
  is experiments/configs/ablations.py).

DIR/protocol.md and DIR/protocol.json hold the mean and std over folds of each
metric per variant, and the per-fold rows; DIR/headline.md the claim's metrics
(accuracy on unseen and seen people, identity leakage) in two short tables for a
README. All are rewritten after every run.
An interrupted protocol continues where it stopped when rerun with the same
flags: a run whose eval/metrics.json matches its config and evaluation settings
is reused, a partly trained one resumes from its checkpoints.
"""

from dicefer_jax import environment  # sets XLA/TF flags: must come first

import dataclasses
import json
import os
import time
from typing import Callable, Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np
from scipy import stats

from dicefer_jax import checkpoints, config_fields, fileio, splits, train
from dicefer_jax import data as data_lib
from dicefer_jax import workdir as workdir_lib
from dicefer_jax.errors import UserError
from dicefer_jax.evaluation import common as eval_common
from dicefer_jax.evaluation import evaluator
from experiments import cli
from experiments import evaluate as evaluate_lib
from experiments import face_sets
from experiments import run as run_lib
from experiments.configs import ablations as ablations_lib
from experiments.configs import default

_CONFIG = cli.define_config_file(
    "config", "experiments/configs/default.py", "Training config file; its `eval` "
    "block sets the evaluation.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of every run and the table.")

_FOLDS = flags.DEFINE_integer(
    "folds", None, "Number of subject-held-out folds (default: config.num_folds). "
    "Ignored when the data has an official split.")
_METHODS = flags.DEFINE_list("methods", ["dicefer", "baseline"], "Methods to run.")
_SWEEP = flags.DEFINE_string(
    "sweep", "", "FIELD=V1,V2,...: one variant per value of a config field, "
    "e.g. loss.zeta=0.005,0.01,0.025.")
_ABLATIONS = flags.DEFINE_list(
    "ablations", [], f"DICE-FER ablations to add: {','.join(ablations_lib.ABLATIONS)}.")
_CONTROLS = flags.DEFINE_list(
    "controls", [], "Fair-comparison controls to add: baseline_matched (the baseline "
    "with as many encoder updates as warm-up plus stage 1), warmup_only (stage 3 on "
    "the warm-up alone), random_init (DICE-FER from random weights).")
_COMPILATION_CACHE = flags.DEFINE_bool(
    "compilation_cache", True, "Keep compiled XLA programs in <cache root>/jax_cache, "
    "so that every fold after the first (and a rerun) skips most compilation (also "
    "off with DICEFER_COMPILATION_CACHE=0).")

METHODS = ("dicefer", "baseline")
# Config fields the baseline never reads: sweeping them re-runs DICE-FER only.
DICEFER_ONLY = ("loss.", "stage1.", "stage2.", "stage3.", "train.disc_", "model.exp_dim",
                "model.id_dim", "model.normalize_code",
                "model.disc_hidden", "model.local_stage", "model.global_stage",
                "model.id_critic_", "model.critic",  # prefixes: also critic_hidden
                "model.classifier_")
def _get(m: dict, *path):
  """m[path[0]][path[1]]..., or None when any step is missing or null."""
  for key in path:
    if not isinstance(m, dict) or m.get(key) is None:
      return None
    m = m[key]
  return m


def _critic_error(m: dict, term: str):
  """The MI critic's measured error (estimate - truth, nats) on Gaussians of known
  MI log 7 at the sizes of the metrics' `term` (mig.calibration), or None."""
  levels = _get(m, "mig", "calibration", term, "levels") or []
  return levels[-1].get("error") if levels else None


# (key, column header, extractor from metrics.json). "Expression representation"
# = z_exp for DICE-FER, the pooled feature for the baseline.
METRICS = (
    ("accuracy", "accuracy", lambda m: _get(m, "accuracy")),
    ("macro_f1", "macro-F1", lambda m: _get(m, "macro_f1")),
    ("seen_accuracy", "accuracy seen people",
     lambda m: _get(m, "seen_vs_unseen", "seen_accuracy")),
    ("seen_gap", "seen - unseen (points)",
     lambda m: _get(m, "seen_vs_unseen", "gap_points")),
    ("mig", "MIG", lambda m: _get(m, "mig", "mean")),
    ("pair_mi", "I(M;N) expr.",
     lambda m: _get(m, "mig", "terms", _get(m, "mig", "representation_pair") or "", "mean")),
    ("exp_id_mi", "I(z_exp;z_id)", lambda m: _get(m, "mig", "terms", "exp_id", "mean")),
    ("feature_pair_mi", "I(M;N) feature",
     lambda m: _get(m, "mig", "terms", "feature_pair", "mean")),
    ("leakage", "leakage expr.", lambda m: _get(m, "identity_leakage", "accuracy")),
    ("leakage_feature", "leakage feature",
     lambda m: _get(m, "identity_leakage", "probes", "feature", "accuracy")),
    ("leakage_id", "leakage z_id",
     lambda m: _get(m, "identity_leakage", "probes", "z_id", "accuracy")),
    ("leakage_chance", "leakage chance", lambda m: _get(m, "identity_leakage", "chance")),
    ("pair_mi_plugin", "I(M;N) plug-in bound",
     lambda m: _get(m, "mig", "terms", _get(m, "mig", "representation_pair") or "",
                    "plugin_bound", "mean")),
    ("critic_error_log7", "critic error at log 7",
     lambda m: _critic_error(m, _get(m, "mig", "representation_pair") or "")),
    ("retrieval", "retrieval expr.", lambda m: _get(m, "retrieval", "precision_at_k")),
    ("retrieval_chance", "retrieval chance", lambda m: _get(m, "retrieval", "chance")),
)


@dataclasses.dataclass(frozen=True)
class Variant:
  """One line of the table: a method and the config overrides that make it."""

  name: str
  method: str
  overrides: tuple = ()   # ((dotted field, value), ...)
  # The METRICS keys it can change; None = all. The others equal the reference
  # variant's by construction and are not tabulated (ablations.MOVES).
  moves: tuple | None = None


# Controls that make the comparison fair (--controls). DICE-FER's demo starts
# from the supervised warm-up the baseline is and then trains stage 1 too: the
# compute-matched baseline gets as many encoder updates as warm-up plus stage 1;
# the warm-up-only control skips stages 1 and 2 (stage 3 alone on the warm-up's
# code), so what stage 1 adds is measured; random_init is DICE-FER as written.
CONTROLS = ("baseline_matched", "warmup_only", "random_init")


def control_variant(config, name: str) -> Variant:
  """The variant of control `name` for the protocol's base config."""
  if name not in CONTROLS:
    raise UserError(f"unknown control {name!r}: use some of {', '.join(CONTROLS)}")
  warm = config.stage1.init_from == "baseline"
  if name == "baseline_matched":
    steps = (int(config.baseline.num_steps) if warm else 0) + int(config.stage1.num_steps)
    return Variant(name, "baseline", (("baseline.num_steps", steps),))
  if not warm:
    raise UserError(f"--controls={name} compares against the supervised warm-up, but the "
                    "config starts stage 1 from random weights: use "
                    "--config.stage1.init_from=baseline (as demo.py does) or drop it")
  if name == "warmup_only":
    return Variant("dicefer_warmup_only", "dicefer",
                   (("stage1.num_steps", 0), ("stage2.num_steps", 0)))
  return Variant("dicefer_random_init", "dicefer", (("stage1.init_from", ""),))


def _parse_value(field: str, current, text: str):
  """`text` as a value of the type of the field's current value."""
  try:
    if isinstance(current, bool):
      lowered = text.strip().lower()
      if lowered not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(text)
      return lowered in ("true", "1", "yes")
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float):
      return float(text)
    if isinstance(current, str):
      return text
  except ValueError:
    raise UserError(f"--sweep value {text!r} is not a valid {type(current).__name__} "
                    f"for {field}") from None
  raise UserError(f"--sweep cannot vary {field} (a {type(current).__name__}): sweep a "
                  "number, bool or string field")


def parse_sweep(text: str, config) -> tuple[str, list[tuple[str, object]]]:
  """'FIELD=V1,V2' -> (FIELD, [(text, value), ...]); ('', []) for ''."""
  if not text:
    return "", []
  field, sep, values = text.partition("=")
  field = field.strip()
  tokens = [v.strip() for v in values.split(",") if v.strip()]
  if not sep or not field or not tokens:
    raise UserError(f"--sweep={text!r} is malformed: use FIELD=V1,V2,... "
                    "(e.g. --sweep=loss.zeta=0.005,0.01,0.025)")
  try:
    current = config_fields.get_field(config, field)
  except KeyError:
    raise UserError(f"--sweep field {field!r} does not exist in the config") from None
  if len(set(tokens)) != len(tokens):
    raise UserError(f"--sweep={text!r} repeats a value")
  return field, [(t, _parse_value(field, current, t)) for t in tokens]


def make_variants(config, methods: Sequence[str], sweep: str = "",
                  ablations: Sequence[str] = (), controls: Sequence[str] = ()
                  ) -> list[Variant]:
  """The variants of a protocol, in table order."""
  unknown = [m for m in methods if m not in METHODS]
  if unknown or not methods:
    raise UserError(f"--methods={','.join(methods)} is invalid: use some of "
                    f"{','.join(METHODS)}")
  bad = [a for a in ablations if a not in ablations_lib.ABLATIONS]
  if bad:
    raise UserError(f"unknown ablation(s) {', '.join(bad)}: use some of "
                    f"{', '.join(ablations_lib.ABLATIONS)}")
  field, values = parse_sweep(sweep, config)
  variants = []
  for method in methods:
    swept = values and (method == "dicefer" or not field.startswith(DICEFER_ONLY))
    if swept:
      # The value as typed names the directory ('/' would nest it).
      variants += [Variant(f"{method}_{field}={token.replace(os.sep, '_')}", method,
                           ((field, value),))
                   for token, value in values]
    else:
      variants.append(Variant(method, method))
  for name in ablations:
    variants.append(Variant(f"dicefer_{name}", "dicefer",
                            tuple(ablations_lib.ABLATIONS[name].items()),
                            ablations_lib.MOVES.get(name)))
  variants += [control_variant(config, name) for name in controls]
  return variants


def fold_plan(config, records, folds: int | None) -> tuple[str, list]:
  """(split kind, fold ids): [None] for an official split, else 0..folds-1.

  Checks that the data can fill that many folds before anything trains.
  """
  kind = splits.split_kind(records)
  if kind == "official":
    return kind, [None]
  num_folds = int(config.num_folds if folds is None else folds)
  splits.fold_assignments(records, num_folds=num_folds, seed=config.split_seed)
  return kind, list(range(num_folds))


def _split_note(kind: str, num_folds: int, seed: int) -> str:
  if kind == "official":
    return "The data's official train/test split, used once (no folds)."
  if kind == "subject":
    return (f"Subject-held-out {num_folds}-fold cross-validation (seed {seed}): every "
            "test fold holds out whole people.")
  if kind == splits.SUBJECT_PINNED:
    return (f"Subject-held-out {num_folds}-fold cross-validation (seed {seed}) over the "
            "subjects the manifest does not pin: those marked split=train are in "
            "training in every fold, so every test fold holds out whole people of the "
            "other group only.")
  if kind == "stratified":
    return (f"Subject ids are missing, so the {num_folds} folds are over images "
            "(stratified by expression): test people may also appear in training, "
            "and the protocol is NOT subject-independent.")
  return (f"{num_folds}-fold cross-validation (seed {seed}) over whole known subjects; "
          "images without a subject id are spread over the folds one by one.")


def run_config(config, variant: Variant, fold, num_folds: int):
  c = config.copy_and_resolve_references()
  c.method = variant.method
  if fold is not None:
    c.num_folds = num_folds
    c.fold = fold
  for field, value in variant.overrides:
    config_fields.set_field(c, field, value)
  return c


def run_dir(workdir: str, variant: Variant, fold) -> str:
  return os.path.join(workdir, variant.name, "official" if fold is None else f"fold{fold}")


def reusable_metrics(config, workdir: str) -> dict | None:
  """The run's metrics.json if it is finished for THIS config and its evaluation
  settings, else None (then it is trained on and/or evaluated again)."""
  metrics_path = workdir_lib.eval_metrics_path(workdir)
  if not (os.path.exists(metrics_path) and os.path.exists(workdir_lib.config_path(workdir))):
    return None
  saved = workdir_lib.read_config(workdir, default.get_config())
  if any(config_fields.changes_results(f) for f in config_fields.differences(saved, config)):
    return None
  with open(metrics_path) as f:
    metrics = json.load(f)
  settings = evaluator.EvalSettings.from_config(config.eval).as_dict()
  if metrics.get("eval_settings") != json.loads(json.dumps(settings)):
    return None
  return metrics


def adopt_warmup(config, workdir: str, candidates: Sequence[str]) -> str | None:
  """Copies a warm-up trained by another run into `workdir` instead of training it
  again.

  DICE-FER's warm-up (`stage1.init_from="baseline"`) and the baseline method are
  the same "baseline" stage; so are the warm-ups of every DICE-FER variant that
  differs only in what comes after it (losses, later stages). A shorter one is a
  prefix of a longer one (batch b depends only on the seed, the stage and b, and
  a resumed stage continues exactly), so the compute-matched baseline continues
  from the warm-up rather than starting over. The donor's saved config must
  train the very same stage (`config_fields.same_baseline_stage`) up to its
  length; the one with the most steps is taken. Returns the donor's workdir, or
  None (nothing to adopt: `workdir` needs no warm-up, has one already, or no
  donor fits).
  """
  if ("baseline" not in train.stages_for(config, "all")
      or checkpoints.has_checkpoint(workdir, "baseline")):
    return None
  final_step = int(config.baseline.num_steps)
  best, best_step = None, 0
  for donor in candidates:
    if (os.path.abspath(donor) == os.path.abspath(workdir)
        or not os.path.exists(workdir_lib.config_path(donor))):
      continue
    step = checkpoints.latest_step(donor, "baseline")
    if step is None or not best_step < step <= final_step:
      continue
    saved = workdir_lib.read_config(donor, default.get_config())
    saved.baseline.num_steps = final_step  # its steps are the first `step` of ours
    if config_fields.same_baseline_stage(saved, config):
      best, best_step = donor, step
  if best is None:
    return None
  # The config first: a workdir's checkpoints are only ever read with it.
  workdir_lib.save_config(config, workdir, default.get_config())
  checkpoints.copy_final(best, workdir, "baseline")
  return best


def _timings(seconds: float, train_summary: dict | None, metrics: dict | None) -> dict:
  """Where a run's time went: training steps, evaluation, and everything else
  (data, initialising, compiling, checkpoints, test predictions)."""
  stages = (train_summary or {}).get("timings_s") or {}
  steps = sum(t.get("steps", 0.0) for t in stages.values())
  evaluation = ((metrics or {}).get("timings_s") or {}).get("total", 0.0)
  return dict(total=round(seconds, 1), steps=round(steps, 1),
              evaluation=round(evaluation, 1),
              other=round(seconds - steps - evaluation, 1))


def _done(rows: list[dict], name: str) -> list[dict]:
  return [r for r in rows if r["variant"] == name and r["status"] in ("ran", "reused")]


def _moves(v: Variant, key: str) -> bool:
  return v.moves is None or key in v.moves


def summarize(rows: list[dict], variants: Sequence[Variant]) -> dict:
  """{variant: {metric: {mean, std, n}}} over the finished folds (std with ddof=1).

  A metric a variant cannot move (Variant.moves) is not averaged: it is marked
  `same_as` the reference variant (the first one), whose value it is.
  """
  summary = {}
  for v in variants:
    done = _done(rows, v.name)
    summary[v.name] = {
        key: (eval_common.mean_std([r["metrics"].get(key) for r in done])
              if _moves(v, key) else dict(mean=None, std=None, n=0,
                                          same_as=variants[0].name))
        for key, _, _ in METRICS}
    summary[v.name]["folds_done"] = len(done)
  return summary


def paired_differences(rows: list[dict], variants: Sequence[Variant],
                       level: float = 0.95) -> dict:
  """{variant: {metric: ...}}: the reference (first) variant minus each other one,
  fold by fold, over the folds where both have the metric.

  Each entry holds the per-fold differences, their mean and a `level` t-interval
  of the mean (n - 1 degrees of freedom; needs 2 folds or more). Pairing by fold
  removes what the folds share (their test people, their split), so the
  interval is about the methods, not about which people were held out.
  """
  reference = variants[0]
  ref_rows = {r["fold"]: r["metrics"] for r in _done(rows, reference.name)}
  out = {}
  for v in variants[1:]:
    out[v.name] = {}
    for key, _, _ in METRICS:
      if not _moves(v, key):
        continue
      diffs = []
      for r in _done(rows, v.name):
        ours, theirs = (ref_rows.get(r["fold"]) or {}).get(key), r["metrics"].get(key)
        if ours is not None and theirs is not None:
          diffs.append((r["fold"], ours - theirs))
      if not diffs:
        continue
      d = np.array([x for _, x in diffs], np.float64)
      entry = dict(n=len(d), mean=float(d.mean()), per_fold=dict(diffs),
                   low=None, high=None, level=level)
      if len(d) >= 2:
        half = (stats.t.ppf(0.5 + level / 2, len(d) - 1) * d.std(ddof=1)
                / np.sqrt(len(d)))
        entry.update(low=float(d.mean() - half), high=float(d.mean() + half))
      out[v.name][key] = entry
  return out


def _fmt(x, std=None) -> str:
  if x is None:
    return "n/a"
  return f"{x:.3f}" if std is None else f"{x:.3f} ± {std:.3f}"


# headline.md's columns: (METRICS key, header). The claim is about these.
HEADLINE = (
    ("accuracy", "accuracy, unseen people"),
    ("seen_accuracy", "accuracy, seen people"),
    ("seen_gap", "seen - unseen (points)"),
    ("leakage", "identity leakage of the expression representation"),
    ("leakage_id", "identity leakage of z_id"),
    ("retrieval", "retrieval@k"),
    ("pair_mi_plugin", "I(M;N) plug-in bound (nats)"),
)
# Paired differences shown: the claim's three (accuracy, gap, leakage).
HEADLINE_PAIRED = ("accuracy", "seen_gap", "leakage")


def _headline_cell(stats: dict | None, digits: int) -> str:
  if not stats:
    return "n/a"
  if stats.get("same_as"):
    return f"= {stats['same_as']}"
  if stats.get("mean") is None:
    return "n/a"
  if stats.get("std") is None:
    return f"{stats['mean']:.{digits}f}"
  return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _digits(key: str) -> int:
  return 1 if key == "seen_gap" else 3


def _chance(report: dict, key: str) -> str:
  means = [s.get(key, {}).get("mean") for s in report["summary"].values()]
  means = [m for m in means if m is not None]
  return f"{sum(means) / len(means):.3f}" if means else "n/a"


def _headline_difference(e: dict | None, digits: int) -> str:
  if e is None:
    return "n/a"
  if e.get("low") is None:
    return f"{e['mean']:+.{digits}f}"
  return f"{e['mean']:+.{digits}f} [{e['low']:+.{digits}f}, {e['high']:+.{digits}f}]"


def headline_markdown(report: dict) -> str:
  """headline.md: the claim's metrics in two short tables (means ± std over folds;
  the first variant minus each other one, fold by fold), for a README."""
  folds = len(report["folds"])
  k = report["eval_settings"]["retrieval_k"]
  headers = [h.replace("@k", f"@{k}") for _, h in HEADLINE]
  lines = [f"{report['split_kind']} split, {folds} folds; runs finished "
           f"{report['runs_done']} of {report['runs_total']}. Mean ± std over folds:", "",
           "| variant | folds | " + " | ".join(headers) + " |",
           "|" + "---|" * (len(HEADLINE) + 2)]
  for v in report["variants"]:
    s = report["summary"][v["name"]]
    lines.append(f"| {v['name']} | {s['folds_done']}/{folds} | " + " | ".join(
        _headline_cell(s.get(key), _digits(key)) for key, _ in HEADLINE) + " |")
  lines += ["", "Chance: accuracy 1/7 = 0.143 (uniform guessing), identity leakage "
            f"{_chance(report, 'leakage_chance')} (majority subject), retrieval "
            f"{_chance(report, 'retrieval_chance')}."]
  paired = {name: p for name, p in (report.get("paired") or {}).items() if p}
  if paired:
    keys = [key for key, _ in HEADLINE if key in HEADLINE_PAIRED]
    lines += ["", f"{report['variants'][0]['name']} minus each variant, fold by fold: "
              "mean difference [95% t-interval]; an interval that excludes 0 is a "
              "difference the folds agree on.", "",
              "| variant | folds | " + " | ".join(report["metrics"][key] for key in keys)
              + " |", "|" + "---|" * (len(keys) + 2)]
    for name, per_metric in paired.items():
      n = max(e["n"] for e in per_metric.values())
      lines.append(f"| {name} | {n} | " + " | ".join(
          _headline_difference(per_metric.get(key), _digits(key)) for key in keys) + " |")
  return "\n".join(lines)


def markdown(report: dict) -> str:
  """protocol.md: the summary table, the per-fold rows and how to read them."""
  variants = report["variants"]
  headers = [h for _, h, _ in METRICS]
  lines = [f"# Protocol: {report['split_kind']} split, "
           f"{len(report['folds'])} fold(s)", "",
           f"Data: `{report['data_dir']}`. {report['split_note']}", "",
           f"Runs finished: {report['runs_done']} of {report['runs_total']}"
           f"{'' if report['complete'] else ' (incomplete: rerun the same command to continue)'}.",
           "", "## Mean ± std over folds (std with ddof=1)", "",
           "| variant | folds | " + " | ".join(headers) + " |",
           "|" + "---|" * (len(headers) + 2)]
  for v in variants:
    s = report["summary"][v["name"]]
    cells = [f"= {s[key]['same_as']}" if s[key].get("same_as")
             else _fmt(s[key]["mean"], s[key]["std"]) for key, _, _ in METRICS]
    lines.append(f"| {v['name']} | {s['folds_done']}/{len(report['folds'])} | "
                 + " | ".join(cells) + " |")
  paired = report.get("paired") or {}
  if any(paired.values()):
    reference = variants[0]["name"]
    keys = [key for key, _, _ in METRICS if any(key in p for p in paired.values())]
    lines += ["", f"## Paired differences: {reference} minus each variant, fold by fold",
              "", "Mean difference over the folds both finished, with its 95% t-interval "
              "(n - 1 degrees of freedom); an interval that excludes 0 is a difference "
              "the folds agree on.", "",
              "| variant | folds | " + " | ".join(report["metrics"][k] for k in keys) + " |",
              "|" + "---|" * (len(keys) + 2)]
    for name, per_metric in paired.items():
      if not per_metric:
        continue
      n = max(e["n"] for e in per_metric.values())
      cells = []
      for key in keys:
        e = per_metric.get(key)
        if e is None:
          cells.append("n/a")
        elif e["low"] is None:
          cells.append(f"{e['mean']:+.3f}")
        else:
          cells.append(f"{e['mean']:+.3f} [{e['low']:+.3f}, {e['high']:+.3f}]")
      lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
  lines += ["", "## Per fold", "",
            "| variant | fold | status | " + " | ".join(headers) + " |",
            "|" + "---|" * (len(headers) + 3)]
  for r in report["rows"]:
    cells = [_fmt(r["metrics"].get(key)) for key, _, _ in METRICS]
    lines.append(f"| {r['variant']} | {r['fold']} | {r['status']} | " + " | ".join(cells)
                 + " |")
  timed = [r for r in report["rows"] if r.get("timings_s")]
  if timed:
    lines += ["", "## Where the time went (mean seconds per run trained here)", "",
              "other = data, initialising, compiling, checkpoints and test predictions: "
              "everything but training steps and evaluation.", "",
              "| variant | runs | total | steps | evaluation | other | other share |",
              "|---|---|---|---|---|---|---|"]
    for v in variants:
      runs = [r["timings_s"] for r in timed if r["variant"] == v["name"]]
      if runs:
        mean = {k: sum(t[k] for t in runs) / len(runs)
                for k in ("total", "steps", "evaluation", "other")}
        lines.append(f"| {v['name']} | {len(runs)} | {mean['total']:.1f} | "
                     f"{mean['steps']:.1f} | {mean['evaluation']:.1f} | "
                     f"{mean['other']:.1f} | {mean['other'] / max(mean['total'], 1e-9):.1%} |")
    adopted = [r for r in report["rows"] if r.get("warmup_from")]
    if adopted:
      lines += ["", "Warm-ups copied instead of trained again: " + ", ".join(
          f"{r['variant']} fold {r['fold']} from {r['warmup_from']}" for r in adopted) + "."]
  errors = [r for r in report["rows"] if r.get("error")]
  if errors:
    lines += ["", "## Failed runs", ""]
    lines += [f"- {r['variant']} fold {r['fold']}: {r['error']}" for r in errors]
  mig = report["eval_settings"]["mig"]
  lines += [
      "", "## Reading the table", "",
      "- expr. = the expression representation: z_exp for DICE-FER, the pooled "
      "ResNet-18 feature for the baseline (what its linear head classifies). "
      "feature = the pooled exp_encoder feature, for every method.",
      "- MIG = I(z_exp(M); z_exp(N)) - I(z_exp(M); z_id(M)) in nats (higher = "
      "better disentangled); n/a for the baseline, which has no z_id. "
      "I(M;N) = MI between the representations of two test images with the same "
      "expression and different subjects. Each MI is max(0, DV bound) of a freshly "
      f"trained critic (GlobalCritic, hidden {mig['hidden']}, {mig['num_steps']} Adam "
      f"steps, early-stopped on validation pairs) on held-out pairs, mean of "
      f"{mig['num_seeds']} seeds.",
      "- leakage = accuracy of a linear probe naming the subject from the code, "
      "fitted on half of each TEST subject's images (people neither encoder saw) "
      "and tested on the other half, every representation first projected to the "
      f"same number of principal components ({report['eval_settings']['probe_pca_dim']}, "
      "capped by the narrowest code; PCA fitted on training images), so widths "
      "match; compare with leakage chance (the majority-subject rate). Lower = "
      "less identity.",
      "- retrieval = share of each test image's "
      f"{report['eval_settings']['retrieval_k']} nearest neighbours, among other "
      "people only, with the same expression; chance = that share for random "
      "neighbours.",
      "- Per-run details (per-class recall, confusion, per-seed MI, t-SNE maps): "
      "`<variant>/<fold>/eval/`.", ""]
  return "\n".join(lines)


def _earlier_rows(workdir: str) -> dict:
  """(variant, fold) -> row of the protocol.json an earlier invocation wrote, so
  that a run it trained keeps its timings when this one reuses it."""
  path = os.path.join(workdir, "protocol.json")
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    rows = json.load(f).get("rows", [])
  return {(r["variant"], r["fold"]): r for r in rows}


def run_protocol(config, workdir: str, *, folds: int | None = None,
                 methods: Sequence[str] = METHODS, sweep: str = "",
                 ablations: Sequence[str] = (), controls: Sequence[str] = (),
                 run_fn: Callable = run_lib.run,
                 evaluate_fn: Callable = evaluate_lib.evaluate) -> dict:
  """Runs (or reuses) every (fold, variant) and writes protocol.md/.json.

  Folds are the outer loop, so a protocol stopped early still has complete
  DICE-FER/baseline comparisons on the folds it finished. Evaluation settings
  come from config.eval.
  """
  eval_settings = evaluator.EvalSettings.from_config(config.eval)
  variants = make_variants(config, methods, sweep, ablations, controls)
  sets = face_sets.FaceSets()   # each face set read and decoded once
  faces = sets.get(config)
  kind, fold_ids = fold_plan(config, faces.records, folds)
  num_folds = len(fold_ids)
  os.makedirs(workdir, exist_ok=True)
  split_note = _split_note(kind, num_folds, config.split_seed)
  rows = []
  total = len(fold_ids) * len(variants)
  earlier = _earlier_rows(workdir)

  def report(final: bool) -> dict:
    done = sum(r["status"] in ("ran", "reused") for r in rows)
    rep = dict(split_kind=kind, split_note=split_note, data_dir=faces.data_dir,
               folds=["official" if f is None else f for f in fold_ids],
               variants=[dict(name=v.name, method=v.method,
                              overrides={k: val for k, val in v.overrides},
                              moves=None if v.moves is None else list(v.moves))
                         for v in variants],
               metrics={key: header for key, header, _ in METRICS},
               eval_settings=eval_settings.as_dict(), rows=list(rows),
               summary=summarize(rows, variants),
               paired=paired_differences(rows, variants), runs_done=done, runs_total=total,
               complete=final and done == total)
    fileio.write_json_atomic(os.path.join(workdir, "protocol.json"), rep)
    fileio.write_text_atomic(os.path.join(workdir, "protocol.md"), markdown(rep))
    fileio.write_text_atomic(os.path.join(workdir, "headline.md"),
                             headline_markdown(rep) + "\n")
    return rep

  for fold in fold_ids:
    for variant in variants:
      cfg = run_config(config, variant, fold, num_folds)
      wd = run_dir(workdir, variant, fold)
      row = dict(variant=variant.name, method=variant.method,
                 fold="official" if fold is None else fold,
                 workdir=os.path.relpath(wd, workdir), metrics={})
      start = time.time()
      metrics = reusable_metrics(cfg, wd)
      if metrics is not None:
        row["status"] = "reused"
        # What the invocation that ran it measured and did stays in the report.
        row.update({k: v for k, v in earlier.get((variant.name, row["fold"]), {}).items()
                    if k in ("timings_s", "warmup_from")})
        print(f"[protocol] {variant.name} {row['fold']}: reusing {wd}", flush=True)
      else:
        print(f"[protocol] {variant.name} {row['fold']}: training and evaluating in {wd}",
              flush=True)
        donors = [run_dir(workdir, v, fold) for v in variants if v is not variant]
        donor = adopt_warmup(cfg, wd, donors)
        if donor is not None:
          row["warmup_from"] = os.path.relpath(donor, workdir)
          print(f"[protocol] {variant.name} {row['fold']}: warm-up copied from {donor} "
                "(the same baseline stage)", flush=True)
        try:
          train_summary = run_fn(cfg, wd, "all", faces=sets.get(cfg))
          metrics = evaluate_fn(wd, faces=sets.get(cfg))
          row["status"] = "ran"
          row["timings_s"] = _timings(time.time() - start, train_summary, metrics)
        except train.TrainingDiverged as e:
          # A diverged run is a result (the config is unstable), not a reason to
          # lose the other runs: it is listed, and left out of the means.
          row.update(status="diverged", error=str(e))
      if metrics is not None:
        row["metrics"] = {key: get(metrics) for key, _, get in METRICS}
      row["seconds"] = round(time.time() - start, 1)
      rows.append(row)
      report(final=False)
  return report(final=True)


def _single_host(config) -> None:
  """Refuses --config.distributed: every process would run (and write) every run."""
  if config.distributed:
    raise UserError("--config.distributed=True: the protocol runs on one host; run "
                    "experiments.run and experiments.evaluate per variant instead")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required: where every run and the table go")
  logging.set_verbosity(logging.WARNING)
  workdir = _WORKDIR.value
  cli.run_or_exit(_single_host, _CONFIG.value)
  # Every run of a protocol compiles the same programs (one config, new
  # closures): on 2 CPU cores a tiny fold's training went from 8.8 s to 3.2 s.
  environment.enable_compilation_cache(data_lib.cache_root(_CONFIG.value),
                                       _COMPILATION_CACHE.value)
  rep = cli.run_or_exit(run_protocol, _CONFIG.value, workdir, folds=_FOLDS.value,
                        methods=_METHODS.value, sweep=_SWEEP.value,
                        ablations=_ABLATIONS.value, controls=_CONTROLS.value)
  print(markdown(rep).split("\n## Per fold")[0])
  print(f"wrote {os.path.join(workdir, 'protocol.md')} and protocol.json")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
