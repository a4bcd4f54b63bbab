"""Pure, jit-compiled step functions of the three DICE-FER stages and the baseline.

Every stage carries the parameters of the WHOLE model in its state, and an optax
state only for what the stage trains; gradients are taken with respect to that
subset alone. So a frozen part is not merely "not updated by convention": it is
never an argument of `jax.grad`, and tests can compare whole trees before and after.

A step is `step(state, batch) -> (state, metrics)`; randomness comes from
`fold_in(state.rng, state.step)`, so a step is a pure function of its inputs.

The MI terms of stages 1 and 2 maximise `config.loss.estimator`'s objective (DV,
JSD or InfoNCE, `mi.py`) and always log the DV estimate on the same scores as
mi_global / mi_local, the objective itself as objective_global / objective_local.
The global critics score the pooled map of `model.global_stage`, the local ones
the map of `model.local_stage` (`models.EncoderOutput`); stage 2's critics those
of `model.id_critic_stage`, from the encoder `model.id_critic_input` names.
The critics are concat MLPs or separable dot products (`model.critic`).
"""

import numbers
from typing import Any, Callable, Mapping

import chex
import flax
import jax
import jax.numpy as jnp
import optax

from dicefer_jax import mi
from dicefer_jax.errors import UserError
from dicefer_jax.models import ID_CRITIC_INPUTS, DiceferModel

# What each stage trains, by optimizer. Everything else is frozen in that stage.
TRAINABLE = {
    "stage1": {"main": ("exp_encoder", "exp_global_critic", "exp_local_critic")},
    "stage2": {"main": ("id_encoder", "id_global_critic", "id_local_critic"),
               "disc": ("discriminator",)},
    "stage3": {"main": ("classifier",)},
    "baseline": {"main": ("exp_encoder", "baseline_head")},
}
# Which batch each stage eats: same-expression pairs, or labelled single images.
PAIR_STAGES = ("stage1", "stage2")


class StageState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any        # {module name: params} for every module of the model
  batch_stats: Any   # {"exp_encoder": ..., "id_encoder": ...}
  opt_state: Any     # {optimizer name: optax state of its trainable subset}
  rng: jax.Array


def make_optimizers(train_config, stage: str) -> dict[str, optax.GradientTransformation]:
  """Adam per optimizer of the stage, with optional global-norm clipping.

  Reads every field it uses from `train_config` directly: the defaults live in
  experiments/configs/default.py only, so a missing field is an error here rather
  than a second, silently diverging default.
  """
  def adam(lr):
    chain = []
    if train_config.grad_clip_norm:  # 0 = no clipping
      chain.append(optax.clip_by_global_norm(train_config.grad_clip_norm))
    chain.append(optax.adam(lr, b1=train_config.adam_b1, b2=train_config.adam_b2))
    return optax.chain(*chain)
  optimizers = {"main": adam(train_config.learning_rate)}
  if stage == "stage2":
    # disc_learning_rate 0 = the same as learning_rate.
    optimizers["disc"] = adam(train_config.disc_learning_rate or train_config.learning_rate)
  return optimizers


def _subset(tree: Mapping, names) -> dict:
  return {name: tree[name] for name in names}


def create_state(stage: str, params, batch_stats, optimizers, rng) -> StageState:
  opt_state = {name: tx.init(_subset(params, TRAINABLE[stage][name]))
               for name, tx in optimizers.items()}
  return StageState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=batch_stats, opt_state=opt_state, rng=rng)


def _apply_updates(tx, opt_state, params_subset, grads):
  updates, opt_state = tx.update(grads, opt_state, params_subset)
  return optax.apply_updates(params_subset, updates), opt_state


def _next_state(state: StageState, trainable: dict, opt_state: dict,
                batch_stats: dict | None = None) -> StageState:
  """The state after one step: updated trainable modules, optax and BN statistics."""
  return state.replace(
      step=state.step + 1, params={**state.params, **trainable},
      batch_stats={**state.batch_stats, **(batch_stats or {})}, opt_state=opt_state)


