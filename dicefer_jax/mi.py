"""Mutual-information bounds: the Donsker-Varadhan (DV) bound as in MINE, and the
Jensen-Shannon and InfoNCE objectives used to train the critics instead of it.

For a critic T and samples of the joint p(x, z) and of the product of marginals
p(x)p(z), I(X; Z) >= E_joint[T] - log E_marginal[exp T]. Marginal samples are made
by pairing each x with the z of another item of the same batch.

Which bound a stage MAXIMISES is `config.loss.estimator` (`ESTIMATORS`); what it
LOGS is always the DV estimate on the same critic's scores, so that curves of
runs with different objectives are in the same unit (nats of a DV bound).
"""

from typing import Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp

from dicefer_jax.errors import UserError

ScoreFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x, z) -> (B,) scores
PairwiseFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x, z) -> (B, B) scores

# The training objectives `config.loss.estimator` may name.
ESTIMATORS = ("dv", "jsd", "infonce")


def check_estimator(estimator) -> None:
  """Refuses an estimator name that is not one of ESTIMATORS, in one line."""
  if not isinstance(estimator, str) or estimator not in ESTIMATORS:
    raise UserError(f"--config.loss.estimator={estimator!r}: use one of "
                    f"{', '.join(ESTIMATORS)} (the MI objective stages 1 and 2 maximise)")


def dv_lower_bound(joint_scores: jax.Array, marginal_scores: jax.Array) -> jax.Array:
  """DV estimate in nats: mean(t_joint) - (logsumexp(t_marginal) - log B).

  logsumexp keeps it finite for any finite scores; log(mean(exp(t))) overflows in
  float32 once scores pass ~88.
  """
  if joint_scores.ndim != 1 or marginal_scores.ndim != 1:
    raise ValueError(
        f"dv_lower_bound wants score vectors (B,), got {joint_scores.shape} and "
        f"{marginal_scores.shape}")
  n = marginal_scores.shape[0]
  log_mean_exp = jax.nn.logsumexp(marginal_scores) - jnp.log(float(n))
  return jnp.mean(joint_scores) - log_mean_exp


def marginal_permutation(key: jax.Array, batch_size: int) -> jax.Array:
  """A random derangement of range(batch_size): no item keeps its own partner.

  Built as p o roll(k) o p^-1 with a random permutation p and a shift k in
  [1, B-1], so joint pairs never leak into the marginal samples.
  """
  if batch_size < 2:
    raise ValueError("marginal sampling needs a batch of at least 2")
  perm_key, shift_key = jax.random.split(key)
  p = jax.random.permutation(perm_key, batch_size)
  shift = jax.random.randint(shift_key, (), 1, batch_size)
  inverse = jnp.argsort(p)
  return p[(inverse + shift) % batch_size]


def jsd_lower_bound(joint_scores: jax.Array, marginal_scores: jax.Array) -> jax.Array:
  """Deep InfoMax's Jensen-Shannon objective:

    -mean(softplus(-t_joint)) - mean(softplus(t_marginal))

  i.e. minus the binary cross-entropy of a classifier with logit T telling joint
  (label 1) from marginal (label 0) samples. Its supremum over critics is
  2 JSD(p(x,z) || p(x)p(z)) - log 4, which lies in [-log 4, 0]: it is not in nats
  of MI (it is <= 0 <= I), but it grows monotonically with how separable the two
  distributions are, and each sample enters through a bounded softplus instead
  of a batch-wide log-mean-exp, which is why Deep InfoMax trains encoders with it
  rather than DV (no drifting normaliser, lower variance). Its optimal critic is
  exactly the log density ratio, one of DV's optimal critics, so the DV bound on
  its scores is a sound MI estimate (tests/test_mi.py: within 10% on Gaussians).
  """
  if joint_scores.ndim != 1 or marginal_scores.ndim != 1:
    raise ValueError(
        f"jsd_lower_bound wants score vectors (B,), got {joint_scores.shape} and "
        f"{marginal_scores.shape}")
  return -jnp.mean(jax.nn.softplus(-joint_scores)) - jnp.mean(
      jax.nn.softplus(marginal_scores))


def infonce_lower_bound(score_matrix_: jax.Array) -> jax.Array:
  """InfoNCE in nats from the B x B matrix S[i, j] = T(x_i, z_j):

    mean_i [S[i, i] - logsumexp_j S[i, j]] + log B

  Each x_i must pick its own code out of the batch's B codes (a B-way softmax).
  It is a lower bound on I(X; Z) that can never exceed log B (each term is a log
  probability, <= 0): a batch of 32 cannot certify more than 3.47 nats.
  Its optimal critic is the log density ratio plus ANY function of x, which
  InfoNCE ignores and DV penalises: the DV estimate on an InfoNCE-trained critic
  is a valid but loose bound (tests/test_mi.py).
  """
  if score_matrix_.ndim != 2 or score_matrix_.shape[0] != score_matrix_.shape[1]:
    raise ValueError(f"infonce_lower_bound wants a square (B, B) matrix, got "
                     f"{score_matrix_.shape}")
  b = score_matrix_.shape[0]
  log_softmax_diag = jnp.diagonal(score_matrix_) - jax.nn.logsumexp(score_matrix_, axis=1)
  return jnp.mean(log_softmax_diag) + jnp.log(float(b))


