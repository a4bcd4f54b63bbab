"""Orbax checkpoints of stage states (dicefer_jax.checkpoints): round trip,
steps, retention, meta, lineage and staleness, and setting stale ones aside.

Uses a real StageState of the tiny model (every module's params, batch stats,
a stage's optax state), perturbed so that no leaf equals the fresh state that a
restore starts from: a leaf that is not restored keeps its template value and
fails the comparison.
"""

import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dicefer_jax import checkpoints, contract, models, train
from dicefer_jax import workdir as workdir_lib
from experiments.configs import tiny


@pytest.fixture(scope="module")
def stage1_setup():
  """(config, fresh stage1 state): built once, the model init is the slow part."""
  config = tiny.get_config()
  model = models.build_model(config.model, contract.NUM_CLASSES)
  return config, train.initial_state("stage1", config, model)


def _perturbed(state, step: int, salt: int = 1):
  """`state` at `step` with every leaf changed (floats shifted by noise, integers
  such as Adam's count and the rng's bits offset), so a restore that skips a
  leaf cannot pass by accident. On the host: eager jax ops per leaf are slow."""
  rng = np.random.default_rng(salt)

  def change(leaf):
    a = np.asarray(leaf)
    if np.issubdtype(a.dtype, np.floating):
      return jnp.asarray(a + rng.standard_normal(a.shape).astype(a.dtype))
    return jnp.asarray(a + np.asarray(7 + salt, a.dtype))

  return state.replace(
      step=jnp.asarray(step, jnp.int32),
      params=jax.tree.map(change, state.params),
      batch_stats=jax.tree.map(change, state.batch_stats),
      opt_state=jax.tree.map(change, state.opt_state),
      rng=change(state.rng))


def _at(state, step: int):
  """`state` at `step`, values untouched: for tests of steps and meta only."""
  return state.replace(step=jnp.asarray(step, jnp.int32))


def _save(workdir, stage, state, meta, keep=3):
  with checkpoints.manager(workdir, stage, keep=keep) as mngr:
    checkpoints.save(mngr, state, meta)
    mngr.wait_until_finished()


