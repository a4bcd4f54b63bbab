"""The stage step functions, each test named after the defect it catches.

One small model (experiments/configs/tiny.py, 32 px) and one batch size throughout,
so each step function is compiled once per loss setting: the 2-core CI machine
pays for compilations, not for steps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dicefer_jax import contract, mi, models, steps
from dicefer_jax.errors import UserError
from experiments.configs import tiny

B, S = 8, 32
EASY_PAIR_STEPS = 150


@pytest.fixture(scope="module")
def setup():
  config = tiny.get_config()
  # Critics on a map before the last stage, whatever default.py says: a step
  # that hands a critic the pooled last-stage feature f (or the last map) fails
  # the by-hand checks below on their shapes. (Stage 3 for both: on the tiny
  # trunk, a local critic on the 4x4x8 stage-2 map did not raise the easy pairs'
  # MI within EASY_PAIR_STEPS.)
  config.model.global_stage, config.model.local_stage = 3, 3
  model = models.build_model(config.model, contract.NUM_CLASSES)
  params, batch_stats = models.init_variables(model, jax.random.PRNGKey(0), S)
  return config, model, params, batch_stats


def _pair_batch(key):
  k1, k2, k3 = jax.random.split(key, 3)
  return dict(image_m=jax.random.normal(k1, (B, S, S, 1)),
              image_n=jax.random.normal(k2, (B, S, S, 1)),
              label=jax.random.randint(k3, (B,), 0, 7))


def _image_batch(key):
  k1, k2 = jax.random.split(key)
  return dict(image=jax.random.normal(k1, (B, S, S, 1)),
              label=jax.random.randint(k2, (B,), 0, 7))


class EasyPairs:
  """Same-expression pairs that share a strong class pattern and nothing else.

  Each of the 7 classes owns a blocky +-1 pattern; an image is twice its class's
  pattern plus unit Gaussian noise, drawn afresh for M and for N. What the two
  images of a pair share is exactly their class, so cross MI can be learnt fast.
  """

  def __init__(self, seed: int = 0):
    rng = np.random.default_rng(seed)
    blocks = rng.choice([-1.0, 1.0], size=(contract.NUM_CLASSES, S // 4, S // 4))
    self.patterns = np.kron(blocks, np.ones((4, 4)))[..., None].astype(np.float32)
    self.seed = seed

  def batch(self, index: int):
    rng = np.random.default_rng([self.seed, index])
    labels = rng.integers(0, contract.NUM_CLASSES, B)
    image = lambda: (2.0 * self.patterns[labels] +
                     rng.normal(size=(B, S, S, 1)).astype(np.float32))
    return dict(image_m=jnp.asarray(image()), image_n=jnp.asarray(image()),
                label=jnp.asarray(labels, jnp.int32))


def _config(config, **loss_overrides):
  config = config.copy_and_resolve_references()
  for name, value in loss_overrides.items():
    setattr(config.loss, name, value)
  return config


def _state(stage, config, params, batch_stats):
  return steps.create_state(stage, params, batch_stats,
                            steps.make_optimizers(config.train, stage), jax.random.PRNGKey(3))


def _jit_step(stage, config, model):
  return jax.jit(steps.make_step(stage, model, config,
                                 steps.make_optimizers(config.train, stage)))


def _run(step, state, num_steps, batch_fn):
  history = []
  for i in range(num_steps):
    state, metrics = step(state, batch_fn(i))
    history.append(jax.device_get(metrics))
  return state, history


def _same(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(leaves_a) == len(leaves_b) and all(
      np.array_equal(x, y) for x, y in zip(leaves_a, leaves_b))


def _all_finite(history):
  return all(np.all(np.isfinite(v)) for metrics in history for v in metrics.values())


def _adam_counts(opt_state):
  """The step counts of every Adam inside an optax state."""
  return [int(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state)
          if isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "count"]


# ---------------------------------------------------------------------------
# Stage 1: the loss is the formula, the swap and the weights matter, MI rises.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage1_run(setup):
  """The default stage-1 step, jitted once, trained on easy pairs."""
  config, model, params, batch_stats = setup
  step = _jit_step("stage1", config, model)
  start = _state("stage1", config, params, batch_stats)
  data = EasyPairs()
  end, history = _run(step, start, EASY_PAIR_STEPS, data.batch)
  return dict(step=step, start=start, end=end, history=history, data=data)


def _logmeanexp(x):
  x = np.asarray(x, np.float64)
  top = x.max()
  return top + np.log(np.mean(np.exp(x - top)))


def _softplus(t):
  return np.logaddexp(0.0, np.asarray(t, np.float64))


def _mi_term_by_hand(critic, critic_params, x, z, perm, estimator):
  """(DV estimate, `estimator` objective) of one term, in float64 outside `mi`.

  InfoNCE's matrix is built column by column: code j tiled against every image.
  """
  apply = lambda xx, zz: np.asarray(critic.apply({"params": critic_params}, xx, zz),
                                    np.float64)
  joint, marginal = apply(x, z), apply(x, z[perm])
  dv = float(np.mean(joint) - _logmeanexp(marginal))
  if estimator == "dv":
    return dv, dv
  if estimator == "jsd":
    return dv, float(-np.mean(_softplus(-joint)) - np.mean(_softplus(marginal)))
  b = x.shape[0]
  s = np.stack([apply(x, np.repeat(z[j:j + 1], b, axis=0)) for j in range(b)], axis=1)
  log_softmax = np.diag(s) - np.array([_logmeanexp(row) + np.log(b) for row in s])
  return dv, float(np.mean(log_softmax) + np.log(b))


def _stage1_loss_by_hand(model, state, batch, loss_config, swap):
  """The stage-1 loss of DESIGN.md, computed term by term outside `steps`.

  The encoder sees M and N in one batch in training mode, as in the step (its
  BatchNorm statistics are those of the whole pair batch). The global critic
  scores the pooled map of model.global_stage, the local one model.local_stage's
  map, both read off the trunk here, not from the encoder's output.
  """
  params = state.params
  b = batch["image_m"].shape[0]
  perm = np.asarray(mi.marginal_permutation(jax.random.fold_in(state.rng, state.step), b))
  images = jnp.concatenate([batch["image_m"], batch["image_n"]])
  x_global, x_local, code = _critic_inputs_by_hand(model.exp_encoder, params,
                                                   state.batch_stats, "exp_encoder", images)
  f_m, f_n = np.split(x_global, 2)
  c_m, c_n = np.split(x_local, 2)
  z_m, z_n = np.split(code, 2)
  code_for_m, code_for_n = (z_n, z_m) if swap else (z_m, z_n)
  c = loss_config

  def cross(critic, name, x_m, x_n):
    a = _mi_term_by_hand(critic, params[name], x_m, code_for_m, perm, c.estimator)
    b = _mi_term_by_hand(critic, params[name], x_n, code_for_n, perm, c.estimator)
    return a[0] + b[0], a[1] + b[1]

  mi_global, objective_global = cross(model.exp_global_critic, "exp_global_critic", f_m, f_n)
  mi_local, objective_local = cross(model.exp_local_critic, "exp_local_critic", c_m, c_n)
  l1 = float(np.mean(np.abs(z_m.astype(np.float64) - z_n)))
  loss = -(c.mu * objective_global + c.nu * objective_local) + c.delta * l1
  return dict(loss=loss, mi_global=mi_global, mi_local=mi_local, l1=l1,
              objective_global=objective_global, objective_local=objective_local)


def _critic_inputs_by_hand(encoder, params, batch_stats, name, images, train=True,
                           stages=None):
  """(pooled map of the global stage, map of the local stage, code), the maps
  taken from the trunk's own output list rather than the encoder's fields;
  `stages` = (global, local), by default the encoder's own."""
  global_stage, local_stage = stages or (encoder.global_stage, encoder.local_stage)
  variables = {"params": params[name], "batch_stats": batch_stats[name]}
  trunk_variables = {"params": params[name]["trunk"],
                     "batch_stats": batch_stats[name]["trunk"]}
  trunk = models.ResNet18Trunk(encoder.width, encoder.dtype)
  if train:
    out, _ = encoder.apply(variables, images, train=True, mutable=["batch_stats"])
    maps, _ = trunk.apply(trunk_variables, images, train=True, mutable=["batch_stats"])
  else:
    out = encoder.apply(variables, images, train=False)
    maps = trunk.apply(trunk_variables, images, train=False)
  x_global = np.asarray(maps[global_stage - 1], np.float64).mean(axis=(1, 2))
  x_local = np.asarray(maps[local_stage - 1])
  return x_global.astype(np.float32), x_local, np.asarray(out.code)


