r"""Evaluates a trained workdir in a fresh process, from its Orbax checkpoints.

  python -m experiments.evaluate --workdir=runs/demo [--config.eval.mig.num_seeds=5 ...]

Rebuilds the test split from the config saved in the workdir, restores the final
checkpoint (stage 3, or the baseline's), runs every evaluator
(dicefer_jax.evaluation.evaluator: accuracy, confusion, modified MIG, identity
leakage, cross-subject retrieval, t-SNE maps) with the workdir's `config.eval`
settings, changed by any --config.eval.* flag, and writes DIR/eval/metrics.json,
DIR/eval/report.md and the figures.

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
from dicefer_jax.evaluation import evaluator
from experiments import cli
from experiments import face_sets
from experiments.configs import default


def evaluate(workdir: str, eval_overrides: dict | None = None,
             faces: data_lib.FaceSet | None = None) -> dict:
  """Evaluates `workdir`'s final checkpoint; writes eval/metrics.json and report.md.

  Args:
    workdir: a finished training workdir.
    eval_overrides: {"mig.num_seeds": 5, ...}: changes to its config.eval.
    faces: the face set, when this process has it loaded already.
  """
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


def write_report(path: str, result: dict) -> str:
  """A markdown page a person reads: the headline table, recalls and the plots."""
  fmt = lambda x: "n/a" if x is None else f"{x:.3f}"
  mig, leak, ret = result["mig"], result["identity_leakage"], result["retrieval"]
  probes = leak.get("probes") or {}
  lines = [
      f"# {result['method']}: evaluation on {result['num_examples']} test images",
      "",
      f"Split: {result['split']['kind']} ({result['split'].get('note', '')}). "
      f"Checkpoint: {result['stage']} step {result['step']}. Data: `{result['data_dir']}`.",
      "",
      "| metric | value | reference |",
      "|---|---|---|",
      f"| accuracy | {fmt(result['accuracy'])} | chance {fmt(1 / len(result['class_names']))} |",
      f"| macro-F1 | {fmt(result['macro_f1'])} | |",
      f"| modified MIG (nats) | {fmt(mig['mean'])}"
      f"{'' if mig['std'] is None else ' ± ' + fmt(mig['std'])} | "
      f"{mig.get('reason') or 'higher = expression shared across people, not identity'} |",
      f"| identity leakage ({leak.get('representation')}) | {fmt(leak['accuracy'])} | "
      f"chance {fmt(leak['chance'])} |",
  ]
  for name, probe in probes.items():
    if probe and name != leak.get("representation"):
      lines.append(f"| identity probe on {name} | {fmt(probe.get('accuracy'))} | "
                   f"chance {fmt(probe.get('chance'))} |")
  lines += [
      f"| retrieval@{ret['k']} across subjects | {fmt(ret['precision_at_k'])} | "
      f"chance {fmt(ret['chance'])} |",
      "", "## Recall per class", "", "| class | recall |", "|---|---|"]
  lines += [f"| {k} | {fmt(v)} |" for k, v in result["per_class_recall"].items()]
  lines += ["", "## Plots", ""]
  for name, plot in (result.get("plots") or {}).items():
    if plot and plot.get("file"):
      lines += [f"### {name}", "", f"![{name}]({plot['file']})", ""]
  fileio.write_text_atomic(path, "\n".join(lines) + "\n")
  return path


def summary_line(result: dict) -> str:
  """One line of the headline numbers of a metrics.json."""
  fmt = lambda x: "n/a" if x is None else f"{x:.3f}"
  mig, leak, ret = result["mig"], result["identity_leakage"], result["retrieval"]
  return (f"accuracy {fmt(result['accuracy'])}  macro-F1 {fmt(result['macro_f1'])}  "
          f"MIG {fmt(mig['mean'])}{'' if mig['std'] is None else ' ± ' + fmt(mig['std'])}  "
          f"leakage {fmt(leak['accuracy'])} (chance {fmt(leak['chance'])})  "
          f"retrieval@{ret['k']} {fmt(ret['precision_at_k'])} (chance {fmt(ret['chance'])})")


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
  result = cli.run_or_exit(evaluate, _WORKDIR.value, eval_overrides)
  if train.is_primary():
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
  cli.define_config_dict("config", default.get_config(),
                         "Only --config.eval.* overrides apply here.")
  app.run(main, flags_parser=cli.parse_flags)
