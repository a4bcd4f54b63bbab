"""Mutual information by a freshly trained Donsker-Varadhan critic, and the
modified MIG built on it.

- `dv_mutual_information_estimate`: I(x; z) of paired samples, by a critic
  trained on one part of them and scored on a part it never saw.
- `modified_mig`: the source report's MIG = I(z_exp(M); z_exp(N)) -
  I(z_exp(M); z_id(M)) on test pairs of the same expression and different people.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dicefer_jax import mi, models
from dicefer_jax.evaluation.common import finite_or_none, known_subjects, mean_std, unavailable


def same_expression_pairs(labels, subjects, *, pairs_per_image: int, seed: int,
                          indices=None) -> tuple[np.ndarray, np.ndarray]:
  """Index pairs (M, N) with the same label and, where both subjects are known,
  different subjects; up to `pairs_per_image` partners N per image M.

  Unlike the training pairs there is no same-subject fallback: a pair of one
  person's images shares identity as well as expression, which would inflate
  I(z_exp(M); z_exp(N)) with exactly the information the metric should not reward.
  `indices` restricts both M and N to a subset of the images.
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
    eval_permutations: derangements whose marginal samples are pooled when a bound
      is computed on validation or held-out data (less log-mean-exp variance).
    pca_dim: inputs are whitened by PCA on the training part, keeping at most
      this many components (0 = all). A deterministic projection can only lower
      MI, so the estimate stays a lower bound, and the critic has far fewer
      weights with which to memorise a few hundred samples.
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


@functools.lru_cache(maxsize=32)
def _critic_trainer(hidden: int, num_hidden_layers: int, num_steps: int,
                    batch_size: int, learning_rate: float):
  """(critic, jitted train) for these settings; cached so that every seed, term and
  evaluation with the same padded shapes reuses one compilation.

  train(key, x, z, n, x_val, z_val, val_partners, val_mask) -> (best params, their
  validation bound, last-tenth training-batch bound). x and z are padded; batches
  are drawn (with replacement) from their first n rows. "Best" = highest
  validation bound over the steps, the initial critic included: early stopping is
  what keeps a critic that memorises its few hundred samples from reporting a
  large negative value on data it never saw.
  """
  critic = models.GlobalCritic(hidden, num_hidden_layers)
  tx = optax.adam(learning_rate)

  def train(key, x, z, n, x_val, z_val, val_partners, val_mask):
    init_key, loop_key = jax.random.split(key)
    params = critic.init(init_key, x[:2], z[:2])
    validate = lambda p: _masked_dv_bound(critic, p, x_val, z_val, val_partners, val_mask)

    def step(carry, t):
      params, opt_state, best, best_value = carry
      k_batch, k_perm = jax.random.split(jax.random.fold_in(loop_key, t))
      idx = jax.random.randint(k_batch, (batch_size,), 0, n)
      perm = mi.marginal_permutation(k_perm, batch_size)

      def loss_fn(p):
        score = lambda a, b: critic.apply(p, a, b)
        return -mi.dv_mutual_information(score, x[idx], z[idx], perm)

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


def _other_rows(rng: np.random.Generator, n: int, rows: int, count: int) -> np.ndarray:
  """(count, rows) partner indices: for each valid row i < n, a uniformly drawn
  other valid row (never i itself); padding rows point at row 0."""
  partners = np.zeros((count, rows), np.int32)
  shift = rng.integers(1, n, size=(count, n))
  partners[:, :n] = (np.arange(n) + shift) % n
  return partners


@functools.lru_cache(maxsize=32)
def _bound_fn(hidden: int, num_hidden_layers: int):
  critic = models.GlobalCritic(hidden, num_hidden_layers)
  return jax.jit(functools.partial(_masked_dv_bound, critic))