def _assert_metrics_match(metrics, expected):
  for name, value in expected.items():
    np.testing.assert_allclose(float(metrics[name]), value, atol=1e-4, rtol=1e-4,
                               err_msg=name)


def test_stage1_loss_is_the_cross_mi_formula(setup, stage1_run):
  """Catches a wrong sign, weight, pairing, marginal permutation or L1 term.

  Checked at the trained state, where both MI terms are far from zero, so that a
  flipped sign or a swapped mu/nu moves the loss by much more than the tolerance.
  """
  config, model, _, _ = setup
  state = stage1_run["end"]
  batch = stage1_run["data"].batch(10_000)
  expected = _stage1_loss_by_hand(model, state, batch, config.loss, swap=True)
  assert abs(expected["mi_global"]) > 0.05 and abs(expected["mi_local"]) > 0.05, expected
  assert expected["l1"] > 1e-3, expected
  _, metrics = stage1_run["step"](state, batch)
  _assert_metrics_match(metrics, expected)


@pytest.fixture(scope="module")
def own_codes_no_local_step(setup):
  """The stage-1 step with swap=False and nu=0, compiled once for two tests."""
  config, model, _, _ = setup
  config = _config(config, swap=False, nu=0.0)
  return config, _jit_step("stage1", config, model)


