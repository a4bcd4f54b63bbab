"""Flax modules of DICE-FER: ResNet-18 encoders, DV critics, discriminator, classifier.

Every module is plain Flax linen with pure `init`/`apply`. Images are NHWC with one
channel (grayscale). Shapes at 112 px: stem 56x56, stages 28/14/7/4, code 64-d.

Mixed precision (`model.half_precision`): the ResNet-18 trunks, nearly all of a
step's FLOPs, convolve in bfloat16. Everything else stays float32: parameters
and optimizer state (Flax's param_dtype), BatchNorm statistics and normalisation
(Flax reduces in float32), the pooled feature, the code head, and the critics,
discriminator and classifier, whose scores feed the DV bound's logsumexp and the
cross-entropies (a few per cent of the FLOPs: the local critic's 1x1 convs cost
~4% of the trunk at 112 px on the stage-4 4x4 map, ~10% on the stage-3 7x7 map,
with the DV or JSD objective, which score 2B pairs; InfoNCE scores all B x B,
B/2 times as many). bfloat16 has float32's exponent range, so no loss scaling is needed.

What the critics see (`model.local_stage`, `model.global_stage`): the map of one
trunk stage, for the global critic pooled. At global stage 4 that is f, and the
code is a linear function of it, z = W f + b: a critic fed (f, z) can tell joint
from shuffled pairs by checking that relation whatever the code keeps (in stage
2, where an image is scored with its own code). An earlier stage's map is not
linear in z by construction, but E_id is trained end to end and can make it so
through its later stages (the residual paths): measured after stage 2 on the
demo, z_id was linear in the pooled stage-3 map to a 0.4% residual (28% for the
same E_id at initialisation), so moving the critics' input earlier does not by
itself remove the shortcut (benchmarks/identity_code_control.py). So stage 2's
critics score, by default, the frozen E_exp's map (`model.id_critic_input`), at a
stage of their own (`model.id_critic_stage`, which sets E_id's `local_stage` /
`global_stage`: E_id's maps are then unused, E_exp's are taken at those stages).
"""

import numbers
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dicefer_jax.errors import UserError

# Stage widths of ResNet-18 at width=64 (torchvision's).
_STAGE_MULTIPLIERS = (1, 2, 4, 8)
_BLOCKS_PER_STAGE = (2, 2, 2, 2)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """3x3 max-pool, stride 2, padding 1 (torchvision's stem pool), NHWC.

  Written as a max over 9 strided slices: same result as nn.max_pool, but XLA's CPU
  backward pass for reduce_window is several times slower than for slices+max.
  """
  x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  h_out = (x.shape[1] - 3) // 2 + 1
  w_out = (x.shape[2] - 3) // 2 + 1
  out = None
  for dy in range(3):
    for dx in range(3):
      window = x[:, dy:dy + 2 * h_out - 1:2, dx:dx + 2 * w_out - 1:2, :]
      out = window if out is None else jnp.maximum(out, window)
  return out


