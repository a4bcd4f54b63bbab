"""The MI bounds (DV, JSD, InfoNCE): numerics against hand computations,
marginal sampling, the all-pairs score matrix, and known-answer MI estimates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dicefer_jax import mi, models
from dicefer_jax.errors import UserError


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
      _dot_score, x_m, x_n, z_m, z_n, jnp.asarray(perm), swap=swap).dv)
  swapped = _dv_by_hand(x_m, z_n, perm) + _dv_by_hand(x_n, z_m, perm)
  own = _dv_by_hand(x_m, z_m, perm) + _dv_by_hand(x_n, z_n, perm)
  assert abs(swapped - own) > 1e-2
  np.testing.assert_allclose(cross(True), swapped, rtol=1e-5)
  np.testing.assert_allclose(cross(False), own, rtol=1e-5)


# ---------------------------------------------------------------------------
# The training objectives (loss.estimator): formulas against hand computations.
# ---------------------------------------------------------------------------

# S[i, j] = T(x_i, z_j): rows are images, columns codes. Not symmetric, and its
# row and column log-sum-exps differ, so a transposed matrix or a softmax over
# the wrong axis gives another number.
SCORES = np.array([[2.0, 0.0, -1.0],
                   [1.0, 3.0, 0.0],
                   [0.5, -2.0, 1.0]])


def _log1pexp(t):
  return np.logaddexp(0.0, np.asarray(t, np.float64))


def _infonce_by_hand(s):
  s = np.asarray(s, np.float64)
  b = s.shape[0]
  rows = [s[i, i] - np.log(np.sum(np.exp(s[i]))) for i in range(b)]
  return np.mean(rows) + np.log(b)


def test_jsd_objective_formula():
  """Catches a wrong sign inside either softplus, joint/marginal swapped, a sum
  instead of a mean, or a missing term: -mean sp(-t_joint) - mean sp(t_marginal)."""
  joint, marginal = np.array([2.0, 3.0, -0.5]), np.array([-1.0, 0.5, -2.0, 1.0])
  expected = -np.mean(_log1pexp(-joint)) - np.mean(_log1pexp(marginal))
  got = float(mi.jsd_lower_bound(jnp.asarray(joint), jnp.asarray(marginal)))
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  swapped = -np.mean(_log1pexp(-marginal)) - np.mean(_log1pexp(joint))
  assert abs(got - swapped) > 0.1  # so the check above tells the arguments apart
  # Never above 0, and finite with finite gradients at extreme scores.
  assert got < 0
  big = jnp.array([1e4, -1e4, 5.0])
  assert np.isfinite(float(mi.jsd_lower_bound(big, -big)))
  g = jax.grad(lambda t: mi.jsd_lower_bound(t, t))(big)
  assert np.all(np.isfinite(g))
  # A perfect critic (joint far above 0, marginal far below) reaches the sup 0.
  np.testing.assert_allclose(mi.jsd_lower_bound(jnp.full(3, 50.0), jnp.full(3, -50.0)),
                             0.0, atol=1e-6)


def test_infonce_objective_formula_and_its_log_b_cap():
  """Catches a softmax over the wrong axis (columns), a missing + log B, a mean
  over the whole matrix, and an estimate that can pass log B."""
  got = float(mi.infonce_lower_bound(jnp.asarray(SCORES)))
  np.testing.assert_allclose(got, _infonce_by_hand(SCORES), rtol=1e-6)
  assert abs(got - _infonce_by_hand(SCORES.T)) > 1e-2  # the axis matters here
  # Adding any function of x (a constant per row) changes nothing: the optimal
  # InfoNCE critic is only defined up to it. A constant per column does.
  rows = SCORES + np.array([[5.0], [-3.0], [1.0]])
  np.testing.assert_allclose(mi.infonce_lower_bound(jnp.asarray(rows)), got, rtol=1e-5)
  cols = SCORES + np.array([[5.0, -3.0, 1.0]])
  assert abs(float(mi.infonce_lower_bound(jnp.asarray(cols))) - got) > 1e-2
  # The cap: a critic that names every partner with certainty gives log B, not more.
  for b in (2, 8, 32):
    certain = float(mi.infonce_lower_bound(100.0 * jnp.eye(b)))
    np.testing.assert_allclose(certain, np.log(b), rtol=1e-6)
  np.testing.assert_allclose(mi.infonce_lower_bound(jnp.zeros((4, 4))), 0.0, atol=1e-6)
  random = jax.random.normal(jax.random.PRNGKey(0), (200, 16, 16)) * 30.0
  assert np.all(np.asarray(jax.vmap(mi.infonce_lower_bound)(random)) <= np.log(16) + 1e-5)
  with pytest.raises(ValueError):
    mi.infonce_lower_bound(jnp.zeros((3, 4)))


def _asymmetric_score(x, z):
  """A critic for which T(x, z) != T(z, x) and rows differ from columns."""
  return jnp.sum(x * z, axis=-1) + 2.0 * x[:, 0] - z[:, 1] ** 2


def test_score_matrix_scores_every_image_against_every_code():
  """Catches a transposed matrix (codes as rows), a diagonal that is not the
  joint pairs, or codes of the wrong items."""
  kx, kz = jax.random.split(jax.random.PRNGKey(5))
  x, z = jax.random.normal(kx, (5, 3)), jax.random.normal(kz, (5, 3))
  s = np.asarray(mi.score_matrix(_asymmetric_score, x, z))
  assert s.shape == (5, 5)
  for i in range(5):
    for j in range(5):
      expected = float(_asymmetric_score(x[i:i + 1], z[j:j + 1])[0])
      np.testing.assert_allclose(s[i, j], expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.diag(s), _asymmetric_score(x, z), rtol=1e-5)


def test_score_matrix_of_the_local_critic_scores_every_map_against_every_code():
  """The local critic through score_matrix: S[i, j] is its score of map i with
  code j tiled over the map (catches a code broadcast over the wrong axis)."""
  critic = models.LocalCritic(hidden=8)
  kf, kz, ki = jax.random.split(jax.random.PRNGKey(6), 3)
  fmap, z = jax.random.normal(kf, (4, 3, 3, 5)), jax.random.normal(kz, (4, 2))
  params = critic.init(ki, fmap, z)
  score = lambda f, c: critic.apply(params, f, c)
  s = np.asarray(mi.score_matrix(score, fmap, z))
  for j in range(4):
    np.testing.assert_allclose(s[:, j], score(fmap, jnp.tile(z[j], (4, 1))),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("estimator", mi.ESTIMATORS)
def test_mutual_information_logs_dv_and_trains_on_the_estimator(estimator):
  """Catches an objective computed on other scores than the logged DV estimate,
  a DV estimate that changes with the objective (curves of different runs would
  not compare), or InfoNCE's marginal pairs read off the wrong entries."""
  kx, ke = jax.random.split(jax.random.PRNGKey(7))
  x = jax.random.normal(kx, (6, 4))
  z = x + 0.5 * jax.random.normal(ke, (6, 4))  # correlated: every term far from 0
  perm = np.array([2, 0, 5, 1, 3, 4])
  got = mi.mutual_information(_dot_score, x, z, jnp.asarray(perm), estimator)
  assert abs(_dv_by_hand(x, z, perm)) > 0.5
  np.testing.assert_allclose(float(got.dv), _dv_by_hand(x, z, perm), rtol=1e-5)
  xs, zs = np.asarray(x, np.float64), np.asarray(z, np.float64)
  joint, marginal = np.sum(xs * zs, -1), np.sum(xs * zs[perm], -1)
  expected = dict(
      dv=_dv_by_hand(x, z, perm),
      jsd=-np.mean(_log1pexp(-joint)) - np.mean(_log1pexp(marginal)),
      infonce=_infonce_by_hand(xs @ zs.T))[estimator]
  np.testing.assert_allclose(float(got.objective), expected, rtol=1e-5)


