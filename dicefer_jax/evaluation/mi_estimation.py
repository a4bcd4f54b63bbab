"""Mutual information by a freshly trained Donsker-Varadhan critic, and the
modified MIG built on it.

- `dv_mutual_information_estimate`: I(x; z) of paired samples, by a critic
  trained on one part of them and scored on a part it never saw. Marginal
  samples of a row never share an image with it (`marginal_partners`).
- `calibrate_estimator`: the same estimator, same sizes and widths, on
  correlated Gaussians whose MI is known: its measured error.
- `modified_mig`: the source report's MIG = I(z_exp(M); z_exp(N)) -
  I(z_exp(M); z_id(M)) on test pairs of the same expression and different
  people, with the spread over critic seeds, a bootstrap interval over the
  held-out images, plug-in bounds from predicted labels, and the calibration.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import special

from dicefer_jax import mi, models
from dicefer_jax.evaluation import identity, plugin_mi
from dicefer_jax.evaluation.common import (finite_or_none, known_subjects, mean_std,
                                           percentile_interval, unavailable)


def same_expression_pairs(labels, subjects, *, pairs_per_image: int, seed: int,
                          indices=None) -> tuple[np.ndarray, np.ndarray]:
  """Index pairs (M, N) with the same label and, where both subjects are known,
  different subjects; up to `pairs_per_image` partners N per image M.

  Unlike the training pairs there is no same-subject fallback: a pair of one
  person's images shares identity as well as expression, which would inflate
  I(z_exp(M); z_exp(N)) with exactly the information the metric should not reward.
  `indices` restricts both M and N to a subset of the images. An image is M of
  up to `pairs_per_image` rows and N of about as many: `marginal_partners` keeps
  such rows out of each other's marginal samples.
  """
  labels = np.asarray(labels)
  subjects = known_subjects(subjects)
  pool = np.arange(len(labels)) if indices is None else np.asarray(indices)
  rng = np.random.default_rng(seed)
  ms, ns = [], []
  for label in np.unique(labels[pool]):
    idx = pool[labels[pool] == label]
    subj = subjects[idx]
    known = subj != ""
    allowed = ~np.eye(len(idx), dtype=bool)
    allowed &= ~((subj[:, None] == subj[None, :]) & known[:, None] & known[None, :])
    for i in range(len(idx)):
      candidates = np.flatnonzero(allowed[i])
      if not len(candidates):
        continue
      picks = rng.choice(candidates, size=min(pairs_per_image, len(candidates)),
                         replace=False)
      ms.extend([idx[i]] * len(picks))
      ns.extend(idx[picks])
  return np.array(ms, dtype=np.int64), np.array(ns, dtype=np.int64)


# ----------------------------------------------------------------------------
# Marginal samples


# Rejection rounds before the rows still unlucky get an exact draw from their
# allowed partners (only rows of tiny parts, where most rows conflict, get there).
_REDRAWS = 32


def _pair_keys(a: np.ndarray, b: np.ndarray, base: int) -> np.ndarray:
  return a.astype(np.int64) * base + b.astype(np.int64)


def _conflict_checker(row_images):
  """(i, j) -> marginal_conflicts(row_images, i, j), with the set's pair keys built once."""
  row_images = np.asarray(row_images, np.int64)
  a, b = row_images[:, 0], row_images[:, 1]
  base = int(row_images.max(initial=0)) + 1
  keys = np.unique(np.concatenate([_pair_keys(a, b, base), _pair_keys(b, a, base)]))

  def conflicts(i, j):
    i, j = np.asarray(i), np.asarray(j)
    shared = (a[i] == a[j]) | (a[i] == b[j]) | (b[i] == a[j]) | (b[i] == b[j])
    key = _pair_keys(a[i], b[j], base)
    pos = np.minimum(np.searchsorted(keys, key), len(keys) - 1)
    return shared | (keys[pos] == key)
  return conflicts


def marginal_conflicts(row_images, i, j) -> np.ndarray:
  """Whether row j may NOT give row i its marginal sample (x_i, z_j), elementwise.

  `row_images` (n, 2) holds the images of each row's x and z. Row j is refused
  when it shares an image with row i (z_j would then be the code of x_i's own
  image or of z_i's, or row j would be another pair of x_i's image, making
  (x_i, z_j) one of the joint pairs), and when (x_i's image, z_j's image) is a
  row of the set, in either order (a joint pair reached through two rows).
  """
  return _conflict_checker(row_images)(i, j)


