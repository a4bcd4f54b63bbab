"""Shapes and parameter counts of the DICE-FER modules."""

import jax
import jax.numpy as jnp
import numpy as np

from dicefer_jax import models

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


def test_global_critic_defaults_and_shapes():
  critic = models.GlobalCritic()
  x, z = jnp.ones((5, 7)), jnp.ones((5, 3))
  variables = critic.init(jax.random.PRNGKey(0), x, z)
  scores = critic.apply(variables, x, z)
  assert scores.shape == (5,)
  # Works for other input widths with a fresh init: nothing is tied to the encoder.
  v2 = critic.init(jax.random.PRNGKey(0), jnp.ones((3, 2)), jnp.ones((3, 2)))
  assert critic.apply(v2, jnp.ones((3, 2)), jnp.ones((3, 2))).shape == (3,)


def test_local_critic_scores_each_position_and_averages():
  critic = models.LocalCritic(hidden=8)
  fmap, z = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 6)), jnp.ones((3, 5))
  variables = critic.init(jax.random.PRNGKey(1), fmap, z)
  scores = critic.apply(variables, fmap, z)
  assert scores.shape == (3,)
  # Permuting positions does not change a mean over positions.
  flipped = fmap[:, ::-1, ::-1, :]
  np.testing.assert_allclose(critic.apply(variables, flipped, z), scores, rtol=1e-5)


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
