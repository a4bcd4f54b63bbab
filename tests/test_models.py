"""Shapes and parameter counts of the DICE-FER modules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dicefer_jax import models
from dicefer_jax.errors import UserError
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
  assert out.critic_feature.shape == (2, 512)  # module defaults: stage 4 for both
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
  for field in ("normalize_code", "half_precision", "local_stage", "global_stage"):
    config = tiny.get_config().model
    delattr(config, field)
    with pytest.raises((AttributeError, KeyError)):
      models.build_model(config, 7)


# ---------------------------------------------------------------------------
# What the critics see: model.global_stage and model.local_stage.
# ---------------------------------------------------------------------------


def _tiny_model(global_stage, local_stage, **fields):
  config = tiny.get_config().model
  config.global_stage, config.local_stage = global_stage, local_stage
  # Unless a test asks otherwise, stage 2's critics take the same stages, so
  # the stage tests below hold for both kinds of critic.
  fields.setdefault("id_critic_stage", 0)
  for name, value in fields.items():
    setattr(config, name, value)
  return config, models.build_model(config, 7)


@pytest.mark.parametrize("global_stage,local_stage", [(1, 4), (2, 3), (3, 2), (4, 1)])
def test_critics_are_built_for_the_configured_stages_maps(global_stage, local_stage):
  """Catches init_variables sizing a critic for the pooled last-stage feature
  whatever the stage (restoring or the first step would then fail), or reading
  one critic's stage for the other: a critic's first layer takes the chosen
  stage's channels (width * 1, 2, 4, 8) plus its code's width."""
  config, model = _tiny_model(global_stage, local_stage)
  params, _ = models.init_variables(model, jax.random.PRNGKey(0), 32)
  channels = lambda stage: config.width * (1, 2, 4, 8)[stage - 1]
  t_width = config.exp_dim + config.id_dim
  first = lambda name: params[name]["hidden1"]["kernel"].shape
  assert first("exp_global_critic") == (channels(global_stage) + config.exp_dim,
                                        config.critic_hidden)
  assert first("id_global_critic") == (channels(global_stage) + t_width,
                                       config.critic_hidden)
  assert first("exp_local_critic") == (1, 1, channels(local_stage) + config.exp_dim,
                                       config.critic_hidden)
  assert first("id_local_critic") == (1, 1, channels(local_stage) + t_width,
                                      config.critic_hidden)
  # The baseline's head still reads the pooled last-stage feature.
  assert params["baseline_head"]["logits"]["kernel"].shape[0] == channels(4)


def _trunk_maps(encoder, variables, images):
  return models.ResNet18Trunk(encoder.width, encoder.dtype).apply(
      {"params": variables["params"]["trunk"],
       "batch_stats": variables["batch_stats"]["trunk"]}, images, train=False)


@pytest.mark.parametrize("global_stage,local_stage", [(2, 3), (3, 1), (4, 4)])
def test_encoder_hands_each_critic_its_stages_map(global_stage, local_stage):
  """Catches a critic input taken from the wrong stage (or the two stages
  swapped, or f whatever the stage): critic_feature is the global mean of the
  trunk's map of global_stage, feature_map is local_stage's map, and the code
  and f stay functions of the last stage."""
  _, model = _tiny_model(global_stage, local_stage)
  encoder = model.exp_encoder
  images = jax.random.normal(jax.random.PRNGKey(1), (3, 32, 32, 1))
  variables = encoder.init(jax.random.PRNGKey(0), images, train=False)
  out = encoder.apply(variables, images, train=False)
  maps = _trunk_maps(encoder, variables, images)
  np.testing.assert_allclose(out.critic_feature, maps[global_stage - 1].mean(axis=(1, 2)),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out.feature_map, maps[local_stage - 1])
  np.testing.assert_allclose(out.feature, maps[3].mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
  if global_stage == 4:
    np.testing.assert_array_equal(out.critic_feature, out.feature)


def test_changing_the_stage_changes_what_the_critics_see_not_the_encoder():
  """Catches a stage field that changes the trunk or the code rather than only
  the critics' inputs: the same parameters give the same code and f."""
  images = jax.random.normal(jax.random.PRNGKey(2), (3, 32, 32, 1))
  _, early = _tiny_model(2, 2)
  _, late = _tiny_model(4, 4)
  variables = early.id_encoder.init(jax.random.PRNGKey(0), images, train=False)
  a = early.id_encoder.apply(variables, images, train=False)
  b = late.id_encoder.apply(variables, images, train=False)
  np.testing.assert_array_equal(a.code, b.code)
  np.testing.assert_array_equal(a.feature, b.feature)
  assert a.critic_feature.shape != b.critic_feature.shape
  assert a.feature_map.shape != b.feature_map.shape


