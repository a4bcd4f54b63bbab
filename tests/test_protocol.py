"""experiments.protocol and the ablations: variants, folds, resume, the table.

Most tests stand fake `run`/`evaluate` functions in for training, so that the
bookkeeping (which runs happen, which are reused, what the table says, how often
the face set is read) is checked exactly and in seconds. The ablations are
checked by their effect on one training step of the tiny model, and one test
runs the real protocol on the tiny config.
"""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dicefer_jax import checkpoints, config_fields, contract, face_images, models, steps
from dicefer_jax import train
from dicefer_jax import data as data_lib
from dicefer_jax import workdir as workdir_lib
from dicefer_jax.errors import UserError
from dicefer_jax.evaluation import evaluator
from experiments import evaluate as evaluate_lib
from experiments import face_sets
from experiments import protocol
from experiments import run as run_lib
from experiments.configs import ablations, default, tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _defaults():
  return default.get_config()


class FakeRuns:
  """Stands in for run.run and evaluate.evaluate.

  Both use the face set the way the real ones do: the one handed in, or (when
  given none) a freshly loaded one, so a protocol that forgets to pass its set
  is caught by counting reads. `run` saves the config as the real one does
  first (so a workdir from another config is refused the same way); `evaluate`
  writes a metrics.json whose numbers encode the run: accuracy = 0.5 + 0.1 *
  fold (+ 0.05 for the baseline), with the evaluation settings of the saved
  config.eval.
  """

  def __init__(self, interrupt_at_eval=None, diverge=()):
    self.runs, self.evals = [], []
    self.interrupt_at_eval = interrupt_at_eval
    self.diverge = set(diverge)

  @staticmethod
  def _name(workdir):
    return os.path.join(*workdir.split(os.sep)[-2:])

  @staticmethod
  def _split(config, faces):
    if faces is None:
      faces = face_sets.FaceSets().get(config)
    return data_lib.split_faces(config, faces)

  def run(self, config, workdir, stage_flag, faces=None):
    assert stage_flag == "all"
    workdir_lib.save_config(config, workdir, _defaults())
    self._split(config, faces)
    self.runs.append(self._name(workdir))
    if self._name(workdir) in self.diverge:
      raise train.TrainingDiverged("stage1: loss became NaN or inf at step 3; stopped.")

  def evaluate(self, workdir, faces=None):
    self.evals.append(self._name(workdir))
    if len(self.evals) == self.interrupt_at_eval:
      raise KeyboardInterrupt
    config = workdir_lib.read_config(workdir, _defaults())
    self._split(config, faces)
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
        eval_settings=evaluator.EvalSettings.from_config(config.eval).as_dict())
    os.makedirs(workdir_lib.eval_dir(workdir), exist_ok=True)
    with open(workdir_lib.eval_metrics_path(workdir), "w") as f:
      json.dump(metrics, f)
    return metrics


def _protocol(config, workdir, fake, **kwargs):
  kwargs.setdefault("folds", 2)
  return protocol.run_protocol(config, workdir, run_fn=fake.run, evaluate_fn=fake.evaluate,
                               **kwargs)


def _rewrite_manifest(data_dir, change):
  """Rewrites a face set's manifest with `change(record)` applied to each record."""
  contract.write_manifest(data_dir, [change(r) for r in contract.read_manifest(data_dir)])


class ReadCounter:
  """Counts manifest reads, image-set decodes (by size) and single-image decodes."""

  def __init__(self, monkeypatch):
    self.manifests, self.sizes, self.images = 0, [], 0
    read_manifest, load_images = contract.read_manifest, face_images.load_images
    decode_face = face_images.decode_face

    def counted_read_manifest(*args, **kwargs):
      self.manifests += 1
      return read_manifest(*args, **kwargs)

    def counted_load_images(data_dir, records, image_size=contract.IMAGE_SIZE):
      self.sizes.append(int(image_size))
      return load_images(data_dir, records, image_size)

    def counted_decode_face(*args, **kwargs):
      self.images += 1   # from load_images' threads: += under the GIL is enough here
      return decode_face(*args, **kwargs)

    monkeypatch.setattr(contract, "read_manifest", counted_read_manifest)
    monkeypatch.setattr(face_images, "load_images", counted_load_images)
    monkeypatch.setattr(face_images, "decode_face", counted_decode_face)