@pytest.mark.parametrize("estimator", mi.ESTIMATORS)
def test_pairwise_scores_give_the_same_terms_as_scoring_each_pair(estimator):
  """A separable critic hands `mutual_information` its whole B x B matrix; every
  objective must read the same numbers off it as from scoring pairs one by one.
  Catches a transposed matrix, marginal pairs read as S[perm[i], i] instead of
  S[i, perm[i]], or a matrix from which the objective ignores the estimator."""
  critic = models.SeparableCritic(hidden=8)
  kx, ke, ki = jax.random.split(jax.random.PRNGKey(9), 3)
  x = jax.random.normal(kx, (6, 4))
  z = x + 0.5 * jax.random.normal(ke, (6, 4))
  params = critic.init(ki, x, z)
  # Scaled up so that every objective is far from the others and from 0.
  params = jax.tree.map(lambda w: 3.0 * w, params)
  score = lambda a, b: critic.apply(params, a, b)
  pairwise = lambda a, b: critic.apply(params, a, b, method="pairwise")
  perm = jnp.asarray([2, 0, 5, 1, 3, 4])
  one_by_one = mi.mutual_information(score, x, z, perm, estimator)
  from_matrix = mi.mutual_information(score, x, z, perm, estimator, pairwise)
  transposed = mi.mutual_information(score, x, z, perm, estimator,
                                     lambda a, b: pairwise(a, b).T)
  np.testing.assert_allclose(from_matrix.dv, one_by_one.dv, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(from_matrix.objective, one_by_one.objective, rtol=1e-5,
                             atol=1e-6)
  assert abs(float(transposed.objective - one_by_one.objective)) > 1e-3


def test_cross_mi_sums_both_fields_with_each_estimator():
  """Catches the two cross terms' sum concatenating tuples, or dropping a field."""
  keys = jax.random.split(jax.random.PRNGKey(8), 4)
  x_m, x_n, z_m, z_n = (jax.random.normal(k, (5, 3)) for k in keys)
  perm = jnp.asarray([1, 2, 3, 4, 0])
  for estimator in mi.ESTIMATORS:
    got = mi.cross_mutual_information(_dot_score, x_m, x_n, z_m, z_n, perm,
                                      swap=True, estimator=estimator)
    a = mi.mutual_information(_dot_score, x_m, z_n, perm, estimator)
    b = mi.mutual_information(_dot_score, x_n, z_m, perm, estimator)
    np.testing.assert_allclose(got.dv, a.dv + b.dv, rtol=1e-5)
    np.testing.assert_allclose(got.objective, a.objective + b.objective, rtol=1e-5)


@pytest.mark.parametrize("estimator", ["", "DV", "nce", "mine", None, 1])
def test_unknown_estimator_is_a_one_line_user_error(estimator):
  with pytest.raises(UserError, match=r"^--config\.loss\.estimator=.*dv, jsd, infonce") as e:
    mi.mutual_information(_dot_score, jnp.zeros((3, 2)), jnp.zeros((3, 2)),
                          jnp.asarray([1, 2, 0]), estimator)
  assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------
# Known-answer MI: correlated Gaussians, a small critic trained on each objective.
# ---------------------------------------------------------------------------


def _gaussians(d, rho):
  """x ~ N(0, I_d), z = rho x + sqrt(1 - rho^2) e: I(x; z) = -d/2 log(1 - rho^2)."""
  def sample(key, n):
    kx, ke = jax.random.split(key)
    x = jax.random.normal(kx, (n, d))
    return x, rho * x + np.sqrt(1 - rho ** 2) * jax.random.normal(ke, (n, d))
  return sample, -d / 2 * np.log(1 - rho ** 2)


def _train_critic(estimator, sample, d, batch, num_steps, seed=0,
                  critic=models.GlobalCritic(hidden=64)):
  """`critic` trained to maximise `estimator` on fresh batches; returns a
  function (key, n, num_batches, estimator) -> (DV estimates, objectives), one per
  batch (pass "dv" for large batches: InfoNCE's matrix is n x n)."""
  params = critic.init(jax.random.PRNGKey(seed), jnp.zeros((1, d)), jnp.zeros((1, d)))
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)
  separable = isinstance(critic, models.SeparableCritic)

  def estimate(p, key, n, name):
    k_data, k_perm = jax.random.split(key)
    x, z = sample(k_data, n)
    pairwise = (lambda a, b: critic.apply(p, a, b, method="pairwise")) if separable else None
    return mi.mutual_information(lambda a, b: critic.apply(p, a, b), x, z,
                                 mi.marginal_permutation(k_perm, n), name, pairwise)

  @jax.jit
  def step(p, opt_state, key):
    grads = jax.grad(lambda p: -estimate(p, key, batch, estimator).objective)(p)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(p, updates), opt_state

  key = jax.random.PRNGKey(42 + seed)
  for _ in range(num_steps):
    key, k = jax.random.split(key)
    params, opt_state = step(params, opt_state, k)

  def evaluate(key, n, num_batches, name=estimator):
    out = jax.jit(jax.vmap(lambda k: estimate(params, k, n, name)))(
        jax.random.split(key, num_batches))
    return np.asarray(out.dv), np.asarray(out.objective)
  return evaluate


