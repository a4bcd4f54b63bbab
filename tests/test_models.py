"""Shapes and parameter counts of the DICE-FER modules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dicefer_jax import models
from experiments.configs import tiny

# torchvision resnet18: 11,689,512 parameters; minus fc (512*1000 + 1000) and the
# 3-channel stem (64*3*7*7), plus a 1-channel stem (64*1*7*7).
TORCHVISION_RESNET18_TRUNK_1CH = 11_689_512 - 513_000 - 64 * 3 * 49 + 64 * 1 * 49


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_full_size_encoder_shapes_and_parameter_count():
  encoder = models.ResNet18Encoder(code_dim=64)
  images = jnp.zeros((2, 112, 112, 1))
  variables = jax.eval_shape(lambda: encoder.init(jax.random.PRNGKey(0), images, train=False))
  assert _count(variables["params"]["trunk"]) == TORCHVISION_RESNET18_TRUNK_1CH == 11_170_240
  out = jax.eval_shape(lambda v: encoder.apply(v, images, train=False), variables)
  assert out.code.shape == (2, 64)
  assert out.feature.shape == (2, 512)
  assert out.feature_map.shape == (2, 4, 4, 512)
  trunk = models.ResNet18Trunk()
  maps = jax.eval_shape(lambda v: trunk.apply(v, images, train=False),
                        {"params": variables["params"]["trunk"],
                         "batch_stats": variables["batch_stats"]["trunk"]})
  assert [m.shape[1:] for m in maps] == [(28, 28, 64), (14, 14, 128), (7, 7, 256), (4, 4, 512)]


def test_max_pool_matches_flax_reduce_window():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 15, 14, 3))
  ours = models.max_pool_3x3_s2(x)
  ref = __import__("flax").linen.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))


def _dense(params, x):
  """A Dense or 1x1 Conv layer applied by hand, in float64."""
  kernel = np.asarray(params["kernel"], np.float64)
  return x @ kernel.reshape(-1, kernel.shape[-1]) + np.asarray(params["bias"], np.float64)


def _mlp_by_hand(params, h, num_hidden_layers):
  for i in range(num_hidden_layers):
    h = np.maximum(_dense(params[f"hidden{i + 1}"], h), 0.0)
  return _dense(params["score"], h)[..., 0]


def test_global_critic_defaults_and_shapes():
  critic = models.GlobalCritic()
  x, z = jnp.ones((5, 7)), jnp.ones((5, 3))
  variables = critic.init(jax.random.PRNGKey(0), x, z)
  scores = critic.apply(variables, x, z)
  assert scores.shape == (5,)
  # Works for other input widths with a fresh init: nothing is tied to the encoder.
  v2 = critic.init(jax.random.PRNGKey(0), jnp.ones((3, 2)), jnp.ones((3, 2)))
  assert critic.apply(v2, jnp.ones((3, 2)), jnp.ones((3, 2))).shape == (3,)


def test_global_critic_is_an_mlp_on_x_and_z():
  """Catches a critic that drops x or z, or mixes items of the batch."""
  critic = models.GlobalCritic(hidden=16, num_hidden_layers=2)
  kx, kz, kinit = jax.random.split(jax.random.PRNGKey(2), 3)
  x, z = jax.random.normal(kx, (4, 6)), jax.random.normal(kz, (4, 3))
  params = critic.init(kinit, x, z)["params"]
  scores = np.asarray(critic.apply({"params": params}, x, z))
  expected = _mlp_by_hand(params, np.concatenate([x, z], -1).astype(np.float64), 2)
  np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)
  assert np.ptp(scores) > 1e-3  # not a constant: the check above has teeth


def test_local_critic_scores_each_position_and_averages():
  """Catches a critic that ignores C or z, mixes positions or items, or sums
  instead of averaging: scores equal the mean over positions of a per-position
  MLP on concat[C[b, i, j], z[b]], computed by hand from the module's parameters."""
  critic = models.LocalCritic(hidden=8, num_hidden_layers=2)
  kf, kz, kinit = jax.random.split(jax.random.PRNGKey(0), 3)
  fmap, z = jax.random.normal(kf, (3, 4, 5, 6)), jax.random.normal(kz, (3, 5))
  params = critic.init(kinit, fmap, z)["params"]
  score = lambda f, zz: np.asarray(critic.apply({"params": params}, f, zz))
  scores = score(fmap, z)
  assert scores.shape == (3,)

  tiled = np.broadcast_to(np.asarray(z)[:, None, None, :], (3, 4, 5, 5))
  inputs = np.concatenate([np.asarray(fmap), tiled], -1).astype(np.float64)
  per_position = _mlp_by_hand(params, inputs, 2)
  assert per_position.shape == (3, 4, 5)
  np.testing.assert_allclose(scores, per_position.mean(axis=(1, 2)), rtol=1e-4, atol=1e-5)

  # Each input matters, item by item: a new z for item 0 moves only item 0's score,
  # and so does a change at one position of item 0's map.
  moved = score(fmap, z.at[0].add(1.0))
  assert abs(moved[0] - scores[0]) > 1e-4
  np.testing.assert_array_equal(moved[1:], scores[1:])
  moved = score(fmap.at[0, 2, 3].add(3.0), z)
  assert abs(moved[0] - scores[0]) > 1e-5
  np.testing.assert_array_equal(moved[1:], scores[1:])
  # A mean over positions does not depend on their order.
  np.testing.assert_allclose(score(fmap[:, ::-1, ::-1, :], z), scores, rtol=1e-5)


def test_build_and_init_every_module(tiny_config):
  model = models.build_model(tiny_config.model, 7)
  params, batch_stats = models.init_variables(model, jax.random.PRNGKey(0), 32)
  assert set(params) == set(models.DiceferModel._fields)
  assert set(batch_stats) == {"exp_encoder", "id_encoder"}
  logits = model.classifier.apply({"params": params["classifier"]}, jnp.ones((2, 8)))
  assert logits.shape == (2, 7)
  d = model.discriminator.apply({"params": params["discriminator"]},
                                jnp.ones((2, 8)), jnp.ones((2, 8)))
  assert d.shape == (2,)


def test_build_model_honours_normalize_code_and_half_precision():
  """Catches build_model ignoring a model field (and using a default of its own)."""
  model = models.build_model(tiny.get_config().model, 7)
  assert not model.exp_encoder.normalize_code and model.exp_encoder.dtype == jnp.float32
  config = tiny.get_config().model
  config.normalize_code, config.half_precision = True, True
  model = models.build_model(config, 7)
  for encoder in (model.exp_encoder, model.id_encoder):
    assert encoder.normalize_code and encoder.dtype == jnp.bfloat16


def test_build_model_has_no_defaults_of_its_own():
  """Catches a `.get(field, default)` fallback that would shadow default.py."""
  for field in ("normalize_code", "half_precision"):
    config = tiny.get_config().model
    delattr(config, field)
    with pytest.raises((AttributeError, KeyError)):
      models.build_model(config, 7)