# ----------------------------------------------------------------------------
# Variants


def test_variants_of_methods_sweeps_and_ablations():
  """Catches a variant list that runs the wrong things: the baseline re-run per
  loss.* value it ignores, a swept value of the wrong type, an ablation without
  its overrides or under the baseline method."""
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
  assert with_ablations[2].overrides == tuple(ablations.ABLATIONS["no_stage2"].items())


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
  """Catches a bad --methods/--sweep/--ablations that crashes with a traceback
  (or silently runs something else) instead of one UserError line."""
  with pytest.raises(UserError, match=message):
    protocol.make_variants(tiny.get_config(), methods, sweep, abl)


# ----------------------------------------------------------------------------
# Ablations: each one's effect on one training step of the tiny model
#
# Reading the overridden values back proves nothing: an ablation that sets the
# wrong field, or a field no step reads, passes such a check. Here each ablated
# config and the base config take one step from the same initial state on the
# same batch. The step's metrics are measured before its update, so the MI and
# L1 terms of both are the same numbers and the ablated loss must be the base
# loss with exactly the ablated term removed.

PAIR_B = 8   # tiny's batch size


def _pair_batch(image_size):
  rng = np.random.default_rng(0)
  image = lambda: rng.normal(size=(PAIR_B, image_size, image_size, 1)).astype(np.float32)
  return dict(image_m=image(), image_n=image(),
              label=(np.arange(PAIR_B) % contract.NUM_CLASSES).astype(np.int32))


@pytest.fixture(scope="module")
def one_step():
  """one_step(stage, ablation or None) -> (config, metrics as floats), cached.

  Steps run eagerly: on 2 cores, compiling the jitted stage-1 step costs ~15 s
  per loss setting, while eager ops are compiled once and shared by every
  setting.
  """
  cache = {}

  def run(stage, ablation=None):
    if (stage, ablation) not in cache:
      config = tiny.get_config()
      if ablation is not None:
        ablations.apply(config, ablation)
      model = models.build_model(config.model, contract.NUM_CLASSES)
      state = train.initial_state(stage, config, model)
      step = steps.make_step(stage, model, config, steps.make_optimizers(config.train, stage))
      _, metrics = step(state, _pair_batch(config.image_size))
      cache[stage, ablation] = config, {k: float(v) for k, v in metrics.items()}
    return cache[stage, ablation]

  return run


def _same_terms(ablated, base, names):
  """The ablation left the forward pass alone: every MI/L1 term is unchanged."""
  for name in names:
    assert ablated[name] == pytest.approx(base[name], abs=1e-6), name


def _removed(term):
  """A term the check removes must be big enough for its absence to show."""
  assert abs(term) > 1e-3, f"the removed term {term} is too small to test"
  return term


STAGE1_TERMS = ("mi_global", "mi_local", "l1")
STAGE2_TERMS = ("mi_global", "mi_local", "adv_fool")


def _check_no_swap(c, base, ablated):
  # Same codes (same L1), but each image is scored with its own code.
  assert ablated["l1"] == pytest.approx(base["l1"], abs=1e-6)
  assert abs(ablated["mi_global"] - base["mi_global"]) > 1e-3
  assert abs(ablated["mi_local"] - base["mi_local"]) > 1e-3
  assert abs(ablated["loss"] - base["loss"]) > 1e-3


def _check_delta0(c, base, ablated):
  _same_terms(ablated, base, STAGE1_TERMS)
  assert ablated["loss"] == pytest.approx(
      base["loss"] - _removed(c.loss.delta * base["l1"]), abs=1e-5)


def _check_no_local(c, base, ablated):
  _same_terms(ablated, base, STAGE1_TERMS)
  _removed(c.loss.nu * base["mi_local"])
  assert ablated["loss"] == pytest.approx(
      -(c.loss.mu * base["mi_global"]) + c.loss.delta * base["l1"], abs=1e-5)