# batch 128 for InfoNCE: it scores B x B pairs per step; log 128 = 4.9 nats is far
# above the 1.02 nats to find, so the cap does not bind.
@pytest.mark.parametrize("estimator,batch", [("dv", 512), ("jsd", 512), ("infonce", 128)])
def test_each_objective_trains_a_critic_to_the_gaussian_mutual_information(estimator,
                                                                          batch):
  """Catches an objective whose gradient does not train the critic towards the
  density ratio, or a DV estimate (or objective) above the truth.

  d = 2, rho = 0.8: I = 1.02 nats. The DV estimate of the critics trained on DV
  and on JSD lands within 10% (measured 0.99 and 0.99 at 800 steps; JSD's
  optimal critic is the log density ratio itself). The InfoNCE critic is only
  defined up to an added function of x, which InfoNCE ignores and DV penalises:
  the DV estimate on its scores is a valid but loose bound (measured 0.95, 0.81,
  0.58 nats at critic seeds 0, 1, 2), so there the InfoNCE value itself (0.93-1.0)
  is held to the truth, and DV only to being below it.
  """
  d, rho = 2, 0.8
  sample, truth = _gaussians(d, rho)
  evaluate = _train_critic(estimator, sample, d, batch, 800)
  # Large held-out batches for DV (its log-mean-exp is biased at small n); many
  # training-size batches for the objective, a bound in expectation over batches.
  dv, _ = evaluate(jax.random.PRNGKey(1), 8192, 5, "dv")
  _, objective = evaluate(jax.random.PRNGKey(2), batch, 400)
  slack = 0.05 * truth
  assert np.mean(dv) < truth + slack, (dv, truth)
  assert np.mean(objective) < truth + slack, (objective.mean(), truth)
  if estimator == "infonce":
    assert abs(np.mean(objective) - truth) < 0.1 * truth, (objective.mean(), truth)
    assert np.mean(dv) > 0.3 * truth, (dv, truth)  # loose, but it has learnt
  else:
    assert abs(np.mean(dv) - truth) < 0.1 * truth, (dv, truth)
  if estimator == "jsd":
    assert np.all(objective <= 0.0)  # the JSD surrogate is not in nats of MI


