r"""Did stage 2 teach z_id identity, or was it there already? The leakage control.

A randomly initialised ResNet's features already name people fairly well, so "z_id
leaks identity above z_exp" alone does not show that stage 2 trained it. This
restores a finished DICE-FER workdir and runs the evaluation's own identity probe
(`evaluator.identity_leakage`: the TEST split's held-out people, PCA-matched, and
at raw width) twice: on the trained model, and on the same model with E_id put
back to its initialisation (the parameters and BatchNorm statistics stage 1
started from, `train.initial_state`). It also prints the logged stage-2 MI at the
end of training (the DV estimate, and the objective) from metrics.jsonl, and how
linear each code is in what its global critic scores: the relative residual
||z - (A x + c)|| / ||z - mean z|| of a least-squares fit from the critic's input x
(the pooled map of model.global_stage) to the code, on test images. 0 means the
critic can tell joint from shuffled pairs by checking a linear relation (the
stage-2 shortcut); at global_stage 4 it is 0 by construction (z = Dense(f)).

  python benchmarks/identity_code_control.py --workdir=/tmp/critics_s33 \
      [--config.eval.probe_max_images=2000 ...]
"""

from dicefer_jax import environment  # noqa: F401  (sets XLA/TF flags; must come first)

import json
import os

from absl import app
from absl import flags
import numpy as np
from ml_collections import config_flags

from dicefer_jax import config_fields, train
from dicefer_jax import workdir as workdir_lib
from dicefer_jax.evaluation import evaluator
from experiments import face_sets
from experiments.configs import default

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished DICE-FER workdir.",
                               required=True)
_EVAL = config_flags.DEFINE_config_dict("config", default.get_config().eval)


def _summary(leakage: dict) -> dict:
  pick = lambda probes: {name: p.get("accuracy") for name, p in probes.items()}
  return dict(chance=leakage.get("chance"), pca_matched=pick(leakage["probes"]),
              raw=pick(leakage["probes_raw"]))


def _standardize(images: np.ndarray) -> np.ndarray:
  """uint8 (N, S, S[, 1]) -> float32 (N, S, S, 1), per image as
  tf.image.per_image_standardization does (the input pipeline's rule)."""
  x = images.astype(np.float32).reshape(len(images), images.shape[1], images.shape[2], 1)
  mean = x.mean(axis=(1, 2, 3), keepdims=True)
  std = np.maximum(x.std(axis=(1, 2, 3), keepdims=True), 1.0 / np.sqrt(x[0].size))
  return (x - mean) / std


def _linear_residuals(model, state, images) -> dict:
  """Per encoder: how far its code is from a linear function of its global
  critic's input, on `images` (more images than the fit's unknowns)."""
  out = {}
  for name in ("exp_encoder", "id_encoder"):
    enc = getattr(model, name).apply(
        {"params": state.params[name], "batch_stats": state.batch_stats[name]},
        images, train=False)
    x = np.asarray(enc.critic_feature, np.float64)
    z = np.asarray(enc.code, np.float64)
    if x.shape[1] + 1 >= len(x):
      out[name] = None  # too few images for the fit to mean anything
      continue
    design = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    coef, *_ = np.linalg.lstsq(design, z, rcond=None)
    out[name] = round(float(np.linalg.norm(z - design @ coef) /
                            np.linalg.norm(z - z.mean(axis=0))), 4)
  return out


def _last_logged(workdir: str, stage: str) -> dict:
  last = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if row.get("stage") == stage:
        last = row
  keep = ("step", "mi_global", "mi_local", "objective_global", "objective_local")
  return {k: last[k] for k in keep if k in last}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  workdir = _WORKDIR.value
  config = workdir_lib.read_config(workdir, default.get_config())
  for field, value in config_fields.flatten(_EVAL.value).items():
    config_fields.set_field(config.eval, field, value)
  settings = evaluator.EvalSettings.from_config(config.eval)
  model, state = train.restore_trained(config, workdir)
  data = face_sets.FaceSets().split(config)

  def leakage(state):
    out = train.predict(config, model, state, data.test_images)
    return evaluator.identity_leakage(config, model, state, data, settings, "z_exp", out)

  init = train.initial_state("stage1", config, model)
  untrained = state.replace(
      params={**state.params, "id_encoder": init.params["id_encoder"]},
      batch_stats={**state.batch_stats, "id_encoder": init.batch_stats["id_encoder"]})
  images = _standardize(np.asarray(data.test_images[:512]))
  result = dict(workdir=workdir,
                model={k: config.model[k] for k in ("local_stage", "global_stage")},
                estimator=config.loss.estimator,
                stage2_logged=_last_logged(workdir, "stage2"),
                trained=_summary(leakage(state)),
                id_encoder_at_init=_summary(leakage(untrained)),
                linear_residual_trained=_linear_residuals(model, state, images),
                linear_residual_id_at_init=_linear_residuals(model, untrained,
                                                             images)["id_encoder"])
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
