r"""Evaluates a trained workdir in a fresh process, from its Orbax checkpoints.

  python -m experiments.evaluate --workdir=runs/demo [--mig_seeds=3 --mig_steps=300]

Rebuilds the test split from the config saved in the workdir, restores the final
checkpoint (stage 3, or the baseline's), and writes DIR/eval/metrics.json and its
figures. Besides accuracy, macro-F1, per-class recall and the confusion matrix, it
measures what the method claims, side by side for DICE-FER and the baseline:

- mig: the modified MIG, I(z_exp(M); z_exp(N)) - I(z_exp(M); z_id(M)), by freshly
  trained DV critics scored on held-out pairs of test images (mean/std over seeds);
- identity_leakage: a linear probe naming the subject from the expression code,
  on images of training subjects it was not fitted on, against chance;
- retrieval: how often an image's nearest neighbours among OTHER people share its
  expression;
- t-SNE maps of the codes coloured by expression and by subject.

The "expression representation" is z_exp for DICE-FER and the pooled ResNet
feature for the baseline (the input of its linear head); the pooled feature is
also reported for both, as the like-for-like comparison.
"""

from dicefer_jax import environment  # noqa: F401  (sets XLA/TF flags; must come first)

import dataclasses
import json
import os
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

from dicefer_jax import checkpoints, contract, evaluation, models, plots, train
from dicefer_jax import data as data_lib
from dicefer_jax.errors import UserError
from experiments import cli

BASELINE_MISSING = {
    "z_exp": "the baseline has no expression code: it classifies the pooled feature, "
             "and its code head is never trained",
    "z_id": "the baseline has no identity encoder",
}


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """What the disentanglement metrics cost; recorded in metrics.json.

  Attributes:
    mig: critic settings of the MIG's MI terms.
    probe_max_images: training images (spread over subjects) the identity probe
      uses; each subject's share is split between fitting and testing the probe.
    probe_test_fraction: share of each subject's images that tests the probe.
    retrieval_k: neighbours per query.
    retrieval_metric: 'cosine' or 'euclidean'.
    tsne_max_points: test images in the t-SNE maps; 0 = no t-SNE.
    seed: seed of every subsample and split of the evaluation.
  """

  mig: evaluation.CriticSettings = evaluation.CriticSettings()
  probe_max_images: int = 2000
  probe_test_fraction: float = 0.5
  retrieval_k: int = 6
  retrieval_metric: str = "cosine"
  tsne_max_points: int = 1000
  seed: int = 0

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def _codes_of(config, out: dict) -> tuple[dict, dict, str]:
  """(codes by name or None, why each missing one is missing, expression repr.)."""
  if config.method == "baseline":
    return (dict(z_exp=None, z_id=None, feature=out["feature"]), dict(BASELINE_MISSING),
            "feature")
  return dict(z_exp=out["z_exp"], z_id=out["z_id"], feature=out["feature"]), {}, "z_exp"


def _identity_leakage(config, model, state, data, settings: EvalSettings, expression_repr):
  """The subject probe on each code, on training subjects' images."""
  probe_settings = dict(max_images=settings.probe_max_images,
                        test_fraction=settings.probe_test_fraction,
                        classifier="LogisticRegression(C=1.0), standardised inputs",
                        split="each training subject's images split between fitting "
                              "and testing the probe, expression mixes matched")
  idx = evaluation.subsample_by_subject(data.train_subjects, settings.probe_max_images,
                                        settings.seed)
  if len(set(data.train_subjects[i] for i in idx)) < 2:
    reason = ("subject ids of the training images are unknown (fewer than 2 known "
              "subjects): identity leakage needs them")
    probes = {name: evaluation.unavailable(reason, accuracy=None, chance=None)
              for name in ("z_exp", "z_id", "feature")}
    return dict(representation=expression_repr, accuracy=None, chance=None,
                chance_uniform=None, reason=reason, probes=probes, settings=probe_settings)
  out = train.predict(config, model, state, data.train_images[idx])
  codes, missing, _ = _codes_of(config, out)
  subjects = [data.train_subjects[i] for i in idx]
  labels = data.train_labels[idx]
  probes = {}
  for name, code in codes.items():
    if code is None:
      probes[name] = evaluation.unavailable(missing[name], accuracy=None, chance=None)
    else:
      probes[name] = evaluation.identity_probe(
          code, subjects, labels, test_fraction=settings.probe_test_fraction,
          seed=settings.seed)
  head = probes[expression_repr]
  return dict(representation=expression_repr, accuracy=head.get("accuracy"),
              chance=head.get("chance"), chance_uniform=head.get("chance_uniform"),
              num_subjects=head.get("num_subjects"), num_images=int(len(idx)),
              probes=probes, settings=probe_settings)