def test_stage1_swap_false_scores_each_image_with_its_own_code(setup, stage1_run,
                                                               own_codes_no_local_step):
  """Catches a step that ignores `loss.swap` (always or never swapping), in the
  global or in the local term: the metrics are compared term by term, and the
  mi_local metric is reported whatever its weight."""
  _, model, _, _ = setup
  config, step = own_codes_no_local_step
  state = stage1_run["end"]
  batch = stage1_run["data"].batch(10_001)
  # Partners of other classes: after training, a pair's two codes are nearly
  # equal, so own and partner codes would score alike and the check could not
  # tell a step that ignores `swap`; mismatched partners make them differ.
  batch = dict(batch, image_n=batch["image_n"][::-1])
  own = _stage1_loss_by_hand(model, state, batch, config.loss, swap=False)
  partner = _stage1_loss_by_hand(model, state, batch, config.loss, swap=True)
  for name in ("mi_global", "mi_local"):
    assert abs(own[name] - partner[name]) > 1e-2, (name, own, partner)
  _, metrics = step(state, batch)
  _assert_metrics_match(metrics, own)


def test_stage1_nu_zero_leaves_the_local_critic_untouched(setup, own_codes_no_local_step):
  """Catches a step that ignores `loss.nu` or applies mu to the local terms.

  With nu = 0 the local critic's gradient is exactly zero, and Adam from its
  initial state turns a zero gradient into a zero update (0 / (0 + eps)): its
  parameters stay bit-identical while the global critic's move.
  """
  config, _, params, batch_stats = setup
  state = _state("stage1", config, params, batch_stats)
  new_state, _ = own_codes_no_local_step[1](state, EasyPairs().batch(0))
  assert _same(new_state.params["exp_local_critic"], params["exp_local_critic"])
  assert not _same(new_state.params["exp_global_critic"], params["exp_global_critic"])


def test_stage1_raises_cross_mi_on_easy_pairs(stage1_run):
  """Catches a stage 1 that does not maximise cross MI (sign, gradient, pairing)."""
  history = stage1_run["history"]
  assert _all_finite(history)
  for name in ("mi_global", "mi_local"):
    values = np.array([float(m[name]) for m in history])
    first, last = values[:10].mean(), values[-20:].mean()
    assert last > first + 0.5, (name, first, last)


