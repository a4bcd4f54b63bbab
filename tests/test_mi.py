"""The DV bound: numerics, marginal sampling, and a known-answer MI estimate."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dicefer_jax import mi, models


def test_dv_bound_formula_and_large_scores():
  joint = jnp.array([1.0, 2.0, 3.0])
  marginal = jnp.array([0.0, 1.0, -1.0])
  expected = 2.0 - np.log(np.mean(np.exp([0.0, 1.0, -1.0])))
  np.testing.assert_allclose(mi.dv_lower_bound(joint, marginal), expected, rtol=1e-6)
  big = mi.dv_lower_bound(jnp.full((4,), 1e4), jnp.array([1e4, -1e4, 1e4, -1e4]))
  assert np.isfinite(float(big))
  # 1e4 - (1e4 + log 2 - log 4) = log 2, up to float32 spacing at 1e4 (~1e-3).
  np.testing.assert_allclose(big, np.log(2.0), atol=2e-3)
  assert np.isfinite(float(mi.dv_lower_bound(jnp.full((4,), -1e4), jnp.full((4,), -1e4))))
  # Gradients stay finite at extreme scores too.
  g = jax.grad(lambda m: mi.dv_lower_bound(jnp.zeros(4), m))(jnp.array([1e4, 0., -1e4, 5.]))
  assert np.all(np.isfinite(g))


def test_dv_bound_rejects_matrices():
  with pytest.raises(ValueError):
    mi.dv_lower_bound(jnp.zeros((2, 2)), jnp.zeros((2, 2)))


@pytest.mark.parametrize("batch", [2, 3, 32, 101])
def test_marginal_permutation_is_a_derangement(batch):
  for seed in range(20):
    perm = np.asarray(mi.marginal_permutation(jax.random.PRNGKey(seed), batch))
    assert sorted(perm.tolist()) == list(range(batch))
    assert np.all(perm != np.arange(batch))


def test_cross_mi_swaps_codes():
  seen = []
  def score(x, z):
    seen.append(np.asarray(z[: x.shape[0] // 2]))
    return jnp.zeros(x.shape[0])
  z_m, z_n = jnp.ones((3, 2)), 2 * jnp.ones((3, 2))
  perm = jnp.array([1, 2, 0])
  mi.cross_mutual_information(score, z_m, z_n, z_m, z_n, perm, swap=True)
  assert seen[0][0, 0] == 2.0 and seen[1][0, 0] == 1.0  # M scored with z_N
  seen.clear()
  mi.cross_mutual_information(score, z_m, z_n, z_m, z_n, perm, swap=False)
  assert seen[0][0, 0] == 1.0 and seen[1][0, 0] == 2.0


def test_global_critic_recovers_gaussian_mutual_information():
  """x ~ N(0, I_2), z = rho x + sqrt(1 - rho^2) e: I(x; z) = -d/2 log(1 - rho^2)."""
  d, rho = 2, 0.8
  truth = -d / 2 * np.log(1 - rho ** 2)

  def sample(key, n):
    kx, ke = jax.random.split(key)
    x = jax.random.normal(kx, (n, d))
    return x, rho * x + np.sqrt(1 - rho ** 2) * jax.random.normal(ke, (n, d))

  critic = models.GlobalCritic(hidden=128)
  params = critic.init(jax.random.PRNGKey(0), jnp.zeros((1, d)), jnp.zeros((1, d)))
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)

  def estimate(p, x, z, perm):
    return mi.dv_mutual_information(lambda a, b: critic.apply(p, a, b), x, z, perm)

  @jax.jit
  def step(p, opt_state, key):
    k_data, k_perm = jax.random.split(key)
    x, z = sample(k_data, 512)
    grads = jax.grad(lambda p: -estimate(p, x, z, mi.marginal_permutation(k_perm, 512)))(p)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(p, updates), opt_state

  key = jax.random.PRNGKey(42)
  for _ in range(2000):
    key, k = jax.random.split(key)
    params, opt_state = step(params, opt_state, k)
  estimates = []
  for _ in range(5):
    key, k_data, k_perm = jax.random.split(key, 3)
    x, z = sample(k_data, 8192)
    estimates.append(float(estimate(params, x, z, mi.marginal_permutation(k_perm, 8192))))
  assert abs(np.mean(estimates) - truth) < 0.1 * truth, (estimates, truth)