def _relative_residual_of_linear_fit(x, z):
  """||z - (A x + c)|| / ||z - mean z|| for the least-squares A, c."""
  x, z = np.asarray(x, np.float64), np.asarray(z, np.float64)
  design = np.concatenate([x, np.ones((len(x), 1))], axis=1)
  coef, *_ = np.linalg.lstsq(design, z, rcond=None)
  return np.linalg.norm(z - design @ coef) / np.linalg.norm(z - z.mean(axis=0))


def test_the_identity_code_is_linear_in_the_global_critics_input_only_at_stage_4():
  """Stage 2's degenerate shortcut, gone by construction: z_id = Dense(f), so
  with the global critic on f (global_stage 4) z_id is exactly a linear
  function of what the critic sees, and a critic can tell joint from shuffled
  pairs by that relation whatever z_id keeps. On an earlier stage's pooled map
  a least-squares fit leaves most of z_id unexplained (measured at init, 96
  random images: 1e-7 of it at stage 4; 0.65, 0.86, 0.95 at stages 3, 2, 1).
  96 images > every fit's unknowns, so a perfect fit is not by chance."""
  images = jax.random.normal(jax.random.PRNGKey(1), (96, 32, 32, 1))
  residuals = {}
  for stage in (4, 3, 2):
    _, model = _tiny_model(stage, 3)
    params, batch_stats = models.init_variables(model, jax.random.PRNGKey(0), 32)
    out, _ = model.id_encoder.apply(
        {"params": params["id_encoder"], "batch_stats": batch_stats["id_encoder"]},
        images, train=True, mutable=["batch_stats"])
    assert out.critic_feature.shape[1] + 1 < len(images)
    residuals[stage] = _relative_residual_of_linear_fit(out.critic_feature, out.code)
  assert residuals[4] < 1e-4, residuals
  assert residuals[3] > 0.3 and residuals[2] > 0.3, residuals


@pytest.mark.parametrize("field", ["local_stage", "global_stage"])
@pytest.mark.parametrize("value", [0, 5, -1, True])
def test_critic_stage_out_of_range_is_a_one_line_user_error(field, value):
  """Catches 0 or -1 silently meaning the last stage (maps[-1]), 5 failing
  inside tracing, or True taken for stage 1, instead of a one-line UserError.
  (ConfigDict itself refuses a float or str for the int field.)"""
  config = tiny.get_config().model
  setattr(config, field, value)
  with pytest.raises(UserError, match=rf"^--config\.model\.{field}=.*stage 1-4") as e:
    models.build_model(config, 7)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("value", [5, -1, True])
def test_id_critic_stage_out_of_range_is_a_one_line_user_error(value):
  """Catches -1 indexing from the end, 5 failing inside tracing, or True taken
  for stage 1 (0 is allowed: it means stage 1's critic stages)."""
  config = tiny.get_config().model
  config.id_critic_stage = value
  with pytest.raises(UserError, match=r"^--config\.model\.id_critic_stage=.*or 0 for") as e:
    models.build_model(config, 7)
  assert "\n" not in str(e.value)


def test_unknown_id_critic_input_is_a_one_line_user_error():
  config = tiny.get_config().model
  config.id_critic_input = "own"
  with pytest.raises(UserError, match=r"^--config\.model\.id_critic_input='own': use one "
                     r"of id_encoder, exp_encoder"):
    models.build_model(config, 7)


@pytest.mark.parametrize("id_critic_stage", [0, 2])
def test_id_critic_stage_moves_only_stage_2s_critics(id_critic_stage):
  """Catches id_critic_stage moving stage 1's critics too (or being ignored), and
  0 not meaning stage 1's stages: the identity critics' first layers take that
  stage's channels, the expression critics keep theirs."""
  config, model = _tiny_model(3, 4, id_critic_stage=id_critic_stage)
  params, _ = models.init_variables(model, jax.random.PRNGKey(0), 32)
  channels = lambda stage: config.width * (1, 2, 4, 8)[stage - 1]
  t_width = config.exp_dim + config.id_dim
  id_global, id_local = (id_critic_stage, id_critic_stage) if id_critic_stage else (3, 4)
  first = lambda name: params[name]["hidden1"]["kernel"].shape
  assert first("id_global_critic")[0] == channels(id_global) + t_width
  assert first("id_local_critic")[2] == channels(id_local) + t_width
  assert first("exp_global_critic")[0] == channels(3) + config.exp_dim
  assert first("exp_local_critic")[2] == channels(4) + config.exp_dim


