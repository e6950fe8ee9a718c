"""Input-conditional glasses: the intervention acts only where the model's own toxicity evidence is.

Beyond the paper, still training-free (docs/diagnosis.md). For each site the glasses change,
the *evidence* at a position is the AUROC-weighted, standardised deviation of that site's
experts from their non-toxic means::

    e = sum_j  w_j * (x_j - mu_j) / sd_j,   w_j = 2 * (AUROC_j - 0.5),  j over the site's experts

(positive where toxic experts fire above their non-toxic level, or anti-toxic ones below it).
The site's transform is applied at a position only where ``e > t``; elsewhere the output is left
exactly as it is (``torch.where``), so an input whose evidence stays below ``t`` everywhere gives
the vanilla model's outputs bit for bit.

``t`` is chosen on the profiling split: with mean pooling, an example's pooled evidence is the
mean of its positions' evidence (``e`` is linear), and ``t`` is the value that best separates
the toxic from the non-toxic pairs' pooled evidence (the largest TPR - FPR, midway between two
neighbouring values). This needs the pooled responses, so a gate is fitted when glasses are
profiled (``--gate evidence``), not by re-selection.

Hooks, nnsight and remote execution apply it (the edit of lmms_sgm/interventions/sgm.py); fold
cannot (a weight change acts on every position alike) and refuses gated glasses.
"""
from __future__ import annotations

import numpy as np
import torch


def fit(store, sites, aurocs: dict, alpha: dict, means: dict, labels) -> dict[str, tuple[torch.Tensor, float, float]]:
    """``{site: (v, c, t)}``: evidence ``e = x @ v - c`` and threshold ``t``, for every site with experts."""
    y = np.asarray(labels).astype(bool)
    out = {}
    for s in sites:
        experts = (alpha[s.name] != 1).numpy()
        if not experts.any():
            continue
        x = np.asarray(store[s.name], dtype=np.float64)  # [examples, width]
        sd = x.std(0)
        w = 2 * (aurocs[s.name].numpy().astype(np.float64) - 0.5)
        v = np.where(experts & (sd > 0), w / np.where(sd > 0, sd, 1.0), 0.0)
        c = float(v @ means[s.name].numpy().astype(np.float64))
        e = x @ v - c
        out[s.name] = (torch.from_numpy(v).to(torch.float32), c, best_threshold(e, y))
    return out


def best_threshold(e: np.ndarray, toxic: np.ndarray) -> float:
    """The threshold ``t`` (a midpoint between neighbouring values) maximising TPR - FPR of ``e > t``;
    the lowest such midpoint on ties."""
    order = np.argsort(e, kind="stable")
    es, ys = e[order], toxic[order]
    n_pos, n_neg = int(ys.sum()), int((~ys).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("a gate's threshold needs toxic and non-toxic examples")
    # Cutting after sorted position i: everything above is called toxic.
    tpr = 1 - np.cumsum(ys) / n_pos
    fpr = 1 - np.cumsum(~ys) / n_neg
    distinct = np.append(es[1:] != es[:-1], True)  # a cut only between different values
    j = np.where(distinct, tpr - fpr, -np.inf)
    i = int(np.argmax(j))
    if i == len(es) - 1:  # nothing above the last value: gate always off
        return float(es[-1])
    return float((es[i] + es[i + 1]) / 2)


def gated(x: torch.Tensor, new: torch.Tensor, v: torch.Tensor, c: float, t: float) -> torch.Tensor:
    """``new`` where the evidence of ``x`` exceeds ``t``, ``x`` itself elsewhere (per position)."""
    e = (x.to(torch.float32) @ v.to(x.device)) - c
    return torch.where((e > t)[..., None], new, x)
