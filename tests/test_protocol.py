"""experiments.protocol: variants, folds, resume after an interruption, the table.

Most tests stand fake `run`/`evaluate` functions in for training, so that the
bookkeeping (which runs happen, which are reused, what the table says) is checked
exactly and in seconds; one test runs the real thing on the tiny config.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dicefer_jax import contract, evaluation, train
from dicefer_jax.errors import UserError
from experiments import evaluate as evaluate_lib
from experiments import protocol
from experiments import run as run_lib
from experiments.configs import ablations, tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = evaluate_lib.EvalSettings(
    mig=evaluation.CriticSettings(num_seeds=1, num_steps=30, heldout_fraction=1 / 3,
                                  validation_fraction=0.5),
    probe_max_images=200, tsne_max_points=0)


class FakeRuns:
  """Stands in for run.run and evaluate.evaluate.

  `run` saves the config as the real one does first (so a workdir from another
  config is refused the same way); `evaluate` writes a metrics.json whose numbers
  encode the run: accuracy = 0.5 + 0.1 * fold (+ 0.05 for the baseline).
  """

  def __init__(self, interrupt_at_eval=None, diverge=()):
    self.runs, self.evals = [], []
    self.interrupt_at_eval = interrupt_at_eval
    self.diverge = set(diverge)

  @staticmethod
  def _name(workdir):
    return os.path.join(*workdir.split(os.sep)[-2:])

  def run(self, config, workdir, stage):
    assert stage == "all"
    train.check_and_save_config(config, workdir)
    self.runs.append(self._name(workdir))
    if self._name(workdir) in self.diverge:
      raise train.TrainingDiverged("stage1: loss became NaN or inf at step 3; stopped.")

  def evaluate(self, workdir, settings):
    self.evals.append(self._name(workdir))
    if len(self.evals) == self.interrupt_at_eval:
      raise KeyboardInterrupt
    config = train.load_config(workdir)
    accuracy = 0.5 + 0.1 * config.fold + (0.05 if config.method == "baseline" else 0.0)
    dicefer = config.method == "dicefer"
    metrics = dict(
        accuracy=accuracy, macro_f1=accuracy - 0.1,
        mig=dict(mean=1.0 + config.fold if dicefer else None,
                 representation_pair="exp_pair" if dicefer else "feature_pair",
                 terms=dict(exp_pair=dict(mean=2.0), exp_id=dict(mean=1.0 if dicefer else None),
                            feature_pair=dict(mean=0.5))),
        identity_leakage=dict(accuracy=0.3, chance=0.25,
                              probes=dict(feature=dict(accuracy=0.6))),
        retrieval=dict(precision_at_k=0.4, chance=1 / 7),
        eval_settings=settings.as_dict())
    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    with open(os.path.join(workdir, "eval", "metrics.json"), "w") as f:
      json.dump(metrics, f)
    return metrics


def _protocol(config, workdir, fake, **kwargs):
  kwargs.setdefault("folds", 2)
  kwargs.setdefault("eval_settings", SETTINGS)
  return protocol.run_protocol(config, workdir, run_fn=fake.run, evaluate_fn=fake.evaluate,
                               **kwargs)


# ----------------------------------------------------------------------------
# Variants


def test_variants_of_methods_sweeps_and_ablations():
  config = tiny.get_config()
  names = lambda vs: [v.name for v in vs]
  assert names(protocol.make_variants(config, ["dicefer", "baseline"])) == [
      "dicefer", "baseline"]
  # The baseline ignores loss.*: it is not re-run per zeta.
  swept = protocol.make_variants(config, ["dicefer", "baseline"], "loss.zeta=0.005,0.025")
  assert names(swept) == ["dicefer_loss.zeta=0.005", "dicefer_loss.zeta=0.025", "baseline"]
  assert swept[0].overrides == (("loss.zeta", 0.005),)
  # A field the baseline does read is swept for both.
  lr = protocol.make_variants(config, ["dicefer", "baseline"], "train.learning_rate=0.001")
  assert names(lr) == ["dicefer_train.learning_rate=0.001",
                       "baseline_train.learning_rate=0.001"]
  assert protocol.make_variants(config, ["dicefer"], "loss.swap=false")[0].overrides == (
      ("loss.swap", False),)
  assert protocol.make_variants(config, ["dicefer"], "batch_size=4,16")[1].overrides == (
      ("batch_size", 16),)
  with_ablations = protocol.make_variants(config, ["baseline"], "", ["no_swap", "no_stage2"])
  assert names(with_ablations) == ["baseline", "dicefer_no_swap", "dicefer_no_stage2"]
  assert with_ablations[2].method == "dicefer"
  assert with_ablations[2].overrides == (("stage2.num_steps", 0),)


@pytest.mark.parametrize("methods, sweep, abl, message", [
    (["dicefer", "svm"], "", [], "--methods"),
    (["dicefer"], "", ["no_brain"], "unknown ablation"),
    (["dicefer"], "loss.zeta", [], "malformed"),
    (["dicefer"], "loss.nothing=1", [], "does not exist"),
    (["dicefer"], "loss.swap=maybe", [], "not a valid bool"),
    (["dicefer"], "batch_size=0.5", [], "not a valid int"),
    (["dicefer"], "model.classifier_hidden=8", [], "cannot vary"),
    (["dicefer"], "loss.zeta=0.1,0.1", [], "repeats"),
])
def test_bad_variants_are_user_errors(methods, sweep, abl, message):
  with pytest.raises(UserError, match=message):
    protocol.make_variants(tiny.get_config(), methods, sweep, abl)


def test_every_ablation_switches_its_ingredient_off():
  base = tiny.get_config()
  for name, overrides in ablations.ABLATIONS.items():
    config = ablations.get_config(f"tiny,{name}")
    assert config.method == "dicefer"
    for field, value in overrides.items():
      assert protocol._field_value(config, field) == value
      assert protocol._field_value(base, field) != value, (name, field)
  both = ablations.get_config("no_swap,delta0")
  assert not both.loss.swap and both.loss.delta == 0.0 and both.image_size == 112
  with pytest.raises(ValueError, match="unknown ablation"):
    ablations.get_config("tiny,no_brain")


# ----------------------------------------------------------------------------
# Runs, resume and the table (fake training)


def test_interrupted_protocol_continues_and_tabulates(tiny_config, tmp_path):
  workdir = str(tmp_path / "protocol")
  first = FakeRuns(interrupt_at_eval=3)   # stops while evaluating dicefer fold 1
  with pytest.raises(KeyboardInterrupt):
    _protocol(tiny_config, workdir, first)
  assert first.evals == ["dicefer/fold0", "baseline/fold0", "dicefer/fold1"]
  partial = json.load(open(os.path.join(workdir, "protocol.json")))
  assert partial["runs_done"] == 2 and not partial["complete"]
  assert "rerun the same command" in open(os.path.join(workdir, "protocol.md")).read()

  second = FakeRuns()
  report = _protocol(tiny_config, workdir, second)
  # Finished runs are reused; the interrupted one and the one not started run.
  assert second.runs == second.evals == ["dicefer/fold1", "baseline/fold1"]
  assert [(r["variant"], r["fold"], r["status"]) for r in report["rows"]] == [
      ("dicefer", 0, "reused"), ("baseline", 0, "reused"),
      ("dicefer", 1, "ran"), ("baseline", 1, "ran")]
  assert report["complete"] and report["runs_done"] == report["runs_total"] == 4
  assert report["split_kind"] == "subject" and report["folds"] == [0, 1]
  for fold in (0, 1):
    saved = train.load_config(os.path.join(workdir, "dicefer", f"fold{fold}"))
    assert (saved.fold, saved.num_folds, saved.method) == (fold, 2, "dicefer")

  s = report["summary"]
  assert s["dicefer"]["accuracy"]["mean"] == pytest.approx(0.55)
  assert s["dicefer"]["accuracy"]["std"] == pytest.approx(np.std([0.5, 0.6], ddof=1))
  assert s["baseline"]["accuracy"]["mean"] == pytest.approx(0.6)
  assert s["dicefer"]["mig"]["mean"] == pytest.approx(1.5)
  assert s["baseline"]["mig"] == dict(mean=None, std=None, n=0)
  assert s["baseline"]["pair_mi"]["mean"] == pytest.approx(0.5)   # its feature pair
  assert s["dicefer"]["pair_mi"]["mean"] == pytest.approx(2.0)
  assert s["dicefer"]["leakage_feature"]["mean"] == pytest.approx(0.6)
  assert json.load(open(os.path.join(workdir, "protocol.json"))) == json.loads(
      json.dumps(report))

  md = open(os.path.join(workdir, "protocol.md")).read()
  assert "Subject-held-out 2-fold" in md and "Runs finished: 4 of 4." in md
  assert "| dicefer | 2/2 | 0.550 ± 0.071 |" in md
  assert "| baseline | 2/2 | 0.600 ± 0.071 | 0.500 ± 0.071 | n/a |" in md
  assert "| baseline | 1 | ran | 0.650 |" in md

  # Nothing left to do: everything is reused.
  third = FakeRuns()
  _protocol(tiny_config, workdir, third)
  assert third.runs == third.evals == []


def test_changed_settings_reevaluate_and_a_changed_model_is_refused(tiny_config, tmp_path):
  workdir = str(tmp_path / "protocol")
  _protocol(tiny_config, workdir, FakeRuns(), methods=["baseline"])
  other_eval = FakeRuns()
  _protocol(tiny_config, workdir, other_eval, methods=["baseline"],
            eval_settings=evaluate_lib.EvalSettings(retrieval_k=3))
  assert other_eval.evals == ["baseline/fold0", "baseline/fold1"]
  # More steps: not reused (training goes on from the checkpoints).
  longer = tiny_config.copy_and_resolve_references()
  longer.baseline.num_steps += 2
  more = FakeRuns()
  _protocol(longer, workdir, more, methods=["baseline"])
  assert more.runs == ["baseline/fold0", "baseline/fold1"]
  # Another model in the same directory: refused, not silently mixed into the table.
  wider = tiny_config.copy_and_resolve_references()
  wider.model.width = 8
  with pytest.raises(UserError, match="another config"):
    _protocol(wider, workdir, FakeRuns(), methods=["baseline"])


def test_a_diverged_run_is_listed_and_left_out_of_the_means(tiny_config, tmp_path):
  workdir = str(tmp_path / "protocol")
  fake = FakeRuns(diverge={"dicefer_no_swap/fold1"})
  report = _protocol(tiny_config, workdir, fake, methods=["dicefer"], ablations=["no_swap"])
  rows = {(r["variant"], r["fold"]): r for r in report["rows"]}
  assert rows[("dicefer_no_swap", 1)]["status"] == "diverged"
  assert report["summary"]["dicefer_no_swap"]["folds_done"] == 1
  assert report["summary"]["dicefer_no_swap"]["accuracy"]["n"] == 1
  assert not report["complete"]
  md = open(os.path.join(workdir, "protocol.md")).read()
  assert "| dicefer_no_swap | 1/2 |" in md and "loss became NaN" in md
  saved = train.load_config(os.path.join(workdir, "dicefer_no_swap", "fold0"))
  assert saved.loss.swap is False


def test_an_official_split_is_run_once(tiny_faceset, tiny_config, tmp_path):
  records = contract.read_manifest(tiny_faceset)
  contract.write_manifest(tiny_faceset, [
      contract.Record(r.path, r.expression, r.subject, r.source,
                      "test" if r.subject in ("s0", "s1") else "train") for r in records])
  fake = FakeRuns()
  report = _protocol(tiny_config, str(tmp_path / "protocol"), fake, folds=3)
  assert report["folds"] == ["official"] and report["split_kind"] == "official"
  assert fake.runs == ["dicefer/official", "baseline/official"]


def test_more_folds_than_subjects_is_refused_before_training(tiny_config, tmp_path):
  fake = FakeRuns()
  with pytest.raises(UserError, match="cannot fill 7"):
    _protocol(tiny_config, str(tmp_path / "protocol"), fake, folds=7)
  assert fake.runs == []


def test_command_line_errors_are_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "experiments.protocol", f"--workdir={tmp_path / 'p'}",
       "--config=experiments/configs/tiny.py", "--ablations=no_brain"],
      cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
      timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "unknown ablation" in result.stderr and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------
# The real thing, on the tiny config


def test_protocol_end_to_end_resumes_an_interrupted_fold(tiny_config, tmp_path):
  """2 folds x {dicefer, baseline}: stopped once mid-protocol, with one fold's
  training cut short, then rerun to completion. DICE-FER's stages take 0 steps
  (each still checkpoints) so only the baseline compiles a training step."""
  config = tiny_config
  for stage in ("stage1", "stage2", "stage3"):
    config[stage].num_steps = 0
  config.baseline.num_steps = 4
  config.checkpoint_every = 2
  config.log_every = 1
  workdir = str(tmp_path / "protocol")
  variants = protocol.make_variants(config, protocol.METHODS)

  # baseline/fold1 was killed after its step-2 checkpoint.
  cut = protocol.run_config(config, variants[1], 1, 2)
  cut.baseline.num_steps = 2
  run_lib.run(cut, protocol.run_dir(workdir, variants[1], 1), "all")

  # The first invocation stops while evaluating baseline/fold0.
  calls = []

  def interrupted_evaluate(wd, settings):
    calls.append(wd)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return evaluate_lib.evaluate(wd, settings)

  with pytest.raises(KeyboardInterrupt):
    protocol.run_protocol(config, workdir, folds=2, eval_settings=SETTINGS,
                          evaluate_fn=interrupted_evaluate)

  report = protocol.run_protocol(config, workdir, folds=2, eval_settings=SETTINGS)
  assert [(r["variant"], r["fold"], r["status"]) for r in report["rows"]] == [
      ("dicefer", 0, "reused"), ("baseline", 0, "ran"),
      ("dicefer", 1, "ran"), ("baseline", 1, "ran")]
  assert report["complete"]

  # baseline/fold1 went on from step 2: steps 1-2 logged once, then 3-4.
  jsonl = os.path.join(workdir, "baseline", "fold1", "metrics.jsonl")
  steps = [json.loads(l)["step"] for l in open(jsonl) if '"loss"' in l]
  assert steps == [1, 2, 3, 4]

  for variant in ("dicefer", "baseline"):
    metrics = [json.load(open(os.path.join(workdir, variant, f"fold{f}", "eval",
                                           "metrics.json"))) for f in (0, 1)]
    assert {m["split"]["fold"] for m in metrics} == {0, 1}
    s = report["summary"][variant]
    assert s["accuracy"]["mean"] == pytest.approx(np.mean([m["accuracy"] for m in metrics]))
    assert s["leakage"]["mean"] == pytest.approx(
        np.mean([m["identity_leakage"]["accuracy"] for m in metrics]))
    assert s["retrieval"]["n"] == 2
  assert report["summary"]["dicefer"]["mig"]["n"] == 2
  assert report["summary"]["baseline"]["mig"]["n"] == 0
  md = open(os.path.join(workdir, "protocol.md")).read()
  assert "| dicefer | 2/2 |" in md and "| baseline | 2/2 |" in md