def test_stage1_trains_exp_encoder_and_never_touches_identity_parts(setup, stage1_run):
  """Catches stage 1 updating a module outside its trainable set, or none at all."""
  _, _, params, batch_stats = setup
  state = stage1_run["end"]
  assert int(state.step) == EASY_PAIR_STEPS
  for name in ("id_encoder", "id_global_critic", "id_local_critic", "discriminator",
               "classifier", "baseline_head"):
    assert _same(state.params[name], params[name]), name
  assert _same(state.batch_stats["id_encoder"], batch_stats["id_encoder"])
  for name in steps.TRAINABLE["stage1"]["main"]:
    assert not _same(state.params[name], params[name]), name
  assert not _same(state.batch_stats["exp_encoder"], batch_stats["exp_encoder"])


def test_stage1_compiles_once(stage1_run):
  """Catches a state whose structure or dtypes change between steps (a retrace)."""
  assert stage1_run["step"]._cache_size() == 1  # pylint: disable=protected-access


@pytest.mark.parametrize("estimator", ["jsd", "infonce"])
def test_stage1_trains_on_the_estimator_and_logs_its_dv_estimate(setup, stage1_run,
                                                                 estimator):
  """Catches a step that ignores `loss.estimator` (trains DV whatever it says),
  that logs the objective as mi_* (curves of runs with different estimators would
  not compare), or whose objective does not reach E_exp.

  At the trained state each objective is far from the DV estimate, so a loss
  built on the wrong one misses the by-hand value; with delta = 0 the MI
  objective is E_exp's only gradient, and Adam moves it iff that is nonzero.
  """
  config, model, _, _ = setup
  config = _config(config, estimator=estimator, delta=0.0)
  state = stage1_run["end"]
  batch = stage1_run["data"].batch(10_002)
  expected = _stage1_loss_by_hand(model, state, batch, config.loss, swap=True)
  for kind in ("global", "local"):
    assert abs(expected[f"objective_{kind}"] - expected[f"mi_{kind}"]) > 1e-2, expected
  new_state, metrics = _jit_step("stage1", config, model)(state, batch)
  _assert_metrics_match(metrics, expected)
  assert bool(metrics["finite"])
  assert not _same(new_state.params["exp_encoder"], state.params["exp_encoder"])


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_unknown_estimator_is_refused_before_tracing(setup, stage):
  config, model, _, _ = setup
  config = _config(config, estimator="mine")
  with pytest.raises(UserError, match=r"^--config\.loss\.estimator='mine'"):
    steps.make_step(stage, model, config, steps.make_optimizers(config.train, stage))


def test_step_rejects_mismatched_pair_shapes(setup):
  config, model, params, batch_stats = setup
  state = _state("stage1", config, params, batch_stats)
  step = steps.make_step("stage1", model, config, steps.make_optimizers(config.train, "stage1"))
  batch = _pair_batch(jax.random.PRNGKey(0))
  batch["image_n"] = batch["image_n"][:, :16]
  with pytest.raises(AssertionError):
    step(state, batch)


# ---------------------------------------------------------------------------
# Stage 2: E_exp frozen, disc_steps D updates per E_id update, the adversary.
# ---------------------------------------------------------------------------

DISC_STEPS = 3
STAGE2_STEPS = 2


@pytest.fixture(scope="module")
def stage2_run(setup):
  """Stage 2 with the adversarial term alone (mu = nu = 0, zeta = 1) and DISC_STEPS
  discriminator updates per step, compiled once for every stage-2 test.

  With the MI terms off, E_id's first update follows the adversarial gradient
  alone, and the identity critics' gradients are exactly zero.
  """
  config, model, params, batch_stats = setup
  config = _config(config, mu=0.0, nu=0.0, zeta=1.0)
  config.train.disc_steps = DISC_STEPS
  config.train.learning_rate = 1e-4  # small enough for a first-order change
  step = _jit_step("stage2", config, model)
  start = _state("stage2", config, params, batch_stats)
  batches = [_pair_batch(jax.random.PRNGKey(100 + i)) for i in range(STAGE2_STEPS)]
  first, _ = step(start, batches[0])
  end, history = _run(step, start, STAGE2_STEPS, batches.__getitem__)
  return dict(step=step, start=start, first=first, end=end, history=history,
              batches=batches)


