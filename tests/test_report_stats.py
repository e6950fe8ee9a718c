"""lmms_sgm.reports.stats against independent references: a from-the-docs reimplementation (exact,
same seed), closed forms (normal approximations at large n, exact small cases) and scipy.stats."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from lmms_sgm.reports import stats


def reference_bootstrap(x, resamples=stats.RESAMPLES, seed=stats.SEED, f=lambda m: m):
    """The documented algorithm, written again: one index matrix, percentile interval."""
    x = np.asarray(x, float)
    idx = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    return list(np.quantile(f(x[idx].mean(axis=1)), [0.025, 0.975]))


def test_bootstrap_is_the_documented_algorithm():
    x = np.random.default_rng(5).random(37)
    assert stats.bootstrap_ci(x, np.ones_like(x)) == pytest.approx(reference_bootstrap(x), abs=1e-12)
    assert stats.bootstrap_ci(x, np.ones_like(x), "exp_mean", resamples=500, seed=3) == pytest.approx(
        reference_bootstrap(x, 500, 3, np.exp), abs=1e-12)


def test_chunked_resampling_draws_the_same_stream(monkeypatch):
    x = np.random.default_rng(1).random(50)
    whole = stats.bootstrap_ci(x, np.ones_like(x), resamples=300)
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 50 * 7)  # 7 rows per chunk
    assert stats.bootstrap_ci(x, np.ones_like(x), resamples=300) == whole


def test_bootstrap_matches_the_normal_interval_at_large_n():
    rng = np.random.default_rng(0)
    x = (rng.random(4000) < 0.3).astype(float)
    p = x.mean()
    se = math.sqrt(p * (1 - p) / len(x))
    lo, hi = stats.bootstrap_ci(x, np.ones_like(x))
    assert lo == pytest.approx(p - 1.96 * se, abs=0.003) and hi == pytest.approx(p + 1.96 * se, abs=0.003)


def test_bootstrap_small_exact_cases():
    assert stats.bootstrap_ci([0.4], [1.0]) == [0.4, 0.4]  # one prompt: no spread
    assert stats.bootstrap_ci([0.2] * 9, [1.0] * 9) == pytest.approx([0.2, 0.2])
    # two prompts 0 and 1: the resampled mean is 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4
    assert stats.bootstrap_ci([0.0, 1.0], [1.0, 1.0]) == [0.0, 1.0]
    assert stats.bootstrap_ci([], []) is None


def test_bootstrap_agrees_with_scipy_percentile_bootstrap():
    x = np.random.default_rng(2).random(150) ** 2
    ours = stats.bootstrap_ci(x, np.ones_like(x), resamples=20000)
    ref = sps.bootstrap((x,), np.mean, method="percentile", n_resamples=20000, random_state=9).confidence_interval
    assert ours == pytest.approx([ref.low, ref.high], abs=0.004)


def test_weighted_ratio_of_sums():
    a, w = np.array([-3.0, -1.0, -8.0]), np.array([2.0, 1.0, 4.0])
    assert stats.value(a, w, "exp_neg_mean") == pytest.approx(math.exp(12 / 7))
    assert stats.value(a, w, "bits") == pytest.approx(12 / 7 / math.log(2))


def test_paired_bootstrap_is_the_documented_algorithm_and_matches_the_normal_interval():
    rng = np.random.default_rng(3)
    base = (rng.random(3000) < 0.5).astype(float)
    run = np.where(rng.random(3000) < 0.2, 0.0, base)  # the run fixes ~20% of the harmful answers
    one = np.ones_like(base)
    got = stats.paired_bootstrap(base, one, run, one, resamples=1000, seed=4)
    idx = np.random.default_rng(4).integers(0, 3000, size=(1000, 3000))
    m0, m1 = base[idx].mean(1), run[idx].mean(1)
    assert got["delta_ci"] == pytest.approx(list(np.quantile(m1 - m0, [0.025, 0.975])), abs=1e-12)
    assert got["ratio_ci"] == pytest.approx(list(np.quantile(m1 / m0, [0.025, 0.975])), abs=1e-12)
    d = run - base
    se = d.std(ddof=1) / math.sqrt(len(d))
    assert got["delta_ci"] == pytest.approx([d.mean() - 1.96 * se, d.mean() + 1.96 * se], abs=0.002)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_sign_flip_p_equals_scipy_exact_permutation_test(seed):
    rng = np.random.default_rng(seed)
    x0 = (rng.random(11) < 0.5).astype(float)
    x1 = rng.random(11)
    ref = sps.permutation_test((x1, x0), lambda a, b: np.mean(a - b), permutation_type="samples",
                               n_resamples=np.inf, alternative="two-sided").pvalue
    assert stats.sign_flip_p(x1 - x0) == pytest.approx(ref, abs=1e-12)


def test_sign_flip_small_exact_cases():
    assert stats.sign_flip_p([1.0, 1.0, 1.0]) == 0.25  # 2 of the 8 sign patterns reach |sum| = 3
    assert stats.sign_flip_p([1.0, 0.0, 0.0, 1.0]) == 0.5  # zeros do not count
    assert stats.sign_flip_p([0.0, 0.0]) == 1.0
    assert stats.sign_flip_p([]) == 1.0


def test_monte_carlo_sign_flip_p_agrees_with_the_exact_one_and_the_normal_approximation():
    rng = np.random.default_rng(7)
    d = rng.normal(0.35, 1.0, 40)
    mc = stats.sign_flip_p(d, permutations=20000)
    ref = sps.permutation_test((d, np.zeros_like(d)), lambda a, b: np.mean(a - b), permutation_type="samples",
                               n_resamples=40000, alternative="two-sided", random_state=1).pvalue
    assert mc == pytest.approx(ref, abs=0.01)
    z = abs(d.sum()) / math.sqrt((d ** 2).sum())  # the sign-flip statistic's normal approximation
    assert mc == pytest.approx(math.erfc(z / math.sqrt(2)), abs=0.02)


def test_normal_fallbacks():
    assert stats.normal_ci(0.5, 0.1) == pytest.approx([0.5 - 0.196, 0.5 + 0.196], abs=1e-4)
    assert stats.normal_p(0.196, 0.1) == pytest.approx(0.05, abs=1e-3)
    assert stats.normal_p(0.0, 0.0) == 1.0
    assert stats.ratio_se(0.5, 0.4, 0.04, 0.8, 0.08) == pytest.approx(0.5 * math.sqrt(0.02))


def test_normal_fallbacks_refuse_missing_or_infinite_inputs():
    assert stats.normal_ci(0.5, None) is None and stats.normal_ci(None, 0.1) is None
    assert stats.normal_ci(0.5, math.inf) is None and stats.normal_ci(0.5, math.nan) is None
    assert stats.normal_p(0.1, 0.0) == 0.0 and stats.normal_p(-0.1, 0.0) == 0.0  # no noise: any change is certain
    assert stats.normal_p(0.1, math.inf) is None
    assert stats.normal_p(-0.196, 0.1) == pytest.approx(2 * sps.norm.sf(1.96), abs=1e-12)


def test_ratio_se_is_undefined_at_a_zero_value_only():
    assert stats.ratio_se(0.0, 0.0, 0.1, 1.0, 0.1) is None
    assert stats.ratio_se(math.inf, 1.0, 0.1, 0.0, 0.1) is None
    # values of 1 are ordinary: |r| * sqrt((se1/v1)^2 + (se0/v0)^2) by hand
    assert stats.ratio_se(2.0, 2.0, 0.2, 1.0, 0.1) == pytest.approx(2.0 * math.sqrt(0.01 + 0.01))
    assert stats.ratio_se(0.5, 1.0, 0.1, 2.0, 0.4) == pytest.approx(0.5 * math.sqrt(0.01 + 0.04))


def exact_sign_flip_p(d):
    """Every sign pattern in exact rational arithmetic: ties are ties, no float tolerance needed."""
    from fractions import Fraction
    from itertools import product
    d = [Fraction(x) for x in d if x != 0]
    if not d:
        return Fraction(1)
    observed = abs(sum(d))
    hits = sum(abs(sum(s * x for s, x in zip(signs, d))) >= observed for signs in product((1, -1), repeat=len(d)))
    return Fraction(hits, 2 ** len(d))


@pytest.mark.parametrize("d", [["0.1", "0.2", "-0.3", "1.0"], ["1000", "0.1", "0.2", "-0.3"],
                               ["0.1", "0.2", "0.3", "-0.6", "0.7", "0.1"],
                               ["1", "1", "1", "-1", "0", "1"], ["0.3", "0.1", "-0.2", "0.7", "-0.4", "0.2", "0.1", "0.6"]])
def test_exact_sign_flip_counts_float_ties_as_ties(d):
    """Decimal differences whose flips tie the observed sum only up to float rounding."""
    from fractions import Fraction
    assert stats.sign_flip_p([float(x) for x in d]) == float(exact_sign_flip_p([Fraction(x) for x in d]))


def test_monte_carlo_sign_flip_is_the_documented_algorithm(monkeypatch):
    """Above ``exact_max`` prompts: ``permutations`` flips from ``default_rng(seed + 1)``, p = (1 + hits) / (1 + permutations)."""
    d = np.random.default_rng(11).normal(0.2, 1.0, 30)
    d[3] = 0.0  # zeros are dropped before drawing
    nz = d[d != 0]
    signs = 1 - 2 * np.random.default_rng(5 + 1).integers(0, 2, size=(999, nz.size))
    hits = np.count_nonzero(np.abs(signs @ nz) >= abs(nz.sum()) - 1e-9)
    assert stats.sign_flip_p(d, permutations=999, seed=5) == (1 + hits) / 1000
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", nz.size * 7)  # chunks of 7 rows: the same stream
    assert stats.sign_flip_p(d, permutations=999, seed=5) == (1 + hits) / 1000


def test_sign_flip_tolerance_is_1e_12_of_the_total_absolute_difference():
    """A flip counts as reaching the observed sum when it falls short by at most
    ``1e-12 * max(1, sum |d|)`` (float rounding), the boundary included; a larger shortfall is real."""
    a, b = 0.3, 9007 * 2.0**-54  # a - b lands exactly on (a + b) - 1e-12 after rounding
    assert (a + b) - 1e-12 * max(1.0, a + b) == a - b
    assert stats.sign_flip_p([a, b]) == 1.0  # all four patterns reach it
    assert stats.sign_flip_p([a, b], permutations=200, exact_max=1) == 1.0  # the random path too
    # 1.5e-12 short of the observed 1 + 0.75e-12: only the all-plus and all-minus patterns reach it
    assert stats.sign_flip_p([1.0, 0.75e-12]) == 0.5


def test_exact_max_is_the_largest_count_enumerated():
    d = [1.0, 1.0, 1.0, 1.0]
    assert stats.sign_flip_p(d, exact_max=4) == 2 / 16  # exact: only all-plus and all-minus reach 4
    rng = np.random.default_rng(1)
    hits = np.count_nonzero(np.abs((1 - 2 * rng.integers(0, 2, size=(50, 4))).sum(1)) >= 4)
    assert stats.sign_flip_p(d, permutations=50, seed=0, exact_max=3) == (1 + hits) / 51
    assert stats.sign_flip_p(d[:3], permutations=50, exact_max=3) == 2 / 8


def test_retention_interval_leaves_out_resamples_with_a_zero_baseline():
    base = np.array([0, 0, 0, 0, 0, 0, 1, 0, 0, 1.0])  # many resamples draw neither 1
    run = np.array([0, 1, 0, 0, 0, 0, 1, 0, 0, 0.0])
    one = np.ones(10)
    got = stats.paired_bootstrap(base, one, run, one, resamples=400, seed=2)
    idx = np.random.default_rng(2).integers(0, 10, size=(400, 10))
    m0, m1 = base[idx].mean(1), run[idx].mean(1)
    assert (m0 == 0).sum() > 20  # the case is exercised
    ok = m0 != 0
    assert got["ratio_ci"] == pytest.approx(list(np.quantile(m1[ok] / m0[ok], [0.025, 0.975])), abs=1e-12)
    assert got["delta_ci"] == pytest.approx(list(np.quantile(m1 - m0, [0.025, 0.975])), abs=1e-12)
    assert stats.paired_bootstrap([0.0, 0.0], [1, 1], [1.0, 0.0], [1, 1])["ratio_ci"] is None  # never defined
    assert stats.paired_bootstrap([], [], [], []) == {"delta_ci": None, "ratio_ci": None}


def test_value_defaults_to_the_mean_and_inputs_are_converted_to_float():
    from decimal import Decimal
    from fractions import Fraction
    assert stats.value(np.array([1.0, 2.0]), np.array([1.0, 1.0])) == 1.5
    exact = [Fraction(0), Fraction(1, 2), Decimal("1")]
    assert stats.bootstrap_ci(exact, [1, 1, Fraction(1)], resamples=200) == stats.bootstrap_ci([0.0, 0.5, 1.0], [1.0] * 3, resamples=200)
    assert stats.paired_bootstrap(exact, [1] * 3, exact[::-1], [1] * 3, resamples=200) == stats.paired_bootstrap(
        [0.0, 0.5, 1.0], [1.0] * 3, [1.0, 0.5, 0.0], [1.0] * 3, resamples=200)


def test_paired_bootstrap_of_one_prompt_and_of_a_baseline_of_one():
    assert stats.paired_bootstrap([0.0], [1.0], [1.0], [1.0]) == {"delta_ci": [1.0, 1.0], "ratio_ci": None}
    assert stats.paired_bootstrap([2.0], [1.0], [1.0], [1.0]) == {"delta_ci": [-1.0, -1.0], "ratio_ci": [0.5, 0.5]}
    # a baseline whose every resample is exactly 1: all resamples count for retention
    got = stats.paired_bootstrap([1.0] * 4, [1.0] * 4, [1.0, 0.0, 1.0, 1.0], [1.0] * 4, resamples=300, seed=1)
    idx = np.random.default_rng(1).integers(0, 4, size=(300, 4))
    m1 = np.array([1.0, 0.0, 1.0, 1.0])[idx].mean(1)
    assert got["ratio_ci"] == pytest.approx(list(np.quantile(m1, [0.025, 0.975])), abs=1e-12)


def test_zero_weight_items_give_no_interval_and_no_numpy_warning():
    """Items with weight 0 (an lm-eval document of 0 words) make a value of +-inf: left out, quietly."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert stats.paired_bootstrap([-1.0], [0.0], [1.0], [0.0], resamples=10) == {"delta_ci": None, "ratio_ci": None}
        assert stats.bootstrap_ci([1.0], [0.0], resamples=10) is None
        assert stats.bootstrap_ci([0.0], [0.0], resamples=10) is None  # 0 / 0