def _assert_identical(actual, expected):
  """Same tree structure, and every leaf the same dtype, shape and bits."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  paths = jax.tree_util.tree_flatten_with_path(expected)[0]
  for (path, want), got in zip(paths, jax.tree.leaves(actual)):
    name = jax.tree_util.keystr(path)
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    assert np.array_equal(got, want), f"{name}: values differ"


def _stage_steps(workdir, stage):
  return sorted(int(d) for d in os.listdir(checkpoints.stage_dir(workdir, stage))
                if d.isdigit())


def _files(root):
  """{relative path: sha256} of every file under root."""
  out = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def test_perturbed_state_differs_from_the_template_in_every_leaf(stage1_setup):
  """Guards the round-trip test itself: a leaf equal in the saved state and the
  template would pass even if restore skipped it (Adam's zero moments and
  zero count would, unperturbed)."""
  _, fresh = stage1_setup
  saved = _perturbed(fresh, step=5)
  for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(fresh)):
    assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_save_restore_round_trip_is_bit_identical(stage1_setup, tmp_path):
  """Catches a checkpoint that loses or mangles part of the state: the optax
  state (resumed training would restart Adam), batch statistics, the rng (a
  resumed run would draw different noise) or the step; or leaves restored in
  another dtype."""
  _, fresh = stage1_setup
  workdir = str(tmp_path / "wd")
  saved = _perturbed(fresh, step=5)
  meta = {"stage": "stage1", "num_steps": 6, "lineage": {}}
  _save(workdir, "stage1", saved, meta)
  with checkpoints.manager(workdir, "stage1") as mngr:
    restored, restored_meta = checkpoints.restore(mngr, fresh)
  _assert_identical(restored.params, saved.params)
  _assert_identical(restored.batch_stats, saved.batch_stats)
  _assert_identical(restored.opt_state, saved.opt_state)
  _assert_identical(restored.rng, saved.rng)
  assert int(restored.step) == 5
  _assert_identical(restored, saved)
  assert dict(restored_meta) == meta


def test_restore_into_the_abstract_template_equals_a_concrete_restore(stage1_setup,
                                                                      tmp_path):
  """Catches a restore template (train.restore_template, shapes only, no eager
  init) that differs from the state a stage really has: a missing or extra leaf
  (the stage-2 discriminator's optax state), a wrong dtype, or leaves left
  abstract instead of restored; and restored arrays not placed on the mesh."""
  config, fresh = stage1_setup
  model = models.build_model(config.model, contract.NUM_CLASSES)
  template = train.restore_template("stage1", config, model)
  assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(template))
  workdir = str(tmp_path / "wd")
  saved = _perturbed(fresh, step=5)
  _save(workdir, "stage1", saved, {"stage": "stage1", "num_steps": 6, "lineage": {}})
  restored, _ = checkpoints.restore_final(workdir, "stage1", template)
  _assert_identical(restored, saved)
  replicated = train.make_shardings()[0]
  assert all(leaf.sharding.is_equivalent_to(replicated, leaf.ndim)
             for leaf in jax.tree.leaves(restored))
  # Every stage's template has the structure and dtypes of its real state.
  for stage in train.ALL_STAGES:
    real = jax.eval_shape(lambda s=stage: train.initial_state(s, config, model))
    abstract = train.restore_template(stage, config, model)
    assert jax.tree.structure(abstract) == jax.tree.structure(real)
    assert [(a.shape, a.dtype) for a in jax.tree.leaves(abstract)] == [
        (r.shape, r.dtype) for r in jax.tree.leaves(real)]


def test_restore_final_and_restore_of_an_older_step(stage1_setup, tmp_path):
  """Catches restore ignoring `step` (always the latest) and restore_final
  reading anything but the newest checkpoint."""
  _, fresh = stage1_setup
  workdir = str(tmp_path / "wd")
  states = {step: _perturbed(fresh, step, salt=step) for step in (2, 4)}
  with checkpoints.manager(workdir, "stage1") as mngr:
    for step, state in states.items():
      checkpoints.save(mngr, state, {"at": step})
    mngr.wait_until_finished()
  restored, meta = checkpoints.restore_final(workdir, "stage1", fresh)
  _assert_identical(restored, states[4])
  assert meta["at"] == 4
  with checkpoints.manager(workdir, "stage1") as mngr:
    older, meta = checkpoints.restore(mngr, fresh, step=2)
  _assert_identical(older, states[2])
  assert meta["at"] == 2


def test_latest_step_none_for_a_missing_or_empty_stage_then_the_newest(
    stage1_setup, tmp_path):
  """Catches latest_step raising for a stage never trained, or for a stage
  whose folder exists but holds no checkpoint yet (a run killed before its
  first save), and returning anything but the newest step after several."""
  _, fresh = stage1_setup
  workdir = str(tmp_path / "wd")
  assert checkpoints.latest_step(workdir, "stage1") is None
  assert not checkpoints.has_checkpoint(workdir, "stage1")
  checkpoints.manager(workdir, "stage1").close()  # creates the empty folder
  assert os.path.isdir(checkpoints.stage_dir(workdir, "stage1"))
  assert checkpoints.latest_step(workdir, "stage1") is None
  with checkpoints.manager(workdir, "stage1") as mngr:
    for step in (1, 3, 2):
      checkpoints.save(mngr, _at(fresh, step), {})
      mngr.wait_until_finished()
  assert checkpoints.latest_step(workdir, "stage1") == 3
  assert checkpoints.has_checkpoint(workdir, "stage1")
  assert checkpoints.latest_step(workdir, "stage2") is None


def test_checkpoints_live_where_the_workdir_layout_says(stage1_setup, tmp_path):
  """Catches checkpoints written outside <workdir>/checkpoints/<stage>/<step>
  (evaluate and the protocol look for them there)."""
  _, fresh = stage1_setup
  workdir = str(tmp_path / "wd")
  _save(workdir, "stage2", _at(fresh, 4), {})
  assert checkpoints.stage_dir(workdir, "stage2") == os.path.join(
      os.path.abspath(workdir), "checkpoints", "stage2")
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "stage2", "4"))


def test_keep_limits_the_kept_checkpoints_to_the_newest(stage1_setup, tmp_path):
  """Catches `keep` ignored (a long run fills the disk) or the wrong ones
  deleted (the newest, which a resume needs)."""
  _, fresh = stage1_setup
  workdir = str(tmp_path / "wd")
  with checkpoints.manager(workdir, "stage1", keep=2) as mngr:
    for step in range(1, 6):
      checkpoints.save(mngr, _at(fresh, step), {"at": step})
      mngr.wait_until_finished()
  assert _stage_steps(workdir, "stage1") == [4, 5]
  assert checkpoints.latest_step(workdir, "stage1") == 5


def test_read_meta_needs_no_template(stage1_setup, tmp_path):
  """Catches read_meta restoring the arrays too (it is called with no state to
  restore into), or returning the latest meta for an explicit step."""
  _, fresh = stage1_setup
  workdir = str(tmp_path / "wd")
  with checkpoints.manager(workdir, "stage2") as mngr:
    checkpoints.save(mngr, _at(fresh, 3),
                     {"stage": "stage2", "lineage": {"stage1": 6}, "at": 3})
    checkpoints.save(mngr, _at(fresh, 4),
                     {"stage": "stage2", "lineage": {"stage1": 6}, "at": 4})
    mngr.wait_until_finished()
  meta = checkpoints.read_meta(workdir, "stage2")
  assert meta == {"stage": "stage2", "lineage": {"stage1": 6}, "at": 4}
  assert isinstance(meta, dict)
  assert checkpoints.read_meta(workdir, "stage2", step=3)["at"] == 3


# ----------------------------------------------------------------------------
# Lineage and staleness


def test_lineage_after_is_transitive(stage1_setup, tmp_path):
  """Catches a lineage that records only the direct prerequisite (a retrained
  stage 1 would then go unnoticed by stage 3) or not its latest step."""
  _, fresh = stage1_setup
  workdir = str(tmp_path / "wd")
  assert checkpoints.lineage_after(workdir, None) == {}
  _save(workdir, "stage1", _at(fresh, 3), {"lineage": {}})
  assert checkpoints.lineage_after(workdir, "stage1") == {"stage1": 3}
  _save(workdir, "stage2", _at(fresh, 4), {"lineage": {"stage1": 3}})
  assert checkpoints.lineage_after(workdir, "stage2") == {"stage1": 3, "stage2": 4}
  _save(workdir, "stage1", _at(fresh, 5), {"lineage": {}})
  assert checkpoints.lineage_after(workdir, "stage1") == {"stage1": 5}


def test_stale_reason_none_for_consistent_lineages(stage1_setup, tmp_path):
  """Catches consistent stages reported stale (every rerun would retrain them),
  e.g. by comparing JSON's string-keyed, possibly re-typed values carelessly."""
  _, fresh = stage1_setup
  workdir = str(tmp_path / "wd")
  _save(workdir, "stage1", _at(fresh, 3), {"lineage": {}})
  _save(workdir, "stage2", _at(fresh, 4),
        {"lineage": checkpoints.lineage_after(workdir, "stage1")})
  _save(workdir, "stage3", _at(fresh, 2),
        {"lineage": checkpoints.lineage_after(workdir, "stage2")})
  assert checkpoints.stale_reason(workdir, "stage1", None) is None
  assert checkpoints.stale_reason(workdir, "stage2", "stage1") is None
  assert checkpoints.stale_reason(workdir, "stage3", "stage2") is None
  # A stage without checkpoints is not stale, it is untrained.
  assert checkpoints.stale_reason(workdir, "baseline", None) is None


def test_stale_reason_names_the_stage_when_its_prerequisite_trained_further(
    stage1_setup, tmp_path):
  """Catches stage 2 reused after stage 1 was trained further: its encoder
  rests on stage-1 parameters that no longer exist."""
  _, fresh = stage1_setup
  workdir = str(tmp_path / "wd")
  _save(workdir, "stage1", _at(fresh, 3), {"lineage": {}})
  _save(workdir, "stage2", _at(fresh, 4), {"lineage": {"stage1": 3}})
  assert checkpoints.stale_reason(workdir, "stage2", "stage1") is None
  _save(workdir, "stage1", _at(fresh, 5), {"lineage": {}})
  reason = checkpoints.stale_reason(workdir, "stage2", "stage1")
  assert reason is not None
  assert reason.startswith("stage2 ")
  assert "stage1" in reason and "3" in reason and "5" in reason
  assert "\n" not in reason


def test_stale_reason_sees_a_retrained_grandparent_through_the_lineage(
    stage1_setup, tmp_path):
  """Catches a staleness check that compares only the direct prerequisite's
  step: stage 2 retrained to the SAME step on a newer stage 1 still makes
  stage 3 stale."""
  _, fresh = stage1_setup
  workdir = str(tmp_path / "wd")
  _save(workdir, "stage1", _at(fresh, 3), {"lineage": {}})
  _save(workdir, "stage2", _at(fresh, 4), {"lineage": {"stage1": 3}})
  _save(workdir, "stage3", _at(fresh, 2), {"lineage": {"stage1": 3, "stage2": 4}})
  # stage1 trained to 5, stage2 set aside and retrained to step 4 on it.
  _save(workdir, "stage1", _at(fresh, 5), {"lineage": {}})
  checkpoints.set_aside(workdir, "stage2")
  _save(workdir, "stage2", _at(fresh, 4), {"lineage": {"stage1": 5}})
  reason = checkpoints.stale_reason(workdir, "stage3", "stage2")
  assert reason is not None and reason.startswith("stage3 ") and "stage1" in reason


def test_stale_reason_trusts_checkpoints_written_without_a_lineage(stage1_setup, tmp_path):
  """Catches every workdir written before lineages were recorded being
  retrained (its stages set aside) on the next run."""
  _, fresh = stage1_setup
  workdir = str(tmp_path / "wd")
  _save(workdir, "stage1", _at(fresh, 3), {"stage": "stage1"})
  _save(workdir, "stage2", _at(fresh, 4), {"stage": "stage2"})
  _save(workdir, "stage1", _at(fresh, 5), {"stage": "stage1"})
  assert checkpoints.stale_reason(workdir, "stage2", "stage1") is None


def test_stale_reason_none_when_the_prerequisite_has_no_checkpoint(stage1_setup, tmp_path):
  """Catches a crash (latest_step None -> int(None)) when the prerequisite's
  checkpoints are gone; training reports that case itself."""
  _, fresh = stage1_setup
  workdir = str(tmp_path / "wd")
  _save(workdir, "stage2", _at(fresh, 4), {"lineage": {"stage1": 3}})
  assert checkpoints.stale_reason(workdir, "stage2", "stage1") is None


# ----------------------------------------------------------------------------
# set_aside


def test_set_aside_moves_the_stage_under_superseded_and_deletes_nothing(
    stage1_setup, tmp_path):
  """Catches set_aside deleting checkpoints (a user's weeks of training), leaving
  them in place (they would be resumed from), or moving them outside
  checkpoints/superseded/."""
  _, fresh = stage1_setup
  workdir = str(tmp_path / "wd")
  with checkpoints.manager(workdir, "stage2") as mngr:
    for step in (2, 4):
      checkpoints.save(mngr, _at(fresh, step), {"lineage": {"stage1": 3}})
    mngr.wait_until_finished()
  before = _files(checkpoints.stage_dir(workdir, "stage2"))
  assert any(path.startswith("4" + os.sep) for path in before)

  moved = checkpoints.set_aside(workdir, "stage2")

  assert os.path.dirname(moved) == workdir_lib.superseded_dir(workdir)
  assert os.path.basename(moved).startswith("stage2-")
  assert _files(moved) == before
  assert not os.path.exists(checkpoints.stage_dir(workdir, "stage2"))
  assert checkpoints.latest_step(workdir, "stage2") is None
  # The stage trains afresh in its usual place.
  _save(workdir, "stage2", _at(fresh, 1), {"lineage": {"stage1": 5}})
  assert checkpoints.latest_step(workdir, "stage2") == 1


def test_set_aside_twice_in_the_same_second_keeps_both(stage1_setup, tmp_path, monkeypatch):
  """Catches a second set-aside within one timestamp overwriting or failing on
  the first, and a workdir path containing '~' (e.g. runs/zeta~0.01) sending
  the second copy out of the workdir: the suffix was cut at the first '~' of
  the whole path."""
  _, fresh = stage1_setup
  monkeypatch.setattr(checkpoints.time, "strftime", lambda fmt: "20260101-000000")
  workdir = str(tmp_path / "sweep~zeta" / "wd")
  moved = []
  for i in range(3):
    _save(workdir, "stage2", _at(fresh, i + 1), {"copy": i})
    moved.append(checkpoints.set_aside(workdir, "stage2"))
  superseded = workdir_lib.superseded_dir(workdir)
  assert len(set(moved)) == 3
  for i, path in enumerate(moved):
    assert os.path.dirname(path) == superseded, path
    assert os.path.isdir(os.path.join(path, str(i + 1)))
  assert sorted(os.listdir(superseded)) == sorted(os.path.basename(p) for p in moved)
  assert sorted(os.listdir(tmp_path)) == ["sweep~zeta"]
