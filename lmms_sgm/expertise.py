"""Expertise (per-neuron AUROC) and expert selection (method.md sections 4-5).

The AUROC is the Mann-Whitney statistic, computed for blocks of neurons at once from one sort
per neuron. It is exact (ties count one half, as in ``sklearn.metrics.roc_auc_score``) and its
memory is bounded by the block size, not by the number of neurons.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm.auto import tqdm

from lmms_sgm.options import SelectionOptions

# Neurons per block of the float32 fast path: big enough to amortise numpy's per-call cost,
# small enough for one block of keys (examples x block x 4 bytes) to stay in cache-sized chunks.
BLOCK_NEURONS = 1024


def auroc(scores, labels, *, threads: int | None = None) -> torch.Tensor:
    """Exact AUROC of every column of ``scores`` ``[examples, neurons]`` for binary ``labels``.

    Ties count one half, as in ``sklearn.metrics.roc_auc_score``. Returns float64 ``[neurons]``.
    float32 scores (what profiling stores) take the fast path below; other dtypes take the general
    rank-based path.
    """
    y = np.asarray(labels).astype(np.int64).ravel()
    x = scores.numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
    if x.ndim != 2 or x.shape[0] != y.size:
        raise ValueError(f"scores must be [examples, neurons] with {y.size} rows, got shape {x.shape}")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if not np.isin(np.asarray(labels).ravel(), (0, 1)).all():  # before the cast: 0.5 is no label
        raise ValueError("labels must be 0 or 1")
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both classes among the labels")
    if not np.isfinite(x).all():
        raise ValueError("scores contain NaN or infinity (as scikit-learn, AUROC refuses them)")
    if x.dtype != np.float32:
        return _auroc_ranks(torch.as_tensor(np.ascontiguousarray(x)), torch.as_tensor(y))
    blocks = range(0, x.shape[1], BLOCK_NEURONS)
    work = lambda j: _auroc_f32_block(x[:, j:j + BLOCK_NEURONS], y, n_pos, n_neg)  # noqa: E731
    with ThreadPoolExecutor(threads or torch.get_num_threads()) as pool:
        parts = list(pool.map(work, blocks))
    return torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0, dtype=torch.float64)


def _auroc_f32_block(x: np.ndarray, y: np.ndarray, n_pos: int, n_neg: int) -> np.ndarray:
    """Mann-Whitney U from one float32 sort per neuron (numpy's SIMD sort releases the GIL).

    The label is written into the lowest mantissa bit, so sorting the values also carries the
    labels along; then U = (sum of the sorted positions of the toxic examples) - n1(n1-1)/2.
    That is exact unless a toxic and a non-toxic value of a column agree in every bit but the
    lowest (true ties included): such columns are recomputed by the exact rank-based path.
    """
    # [neurons, examples], a new array (x is never written); adding 0 turns -0.0 into +0.0 so
    # that the two zeros tie, as they do for sklearn.
    keys = np.add(x.T, np.float32(0), dtype=np.float32, order="C")
    bits = keys.view(np.int32)
    bits &= np.int32(-2)
    bits |= y.astype(np.int32)
    keys.sort(axis=1)
    # Positions sum to at most n(n-1)/2: int32 holds that below 2**31, else int64. (einsum, not
    # a BLAS matvec, which would start threads of its own inside each worker thread.)
    acc = np.int32 if y.size * (y.size - 1) // 2 < 2**31 else np.int64
    # Typed as plain arrays: numpy's stubs cannot type a dtype chosen at run time.
    labels: np.ndarray = (bits & 1).astype(acc, copy=False)
    ranks: np.ndarray = np.arange(y.size, dtype=acc)
    positions = np.einsum("ij,j->i", labels, ranks)
    out = (positions.astype(np.float64) - n_pos * (n_pos - 1) / 2) / (n_pos * n_neg)
    # Neighbours equal but for the label bit: a (near-)tie between a toxic and a non-toxic value,
    # whose order the label bit may have decided. Ties within one class change nothing.
    # A masked key -0.0 (from the smallest negative subnormal) compares equal to +0.0 and can
    # split a tie group in the sort: such columns take the exact path too.
    redo = ((bits[:, 1:] ^ bits[:, :-1]) == 1).any(1) | (bits == np.iinfo(np.int32).min).any(1)
    if redo.any():
        out[redo] = _auroc_f32_ties(keys_of(x[:, redo]), y, n_pos, n_neg)
    return out


def keys_of(x: np.ndarray) -> np.ndarray:
    """float32 ``[examples, neurons]`` -> int64 ``[neurons, examples]`` keys ordered as the values."""
    bits = (np.ascontiguousarray(x.T) + np.float32(0)).view(np.int32)
    return np.where(bits < 0, bits ^ np.int32(0x7FFFFFFF), bits).astype(np.int64)


def _auroc_f32_ties(keys: np.ndarray, y: np.ndarray, n_pos: int, n_neg: int) -> np.ndarray:
    """Exact U with ties: sort (value, label) pairs, so a tie group lists its non-toxic first.

    For a toxic example at sorted position i, the non-toxic examples below it number
    ``base`` (those before its tie group) and those tied with it ``cneg[i] - base``; U adds
    ``base + (cneg[i] - base) / 2``.
    """
    k = (keys << 1) | y
    k.sort(axis=1)
    lab = k & 1
    cneg = np.cumsum(1 - lab, axis=1)
    value = k >> 1
    idx = np.arange(k.shape[1])
    starts = np.ones(k.shape, dtype=bool)
    starts[:, 1:] = value[:, 1:] != value[:, :-1]
    first = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    before = np.where(first > 0, np.take_along_axis(cneg, np.maximum(first - 1, 0), axis=1), 0)
    u = ((cneg + before) * lab).sum(1) / 2
    return u / (n_pos * n_neg)


def _auroc_ranks(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """General exact path: average ranks (ties share the mean rank), summed over positives."""
    y = labels.to(torch.float64)
    n = x.shape[0]
    n_pos = float(y.sum())
    n_neg = n - n_pos
    xs, order = torch.sort(x.T.contiguous(), dim=1, stable=True)  # [neurons, examples]
    ys = y[order]
    idx = torch.arange(n).expand_as(xs)
    starts = torch.ones_like(xs, dtype=torch.bool)
    starts[:, 1:] = xs[:, 1:] != xs[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(1).values
    last = torch.where(ends, idx, torch.full_like(idx, n)).flip(1).cummin(1).values.flip(1)
    ranks = (first + last).to(torch.float64) / 2 + 1  # 1-based mean rank of each tie group
    return ((ranks * ys).sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def expertise(store, sites, labels, *, progress: bool = True) -> dict[str, torch.Tensor]:
    """AUROC of every neuron of every site, read from the store in column blocks."""
    out = {}
    with tqdm(total=sum(s.width for s in sites), desc="expertise", unit="neuron", disable=not progress) as bar:
        for site in sites:
            arr = store[site.name]
            step = 16 * BLOCK_NEURONS  # bounds what is read from a disk memmap at a time
            parts = []
            for j in range(0, site.width, step):
                parts.append(auroc(np.asarray(arr[:, j:j + step]), labels))  # neuron-major: a contiguous read
                bar.update(min(step, site.width - j))
            out[site.name] = torch.cat(parts)
    return out


def nontoxic_mean(store, sites, labels) -> dict[str, torch.Tensor]:
    """Each neuron's mean pooled response over the non-toxic pairs (float32)."""
    negative = np.asarray(labels) == 0
    return {s.name: torch.from_numpy(np.asarray(store[s.name])[negative].mean(0, dtype=np.float64).astype(np.float32))
            for s in sites}


def select(aurocs: dict[str, torch.Tensor], options: SelectionOptions = SelectionOptions()) -> dict[str, torch.Tensor]:
    """alpha per neuron (float32): the factor SGM multiplies its output by; 1 for non-experts.

    sgm: the selected neurons get alpha = 1 - 2*(AUROC - 0.5) = 2*(1 - AUROC). Selected are,
    by direction, the toxic experts (AUROC > threshold; alpha < 1 when threshold >= 0.5), the
    anti-toxic ones (AUROC < 1 - threshold; alpha > 1), or both. With top_k only the k most
    extreme of those. det0 / damp: the global top-k neurons by AUROC get alpha 0 / damp_factor.
    Top-k ties are broken by site order then neuron index.
    """
    names = list(aurocs)
    flat = torch.cat([aurocs[n].to(torch.float64) for n in names])
    if options.rule == "sgm":
        toxic = flat > options.threshold
        anti = flat < 1 - options.threshold
        chosen = {"suppress": toxic, "amplify": anti, "both": toxic | anti}[options.direction]
    else:
        chosen = torch.ones_like(flat, dtype=torch.bool)
    if options.top_k is not None:
        extremity = {"suppress": flat, "amplify": 1 - flat, "both": (flat - 0.5).abs()}[options.direction]
        candidates = chosen.nonzero().flatten()
        keep = candidates[torch.argsort(-extremity[candidates], stable=True)[: options.top_k]]
        chosen = torch.zeros_like(chosen)
        chosen[keep] = True
    if options.rule == "sgm":
        weight = 1 - 2 * (flat - 0.5)
    elif options.rule == "det0":
        weight = torch.zeros_like(flat)
    else:
        weight = torch.full_like(flat, options.damp_factor)
    alpha = torch.where(chosen, weight, torch.ones_like(flat)).to(torch.float32)
    out, start = {}, 0
    for n in names:
        width = aurocs[n].numel()
        out[n] = alpha[start:start + width].clone()
        start += width
    return out
