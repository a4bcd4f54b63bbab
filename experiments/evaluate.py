r"""Evaluates a trained workdir in a fresh process, from its Orbax checkpoints.

  python -m experiments.evaluate --workdir=runs/demo [--config.eval.mig.num_seeds=5 ...]
  python -m experiments.evaluate --workdir=runs/demo --export_codes=codes.npz [--export_only]

Rebuilds the test split from the config saved in the workdir, restores the final
checkpoint (stage 3, or the baseline's), runs every evaluator
(dicefer_jax.evaluation.evaluator: accuracy, confusion, modified MIG with its
calibration, bootstrap interval and plug-in bounds, identity leakage on held-out
people, cross-subject retrieval, t-SNE maps) with the workdir's `config.eval`
settings, changed by any --config.eval.* flag, and writes DIR/eval/metrics.json,
DIR/eval/report.md and the figures.

--export_codes=FILE.npz also writes every image's codes (train and test split:
z_exp, z_id, pooled feature, label, prediction, subject, is_test, path; see
dicefer_jax.evaluation.codes_export) to FILE, which must not exist yet; the
evaluation then runs as usual, unless --export_only is given.

--config.distributed=True joins a multi-host job (it is a property of how this
process is started, so it is taken from the flag, never from the workdir's
config); every process evaluates, the primary one writes the files. Compiled
programs are cached as in experiments.run (--nocompilation_cache to turn off).
"""

from dicefer_jax import environment  # sets XLA/TF flags: must come first

import shutil
import tempfile

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from dicefer_jax import config_fields, fileio, train
from dicefer_jax import data as data_lib
from dicefer_jax import workdir as workdir_lib
from dicefer_jax.errors import UserError
from dicefer_jax.evaluation import codes_export, evaluator
from experiments import cli
from experiments import face_sets
from experiments.configs import default


def evaluate(workdir: str, eval_overrides: dict | None = None,
             faces: data_lib.FaceSet | None = None, *, export_codes: str | None = None,
             export_only: bool = False) -> dict | None:
  """Evaluates `workdir`'s final checkpoint; writes eval/metrics.json and report.md.

  Args:
    workdir: a finished training workdir.
    eval_overrides: {"mig.num_seeds": 5, ...}: changes to its config.eval.
    faces: the face set, when this process has it loaded already.
    export_codes: a new .npz file to write every image's codes to first
      (`codes_export`); an existing file is refused before any work.
    export_only: write `export_codes` and stop: no evaluation, returns None.
  """
  if export_only and not export_codes:
    raise UserError("--export_only needs --export_codes=FILE.npz")
  if export_codes:
    codes_export.check_target(export_codes)
  config = workdir_lib.read_config(workdir, default.get_config())
  for field, value in (eval_overrides or {}).items():
    try:
      config_fields.set_field(config.eval, field, value)
    except KeyError:
      raise UserError(f"config.eval.{field} does not exist: see the eval block of "
                      "experiments/configs/default.py") from None
  settings = evaluator.EvalSettings.from_config(config.eval)
  model, state = train.restore_trained(config, workdir)
  if faces is None:
    faces = face_sets.FaceSets().get(config)
  data = data_lib.split_faces(config, faces)
  if export_codes:
    # Every process takes part in the sharded predictions; the primary writes.
    table = codes_export.code_table(config, model, state, data,
                                    codes_export.split_paths(config, faces, data))
    if train.is_primary():
      codes_export.write_codes(export_codes, table)
    if export_only:
      return None
  if train.is_primary():
    result = evaluator.evaluate(config, model, state, data, workdir_lib.eval_dir(workdir),
                                settings)
    fileio.write_json_atomic(workdir_lib.eval_metrics_path(workdir), result)
    write_report(workdir_lib.eval_report_path(workdir), result)
    return result
  # Another process of a multi-host job: it takes part in every sharded
  # prediction, but its copies of the plots go to a scratch folder, so that one
  # process writes each file of the workdir.
  scratch = tempfile.mkdtemp(prefix="dicefer-eval-")
  try:
    return evaluator.evaluate(config, model, state, data, scratch, settings)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


def _fmt(x) -> str:
  return "n/a" if x is None else f"{x:.3f}"