def _encode(encoder, params, batch_stats, name, images, train: bool):
  """Runs an encoder; returns (output, new batch_stats for `name`)."""
  variables = {"params": params[name], "batch_stats": batch_stats[name]}
  if train:
    out, mutated = encoder.apply(variables, images, train=True, mutable=["batch_stats"])
    return out, mutated["batch_stats"]
  return encoder.apply(variables, images, train=False), batch_stats[name]


def _check_pair_batch(batch):
  chex.assert_rank([batch["image_m"], batch["image_n"]], 4)
  chex.assert_equal_shape([batch["image_m"], batch["image_n"]])
  chex.assert_shape(batch["label"], (batch["image_m"].shape[0],))


def _bce_with_logits(logits, target: float):
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, jnp.full_like(logits, target)))


def _finite(*xs):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs]))


def _check_critic_inputs(out, num_images: int) -> None:
  """A critic input of the wrong rank would broadcast against the codes and train."""
  chex.assert_rank(out.critic_feature, 2)
  chex.assert_rank(out.feature_map, 4)
  chex.assert_axis_dimension(out.critic_feature, 0, num_images)
  chex.assert_axis_dimension(out.feature_map, 0, num_images)


def _critic_fns(critic, params) -> tuple[Callable, Callable | None]:
  """(score_fn, pairwise_fn) of a critic module with its parameters, for `mi`.

  pairwise_fn is None for the concat critics; a separable one scores a whole
  batch's pairs in one matmul (`models.SeparableCritic.pairwise`).
  """
  variables = {"params": params}
  score = lambda x, z: critic.apply(variables, x, z)
  if not hasattr(critic, "pairwise"):
    return score, None
  return score, lambda x, z: critic.apply(variables, x, z, method="pairwise")


def _mi_metrics(mi_global: mi.MIEstimate, mi_local: mi.MIEstimate) -> dict:
  return dict(mi_global=mi_global.dv, mi_local=mi_local.dv,
              objective_global=mi_global.objective, objective_local=mi_local.objective)


def make_stage1_step(model: DiceferModel, loss_config, optimizers) -> Callable:
  """Stage 1: learn E_exp by cross mutual information between a pair's images.

  loss = -[mu (I_g(M; z_N) + I_g(N; z_M)) + nu (I_l(M; z_N) + I_l(N; z_M))]
         + delta * mean|z_M - z_N|
  with each I the `loss.estimator` objective (the DV bound by default).

  Raises:
    UserError: `loss.estimator` is not one of mi.ESTIMATORS.
  """
  c = loss_config
  mi.check_estimator(c.estimator)
  tx = optimizers["main"]

  def step(state: StageState, batch):
    _check_pair_batch(batch)
    b = batch["image_m"].shape[0]
    perm = mi.marginal_permutation(jax.random.fold_in(state.rng, state.step), b)
    images = jnp.concatenate([batch["image_m"], batch["image_n"]], axis=0)
    trainable = _subset(state.params, TRAINABLE["stage1"]["main"])

    def loss_fn(trainable):
      params = {**state.params, **trainable}
      out, new_stats = _encode(model.exp_encoder, params, state.batch_stats,
                               "exp_encoder", images, train=True)
      _check_critic_inputs(out, 2 * b)
      f_m, f_n = jnp.split(out.critic_feature, 2)
      c_m, c_n = jnp.split(out.feature_map, 2)
      z_m, z_n = jnp.split(out.code, 2)
      global_score, global_pairs = _critic_fns(model.exp_global_critic,
                                               params["exp_global_critic"])
      local_score, local_pairs = _critic_fns(model.exp_local_critic,
                                             params["exp_local_critic"])
      mi_global = mi.cross_mutual_information(global_score, f_m, f_n, z_m, z_n, perm,
                                              c.swap, c.estimator, global_pairs)
      mi_local = mi.cross_mutual_information(local_score, c_m, c_n, z_m, z_n, perm,
                                             c.swap, c.estimator, local_pairs)
      # Mean over dimensions, not the sum: the pull between partners should not
      # grow with code_dim and swamp the MI terms (bounded by 2 log B).
      l1 = jnp.mean(jnp.abs(z_m - z_n))
      loss = -(c.mu * mi_global.objective + c.nu * mi_local.objective) + c.delta * l1
      return loss, (new_stats, dict(_mi_metrics(mi_global, mi_local), l1=l1))

    (loss, (new_stats, metrics)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(trainable)
    trainable, opt_state = _apply_updates(tx, state.opt_state["main"], trainable, grads)
    new_state = _next_state(state, trainable, {"main": opt_state},
                            {"exp_encoder": new_stats})
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                   finite=_finite(loss, *_mi_metrics_values(metrics)))
    return new_state, metrics

  return step