class BasicBlock(nn.Module):
  """ResNet BasicBlock: two 3x3 convs with BatchNorm, projection shortcut on change."""

  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda name: nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5,
        dtype=self.dtype, name=name)
    conv = lambda f, k, s, name: nn.Conv(
        f, (k, k), (s, s), padding=((k // 2, k // 2),) * 2, use_bias=False,
        dtype=self.dtype, name=name)
    residual = x
    y = conv(self.features, 3, self.strides, "conv1")(x)
    y = nn.relu(norm("bn1")(y))
    y = conv(self.features, 3, 1, "conv2")(y)
    y = norm("bn2")(y)
    if residual.shape != y.shape:
      residual = conv(self.features, 1, self.strides, "downsample_conv")(residual)
      residual = norm("downsample_bn")(residual)
    return nn.relu(residual + y)


class ResNet18Trunk(nn.Module):
  """ResNet-18 without the fc layer; returns the output map of every stage.

  At width=64 and one input channel its parameter count equals torchvision's
  resnet18 with a 1-channel 7x7 stem and no fc (11,170,240): BN scale and bias are
  parameters, running statistics live in the `batch_stats` collection.
  """

  width: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool) -> list[jax.Array]:
    x = nn.Conv(self.width, (7, 7), (2, 2), padding=((3, 3), (3, 3)),
                use_bias=False, dtype=self.dtype, name="stem_conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                     dtype=self.dtype, name="stem_bn")(x)
    x = max_pool_3x3_s2(nn.relu(x))
    maps = []
    for stage, (mult, blocks) in enumerate(zip(_STAGE_MULTIPLIERS, _BLOCKS_PER_STAGE)):
      for block in range(blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(self.width * mult, strides, self.dtype,
                       name=f"stage{stage + 1}_block{block + 1}")(x, train)
      maps.append(x)
    return maps


class EncoderOutput(NamedTuple):
  code: jax.Array            # z, (B, code_dim)
  feature: jax.Array         # pooled last-stage feature f, (B, 8 * width); z = Dense(f)
  feature_map: jax.Array     # C for the local critic: stage `local_stage`'s map
  critic_feature: jax.Array  # x for the global critic: stage `global_stage`'s map,
                             # globally pooled, (B, channels of that stage)


class ResNet18Encoder(nn.Module):
  """E_exp / E_id: ResNet-18 trunk, global average pool, and a linear code head.

  `local_stage` (1-4) chooses which stage's map is returned for the local critic,
  `global_stage` (1-4) which stage's map is pooled for the global critic (4: f).
  `normalize_code` standardises z over the batch (BatchNorm without scale/bias):
  the stage-1 L1 pull |z_M - z_N| is otherwise minimised by shrinking every code
  towards one point, a collapse that also starves the critics of signal.
  """

  code_dim: int = 64
  width: int = 64
  local_stage: int = 4
  dtype: Any = jnp.float32
  normalize_code: bool = False
  global_stage: int = 4

  @nn.compact
  def __call__(self, images, train: bool) -> EncoderOutput:
    maps = ResNet18Trunk(self.width, self.dtype, name="trunk")(images, train)
    # Back to float32 before pooling: the code, the critics and the MI estimates
    # are computed in float32 whatever the trunk's dtype.
    feature = jnp.mean(maps[-1].astype(jnp.float32), axis=(1, 2))
    code = nn.Dense(self.code_dim, name="code")(feature)
    if self.normalize_code:
      code = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                          use_scale=False, use_bias=False, name="code_norm")(code)
    critic_map = maps[self.global_stage - 1].astype(jnp.float32)
    return EncoderOutput(code, feature, maps[self.local_stage - 1].astype(jnp.float32),
                         jnp.mean(critic_map, axis=(1, 2)))


class GlobalCritic(nn.Module):
  """Global statistics network T_g(x, z): MLP on concat[x, z] -> one score per item."""

  hidden: int = 512
  num_hidden_layers: int = 2

  @nn.compact
  def __call__(self, x, z) -> jax.Array:
    h = jnp.concatenate([x, z], axis=-1)
    for i in range(self.num_hidden_layers):
      h = nn.relu(nn.Dense(self.hidden, name=f"hidden{i + 1}")(h))
    return nn.Dense(1, name="score")(h)[..., 0]


class LocalCritic(nn.Module):
  """Local statistics network T_l(C, z): 1x1 convs on concat[C, z tiled].

  Scores every position of the feature map and averages them, so the critic is
  rewarded for z explaining each local patch, not only the image as a whole.
  """

  hidden: int = 512
  num_hidden_layers: int = 2

  @nn.compact
  def __call__(self, feature_map, z) -> jax.Array:
    b, h, w, _ = feature_map.shape
    tiled = jnp.broadcast_to(z[:, None, None, :], (b, h, w, z.shape[-1]))
    y = jnp.concatenate([feature_map, tiled], axis=-1)
    for i in range(self.num_hidden_layers):
      y = nn.relu(nn.Conv(self.hidden, (1, 1), name=f"hidden{i + 1}")(y))
    return jnp.mean(nn.Conv(1, (1, 1), name="score")(y), axis=(1, 2, 3))


class SeparableCritic(nn.Module):
  """Separable statistics network T(x, z) = <g(x), h(z)> / sqrt(d)
  (`model.critic="separable"`), for the global and the local terms alike.

  g and h are MLPs of the same depth and width as the concat critics', ending in
  a d = `hidden` embedding. x is a pooled feature (B, C) or a map (B, H, W, C);
  on a map g's hidden layers run at every position (Dense on the channel axis
  is a 1x1 conv) and are averaged over positions before its last, linear layer,
  so the score is the mean over positions of per-position scores, as in
  `LocalCritic`. Why it exists: from random weights the concat critics never
  left 0 nats in stage 1 (README, "Warm start"); a concat MLP has to learn the
  x-z interaction before it scores anything, a dot product starts with it, as
  in contrastive learning (CPC, Deep InfoMax's local "encode and dot product").
  Every score of a batch is one matmul (`pairwise`), so InfoNCE's B x B
  matrix costs no more than DV's 2B scores.
  """

  hidden: int = 512
  num_hidden_layers: int = 2

  def setup(self):
    self.x_hidden = [nn.Dense(self.hidden) for _ in range(self.num_hidden_layers)]
    self.z_hidden = [nn.Dense(self.hidden) for _ in range(self.num_hidden_layers)]
    self.x_embed = nn.Dense(self.hidden)
    self.z_embed = nn.Dense(self.hidden)

  def _embed(self, x, z) -> tuple[jax.Array, jax.Array]:
    gx, hz = x, z
    for layer in self.x_hidden:
      gx = nn.relu(layer(gx))
    if gx.ndim == 4:  # a map: mean over positions (the last layer is linear)
      gx = jnp.mean(gx, axis=(1, 2))
    for layer in self.z_hidden:
      hz = nn.relu(layer(hz))
    # 1/sqrt(d) keeps initial scores O(1), whatever the width.
    return self.x_embed(gx) / jnp.sqrt(float(self.hidden)), self.z_embed(hz)

  def __call__(self, x, z) -> jax.Array:
    """(B,) scores T(x_i, z_i)."""
    gx, hz = self._embed(x, z)
    return jnp.sum(gx * hz, axis=-1)

  def pairwise(self, x, z) -> jax.Array:
    """(B, B) scores S[i, j] = T(x_i, z_j): every image against every code."""
    gx, hz = self._embed(x, z)
    return gx @ hz.T


class Discriminator(nn.Module):
  """D: 3 FC layers telling joint (z_exp, z_id) from shuffled pairs; returns logits."""

  hidden: int = 512

  @nn.compact
  def __call__(self, z_exp, z_id) -> jax.Array:
    h = jnp.concatenate([z_exp, z_id], axis=-1)
    h = nn.leaky_relu(nn.Dense(self.hidden, name="fc1")(h), 0.2)
    h = nn.leaky_relu(nn.Dense(self.hidden, name="fc2")(h), 0.2)
    return nn.Dense(1, name="fc3")(h)[..., 0]


class Classifier(nn.Module):
  """Stage-3 expression classifier: MLP on z_exp -> class logits."""

  num_classes: int = 7
  hidden: Sequence[int] = (256,)
  dropout: float = 0.0

  @nn.compact
  def __call__(self, z, train: bool = False) -> jax.Array:
    h = z
    for i, width in enumerate(self.hidden):
      h = nn.relu(nn.Dense(width, name=f"hidden{i + 1}")(h))
      h = nn.Dropout(self.dropout, deterministic=not train)(h)
    return nn.Dense(self.num_classes, name="logits")(h)


class DiceferModel(NamedTuple):
  """The module definitions of one DICE-FER model (no parameters)."""

  exp_encoder: ResNet18Encoder
  id_encoder: ResNet18Encoder
  # GlobalCritic / LocalCritic, or SeparableCritic for both (`model.critic`).
  exp_global_critic: nn.Module
  exp_local_critic: nn.Module
  id_global_critic: nn.Module
  id_local_critic: nn.Module
  discriminator: Discriminator
  classifier: Classifier
  # The supervised baseline's head: linear, on the pooled feature of exp_encoder.
  baseline_head: Classifier


def _check_stage(field: str, value, zero_means: str = "") -> None:
  """Refuses a critic input stage that is not one of the trunk's stages 1-4 (or 0,
  where `zero_means` says what 0 stands for)."""
  # bool is an Integral too; 0 or -1 would silently index from the end (stage 4).
  lowest = 0 if zero_means else 1
  if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
      or not lowest <= value <= len(_STAGE_MULTIPLIERS)):
    zero = f", or 0 for {zero_means}" if zero_means else ""
    raise UserError(f"--config.model.{field}={value!r}: use a ResNet stage 1-4, the "
                    f"trunk stage whose map the critics score (4 = the last){zero}")


# Whose trunk maps stage 2's critics score (`model.id_critic_input`).
ID_CRITIC_INPUTS = ("id_encoder", "exp_encoder")
# The statistics networks' form (`model.critic`): an MLP on concat[x, z] (Deep
# InfoMax's global critic, MINE) or a dot product of two embeddings.
CRITICS = ("concat", "separable")


def build_model(model_config, num_classes: int) -> DiceferModel:
  """Module definitions from the `model` block of a config.

  Every field is read directly: the defaults live in experiments/configs/default.py
  only, so a config that lacks one fails here instead of quietly using a second
  default. E_id's `local_stage` / `global_stage` are those of stage 2's critics
  (`model.id_critic_stage`, 0 = stage 1's), whichever encoder's maps they score:
  both trunks have the same widths, so the critics' input shapes are the same.

  Raises:
    UserError: `local_stage` or `global_stage` is not a stage 1-4,
      `id_critic_stage` not 0-4, `id_critic_input` not one of ID_CRITIC_INPUTS,
      or `critic` not one of CRITICS.
  """
  c = model_config
  _check_stage("local_stage", c.local_stage)
  _check_stage("global_stage", c.global_stage)
  _check_stage("id_critic_stage", c.id_critic_stage, "stage 1's critic stages")
  if c.id_critic_input not in ID_CRITIC_INPUTS:
    raise UserError(f"--config.model.id_critic_input={c.id_critic_input!r}: use one of "
                    f"{', '.join(ID_CRITIC_INPUTS)}, whose maps stage 2's critics score")
  if c.critic not in CRITICS:
    raise UserError(f"--config.model.critic={c.critic!r}: use one of "
                    f"{', '.join(CRITICS)}, the form of the MI critics")
  dtype = jnp.bfloat16 if c.half_precision else jnp.float32
  id_local = c.id_critic_stage or c.local_stage
  id_global = c.id_critic_stage or c.global_stage
  encoder = lambda dim, local, glob: ResNet18Encoder(dim, c.width, local, dtype,
                                                     c.normalize_code, glob)
  if c.critic == "separable":
    global_critic = local_critic = SeparableCritic(c.critic_hidden)
  else:
    global_critic, local_critic = GlobalCritic(c.critic_hidden), LocalCritic(c.critic_hidden)
  return DiceferModel(
      exp_encoder=encoder(c.exp_dim, c.local_stage, c.global_stage),
      id_encoder=encoder(c.id_dim, id_local, id_global),
      exp_global_critic=global_critic, exp_local_critic=local_critic,
      id_global_critic=global_critic, id_local_critic=local_critic,
      discriminator=Discriminator(c.disc_hidden),
      classifier=Classifier(num_classes, tuple(c.classifier_hidden), c.classifier_dropout),
      baseline_head=Classifier(num_classes, hidden=()))


def init_variables(model: DiceferModel, key: jax.Array, image_size: int):
  """Initial `params` and `batch_stats` of every module, keyed by module name."""
  keys = dict(zip(DiceferModel._fields, jax.random.split(key, len(DiceferModel._fields))))
  images = jnp.zeros((2, image_size, image_size, 1), jnp.float32)
  params, batch_stats = {}, {}
  for name in ("exp_encoder", "id_encoder"):
    v = getattr(model, name).init(keys[name], images, train=False)
    params[name], batch_stats[name] = v["params"], v["batch_stats"]
  # Each critic is initialised on what its encoder hands it (the configured
  # stages' maps), so its input width follows model.local_stage / global_stage.
  shapes = {name: jax.eval_shape(lambda n=name: getattr(model, n).apply(
      {"params": params[n], "batch_stats": batch_stats[n]}, images, train=False))
            for name in ("exp_encoder", "id_encoder")}
  zeros = lambda name, field: jnp.zeros(getattr(shapes[name], field).shape, jnp.float32)
  z_exp = jnp.zeros((2, model.exp_encoder.code_dim))
  z_id = jnp.zeros((2, model.id_encoder.code_dim))
  both = jnp.concatenate([z_exp, z_id], axis=-1)
  params["exp_global_critic"] = model.exp_global_critic.init(
      keys["exp_global_critic"], zeros("exp_encoder", "critic_feature"), z_exp)["params"]
  params["exp_local_critic"] = model.exp_local_critic.init(
      keys["exp_local_critic"], zeros("exp_encoder", "feature_map"), z_exp)["params"]
  params["id_global_critic"] = model.id_global_critic.init(
      keys["id_global_critic"], zeros("id_encoder", "critic_feature"), both)["params"]
  params["id_local_critic"] = model.id_local_critic.init(
      keys["id_local_critic"], zeros("id_encoder", "feature_map"), both)["params"]
  feature = zeros("exp_encoder", "feature")
  params["discriminator"] = model.discriminator.init(
      keys["discriminator"], z_exp, z_id)["params"]
  params["classifier"] = model.classifier.init(keys["classifier"], z_exp)["params"]
  params["baseline_head"] = model.baseline_head.init(keys["baseline_head"], feature)["params"]
  return params, batch_stats