def _spread(stats: dict) -> str:
  """"m ± std [low, high]": mean and std over critic seeds, bootstrap interval."""
  text = _fmt(stats.get("mean"))
  if stats.get("std") is not None:
    text += f" ± {_fmt(stats['std'])}"
  interval = stats.get("interval") or {}
  if interval.get("low") is not None:
    text += f" [{_fmt(interval['low'])}, {_fmt(interval['high'])}]"
  return text


def _leakage_label(leak: dict) -> str:
  """How the headline leakage was measured, for the report and the summary line."""
  if leak.get("pca_dim") is None:
    return "held-out subjects"
  return f"held-out subjects, {leak['pca_dim']} PCs"


def _seen_rows(seen: dict) -> list[str]:
  """The headline rows of the seen-vs-unseen comparison, when it was measured."""
  if seen.get("seen_accuracy") is None:
    return []
  return [f"| accuracy on held-out images of seen subjects | {_fmt(seen['seen_accuracy'])} "
          f"| {seen['num_seen']} images of {seen['num_seen_subjects']} training subjects |",
          f"| seen - unseen gap (points) | {seen['gap_points']:.1f} | "
          "how much accuracy depends on knowing the person |"]


def write_report(path: str, result: dict) -> str:
  """A markdown page a person reads: the headline table, the MI terms with their
  checks, the leakage probes, recalls and the plots."""
  mig, leak, ret = result["mig"], result["identity_leakage"], result["retrieval"]
  terms = mig.get("terms") or {}
  lines = [
      f"# {result['method']}: evaluation on {result['num_examples']} test images",
      "",
      f"Split: {result['split']['kind']} ({result['split'].get('note', '')}). "
      f"Checkpoint: {result['stage']} step {result['step']}. Data: `{result['data_dir']}`.",
      "",
      "| metric | value | reference |",
      "|---|---|---|",
      f"| accuracy | {_fmt(result['accuracy'])} | chance {_fmt(1 / len(result['class_names']))} |",
      f"| macro-F1 | {_fmt(result['macro_f1'])} | |",
      f"| modified MIG (nats) | {_spread(mig)} | "
      f"{mig.get('reason') or 'higher = expression shared across people, not identity'} |",
      f"| identity leakage ({leak.get('representation')}, {_leakage_label(leak)}) | "
      f"{_fmt(leak['accuracy'])} | chance {_fmt(leak['chance'])} |",
      f"| retrieval@{ret['k']} across subjects | {_fmt(ret['precision_at_k'])} | "
      f"chance {_fmt(ret['chance'])} |",
      *_seen_rows(result.get("seen_vs_unseen") or {}),
      "",
      "MI values: mean ± std over critic seeds [95% bootstrap interval over the held-out "
      "images]. Each critic term is max(0, held-out DV bound), a lower bound up to the "
      "estimator's error (calibration below); the plug-in bound is the MI of predicted "
      "labels (Miller-Madow corrected), also a lower bound of the term by data processing.",
      "", "## MI terms (nats)", "",
      "| term | critic estimate | plug-in bound | note |", "|---|---|---|---|"]
  for name, term in terms.items():
    bound = term.get("plugin_bound") or {}
    lines.append(f"| {term.get('description', name)} | {_spread(term)} | "
                 f"{_fmt(bound.get('mean'))} | {term.get('reason') or term.get('warning') or ''} |")
  calibration = mig.get("calibration") or {}
  lines += ["", "## MI estimator calibration", ""]
  if calibration.get("reason"):
    lines.append(f"Not run: {calibration['reason']}.")
  else:
    lines += ["The same critic, at each term's widths and sample counts, on correlated "
              "Gaussians of known MI (independent rows: a best case for pair terms, "
              "whose rows reuse images).", "",
              "| term | widths | train/val/held-out | true MI | estimate | error |",
              "|---|---|---|---|---|---|"]
    for name, c in calibration.items():
      for level in c["levels"]:
        lines.append(f"| {name} | {c['x_dim']} x {c['z_dim']} | {c['num_train']}/"
                     f"{c['num_validation']}/{c['num_heldout']} | {_fmt(level['truth'])} | "
                     f"{_fmt(level['estimate'])} | {_fmt(level['error'])} |")
  lines += ["", "## Identity leakage", "",
            f"Probes name the person from a code, fitted and tested on different images "
            f"of the test split's people (never trained on). {leak.get('comparison', '')}"
            f"{'. ' + leak['warning'] if leak.get('warning') else ''}", "",
            "| code | like-for-like | raw width | chance |", "|---|---|---|---|"]
  for name, probe in (leak.get("probes") or {}).items():
    raw = (leak.get("probes_raw") or {}).get(name) or {}
    width = raw.get("code_dim")
    lines.append(f"| {name} | {_fmt(probe.get('accuracy'))} | {_fmt(raw.get('accuracy'))}"
                 f"{'' if width is None else f' ({width}-d)'} | "
                 f"{_fmt(probe.get('chance'))} |")
  lines += ["", "## Recall per class", "", "| class | recall |", "|---|---|"]
  lines += [f"| {k} | {_fmt(v)} |" for k, v in result["per_class_recall"].items()]
  lines += ["", "## Plots", ""]
  for name, plot in (result.get("plots") or {}).items():
    if plot and plot.get("file"):
      lines += [f"### {name}", "", f"![{name}]({plot['file']})", ""]
  fileio.write_text_atomic(path, "\n".join(lines) + "\n")
  return path


