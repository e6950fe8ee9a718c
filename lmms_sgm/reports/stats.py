"""Confidence intervals and tests over prompts: bootstrap, paired bootstrap, paired sign-flip test.

Every statistic here is a function of per-prompt (per-document) items ``(a_i, w_i)``: the value
is ``g(sum(a) / sum(w))``. With ``w = 1`` and ``g`` the identity that is the plain mean over
prompts (harmful rate, accuracy; a sampled task's prompt contributes the fraction of its answers
flagged, so resampling prompts keeps a prompt's answers together); ``g = exp`` gives a
perplexity from per-answer mean NLLs; lm-eval's weighted perplexities are ``exp(-sum ll / sum
words)``. The unit resampled is always the prompt, never an answer.

How the numbers are made (docs/reports.md repeats this for readers):

- **CI of a value**: percentile bootstrap over prompts. Prompts are sorted by doc id; the
  resample indices are ``numpy.random.default_rng(seed).integers(0, n, size=(resamples, n))``
  (drawn in row chunks, which gives the same stream); the CI is the 2.5 and 97.5 percentiles
  (``numpy.quantile``, linear interpolation) of ``g`` over the resamples.
- **Difference to the baseline** (``delta``, paired): the runs are joined on doc id; the same
  resample indices (same seed, drawn over the joined prompts) are applied to both runs, and the
  CI is the percentile interval of ``g(run*) - g(base*)``. **Retention** ``g(run) / g(base)``
  gets its interval from the same resamples (resamples whose baseline is 0 are left out).
- **p-value** of the difference: two-sided paired sign-flip (permutation) test of
  ``sum(a_run - a_base) = 0`` over the joined prompts: exact enumeration of the sign flips when at
  most ``EXACT_MAX`` prompts differ, else ``permutations`` random flips from
  ``default_rng(seed + 1)`` with ``p = (1 + hits) / (1 + permutations)``. Prompts whose items are
  equal contribute nothing either way.
- Without logged samples: a normal interval from lmms-eval's standard error, ``v +- 1.96 se``;
  differences unpaired, ``se = sqrt(se_run^2 + se_base^2)``; retention by the delta method.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np

SEED = 0
RESAMPLES = 2000
PERMUTATIONS = 10000
EXACT_MAX = 16  # at most 2**16 sign patterns are enumerated exactly
LEVEL = 0.95
Z = 1.959963984540054  # the normal 97.5% quantile
_CHUNK_ELEMENTS = 4_000_000  # ~32 MB of int64 indices per chunk

TRANSFORMS: dict[str, Callable] = {
    "mean": lambda r: r,
    "exp_mean": np.exp,  # perplexity from mean NLLs (our fluency task)
    "exp_neg_mean": lambda r: np.exp(-r),  # perplexity from log-likelihoods (lm-eval)
    "bits": lambda r: -r / math.log(2),  # bits per byte from log-likelihoods (lm-eval)
}


def value(a: np.ndarray, w: np.ndarray, g: str = "mean") -> float:
    return float(TRANSFORMS[g](a.sum() / w.sum()))


def resample_indices(n: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """The bootstrap's index rows, ``default_rng(seed).integers(0, n, (resamples, n))``, in chunks."""
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_ELEMENTS // max(n, 1))
    done = 0
    while done < resamples:
        k = min(rows, resamples - done)
        yield rng.integers(0, n, size=(k, n))
        done += k


def _ratios(a: np.ndarray, w: np.ndarray, idx: np.ndarray) -> np.ndarray:
    num = a[idx].sum(axis=1)
    den = w[idx].sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return num / den


def percentile_ci(samples: np.ndarray, level: float = LEVEL) -> list[float] | None:
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return None
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def bootstrap_ci(a, w, g: str = "mean", resamples: int = RESAMPLES, seed: int = SEED) -> list[float] | None:
    """Percentile bootstrap CI over prompts of ``g(sum a / sum w)``."""
    a, w = np.asarray(a, float), np.asarray(w, float)
    if a.size == 0:
        return None
    f = TRANSFORMS[g]
    stats = np.concatenate([f(_ratios(a, w, idx)) for idx in resample_indices(a.size, resamples, seed)])
    return percentile_ci(stats)


def paired_bootstrap(a0, w0, a1, w1, g: str = "mean", resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """Paired resamples of the joined prompts: ``{"delta_ci", "ratio_ci"}`` of ``g(run) - g(base)``
    and ``g(run) / g(base)`` (``a0, w0``: baseline; ``a1, w1``: the run; same prompt order)."""
    a0, w0, a1, w1 = (np.asarray(x, float) for x in (a0, w0, a1, w1))
    if a0.size == 0:
        return {"delta_ci": None, "ratio_ci": None}
    f = TRANSFORMS[g]
    deltas, ratios = [], []
    for idx in resample_indices(a0.size, resamples, seed):
        s0, s1 = f(_ratios(a0, w0, idx)), f(_ratios(a1, w1, idx))
        deltas.append(s1 - s0)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios.append(np.where(s0 != 0, s1 / np.where(s0 != 0, s0, 1), np.nan))
    return {"delta_ci": percentile_ci(np.concatenate(deltas)), "ratio_ci": percentile_ci(np.concatenate(ratios))}


def sign_flip_p(d, permutations: int = PERMUTATIONS, seed: int = SEED, exact_max: int = EXACT_MAX) -> float:
    """Two-sided paired sign-flip test of ``sum(d) = 0`` (``d``: per-prompt differences)."""
    d = np.asarray(d, float)
    d = d[d != 0]
    m = d.size
    if m == 0:
        return 1.0
    observed = abs(d.sum())
    tol = 1e-12 * max(1.0, float(np.abs(d).sum()))
    if m <= exact_max:
        # every sign pattern: bit j of k says whether prompt j's difference is flipped
        k = np.arange(2**m)[:, None]
        signs = 1 - 2 * ((k >> np.arange(m)) & 1)
        return float(np.mean(np.abs(signs @ d) >= observed - tol))
    rng = np.random.default_rng(seed + 1)
    hits, rows = 0, max(1, _CHUNK_ELEMENTS // m)
    done = 0
    while done < permutations:
        k = min(rows, permutations - done)
        signs = 1 - 2 * rng.integers(0, 2, size=(k, m))
        hits += int(np.count_nonzero(np.abs(signs @ d) >= observed - tol))
        done += k
    return (1 + hits) / (1 + permutations)


def normal_ci(v: float | None, se: float | None) -> list[float] | None:
    if v is None or se is None or not math.isfinite(se):
        return None
    return [v - Z * se, v + Z * se]


def normal_p(delta: float, se: float) -> float | None:
    """Two-sided p of ``delta`` under a normal with standard error ``se``."""
    if not math.isfinite(se):
        return None
    if se == 0:
        return 1.0 if delta == 0 else 0.0
    return math.erfc(abs(delta) / se / math.sqrt(2))


def ratio_se(r: float, v1: float, se1: float, v0: float, se0: float) -> float | None:
    """Delta-method standard error of ``v1 / v0`` (independent estimates)."""
    if v0 == 0 or v1 == 0:
        return None
    return abs(r) * math.sqrt((se1 / v1) ** 2 + (se0 / v0) ** 2)