def marginal_partners(row_images, count: int, seed, rows: int | None = None,
                      strata=None) -> tuple[np.ndarray, int]:
  """(partners, fallbacks): marginal sample k of row i is (x_i, z_{partners[k, i]}).

  partners is (count, rows) int32; each partner is a row that
  `marginal_conflicts` allows. A refused draw is replaced by a draw from the
  same stratum (`strata[j]`, e.g. the expression of row j's z image) as the
  refused row j: every refused row of a same-expression pair shares the
  expression of the row, so redrawing from all rows would leave that expression
  under-represented among the marginals, and the DV bound would overshoot
  (measured: 2.2 to 3.2 nats for codes holding log 7 = 1.95, 8 images per
  expression). Redrawn within the stratum, the z side keeps its marginal
  composition exactly. Only where a stratum has no allowed row for row i does
  the draw fall back to any allowed row; `fallbacks` counts those draws.
  Columns past len(row_images) (padding) point at row 0. Raises ValueError when
  a row has no allowed partner at all.
  """
  row_images = np.asarray(row_images, np.int64)
  if row_images.ndim != 2 or row_images.shape[1] != 2:
    raise ValueError(f"row_images must be (n, 2), got {row_images.shape}")
  n = len(row_images)
  rows = n if rows is None else rows
  _, stratum = np.unique(np.zeros(n) if strata is None else np.asarray(strata),
                         return_inverse=True)
  stratum = stratum.reshape(-1)
  order = np.argsort(stratum, kind="stable")
  sizes = np.bincount(stratum, minlength=1)
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  rng = np.random.default_rng(seed)
  i = np.broadcast_to(np.arange(n), (count, n))
  j = rng.integers(0, max(n, 1), size=(count, n))
  conflicts = _conflict_checker(row_images)
  bad = conflicts(i, j) if n else np.zeros((count, 0), bool)
  for _ in range(_REDRAWS):
    if not bad.any():
      break
    s = stratum[j[bad]]
    j[bad] = order[starts[s] + (rng.random(len(s)) * sizes[s]).astype(np.int64)]
    bad[bad] = conflicts(i[bad], j[bad])
  fallbacks = 0
  for k, r in zip(*np.nonzero(bad)):
    allowed = ~conflicts(np.full(n, r), np.arange(n))
    if not allowed.any():
      raise ValueError(f"row {r} of {n} shares an image with every other row: no "
                       "marginal sample")
    same = allowed & (stratum == stratum[j[k, r]])
    fallbacks += int(not same.any())
    j[k, r] = rng.choice(np.flatnonzero(same if same.any() else allowed))
  partners = np.zeros((count, rows), np.int32)
  partners[:, :n] = j
  return partners, fallbacks


def _independent_rows(n: int) -> np.ndarray:
  """row_images of n independent samples: row i is image i on both sides."""
  return np.repeat(np.arange(n)[:, None], 2, axis=1)


# ----------------------------------------------------------------------------
# The critic estimator


@dataclasses.dataclass(frozen=True)
class CriticSettings:
  """How the MIG's MI terms are estimated; small enough to run on a CPU in seconds.

  Attributes:
    hidden: width of the GlobalCritic's hidden layers.
    num_hidden_layers: hidden layers of the critic.
    num_steps: Adam steps of critic training.
    batch_size: samples per step, drawn with replacement from the training part.
    learning_rate: Adam learning rate.
    num_seeds: independent critics (and image splits); mean and std over them.
    heldout_fraction: share of the images (per expression) whose samples only
      score the finished critic.
    validation_fraction: share of the remaining images whose samples choose the
      critic's step (early stopping); the rest train it.
    pairs_per_image: partners N drawn per image M.
    eval_permutations: marginal samples per row pooled when a bound is computed
      on validation or held-out data (less log-mean-exp variance).
    pca_dim: inputs are whitened by PCA on the training part, keeping at most
      this many components (0 = all). A deterministic projection can only lower
      MI, so the estimate stays a lower bound, and the critic has far fewer
      weights with which to memorise a few hundred samples.
    calibrate: also run the estimator on Gaussians of known MI at the terms'
      sizes and widths (`calibrate_estimator`), and report its errors.
    bootstrap_resamples: resamples of the held-out images behind each term's and
      the MIG's 95% interval; 0 = no interval.
  """

  hidden: int = 64
  num_hidden_layers: int = 2
  num_steps: int = 300
  batch_size: int = 128
  learning_rate: float = 1e-3
  num_seeds: int = 3
  heldout_fraction: float = 0.4
  validation_fraction: float = 0.25
  pairs_per_image: int = 4
  eval_permutations: int = 10
  pca_dim: int = 64
  calibrate: bool = True
  bootstrap_resamples: int = 200

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


# Standardised inputs are clipped to this many standard deviations: a held-out
# code far outside the training cloud (a dead unit that fires once) otherwise
# makes a critic extrapolate to huge scores, and one huge marginal score sinks the
# whole held-out bound (seen: -19 nats on a 4-pair validation set).
_CLIP_STD = 5.0
# Principal directions with less variance than this fraction of the largest are
# dropped: standardising a near-constant direction blows up held-out values.
_MIN_RELATIVE_VARIANCE = 1e-6
# Fewer validation or held-out samples than this: the term carries a warning.
_FEW_SAMPLES = 50
# Marginal partners drawn per training row; each step picks one of them per
# batch row. 32 is plenty: a row is drawn ~25 times in 300 steps of 128 from
# ~1500 rows, and every partner is a fresh image.
_TRAIN_PARTNERS = 32


