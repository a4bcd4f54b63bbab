"""Config fields by dotted name, which may change inside a workdir, and the
config a workdir saves (dicefer_jax.config_fields, dicefer_jax.workdir).

A workdir's checkpoints mean something only for the config that trained them:
these tests pin down which differences are refused, which are allowed, and that
a config.json written by an older version (before some fields existed) still
loads and is not mistaken for a different config.
"""

import json
import os

import ml_collections
import pytest

from dicefer_jax import config_fields
from dicefer_jax import workdir as workdir_lib
from dicefer_jax.errors import UserError
from experiments.configs import default


def _saved_json(workdir) -> dict:
  with open(workdir_lib.config_path(workdir)) as f:
    return json.load(f)


def _write_json(workdir, saved: dict) -> None:
  with open(workdir_lib.config_path(workdir), "w") as f:
    json.dump(saved, f)


# ----------------------------------------------------------------------------
# get_field / set_field / flatten


def test_get_field_reads_nested_values_by_dotted_name():
  """Catches a getter that stops at the first level or mis-splits the name."""
  config = default.get_config()
  assert config_fields.get_field(config, "seed") == config.seed
  assert config_fields.get_field(config, "model.width") == 64
  assert config_fields.get_field(config, "eval.mig.num_seeds") == 3
  assert isinstance(config_fields.get_field(config, "eval.mig"), ml_collections.ConfigDict)
  # Plain dicts (a config.json) work the same way.
  assert config_fields.get_field({"a": {"b": {"c": 5}}}, "a.b.c") == 5


@pytest.mark.parametrize("field", [
    "no_such", "model.no_such", "eval.mig.no_such", "no_such.width",
    "model.width.deeper", "method.ice", "model.classifier_hidden.0"])
def test_get_field_of_a_missing_field_is_a_key_error_naming_the_full_dotted_field(field):
  """Catches a KeyError naming only the missing part ('no_such' instead of
  'model.no_such'), and a TypeError leaking out when a path goes through a leaf
  (an int, a string, a tuple)."""
  with pytest.raises(KeyError) as info:
    config_fields.get_field(default.get_config(), field)
  assert info.value.args == (field,)


def test_set_field_sets_an_existing_nested_field():
  """Catches a setter that writes to the wrong node (a copy, or the root)."""
  config = default.get_config()
  config_fields.set_field(config, "loss.zeta", 0.025)
  config_fields.set_field(config, "eval.mig.num_seeds", 5)
  config_fields.set_field(config, "seed", 7)
  assert (config.loss.zeta, config.eval.mig.num_seeds, config.seed) == (0.025, 5, 7)
  tree = {"a": {"b": 1}}
  config_fields.set_field(tree, "a.b", 2)
  assert tree == {"a": {"b": 2}}


@pytest.mark.parametrize("field", [
    "no_such", "model.no_such", "eval.mig.no_such", "no_such.width",
    "model.width.deeper", "method.ice"])
def test_set_field_never_creates_a_field_and_names_the_full_dotted_field(field):
  """Catches set_field creating a new field for a typo (an ablation or sweep
  that silently does nothing), a KeyError naming only the missing parent
  ('no_such' for 'no_such.width'), and a TypeError when the path runs through a
  leaf ('method.ice': 'ice' is a substring of 'dicefer', so a `leaf in node`
  test on a string passes)."""
  config = default.get_config()
  before = config.to_json()
  with pytest.raises(KeyError) as info:
    config_fields.set_field(config, field, 1)
  assert info.value.args == (field,)
  assert config.to_json() == before


def test_flatten_gives_dotted_names_and_lists_for_tuples():
  """Catches a flatten that drops nested blocks or keeps tuples (a tuple never
  equals the list JSON gives back, so every saved config would 'differ')."""
  config = default.get_config()
  flat = config_fields.flatten(config)
  assert flat["model.width"] == 64
  assert flat["eval.mig.num_seeds"] == 3
  assert flat["model.classifier_hidden"] == [256]
  assert "model" not in flat and "eval.mig" not in flat
  assert flat == config_fields.flatten(json.loads(config.to_json_best_effort()))
  assert config_fields.flatten({"a": {"b": (1, 2)}, "c": 3}) == {"a.b": [1, 2], "c": 3}