@pytest.mark.parametrize("estimator", ["dv", "infonce"])
def test_a_separable_critic_learns_the_gaussian_mutual_information(estimator):
  """The same known answer (d = 2, rho = 0.8: 1.02 nats) for the separable
  critic (`model.critic="separable"`). Catches a separable form that cannot
  approach the density ratio or a pairwise path that trains on other scores
  than it reports.

  Measured at 800 steps (hidden 64): DV-trained, its DV estimate 0.82 (-20%:
  a dot product of two embeddings fits the Gaussian log ratio less well than a
  concat MLP, 0.99); InfoNCE-trained, InfoNCE 0.98 (-4%) but the DV estimate on
  that critic -2.8: InfoNCE leaves the critic free up to any function of x,
  which a separable critic uses freely, so a DV estimate logged under it is a
  valid lower bound that says nothing. With infonce, read `objective_*`."""
  d, rho = 2, 0.8
  sample, truth = _gaussians(d, rho)
  batch = 512 if estimator == "dv" else 128
  evaluate = _train_critic(estimator, sample, d, batch, 800,
                           critic=models.SeparableCritic(hidden=64))
  dv, _ = evaluate(jax.random.PRNGKey(1), 8192, 5, "dv")
  _, objective = evaluate(jax.random.PRNGKey(2), batch, 400)
  assert np.mean(dv) < truth + 0.05 * truth, (dv, truth)
  if estimator == "dv":
    assert 0.7 * truth < np.mean(dv), (dv, truth)
  else:
    assert abs(np.mean(objective) - truth) < 0.1 * truth, (objective.mean(), truth)


def test_infonce_cannot_certify_more_than_log_batch():
  """InfoNCE's known limitation, measured: at d = 4, rho = 0.9 (I = 3.32 nats)
  and batch 8 (log 8 = 2.08), the trained critic's InfoNCE stays below log 8 on
  every batch and far below the truth, while it approaches the cap (measured
  1.74 at 800 steps). Catches a missing + log B or a softmax that includes
  other batches' codes."""
  d, rho, batch = 4, 0.9, 8
  sample, truth = _gaussians(d, rho)
  evaluate = _train_critic("infonce", sample, d, batch, 800)
  _, objective = evaluate(jax.random.PRNGKey(3), batch, 400)
  assert np.all(objective <= np.log(batch) + 1e-5), objective.max()
  assert 0.7 * np.log(batch) < np.mean(objective) < truth - 1.0, (objective.mean(), truth)
