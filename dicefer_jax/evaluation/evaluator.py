"""Evaluates a trained model on its test split: every metric, with `config.eval`.

Besides accuracy, macro-F1, per-class recall and the confusion matrix, it
measures what the method claims, side by side for DICE-FER and the baseline:

- mig: the modified MIG, I(z_exp(M); z_exp(N)) - I(z_exp(M); z_id(M)), by freshly
  trained DV critics scored on held-out pairs of test images (mean/std over seeds,
  a bootstrap interval over the held-out images, plug-in bounds from predicted
  labels, and the estimator's measured error on Gaussians of known MI);
- identity_leakage: a linear probe naming the subject from each code, on the
  TEST split's people (images no encoder trained on), fitted and tested on
  different images of each person, against chance; the headline compares codes
  at one width (each projected to the same number of principal components,
  fitted on training images' codes), the raw-width probes are kept beside it;
- retrieval: how often an image's nearest neighbours among OTHER people share
  its expression;
- t-SNE maps of the codes coloured by expression and by subject.

The "expression representation" is z_exp for DICE-FER and the pooled ResNet
feature for the baseline (the input of its linear head); the pooled feature is
also reported for both, as the like-for-like comparison.
"""

import dataclasses
import os
import time

import numpy as np

from dicefer_jax import contract, plots, train
from dicefer_jax.data import FaceData
from dicefer_jax.errors import UserError
from dicefer_jax.evaluation import classification, common, embedding, identity
from dicefer_jax.evaluation import mi_estimation, retrieval

BASELINE_MISSING = {
    "z_exp": "the baseline has no expression code: it classifies the pooled feature, "
             "and its code head is never trained",
    "z_id": "the baseline has no identity encoder",
}


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """What the disentanglement metrics cost (config.eval); recorded in metrics.json.

  Attributes:
    mig: critic settings of the MIG's MI terms.
    probe_max_images: test images (spread over subjects) the identity probe uses,
      each subject's share split between fitting and testing the probe; also the
      number of training images whose codes the probe's PCA is fitted on.
    probe_test_fraction: share of each subject's images that tests the probe.
    probe_pca_dim: principal components every code is projected to for the
      like-for-like probe (capped by the narrowest code).
    retrieval_k: neighbours per query.
    retrieval_metric: 'cosine' or 'euclidean'.
    tsne_max_points: test images in the t-SNE maps; 0 = no t-SNE.
    seed: seed of every subsample and split of the evaluation.
  """

  mig: mi_estimation.CriticSettings = mi_estimation.CriticSettings()
  probe_max_images: int = 2000
  probe_test_fraction: float = 0.5
  probe_pca_dim: int = 64
  retrieval_k: int = 6
  retrieval_metric: str = "cosine"
  tsne_max_points: int = 1000
  seed: int = 0

  @classmethod
  def from_config(cls, eval_config) -> "EvalSettings":
    """Settings from `config.eval`; a value that cannot work is a UserError."""
    c = eval_config
    at_least_one = dict(
        **{f"mig.{k}": c.mig[k] for k in ("num_seeds", "num_steps", "hidden",
                                          "batch_size", "pairs_per_image",
                                          "eval_permutations")},
        retrieval_k=c.retrieval_k, probe_pca_dim=c.probe_pca_dim)
    for name, value in at_least_one.items():
      if value < 1:
        raise UserError(f"--config.eval.{name}={value} must be at least 1")
    for name, value in (("probe_max_images", c.probe_max_images),
                        ("tsne_max_points", c.tsne_max_points),
                        ("mig.bootstrap_resamples", c.mig.bootstrap_resamples)):
      if value < 0:
        raise UserError(f"--config.eval.{name}={value} must be 0 or more")
    if not isinstance(c.mig.calibrate, bool):
      raise UserError(f"--config.eval.mig.calibrate={c.mig.calibrate!r} must be True or "
                      "False")
    for name, value in (("probe_test_fraction", c.probe_test_fraction),
                        ("mig.heldout_fraction", c.mig.heldout_fraction),
                        ("mig.validation_fraction", c.mig.validation_fraction)):
      if not 0.0 < value < 1.0:
        raise UserError(f"--config.eval.{name}={value} must be between 0 and 1")
    if c.retrieval_metric not in ("cosine", "euclidean"):
      raise UserError(f"--config.eval.retrieval_metric={c.retrieval_metric!r}: use "
                      "'cosine' or 'euclidean'")
    return cls(mig=mi_estimation.CriticSettings(**c.mig.to_dict()),
               probe_max_images=c.probe_max_images,
               probe_test_fraction=c.probe_test_fraction, probe_pca_dim=c.probe_pca_dim,
               retrieval_k=c.retrieval_k,
               retrieval_metric=c.retrieval_metric, tsne_max_points=c.tsne_max_points,
               seed=c.seed)

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def expression_codes(config, out: dict) -> tuple[dict, dict, str]:
  """(codes by name or None, why each missing one is missing, expression repr.)."""
  if config.method == "baseline":
    return (dict(z_exp=None, z_id=None, feature=out["feature"]), dict(BASELINE_MISSING),
            "feature")
  return dict(z_exp=out["z_exp"], z_id=out["z_id"], feature=out["feature"]), {}, "z_exp"


