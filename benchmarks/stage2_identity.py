r"""Stage 2 alone, in variants, from one finished run's stage-1 model: does z_id learn
identity? Prints the logged MI curve and the held-out identity probe.

Restores the final stage-1 state of a DICE-FER workdir (E_exp), then trains
stage 2 exactly as `experiments.run` would (same initial E_id, critics and D,
same step function, same batches, same rng) under a changed config, e.g. the
critics on other stages (`model.local_stage`, `model.global_stage`), on the
frozen E_exp's maps (`model.id_critic_input=exp_encoder`, `model.id_critic_stage`),
another `loss.estimator` or `loss.zeta`. The id critics are built for the variant's
stages; E_exp and its BatchNorm statistics are the workdir's. Afterwards the
evaluation's own probe (`evaluator.identity_leakage`: the test split's held-out
people, PCA-matched and raw) names the subject from z_exp, z_id and the pooled
feature. `--control` also probes E_id at its initialisation (what stage 2 starts
from: a random ResNet's features already tell people apart).

Nothing is written to the workdir. Every variant starts from the same E_exp,
so stage 2 is compared with stage 1 held fixed.

  python benchmarks/stage2_identity.py --workdir=/tmp/critics_s33 \
      --set=model.global_stage=2 --set=model.local_stage=2 [--set=loss.zeta=0] \
      [--steps=300] [--control] [--nuisance]
"""

from dicefer_jax import environment  # noqa: F401  (sets XLA/TF flags; must come first)

import json
import time

from absl import app
from absl import flags
import jax
import numpy as np

from data_tools import synthetic_nuisance
from dicefer_jax import checkpoints, config_fields, models, splits, steps, train
from dicefer_jax import workdir as workdir_lib
from dicefer_jax.evaluation import attribute_probe, evaluator
from experiments import cli, face_sets
from experiments.configs import default

_WORKDIR = flags.DEFINE_string("workdir", None, "A DICE-FER workdir with a final "
                               "stage-1 checkpoint.", required=True)
_SET = flags.DEFINE_multi_string("set", [], "FIELD=VALUE: a config change for stage 2, "
                                 "e.g. model.global_stage=2 or loss.estimator=jsd.")
_STEPS = flags.DEFINE_integer("steps", 0, "Stage-2 steps (0 = the config's).")
_CONTROL = flags.DEFINE_bool("control", False, "Also probe E_id at initialisation.")
_NUISANCE = flags.DEFINE_bool("nuisance", False, "Also regress each test image's "
                              "nuisance (pose, lighting, blur, noise) from each code "
                              "(synthetic sets only).")
# Codes compared with what they carry besides identity and expression.
_CODES = ("z_exp", "z_id", "feature")


def _parse(config, item: str):
  field, _, text = item.partition("=")
  current = config_fields.get_field(config, field)
  if isinstance(current, bool):
    value = text.lower() == "true"
  elif isinstance(current, (int, float)):
    value = type(current)(text)
  else:
    value = text
  config_fields.set_field(config, field, value)


def _test_relpaths(records, config, data) -> list[str]:
  """The test split's image paths, in data.test_images' order."""
  _, test, _ = splits.split_records(records, num_folds=config.num_folds,
                                    fold=config.fold, seed=config.split_seed)
  if ([r.label for r in test] != [int(x) for x in data.test_labels]
      or [r.subject for r in test] != list(data.test_subjects)):
    raise RuntimeError("the test split's records are not the test images, in order")
  return [r.path for r in test]


def _probe(config, model, state, data, settings, nuisance=None) -> dict:
  out = train.predict(config, model, state, data.test_images)
  leak = evaluator.identity_leakage(config, model, state, data, settings, "z_exp", out)
  pick = lambda probes: {name: round(p["accuracy"], 4) for name, p in probes.items()}
  result = dict(chance=round(leak["chance"], 4), pca_matched=pick(leak["probes"]),
                raw=pick(leak["probes_raw"]))
  if nuisance is not None:
    result["nuisance_r2"] = {
        code: dict(zip(synthetic_nuisance.NAMES, np.round(attribute_probe.heldout_people_r2(
            np.asarray(out[code], np.float64), nuisance.values, data.test_subjects,
            settings.probe_pca_dim), 4).tolist()))
        for code in _CODES}
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  workdir = _WORKDIR.value
  trained_config = workdir_lib.read_config(workdir, default.get_config())
  stage1, _ = checkpoints.restore_final(
      workdir, "stage1", train.restore_template(
          "stage1", trained_config,
          models.build_model(trained_config.model, 7)))
  config = trained_config.copy_and_resolve_references()
  for item in _SET.value:
    _parse(config, item)
  num_steps = _STEPS.value or int(config.stage2.num_steps)
  model = models.build_model(config.model, 7)
  sets = face_sets.FaceSets()  # one read of the set for the split and its paths
  data = sets.split(config)
  settings = evaluator.EvalSettings.from_config(config.eval)

  # The state run.py's stage 2 would start from, with the variant's critics:
  # E_exp from the workdir, everything stage 2 trains at its initialisation.
  init = train.initial_state("stage2", config, model)
  params = {**init.params, "exp_encoder": stage1.params["exp_encoder"]}
  batch_stats = {**init.batch_stats, "exp_encoder": stage1.batch_stats["exp_encoder"]}
  optimizers = steps.make_optimizers(config.train, "stage2")
  state = steps.create_state("stage2", params, batch_stats, optimizers, init.rng)
  result = dict(workdir=workdir, changes=list(_SET.value), steps=num_steps,
                stages=dict(local=config.model.local_stage, glob=config.model.global_stage),
                estimator=config.loss.estimator, zeta=config.loss.zeta)
  nuisance = (cli.run_or_exit(synthetic_nuisance.recover, data.data_dir,
                              _test_relpaths(sets.get(config).records, config, data))
              if _NUISANCE.value else None)
  if _CONTROL.value:
    result["id_encoder_at_init"] = _probe(config, model, state, data, settings, nuisance)

  step = jax.jit(steps.make_step("stage2", model, config, optimizers))
  batches = train._input_pipeline().as_numpy_iterator(  # pylint: disable=protected-access
      train.stage_dataset("stage2", config, data, 0))
  curve, window, started = [], [], time.time()
  for i in range(1, num_steps + 1):
    state, metrics = step(state, next(batches))
    window.append(metrics)
    if i % config.log_every == 0 or i == num_steps:
      row = {k: float(np.mean([float(m[k]) for m in window]))
             for k in ("mi_global", "mi_local", "objective_global", "objective_local",
                       "disc_accuracy", "grad_norm")}
      curve.append(dict(step=i, **{k: round(v, 4) for k, v in row.items()}))
      print(json.dumps(curve[-1]), flush=True)
      window = []
  result["train_s"] = round(time.time() - started, 1)
  result["curve"] = curve
  result["trained"] = _probe(config, model, state, data, settings, nuisance)
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