def _standardizer(x_train: np.ndarray, pca_dim: int):
  """x -> whitened x: PCA on x_train (at most pca_dim components when pca_dim > 0,
  near-constant directions dropped), unit variance, clipped to +-_CLIP_STD.

  Every step is a fixed function of x, so the MI of the output is at most that of
  the input: a bound on the output's MI is still a bound on the input's.
  """
  x_train = np.asarray(x_train, np.float64)
  mean = x_train.mean(0)
  # Principal directions of the training part (SVD; no sklearn state to carry).
  _, singular, vt = np.linalg.svd(x_train - mean, full_matrices=False)
  variance = singular ** 2 / max(len(x_train) - 1, 1)
  keep = variance > _MIN_RELATIVE_VARIANCE * max(variance.max(initial=0.0), 1e-30)
  if pca_dim:
    keep &= np.arange(len(variance)) < pca_dim
  if not keep.any():   # a constant code: one (zero) column, nothing to learn from
    return lambda x: np.zeros((len(x), 1), np.float32)
  basis = vt[keep].T / np.sqrt(variance[keep])
  return lambda x: np.clip((np.asarray(x, np.float64) - mean) @ basis,
                           -_CLIP_STD, _CLIP_STD).astype(np.float32)


def _bucket(n: int) -> int:
  """Padded length for n rows: the next power of two (at least 32), so that critics
  on slightly different sample counts share one XLA compilation."""
  return max(32, 1 << (int(n) - 1).bit_length())


def _pad(x: np.ndarray, rows: int, cols: int) -> np.ndarray:
  """Zero rows (masked out) and zero columns (inert: a zero input adds nothing to
  any unit, and gets no gradient) up to a padded shape."""
  return np.pad(x, ((0, rows - x.shape[0]), (0, max(cols - x.shape[1], 0))))


def _masked_dv_bound(critic, params, x, z, partners, mask) -> jax.Array:
  """DV bound on the valid rows (mask) of padded (x, z); marginal sample k of row i
  pairs x_i with z_{partners[k, i]}, another valid row."""
  joint = critic.apply(params, x, z)
  marginal = critic.apply(params, jnp.tile(x, (partners.shape[0], 1)),
                          z[partners.reshape(-1)])
  marginal_mask = jnp.tile(mask, partners.shape[0])
  n, m = jnp.sum(mask), jnp.sum(marginal_mask)
  log_mean_exp = jax.nn.logsumexp(jnp.where(marginal_mask, marginal, -jnp.inf)) - jnp.log(m)
  return jnp.sum(jnp.where(mask, joint, 0.0)) / n - log_mean_exp


def dv_bound_from_scores(joint, marginal, weights=None):
  """DV bound mean(T_joint) - log mean(exp T_marginal) from per-row critic scores.

  joint (n,): score of each row's joint sample; marginal (K, n): its K marginal
  samples. `weights` (n,) or (B, n) count each row (a bootstrap resample); the
  result then has one bound per weight vector. Float64, with a max-shift, so
  that no score overflows.
  """
  joint = np.asarray(joint, np.float64)
  marginal = np.asarray(marginal, np.float64)
  row_lme = special.logsumexp(marginal, axis=0) - np.log(marginal.shape[0])
  single = weights is None or np.ndim(weights) == 1
  w = np.ones((1, len(joint))) if weights is None else np.atleast_2d(
      np.asarray(weights, np.float64))
  total = w.sum(axis=1)
  shift = row_lme.max()
  with np.errstate(divide="ignore", invalid="ignore"):
    bound = (w @ joint) / total - (np.log(w @ np.exp(row_lme - shift)) + shift
                                   - np.log(total))
  return float(bound[0]) if single else bound