def test_critic_inputs_stay_float32_under_half_precision():
  """Catches a bfloat16 critic input (the trunk's dtype) reaching the critics:
  their scores feed the DV bound's logsumexp, kept in float32."""
  _, model = _tiny_model(2, 3, half_precision=True)
  images = jnp.zeros((2, 32, 32, 1))
  variables = model.exp_encoder.init(jax.random.PRNGKey(0), images, train=False)
  out = model.exp_encoder.apply(variables, images, train=False)
  assert out.critic_feature.dtype == jnp.float32 and out.feature_map.dtype == jnp.float32



# ---------------------------------------------------------------------------
# model.critic = "separable": T(x, z) = <g(x), h(z)> / sqrt(d).
# ---------------------------------------------------------------------------


def _separable(x, z, seed=0):
  critic = models.SeparableCritic(hidden=8)
  params = critic.init(jax.random.PRNGKey(seed), x, z)
  return (lambda a, b: critic.apply(params, a, b),
          lambda a, b: critic.apply(params, a, b, method="pairwise"))


@pytest.mark.parametrize("x_shape", [(5, 6), (5, 3, 2, 6)])
def test_separable_critic_pairwise_is_every_image_against_every_code(x_shape):
  """Catches a transposed matrix (codes as rows) or a diagonal that is not the
  joint pairs: S[i, j] must be the score of image i with code j, for pooled
  features and maps alike."""
  kx, kz = jax.random.split(jax.random.PRNGKey(1))
  x, z = jax.random.normal(kx, x_shape), jax.random.normal(kz, (5, 4))
  score, pairwise = _separable(x, z)
  s = np.asarray(pairwise(x, z))
  assert s.shape == (5, 5)
  for j in range(5):
    np.testing.assert_allclose(s[:, j], score(x, jnp.tile(z[j], (5, 1))),
                               rtol=1e-5, atol=1e-6)
  assert np.max(np.abs(s - s.T)) > 1e-3  # else a transposed matrix would pass


def test_separable_critic_on_a_map_is_the_mean_of_its_positions_scores():
  """Catches pooling the map before the hidden layers (a linear critic of the
  mean feature) instead of scoring every position: the local critic's score is
  the mean of the per-position scores, as LocalCritic's is."""
  kx, kz = jax.random.split(jax.random.PRNGKey(2))
  fmap, z = jax.random.normal(kx, (4, 3, 3, 6)), jax.random.normal(kz, (4, 4))
  score, _ = _separable(fmap, z)
  per_position = [score(fmap[:, i:i + 1, j:j + 1], z) for i in range(3) for j in range(3)]
  np.testing.assert_allclose(score(fmap, z), np.mean(per_position, axis=0),
                             rtol=1e-5, atol=1e-6)
  pooled_first = score(jnp.mean(fmap, axis=(1, 2), keepdims=True), z)
  assert np.max(np.abs(pooled_first - score(fmap, z))) > 1e-3


def test_critic_field_builds_separable_critics_for_every_mi_term():
  """Catches model.critic being ignored, or applied to some critics only: all
  four are SeparableCritic, sized by critic_hidden, their x side taking the
  configured stage's channels (global 3, local 4) and their z side the code."""
  config, model = _tiny_model(3, 4, critic="separable")
  names = ("exp_global_critic", "exp_local_critic", "id_global_critic", "id_local_critic")
  assert all(isinstance(getattr(model, n), models.SeparableCritic) for n in names)
  params, _ = models.init_variables(model, jax.random.PRNGKey(0), 32)
  channels = lambda stage: config.width * (1, 2, 4, 8)[stage - 1]
  t_width = config.exp_dim + config.id_dim
  shape = lambda name, part: params[name][part]["kernel"].shape
  assert shape("exp_global_critic", "x_hidden_0") == (channels(3), config.critic_hidden)
  assert shape("exp_local_critic", "x_hidden_0") == (channels(4), config.critic_hidden)
  assert shape("exp_global_critic", "z_hidden_0") == (config.exp_dim, config.critic_hidden)
  assert shape("id_local_critic", "z_hidden_0") == (t_width, config.critic_hidden)
  assert shape("id_local_critic", "z_embed") == (config.critic_hidden,) * 2
  _, concat = _tiny_model(3, 4)
  assert isinstance(concat.exp_global_critic, models.GlobalCritic)
  assert isinstance(concat.exp_local_critic, models.LocalCritic)


def test_unknown_critic_is_a_one_line_user_error():
  config = tiny.get_config().model
  config.critic = "bilinear"
  with pytest.raises(UserError, match=r"^--config\.model\.critic='bilinear': use one of "
                     r"concat, separable") as e:
    models.build_model(config, 7)
  assert "\n" not in str(e.value)
