"""experiments.evaluate on a workdir: the evaluators wired to the right codes,
images and settings, metrics.json and the report, and its errors.

The metrics themselves are tested on constructed codes in test_metrics.py; here
each number in metrics.json is recomputed by hand from the restored model, so a
wiring slip (z_id probed as z_exp, training images scored as test images, the
workdir's settings ignored) fails.
"""

import json
import os

from absl import flags
from ml_collections import config_flags
import numpy as np
import pytest

from dicefer_jax import contract, train
from dicefer_jax import data as data_lib
from dicefer_jax import workdir as workdir_lib
from dicefer_jax.errors import UserError
from dicefer_jax.evaluation import common, evaluator, identity, mi_estimation, retrieval
from experiments import evaluate as evaluate_lib
from experiments import run as run_lib
from experiments.configs import baseline as baseline_config
from experiments.configs import default

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP_KEYS = {"accuracy", "macro_f1", "per_class_recall", "confusion", "confusion_normalized",
            "num_examples", "method", "split", "representation", "mig", "identity_leakage",
            "retrieval", "plots", "eval_settings", "timings_s", "notes"}


def _untrained_workdir(config, workdir, method="dicefer"):
  """A finished workdir of 0-step stages: evaluation's wiring does not need a
  trained model, only distinct codes, and this keeps the test fast."""
  config.method = method
  config.num_folds = 2
  for stage in ("stage1", "stage2", "stage3", "baseline"):
    config[stage].num_steps = 0
  run_lib.run(config, workdir, "all")
  return workdir


def _by_hand(workdir):
  """(config, settings, data, test outputs, train outputs) recomputed from scratch."""
  config = workdir_lib.read_config(workdir, default.get_config())
  settings = evaluator.EvalSettings.from_config(config.eval)
  model, state = train.restore_trained(config, workdir)
  data = data_lib.split_faces(config, data_lib.load_face_set(config.data_dir))
  idx = common.subsample_by_subject(data.train_subjects, settings.probe_max_images,
                                    settings.seed)
  return (config, settings, data, train.predict(config, model, state, data.test_images),
          idx, train.predict(config, model, state, data.train_images[idx]))


def test_every_dicefer_number_is_the_evaluator_on_the_right_codes(tiny_config, tmp_path):
  workdir = _untrained_workdir(tiny_config, str(tmp_path / "wd"))
  result = evaluate_lib.evaluate(workdir)
  saved = json.load(open(os.path.join(workdir, "eval", "metrics.json")))
  assert saved == json.loads(json.dumps(result)) and TOP_KEYS <= set(saved)
  config, settings, data, out, idx, train_out = _by_hand(workdir)
  assert saved["eval_settings"] == json.loads(json.dumps(settings.as_dict()))
  assert saved["eval_settings"]["mig"]["num_steps"] == tiny_config.eval.mig.num_steps

  # Accuracy of stage 3's predictions on the TEST split.
  assert saved["accuracy"] == pytest.approx(np.mean(out["prediction"] == data.test_labels))
  assert saved["num_examples"] == len(data.test_labels)
  assert saved["representation"]["expression"] == "z_exp"

  # Leakage: the subject probe on each code of training subjects' images.
  subjects = [data.train_subjects[i] for i in idx]
  for name in ("z_exp", "z_id", "feature"):
    expected = identity.identity_probe(train_out[name], subjects, data.train_labels[idx],
                                       test_fraction=settings.probe_test_fraction,
                                       seed=settings.seed)
    assert saved["identity_leakage"]["probes"][name] == json.loads(json.dumps(expected))
  assert saved["identity_leakage"]["accuracy"] == saved["identity_leakage"]["probes"]["z_exp"]["accuracy"]

  # Retrieval on the test codes, z_exp as the expression representation.
  expected = retrieval.cross_subject_retrieval(out["z_exp"], data.test_labels,
                                               data.test_subjects, k=settings.retrieval_k,
                                               metric=settings.retrieval_metric)
  assert saved["retrieval"]["precision_at_k"] == pytest.approx(expected["precision_at_k"])
  assert saved["retrieval"]["by_code"]["z_exp"]["cross_subject"]

  # MIG: the same critics on the same test codes give the same per-seed values.
  mig = mi_estimation.modified_mig(data.test_labels, data.test_subjects, z_exp=out["z_exp"],
                                   z_id=out["z_id"], feature=out["feature"],
                                   settings=settings.mig)
  assert saved["mig"]["per_seed"] == pytest.approx(mig["per_seed"])
  assert len(saved["mig"]["per_seed"]) == tiny_config.eval.mig.num_seeds
  assert "stage2.num_steps=0" in " ".join(saved["notes"])

  for name in ("confusion", "tsne_exp_by_expression", "tsne_exp_by_subject",
               "tsne_id_by_subject"):
    assert os.path.getsize(os.path.join(workdir, "eval", saved["plots"][name]["file"])) > 1000
  report = open(os.path.join(workdir, "eval", "report.md")).read()
  assert f"| accuracy | {saved['accuracy']:.3f} |" in report
  assert f"| identity leakage (z_exp) | {saved['identity_leakage']['accuracy']:.3f} |" in report