def test_differences_lists_changed_added_and_removed_fields_sorted():
  """Catches a diff that ignores fields present on one side only."""
  a = {"x": 1, "m": {"w": 2, "gone": 0}}
  b = {"x": 1, "m": {"w": 3, "new": 0}}
  assert config_fields.differences(a, b) == ["m.gone", "m.new", "m.w"]
  assert config_fields.differences(a, a) == []


# ----------------------------------------------------------------------------
# Which fields may change in a workdir, and which change results


@pytest.mark.parametrize("field, may_change, changes_results", [
    # Training goes on: a grown num_steps reuses the checkpoints but changes results.
    ("stage1.num_steps", True, True),
    ("stage2.num_steps", True, True),
    ("stage3.num_steps", True, True),
    ("baseline.num_steps", True, True),
    # Cosmetic: neither the model nor any number it reports.
    ("log_every", True, False),
    ("checkpoint_every", True, False),
    ("keep_checkpoints", True, False),
    ("eval_batch_size", True, False),
    ("data_source", True, False),
    ("tfds_dir", True, False),
    ("synthetic.cache_dir", True, False),
    # Evaluation settings: re-evaluate, never retrain.
    ("eval.mig.num_seeds", True, True),
    ("eval.retrieval_k", True, True),
    # Fixed for the life of a workdir.
    ("model.width", False, True),
    ("model.classifier_hidden", False, True),
    ("loss.zeta", False, True),
    ("seed", False, True),
    ("data_dir", False, True),
    ("synthetic.num_subjects", False, True),
    ("stage1.init_from", False, True),
    ("batch_size", False, True),
    ("fold", False, True),
])
def test_which_fields_may_change_in_a_workdir_and_which_change_results(
    field, may_change, changes_results):
  """Catches a field moved to the wrong list: a model field allowed to change
  (checkpoints restored into another architecture), a cosmetic field treated
  as changing results (a finished run retrained for a new log_every), or
  num_steps treated as cosmetic (a longer run reusing the shorter run's metrics)."""
  assert config_fields.may_change_in_workdir(field) is may_change
  assert config_fields.changes_results(field) is changes_results


def test_every_listed_field_exists_in_the_default_config():
  """Catches a COSMETIC/EXTENDABLE entry that names no field (a renamed field
  would silently become fixed for the life of a workdir)."""
  config = default.get_config()
  for field in config_fields.COSMETIC + config_fields.EXTENDABLE:
    config_fields.get_field(config, field)


def test_evaluation_prefix_needs_the_dot():
  """Catches `startswith('eval')` matching eval_batch_size or an `evaluator`
  field as an evaluation setting."""
  assert config_fields.is_evaluation("eval.seed")
  assert not config_fields.is_evaluation("eval_batch_size")
  assert not config_fields.is_evaluation("evaluator.x")
  assert not config_fields.may_change_in_workdir("evaluator.x")


# ----------------------------------------------------------------------------
# workdir.save_config


def test_save_config_writes_the_resolved_config(tmp_path):
  """Catches a first save that writes nothing, or not the config it was given."""
  workdir = str(tmp_path / "wd")
  config = default.get_config()
  config.model.width = 8
  workdir_lib.save_config(config, workdir, default.get_config())
  saved = _saved_json(workdir)
  assert saved["model"]["width"] == 8
  assert saved["model"]["classifier_hidden"] == [256]
  assert config_fields.differences(saved, json.loads(config.to_json_best_effort())) == []


def test_save_config_refuses_a_changed_model_field_in_one_line_naming_it(tmp_path):
  """Catches a workdir silently reused by another architecture (its checkpoints
  restored into the wrong model), a message that does not say which field, and
  a refused save that still overwrites the saved config."""
  workdir = str(tmp_path / "wd")
  workdir_lib.save_config(default.get_config(), workdir, default.get_config())
  before = _saved_json(workdir)
  changed = default.get_config()
  changed.model.width = 32
  changed.loss.zeta = 0.025
  with pytest.raises(UserError) as info:
    workdir_lib.save_config(changed, workdir, default.get_config())
  message = str(info.value)
  assert "model.width" in message and "loss.zeta" in message
  assert "\n" not in message
  assert _saved_json(workdir) == before