def test_stage2_leaves_exp_encoder_bit_identical(setup, stage2_run):
  """Catches stage 2 leaking gradients or BN statistic updates into E_exp."""
  _, _, params, batch_stats = setup
  state = stage2_run["end"]
  for name in ("exp_encoder", "exp_global_critic", "exp_local_critic", "classifier",
               "baseline_head"):
    assert _same(state.params[name], params[name]), name
  assert _same(state.batch_stats["exp_encoder"], batch_stats["exp_encoder"])
  for name in ("id_encoder", "discriminator"):
    assert not _same(state.params[name], params[name]), name
  assert not _same(state.batch_stats["id_encoder"], batch_stats["id_encoder"])


def test_stage2_mi_weights_zero_leave_the_identity_critics_untouched(setup, stage2_run):
  """Catches stage 2 ignoring `loss.mu` / `loss.nu` (zero gradient, zero Adam update)."""
  _, _, params, _ = setup
  for name in ("id_global_critic", "id_local_critic"):
    assert _same(stage2_run["end"].params[name], params[name]), name


@pytest.mark.parametrize("disc_steps", [0, -1, 1.5, "2", True])
def test_stage2_rejects_invalid_disc_steps(setup, disc_steps):
  """Catches disc_steps=0 failing at trace time (unbound disc_loss) instead of a
  one-line UserError that names the flag."""
  config, model, _, _ = setup
  optimizers = steps.make_optimizers(config.train, "stage2")
  with pytest.raises(UserError, match=r"^--config\.train\.disc_steps=.*integer >= 1"):
    steps.make_stage2_step(model, config.loss, optimizers, disc_steps)


def test_stage2_takes_disc_steps_discriminator_updates_per_step(stage2_run):
  """Catches `disc_steps` meaning "extra" updates (or being ignored): D's Adam
  advances by exactly disc_steps per step, E_id's by one."""
  start, end = stage2_run["start"], stage2_run["end"]
  assert _adam_counts(start.opt_state["disc"]) == [0]
  assert _adam_counts(end.opt_state["disc"]) == [DISC_STEPS * STAGE2_STEPS]
  assert _adam_counts(end.opt_state["main"]) == [STAGE2_STEPS]


def test_stage2_metrics_finite_consistent_and_compiled_once(stage2_run):
  """Catches NaN metrics, an inconsistent disc_accuracy, or a retrace per step."""
  history = stage2_run["history"]
  assert _all_finite(history)
  for metrics in history:
    assert np.isclose(metrics["disc_accuracy"], 0.5 * (
        metrics["disc_accuracy_joint"] + metrics["disc_accuracy_shuffled"]))
  assert stage2_run["step"]._cache_size() == 1  # pylint: disable=protected-access


def test_discriminator_and_identity_encoder_pull_the_adversarial_term_apart(setup,
                                                                            stage2_run):
  """Catches a wrong adversarial sign: D must lower its loss, E_id must raise it."""
  _, model, params, batch_stats = setup
  state, new_state = stage2_run["start"], stage2_run["first"]
  batch = stage2_run["batches"][0]
  images = jnp.concatenate([batch["image_m"], batch["image_n"]])
  key = jax.random.fold_in(state.rng, state.step)
  perm = mi.marginal_permutation(jax.random.fold_in(key, 1), 2 * B)
  z_exp = model.exp_encoder.apply({"params": params["exp_encoder"],
                                   "batch_stats": batch_stats["exp_encoder"]},
                                  images, train=False).code

  def disc_loss(disc_params, id_params):
    z_id, _ = model.id_encoder.apply({"params": id_params,
                                      "batch_stats": batch_stats["id_encoder"]},
                                     images, train=True, mutable=["batch_stats"])
    d = lambda zi: model.discriminator.apply({"params": disc_params}, z_exp, zi)
    bce = lambda logits, t: jnp.mean(jax.nn.softplus(-logits) if t else jax.nn.softplus(logits))
    return float(bce(d(z_id.code), 1) + bce(d(z_id.code[perm]), 0))

  before = disc_loss(params["discriminator"], params["id_encoder"])
  after_d = disc_loss(new_state.params["discriminator"], params["id_encoder"])
  after_id = disc_loss(params["discriminator"], new_state.params["id_encoder"])
  assert after_d < before < after_id, (before, after_d, after_id)


