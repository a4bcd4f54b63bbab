"""experiments.evaluate on a workdir: the evaluators wired to the right codes,
images and settings, metrics.json and the report, its errors, and the export of
every image's codes.

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
            "retrieval", "plots", "eval_settings", "timings_s", "notes", "seen_vs_unseen"}


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
  """(config, settings, data, test outputs, probe indices into the test split,
  outputs of the training images the probe's PCA is fitted on), from scratch."""
  config = workdir_lib.read_config(workdir, default.get_config())
  settings = evaluator.EvalSettings.from_config(config.eval)
  model, state = train.restore_trained(config, workdir)
  data = data_lib.split_faces(config, data_lib.load_face_set(config.data_dir))
  idx = common.subsample_by_subject(data.test_subjects, settings.probe_max_images,
                                    settings.seed)
  fit = common.subsample(len(data.train_labels), settings.probe_max_images, settings.seed)
  return (config, settings, data, train.predict(config, model, state, data.test_images),
          idx, train.predict(config, model, state, data.train_images[fit]))


def _probes_by_hand(codes, train_codes, subjects, labels, settings, num_components):
  """(raw probe, PCA-matched probe) of one code, as the evaluator should run them."""
  probe = lambda x: identity.identity_probe(x, subjects, labels,
                                            test_fraction=settings.probe_test_fraction,
                                            seed=settings.seed)
  project = identity.fit_pca(train_codes, num_components)
  return (json.loads(json.dumps(probe(codes))),
          json.loads(json.dumps(dict(probe(project(codes)), input_dim=codes.shape[1]))))


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

  # Leakage: the subject probe on each code of the TEST split's people, raw and
  # projected to the narrowest code's width (z_exp, 8-d in the tiny config) by a
  # PCA of training images' codes.
  leak = saved["identity_leakage"]
  subjects = [data.test_subjects[i] for i in idx]
  assert set(subjects) == set(data.test_subjects) and not set(subjects) & set(
      data.train_subjects)
  assert leak["pca_dim"] == tiny_config.model.exp_dim == 8
  for name in ("z_exp", "z_id", "feature"):
    raw, matched = _probes_by_hand(out[name][idx], train_out[name], subjects,
                                   data.test_labels[idx], settings, leak["pca_dim"])
    assert leak["probes_raw"][name] == raw
    assert leak["probes"][name] == matched and matched["code_dim"] == 8
  assert leak["probes_raw"]["feature"]["code_dim"] == 8 * tiny_config.model.width
  assert leak["accuracy"] == leak["probes"]["z_exp"]["accuracy"]
  assert leak["accuracy_raw"] == leak["probes_raw"]["z_exp"]["accuracy"]
  assert leak["chance"] == leak["probes"]["z_exp"]["chance"]
  assert leak["num_subjects"] == len(set(data.test_subjects))

  # Retrieval on the test codes, z_exp as the expression representation.
  expected = retrieval.cross_subject_retrieval(out["z_exp"], data.test_labels,
                                               data.test_subjects, k=settings.retrieval_k,
                                               metric=settings.retrieval_metric)
  assert saved["retrieval"]["precision_at_k"] == pytest.approx(expected["precision_at_k"])
  assert saved["retrieval"]["by_code"]["z_exp"]["cross_subject"]

  # MIG: the same critics on the same test codes give the same per-seed values.
  mig = mi_estimation.modified_mig(data.test_labels, data.test_subjects, z_exp=out["z_exp"],
                                   z_id=out["z_id"], feature=out["feature"],
                                   predictions=out["prediction"], settings=settings.mig)
  assert saved["mig"]["per_seed"] == pytest.approx(mig["per_seed"])
  assert len(saved["mig"]["per_seed"]) == tiny_config.eval.mig.num_seeds
  assert saved["mig"]["interval"] == pytest.approx(json.loads(json.dumps(mig["interval"])))
  assert saved["mig"]["terms"]["exp_pair"]["plugin_bound"] == json.loads(json.dumps(
      mig["terms"]["exp_pair"]["plugin_bound"]))
  # Calibrated at the terms' sizes and the codes' widths.
  for name in ("exp_pair", "exp_id"):
    c = saved["mig"]["calibration"][name]
    assert (c["x_dim"], c["z_dim"]) == (8, 8) and len(c["levels"]) == 3
    assert c["num_heldout"] == saved["mig"]["terms"][name]["num_heldout"]
  assert "stage2.num_steps=0" in " ".join(saved["notes"])
  # No images of training subjects were held out: the gap is null with the reason.
  assert saved["seen_vs_unseen"]["gap_points"] is None
  assert "seen_holdout=0" in saved["seen_vs_unseen"]["reason"]

  for name in ("confusion", "tsne_exp_by_expression", "tsne_exp_by_subject",
               "tsne_id_by_subject"):
    assert os.path.getsize(os.path.join(workdir, "eval", saved["plots"][name]["file"])) > 1000
  report = open(os.path.join(workdir, "eval", "report.md")).read()
  assert f"| accuracy | {saved['accuracy']:.3f} |" in report
  assert (f"| identity leakage (z_exp, held-out subjects, 8 PCs) | "
          f"{leak['accuracy']:.3f} |") in report
  assert "## MI estimator calibration" in report
  line = evaluate_lib.summary_line(saved)
  assert (f"leakage {leak['accuracy']:.3f} (chance {leak['chance']:.3f}; "
          "held-out subjects, 8 PCs)") in line
  assert f"[{saved['mig']['interval']['low']:.3f}, {saved['mig']['interval']['high']:.3f}]" in line


def test_seen_accuracy_is_scored_on_held_out_images_of_training_subjects(tiny_config,
                                                                        tmp_path):
  """Bug it catches: the seen accuracy scored on training images (or test images),
  or the held-out images still trained on."""
  tiny_config.seen_holdout = 0.25
  workdir = _untrained_workdir(tiny_config, str(tmp_path / "wd"))
  saved = evaluate_lib.evaluate(workdir)
  config, _, data, out, _, _ = _by_hand(workdir)
  assert config.seen_holdout == 0.25
  whole = tiny_config.copy_and_resolve_references()
  whole.seen_holdout = 0.0
  everything = data_lib.split_faces(whole, data_lib.load_face_set(whole.data_dir))
  # The held-out images are the training subjects' and no longer train.
  assert len(data.seen_labels) + len(data.train_labels) == len(everything.train_labels)
  assert set(data.seen_subjects) == set(everything.train_subjects)
  assert data.split_info.num_seen == len(data.seen_labels) > 0
  seen = saved["seen_vs_unseen"]
  model, state = train.restore_trained(config, workdir)
  predicted = train.predict(config, model, state, data.seen_images)["prediction"]
  assert seen["seen_accuracy"] == pytest.approx(np.mean(predicted == data.seen_labels))
  assert seen["unseen_accuracy"] == saved["accuracy"] == pytest.approx(
      np.mean(out["prediction"] == data.test_labels))
  assert seen["gap_points"] == pytest.approx(
      100 * (seen["seen_accuracy"] - seen["unseen_accuracy"]))
  assert seen["num_seen"] == len(data.seen_labels)
  report = open(os.path.join(workdir, "eval", "report.md")).read()
  assert f"| seen - unseen gap (points) | {seen['gap_points']:.1f} |" in report


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
  leak = m["identity_leakage"]
  for probes in (leak["probes"], leak["probes_raw"]):
    assert probes["z_exp"]["accuracy"] is None and probes["z_exp"]["reason"]
    assert probes["z_id"]["accuracy"] is None
  # The feature alone sets the width: 32-d, under probe_pca_dim=64.
  assert leak["pca_dim"] == 8 * tiny_config.model.width
  raw, matched = _probes_by_hand(out["feature"][idx], train_out["feature"],
                                 [data.test_subjects[i] for i in idx],
                                 data.test_labels[idx], settings, leak["pca_dim"])
  assert leak["probes"]["feature"] == matched and leak["probes_raw"]["feature"] == raw
  assert leak["accuracy"] == matched["accuracy"]
  assert set(m["mig"]["calibration"]) == {"feature_pair"}
  assert m["mig"]["calibration"]["feature_pair"]["x_dim"] == 8 * tiny_config.model.width
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
  with pytest.raises(UserError, match=r"--config.eval.probe_pca_dim=0 must be at least 1"):
    evaluate_lib.evaluate(workdir, {"probe_pca_dim": 0})
  with pytest.raises(UserError, match=r"mig.bootstrap_resamples=-1 must be 0 or more"):
    evaluate_lib.evaluate(workdir, {"mig.bootstrap_resamples": -1})
  m = evaluate_lib.evaluate(workdir, {"mig.calibrate": False, "probe_pca_dim": 4})
  assert "turned off" in m["mig"]["calibration"]["reason"]
  assert m["identity_leakage"]["pca_dim"] == 4


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


def test_export_codes_writes_every_image_and_refuses_to_overwrite(trained_workdir, tmp_path):
  """Bug caught: codes of one split only, rows out of line with their labels,
  subjects or paths, test codes that are not the model's, or an export that
  silently replaces an earlier file."""
  target = str(tmp_path / "codes.npz")
  assert evaluate_lib.evaluate(trained_workdir, export_codes=target, export_only=True) is None
  config, _, data, out, _, _ = _by_hand(trained_workdir)
  saved = np.load(target)
  n_train, n_test = len(data.train_labels), len(data.test_labels)
  assert saved["is_test"].sum() == n_test and len(saved["is_test"]) == n_train + n_test
  assert not saved["is_test"][:n_train].any()
  for name, width in (("z_exp", config.model.exp_dim), ("z_id", config.model.id_dim),
                      ("feature", 8 * config.model.width)):
    assert saved[name].shape == (n_train + n_test, width) and saved[name].dtype == np.float32
  test = saved["is_test"]
  np.testing.assert_allclose(saved["z_exp"][test], out["z_exp"], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(saved["prediction"][test], out["prediction"])
  np.testing.assert_array_equal(saved["label"], np.concatenate([data.train_labels,
                                                                data.test_labels]))
  assert list(saved["subject"]) == list(data.train_subjects) + list(data.test_subjects)
  # Each path names its row's expression folder and subject (the tiny set's
  # files are <expression>/<subject>_<k>.png), and exists.
  for path, label, subject in zip(saved["path"], saved["label"], saved["subject"]):
    assert path.startswith(f"{contract.EXPRESSIONS[label]}/{subject}_"), path
    assert os.path.exists(os.path.join(config.data_dir, path))
  assert str(saved["method"]) == "dicefer" and list(saved["class_names"]) == list(
      contract.EXPRESSIONS)
  # Test accuracy recomputed from the file alone.
  assert np.mean(saved["prediction"][test] == saved["label"][test]) == pytest.approx(
      np.mean(out["prediction"] == data.test_labels))
  assert not os.path.exists(workdir_lib.eval_metrics_path(trained_workdir))

  before = os.path.getmtime(target)
  with pytest.raises(UserError, match="exists: it is never overwritten"):
    evaluate_lib.evaluate(trained_workdir, export_codes=target)
  assert os.path.getmtime(target) == before
  with pytest.raises(UserError, match="needs --export_codes"):
    evaluate_lib.evaluate(trained_workdir, export_only=True)
  with pytest.raises(UserError, match="name a .npz file"):
    evaluate_lib.evaluate(trained_workdir, export_codes=str(tmp_path / "codes"))


def test_export_codes_then_the_usual_evaluation(trained_workdir, tmp_path):
  """Without --export_only the export comes with the evaluation, not instead of it."""
  target = str(tmp_path / "more_codes.npz")
  result = evaluate_lib.evaluate(trained_workdir, {"mig.calibrate": False,
                                                   "tsne_max_points": 0},
                                 export_codes=target)
  assert os.path.exists(target) and result["num_examples"] == np.load(target)["is_test"].sum()
  assert os.path.exists(workdir_lib.eval_metrics_path(trained_workdir))