def test_save_config_accepts_grown_num_steps_eval_and_data_source_and_records_them(tmp_path):
  """Catches an allowed change refused (a longer run or a re-evaluation would
  need a new workdir), or accepted but not written (the next run compares
  against stale values)."""
  workdir = str(tmp_path / "wd")
  workdir_lib.save_config(default.get_config(), workdir, default.get_config())
  changed = default.get_config()
  changed.stage1.num_steps = 40000
  changed.eval.mig.num_seeds = 5
  changed.eval.retrieval_metric = "euclidean"
  changed.data_source = "tfds"
  changed.log_every = 7
  workdir_lib.save_config(changed, workdir, default.get_config())
  saved = _saved_json(workdir)
  assert saved["stage1"]["num_steps"] == 40000
  assert saved["eval"]["mig"]["num_seeds"] == 5
  assert saved["eval"]["retrieval_metric"] == "euclidean"
  assert saved["data_source"] == "tfds"
  assert saved["log_every"] == 7


def test_save_config_refuses_checkpoints_without_a_config(tmp_path):
  """Catches checkpoints of an unknown config adopted by whatever config is run
  next (there is nothing to compare them with)."""
  workdir = str(tmp_path / "wd")
  os.makedirs(workdir_lib.checkpoint_dir(workdir, "stage1"))
  with pytest.raises(UserError, match="checkpoints but no config.json") as info:
    workdir_lib.save_config(default.get_config(), workdir, default.get_config())
  assert "\n" not in str(info.value)
  assert not os.path.exists(workdir_lib.config_path(workdir))


# ----------------------------------------------------------------------------
# workdir.read_config of a config.json older than today's fields


def _old_workdir(tmp_path, config=None) -> str:
  """A workdir whose config.json predates data_source, eval and stage1.init_from."""
  workdir = str(tmp_path / "old")
  os.makedirs(workdir)
  saved = json.loads((config or default.get_config()).to_json_best_effort())
  del saved["data_source"]
  del saved["eval"]
  del saved["stage1"]["init_from"]
  _write_json(workdir, saved)
  return workdir


def test_read_config_of_an_old_workdir_fills_missing_fields_with_defaults(tmp_path):
  """Catches an old workdir that no longer loads (KeyError on a field it
  predates) or loads with the field missing (evaluate then fails on it)."""
  config = default.get_config()
  config.model.width = 16
  workdir = _old_workdir(tmp_path, config)
  today = default.get_config()
  read = workdir_lib.read_config(workdir, today)
  assert read.data_source == today.data_source
  assert read.stage1.init_from == today.stage1.init_from
  assert read.eval.to_dict() == today.eval.to_dict()
  assert read.model.width == 16  # saved values win over defaults
  assert read.stage1.num_steps == today.stage1.num_steps


def test_read_config_restores_tuples_and_float_types(tmp_path):
  """Catches JSON's list left in place of a tuple (model code and config
  comparisons expect the tuple), and an int from JSON kept in a float field,
  which ConfigDict's type safety then refuses to override with a float."""
  workdir = _old_workdir(tmp_path)
  saved = _saved_json(workdir)
  saved["loss"]["mu"] = 1  # json.dump of a float field that happened to be whole
  _write_json(workdir, saved)
  read = workdir_lib.read_config(workdir, default.get_config())
  assert read.model.classifier_hidden == (256,)
  assert isinstance(read.model.classifier_hidden, tuple)
  assert isinstance(read.loss.mu, float) and read.loss.mu == 1.0
  config_fields.set_field(read, "loss.mu", 0.25)
  assert read.loss.mu == 0.25
  assert isinstance(read.eval.mig, ml_collections.ConfigDict)