def identity_leakage(config, model, state, data: FaceData, settings: EvalSettings,
                     expression_repr: str, test_out: dict) -> dict:
  """The subject probe on each code of the TEST split's people, raw and PCA-matched.

  Test subjects: the encoders never trained on their images, so the probe
  measures what a code tells about people it never saw, not what it memorised
  of the training set. Each person's images are split between fitting and
  testing the probe. The headline (`accuracy`, `probes`) projects every code to
  the same number of principal components first, fitted on training images'
  codes (never the probe's images), so a wider code cannot leak more by being
  wider; `probes_raw` probes each code at its own width.
  """
  probe_settings = dict(max_images=settings.probe_max_images,
                        test_fraction=settings.probe_test_fraction,
                        classifier="LogisticRegression(C=1.0), standardised inputs",
                        split="each test-split subject's images split between fitting "
                              "and testing the probe, expression mixes matched",
                        pca_dim=settings.probe_pca_dim)
  names = ("z_exp", "z_id", "feature")
  idx = common.subsample_by_subject(data.test_subjects, settings.probe_max_images,
                                    settings.seed)
  subjects = [data.test_subjects[i] for i in idx]

  def null(reason):
    probes = {n: common.unavailable(reason, accuracy=None, chance=None) for n in names}
    return dict(representation=expression_repr, subjects="held-out", accuracy=None,
                chance=None, chance_uniform=None, accuracy_raw=None, reason=reason,
                probes=probes, probes_raw=dict(probes), settings=probe_settings)

  if len(set(subjects)) < 2:
    return null("subject ids of the test images are unknown (fewer than 2 known "
                "subjects): identity leakage needs them")
  codes, missing, _ = expression_codes(config, test_out)
  fit_idx = common.subsample(len(data.train_labels), settings.probe_max_images,
                             settings.seed)
  train_codes, _, _ = expression_codes(
      config, train.predict(config, model, state, data.train_images[fit_idx]))
  widths = [c.shape[1] for c in codes.values() if c is not None]
  num_components = min(settings.probe_pca_dim, *widths, len(fit_idx) - 1)
  if num_components < 1:
    return null(f"{len(fit_idx)} training image(s): too few to fit the probe's PCA")
  labels = data.test_labels[idx]
  probe = lambda x: identity.identity_probe(x, subjects, labels,
                                            test_fraction=settings.probe_test_fraction,
                                            seed=settings.seed)
  probes, probes_raw = {}, {}
  for name in names:
    if codes[name] is None:
      probes[name] = probes_raw[name] = common.unavailable(missing[name], accuracy=None,
                                                           chance=None)
      continue
    probes_raw[name] = probe(codes[name][idx])
    project = identity.fit_pca(train_codes[name], num_components)
    probes[name] = dict(probe(project(codes[name][idx])), input_dim=int(codes[name].shape[1]))
  head = probes[expression_repr]
  result = dict(
      representation=expression_repr,
      subjects="held-out: the test split's people, whose images no encoder trained on",
      comparison=f"PCA-matched: every code projected to its first {num_components} "
                 f"principal components, fitted on {len(fit_idx)} training images' codes",
      accuracy=head.get("accuracy"), chance=head.get("chance"),
      chance_uniform=head.get("chance_uniform"), num_subjects=head.get("num_subjects"),
      num_images=int(len(idx)), accuracy_raw=probes_raw[expression_repr].get("accuracy"),
      pca_dim=int(num_components), pca_fit_images=int(len(fit_idx)),
      probes=probes, probes_raw=probes_raw, settings=probe_settings)
  seen = sorted(set(subjects) & (set(data.train_subjects) - {""}))
  if seen:
    result["warning"] = (f"{len(seen)} of the probe's {len(set(subjects))} subjects also "
                         "have training images (the split shares people): for them it "
                         "is not leakage about unseen people")
  return result


def cross_subject_retrieval(codes: dict, missing: dict, labels, subjects,
                            settings: EvalSettings, expression_repr: str) -> dict:
  by_code = {}
  for name in ("z_exp", "feature"):
    if codes[name] is None:
      by_code[name] = common.unavailable(missing[name], precision_at_k=None)
    else:
      by_code[name] = retrieval.cross_subject_retrieval(
          codes[name], labels, subjects, k=settings.retrieval_k,
          metric=settings.retrieval_metric)
  head = by_code[expression_repr]
  return dict(representation=expression_repr, precision_at_k=head.get("precision_at_k"),
              chance=head.get("chance"), k=settings.retrieval_k,
              metric=settings.retrieval_metric, by_code=by_code)