def _retrieval(codes: dict, missing: dict, labels, subjects, settings: EvalSettings,
               expression_repr: str) -> dict:
  by_code = {}
  for name in ("z_exp", "feature"):
    if codes[name] is None:
      by_code[name] = evaluation.unavailable(missing[name], precision_at_k=None)
    else:
      by_code[name] = evaluation.cross_subject_retrieval(
          codes[name], labels, subjects, k=settings.retrieval_k,
          metric=settings.retrieval_metric)
  head = by_code[expression_repr]
  return dict(representation=expression_repr, precision_at_k=head.get("precision_at_k"),
              chance=head.get("chance"), k=settings.retrieval_k,
              metric=settings.retrieval_metric, by_code=by_code)


def _tsne_plots(codes: dict, missing: dict, labels, subjects, eval_dir: str,
                settings: EvalSettings, method: str, expression_repr: str) -> dict:
  """t-SNE maps: the expression representation by expression and by subject, and
  z_id by subject. Returns {plot name: file name, or null with the reason}."""
  names = ("tsne_exp_by_expression", "tsne_exp_by_subject", "tsne_id_by_subject")
  if not settings.tsne_max_points:
    return {n: evaluation.unavailable("t-SNE turned off (--tsne_max_points=0)", file=None)
            for n in names}
  idx = evaluation.subsample(len(labels), settings.tsne_max_points, settings.seed)
  if len(idx) < 5:
    return {n: evaluation.unavailable(f"{len(idx)} test images: too few for t-SNE", file=None)
            for n in names}
  expressions = [contract.EXPRESSIONS[labels[i]] for i in idx]
  who = [subjects[i] for i in idx]
  result = {}
  exp_map = evaluation.tsne_2d(codes[expression_repr][idx], seed=settings.seed)
  for name, colours, by in ((names[0], expressions, "expression"),
                            (names[1], who, "subject")):
    file = f"{name}.png"
    plots.embedding_png(exp_map, colours, os.path.join(eval_dir, file),
                        title=f"{method}: t-SNE of {expression_repr} by {by}",
                        order=contract.EXPRESSIONS)
    result[name] = dict(file=file, code=expression_repr, num_points=int(len(idx)))
  if codes["z_id"] is None:
    result[names[2]] = evaluation.unavailable(missing["z_id"], file=None)
  else:
    file = f"{names[2]}.png"
    plots.embedding_png(evaluation.tsne_2d(codes["z_id"][idx], seed=settings.seed), who,
                        os.path.join(eval_dir, file),
                        title=f"{method}: t-SNE of z_id by subject")
    result[names[2]] = dict(file=file, code="z_id", num_points=int(len(idx)))
  return result


def _json_safe(obj):
  """NaN/inf become null: json.dump would write NaN, which is not JSON."""
  if isinstance(obj, dict):
    return {k: _json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_json_safe(v) for v in obj]
  if isinstance(obj, (float, np.floating)):
    return float(obj) if np.isfinite(obj) else None
  if isinstance(obj, np.integer):
    return int(obj)
  return obj