def test_read_config_does_not_change_the_defaults_it_is_given(tmp_path):
  """Catches the overlay written into the caller's defaults (the next workdir
  read with them would inherit this one's values)."""
  config = default.get_config()
  config.model.width = 16
  workdir = _old_workdir(tmp_path, config)
  defaults = default.get_config()
  workdir_lib.read_config(workdir, defaults)
  assert defaults.model.width == 64


def test_read_config_of_a_dir_without_config_is_a_user_error(tmp_path):
  """Catches a FileNotFoundError traceback for a mistyped --workdir."""
  with pytest.raises(UserError, match="not a training workdir"):
    workdir_lib.read_config(str(tmp_path), default.get_config())


def test_save_config_of_defaults_into_an_old_workdir_is_accepted(tmp_path):
  """Catches a field missing from an old config.json treated as a change: every
  workdir written before a new field was added would be refused."""
  workdir = _old_workdir(tmp_path)
  workdir_lib.save_config(default.get_config(), workdir, default.get_config())
  saved = _saved_json(workdir)
  # The saved file now spells out today's fields.
  assert saved["data_source"] == "files"
  assert saved["stage1"]["init_from"] == ""
  assert saved["eval"]["mig"]["num_seeds"] == 3


def test_save_config_into_an_old_workdir_still_refuses_a_real_change(tmp_path):
  """Catches the defaults overlay hiding a real difference (the saved width
  replaced by today's default before comparing)."""
  workdir = _old_workdir(tmp_path)
  changed = default.get_config()
  changed.stage1.init_from = "baseline"
  with pytest.raises(UserError, match="stage1.init_from"):
    workdir_lib.save_config(changed, workdir, default.get_config())


def test_a_workdir_saved_before_global_stage_existed_rebuilds_its_model():
  """Catches a reader without defaults (dicefer_jax.Predictor) failing on a
  workdir saved before model.global_stage existed: its global critics scored
  the last stage, global_stage=4. A value that was saved is kept."""
  from dicefer_jax import models  # pylint: disable=g-import-not-at-top
  saved = json.loads(default.get_config().to_json_best_effort())
  del saved["model"]["global_stage"]
  config = config_fields.from_saved(saved)
  assert config.model.global_stage == 4
  models.build_model(config.model, 7)
  saved["model"]["global_stage"] = 2
  assert config_fields.from_saved(saved).model.global_stage == 2


def test_a_field_a_workdir_predates_reads_as_what_it_trained_with_not_todays_default():
  """Catches `with_defaults` (every entry point's reader) filling a field the
  saved config predates from today's default once that default has moved on:
  the workdir's stage-2 critics would be rebuilt for another encoder's maps at
  another stage, and the protocol would take an old run for the new setting."""
  defaults = default.get_config()
  defaults.model.id_critic_input, defaults.model.id_critic_stage = "exp_encoder", 2
  defaults.model.critic = "separable"
  saved = json.loads(default.get_config().to_json_best_effort())
  del saved["model"]["id_critic_input"], saved["model"]["id_critic_stage"]
  del saved["model"]["critic"]
  config = config_fields.with_defaults(saved, defaults)
  assert (config.model.id_critic_input, config.model.id_critic_stage) == ("id_encoder", 0)
  assert config.model.critic == "concat"
  assert "id_critic_input" not in saved["model"]  # the caller's dict is left alone
  saved["model"]["id_critic_stage"] = 3
  assert config_fields.with_defaults(saved, defaults).model.id_critic_stage == 3
  # A field outside the backfill list still comes from today's defaults.
  del saved["model"]["critic_hidden"]
  defaults.model.critic_hidden = 17
  assert config_fields.with_defaults(saved, defaults).model.critic_hidden == 17


def test_a_workdir_saved_before_seen_holdout_existed_trained_on_every_image():
  """Catches an old workdir read without the field (or with today's default
  changed) holding out images it trained on."""
  saved = json.loads(default.get_config().to_json_best_effort())
  del saved["seen_holdout"]
  assert config_fields.from_saved(saved).seen_holdout == 0.0
  saved["seen_holdout"] = 0.2
  assert config_fields.from_saved(saved).seen_holdout == 0.2