def dv_mutual_information_estimate(x_train, z_train, x_val, z_val, x_eval, z_eval, *,
                                   seed: int, settings: CriticSettings = CriticSettings(),
                                   padded_rows: tuple[int, int, int] | None = None) -> dict:
  """I(x; z) in nats by a DV critic, scored on held-out samples it never saw.

  Rows of x and z are joint samples. The critic (models.GlobalCritic) is trained
  on (x_train, z_train) with the DV bound (mi.dv_mutual_information over
  mi.marginal_permutation marginals); the step with the best bound on (x_val,
  z_val) is kept; the result is that critic's DV bound on (x_eval, z_eval), with
  marginal samples from `settings.eval_permutations` derangements
  (mi.marginal_permutation) of the held-out rows. Inputs are whitened (PCA, at
  most settings.pca_dim components, clipped at 5 std) with training-part statistics.
  Being a bound on unseen data it is not inflated by memorisation; with nothing
  to find it is about 0 (slightly negative by noise).

  `padded_rows` (train, validation, held-out) pads the parts to fixed row counts
  (masked out of every bound) so that calls on different sample counts share
  one compilation; by default each part is padded to a power of two.

  Returns:
    dict(heldout=nats, validation=nats of the chosen step, train=nats on the last
    training batches, num_train, num_validation, num_heldout).
  """
  sizes = dict(num_train=len(x_train), num_validation=len(x_val), num_heldout=len(x_eval))
  if min(sizes.values()) < 2:
    raise ValueError(f"need at least 2 samples in every part, got {sizes}")
  n_train, n_val, n_eval = len(x_train), len(x_val), len(x_eval)
  rows_train, rows_val, rows_eval = padded_rows or tuple(
      _bucket(n) for n in (n_train, n_val, n_eval))
  fx = _standardizer(x_train, settings.pca_dim)
  fz = _standardizer(z_train, settings.pca_dim)
  # Codes narrower than pca_dim are zero-padded to it, so z_exp, z_id and the
  # projected feature all share one compiled trainer.
  cols = settings.pca_dim
  prep = lambda f, x, rows: _pad(f(x), rows, cols)
  critic, train = _critic_trainer(settings.hidden, settings.num_hidden_layers,
                                  settings.num_steps, settings.batch_size,
                                  settings.learning_rate)
  rng = np.random.default_rng(seed)
  key = jax.random.PRNGKey(seed)
  params, val_value, train_value = train(
      key, prep(fx, x_train, rows_train), prep(fz, z_train, rows_train), jnp.int32(n_train),
      prep(fx, x_val, rows_val), prep(fz, z_val, rows_val),
      _other_rows(rng, n_val, rows_val, settings.eval_permutations),
      np.arange(rows_val) < n_val)
  # Held-out marginals: derangements of the held-out rows, as in training.
  perms = np.zeros((settings.eval_permutations, rows_eval), np.int32)
  for i, k in enumerate(jax.random.split(jax.random.fold_in(key, 1),
                                         settings.eval_permutations)):
    perms[i, :n_eval] = np.asarray(mi.marginal_permutation(k, n_eval))
  heldout = _bound_fn(settings.hidden, settings.num_hidden_layers)(
      params, prep(fx, x_eval, rows_eval), prep(fz, z_eval, rows_eval), perms,
      np.arange(rows_eval) < n_eval)
  del critic
  return dict(heldout=finite_or_none(heldout), validation=finite_or_none(val_value),
              train=finite_or_none(train_value), **sizes)


def _mi_term(x_of, z_of, splits, settings: CriticSettings, description: str,
             padded_rows=None) -> dict:
  """One MI term over the seeds: `splits[s]` = (train, validation, held-out) row sets
  of seed s, and x_of/z_of map a row set to arrays."""
  per_seed = []
  for seed, parts in enumerate(splits):
    sizes = [len(x_of(p)) for p in parts]
    if min(sizes) < 2:
      return unavailable(
          f"too few samples for a critic (train/validation/held-out {sizes}): the "
          "test split needs more images per expression and subject",
          mean=None, std=None, per_seed=None, description=description)
    per_seed.append(dv_mutual_information_estimate(
        *(a for p in parts for a in (x_of(p), z_of(p))), seed=seed, settings=settings,
        padded_rows=padded_rows))
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
                num_heldout=per_seed[0]["num_heldout"], description=description)
  if min(result["num_validation"], result["num_heldout"]) < _FEW_SAMPLES:
    result["warning"] = (
        f"only {result['num_validation']} validation and {result['num_heldout']} held-out "
        "samples: the estimate is noisy")
  return result


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