def _mi_metrics_values(metrics: dict) -> list:
  return [metrics[k] for k in ("mi_global", "mi_local", "objective_global",
                               "objective_local")]


def _check_disc_steps(disc_steps) -> None:
  """Refuses a discriminator update count that is not an integer >= 1."""
  # bool is an Integral too, but `disc_steps=True` is a typo, not a count.
  if (isinstance(disc_steps, bool) or not isinstance(disc_steps, numbers.Integral)
      or disc_steps < 1):
    raise UserError(
        f"--config.train.disc_steps={disc_steps!r}: use an integer >= 1, the number "
        "of discriminator updates per encoder update in stage 2 (default 1)")


def make_stage2_step(model: DiceferModel, loss_config, optimizers,
                     disc_steps: int = 1, critic_input: str = "id_encoder") -> Callable:
  """Stage 2: learn E_id with E_exp frozen; D adversarially removes I(z_exp; z_id).

  For every image X of the pair, with t = [z_exp(X), z_id(X)]:
    E_id + critics minimise -(mu I_g(X; t) + nu I_l(X; t)) + zeta * fool(D)
  (each I the `loss.estimator` objective; X is the map, at E_id's critic stages,
  of `critic_input`'s trunk: E_id's own, as in Deep InfoMax, or the frozen
  E_exp's. E_id can shape its own map to agree with z_id whatever z_id keeps;
  it cannot shape E_exp's, so there z_id gains only by describing the image)
    D minimises BCE(D(z_exp, z_id) -> joint) + BCE(D(z_exp, z_id') -> shuffled)
  where fool(D) is D's loss with the labels flipped (the non-saturating form: the
  encoder's gradient does not vanish when D is confident). D and E_id are updated
  from the same forward pass: after E_id's one update, D takes `disc_steps`
  updates in total (not extra ones), all on the codes of that pass. The disc_*
  metrics are those of the last D update, measured before it is applied.

  Args:
    model: the module definitions.
    loss_config: the `loss` block of a config (mu, nu, zeta, estimator).
    optimizers: {"main": E_id and its critics, "disc": D}, from `make_optimizers`.
    disc_steps: discriminator updates per encoder update, an integer >= 1.
    critic_input: "id_encoder" or "exp_encoder" (`model.id_critic_input`).

  Raises:
    UserError: `disc_steps` is not an integer >= 1, or `loss.estimator` is not one
      of mi.ESTIMATORS.
  """
  _check_disc_steps(disc_steps)
  c = loss_config
  mi.check_estimator(c.estimator)
  tx_main, tx_disc = optimizers["main"], optimizers["disc"]
  # E_exp returning its maps at the stages E_id's critics score (the same
  # parameters: which maps an encoder returns is not part of its weights).
  exp_encoder = model.exp_encoder.clone(local_stage=model.id_encoder.local_stage,
                                        global_stage=model.id_encoder.global_stage)
  if critic_input not in ID_CRITIC_INPUTS:
    raise ValueError(f"unknown critic_input {critic_input!r}")

  def disc_logits(params, z_exp, z_id, perm):
    d = lambda zi: model.discriminator.apply({"params": params["discriminator"]}, z_exp, zi)
    return d(z_id), d(z_id[perm])

  def step(state: StageState, batch):
    _check_pair_batch(batch)
    b = batch["image_m"].shape[0]
    key = jax.random.fold_in(state.rng, state.step)
    perm_pair = mi.marginal_permutation(key, b)
    perm_all = mi.marginal_permutation(jax.random.fold_in(key, 1), 2 * b)
    images = jnp.concatenate([batch["image_m"], batch["image_n"]], axis=0)
    exp_out, _ = _encode(exp_encoder, state.params, state.batch_stats,
                         "exp_encoder", images, train=False)
    exp_out = jax.tree.map(jax.lax.stop_gradient, exp_out)
    z_exp = exp_out.code
    trainable = _subset(state.params, TRAINABLE["stage2"]["main"])

    def loss_fn(trainable):
      params = {**state.params, **trainable}
      out, new_stats = _encode(model.id_encoder, params, state.batch_stats,
                               "id_encoder", images, train=True)
      scored = exp_out if critic_input == "exp_encoder" else out
      _check_critic_inputs(scored, 2 * b)
      t = jnp.concatenate([z_exp, out.code], axis=-1)
      def term(name, xs):
        # M's and N's images are two batches of B (perm_pair is a derangement of B).
        score, pairwise = _critic_fns(getattr(model, name), params[name])
        return mi.add_estimates(*(
            mi.mutual_information(score, x, z, perm_pair, c.estimator, pairwise)
            for x, z in zip(jnp.split(xs, 2), jnp.split(t, 2))))

      mi_global = term("id_global_critic", scored.critic_feature)
      mi_local = term("id_local_critic", scored.feature_map)
      joint, shuffled = disc_logits(params, z_exp, out.code, perm_all)
      fool = _bce_with_logits(joint, 0.0) + _bce_with_logits(shuffled, 1.0)
      loss = -(c.mu * mi_global.objective + c.nu * mi_local.objective) + c.zeta * fool
      return loss, (new_stats, out.code, dict(_mi_metrics(mi_global, mi_local),
                                              adv_fool=fool))

    (loss, (new_stats, z_id, metrics)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(trainable)
    trainable, main_opt = _apply_updates(tx_main, state.opt_state["main"], trainable, grads)

    z_id = jax.lax.stop_gradient(z_id)

    def disc_loss_fn(disc_params):
      joint, shuffled = disc_logits(disc_params, z_exp, z_id, perm_all)
      loss = _bce_with_logits(joint, 1.0) + _bce_with_logits(shuffled, 0.0)
      return loss, (jnp.mean(joint > 0), jnp.mean(shuffled < 0))

    disc_params = _subset(state.params, TRAINABLE["stage2"]["disc"])
    disc_opt = state.opt_state["disc"]
    # Unrolled: disc_steps is small, and each update is a few tiny matmuls.
    for _ in range(disc_steps):
      (disc_loss, (acc_joint, acc_shuffled)), disc_grads = jax.value_and_grad(
          disc_loss_fn, has_aux=True)(disc_params)
      disc_params, disc_opt = _apply_updates(tx_disc, disc_opt, disc_params, disc_grads)

    new_state = _next_state(state, {**trainable, **disc_params},
                            {"main": main_opt, "disc": disc_opt}, {"id_encoder": new_stats})
    metrics = dict(metrics, loss=loss, disc_loss=disc_loss,
                   disc_accuracy=0.5 * (acc_joint + acc_shuffled),
                   disc_accuracy_joint=acc_joint, disc_accuracy_shuffled=acc_shuffled,
                   grad_norm=optax.tree.norm(grads),
                   disc_grad_norm=optax.tree.norm(disc_grads),
                   finite=_finite(loss, disc_loss, *_mi_metrics_values(metrics)))
    return new_state, metrics

  return step


def _classification_metrics(logits, labels):
  loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
  return loss, jnp.mean(jnp.argmax(logits, -1) == labels)


def make_stage3_step(model: DiceferModel, optimizers) -> Callable:
  """Stage 3: an MLP classifier on the frozen expression code, cross-entropy."""
  tx = optimizers["main"]

  def step(state: StageState, batch):
    chex.assert_rank(batch["image"], 4)
    chex.assert_shape(batch["label"], (batch["image"].shape[0],))
    exp_out, _ = _encode(model.exp_encoder, state.params, state.batch_stats,
                         "exp_encoder", batch["image"], train=False)
    z_exp = jax.lax.stop_gradient(exp_out.code)
    dropout_key = jax.random.fold_in(state.rng, state.step)
    trainable = _subset(state.params, TRAINABLE["stage3"]["main"])

    def loss_fn(trainable):
      logits = model.classifier.apply({"params": trainable["classifier"]}, z_exp,
                                      train=True, rngs={"dropout": dropout_key})
      return _classification_metrics(logits, batch["label"])

    (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    trainable, opt_state = _apply_updates(tx, state.opt_state["main"], trainable, grads)
    new_state = _next_state(state, trainable, {"main": opt_state})
    return new_state, dict(loss=loss, train_accuracy=accuracy,
                           grad_norm=optax.tree.norm(grads), finite=_finite(loss))

  return step


def make_baseline_step(model: DiceferModel, optimizers) -> Callable:
  """The supervised baseline: the same ResNet-18, cross-entropy only, end to end."""
  tx = optimizers["main"]

  def step(state: StageState, batch):
    chex.assert_rank(batch["image"], 4)
    chex.assert_shape(batch["label"], (batch["image"].shape[0],))
    trainable = _subset(state.params, TRAINABLE["baseline"]["main"])

    def loss_fn(trainable):
      params = {**state.params, **trainable}
      out, new_stats = _encode(model.exp_encoder, params, state.batch_stats,
                               "exp_encoder", batch["image"], train=True)
      logits = model.baseline_head.apply({"params": params["baseline_head"]}, out.feature)
      loss, accuracy = _classification_metrics(logits, batch["label"])
      return loss, (new_stats, accuracy)

    (loss, (new_stats, accuracy)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(trainable)
    trainable, opt_state = _apply_updates(tx, state.opt_state["main"], trainable, grads)
    new_state = _next_state(state, trainable, {"main": opt_state},
                            {"exp_encoder": new_stats})
    return new_state, dict(loss=loss, train_accuracy=accuracy,
                           grad_norm=optax.tree.norm(grads), finite=_finite(loss))

  return step


def make_step(stage: str, model: DiceferModel, config, optimizers) -> Callable:
  """The (unjitted) step function of a stage."""
  if stage == "stage1":
    return make_stage1_step(model, config.loss, optimizers)
  if stage == "stage2":
    return make_stage2_step(model, config.loss, optimizers, config.train.disc_steps,
                            config.model.id_critic_input)
  if stage == "stage3":
    return make_stage3_step(model, optimizers)
  if stage == "baseline":
    return make_baseline_step(model, optimizers)
  raise ValueError(f"unknown stage {stage!r}")


def make_embed_fn(model: DiceferModel) -> Callable:
  """(params, batch_stats, images) -> dict of codes and logits, all in eval mode."""

  def embed(params, batch_stats, images):
    exp_out, _ = _encode(model.exp_encoder, params, batch_stats, "exp_encoder",
                         images, train=False)
    id_out, _ = _encode(model.id_encoder, params, batch_stats, "id_encoder",
                        images, train=False)
    return dict(
        z_exp=exp_out.code, z_id=id_out.code, feature=exp_out.feature,
        dicefer_logits=model.classifier.apply({"params": params["classifier"]}, exp_out.code),
        baseline_logits=model.baseline_head.apply({"params": params["baseline_head"]},
                                                  exp_out.feature))
  return embed