@functools.lru_cache(maxsize=32)
def _critic_trainer(hidden: int, num_hidden_layers: int, num_steps: int,
                    batch_size: int, learning_rate: float):
  """(critic, jitted train) for these settings; cached so that every seed, term and
  evaluation with the same padded shapes reuses one compilation.

  train(key, x, z, n, partners, x_val, z_val, val_partners, val_mask) -> (best
  params, their validation bound, last-tenth training-batch bound). x and z are
  padded; batches are drawn (with replacement) from their first n rows, and each
  batch row's marginal sample takes z from one of its `partners` columns (rows
  that share no image with it), not from a shuffle of the batch: a shuffle
  would pair rows that share an image whenever the batch holds two of them.
  "Best" = highest validation bound over the steps, the initial critic included:
  early stopping is what keeps a critic that memorises its few hundred samples
  from reporting a large negative value on data it never saw.
  """
  critic = models.GlobalCritic(hidden, num_hidden_layers)
  tx = optax.adam(learning_rate)

  def train(key, x, z, n, partners, x_val, z_val, val_partners, val_mask):
    init_key, loop_key = jax.random.split(key)
    params = critic.init(init_key, x[:2], z[:2])
    validate = lambda p: _masked_dv_bound(critic, p, x_val, z_val, val_partners, val_mask)

    def step(carry, t):
      params, opt_state, best, best_value = carry
      k_batch, k_partner = jax.random.split(jax.random.fold_in(loop_key, t))
      idx = jax.random.randint(k_batch, (batch_size,), 0, n)
      other = partners[jax.random.randint(k_partner, (batch_size,), 0, partners.shape[0]),
                       idx]

      def loss_fn(p):
        scores = critic.apply(p, jnp.concatenate([x[idx], x[idx]]),
                              jnp.concatenate([z[idx], z[other]]))
        return -mi.dv_lower_bound(scores[:batch_size], scores[batch_size:])

      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      value = validate(params)
      better = value > best_value
      best = jax.tree.map(lambda new, old: jnp.where(better, new, old), params, best)
      return (params, opt_state, best, jnp.where(better, value, best_value)), -loss

    carry = (params, tx.init(params), params, validate(params))
    (_, _, best, best_value), values = jax.lax.scan(step, carry, jnp.arange(num_steps))
    return best, best_value, jnp.mean(values[-max(1, num_steps // 10):])

  return critic, jax.jit(train)


@functools.lru_cache(maxsize=32)
def _scores_fn(hidden: int, num_hidden_layers: int):
  """jitted (params, x, z, partners) -> (joint (rows,), marginal (K, rows)) scores."""
  critic = models.GlobalCritic(hidden, num_hidden_layers)

  def scores(params, x, z, partners):
    joint = critic.apply(params, x, z)
    marginal = critic.apply(params, jnp.tile(x, (partners.shape[0], 1)),
                            z[partners.reshape(-1)])
    return joint, marginal.reshape(partners.shape)
  return jax.jit(scores)


def dv_mutual_information_estimate(x_train, z_train, x_val, z_val, x_eval, z_eval, *,
                                   seed: int, settings: CriticSettings = CriticSettings(),
                                   padded_rows: tuple[int, int, int] | None = None,
                                   row_images=None, row_strata=None,
                                   return_scores: bool = False) -> dict:
  """I(x; z) in nats by a DV critic, scored on held-out samples it never saw.

  Rows of x and z are joint samples. The critic (models.GlobalCritic) is trained
  on (x_train, z_train) with the DV bound; the step with the best bound on (x_val,
  z_val) is kept; the result is that critic's DV bound on (x_eval, z_eval), with
  `settings.eval_permutations` marginal samples per held-out row. Every marginal
  sample of a row (training, validation, held-out) comes from a row that shares
  no image with it (`marginal_partners`). Inputs are whitened (PCA, at most
  settings.pca_dim components, clipped at 5 std) with training-part statistics.
  Being a bound on unseen data it is not inflated by memorisation; with nothing
  to find it is about 0 (slightly negative by noise).

  Args:
    x_train, z_train, x_val, z_val, x_eval, z_eval: the three parts' rows.
    seed: seed of the critic's initialisation, batches and marginal partners.
    settings: critic settings.
    padded_rows: (train, validation, held-out) row counts the parts are padded
      to (masked out of every bound), so that calls on different sample counts
      share one compilation; by default each part is padded to a power of two.
    row_images: per part, (n, 2) image ids of each row's x and z (see
      `marginal_conflicts`); None = every row is an independent sample.
    row_strata: per part, a stratum per row (the expression of its z image)
      within which refused marginal partners are redrawn (`marginal_partners`).
    return_scores: also return the held-out per-row scores (for a bootstrap).

  Returns:
    dict(heldout=nats, validation=nats of the chosen step, train=nats on the last
    training batches, num_train, num_validation, num_heldout, marginal_fallbacks
    of marginal_samples partners drawn outside their stratum), and with
    return_scores: joint (n_eval,), marginal (K, n_eval), partners (K, n_eval).
  """
  sizes = dict(num_train=len(x_train), num_validation=len(x_val), num_heldout=len(x_eval))
  if min(sizes.values()) < 2:
    raise ValueError(f"need at least 2 samples in every part, got {sizes}")
  n_train, n_val, n_eval = len(x_train), len(x_val), len(x_eval)
  rows_train, rows_val, rows_eval = padded_rows or tuple(
      _bucket(n) for n in (n_train, n_val, n_eval))
  if row_images is None:
    row_images = tuple(_independent_rows(n) for n in (n_train, n_val, n_eval))
  counts = (_TRAIN_PARTNERS, settings.eval_permutations, settings.eval_permutations)
  partners, fallbacks = zip(*(
      marginal_partners(row_images[part], counts[part], seed=(seed, part),
                        rows=(rows_train, rows_val, rows_eval)[part],
                        strata=None if row_strata is None else row_strata[part])
      for part in range(3)))
  fx = _standardizer(x_train, settings.pca_dim)
  fz = _standardizer(z_train, settings.pca_dim)
  # Codes narrower than pca_dim are zero-padded to it, so z_exp, z_id and the
  # projected feature all share one compiled trainer.
  cols = settings.pca_dim
  prep = lambda f, x, rows: _pad(f(x), rows, cols)
  _, train = _critic_trainer(settings.hidden, settings.num_hidden_layers,
                             settings.num_steps, settings.batch_size,
                             settings.learning_rate)
  params, val_value, train_value = train(
      jax.random.PRNGKey(seed), prep(fx, x_train, rows_train), prep(fz, z_train, rows_train),
      jnp.int32(n_train), partners[0], prep(fx, x_val, rows_val), prep(fz, z_val, rows_val),
      partners[1], np.arange(rows_val) < n_val)
  joint, marginal = _scores_fn(settings.hidden, settings.num_hidden_layers)(
      params, prep(fx, x_eval, rows_eval), prep(fz, z_eval, rows_eval), partners[2])
  joint, marginal = np.asarray(joint)[:n_eval], np.asarray(marginal)[:, :n_eval]
  result = dict(heldout=finite_or_none(dv_bound_from_scores(joint, marginal)),
                validation=finite_or_none(val_value), train=finite_or_none(train_value),
                marginal_fallbacks=int(sum(fallbacks)),
                marginal_samples=int(sum(c * n for c, n in zip(counts, (n_train, n_val,
                                                                         n_eval)))),
                **sizes)
  if return_scores:
    result.update(joint=joint, marginal=marginal, partners=partners[2][:, :n_eval])
  return result


# ----------------------------------------------------------------------------
# Calibration on Gaussians of known MI


# True MI levels of the calibration (nats): none, half and all of log 7, the
# most a pair sharing one of 7 expressions can share through its label.
CALIBRATION_LEVELS = (0.0, 0.5 * float(np.log(7)), float(np.log(7)))
# Coordinates that carry the MI: 6 = the directions that separate 7 class means.
_CORRELATED_DIMS = 6


def correlated_gaussians(n: int, x_dim: int, z_dim: int, mi_nats: float, seed,
                         correlated_dims: int = _CORRELATED_DIMS
                         ) -> tuple[np.ndarray, np.ndarray, float]:
  """(x, z, rho): n samples with I(x; z) = mi_nats exactly.

  The first k = min(correlated_dims, x_dim, z_dim) coordinates pair up as
  z_i = rho x_i + sqrt(1 - rho^2) e_i, so I = -k/2 log(1 - rho^2); the others are
  independent noise at half the scale, so that the informative directions lead
  a PCA (as an estimator's whitening keeps them when it drops components).
  """
  k = min(correlated_dims, x_dim, z_dim)
  rho = float(np.sqrt(1.0 - np.exp(-2.0 * mi_nats / k)))
  rng = np.random.default_rng(seed)
  x, z = rng.normal(size=(n, x_dim)), rng.normal(size=(n, z_dim))
  z[:, :k] = rho * x[:, :k] + np.sqrt(1.0 - rho ** 2) * z[:, :k]
  x[:, k:] *= 0.5
  z[:, k:] *= 0.5
  return x, z, rho


def calibrate_estimator(x_dim: int, z_dim: int, sizes: tuple[int, int, int], *,
                        settings: CriticSettings, levels=CALIBRATION_LEVELS, seed: int = 0,
                        padded_rows: tuple[int, int, int] | None = None) -> dict:
  """The estimator's error at known MI, at one term's widths and sample counts.

  For each true level, `correlated_gaussians` of (x_dim, z_dim) are cut into
  train/validation/held-out parts of `sizes` and estimated exactly as a term is
  (`dv_mutual_information_estimate`, then max(0, bound)): error = estimate - truth.
  Rows are independent here, while a pair term's rows reuse images, so the
  real terms see fewer independent samples than these: read the errors as the
  best case at these sizes.
  """
  rows = []
  for i, truth in enumerate(levels):
    x, z, rho = correlated_gaussians(sum(sizes), x_dim, z_dim, truth, seed=(seed, i))
    a, b = sizes[0], sizes[0] + sizes[1]
    r = dv_mutual_information_estimate(x[:a], z[:a], x[a:b], z[a:b], x[b:], z[b:],
                                       seed=seed, settings=settings, padded_rows=padded_rows)
    estimate = None if r["heldout"] is None else max(r["heldout"], 0.0)
    rows.append(dict(truth=float(truth), estimate=estimate, heldout_bound=r["heldout"],
                     error=None if estimate is None else estimate - float(truth),
                     rho=rho))
  errors = [abs(r["error"]) for r in rows if r["error"] is not None]
  return dict(levels=rows, x_dim=int(x_dim), z_dim=int(z_dim),
              correlated_dims=min(_CORRELATED_DIMS, x_dim, z_dim),
              num_train=int(sizes[0]), num_validation=int(sizes[1]),
              num_heldout=int(sizes[2]), critic_seed=int(seed),
              max_abs_error=max(errors) if errors else None)


# ----------------------------------------------------------------------------
# The modified MIG


def _mi_term(x_codes, z_codes, splits, settings: CriticSettings, description: str,
             padded_rows=None, labels=None) -> tuple[dict, list | None]:
  """One MI term over the seeds: (report, held-out scores per seed or None).

  `splits[s]` = (train, validation, held-out) parts of seed s, each part a pair
  (x image indices, z image indices) of its rows: row r is (x_codes[part[0][r]],
  z_codes[part[1][r]]). `labels` (per image) stratify the marginal partners.
  """
  per_seed = []
  for seed, parts in enumerate(splits):
    sizes = [len(p[0]) for p in parts]
    reason = (f"too few samples for a critic (train/validation/held-out {sizes}): the "
              "test split needs more images per expression and subject")
    if min(sizes) < 2:
      return unavailable(reason, mean=None, std=None, per_seed=None,
                         description=description), None
    try:
      per_seed.append(dv_mutual_information_estimate(
          *(a for p in parts for a in (x_codes[p[0]], z_codes[p[1]])), seed=seed,
          settings=settings, padded_rows=padded_rows,
          row_images=tuple(np.stack(p, axis=1) for p in parts),
          row_strata=None if labels is None else tuple(labels[p[1]] for p in parts),
          return_scores=True))
    except ValueError as e:   # a part whose rows all share images
      return unavailable(f"{reason} ({e})", mean=None, std=None, per_seed=None,
                         description=description), None
  # MI >= 0, so max(0, bound) is still a lower bound, and the tighter one: a
  # critic that found nothing that carries over to unseen pairs counts as "no
  # evidence of MI" (0), not as the arbitrary negative number it scored there.
  raw = [r["heldout"] for r in per_seed]
  values = [None if v is None else max(v, 0.0) for v in raw]
  stats = mean_std(values)
  result = dict(mean=stats["mean"], std=stats["std"], per_seed=values,
                heldout_bound_per_seed=raw,
                validation_per_seed=[r["validation"] for r in per_seed],
                train_per_seed=[r["train"] for r in per_seed],
                num_train=per_seed[0]["num_train"],
                num_validation=per_seed[0]["num_validation"],
                num_heldout=per_seed[0]["num_heldout"], description=description,
                marginal_fallback_fraction=sum(r["marginal_fallbacks"] for r in per_seed)
                / max(1, sum(r["marginal_samples"] for r in per_seed)))
  if min(result["num_validation"], result["num_heldout"]) < _FEW_SAMPLES:
    result["warning"] = (
        f"only {result['num_validation']} validation and {result['num_heldout']} held-out "
        "samples: the estimate is noisy")
  return result, [(r["joint"], r["marginal"]) for r in per_seed]


def image_splits(labels, subjects, settings: CriticSettings, seed: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(train, validation, held-out) image indices, stratified by expression and subject.

  Images, not pairs, are split: a pair whose image the critic trained on would
  let a critic that memorised that image score well on "held-out" data. Images
  are ordered by (expression, subject, random) and dealt to the parts along a
  golden-ratio sequence, so every run of that order (one person's images of one
  expression, or one expression's images) is spread over the parts in
  proportion, even when each person has a single image per expression.
  """
  labels = np.asarray(labels)
  _, subject_ids = np.unique(known_subjects(subjects), return_inverse=True)
  rng = np.random.default_rng(seed)
  order = np.lexsort((rng.random(len(labels)), subject_ids, labels))
  position = (np.arange(len(labels)) * 0.6180339887498949 + rng.random()) % 1.0
  held = settings.heldout_fraction
  val = held + (1.0 - held) * settings.validation_fraction
  part = np.where(position < held, 2, np.where(position < val, 1, 0))
  return tuple(np.sort(order[part == k]) for k in range(3))


def _bootstrap(scores: dict, owners: dict, num_images: list[int], resamples: int,
               seed: int) -> dict:
  """{term or "mig": (resamples,) seed-mean values} under resampling held-out images.

  Each seed's held-out IMAGES are drawn with replacement; a row counts as often
  as the image that owns it (a pair row's M, a single row's image) was drawn, so
  the rows of one image move together and both MIG terms see the same resample.
  Values are max(0, DV bound) per term, as reported; "mig" = exp_pair - exp_id.
  """
  rng = np.random.default_rng(seed)
  per_seed = {name: [] for name in scores}
  for s, n in enumerate(num_images):
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)
    for name, term_scores in scores.items():
      joint, marginal = term_scores[s]
      per_seed[name].append(np.maximum(
          dv_bound_from_scores(joint, marginal, counts[:, owners[name][s]]), 0.0))
  values = {name: np.mean(np.stack(v), axis=0) for name, v in per_seed.items()}
  if "exp_pair" in per_seed and "exp_id" in per_seed:
    values["mig"] = np.mean(np.stack(per_seed["exp_pair"]) - np.stack(per_seed["exp_id"]),
                            axis=0)
  return values


def _plugin_pair_bound(predictions, pair_splits) -> dict:
  """I(y^(M); y^(N)) per seed by counting, on each seed's held-out pairs."""
  per_seed = [plugin_mi.plugin_mutual_information(predictions[m], predictions[n])
              for m, n in (parts[2] for parts in pair_splits)]
  return _plugin_summary(
      per_seed, "I(y^(M); y^(N)) of the predicted expressions of the held-out pairs: "
      "by data processing at most I(z_exp(M); z_exp(N)) and I(feature(M); feature(N)), "
      "y^ being a fixed function of both")


def _plugin_identity_bound(predictions, z_id, subjects, img_splits) -> dict:
  """I(y^(X); s^(X)) per seed on the held-out images, s^ = a subject probe on z_id
  fitted on the seed's other (train and validation) test images.

  Sound as a bound on I(z_exp(X); z_id(X)): y^ is a function of z_exp, and s^ a
  function of z_id fixed before the held-out images are seen (the probe never
  fits them), so data processing applies image by image.
  """
  subjects = known_subjects(subjects)
  per_seed = []
  for train, val, held in img_splits:
    fit = np.concatenate([train, val])
    fit = fit[subjects[fit] != ""]
    if len(set(subjects[fit])) < 2:
      return unavailable("fewer than 2 known subjects among the images the subject "
                         "probe would be fitted on", mean=None, std=None, per_seed=None)
    probe = identity.fit_subject_probe(z_id[fit], subjects[fit])
    per_seed.append(plugin_mi.plugin_mutual_information(predictions[held],
                                                        probe(z_id[held])))
  return _plugin_summary(
      per_seed, "I(y^(X); s^(X)) on the held-out images: y^ = predicted expression "
      "(a function of z_exp), s^ = subject named by a linear probe on z_id fitted on "
      "the other test images of the same people; by data processing at most "
      "I(z_exp(X); z_id(X))")


def _plugin_summary(per_seed: list[dict], description: str) -> dict:
  if any(r.get("miller_madow") is None for r in per_seed):
    reason = next(r["reason"] for r in per_seed if r.get("miller_madow") is None)
    return unavailable(reason, mean=None, std=None, per_seed=None, description=description)
  stats = mean_std([r["miller_madow"] for r in per_seed])
  return dict(mean=stats["mean"], std=stats["std"],
              per_seed=[r["miller_madow"] for r in per_seed],
              plugin_per_seed=[r["plugin"] for r in per_seed],
              num_samples_per_seed=[r["num_samples"] for r in per_seed],
              estimator="plug-in MI of the label table with the Miller-Madow correction "
                        "(per_seed; plugin_per_seed without it), nats",
              description=description)


def modified_mig(labels, subjects, *, z_exp=None, z_id=None, feature=None,
                 predictions=None, missing: dict | None = None,
                 settings: CriticSettings = CriticSettings()) -> dict:
  """The source report's modified MIG, MIG = I(z_exp(M); z_exp(N)) - I(z_exp(M); z_id(M)).

  M and N are test images with the same expression and different subjects (when
  known). Each seed draws its own train/validation/held-out split of the IMAGES
  (stratified by expression and subject), pairs images within each part, trains
  fresh critics (`dv_mutual_information_estimate`) and scores them on the
  held-out part. Each term is max(0, held-out DV bound) in nats; MIG is taken per
  seed, then mean and std (ddof=1) over the seeds. Beside them:

  - interval: 95% percentile interval of the seed mean when each seed's held-out
    images are resampled (`settings.bootstrap_resamples`), critics fixed: the
    spread from which images were scored, while std is the spread over critics.
  - terms[t].plugin_bound: a counted lower bound from predicted labels (needs
    `predictions`; the identity one also known subjects).
  - calibration: the estimator's error on Gaussians of known MI at the sizes and
    widths of the pair term and of exp_id (`settings.calibrate`).

  Args:
    labels: expression label per test image.
    subjects: subject id per test image ("" = unknown).
    z_exp, z_id, feature: codes per image (rows aligned with labels); None when
      the model has no such code, with the reason in `missing[name]`.
    predictions: predicted expression per image, a fixed function of z_exp and of
      feature (stage 3's classifier of z_exp, z_exp a function of the feature; or
      the baseline's head of the feature); None = no plug-in bounds.
    missing: {"z_exp"|"z_id"|"feature": why it is absent}.
    settings: critic settings.

  Returns:
    dict(mean, std, per_seed, interval, terms={exp_pair, exp_id, feature_pair},
    calibration, settings, and `reason` when MIG is null). `feature_pair` =
    I(feature(M); feature(N)) is the term every method has (the pooled encoder
    feature).
  """
  missing = dict(missing or {})
  labels = np.asarray(labels)
  img_splits = [image_splits(labels, subjects, settings, seed)
                for seed in range(settings.num_seeds)]
  pair_splits = [
      tuple(same_expression_pairs(labels, subjects, pairs_per_image=settings.pairs_per_image,
                                  seed=1000 * seed + part, indices=idx)
            for part, idx in enumerate(parts))
      for seed, parts in enumerate(img_splits)]
  # The exp-id term needs no partner: each image once, (z_exp(X), z_id(X)).
  single_splits = [tuple((idx, idx) for idx in parts) for parts in img_splits]
  # One padded shape for every term and seed: one compilation per evaluation.
  padded_rows = tuple(_bucket(max(len(s[part][0]) for s in pair_splits + single_splits))
                      for part in range(3))
  terms, scores = {}, {}

  def pair_term(codes, name):
    description = f"I({name}(M); {name}(N))"
    if codes is None:
      return unavailable(missing.get(name, f"no {name}"), mean=None, std=None,
                         per_seed=None, description=description), None
    codes = np.asarray(codes)
    return _mi_term(codes, codes, pair_splits, settings, description, padded_rows, labels)

  terms["exp_pair"], scores["exp_pair"] = pair_term(z_exp, "z_exp")
  if z_exp is None or z_id is None:
    absent = "z_id" if z_id is None else "z_exp"
    terms["exp_id"] = unavailable(missing.get(absent, f"no {absent}"), mean=None, std=None,
                                  per_seed=None, description="I(z_exp(M); z_id(M))")
    scores["exp_id"] = None
  else:
    terms["exp_id"], scores["exp_id"] = _mi_term(
        np.asarray(z_exp), np.asarray(z_id), single_splits, settings,
        "I(z_exp(M); z_id(M))", padded_rows, labels)
  terms["feature_pair"], scores["feature_pair"] = pair_term(feature, "feature")

  result = dict(terms=terms, settings=settings.as_dict(), num_images=int(len(labels)),
                cross_subject_pairs=bool(np.all(known_subjects(subjects) != "")),
                marginal_samples=(
                    "each row's marginal samples come from rows sharing no image with "
                    "it and never form a listed pair"))
  a, b = terms["exp_pair"]["per_seed"], terms["exp_id"]["per_seed"]
  if a is None or b is None:
    reason = "; ".join(dict.fromkeys(terms[t]["reason"] for t in ("exp_id", "exp_pair")
                                     if "reason" in terms[t]))
    result.update(mean=None, std=None, per_seed=None, reason=reason)
  else:
    per_seed = [x - y if x is not None and y is not None else None for x, y in zip(a, b)]
    result.update(per_seed=per_seed, **{k: v for k, v in mean_std(per_seed).items()
                                        if k != "n"})

  # Spread over the held-out images.
  present = {t: s for t, s in scores.items() if s is not None}
  result["interval"] = None
  if settings.bootstrap_resamples and present:
    owners = {}
    for t in present:
      rows = [(parts[2] if t == "exp_id" else pairs[2])[0]
              for parts, pairs in zip(single_splits, pair_splits)]
      owners[t] = [np.searchsorted(img[2], r) for img, r in zip(img_splits, rows)]
    values = _bootstrap(present, owners, [len(img[2]) for img in img_splits],
                        settings.bootstrap_resamples, seed=0)
    what = (f"95% percentile interval of the seed mean over "
            f"{settings.bootstrap_resamples} resamples of the held-out images (critics "
            "fixed)")
    for t, v in values.items():
      interval = dict(percentile_interval(v), what=what)
      if t == "mig":
        result["interval"] = interval
      else:
        terms[t]["interval"] = interval

  # Counted bounds from predicted labels.
  if predictions is not None:
    predictions = np.asarray(predictions)
    pair_bound = _plugin_pair_bound(predictions, pair_splits)
    for t in ("exp_pair", "feature_pair"):
      if scores[t] is not None:
        terms[t]["plugin_bound"] = pair_bound
    if scores["exp_id"] is not None:
      terms["exp_id"]["plugin_bound"] = _plugin_identity_bound(
          predictions, np.asarray(z_id), subjects, img_splits)

  # The estimator's error where the truth is known.
  if not settings.calibrate:
    result["calibration"] = unavailable(
        "turned off (config.eval.mig.calibrate=False)", levels=None)
  elif all(scores[t] is None for t in ("exp_pair", "feature_pair", "exp_id")):
    result["calibration"] = unavailable("no term was estimated", levels=None)
  else:
    result["calibration"] = {}
    pair_name = "exp_pair" if z_exp is not None else "feature_pair"
    widths = dict(exp_pair=(z_exp, z_exp), feature_pair=(feature, feature),
                  exp_id=(z_exp, z_id))
    for t in (pair_name, "exp_id"):
      if scores[t] is None:
        continue
      x, z = widths[t]
      result["calibration"][t] = calibrate_estimator(
          np.shape(x)[1], np.shape(z)[1],
          (terms[t]["num_train"], terms[t]["num_validation"], terms[t]["num_heldout"]),
          settings=settings, padded_rows=padded_rows)
  return result
