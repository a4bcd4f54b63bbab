"""Config fields by dotted name, and which of them may change inside a workdir.

A workdir's checkpoints are only meaningful for the config that trained them, so
a rerun with a different config is refused, except for the fields listed here:

- COSMETIC fields change neither the model nor any number it reports (how often
  to log or checkpoint, where caches live, whether the same split is read from
  the PNG files or through TFDS, from memory or from disk, whether one process
  or a multi-host job trains on the same global batches): a finished run is
  reused whatever they say.
- EXTENDABLE fields change results but not what a checkpoint means: a stage's
  `num_steps` may grow (training continues) in the same workdir.
- EVALUATION fields (`eval.*`) never touch training; a finished run is
  re-evaluated when they change, not retrained.

Everything else (the model, the losses, the data and its split, seeds) is fixed
for the life of a workdir. This module is the one place that says so; training
and the protocol both ask it.

A config saved before a field existed lacks it: `with_defaults` fills such gaps
with the value the workdir trained with where that is recorded
(_SAVED_BEFORE_FIELD_EXISTED), otherwise from today's defaults, so old workdirs
still load and a missing field is not a change.
"""

import json
from typing import Any

import ml_collections

# `distributed` changes how processes share the work, not the batches or the
# steps: a run may be resumed on one host after starting on many, and back.
# `stream_above_mb` only chooses memory or disk for the same decoded pixels,
# gathered by the same indices (tests/test_streaming.py checks the batches).
COSMETIC = ("log_every", "checkpoint_every", "keep_checkpoints", "eval_batch_size",
            "synthetic.cache_dir", "tfds_dir", "data_source", "stream_above_mb",
            "distributed")
EXTENDABLE = ("stage1.num_steps", "stage2.num_steps", "stage3.num_steps",
              "baseline.num_steps")
EVALUATION_PREFIX = "eval."
# Fields the supervised "baseline" stage never reads. That stage is one and the
# same computation whether it is the baseline method or DICE-FER's warm-up
# (`stage1.init_from="baseline"`): same seed, data, split, model init, optimiser
# and steps give the same checkpoint. Every model.* field counts, even a critic's
# width: the stage's checkpoint holds every module's initial parameters.
NOT_READ_BY_BASELINE_STAGE = ("method", "loss.", "stage1.", "stage2.", "stage3.",
                              "train.disc_")


def get_field(config, field: str) -> Any:
  """config[a][b][c] for field 'a.b.c'; KeyError naming the field if it is missing."""
  node = config
  for name in field.split("."):
    try:
      node = node[name]
    except (KeyError, TypeError, AttributeError):
      raise KeyError(field) from None
  return node


def set_field(config, field: str, value) -> None:
  """Sets an existing dotted field (a typo is a KeyError, not a new field)."""
  *parents, leaf = field.split(".")
  try:
    node = get_field(config, ".".join(parents)) if parents else config
  except KeyError:
    raise KeyError(field) from None  # the whole field, not just its missing parent
  # A parent that is a leaf is no field either (`"ice" in "dicefer"` is True).
  if not isinstance(node, (dict, ml_collections.ConfigDict)) or leaf not in node:
    raise KeyError(field)
  node[leaf] = value


def flatten(tree, prefix: str = "") -> dict[str, Any]:
  """{'a.b.c': value} of a nested dict or ConfigDict; tuples become lists, as in JSON."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
  return out


def is_evaluation(field: str) -> bool:
  return field.startswith(EVALUATION_PREFIX)


def may_change_in_workdir(field: str) -> bool:
  """Whether a workdir trained with one value of `field` may be run with another."""
  return field in COSMETIC or field in EXTENDABLE or is_evaluation(field)


def changes_results(field: str) -> bool:
  """Whether a different value of `field` can change any reported number."""
  return field not in COSMETIC


def same_baseline_stage(a, b) -> bool:
  """Whether configs `a` and `b` train the same "baseline"-stage checkpoint."""
  return all(f in COSMETIC or is_evaluation(f) or f.startswith(NOT_READ_BY_BASELINE_STAGE)
             for f in differences(a, b))


def differences(a, b) -> list[str]:
  """Sorted dotted names of the fields whose values differ between two configs."""
  fa, fb = flatten(a), flatten(b)
  return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))


# Fields added after workdirs were first saved, with the value that reproduces
# what those workdirs trained: a reader without today's defaults (from_saved, as
# dicefer_jax.Predictor uses) fills them in, so an older workdir still rebuilds
# its own model. (Before model.global_stage, the global critics scored the last
# stage's pooled map; before seen_holdout, every training image trained; before
# model.id_critic_input / id_critic_stage, stage 2's critics scored E_id's own
# maps at the stages stage 1's critics used; before model.critic, every critic
# was a concat MLP.)
_SAVED_BEFORE_FIELD_EXISTED = {"model.global_stage": 4, "seen_holdout": 0.0,
                               "model.id_critic_input": "id_encoder",
                               "model.id_critic_stage": 0, "model.critic": "concat"}


def from_saved(saved: dict) -> ml_collections.ConfigDict:
  """A saved config (JSON dict) as a ConfigDict, exactly as saved.

  The configs hold tuples and no lists, so every JSON list becomes a tuple
  again. For a reader that has no defaults to hand (a library caller such as
  `dicefer_jax.Predictor`); entry points use `with_defaults`.
  """
  def untuple(value):
    if isinstance(value, dict):
      return {k: untuple(v) for k, v in value.items()}
    if isinstance(value, list):
      return tuple(untuple(v) for v in value)
    return value
  return ml_collections.ConfigDict(untuple(_backfilled(saved)))


def _backfilled(saved: dict) -> dict:
  """A copy of a saved config (JSON dict) with the fields it predates set to
  what it trained with (_SAVED_BEFORE_FIELD_EXISTED)."""
  saved = json.loads(json.dumps(saved))
  for field, value in _SAVED_BEFORE_FIELD_EXISTED.items():
    *parents, leaf = field.split(".")
    node = saved
    for key in parents:
      node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict) and leaf not in node:
      node[leaf] = value  # (no such block at all: not a config of this model)
  return saved


def with_defaults(saved: dict, defaults: ml_collections.ConfigDict
                  ) -> ml_collections.ConfigDict:
  """A saved config (JSON dict) as a ConfigDict, with fields it lacks from `defaults`.

  A field the saved config predates takes the value it trained with
  (_SAVED_BEFORE_FIELD_EXISTED), not today's default, which may since differ.
  Values take the type of the default where JSON lost it (lists back to tuples).
  Saved fields unknown to today's defaults are kept as they are.
  """
  config = defaults.copy_and_resolve_references()
  with config.unlocked():
    _overlay(config, _backfilled(saved))
  return config


def _overlay(node: ml_collections.ConfigDict, saved: dict) -> None:
  for key, value in saved.items():
    current = node.get(key) if key in node else None
    if isinstance(value, dict):
      if isinstance(current, ml_collections.ConfigDict):
        _overlay(current, value)
      else:
        node[key] = ml_collections.ConfigDict(value)
    elif isinstance(current, tuple) and isinstance(value, list):
      node[key] = tuple(value)
    elif key in node and current is not None and value is not None:
      node[key] = type(current)(value) if isinstance(current, float) else value
    else:
      # A None default (or a new field) cannot be typed: ConfigDict would refuse
      # a later change of type, so the field is replaced, not assigned.
      if key in node:
        del node[key]
      node[key] = value