def score_matrix(score_fn: ScoreFn, x: jax.Array, z: jax.Array) -> jax.Array:
  """S[i, j] = T(x_i, z_j) for every x against every code of the batch, (B, B).

  vmapped over codes: the critic sees B batches (x, z_j tiled), B x B pairs at
  once where DV and JSD score 2B. Cheap for the global MLP; for the local critic
  it is its 1x1 convs at every position of every pair. Measured at the paper's
  size (112 px, width 64, B = 32; benchmarks/mi_objective_cost.py): a stage-1
  step is 159 GFLOP with 409 MiB of temporaries under DV or JSD, 269 GFLOP and
  796 MiB under InfoNCE with the local critic on the 4x4 stage-4 map, and 415
  GFLOP and 1.5 GiB on the 7x7 stage-3 map.
  """
  b = x.shape[0]
  chex.assert_axis_dimension(z, 0, b)
  by_code = jax.vmap(lambda zj: score_fn(x, jnp.broadcast_to(zj, (b,) + zj.shape)))(z)
  chex.assert_shape(by_code, (b, b))
  return by_code.T  # vmap stacked codes first: rows must be images


class MIEstimate(NamedTuple):
  """One MI term: the DV estimate (logged) and the objective trained on."""
  dv: jax.Array
  objective: jax.Array


def add_estimates(*terms: MIEstimate) -> MIEstimate:
  """The sum of MI terms, field by field (`+` on tuples would concatenate them)."""
  return MIEstimate(sum(t.dv for t in terms), sum(t.objective for t in terms))


def mutual_information(score_fn: ScoreFn, x: jax.Array, z: jax.Array,
                       permutation: jax.Array, estimator: str = "dv",
                       pairwise_fn: PairwiseFn | None = None) -> MIEstimate:
  """I(x; z) from one batch: the DV estimate and the `estimator` objective.

  Both come from the same critic scores. The DV estimate always pairs x_i with
  z[permutation[i]] for its marginal samples, whatever the objective, so that
  it is the same number for a given critic: with "infonce" those pairs are read
  off the B x B matrix the objective needs anyway. `pairwise_fn`, when the
  critic has one (a separable critic's single matmul), gives that matrix, and
  then every objective reads its scores off it: the same numbers as score_fn's.
  """
  check_estimator(estimator)
  b = x.shape[0]
  chex.assert_axis_dimension(z, 0, b)
  chex.assert_shape(permutation, (b,))
  if pairwise_fn is None and estimator == "infonce":  # it needs every pair anyway
    pairwise_fn = lambda xs, zs: score_matrix(score_fn, xs, zs)
  if pairwise_fn is not None:
    scores = pairwise_fn(x, z)
    chex.assert_shape(scores, (b, b))
    joint, marginal = jnp.diagonal(scores), scores[jnp.arange(b), permutation]
  else:  # only the 2B pairs DV and JSD use
    scores = score_fn(jnp.concatenate([x, x], axis=0),
                      jnp.concatenate([z, z[permutation]], axis=0))
    chex.assert_shape(scores, (2 * b,))
    joint, marginal = scores[:b], scores[b:]
  dv = dv_lower_bound(joint, marginal)
  if estimator == "infonce":
    return MIEstimate(dv, infonce_lower_bound(scores))
  return MIEstimate(dv, dv if estimator == "dv" else jsd_lower_bound(joint, marginal))


def dv_mutual_information(score_fn: ScoreFn, x: jax.Array, z: jax.Array,
                          permutation: jax.Array) -> jax.Array:
  """DV estimate of I(x; z) from one batch, scoring joint and marginal in one call."""
  return mutual_information(score_fn, x, z, permutation, "dv").dv


def cross_mutual_information(score_fn: ScoreFn, x_m, x_n, z_m, z_n,
                             permutation: jax.Array, swap: bool = True,
                             estimator: str = "dv",
                             pairwise_fn: PairwiseFn | None = None) -> MIEstimate:
  """I(M; z_N) + I(N; z_M) with the swap, or I(M; z_M) + I(N; z_N) without it.

  With the swap, image M's features are scored with its partner's code: only what
  the pair shares (the expression) can raise the bound, not who M is.
  """
  if swap:
    z_m, z_n = z_n, z_m
  term = lambda x, z: mutual_information(score_fn, x, z, permutation, estimator,
                                         pairwise_fn)
  return add_estimates(term(x_m, z_m), term(x_n, z_n))