def tsne_plots(codes: dict, missing: dict, labels, subjects, out_dir: str,
               settings: EvalSettings, method: str, expression_repr: str) -> dict:
  """t-SNE maps: the expression representation by expression and by subject, and
  z_id by subject. Returns {plot name: file name, or null with the reason}."""
  names = ("tsne_exp_by_expression", "tsne_exp_by_subject", "tsne_id_by_subject")
  if not settings.tsne_max_points:
    return {n: common.unavailable("t-SNE turned off (config.eval.tsne_max_points=0)",
                                  file=None) for n in names}
  idx = common.subsample(len(labels), settings.tsne_max_points, settings.seed)
  if len(idx) < 5:
    return {n: common.unavailable(f"{len(idx)} test images: too few for t-SNE", file=None)
            for n in names}
  expressions = [contract.EXPRESSIONS[labels[i]] for i in idx]
  who = [subjects[i] for i in idx]
  result = {}
  exp_map = embedding.tsne_2d(codes[expression_repr][idx], seed=settings.seed)
  for name, colours, by in ((names[0], expressions, "expression"),
                            (names[1], who, "subject")):
    file = f"{name}.png"
    plots.embedding_png(exp_map, colours, os.path.join(out_dir, file),
                        title=f"{method}: t-SNE of {expression_repr} by {by}",
                        order=contract.EXPRESSIONS)
    result[name] = dict(file=file, code=expression_repr, num_points=int(len(idx)))
  if codes["z_id"] is None:
    result[names[2]] = common.unavailable(missing["z_id"], file=None)
  else:
    file = f"{names[2]}.png"
    plots.embedding_png(embedding.tsne_2d(codes["z_id"][idx], seed=settings.seed), who,
                        os.path.join(out_dir, file),
                        title=f"{method}: t-SNE of z_id by subject")
    result[names[2]] = dict(file=file, code="z_id", num_points=int(len(idx)))
  return result


def seen_vs_unseen(config, model, state, data: FaceData, unseen_accuracy: float) -> dict:
  """Accuracy on held-out images of the training subjects against accuracy on the
  test fold's unseen subjects (config.seen_holdout); the gap in points is how much
  the model's accuracy depends on knowing the person."""
  if data.seen_images is None or not len(data.seen_labels):
    return common.unavailable(
        "seen_holdout=0: no images of training subjects were held out (set "
        "--config.seen_holdout=0.2 before training to measure the gap)",
        seen_accuracy=None, unseen_accuracy=unseen_accuracy, gap_points=None)
  predictions = train.predict(config, model, state, data.seen_images)["prediction"]
  seen = float(np.mean(predictions == data.seen_labels))
  return dict(seen_accuracy=seen, unseen_accuracy=unseen_accuracy,
              gap_points=100.0 * (seen - unseen_accuracy),
              num_seen=int(len(data.seen_labels)),
              num_seen_subjects=len(set(data.seen_subjects) - {""}),
              num_unseen=int(len(data.test_labels)))


def evaluate(config, model, state, data: FaceData, out_dir: str,
             settings: EvalSettings) -> dict:
  """Every metric of a trained state on `data`'s test split; plots go to out_dir.

  Returns the metrics as a JSON-ready dict (what eval/metrics.json holds).
  """
  timings = {}
  start = time.time()
  out = train.predict(config, model, state, data.test_images)
  result = classification.classification_metrics(data.test_labels, out["prediction"])
  result.update(method=config.method, stage=train.final_stage(config),
                step=int(state.step), split=data.split_info.as_dict(),
                data_dir=data.data_dir)
  result["seen_vs_unseen"] = seen_vs_unseen(config, model, state, data,
                                             result["accuracy"])
  timings["predict"] = time.time() - start

  codes, missing, expression_repr = expression_codes(config, out)
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
  result["mig"] = mi_estimation.modified_mig(
      data.test_labels, data.test_subjects, z_exp=codes["z_exp"], z_id=codes["z_id"],
      feature=codes["feature"], predictions=out["prediction"], missing=missing,
      settings=settings.mig)
  result["mig"]["representation_pair"] = (
      "exp_pair" if expression_repr == "z_exp" else "feature_pair")
  timings["mig"] = time.time() - t

  t = time.time()
  result["identity_leakage"] = identity_leakage(config, model, state, data, settings,
                                                expression_repr, out)
  timings["identity_leakage"] = time.time() - t

  t = time.time()
  result["retrieval"] = cross_subject_retrieval(
      codes, missing, data.test_labels, data.test_subjects, settings, expression_repr)
  timings["retrieval"] = time.time() - t

  os.makedirs(out_dir, exist_ok=True)
  t = time.time()
  plots.confusion_matrix_png(
      result["confusion"], contract.EXPRESSIONS, os.path.join(out_dir, "confusion.png"),
      title=f"{config.method}: accuracy {result['accuracy']:.3f} "
            f"({data.split_info.kind} split)")
  result["plots"] = dict(confusion=dict(file="confusion.png"), **tsne_plots(
      codes, missing, data.test_labels, data.test_subjects, out_dir, settings,
      config.method, expression_repr))
  timings["plots"] = time.time() - t
  timings["total"] = time.time() - start
  result.update(notes=notes, eval_settings=settings.as_dict(),
                timings_s={k: round(v, 2) for k, v in timings.items()})
  return result
