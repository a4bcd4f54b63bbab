"""Disentanglement metrics on constructed codes whose right answer is known."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dicefer_jax import mi, models, plots
from dicefer_jax.evaluation import (common, embedding, identity, mi_estimation, plugin_mi,
                                    retrieval)

# Few seeds, no calibration (tested on its own) and the default critic
# otherwise: every MI test below shares one compiled critic trainer (same
# settings, same padded shapes).
SETTINGS = mi_estimation.CriticSettings(num_seeds=2, calibrate=False)


def _grid(num_subjects=10, per_cell=2, num_classes=7):
  """Every subject shows every expression per_cell times: label and subject are
  independent by construction."""
  subjects = np.repeat(np.arange(num_subjects), num_classes * per_cell)
  labels = np.tile(np.repeat(np.arange(num_classes), per_cell), num_subjects)
  return labels, subjects, [f"s{s}" for s in subjects]


def _gaussians(n, rho, d=2, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d))
  return x, rho * x + np.sqrt(1 - rho ** 2) * rng.normal(size=(n, d))


def _estimate(x, z, seed=0):
  n = len(x)
  a, b = n // 2, n // 2 + n // 6
  return mi_estimation.dv_mutual_information_estimate(
      x[:a], z[:a], x[a:b], z[a:b], x[b:], z[b:], seed=seed, settings=SETTINGS)


# ----------------------------------------------------------------------------
# Pairs and splits


def test_pairs_share_the_expression_and_never_the_subject():
  labels, _, subjects = _grid(num_subjects=4, per_cell=3)
  m, n = mi_estimation.same_expression_pairs(labels, subjects, pairs_per_image=3, seed=0)
  assert len(m) == 3 * len(labels)
  assert np.all(labels[m] == labels[n])
  assert all(subjects[i] != subjects[j] for i, j in zip(m, n))
  # Restricted to a subset: both ends stay inside it.
  subset = np.arange(0, len(labels), 2)
  m, n = mi_estimation.same_expression_pairs(labels, subjects, pairs_per_image=2, seed=0,
                                          indices=subset)
  assert set(m) | set(n) <= set(subset)


def test_pairs_of_unknown_subjects_exclude_only_the_image_itself():
  labels = np.array([0, 0, 0, 1, 1])
  m, n = mi_estimation.same_expression_pairs(labels, [""] * 5, pairs_per_image=5, seed=0)
  assert np.all(m != n) and np.all(labels[m] == labels[n])
  assert len(m) == 3 * 2 + 2 * 1
  # One known subject alone in its class: no partner at all (no fallback).
  m, _ = mi_estimation.same_expression_pairs(np.array([0, 0]), ["a", "a"], pairs_per_image=1,
                                          seed=0)
  assert len(m) == 0


def test_image_splits_partition_every_expression_and_subject():
  labels, _, subjects = _grid(num_subjects=10, per_cell=1)
  train, val, held = mi_estimation.image_splits(labels, subjects, SETTINGS, seed=3)
  everything = np.concatenate([train, val, held])
  assert sorted(everything) == list(range(len(labels)))
  assert len(held) == pytest.approx(SETTINGS.heldout_fraction * len(labels), abs=3)
  # One image per (subject, expression), yet every expression reaches every part
  # (even validation, 15% of 10 images per expression).
  for part in (train, val, held):
    assert set(labels[part]) == set(range(7))


# ----------------------------------------------------------------------------
# Mutual information


def test_masked_bound_on_padded_rows_equals_the_plain_dv_bound():
  critic = models.GlobalCritic(hidden=8)
  rng = np.random.default_rng(0)
  x, z = rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=(5, 2)).astype(np.float32)
  params = critic.init(jax.random.PRNGKey(0), x, z)
  perm = np.asarray(mi.marginal_permutation(jax.random.PRNGKey(1), 5))
  plain = mi.dv_lower_bound(critic.apply(params, x, z), critic.apply(params, x, z[perm]))
  pad = lambda a: np.concatenate([a, 100 * np.ones((3, a.shape[1]), np.float32)])
  partners = np.concatenate([perm, np.zeros(3, int)])[None]
  masked = mi_estimation._masked_dv_bound(critic, params, pad(x), pad(z), jnp.asarray(partners),
                                       np.arange(8) < 5)
  np.testing.assert_allclose(masked, plain, rtol=1e-5, atol=1e-6)


def test_independent_gaussians_have_mutual_information_near_zero():
  x, _ = _gaussians(600, 0.0, seed=1)
  _, z = _gaussians(600, 0.0, seed=2)
  for seed in range(2):
    result = _estimate(x, z, seed)
    assert abs(result["heldout"]) < 0.1, result


def test_correlated_gaussians_have_clearly_positive_mutual_information():
  rho, d = 0.9, 2
  truth = -d / 2 * np.log(1 - rho ** 2)   # 1.66 nats
  x, z = _gaussians(600, rho)
  result = _estimate(x, z)
  # A held-out lower bound: clearly positive, not above the truth (+ noise).
  assert 0.6 * truth < result["heldout"] < truth + 0.15, result
  assert result["num_train"] == 300 and result["num_heldout"] == 200


def test_mig_is_high_for_expression_codes_and_drops_when_they_carry_identity():
  labels, subject_idx, subjects = _grid(num_subjects=10, per_cell=2)
  rng = np.random.default_rng(0)
  z_exp = np.eye(7)[labels] + 0.1 * rng.normal(size=(len(labels), 7))
  z_id = np.eye(10)[subject_idx] + 0.1 * rng.normal(size=(len(labels), 10))
  clean = mi_estimation.modified_mig(labels, subjects, z_exp=z_exp, z_id=z_id,
                                  feature=z_exp, settings=SETTINGS)
  # The pair shares the expression (log 7 = 1.95 nats at most); z_exp and z_id
  # are independent by construction.
  assert clean["terms"]["exp_pair"]["mean"] > 1.0, clean
  # ... and not above it: marginal samples that left out rows sharing an image
  # with no compensation lacked same-expression pairs, and overshot (2.2 nats).
  assert clean["terms"]["exp_pair"]["mean"] < np.log(7) + 0.1, clean
  assert abs(clean["terms"]["exp_id"]["mean"]) < 0.15, clean
  assert clean["mean"] == pytest.approx(
      clean["terms"]["exp_pair"]["mean"] - clean["terms"]["exp_id"]["mean"], abs=1e-6)
  assert len(clean["per_seed"]) == SETTINGS.num_seeds and clean["std"] is not None
  # Each term is max(0, held-out bound); the raw bounds are kept beside it.
  for term in clean["terms"].values():
    assert all(v == max(b, 0.0) for v, b in zip(term["per_seed"],
                                                 term["heldout_bound_per_seed"]))
  assert clean["settings"]["num_steps"] == SETTINGS.num_steps
  assert clean["cross_subject_pairs"]

  leaky_exp = np.concatenate([z_exp, z_id], axis=1)
  leaky = mi_estimation.modified_mig(labels, subjects, z_exp=leaky_exp, z_id=z_id,
                                  feature=leaky_exp, settings=SETTINGS)
  assert leaky["terms"]["exp_id"]["mean"] > 1.0, leaky
  assert leaky["mean"] < clean["mean"] - 0.5


def test_mig_without_codes_is_null_with_the_reason_and_keeps_the_feature_term():
  labels, _, subjects = _grid(num_subjects=10, per_cell=2)
  feature = np.random.default_rng(0).normal(size=(len(labels), 16))
  result = mi_estimation.modified_mig(
      labels, subjects, feature=feature, settings=SETTINGS,
      missing=dict(z_exp="no expression code here", z_id="no identity encoder here"))
  assert result["mean"] is None and result["per_seed"] is None
  assert "no expression code here" in result["reason"]
  assert result["terms"]["exp_id"]["mean"] is None
  assert result["terms"]["feature_pair"]["mean"] is not None


def test_mig_on_too_few_images_is_null_not_an_error():
  labels = np.array([0, 0, 1, 1])
  result = mi_estimation.modified_mig(labels, ["a", "b", "a", "b"], z_exp=np.eye(4),
                                   z_id=np.eye(4), feature=np.eye(4), settings=SETTINGS)
  assert result["mean"] is None and "too few" in result["reason"]


def _pair_rows(num_subjects=6, per_cell=3, pairs_per_image=4):
  labels, _, subjects = _grid(num_subjects=num_subjects, per_cell=per_cell)
  m, n = mi_estimation.same_expression_pairs(labels, subjects,
                                             pairs_per_image=pairs_per_image, seed=0)
  return labels, np.stack([m, n], axis=1)


def _bad_marginals(rows, partners):
  """(i, j) where (x_i, z_j) shares an image with row i, or is a listed pair
  (in either order), checked the slow way."""
  listed = {(a, b) for a, b in rows} | {(b, a) for a, b in rows}
  bad = []
  for k in range(partners.shape[0]):
    for i in range(len(rows)):
      j = partners[k, i]
      if set(rows[i]) & set(rows[j]) or (rows[i][0], rows[j][1]) in listed:
        bad.append((i, j))
  return bad


def test_marginal_samples_never_share_an_image_nor_form_a_joint_pair():
  """Bug caught: marginal samples taken from a shuffle of pair rows in which every
  image appears ~8 times, so that x_i met the code of its own image, of its own
  partner, or of another of its listed partners (a joint pair) in the DV bound's
  log-mean-exp."""
  labels, rows = _pair_rows()
  # Today's shuffle (any other row) does hit such rows: the check can fail.
  shuffle = np.asarray(jax.vmap(lambda k: mi.marginal_permutation(k, len(rows)))(
      jax.random.split(jax.random.PRNGKey(0), 10)))
  assert _bad_marginals(rows, shuffle)
  partners, _ = mi_estimation.marginal_partners(rows, 10, seed=0, strata=labels[rows[:, 1]],
                                                rows=len(rows) + 7)
  assert partners.shape == (10, len(rows) + 7) and not partners[:, len(rows):].any()
  assert not _bad_marginals(rows, partners[:, :len(rows)])
  # The held-out marginals the estimator actually scores obey the same rule.
  codes = np.random.default_rng(0).normal(size=(len(labels), 3))
  parts = np.array_split(np.random.default_rng(1).permutation(len(rows)), 3)
  result = mi_estimation.dv_mutual_information_estimate(
      *(a for p in parts for a in (codes[rows[p, 0]], codes[rows[p, 1]])), seed=0,
      settings=SETTINGS, row_images=tuple(rows[p] for p in parts),
      row_strata=tuple(labels[rows[p, 1]] for p in parts), return_scores=True)
  assert result["partners"].shape == (SETTINGS.eval_permutations, len(parts[2]))
  assert not _bad_marginals(rows[parts[2]], result["partners"])
  assert result["marginal"].shape == result["partners"].shape


def test_refused_marginal_partners_are_redrawn_within_their_expression():
  """Bug caught: refusing partners (all of the row's own expression) and
  redrawing from every row, which starves the marginals of same-expression pairs
  and pushes the DV bound above the truth."""
  labels, rows = _pair_rows(num_subjects=6, per_cell=2)
  z_label = labels[rows[:, 1]]
  partners, fallbacks = mi_estimation.marginal_partners(rows, 200, seed=0, strata=z_label)
  same = np.mean(z_label[partners] == z_label[None, :])
  # Independent draws of two rows share the expression 1/7 of the time.
  assert same == pytest.approx(1 / 7, abs=0.01) and fallbacks == 0
  unstratified, _ = mi_estimation.marginal_partners(rows, 200, seed=0)
  assert np.mean(z_label[unstratified] == z_label[None, :]) < 1 / 7 - 0.03


def test_marginal_partners_of_independent_rows_are_any_other_row():
  rows = np.repeat(np.arange(5)[:, None], 2, axis=1)
  partners, _ = mi_estimation.marginal_partners(rows, 50, seed=0)
  assert np.all(partners != np.arange(5)) and set(partners.ravel()) == set(range(5))
  with pytest.raises(ValueError, match="shares an image with every other row"):
    mi_estimation.marginal_partners(np.array([[0, 1], [1, 2]]), 1, seed=0)


def test_weighted_dv_bound_equals_the_bound_on_repeated_rows():
  """The bootstrap's weighted bound is the DV bound of the resampled rows."""
  rng = np.random.default_rng(0)
  joint, marginal = rng.normal(size=6), 3 * rng.normal(size=(4, 6))
  counts = np.array([2, 0, 1, 3, 0, 0])
  repeated = np.repeat(np.arange(6), counts)
  expected = mi_estimation.dv_bound_from_scores(joint[repeated], marginal[:, repeated])
  weighted = mi_estimation.dv_bound_from_scores(joint, marginal, counts[None])
  np.testing.assert_allclose(weighted, [expected], rtol=1e-12)
  # Unweighted: the plain DV bound over all K x n marginal scores.
  plain = np.mean(joint) - (np.log(np.mean(np.exp(marginal))))
  assert mi_estimation.dv_bound_from_scores(joint, marginal) == pytest.approx(plain)


def test_calibration_error_is_small_at_zero_and_the_estimate_stays_below_high_truth():
  """Bug caught: a calibration that is not the estimator's (other sizes, or MI
  that is not the stated truth), or an estimator that overshoots known MI."""
  levels = (0.0, 2.0)
  result = mi_estimation.calibrate_estimator(4, 3, (300, 100, 200), settings=SETTINGS,
                                             levels=levels)
  zero, high = result["levels"]
  assert zero["truth"] == 0.0 and abs(zero["error"]) < 0.1, result
  assert 0.5 * high["truth"] < high["estimate"] < high["truth"], result
  assert high["error"] == pytest.approx(high["estimate"] - 2.0)
  assert (result["num_train"], result["num_validation"], result["num_heldout"]) == (
      300, 100, 200)
  assert result["correlated_dims"] == 3 and result["max_abs_error"] == pytest.approx(
      max(abs(zero["error"]), abs(high["error"])))
  # The data's MI is the stated truth: -k/2 log(1 - rho^2) with the sample's rho.
  x, z, rho = mi_estimation.correlated_gaussians(20000, 4, 3, 2.0, seed=0)
  assert -3 / 2 * np.log(1 - rho ** 2) == pytest.approx(2.0)
  assert np.corrcoef(x[:, 0], z[:, 0])[0, 1] == pytest.approx(rho, abs=0.01)
  assert abs(np.corrcoef(x[:, 3], z[:, 0])[0, 1]) < 0.03


def test_mig_reports_calibration_at_its_terms_sizes_bootstrap_and_plugin_bounds():
  """Bug caught: calibration at other sizes or widths than the terms it vouches
  for, a bootstrap that drops the MIG's covariance, plug-in bounds missing."""
  labels, subject_idx, subjects = _grid(num_subjects=10, per_cell=2)
  rng = np.random.default_rng(0)
  z_exp = np.eye(7)[labels] + 0.1 * rng.normal(size=(len(labels), 7))
  z_id = np.eye(10)[subject_idx] + 0.1 * rng.normal(size=(len(labels), 10))
  settings = dataclasses.replace(SETTINGS, calibrate=True)
  result = mi_estimation.modified_mig(labels, subjects, z_exp=z_exp, z_id=z_id,
                                      feature=z_exp, predictions=labels, settings=settings)
  terms = result["terms"]
  for name, widths in (("exp_pair", (7, 7)), ("exp_id", (7, 10))):
    c = result["calibration"][name]
    assert (c["x_dim"], c["z_dim"]) == widths
    assert (c["num_train"], c["num_validation"], c["num_heldout"]) == tuple(
        terms[name][k] for k in ("num_train", "num_validation", "num_heldout"))
    assert [l["truth"] for l in c["levels"]] == pytest.approx([0, np.log(7) / 2, np.log(7)])
  assert "feature_pair" not in result["calibration"]
  # Intervals: resampled held-out images; the MIG's from the same resamples.
  for stats in (result, terms["exp_pair"], terms["exp_id"]):
    interval = stats["interval"]
    assert interval["low"] <= interval["high"] and interval["resamples"] == 200
  assert result["interval"]["low"] <= result["mean"] + 0.3
  assert result["interval"]["high"] >= result["mean"] - 0.3
  # Perfect predictions: the label pair table holds log 7; subjects and
  # expressions are independent by construction: ~0 for the identity bound.
  pair = terms["exp_pair"]["plugin_bound"]
  assert pair["mean"] == pytest.approx(np.log(7), abs=0.05) and len(pair["per_seed"]) == 2
  assert terms["feature_pair"]["plugin_bound"] == pair
  assert abs(terms["exp_id"]["plugin_bound"]["mean"]) < 0.15
  off = mi_estimation.modified_mig(labels, subjects, z_exp=z_exp, z_id=z_id, feature=z_exp,
                                   settings=dataclasses.replace(SETTINGS,
                                                                bootstrap_resamples=0))
  assert "turned off" in off["calibration"]["reason"] and off["interval"] is None
  assert "plugin_bound" not in off["terms"]["exp_pair"]


def test_plugin_mutual_information_matches_a_hand_computed_table():
  # Counts [[3, 1], [1, 3]] of 8 samples: p = [[3/8, 1/8], [1/8, 3/8]], margins 1/2.
  a = [0, 0, 0, 0, 1, 1, 1, 1]
  b = [0, 0, 0, 1, 0, 1, 1, 1]
  expected = 2 * 3 / 8 * np.log((3 / 8) / (1 / 4)) + 2 * 1 / 8 * np.log((1 / 8) / (1 / 4))
  result = plugin_mi.plugin_mutual_information(a, b)
  np.testing.assert_array_equal(plugin_mi.contingency_table(a, b), [[3, 1], [1, 3]])
  assert result["plugin"] == pytest.approx(expected)
  # Miller-Madow: + (m_a - 1 + m_b - 1 - (m_ab - 1)) / 2N = (1 + 1 - 3) / 16.
  assert result["miller_madow"] == pytest.approx(expected - 1 / 16)
  assert result["num_samples"] == 8 and result["nonzero_cells"] == 4
  # A copy: I = H = log 2, one bin fewer per variable than cells of a full table.
  copy = plugin_mi.plugin_mutual_information(["x", "y", "x", "y"], ["p", "q", "p", "q"])
  assert copy["plugin"] == pytest.approx(np.log(2))
  assert copy["miller_madow"] == pytest.approx(np.log(2) + 1 / 8)
  # Independent 3 x 2 table, uniform: 0, and the correction goes negative.
  ind = plugin_mi.plugin_mutual_information(np.repeat([0, 1, 2], 2), np.tile([0, 1], 3))
  assert ind["plugin"] == pytest.approx(0.0, abs=1e-12)
  assert ind["miller_madow"] == pytest.approx((2 + 1 - 5) / 12)
  assert plugin_mi.plugin_mutual_information([1], [1])["miller_madow"] is None
  with pytest.raises(ValueError):
    plugin_mi.plugin_mutual_information([1, 2], [1, 2, 3])


# ----------------------------------------------------------------------------
# Identity leakage


def test_split_within_subjects_keeps_every_subject_and_matches_expressions():
  labels, _, subjects = _grid(num_subjects=5, per_cell=2)
  train, test = identity.split_within_subjects(subjects, labels, 0.5, seed=0)
  assert not set(train) & set(test) and len(train) + len(test) == len(labels)
  subjects = np.array(subjects)
  for s in set(subjects):
    a, b = train[subjects[train] == s], test[subjects[test] == s]
    assert len(a) and len(b)
    # Same expression mix on both sides (2 images per expression: one each).
    assert sorted(labels[a]) == sorted(labels[b])


def test_codes_that_copy_the_subject_leak_identity_completely():
  labels, subject_idx, subjects = _grid(num_subjects=10, per_cell=2)
  result = identity.identity_probe(np.eye(10)[subject_idx], subjects, labels)
  assert result["accuracy"] >= 0.95
  assert result["chance"] == pytest.approx(0.1) and result["chance_uniform"] == 0.1
  assert result["num_subjects"] == 10 and result["num_test"] == len(labels) // 2


def test_random_codes_leak_identity_only_at_chance():
  labels, _, subjects = _grid(num_subjects=10, per_cell=4)
  codes = np.random.default_rng(0).normal(size=(len(labels), 8))
  result = identity.identity_probe(codes, subjects, labels)
  assert result["accuracy"] < result["chance"] + 0.1, result


def test_expression_codes_do_not_leak_identity():
  """Pure expression codes: subjects pose the same expressions, so nothing to find."""
  labels, _, subjects = _grid(num_subjects=8, per_cell=2)
  result = identity.identity_probe(np.eye(7)[labels], subjects, labels)
  assert result["accuracy"] < result["chance"] + 0.1, result


def test_probe_without_known_subjects_is_null_with_the_reason():
  result = identity.identity_probe(np.eye(4), ["", "", "", ""], np.zeros(4, int))
  assert result["accuracy"] is None and "subject" in result["reason"]


def test_pca_projection_keeps_the_leading_components_of_the_fitting_codes():
  rng = np.random.default_rng(0)
  fit = rng.normal(size=(2000, 5)) * np.array([10.0, 5.0, 0.1, 0.1, 0.1])
  project = identity.fit_pca(fit, 2)
  other = rng.normal(size=(7, 5))
  out = project(other)
  assert out.shape == (7, 2)
  # Leading directions = the first two axes (up to sign), centred on the fit's mean.
  expected = other[:, :2] - fit.mean(0)[:2]
  np.testing.assert_allclose(np.abs(out), np.abs(expected), atol=0.05)
  with pytest.raises(ValueError, match="principal components"):
    identity.fit_pca(fit[:, :1], 2)


def test_subsample_by_subject_spreads_over_known_subjects():
  subjects = ["a"] * 50 + ["b"] * 5 + ["c"] * 50 + [""] * 10
  idx = common.subsample_by_subject(subjects, 30, seed=0)
  picked = [subjects[i] for i in idx]
  assert len(idx) <= 30 and "" not in picked
  assert picked.count("b") == 5 and picked.count("a") == picked.count("c") == 10


# ----------------------------------------------------------------------------
# Retrieval


def test_retrieval_of_label_codes_is_perfect():
  labels, _, subjects = _grid(num_subjects=4, per_cell=2)
  result = retrieval.cross_subject_retrieval(np.eye(7)[labels], labels, subjects, k=6)
  assert result["precision_at_k"] == 1.0
  assert result["chance"] == pytest.approx(1 / 7, abs=0.01)
  assert result["cross_subject"] and result["num_queries"] == len(labels)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_retrieval_of_random_codes_is_at_chance(metric):
  labels, _, subjects = _grid(num_subjects=20, per_cell=5)
  codes = np.random.default_rng(0).normal(size=(len(labels), 8))
  result = retrieval.cross_subject_retrieval(codes, labels, subjects, k=6, metric=metric)
  assert result["precision_at_k"] == pytest.approx(1 / 7, abs=0.03)


def test_retrieval_never_returns_the_same_person():
  # Each subject has one expression, and its images share one code: the nearest
  # images are always the same person's, so only a cross-subject search scores 0.
  subjects = np.repeat(np.arange(7), 3)
  labels = subjects.copy()
  codes = np.eye(7)[subjects] + 0.01 * np.random.default_rng(0).normal(size=(21, 7))
  result = retrieval.cross_subject_retrieval(codes, labels, [f"s{s}" for s in subjects])
  assert result["precision_at_k"] == 0.0 and result["chance"] == 0.0
  # Unknown subjects: only the query itself is excluded, and the same person counts.
  unknown = retrieval.cross_subject_retrieval(codes, labels, [""] * 21, k=2)
  assert unknown["precision_at_k"] == 1.0 and not unknown["cross_subject"]


# ----------------------------------------------------------------------------
# t-SNE and plots


def test_tsne_and_embedding_plots(tmp_path):
  labels, _, subjects = _grid(num_subjects=30, per_cell=1)
  codes = np.eye(7)[labels] + 0.05 * np.random.default_rng(0).normal(size=(len(labels), 7))
  idx = common.subsample(len(labels), 60, seed=0)
  assert len(idx) == 60 and np.all(np.diff(idx) > 0)
  points = embedding.tsne_2d(codes[idx], seed=0)
  assert points.shape == (60, 2) and np.all(np.isfinite(points))
  assert embedding.tsne_2d(codes[:6]).shape == (6, 2)   # perplexity capped for tiny n
  by_expression = plots.embedding_png(points, [str(l) for l in labels[idx]],
                                      str(tmp_path / "a.png"), title="by expression")
  # 30 subjects (legend left out) and some unknown ones.
  who = [subjects[i] if i % 5 else "" for i in idx]
  by_subject = plots.embedding_png(points, who, str(tmp_path / "b.png"))
  for path in (by_expression, by_subject):
    assert os.path.getsize(path) > 1000
