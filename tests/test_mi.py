"""The DV bound: numerics, marginal sampling, and a known-answer MI estimate."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dicefer_jax import mi, models


def test_dv_bound_formula_and_large_scores():
  """Catches a wrong sign, mean instead of log-mean-exp, swapped arguments, and
  overflow from log(mean(exp(.)))."""
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
  # A shared shift of all scores cancels; log B uses the marginal's size.
  np.testing.assert_allclose(mi.dv_lower_bound(joint + 7.0, marginal + 7.0), expected,
                             rtol=1e-5)
  np.testing.assert_allclose(mi.dv_lower_bound(jnp.zeros(2), jnp.zeros(6)), 0.0, atol=1e-6)


def test_dv_bound_rejects_matrices():
  with pytest.raises(ValueError):
    mi.dv_lower_bound(jnp.zeros((2, 2)), jnp.zeros((2, 2)))


@pytest.mark.parametrize("batch", [2, 3, 32, 101])
def test_marginal_permutation_is_a_derangement(batch):
  """Catches marginal samples that keep a joint pair, or drop or repeat an item."""
  for seed in range(20):
    perm = np.asarray(mi.marginal_permutation(jax.random.PRNGKey(seed), batch))
    assert sorted(perm.tolist()) == list(range(batch))
    assert np.all(perm != np.arange(batch))


def test_marginal_permutation_is_random_and_a_pure_function_of_its_key():
  """Catches a fixed shift (always the next item), ignoring the key, or hidden state."""
  perms = [tuple(np.asarray(mi.marginal_permutation(jax.random.PRNGKey(s), 32)))
           for s in range(20)]
  assert len(set(perms)) == 20
  again = np.asarray(mi.marginal_permutation(jax.random.PRNGKey(0), 32))
  np.testing.assert_array_equal(again, perms[0])
  # Each item's marginal partner is uniform over the other items: at B = 4 and
  # 3000 keys, every one of the 3 choices for item 0 comes up about 1000 times.
  keys = jax.random.split(jax.random.PRNGKey(1), 3000)
  partners = np.asarray(jax.vmap(lambda k: mi.marginal_permutation(k, 4))(keys))[:, 0]
  counts = np.bincount(partners, minlength=4)
  assert counts[0] == 0 and np.all(np.abs(counts[1:] - 1000) < 120), counts


def test_marginal_permutation_rejects_a_batch_of_one():
  with pytest.raises(ValueError):
    mi.marginal_permutation(jax.random.PRNGKey(0), 1)


def _dot_score(x, z):
  return jnp.sum(x * z, axis=-1)


def _dv_by_hand(x, z, perm):
  """DV with the dot-product critic, in float64: z[perm] makes the marginal."""
  x, z = np.asarray(x, np.float64), np.asarray(z, np.float64)
  joint, marginal = np.sum(x * z, -1), np.sum(x * z[perm], -1)
  return joint.mean() - np.log(np.mean(np.exp(marginal)))


def test_dv_mutual_information_pairs_x_with_permuted_z():
  """Catches marginal samples made with the inverse permutation (x[perm] with z,
  which pairs x_i with z_perm^-1(i)), with the joint pairs, or a joint/marginal
  mix-up."""
  kx, kz = jax.random.split(jax.random.PRNGKey(3))
  x, z = jax.random.normal(kx, (6, 4)), jax.random.normal(kz, (6, 4))
  perm = np.array([2, 0, 5, 1, 3, 4])  # not an involution: perm != argsort(perm)
  got = float(mi.dv_mutual_information(_dot_score, x, z, jnp.asarray(perm)))
  np.testing.assert_allclose(got, _dv_by_hand(x, z, perm), rtol=1e-5)
  inverse_pairs = _dv_by_hand(x, z, np.argsort(perm))
  assert abs(got - inverse_pairs) > 1e-2


def test_cross_mi_swaps_codes():
  """Catches a swap flag that is ignored or inverted, or a missing cross term."""
  keys = jax.random.split(jax.random.PRNGKey(4), 4)
  x_m, x_n, z_m, z_n = (jax.random.normal(k, (5, 3)) for k in keys)
  perm = np.array([1, 2, 3, 4, 0])
  cross = lambda swap: float(mi.cross_mutual_information(
      _dot_score, x_m, x_n, z_m, z_n, jnp.asarray(perm), swap=swap))
  swapped = _dv_by_hand(x_m, z_n, perm) + _dv_by_hand(x_n, z_m, perm)
  own = _dv_by_hand(x_m, z_m, perm) + _dv_by_hand(x_n, z_n, perm)
  assert abs(swapped - own) > 1e-2
  np.testing.assert_allclose(cross(True), swapped, rtol=1e-5)
  np.testing.assert_allclose(cross(False), own, rtol=1e-5)


def test_global_critic_recovers_gaussian_mutual_information():
  """x ~ N(0, I_2), z = rho x + sqrt(1 - rho^2) e: I(x; z) = -d/2 log(1 - rho^2)."""
  d, rho = 2, 0.8
  truth = -d / 2 * np.log(1 - rho ** 2)

  def sample(key, n):
    kx, ke = jax.random.split(key)
    x = jax.random.normal(kx, (n, d))
    return x, rho * x + np.sqrt(1 - rho ** 2) * jax.random.normal(ke, (n, d))

  critic = models.GlobalCritic(hidden=64)
  params = critic.init(jax.random.PRNGKey(0), jnp.zeros((1, d)), jnp.zeros((1, d)))
  tx = optax.adam(3e-3)
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
  for _ in range(800):
    key, k = jax.random.split(key)
    params, opt_state = step(params, opt_state, k)
  estimates = []
  for _ in range(5):
    key, k_data, k_perm = jax.random.split(key, 3)
    x, z = sample(k_data, 8192)
    estimates.append(float(estimate(params, x, z, mi.marginal_permutation(k_perm, 8192))))
  assert abs(np.mean(estimates) - truth) < 0.1 * truth, (estimates, truth)