def _stage2_mi_by_hand(model, state, batch, loss_config, critic_input):
  """Stage 2's MI terms outside `steps`: for M's and N's images apart, the
  identity critics score E_id's maps of the configured stages (training mode),
  or with critic_input="exp_encoder" the frozen E_exp's maps of those stages
  (eval mode), against t = [z_exp, z_id], z_exp from the frozen E_exp in eval mode."""
  params = state.params
  b = batch["image_m"].shape[0]
  perm = np.asarray(mi.marginal_permutation(jax.random.fold_in(state.rng, state.step), b))
  images = jnp.concatenate([batch["image_m"], batch["image_n"]])
  z_exp = np.asarray(model.exp_encoder.apply(
      {"params": params["exp_encoder"], "batch_stats": state.batch_stats["exp_encoder"]},
      images, train=False).code)
  x_global, x_local, z_id = _critic_inputs_by_hand(model.id_encoder, params,
                                                   state.batch_stats, "id_encoder", images)
  if critic_input == "exp_encoder":
    x_global, x_local, _ = _critic_inputs_by_hand(
        model.exp_encoder, params, state.batch_stats, "exp_encoder", images, train=False,
        stages=(model.id_encoder.global_stage, model.id_encoder.local_stage))
  t = np.concatenate([z_exp, z_id], axis=-1)
  out = {}
  for kind, critic, x in (("global", model.id_global_critic, x_global),
                          ("local", model.id_local_critic, x_local)):
    terms = [_mi_term_by_hand(critic, params[f"id_{kind}_critic"], xh, th, perm,
                              loss_config.estimator)
             for xh, th in zip(np.split(x, 2), np.split(t, 2))]
    out[f"mi_{kind}"] = sum(term[0] for term in terms)
    out[f"objective_{kind}"] = sum(term[1] for term in terms)
  c = loss_config
  out["loss"] = -(c.mu * out["objective_global"] + c.nu * out["objective_local"])
  return out


@pytest.mark.parametrize("estimator", mi.ESTIMATORS)
def test_stage2_mi_terms_are_the_estimator_on_the_configured_maps(setup, estimator):
  """Catches stage 2 scoring E_id's pooled last-stage feature (the code's own
  input: the degenerate shortcut) instead of the configured stages' maps, pairing
  M's images with N's codes, ignoring `loss.estimator`, logging anything but the
  DV estimate as mi_*, or an objective that does not reach E_id.

  zeta = 0: the MI terms are E_id's only gradient. The id critics' score layers
  are scaled up so that at initialisation the objectives differ from DV by far
  more than the tolerance.
  """
  config, model, params, batch_stats = setup
  config = _config(config, estimator=estimator, zeta=0.0)
  params = dict(params)
  for name in ("id_global_critic", "id_local_critic"):
    params[name] = dict(params[name], score=jax.tree.map(lambda w: 30.0 * w,
                                                         params[name]["score"]))
  state = _state("stage2", config, params, batch_stats)
  batch = EasyPairs().batch(7)
  expected = _stage2_mi_by_hand(model, state, batch, config.loss,
                                config.model.id_critic_input)
  if estimator != "dv":
    for kind in ("global", "local"):
      assert abs(expected[f"objective_{kind}"] - expected[f"mi_{kind}"]) > 1e-2, expected
  new_state, metrics = _jit_step("stage2", config, model)(state, batch)
  _assert_metrics_match(metrics, expected)
  assert bool(metrics["finite"])
  assert not _same(new_state.params["id_encoder"], state.params["id_encoder"])


