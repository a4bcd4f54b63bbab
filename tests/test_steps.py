"""Properties of the real stage step functions on a small model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dicefer_jax import contract, mi, models, steps
from experiments.configs import tiny

B, S = 8, 32


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


def _state(stage, config, params, batch_stats):
  return steps.create_state(stage, params, batch_stats,
                            steps.make_optimizers(config.train, stage), jax.random.PRNGKey(3))


def _run(stage, setup, num_steps, batch_fn):
  config, model, params, batch_stats = setup
  state = _state(stage, config, params, batch_stats)
  step = jax.jit(steps.make_step(stage, model, config,
                                 steps.make_optimizers(config.train, stage)))
  history = []
  for i in range(num_steps):
    state, metrics = step(state, batch_fn(jax.random.PRNGKey(100 + i)))
    history.append(jax.device_get(metrics))
  return state, history, step


def _same(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_stage1_trains_exp_encoder_and_never_touches_identity_parts(setup):
  _, _, params, batch_stats = setup
  state, _, _ = _run("stage1", setup, 3, _pair_batch)
  for name in ("id_encoder", "id_global_critic", "id_local_critic", "discriminator",
               "classifier", "baseline_head"):
    assert _same(state.params[name], params[name]), name
  assert _same(state.batch_stats["id_encoder"], batch_stats["id_encoder"])
  for name in steps.TRAINABLE["stage1"]["main"]:
    assert not _same(state.params[name], params[name]), name
  assert not _same(state.batch_stats["exp_encoder"], batch_stats["exp_encoder"])


def test_stage2_leaves_exp_encoder_bit_identical(setup):
  _, _, params, batch_stats = setup
  state, _, _ = _run("stage2", setup, 3, _pair_batch)
  assert _same(state.params["exp_encoder"], params["exp_encoder"])
  assert _same(state.batch_stats["exp_encoder"], batch_stats["exp_encoder"])
  assert _same(state.params["exp_global_critic"], params["exp_global_critic"])
  for name in ("id_encoder", "discriminator"):
    assert not _same(state.params[name], params[name]), name


def test_stage3_trains_only_the_classifier(setup):
  _, _, params, batch_stats = setup
  state, _, _ = _run("stage3", setup, 2, _image_batch)
  assert not _same(state.params["classifier"], params["classifier"])
  rest = [n for n in params if n != "classifier"]
  assert _same({n: state.params[n] for n in rest}, {n: params[n] for n in rest})
  assert _same(state.batch_stats, batch_stats)


def test_discriminator_and_identity_encoder_pull_the_adversarial_term_apart(setup):
  """One stage-2 step with only the adversarial term: D lowers its loss, E_id raises it."""
  config, model, params, batch_stats = setup
  config = config.copy_and_resolve_references()
  config.loss.mu, config.loss.nu, config.loss.zeta = 0.0, 0.0, 1.0
  config.train.learning_rate = 1e-4
  state = _state("stage2", config, params, batch_stats)
  batch = _pair_batch(jax.random.PRNGKey(7))
  new_state, _ = jax.jit(steps.make_step("stage2", model, config,
                                         steps.make_optimizers(config.train, "stage2")))(
                                             state, batch)
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


@pytest.mark.parametrize("stage", ["stage1", "stage2", "stage3", "baseline"])
def test_fifty_steps_finite_and_no_recompilation(setup, stage):
  batch_fn = _pair_batch if stage in steps.PAIR_STAGES else _image_batch
  state, history, step = _run(stage, setup, 50, batch_fn)
  assert int(state.step) == 50
  for metrics in history:
    for name, value in metrics.items():
      assert np.all(np.isfinite(value)), (stage, name, value)
  assert step._cache_size() == 1  # pylint: disable=protected-access
  if stage == "stage2":
    for metrics in history:
      assert np.isclose(metrics["disc_accuracy"], 0.5 * (
          metrics["disc_accuracy_joint"] + metrics["disc_accuracy_shuffled"]))


def test_step_rejects_mismatched_pair_shapes(setup):
  config, model, params, batch_stats = setup
  state = _state("stage1", config, params, batch_stats)
  step = steps.make_step("stage1", model, config, steps.make_optimizers(config.train, "stage1"))
  batch = _pair_batch(jax.random.PRNGKey(0))
  batch["image_n"] = batch["image_n"][:, :16]
  with pytest.raises(AssertionError):
    step(state, batch)