def summary_line(result: dict) -> str:
  """One line of the headline numbers of a metrics.json."""
  mig, leak, ret = result["mig"], result["identity_leakage"], result["retrieval"]
  return (f"accuracy {_fmt(result['accuracy'])}  macro-F1 {_fmt(result['macro_f1'])}  "
          f"MIG {_spread(mig)}  "
          f"leakage {_fmt(leak['accuracy'])} (chance {_fmt(leak['chance'])}; "
          f"{_leakage_label(leak)})  "
          f"retrieval@{ret['k']} {_fmt(ret['precision_at_k'])} (chance {_fmt(ret['chance'])})")


# Process settings, not workdir settings: evaluate takes them from its flags.
PROCESS_FIELDS = ("distributed",)


def _eval_overrides(overrides: dict) -> dict:
  """{"mig.num_seeds": 5, ...} from the --config.eval.* flags; refuses any other
  (but the process settings, PROCESS_FIELDS, which main reads itself)."""
  overrides = {f: v for f, v in overrides.items() if f not in PROCESS_FIELDS}
  others = [f for f in overrides if not config_fields.is_evaluation(f)]
  if others:
    raise UserError(f"--config.{others[0]}: evaluate takes only --config.eval.* "
                    "overrides (and --config.distributed); everything else comes from "
                    "the workdir's config.json")
  return {f[len(config_fields.EVALUATION_PREFIX):]: v for f, v in overrides.items()}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  logging.set_verbosity(logging.WARNING)
  overrides = config_flags.get_override_values(flags.FLAGS["config"])
  # First, before any other JAX call: JAX refuses to join a job after computing.
  cli.run_or_exit(environment.initialize_distributed,
                  bool(overrides.get("distributed", False)))
  eval_overrides = cli.run_or_exit(_eval_overrides, overrides)
  saved = cli.run_or_exit(workdir_lib.read_config, _WORKDIR.value, default.get_config())
  environment.enable_compilation_cache(data_lib.cache_root(saved), _COMPILATION_CACHE.value)
  result = cli.run_or_exit(evaluate, _WORKDIR.value, eval_overrides,
                           export_codes=_EXPORT_CODES.value, export_only=_EXPORT_ONLY.value)
  if not train.is_primary():
    return
  if _EXPORT_CODES.value:
    print(f"wrote every image's codes to {_EXPORT_CODES.value}")
  if result is not None:
    print(f"{result['method']} on {result['num_examples']} test images "
          f"({result['split']['kind']} split): {summary_line(result)}")
    print(f"wrote {workdir_lib.eval_metrics_path(_WORKDIR.value)} and its plots")


if __name__ == "__main__":
  # Defined only when this module is the program: experiments.protocol imports
  # `evaluate` and has flags of the same names.
  _WORKDIR = flags.DEFINE_string("workdir", None, "A workdir written by experiments.run.")
  _COMPILATION_CACHE = flags.DEFINE_bool(
      "compilation_cache", True, "Keep compiled XLA programs in <cache root>/jax_cache "
      "(also off with DICEFER_COMPILATION_CACHE=0).")
  _EXPORT_CODES = flags.DEFINE_string(
      "export_codes", None, "Also write every image's codes (train and test split) to "
      "this new .npz file (never overwritten).")
  _EXPORT_ONLY = flags.DEFINE_bool(
      "export_only", False, "With --export_codes: write the codes and skip the evaluation.")
  cli.define_config_dict("config", default.get_config(),
                         "Only --config.eval.* overrides apply here.")
  app.run(main, flags_parser=cli.parse_flags)