@pytest.mark.parametrize("critic_input", models.ID_CRITIC_INPUTS)
def test_stage2_critics_score_the_map_of_the_encoder_and_stage_asked_for(setup,
                                                                         critic_input):
  """Catches `model.id_critic_input` being ignored (either way), taking the
  maps at stage 1's critic stages instead of `id_critic_stage`, or running the
  frozen E_exp in training mode (its batch statistics would move the maps);
  and E_exp changing in stage 2. E_id is trained either way (zeta = 0: with
  E_exp's maps, through z_id in t alone).

  Stage 1's critics here score stage 3, stage 2's stage 2: both widths differ,
  so a map from the wrong stage fails on shape, from the wrong encoder on value."""
  config, _, _, _ = setup
  config = _config(config, zeta=0.0)
  config.model.id_critic_input, config.model.id_critic_stage = critic_input, 2
  model = models.build_model(config.model, contract.NUM_CLASSES)
  assert (model.id_encoder.global_stage, model.id_encoder.local_stage) == (2, 2)
  assert (model.exp_encoder.global_stage, model.exp_encoder.local_stage) == (3, 3)
  params, batch_stats = models.init_variables(model, jax.random.PRNGKey(0), S)
  state = _state("stage2", config, params, batch_stats)
  batch = EasyPairs().batch(3)
  expected = _stage2_mi_by_hand(model, state, batch, config.loss, critic_input)
  other, = set(models.ID_CRITIC_INPUTS) - {critic_input}
  wrong = _stage2_mi_by_hand(model, state, batch, config.loss, other)
  assert abs(wrong["mi_local"] - expected["mi_local"]) > 1e-2, (wrong, expected)
  new_state, metrics = _jit_step("stage2", config, model)(state, batch)
  _assert_metrics_match(metrics, expected)
  assert not _same(new_state.params["id_encoder"], state.params["id_encoder"])
  assert _same(new_state.params["exp_encoder"], state.params["exp_encoder"])
  assert _same(new_state.batch_stats["exp_encoder"], state.batch_stats["exp_encoder"])


def test_separable_critics_train_both_mi_stages_on_the_same_terms(setup):
  """With model.critic="separable" the steps read every score off one B x B
  matmul per term (`SeparableCritic.pairwise`); the by-hand terms score pair by
  pair (`__call__`). Catches a term handed another critic's matrix (global for
  local, stage 1's for stage 2's), codes and maps paired wrongly on the matmul
  path, or an objective that does not reach the encoder it trains. (How each
  objective reads the matrix: tests/test_mi.py. InfoNCE here, the objective
  separable critics are for.)

  The critics' embeddings are scaled up so that at initialisation every
  objective is far from the DV estimate."""
  config, _, _, _ = setup
  estimator = "infonce"
  config = _config(config, estimator=estimator, delta=0.0, zeta=0.0)
  config.model.critic = "separable"
  model = models.build_model(config.model, contract.NUM_CLASSES)
  params, batch_stats = models.init_variables(model, jax.random.PRNGKey(0), S)
  for name in ("exp_global_critic", "exp_local_critic", "id_global_critic",
               "id_local_critic"):
    params[name] = dict(params[name], **{
        part: jax.tree.map(lambda w: 6.0 * w, params[name][part])
        for part in ("x_embed", "z_embed")})
  batch = EasyPairs().batch(5)
  for stage, by_hand, trained in (
      ("stage1", lambda st: _stage1_loss_by_hand(model, st, batch, config.loss, True),
       "exp_encoder"),
      ("stage2", lambda st: _stage2_mi_by_hand(model, st, batch, config.loss,
                                               config.model.id_critic_input),
       "id_encoder")):
    state = _state(stage, config, params, batch_stats)
    expected = by_hand(state)
    for kind in ("global", "local"):
      assert abs(expected[f"mi_{kind}"]) > 1e-2, (stage, expected)
      assert abs(expected[f"objective_{kind}"] - expected[f"mi_{kind}"]) > 1e-2, (
          stage, expected)
    new_state, metrics = _jit_step(stage, config, model)(state, batch)
    _assert_metrics_match(metrics, expected)
    assert not _same(new_state.params[trained], state.params[trained]), stage


