"""What makes runs not comparable: the warnings every report and table carries.

A vanilla and a detoxified run are comparable only under the same judge, decoding settings and
data (method.md section 7). The checks read the results files (and the logged samples, for the
data digest) and say which runs differ and how.
"""
from __future__ import annotations

import hashlib
import json

from lmms_sgm.reports import results as rs


def mismatches(runs: dict[str, dict], tasks: list[str]) -> list[str]:
    """Warnings, in a fixed order: ``--limit``, models, then per task: missing runs, judges,
    prompt counts, decoding settings, data."""
    out = []
    limits = {n: _limit(r.get("config", {}).get("limit")) for n, r in runs.items()}
    if len(set(limits.values())) > 1:
        out.append("runs differ in --limit (" + ", ".join(f"{n}: {v}" for n, v in limits.items()) + ")")
    models = {n: _pretrained(r) for n, r in runs.items()}
    if len({m for m in models.values() if m is not None}) > 1:
        out.append("runs are of different models (" + ", ".join(f"{n}: {m}" for n, m in models.items()) + ")")
    for task in tasks:
        have = {n: r["results"][task] for n, r in runs.items() if task in r.get("results", {})}
        if not have:
            continue
        if len(have) < len(runs):
            out.append(f"{task}: missing from {', '.join(n for n in runs if n not in have)}")
        judges = {n: next((v for k, v in m.items() if k.startswith("judge,")), None) for n, m in have.items()}
        if len({_judge(j) for j in judges.values()}) > 1:  # identity only: not the failure counts
            out.append(f"{task}: scored by different judges (" + ", ".join(f"{n}: {_judge(j)}" for n, j in judges.items()) + ")")
        counts = {n: runs[n].get("n-samples", {}).get(task, {}).get("effective") for n in have}
        if len(set(counts.values())) > 1:
            out.append(f"{task}: different numbers of prompts (" + ", ".join(f"{n}: {c}" for n, c in counts.items()) + ")")
        gens = {n: rs.generation(runs[n], task) or {} for n in have}
        differ = sorted({k for g in gens.values() for k in g if len({json.dumps(x.get(k), sort_keys=True) for x in gens.values()}) > 1})
        if differ:
            out.append(f"{task}: runs differ in decoding settings (" + "; ".join(
                f"{n}: " + ", ".join(f"{k}={_short(g.get(k))}" for k in differ) for n, g in gens.items()) + ")")
        if len(set(counts.values())) <= 1:  # a different count already says the data differ
            digests = {n: rs.data_digest(runs[n], task) for n in have}
            kinds = {d.split(":")[0] for d in digests.values() if d}
            if len(kinds) == 1 and len(set(digests.values())) > 1:
                what = "the logged prompts and targets" if "samples" in kinds else "the task's dataset settings"
                out.append(f"{task}: runs were evaluated on different data ({what} differ: "
                           + ", ".join(f"{n}: {d}" for n, d in digests.items()) + ")")
    return out


def _short(v) -> str:
    return "unset" if v is None else json.dumps(v) if not isinstance(v, str) else v


def _limit(v) -> str:
    return "none" if v is None else format(v, "g") if isinstance(v, (int, float)) else str(v)


def _judge(j) -> str:
    if not isinstance(j, dict):
        return "none recorded"
    return f"{j.get('name')} v{j.get('version')} {hashlib.sha256(json.dumps(j.get('config'), sort_keys=True).encode()).hexdigest()[:8]}"


def judge_label(j) -> str:
    return _judge(j)


def _pretrained(run: dict) -> str | None:
    """The checkpoint a run evaluated: ``pretrained=`` of its model args (None when unknown)."""
    args = rs.model_args(run) or ""
    for part in args.split(","):
        k, _, v = part.partition("=")
        if k.strip() == "pretrained":
            return v.strip()
    sgm = rs.sgm_of(run)
    return sgm.get("pretrained") if sgm else None
