"""experiments.evaluate end to end: every metric in metrics.json, for both methods.

The workdirs are trained for 0 steps per stage (each stage still writes its
checkpoint): the model is untrained, which is all the wiring needs, and no
training step is compiled, which keeps these tests to seconds on 2 cores. The
metrics themselves are checked on known answers in test_evaluation.py.
"""

import json
import os

from absl import flags
from ml_collections import config_flags
import numpy as np
import pytest

from dicefer_jax import contract, evaluation
from dicefer_jax.errors import UserError
from experiments import evaluate as evaluate_lib
from experiments import run as run_lib
from experiments.configs import baseline as baseline_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Cheap critics; on the tiny test split (3 subjects x 3 images per expression with
# 2 folds) a third of the images per part leaves pairs in every part.
SMALL = evaluate_lib.EvalSettings(
    mig=evaluation.CriticSettings(num_seeds=2, num_steps=50, heldout_fraction=1 / 3,
                                  validation_fraction=0.5),
    probe_max_images=200, tsne_max_points=40)
TOP_KEYS = {"accuracy", "macro_f1", "per_class_recall", "confusion", "confusion_normalized",
            "num_examples", "method", "split", "representation", "mig", "identity_leakage",
            "retrieval", "plots", "eval_settings", "timings_s", "notes"}


def _untrained_workdir(config, workdir, method="dicefer"):
  config.method = method
  config.num_folds = 2
  for stage in ("stage1", "stage2", "stage3", "baseline"):
    config[stage].num_steps = 0
  run_lib.run(config, workdir, "all")
  return workdir


def test_dicefer_workdir_gets_every_metric(tiny_config, tmp_path):
  workdir = _untrained_workdir(tiny_config, str(tmp_path / "wd"))
  result = evaluate_lib.evaluate(workdir, SMALL)
  saved = json.load(open(os.path.join(workdir, "eval", "metrics.json")))
  assert saved == json.loads(json.dumps(result))
  assert TOP_KEYS <= set(saved)
  assert saved["representation"]["expression"] == "z_exp"
  assert not os.path.exists(os.path.join(workdir, "eval", "metrics.json.tmp"))

  mig = saved["mig"]
  assert mig["mean"] is not None and len(mig["per_seed"]) == 2
  for term in ("exp_pair", "exp_id", "feature_pair"):
    assert mig["terms"][term]["mean"] is not None, mig["terms"][term]
  assert mig["settings"]["num_steps"] == 50 and mig["cross_subject_pairs"]
  assert "stage2.num_steps=0" in " ".join(saved["notes"])

  leak = saved["identity_leakage"]
  assert leak["representation"] == "z_exp"
  # 3 training subjects, the probe tested on images it was not fitted on.
  assert leak["num_subjects"] == 3 and leak["chance"] >= 1 / 3
  for name in ("z_exp", "z_id", "feature"):
    assert 0.0 <= leak["probes"][name]["accuracy"] <= 1.0
  assert leak["accuracy"] == leak["probes"]["z_exp"]["accuracy"]

  ret = saved["retrieval"]
  assert ret["k"] == 6 and 0.0 <= ret["precision_at_k"] <= 1.0
  assert ret["by_code"]["z_exp"]["cross_subject"]

  for name in ("confusion", "tsne_exp_by_expression", "tsne_exp_by_subject",
               "tsne_id_by_subject"):
    assert os.path.getsize(os.path.join(workdir, "eval", saved["plots"][name]["file"])) > 1000

  # The same workdir and settings give the same numbers (critics are seeded).
  again = evaluate_lib.evaluate(workdir, SMALL)
  assert again["mig"]["per_seed"] == result["mig"]["per_seed"]
  assert again["identity_leakage"]["probes"] == result["identity_leakage"]["probes"]


def test_baseline_reports_the_terms_it_has_and_null_with_reasons(tiny_config, tmp_path):
  workdir = _untrained_workdir(tiny_config, str(tmp_path / "wd"), method="baseline")
  settings = evaluate_lib.EvalSettings(mig=SMALL.mig, probe_max_images=200,
                                       tsne_max_points=0)
  m = evaluate_lib.evaluate(workdir, settings)
  assert m["method"] == "baseline" and m["representation"]["expression"] == "feature"
  assert m["mig"]["mean"] is None and "no identity encoder" in m["mig"]["reason"]
  assert m["mig"]["terms"]["feature_pair"]["mean"] is not None
  assert m["mig"]["terms"]["exp_id"]["reason"]
  assert m["mig"]["representation_pair"] == "feature_pair"
  probes = m["identity_leakage"]["probes"]
  assert probes["z_exp"]["accuracy"] is None and probes["z_exp"]["reason"]
  assert probes["z_id"]["accuracy"] is None and probes["feature"]["accuracy"] is not None
  assert m["identity_leakage"]["accuracy"] == probes["feature"]["accuracy"]
  assert m["retrieval"]["precision_at_k"] == m["retrieval"]["by_code"]["feature"]["precision_at_k"]
  assert m["plots"]["tsne_exp_by_expression"]["file"] is None
  assert "turned off" in m["plots"]["tsne_exp_by_expression"]["reason"]


def test_leakage_without_subject_ids_is_null_with_the_reason(tiny_faceset, tiny_config,
                                                              tmp_path):
  records = contract.read_manifest(tiny_faceset)
  contract.write_manifest(tiny_faceset, [
      contract.Record(r.path, r.expression, "", r.source) for r in records])
  workdir = _untrained_workdir(tiny_config, str(tmp_path / "wd"), method="baseline")
  m = evaluate_lib.evaluate(workdir, evaluate_lib.EvalSettings(
      mig=SMALL.mig, tsne_max_points=0))
  assert m["split"]["kind"] == "stratified"
  assert m["identity_leakage"]["accuracy"] is None
  assert "unknown" in m["identity_leakage"]["reason"]
  assert not m["retrieval"]["by_code"]["feature"]["cross_subject"]
  assert not m["mig"]["cross_subject_pairs"]
  assert any("stratified split" in n for n in m["notes"])


def test_eval_flags_map_to_settings_and_bad_values_are_user_errors():
  fv = flags.FlagValues()
  holders = evaluate_lib.define_flags(fv)
  fv(["prog", "--mig_seeds=5", "--mig_steps=40", "--tsne_max_points=0",
      "--retrieval_metric=euclidean"])
  s = evaluate_lib.settings_from_flags(holders)
  assert (s.mig.num_seeds, s.mig.num_steps, s.tsne_max_points) == (5, 40, 0)
  assert s.retrieval_metric == "euclidean" and s.retrieval_k == 6
  fv["mig_seeds"].value = 0
  with pytest.raises(UserError, match="--mig_seeds=0"):
    evaluate_lib.settings_from_flags(holders)


def test_baseline_config_file_takes_a_base_name():
  assert baseline_config.get_config().method == "baseline"
  assert baseline_config.get_config().image_size == 112
  demo = baseline_config.get_config("demo")
  assert demo.method == "baseline" and demo.image_size == 64
  with pytest.raises(ValueError, match="unknown base config"):
    baseline_config.get_config("huge")


def test_baseline_config_string_through_config_flags(tiny_faceset, tmp_path):
  """--config=experiments/configs/baseline.py:tiny, as experiments.run parses it."""
  path = os.path.join(REPO, "experiments", "configs", "baseline.py")
  argv = ["prog", f"--config={path}:tiny", f"--config.data_dir={tiny_faceset}",
          "--config.baseline.num_steps=0", "--config.num_folds=2"]
  fv = flags.FlagValues()
  # sys_argv: the overrides are found in this argv, not in pytest's.
  holder = config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=argv)
  fv(argv)
  config = holder.value
  assert config.method == "baseline" and config.image_size == 32
  workdir = str(tmp_path / "wd")
  run_lib.run(config, workdir, "all")
  m = evaluate_lib.evaluate(workdir, evaluate_lib.EvalSettings(mig=SMALL.mig,
                                                                tsne_max_points=0))
  assert m["method"] == "baseline" and m["stage"] == "baseline"
  assert np.sum(m["confusion"]) == m["num_examples"]