# ---------------------------------------------------------------------------
# Stage 3 and the baseline: what they train.
# ---------------------------------------------------------------------------


def _run_image_stage(stage, setup, num_steps=2):
  config, model, params, batch_stats = setup
  step = _jit_step(stage, config, model)
  state, history = _run(step, _state(stage, config, params, batch_stats), num_steps,
                        lambda i: _image_batch(jax.random.PRNGKey(200 + i)))
  assert _all_finite(history), stage
  assert step._cache_size() == 1, stage  # pylint: disable=protected-access
  return state


def test_stage3_trains_only_the_classifier(setup):
  """Catches stage 3 fine-tuning E_exp (or its BN statistics) under the classifier."""
  _, _, params, batch_stats = setup
  state = _run_image_stage("stage3", setup)
  assert not _same(state.params["classifier"], params["classifier"])
  rest = [n for n in params if n != "classifier"]
  assert _same({n: state.params[n] for n in rest}, {n: params[n] for n in rest})
  assert _same(state.batch_stats, batch_stats)


def test_baseline_trains_exp_encoder_and_its_head_only(setup):
  """Catches the baseline touching DICE-FER's other modules, or training nothing."""
  _, _, params, batch_stats = setup
  state = _run_image_stage("baseline", setup)
  trained = steps.TRAINABLE["baseline"]["main"]
  for name in params:
    assert _same(state.params[name], params[name]) != (name in trained), name
  assert not _same(state.batch_stats["exp_encoder"], batch_stats["exp_encoder"])
  assert _same(state.batch_stats["id_encoder"], batch_stats["id_encoder"])


# ---------------------------------------------------------------------------
# Optimizers: the config fields they read are honoured.
# ---------------------------------------------------------------------------


def _first_update(tx, grads):
  updates, _ = tx.update(grads, tx.init(grads), grads)
  return updates


def test_disc_learning_rate_sets_the_discriminator_step_and_zero_means_main(setup):
  """Catches disc_learning_rate being ignored, or its 0 = "same as main" rule."""
  config = setup[0].copy_and_resolve_references()
  config.train.learning_rate = 1e-3
  grads = {"w": jnp.ones((3,))}
  # Adam's first update is -lr * g / (|g| + eps): about -lr for g = 1.
  config.train.disc_learning_rate = 0.0
  same = steps.make_optimizers(config.train, "stage2")
  np.testing.assert_allclose(_first_update(same["disc"], grads)["w"], -1e-3, rtol=1e-5)
  config.train.disc_learning_rate = 5e-2
  own = steps.make_optimizers(config.train, "stage2")
  np.testing.assert_allclose(_first_update(own["disc"], grads)["w"], -5e-2, rtol=1e-5)
  np.testing.assert_allclose(_first_update(own["main"], grads)["w"], -1e-3, rtol=1e-5)
  assert set(steps.make_optimizers(config.train, "stage1")) == {"main"}


def test_grad_clip_norm_clips_before_adam(setup):
  """Catches grad_clip_norm being ignored: a gradient clipped to a norm far below
  Adam's eps gives a far smaller first update than the unclipped lr-sized one."""
  config = setup[0].copy_and_resolve_references()
  config.train.learning_rate = 1e-3
  grads = {"w": jnp.ones((4,))}
  config.train.grad_clip_norm = 0.0
  unclipped = _first_update(steps.make_optimizers(config.train, "stage1")["main"], grads)
  config.train.grad_clip_norm = 1e-12
  clipped = _first_update(steps.make_optimizers(config.train, "stage1")["main"], grads)
  np.testing.assert_allclose(unclipped["w"], -1e-3, rtol=1e-5)
  assert np.all(np.abs(clipped["w"]) < 1e-5), clipped


def test_make_optimizers_has_no_defaults_of_its_own(setup):
  """Catches a `.get(field, default)` fallback that would shadow default.py."""
  config = setup[0].copy_and_resolve_references()
  del config.train.grad_clip_norm
  with pytest.raises((AttributeError, KeyError)):
    steps.make_optimizers(config.train, "stage1")