def _check_no_global(c, base, ablated):
  _same_terms(ablated, base, STAGE1_TERMS)
  _removed(c.loss.mu * base["mi_global"])
  assert ablated["loss"] == pytest.approx(
      -(c.loss.nu * base["mi_local"]) + c.loss.delta * base["l1"], abs=1e-5)


def _check_no_adversarial(c, base, ablated):
  _same_terms(ablated, base, STAGE2_TERMS)
  assert ablated["loss"] == pytest.approx(
      base["loss"] - _removed(c.loss.zeta * base["adv_fool"]), abs=1e-5)


# Ablation -> (stage whose step shows it, check(base config, base metrics,
# ablated metrics)). The check uses the BASE config's weights: the ablated
# config's own zeroed weight would make a wrong ablation agree with itself.
STEP_CHECKS = {
    "no_swap": ("stage1", _check_no_swap),
    "delta0": ("stage1", _check_delta0),
    "no_local": ("stage1", _check_no_local),
    "no_global": ("stage1", _check_no_global),
    "no_adversarial": ("stage2", _check_no_adversarial),
}
# Ablations whose effect is a whole (tiny) run, checked by the named test.
RUN_CHECKS = {
    "no_stage2": "test_no_stage2_leaves_the_identity_encoder_untrained_and_stage3_trains",
}


def test_every_ablation_has_an_effect_check():
  """Catches a new ablation added to ABLATIONS without a test of its effect
  (or a check left behind for a removed one)."""
  assert not set(STEP_CHECKS) & set(RUN_CHECKS)   # one check per ablation
  assert set(ablations.ABLATIONS) == set(STEP_CHECKS) | set(RUN_CHECKS)
  for test_name in RUN_CHECKS.values():
    assert callable(globals().get(test_name)), test_name


@pytest.mark.parametrize("name", sorted(STEP_CHECKS))
def test_ablation_removes_exactly_its_term_from_the_loss(one_step, name):
  """Catches an ablation that sets the wrong field, a field the step never
  reads, or one that also changes the other terms: no_swap must change the MI
  pairing; delta0, no_local, no_global and no_adversarial must take exactly
  delta*l1, nu*mi_local, mu*mi_global and zeta*adv_fool out of the loss."""
  stage, check = STEP_CHECKS[name]
  base_config, base = one_step(stage)
  ablated_config, ablated = one_step(stage, name)
  assert ablated_config.method == "dicefer"
  check(base_config, base, ablated)


