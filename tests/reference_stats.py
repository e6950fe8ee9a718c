"""An independent recomputation of report.json's numbers from the logged sample files.

Written from the documented method (docs/reports.md), not from lmms_sgm.reports: its own sample
parsing, its own resampling loop, and scipy's exact permutation test for the p-values. The report
tests compare every number of report.json with what this gives.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from scipy import stats as sps

B, SEED = 2000, 0


def sample_file(results_file: str | Path, task: str) -> Path:
    results_file = Path(results_file)
    if results_file.name.startswith("results_"):
        date = results_file.name[len("results_"):-len(".json")]
        return results_file.with_name(f"samples_{task}_{date}.jsonl")
    return results_file.with_name(results_file.name.replace("_results.json", f"_samples_{task}.jsonl"))


def doc_values(results_file, task: str, metric: str, filt: str = "none", category: str | None = None) -> dict:
    """{doc_id: per-document value} (numbers, a dict's score / value / nll; documents without one
    left out), of one filter, optionally of one category."""
    out = {}
    for line in sample_file(results_file, task).read_text().splitlines():
        s = json.loads(line)
        if s.get("filter", filt) != filt or metric not in s:
            continue
        v = s[metric]
        if isinstance(v, dict):
            if category is not None and v.get("category") != category:
                continue
            v = next((v[k] for k in ("score", "value", "nll") if k in v), None)
        if v is None:
            continue
        out[s["doc_id"]] = v
    return out


def _stat(kind: str):
    if kind == "exp":  # perplexity from per-answer mean NLLs
        return lambda x: np.exp(x.mean(axis=-1))
    return lambda x: x.mean(axis=-1)


def value(vals: dict, kind: str = "mean") -> float:
    return float(_stat(kind)(np.array([vals[k] for k in sorted(vals)], float)))


def ci(vals: dict, kind: str = "mean") -> list[float]:
    x = np.array([vals[k] for k in sorted(vals)], float)
    rng = np.random.default_rng(SEED)
    boots = [_stat(kind)(x[rng.integers(0, len(x), len(x))]) for _ in range(B)]  # row by row: same stream
    return [float(v) for v in np.quantile(boots, [0.025, 0.975])]


def paired(base: dict, run: dict, kind: str = "mean") -> dict:
    ids = sorted(set(base) & set(run))
    x0 = np.array([base[k] for k in ids], float)
    x1 = np.array([run[k] for k in ids], float)
    f = _stat(kind)
    rng = np.random.default_rng(SEED)
    deltas, ratios = [], []
    for _ in range(B):
        i = rng.integers(0, len(ids), len(ids))
        s0, s1 = f(x0[i]), f(x1[i])
        deltas.append(s1 - s0)
        if s0 != 0:
            ratios.append(s1 / s0)
    d = x1 - x0
    nonzero = int(np.count_nonzero(d))
    if nonzero == 0:
        p = 1.0
    else:
        assert nonzero <= 16, "the reference computes exact p-values only"
        p = sps.permutation_test((x1, x0), lambda a, b, axis=-1: np.sum(a - b, axis=axis), permutation_type="samples",
                                 n_resamples=np.inf, alternative="two-sided", vectorized=True).pvalue
    return {"delta": float(f(x1) - f(x0)), "delta_ci": [float(v) for v in np.quantile(deltas, [0.025, 0.975])],
            "ratio_ci": [float(v) for v in np.quantile(ratios, [0.025, 0.975])] if ratios else None,
            "p_value": float(min(p, 1.0)), "n_paired": len(ids)}


def close(a, b, tol: float = 1e-9) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b))
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)