def _write_json(path: str, obj) -> None:
  """Atomic: a reader (or an interrupted protocol) never sees half a file."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(_json_safe(obj), f, indent=2)
  os.replace(tmp, path)


def evaluate(workdir: str, settings: EvalSettings | None = None) -> dict:
  """Restores the final checkpoint of `workdir`, writes DIR/eval/metrics.json and plots."""
  settings = settings or EvalSettings()
  timings = {}
  start = time.time()
  config = train.load_config(workdir)
  stage = train.final_stage(config)
  if checkpoints.latest_step(workdir, stage) != int(config[stage].num_steps):
    raise UserError(
        f"{workdir!r} has no final {stage} checkpoint: finish training first with "
        f"`python -m experiments.run --workdir={workdir} --config=...`")
  data = data_lib.load_data(config)
  model = models.build_model(config.model, contract.NUM_CLASSES)
  state, _ = checkpoints.restore_final(workdir, stage, train.initial_state(stage, config, model))
  out = train.predict(config, model, state, data.test_images)
  result = evaluation.classification_metrics(data.test_labels, out["prediction"])
  result.update(method=config.method, stage=stage, step=int(state.step),
                split=data.split_info.as_dict(), data_dir=data.data_dir)
  timings["restore_and_predict"] = time.time() - start

  codes, missing, expression_repr = _codes_of(config, out)
  result["representation"] = dict(
      expression=expression_repr,
      note=("z_exp, the code stage 3 classifies" if expression_repr == "z_exp" else
            "the pooled ResNet-18 feature its linear head classifies") +
      "; `feature` (pooled exp_encoder output) is reported for both methods")
  notes = []
  if data.split_info.kind != "subject":
    notes.append(f"{data.split_info.kind} split: {data.split_info.note}")
  if config.method == "dicefer" and int(config.stage2.num_steps) == 0:
    notes.append("stage2.num_steps=0: z_id comes from an untrained identity encoder")

  t = time.time()
  result["mig"] = evaluation.modified_mig(
      data.test_labels, data.test_subjects, z_exp=codes["z_exp"], z_id=codes["z_id"],
      feature=codes["feature"], missing=missing, settings=settings.mig)
  result["mig"]["representation_pair"] = (
      "exp_pair" if expression_repr == "z_exp" else "feature_pair")
  timings["mig"] = time.time() - t

  t = time.time()
  result["identity_leakage"] = _identity_leakage(config, model, state, data, settings,
                                                 expression_repr)
  timings["identity_leakage"] = time.time() - t

  t = time.time()
  result["retrieval"] = _retrieval(codes, missing, data.test_labels, data.test_subjects,
                                   settings, expression_repr)
  timings["retrieval"] = time.time() - t

  eval_dir = os.path.join(workdir, "eval")
  os.makedirs(eval_dir, exist_ok=True)
  t = time.time()
  plots.confusion_matrix_png(
      result["confusion"], contract.EXPRESSIONS, os.path.join(eval_dir, "confusion.png"),
      title=f"{config.method}: accuracy {result['accuracy']:.3f} "
            f"({data.split_info.kind} split)")
  result["plots"] = dict(confusion=dict(file="confusion.png"), **_tsne_plots(
      codes, missing, data.test_labels, data.test_subjects, eval_dir, settings,
      config.method, expression_repr))
  timings["plots"] = time.time() - t
  timings["total"] = time.time() - start
  result.update(notes=notes, eval_settings=settings.as_dict(),
                timings_s={k: round(v, 2) for k, v in timings.items()})
  _write_json(os.path.join(eval_dir, "metrics.json"), result)
  write_report(os.path.join(eval_dir, "report.md"), result)
  return result


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
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write("\n".join(lines) + "\n")
  os.replace(tmp, path)
  return path


# ----------------------------------------------------------------------------
# Command line. Flags are defined by `define_flags`, called when this module is the
# program (and by experiments.protocol), so importing `evaluate` defines none: it
# can sit beside experiments.run, whose --workdir would otherwise clash.


def define_flags(flag_values=flags.FLAGS) -> dict:
  """Defines the evaluation-settings flags; returns their holders by name."""
  d = EvalSettings()
  return dict(
      mig_seeds=flags.DEFINE_integer(
          "mig_seeds", d.mig.num_seeds, "Critic seeds of each MIG term (mean and std).",
          flag_values=flag_values),
      mig_steps=flags.DEFINE_integer(
          "mig_steps", d.mig.num_steps, "Adam steps per MIG critic.",
          flag_values=flag_values),
      mig_hidden=flags.DEFINE_integer(
          "mig_hidden", d.mig.hidden, "Hidden width of the MIG critics.",
          flag_values=flag_values),
      probe_max_images=flags.DEFINE_integer(
          "probe_max_images", d.probe_max_images,
          "Training images (spread over subjects) for the identity-leakage probe.",
          flag_values=flag_values),
      retrieval_k=flags.DEFINE_integer(
          "retrieval_k", d.retrieval_k, "Neighbours per query in cross-subject retrieval.",
          flag_values=flag_values),
      retrieval_metric=flags.DEFINE_enum(
          "retrieval_metric", d.retrieval_metric, ["cosine", "euclidean"],
          "Distance of the retrieval.", flag_values=flag_values),
      tsne_max_points=flags.DEFINE_integer(
          "tsne_max_points", d.tsne_max_points, "Test images in the t-SNE maps; 0 = none.",
          flag_values=flag_values),
      eval_seed=flags.DEFINE_integer(
          "eval_seed", d.seed, "Seed of the evaluation's subsamples and splits.",
          flag_values=flag_values),
  )


def settings_from_flags(holders: dict) -> EvalSettings:
  """EvalSettings from the holders `define_flags` returned; bad values are UserErrors."""
  v = {k: h.value for k, h in holders.items()}
  for name in ("mig_seeds", "mig_steps", "mig_hidden", "retrieval_k"):
    if v[name] < 1:
      raise UserError(f"--{name}={v[name]} must be at least 1")
  for name in ("probe_max_images", "tsne_max_points"):
    if v[name] < 0:
      raise UserError(f"--{name}={v[name]} must be 0 or more")
  mig = dataclasses.replace(evaluation.CriticSettings(), num_seeds=v["mig_seeds"],
                            num_steps=v["mig_steps"], hidden=v["mig_hidden"])
  return EvalSettings(mig=mig, probe_max_images=v["probe_max_images"],
                      retrieval_k=v["retrieval_k"], retrieval_metric=v["retrieval_metric"],
                      tsne_max_points=v["tsne_max_points"], seed=v["eval_seed"])


def summary_line(result: dict) -> str:
  """One line of the headline numbers of a metrics.json."""
  fmt = lambda x: "n/a" if x is None else f"{x:.3f}"
  mig, leak, ret = result["mig"], result["identity_leakage"], result["retrieval"]
  return (f"accuracy {fmt(result['accuracy'])}  macro-F1 {fmt(result['macro_f1'])}  "
          f"MIG {fmt(mig['mean'])}{'' if mig['std'] is None else ' ± ' + fmt(mig['std'])}  "
          f"leakage {fmt(leak['accuracy'])} (chance {fmt(leak['chance'])})  "
          f"retrieval@{ret['k']} {fmt(ret['precision_at_k'])} (chance {fmt(ret['chance'])})")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  logging.set_verbosity(logging.WARNING)
  settings = cli.run_or_exit(settings_from_flags, _SETTINGS)
  result = cli.run_or_exit(evaluate, _WORKDIR.value, settings)
  print(f"{result['method']} on {result['num_examples']} test images "
        f"({result['split']['kind']} split): {summary_line(result)}")
  print(f"wrote {os.path.join(_WORKDIR.value, 'eval', 'metrics.json')} and its plots")


if __name__ == "__main__":
  _WORKDIR = flags.DEFINE_string("workdir", None, "A workdir written by experiments.run.")
  _SETTINGS = define_flags()
  app.run(main, flags_parser=cli.parse_flags)