def modified_mig(labels, subjects, *, z_exp=None, z_id=None, feature=None,
                 missing: dict | None = None,
                 settings: CriticSettings = CriticSettings()) -> dict:
  """The source report's modified MIG, MIG = I(z_exp(M); z_exp(N)) - I(z_exp(M); z_id(M)).

  M and N are test images with the same expression and different subjects (when
  known). Each seed draws its own train/validation/held-out split of the IMAGES
  (stratified by expression and subject), pairs images within each part, trains
  fresh critics (`dv_mutual_information_estimate`) and scores them on the
  held-out part. Each term is max(0, held-out DV bound) in nats; MIG is taken per
  seed, then mean and std (ddof=1) over the seeds.

  Args:
    labels: expression label per test image.
    subjects: subject id per test image ("" = unknown).
    z_exp, z_id, feature: codes per image (rows aligned with labels); None when
      the model has no such code, with the reason in `missing[name]`.
    missing: {"z_exp"|"z_id"|"feature": why it is absent}.
    settings: critic settings.

  Returns:
    dict(mean, std, per_seed, terms={exp_pair, exp_id, feature_pair}, settings,
    and `reason` when MIG is null). `feature_pair` = I(feature(M); feature(N)) is
    the term every method has (the pooled encoder feature).
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
  single_splits = [tuple((idx,) for idx in parts) for parts in img_splits]
  # One padded shape for every term and seed: one compilation per evaluation.
  padded_rows = tuple(_bucket(max(len(s[part][0]) for s in pair_splits + single_splits))
                      for part in range(3))

  def pair_term(codes, name):
    description = f"I({name}(M); {name}(N))"
    if codes is None:
      return unavailable(missing.get(name, f"no {name}"), mean=None, std=None,
                         per_seed=None, description=description)
    codes = np.asarray(codes)
    return _mi_term(lambda rows: codes[rows[0]], lambda rows: codes[rows[1]],
                    pair_splits, settings, description, padded_rows)

  terms = dict(exp_pair=pair_term(z_exp, "z_exp"))
  if z_exp is None or z_id is None:
    absent = "z_id" if z_id is None else "z_exp"
    terms["exp_id"] = unavailable(missing.get(absent, f"no {absent}"), mean=None, std=None,
                                  per_seed=None, description="I(z_exp(M); z_id(M))")
  else:
    ze, zi = np.asarray(z_exp), np.asarray(z_id)
    terms["exp_id"] = _mi_term(lambda rows: ze[rows[0]], lambda rows: zi[rows[0]],
                               single_splits, settings, "I(z_exp(M); z_id(M))",
                               padded_rows)
  terms["feature_pair"] = pair_term(feature, "feature")

  result = dict(terms=terms, settings=settings.as_dict(), num_images=int(len(labels)),
                cross_subject_pairs=bool(np.all(known_subjects(subjects) != "")))
  a, b = terms["exp_pair"]["per_seed"], terms["exp_id"]["per_seed"]
  if a is None or b is None:
    reason = "; ".join(dict.fromkeys(terms[t]["reason"] for t in ("exp_id", "exp_pair")
                                     if "reason" in terms[t]))
    result.update(mean=None, std=None, per_seed=None, reason=reason)
  else:
    per_seed = [x - y if x is not None and y is not None else None for x, y in zip(a, b)]
    result.update(per_seed=per_seed, **{k: v for k, v in mean_std(per_seed).items()
                                        if k != "n"})
  return result
