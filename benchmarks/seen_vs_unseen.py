r"""Does identity confound expression? A supervised baseline on seen vs unseen people.

Trains the plain ResNet-18 baseline (cross-entropy only) on the images of the training
subjects minus a held-out 20% of each subject's images, then prints its accuracy on
those held-out images of SEEN subjects and on the test fold's UNSEEN subjects. A large
gap means the model leans on who the person is.

  python benchmarks/seen_vs_unseen.py --config=experiments/configs/demo.py \
      --workdir=/tmp/seen_vs_unseen
"""

from dicefer_jax import environment  # noqa: F401  (sets XLA/TF flags; must come first)

import dataclasses
import json
import os

from absl import app
from absl import flags
import numpy as np
from ml_collections import config_flags

from dicefer_jax import checkpoints, contract, fileio, models, train
from dicefer_jax import workdir as workdir_lib
from experiments import face_sets
from experiments.configs import default

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/demo.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where to train.", required=True)
_HOLDOUT = flags.DEFINE_float("holdout", 0.2, "Fraction of each seen subject's images held out.")


def main(_):
  config = _CONFIG.value.copy_and_resolve_references()
  config.method = "baseline"
  data = face_sets.FaceSets().split(config)
  rng = np.random.default_rng(config.split_seed)
  subjects = np.asarray(data.train_subjects)
  held = np.zeros(len(subjects), bool)
  for s in np.unique(subjects):
    idx = np.flatnonzero(subjects == s)
    held[rng.choice(idx, max(1, int(round(_HOLDOUT.value * len(idx)))), replace=False)] = True
  fit = dataclasses.replace(
      data, train_images=data.train_images[~held], train_labels=data.train_labels[~held],
      train_subjects=list(subjects[~held]))
  workdir_lib.save_config(config, _WORKDIR.value, default.get_config())
  train.train_and_evaluate(config, _WORKDIR.value, ["baseline"], fit)
  model = models.build_model(config.model, contract.NUM_CLASSES)
  state, _ = checkpoints.restore_final(
      _WORKDIR.value, "baseline", train.initial_state("baseline", config, model))
  seen = train.predict(config, model, state, data.train_images[held])["prediction"]
  unseen = train.predict(config, model, state, data.test_images)["prediction"]
  result = dict(
      seen_accuracy=float(np.mean(seen == data.train_labels[held])),
      unseen_accuracy=float(np.mean(unseen == data.test_labels)),
      num_seen=int(held.sum()), num_unseen=int(len(data.test_labels)),
      baseline_steps=int(config.baseline.num_steps), image_size=int(config.image_size),
      width=int(config.model.width))
  result["gap_points"] = 100 * (result["seen_accuracy"] - result["unseen_accuracy"])
  print(json.dumps(result, indent=2))
  fileio.write_json_atomic(os.path.join(_WORKDIR.value, "seen_vs_unseen.json"), result)


if __name__ == "__main__":
  app.run(main)
