r"""Evaluates a trained workdir in a fresh process, from its Orbax checkpoints.

  python -m experiments.evaluate --workdir=runs/demo

Rebuilds the test split from the config saved in the workdir, restores the final
checkpoint (stage 3, or the baseline's), and writes DIR/eval/metrics.json and
DIR/eval/confusion.png.
"""

from dicefer_jax import environment  # noqa: F401  (sets XLA/TF flags; must come first)

import json
import os

from absl import app
from absl import flags
from absl import logging

from dicefer_jax import checkpoints, contract, evaluation, models, plots, train
from dicefer_jax import data as data_lib
from dicefer_jax.errors import UserError
from experiments import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir written by experiments.run.")


def evaluate(workdir: str) -> dict:
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

  eval_dir = os.path.join(workdir, "eval")
  os.makedirs(eval_dir, exist_ok=True)
  plots.confusion_matrix_png(
      result["confusion"], contract.EXPRESSIONS, os.path.join(eval_dir, "confusion.png"),
      title=f"{config.method}: accuracy {result['accuracy']:.3f} "
            f"({data.split_info.kind} split)")
  with open(os.path.join(eval_dir, "metrics.json"), "w") as f:
    json.dump(result, f, indent=2)
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  logging.set_verbosity(logging.WARNING)
  result = cli.run_or_exit(evaluate, _WORKDIR.value)
  print(f"accuracy {result['accuracy']:.4f}  macro-F1 {result['macro_f1']:.4f}  "
        f"on {result['num_examples']} test images")
  print(f"wrote {os.path.join(_WORKDIR.value, 'eval', 'metrics.json')} and confusion.png")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
