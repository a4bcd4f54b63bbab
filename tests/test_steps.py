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


def _stage1_loss_by_hand(model, state, batch, loss_config, swap):
  """The stage-1 loss of DESIGN.md, computed term by term outside `steps`.

  The encoder sees M and N in one batch in training mode, as in the step (its
  BatchNorm statistics are those of the whole pair batch).
  """
  params = state.params
  b = batch["image_m"].shape[0]
  perm = np.asarray(mi.marginal_permutation(jax.random.fold_in(state.rng, state.step), b))
  images = jnp.concatenate([batch["image_m"], batch["image_n"]])
  out, _ = model.exp_encoder.apply(
      {"params": params["exp_encoder"], "batch_stats": state.batch_stats["exp_encoder"]},
      images, train=True, mutable=["batch_stats"])
  f_m, f_n = np.split(np.asarray(out.feature), 2)
  c_m, c_n = np.split(np.asarray(out.feature_map), 2)
  z_m, z_n = np.split(np.asarray(out.code), 2)
  code_for_m, code_for_n = (z_n, z_m) if swap else (z_m, z_n)

  def dv(critic, critic_params, x, z):
    joint = critic.apply({"params": critic_params}, x, z)
    marginal = critic.apply({"params": critic_params}, x, z[perm])
    return float(np.mean(np.asarray(joint, np.float64)) - _logmeanexp(marginal))

  def cross(critic, name, x_m, x_n):
    return (dv(critic, params[name], x_m, code_for_m) +
            dv(critic, params[name], x_n, code_for_n))

  mi_global = cross(model.exp_global_critic, "exp_global_critic", f_m, f_n)
  mi_local = cross(model.exp_local_critic, "exp_local_critic", c_m, c_n)
  l1 = float(np.mean(np.abs(z_m.astype(np.float64) - z_n)))
  c = loss_config
  loss = -(c.mu * mi_global + c.nu * mi_local) + c.delta * l1
  return dict(loss=loss, mi_global=mi_global, mi_local=mi_local, l1=l1)


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