def _same_tree(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  return ta == tb and all(np.array_equal(x, y) for x, y in zip(la, lb))


def test_no_stage2_leaves_the_identity_encoder_untrained_and_stage3_trains(
    tiny_config, tmp_path):
  """Catches a no_stage2 ablation that still trains E_id (a wrong field), or
  that breaks the run: stage 2's 0-step checkpoint must hand the initial z_id
  on, and stage 3 must accept it as its prerequisite and train."""
  config = tiny_config
  # Stage 1 at 0 steps keeps this cheap (nothing about z_id depends on it);
  # set before the ablation, so an ablation that touches these fields shows.
  config.stage1.num_steps = 0
  config.stage3.num_steps = 1
  assert config.stage2.num_steps > 0   # the base config does train stage 2
  ablations.apply(config, "no_stage2")
  workdir = str(tmp_path / "run")
  model = models.build_model(config.model, contract.NUM_CLASSES)
  data = data_lib.split_faces(config, data_lib.load_face_set(config.data_dir))
  writer = train.MetricWriter(workdir)
  try:
    states = {stage: train.train_stage(stage, config, workdir, model, data, writer)
              for stage in train.stages_for(config, "all")}
  finally:
    writer.close()
  assert list(states) == ["stage1", "stage2", "stage3"]
  init = train.initial_state("stage1", config, model)
  assert checkpoints.latest_step(workdir, "stage2") == 0
  for stage in ("stage2", "stage3"):
    assert _same_tree(states[stage].params["id_encoder"], init.params["id_encoder"]), stage
    assert _same_tree(states[stage].batch_stats["id_encoder"],
                      init.batch_stats["id_encoder"]), stage
  assert int(states["stage3"].step) == config.stage3.num_steps
  assert not _same_tree(states["stage3"].params["classifier"], init.params["classifier"])


def test_ablation_config_names_parse():
  """Catches ablations.py:<base>,<ablation>,... combining wrongly: ablations
  that do not stack, a lost base config, or an unknown name accepted."""
  both = ablations.get_config("no_swap,delta0")
  assert not both.loss.swap and both.loss.delta == 0.0 and both.image_size == 112
  assert both.method == "dicefer"
  small = ablations.get_config("tiny,no_local")
  assert small.image_size == tiny.get_config().image_size and small.loss.nu == 0.0
  with pytest.raises(ValueError, match="unknown ablation"):
    ablations.get_config("tiny,no_brain")
  with pytest.raises(ValueError, match="one base config"):
    ablations.get_config("tiny,demo")


# ----------------------------------------------------------------------------
# Runs, resume and the table (fake training)


def test_interrupted_protocol_continues_and_tabulates(tiny_config, tmp_path):
  """Catches a rerun that redoes finished runs or skips the interrupted one, a
  table built from the wrong folds, and wrong means/stds in protocol.json/.md."""
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
  assert report["eval_settings"] == json.loads(json.dumps(
      evaluator.EvalSettings.from_config(tiny_config.eval).as_dict()))
  for fold in (0, 1):
    saved = workdir_lib.read_config(os.path.join(workdir, "dicefer", f"fold{fold}"),
                                    _defaults())
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
  """Catches stale numbers and mixed tables: a finished run reused after
  config.eval changed, or re-run after only a cosmetic field changed, and a
  different model silently trained into the same directories."""
  workdir = str(tmp_path / "protocol")
  _protocol(tiny_config, workdir, FakeRuns(), methods=["baseline"])
  # A cosmetic field changes no number: everything is reused.
  chatty = tiny_config.copy_and_resolve_references()
  chatty.log_every = 1
  cosmetic = FakeRuns()
  _protocol(chatty, workdir, cosmetic, methods=["baseline"])
  assert cosmetic.runs == cosmetic.evals == []
  # Other evaluation settings: evaluated again (the real run finds its stages
  # complete and skips them), and then reused under those settings.
  other_k = tiny_config.copy_and_resolve_references()
  other_k.eval.retrieval_k = tiny_config.eval.retrieval_k + 1
  other_eval = FakeRuns()
  report = _protocol(other_k, workdir, other_eval, methods=["baseline"])
  assert other_eval.evals == ["baseline/fold0", "baseline/fold1"]
  assert report["eval_settings"]["retrieval_k"] == other_k.eval.retrieval_k
  again = FakeRuns()
  _protocol(other_k, workdir, again, methods=["baseline"])
  assert again.evals == []
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
  # Invalid evaluation settings are refused before anything runs.
  bad = tiny_config.copy_and_resolve_references()
  bad.eval.retrieval_k = 0
  refused = FakeRuns()
  with pytest.raises(UserError, match="retrieval_k"):
    _protocol(bad, str(tmp_path / "other"), refused)
  assert refused.runs == []


def test_the_face_set_is_read_and_decoded_once_for_all_folds_and_variants(
    tiny_config, tmp_path, monkeypatch):
  """Catches the protocol re-reading the manifest and re-decoding every PNG for
  each fold and variant (it did: every run and evaluation loaded the set
  itself). One manifest read; one decode per image per image size swept."""
  num_images = len(contract.read_manifest(tiny_config.data_dir))
  counter = ReadCounter(monkeypatch)
  fake = FakeRuns()
  report = _protocol(tiny_config, str(tmp_path / "protocol"), fake,
                     sweep="image_size=32,48", ablations=["no_swap"])
  assert report["complete"] and len(fake.runs) == len(fake.evals) == 2 * 5
  assert counter.manifests == 1
  assert sorted(counter.sizes) == [32, 48]
  assert counter.images == 2 * num_images


@pytest.mark.parametrize("subjects, kind, note", [
    ("none", "stratified", "NOT subject-independent"),
    ("some", "grouped", "images without a subject id are spread over the folds"),
])
def test_folds_without_all_subjects_say_so(tiny_config, tmp_path, subjects, kind, note):
  """Catches a protocol over images with missing subject ids presented as
  subject-held-out: the report names the split kind and what it means."""
  drop = (lambda r: True) if subjects == "none" else (lambda r: r.subject == "s5")
  _rewrite_manifest(tiny_config.data_dir,
                    lambda r: dataclasses.replace(r, subject="" if drop(r) else r.subject))
  workdir = str(tmp_path / "protocol")
  report = _protocol(tiny_config, workdir, FakeRuns(), methods=["baseline"])
  assert report["split_kind"] == kind and report["complete"]
  assert note in open(os.path.join(workdir, "protocol.md")).read()


def test_a_diverged_run_is_listed_and_left_out_of_the_means(tiny_config, tmp_path):
  """Catches one diverged run aborting the whole protocol, or its missing
  numbers being averaged in (or the table claiming the protocol complete)."""
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
  saved = workdir_lib.read_config(os.path.join(workdir, "dicefer_no_swap", "fold0"),
                                  _defaults())
  assert saved.loss.swap is False


def test_an_official_split_is_run_once(tiny_config, tmp_path):
  """Catches a face set with an official train/test split being cut into
  --folds folds anyway (or run once per requested fold)."""
  _rewrite_manifest(tiny_config.data_dir, lambda r: dataclasses.replace(
      r, split="test" if r.subject in ("s0", "s1") else "train"))
  fake = FakeRuns()
  report = _protocol(tiny_config, str(tmp_path / "protocol"), fake, folds=3)
  assert report["folds"] == ["official"] and report["split_kind"] == "official"
  assert fake.runs == ["dicefer/official", "baseline/official"]


def test_more_folds_than_subjects_is_refused_before_training(tiny_config, tmp_path):
  """Catches a fold count the data cannot fill failing only after some folds
  have already trained."""
  fake = FakeRuns()
  with pytest.raises(UserError, match="cannot fill 7"):
    _protocol(tiny_config, str(tmp_path / "protocol"), fake, folds=7)
  assert fake.runs == []


def test_command_line_errors_are_one_line(tmp_path):
  """Catches a bad command line (here an unknown ablation) ending in a
  traceback instead of `error: <one line>` and exit status 2; also that the
  module's own --config/--workdir flags parse."""
  result = subprocess.run(
      [sys.executable, "-m", "experiments.protocol", f"--workdir={tmp_path / 'p'}",
       "--config=experiments/configs/tiny.py", "--ablations=no_brain"],
      cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
      timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "unknown ablation" in result.stderr and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------
# The real thing, on the tiny config


def test_protocol_end_to_end_resumes_an_interrupted_fold(tiny_config, tmp_path, monkeypatch):
  """2 folds x {dicefer, baseline}: stopped once mid-protocol, with one fold's
  training cut short, then rerun to completion. Catches a real run or
  evaluation that does not resume, reuse or tabulate as the fakes do, or that
  loads the face set itself instead of using the protocol's. DICE-FER's stages
  take 0 steps (each still checkpoints) so only the baseline compiles a
  training step."""
  config = tiny_config
  for stage in ("stage1", "stage2", "stage3"):
    config[stage].num_steps = 0
  config.baseline.num_steps = 4
  config.checkpoint_every = 2
  config.log_every = 1
  # Cheap evaluation: one short critic seed, no t-SNE.
  config.eval.mig.num_seeds = 1
  config.eval.mig.num_steps = 30
  config.eval.tsne_max_points = 0
  workdir = str(tmp_path / "protocol")
  variants = protocol.make_variants(config, protocol.METHODS)

  # baseline/fold1 was killed after its step-2 checkpoint.
  cut = protocol.run_config(config, variants[1], 1, 2)
  cut.baseline.num_steps = 2
  run_lib.run(cut, protocol.run_dir(workdir, variants[1], 1), "all")

  # The first invocation stops while evaluating baseline/fold0.
  calls = []

  def interrupted_evaluate(wd, faces=None):
    calls.append(wd)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return evaluate_lib.evaluate(wd, faces=faces)

  with pytest.raises(KeyboardInterrupt):
    protocol.run_protocol(config, workdir, folds=2, evaluate_fn=interrupted_evaluate)
  first = json.load(open(os.path.join(workdir, "protocol.json")))["rows"]

  counter = ReadCounter(monkeypatch)
  report = protocol.run_protocol(config, workdir, folds=2)
  assert [(r["variant"], r["fold"], r["status"]) for r in report["rows"]] == [
      ("dicefer", 0, "reused"), ("baseline", 0, "ran"),
      ("dicefer", 1, "ran"), ("baseline", 1, "ran")]
  # The reused run keeps the timings the first invocation measured for it.
  assert first[0]["timings_s"]["total"] > 0
  assert report["rows"][0]["timings_s"] == first[0]["timings_s"]
  assert report["complete"]
  # 3 trainings and 3 evaluations, one read of the face set.
  assert counter.manifests == 1 and counter.sizes == [config.image_size]

  # baseline/fold1 went on from step 2: steps 1-2 logged once, then 3-4.
  jsonl = workdir_lib.metrics_log_path(os.path.join(workdir, "baseline", "fold1"))
  logged = [json.loads(l)["step"] for l in open(jsonl) if '"loss"' in l]
  assert logged == [1, 2, 3, 4]

  for variant in ("dicefer", "baseline"):
    metrics = [json.load(open(workdir_lib.eval_metrics_path(
        os.path.join(workdir, variant, f"fold{f}")))) for f in (0, 1)]
    assert {m["split"]["fold"] for m in metrics} == {0, 1}
    assert all(m["eval_settings"]["mig"]["num_seeds"] == 1 for m in metrics)
    s = report["summary"][variant]
    assert s["accuracy"]["mean"] == pytest.approx(np.mean([m["accuracy"] for m in metrics]))
    assert s["leakage"]["mean"] == pytest.approx(
        np.mean([m["identity_leakage"]["accuracy"] for m in metrics]))
    assert s["retrieval"]["n"] == 2
  assert report["summary"]["dicefer"]["mig"]["n"] == 2
  assert report["summary"]["baseline"]["mig"]["n"] == 0
  md = open(os.path.join(workdir, "protocol.md")).read()
  assert "| dicefer | 2/2 |" in md and "| baseline | 2/2 |" in md
  # headline.md: the claim's metrics, from the same summary and paired differences.
  headline = open(os.path.join(workdir, "headline.md")).read()
  s, p = report["summary"], report["paired"]["baseline"]
  assert (f"| dicefer | 2/2 | {s['dicefer']['accuracy']['mean']:.3f} ± "
          f"{s['dicefer']['accuracy']['std']:.3f} |") in headline
  assert (f"| baseline | 2 | {p['accuracy']['mean']:+.3f} [{p['accuracy']['low']:+.3f}, "
          f"{p['accuracy']['high']:+.3f}] |") in headline
  # Where each run's time went: the parts add up, and training steps were timed.
  for r in report["rows"]:
    if r["status"] == "ran":
      t = r["timings_s"]
      assert t["steps"] + t["evaluation"] + t["other"] == pytest.approx(t["total"], abs=0.11)
      assert t["evaluation"] > 0 and t["other"] > 0
  def stage_timings(variant, fold):
    path = workdir_lib.train_metrics_path(os.path.join(workdir, variant, f"fold{fold}"))
    return json.load(open(path))["timings_s"]
  resumed = stage_timings("baseline", 1)["baseline"]
  assert resumed["steps"] > 0  # resumed: steps 3-4
  # Setup, the compiling first step, the other steps and the checkpoints are
  # parts of the stage's wall time.
  parts = ("setup", "first_step", "steps", "checkpoints")
  assert all(resumed[k] >= 0 for k in parts)
  assert sum(resumed[k] for k in parts) <= resumed["total"] + 1e-3
  skipped = stage_timings("baseline", 0)["baseline"]  # trained before, found complete
  assert (skipped["steps"], skipped["checkpoints"]) == (0, 0)
  assert stage_timings("dicefer", 1)["stage1"]["steps"] == 0  # 0 steps configured
  assert "## Where the time went" in md


def test_a_warmup_is_trained_once_per_fold_and_copied_where_it_is_the_same(
    tiny_config, tmp_path):
  """The baseline method and DICE-FER's warm-up are one computation. Catches a
  copied warm-up that differs from the one the run would have trained (a field
  the baseline stage does read left out of the comparison), a copy between runs
  whose warm-ups differ (another learning rate, another critic width: the
  stage's checkpoint holds every module's init), and a copy that touches the
  donor or a run that has a warm-up already."""
  config = tiny_config
  config.baseline.num_steps = 3
  config.stage1.init_from = "baseline"
  for stage in ("stage1", "stage2", "stage3"):
    config[stage].num_steps = 0
  variants = {v.name: v for v in protocol.make_variants(config, protocol.METHODS)}
  donor = str(tmp_path / "baseline")
  run_lib.run(protocol.run_config(config, variants["baseline"], 0, 2), donor, "all")
  donor_files = sorted(os.listdir(checkpoints.stage_dir(donor, "baseline")))

  dicefer = protocol.run_config(config, variants["dicefer"], 0, 2)
  dicefer.loss.zeta = 0.5   # read by stage 2 only: the warm-up is the same
  adopted, trained = str(tmp_path / "adopted"), str(tmp_path / "trained")
  assert protocol.adopt_warmup(dicefer, adopted, [str(tmp_path / "nothing"), donor]) == donor
  assert protocol.adopt_warmup(dicefer, adopted, [donor]) is None  # has one now
  run_lib.run(dicefer, adopted, "all")
  run_lib.run(dicefer, trained, "all")   # the same run, its warm-up trained here
  model = models.build_model(dicefer.model, contract.NUM_CLASSES)
  template = train.restore_template("baseline", dicefer, model)
  copied, _ = checkpoints.restore_final(adopted, "baseline", template)
  own, _ = checkpoints.restore_final(trained, "baseline", template)
  assert jax.tree.all(jax.tree.map(np.array_equal, copied, own))
  for stage in ("stage1", "stage3"):  # and what was trained on top of it
    template = train.restore_template(stage, dicefer, model)
    assert jax.tree.all(jax.tree.map(
        np.array_equal, checkpoints.restore_final(adopted, stage, template)[0],
        checkpoints.restore_final(trained, stage, template)[0]))
  assert sorted(os.listdir(checkpoints.stage_dir(donor, "baseline"))) == donor_files

  for field, value in (("train.learning_rate", 0.5), ("model.critic_hidden", 8),
                       ("seed", 7)):
    other = dicefer.copy_and_resolve_references()
    config_fields.set_field(other, field, value)
    assert protocol.adopt_warmup(other, str(tmp_path / field), [donor]) is None, field
  no_warmup = dicefer.copy_and_resolve_references()
  no_warmup.stage1.init_from = ""
  assert protocol.adopt_warmup(no_warmup, str(tmp_path / "random"), [donor]) is None

  # A longer baseline (the compute-matched control) continues from the warm-up,
  # and ends where training it from scratch ends.
  longer = protocol.run_config(config, variants["baseline"], 0, 2)
  longer.baseline.num_steps = 5
  continued, straight = str(tmp_path / "continued"), str(tmp_path / "straight")
  assert protocol.adopt_warmup(longer, continued, [donor, adopted]) in (donor, adopted)
  run_lib.run(longer, continued, "all")
  run_lib.run(longer, straight, "all")
  template = train.restore_template("baseline", longer, model)
  assert jax.tree.all(jax.tree.map(
      np.array_equal, checkpoints.restore_final(continued, "baseline", template)[0],
      checkpoints.restore_final(straight, "baseline", template)[0]))
  shorter = protocol.run_config(config, variants["baseline"], 0, 2)
  shorter.baseline.num_steps = 2   # a longer warm-up is no prefix of it
  assert protocol.adopt_warmup(shorter, str(tmp_path / "shorter"), [donor]) is None


def test_controls_are_the_fair_comparisons_of_the_warm_started_demo():
  """Catches a compute-matched baseline with fewer encoder updates than DICE-FER's
  warm-up plus stage 1, a warm-up-only control that still trains stage 1 or 2,
  and controls of a warm start accepted for a run that has none."""
  from experiments.configs import demo  # pylint: disable=g-import-not-at-top
  config = demo.get_config()
  variants = protocol.make_variants(config, ["dicefer", "baseline"],
                                    controls=list(protocol.CONTROLS))
  by_name = {v.name: v for v in variants}
  assert list(by_name) == ["dicefer", "baseline", "baseline_matched",
                           "dicefer_warmup_only", "dicefer_random_init"]
  matched = by_name["baseline_matched"]
  assert matched.method == "baseline"
  assert dict(matched.overrides) == {
      "baseline.num_steps": config.baseline.num_steps + config.stage1.num_steps}
  assert dict(by_name["dicefer_warmup_only"].overrides) == {
      "stage1.num_steps": 0, "stage2.num_steps": 0}
  assert dict(by_name["dicefer_random_init"].overrides) == {"stage1.init_from": ""}
  config.stage1.init_from = ""
  cold = protocol.control_variant(config, "baseline_matched")
  assert dict(cold.overrides) == {"baseline.num_steps": config.stage1.num_steps}
  with pytest.raises(UserError, match="init_from=baseline") as info:
    protocol.control_variant(config, "warmup_only")
  assert "\n" not in str(info.value)
  with pytest.raises(UserError, match="unknown control"):
    protocol.make_variants(config, ["dicefer"], controls=["more_steps"])


def test_paired_differences_and_metrics_an_ablation_cannot_move():
  """Catches a paired interval computed from unpaired means, the wrong sign,
  folds one side lacks counted, and an ablation tabulated on metrics it cannot
  change (stage-2 ablations leave E_exp and stage 3 as DICE-FER's)."""
  variants = [protocol.Variant("dicefer", "dicefer"),
              protocol.Variant("baseline", "baseline"),
              protocol.Variant("dicefer_no_stage2", "dicefer", (),
                               ablations.MOVES["no_stage2"])]
  acc = {"dicefer": [0.6, 0.7, 0.5, 0.9], "baseline": [0.5, 0.4, 0.3, None],
         "dicefer_no_stage2": [0.6, 0.7, 0.5, 0.9]}
  rows = [dict(variant=name, fold=k, status="ran" if value is not None else "diverged",
               metrics=dict(accuracy=value, mig=0.1 * k if name != "baseline" else None))
          for name, values in acc.items() for k, value in enumerate(values)]
  paired = protocol.paired_differences(rows, variants)
  entry = paired["baseline"]["accuracy"]
  # Folds 0-2 only (fold 3 diverged for the baseline): differences 0.1, 0.3, 0.2.
  assert entry["n"] == 3 and entry["per_fold"] == pytest.approx({0: 0.1, 1: 0.3, 2: 0.2})
  half = 4.302652729911275 * 0.1 / np.sqrt(3)   # t(0.975, 2) * sd / sqrt(n)
  assert (entry["mean"], entry["low"], entry["high"]) == pytest.approx(
      (0.2, 0.2 - half, 0.2 + half))
  assert "mig" not in paired["baseline"]        # the baseline has none
  assert set(paired["dicefer_no_stage2"]) == {"mig"}
  summary = protocol.summarize(rows, variants)
  assert summary["dicefer_no_stage2"]["accuracy"]["same_as"] == "dicefer"
  assert summary["dicefer_no_stage2"]["mig"]["mean"] == pytest.approx(0.15)
  report = dict(split_kind="subject", split_note="", data_dir="d", folds=[0, 1, 2, 3],
                runs_done=11, runs_total=12, complete=False, rows=rows,
                variants=[dict(name=v.name) for v in variants], summary=summary,
                paired=paired, metrics={k: h for k, h, _ in protocol.METRICS},
                eval_settings=dict(mig=dict(hidden=1, num_steps=1, num_seeds=1),
                                   retrieval_k=6, probe_pca_dim=64))
  md = protocol.markdown(report)
  assert "| dicefer_no_stage2 | 4/4 | = dicefer |" in md
  assert f"+0.200 [{0.2 - half:+.3f}, {0.2 + half:+.3f}]" in md


def test_a_pinned_split_is_described_as_such():
  """Catches the report describing folds over unpinned subjects (the confounded
  synthetic set) as folds over images without subject ids."""
  from dicefer_jax import splits  # pylint: disable=g-import-not-at-top
  note = protocol._split_note(splits.SUBJECT_PINNED, 5, 0)
  assert "split=train" in note and "in training in every fold" in note
  assert "without a subject" not in note
