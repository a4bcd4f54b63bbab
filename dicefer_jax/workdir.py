"""The layout of a training workdir, spelled once, and the config saved in it.

  <workdir>/config.json               the resolved config that trained it
  <workdir>/checkpoints/<stage>/<step>/  Orbax checkpoints of each stage
  <workdir>/checkpoints/superseded/   stage checkpoints set aside when their
                                      prerequisite was trained further
  <workdir>/metrics.jsonl             every logged scalar
  <workdir>/tensorboard/              the same scalars as TensorBoard events
  <workdir>/train_metrics.json        test accuracy at the end of training
  <workdir>/eval/metrics.json         experiments.evaluate's metrics
  <workdir>/eval/report.md            and its human-readable page, with plots

Every other module asks this one for a path instead of joining names itself.
"""

import json
import os

import ml_collections

from dicefer_jax import config_fields, fileio
from dicefer_jax.errors import UserError

CONFIG_NAME = "config.json"


def config_path(workdir: str) -> str:
  return os.path.join(workdir, CONFIG_NAME)


def checkpoints_root(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def checkpoint_dir(workdir: str, stage: str) -> str:
  return os.path.join(checkpoints_root(workdir), stage)


def superseded_dir(workdir: str) -> str:
  return os.path.join(checkpoints_root(workdir), "superseded")


def metrics_log_path(workdir: str) -> str:
  return os.path.join(workdir, "metrics.jsonl")


def tensorboard_dir(workdir: str) -> str:
  return os.path.join(workdir, "tensorboard")


def train_metrics_path(workdir: str) -> str:
  return os.path.join(workdir, "train_metrics.json")


def eval_dir(workdir: str) -> str:
  return os.path.join(workdir, "eval")


def eval_metrics_path(workdir: str) -> str:
  return os.path.join(eval_dir(workdir), "metrics.json")


def eval_report_path(workdir: str) -> str:
  return os.path.join(eval_dir(workdir), "report.md")


def _read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def read_config(workdir: str, defaults: ml_collections.ConfigDict | None = None
                ) -> ml_collections.ConfigDict:
  """The config a workdir was trained with; fields it predates take `defaults`.

  With defaults=None the saved config is read as it is (JSON lists back to
  tuples): the library has no defaults of its own (they live in
  experiments/configs/default.py), so a field the workdir predates is absent.
  """
  path = config_path(workdir)
  if not os.path.exists(path):
    raise UserError(f"{path} not found: {workdir!r} is not a training workdir; train "
                    "first with `python -m experiments.run --workdir=...`")
  if defaults is None:
    return config_fields.from_saved(_read_json(path))
  return config_fields.with_defaults(_read_json(path), defaults)


def save_config(config: ml_collections.ConfigDict, workdir: str,
                defaults: ml_collections.ConfigDict) -> None:
  """Saves the resolved config in the workdir; refuses a workdir of another config.

  Only fields that `config_fields.may_change_in_workdir` allows may differ from
  the saved config; the saved file is then updated to the new values (a grown
  num_steps, new evaluation settings).
  """
  os.makedirs(workdir, exist_ok=True)
  path = config_path(workdir)
  current = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    saved = config_fields.with_defaults(_read_json(path), defaults)
    refused = [f for f in config_fields.differences(saved, current)
               if not config_fields.may_change_in_workdir(f)]
    if refused:
      raise UserError(
          f"workdir {workdir!r} holds checkpoints from another config (differs in "
          f"{', '.join(refused[:5])}{'...' if len(refused) > 5 else ''}): use a new "
          "--workdir, or pass the same config")
  elif os.path.isdir(checkpoints_root(workdir)):
    raise UserError(
        f"workdir {workdir!r} holds checkpoints but no {CONFIG_NAME}, so they cannot be "
        "matched to this config: use a new --workdir")
  fileio.write_json_atomic(path, current, sort_keys=True)
