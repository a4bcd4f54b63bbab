"""Mutual-information estimation with the Donsker-Varadhan (DV) bound, as in MINE.

For a critic T and samples of the joint p(x, z) and of the product of marginals
p(x)p(z), I(X; Z) >= E_joint[T] - log E_marginal[exp T]. Marginal samples are made
by pairing each x with the z of another item of the same batch.
"""

from typing import Callable

import jax
import jax.numpy as jnp

ScoreFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x, z) -> (B,) scores


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


def dv_mutual_information(score_fn: ScoreFn, x: jax.Array, z: jax.Array,
                          permutation: jax.Array) -> jax.Array:
  """DV estimate of I(x; z) from one batch, scoring joint and marginal in one call."""
  b = x.shape[0]
  scores = score_fn(jnp.concatenate([x, x], axis=0),
                    jnp.concatenate([z, z[permutation]], axis=0))
  return dv_lower_bound(scores[:b], scores[b:])


def cross_mutual_information(score_fn: ScoreFn, x_m, x_n, z_m, z_n,
                             permutation: jax.Array, swap: bool = True) -> jax.Array:
  """I(M; z_N) + I(N; z_M) with the swap, or I(M; z_M) + I(N; z_N) without it.

  With the swap, image M's features are scored with its partner's code: only what
  the pair shares (the expression) can raise the bound, not who M is.
  """
  if swap:
    z_m, z_n = z_n, z_m
  return (dv_mutual_information(score_fn, x_m, z_m, permutation) +
          dv_mutual_information(score_fn, x_n, z_n, permutation))