def test_baseline_reports_the_terms_it_has_and_null_with_reasons(tiny_config, tmp_path):
  """Bug caught: the baseline scored on its (never trained) code head instead of
  the pooled feature its linear head classifies, or a null without a reason."""
  tiny_config.eval.tsne_max_points = 0
  workdir = _untrained_workdir(tiny_config, str(tmp_path / "wd"), method="baseline")
  m = evaluate_lib.evaluate(workdir)
  _, settings, data, out, idx, train_out = _by_hand(workdir)
  assert m["method"] == "baseline" and m["representation"]["expression"] == "feature"
  assert m["accuracy"] == pytest.approx(np.mean(out["prediction"] == data.test_labels))
  assert m["mig"]["mean"] is None and "no identity encoder" in m["mig"]["reason"]
  assert m["mig"]["terms"]["feature_pair"]["mean"] is not None
  assert m["mig"]["representation_pair"] == "feature_pair"
  probes = m["identity_leakage"]["probes"]
  assert probes["z_exp"]["accuracy"] is None and probes["z_exp"]["reason"]
  assert probes["z_id"]["accuracy"] is None
  expected = identity.identity_probe(
      train_out["feature"], [data.train_subjects[i] for i in idx], data.train_labels[idx],
      test_fraction=settings.probe_test_fraction, seed=settings.seed)
  assert probes["feature"] == json.loads(json.dumps(expected))
  assert m["identity_leakage"]["accuracy"] == expected["accuracy"]
  assert m["retrieval"]["precision_at_k"] == m["retrieval"]["by_code"]["feature"]["precision_at_k"]
  assert m["plots"]["tsne_exp_by_expression"]["file"] is None
  assert "turned off" in m["plots"]["tsne_exp_by_expression"]["reason"]


def test_leakage_without_subject_ids_is_null_with_the_reason(tiny_faceset, tiny_config,
                                                              tmp_path):
  """Bug caught: a probe fitted on unknown subjects ('' as one class) reported as leakage."""
  records = contract.read_manifest(tiny_faceset)
  contract.write_manifest(tiny_faceset, [
      contract.Record(r.path, r.expression, "", r.source) for r in records])
  tiny_config.eval.tsne_max_points = 0
  workdir = _untrained_workdir(tiny_config, str(tmp_path / "wd"), method="baseline")
  m = evaluate_lib.evaluate(workdir)
  assert m["split"]["kind"] == "stratified"
  assert m["identity_leakage"]["accuracy"] is None
  assert "unknown" in m["identity_leakage"]["reason"]
  assert not m["retrieval"]["by_code"]["feature"]["cross_subject"]
  assert not m["mig"]["cross_subject_pairs"]
  assert any("stratified split" in n for n in m["notes"])


def test_eval_overrides_change_the_settings_and_bad_ones_are_one_line(tiny_config,
                                                                      tmp_path):
  """Bug caught: --config.eval.* overrides ignored, or a nonsense value (0 critic
  seeds) failing deep inside instead of naming the flag."""
  tiny_config.eval.tsne_max_points = 0
  workdir = _untrained_workdir(tiny_config, str(tmp_path / "wd"), method="baseline")
  m = evaluate_lib.evaluate(workdir, {"retrieval_k": 3, "mig.num_seeds": 1})
  assert m["retrieval"]["k"] == 3 and m["eval_settings"]["retrieval_k"] == 3
  assert len(m["mig"]["terms"]["feature_pair"]["per_seed"]) == 1
  with pytest.raises(UserError, match=r"--config.eval.mig.num_seeds=0 must be at least 1"):
    evaluate_lib.evaluate(workdir, {"mig.num_seeds": 0})
  with pytest.raises(UserError, match="config.eval.no_such does not exist"):
    evaluate_lib.evaluate(workdir, {"no_such": 1})
  with pytest.raises(UserError, match="retrieval_metric"):
    evaluate_lib.evaluate(workdir, {"retrieval_metric": "manhattan"})


def test_baseline_config_file_takes_a_base_name():
  """Bug caught: baseline.py:demo silently training at the default size."""
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
          "--config.baseline.num_steps=0", "--config.num_folds=2",
          "--config.eval.tsne_max_points=0"]
  fv = flags.FlagValues()
  # sys_argv: the overrides are found in this argv, not in pytest's.
  holder = config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=argv)
  fv(argv)
  config = holder.value
  assert config.method == "baseline" and config.image_size == 32
  workdir = str(tmp_path / "wd")
  run_lib.run(config, workdir, "all")
  m = evaluate_lib.evaluate(workdir)
  assert m["method"] == "baseline" and m["stage"] == "baseline"
  assert np.sum(m["confusion"]) == m["num_examples"]
