"""Side-by-side examples: the prompts a run fixed and the ones it broke, joined to the baseline by doc id.

For a harm metric (``harmful_rate``) a prompt is *fixed* when its value drops from the baseline
to the run (safe after, or fewer sampled answers flagged) and a *regression* when it rises (safe
before, harmful after); for a capability metric, *broken* and *repaired* likewise. Each example
carries the prompt and, under ``before`` (the baseline) and ``after`` (the run), the value, the
responses and the judge's per-response verdicts as logged.
"""
from __future__ import annotations

from lmms_sgm.reports import results as rs

WORSE = {"harm": "regression", "capability": "broken"}
BETTER = {"harm": "fixed", "capability": "repaired"}


def _side(sample: dict, metric: str) -> dict:
    item = rs._item(sample.get(metric))
    return {"value": None if item in (None, rs._BAD) else item[0], "responses": rs.responses(sample),
            "verdicts": rs.verdicts(sample)}


def changed(base_samples: list[dict], run_samples: list[dict], metric: str, filt: str, kind: str) -> list[dict]:
    """Every prompt whose value of ``metric`` differs between the two runs, worst changes first
    (largest move in the bad direction, then the good direction; ties by doc id)."""
    base = rs.samples_for_filter(base_samples, filt)
    run = rs.samples_for_filter(run_samples, filt)
    if isinstance(base, str) or isinstance(run, str):
        return []
    higher_is_worse = kind == "harm"
    out = []
    for doc_id in sorted(set(base) & set(run), key=rs.doc_key):
        b, r = _side(base[doc_id], metric), _side(run[doc_id], metric)
        if b["value"] is None or r["value"] is None or b["value"] == r["value"]:
            continue
        worse = (r["value"] > b["value"]) == higher_is_worse
        out.append({"doc_id": doc_id, "kind": WORSE[kind] if worse else BETTER[kind], "change": r["value"] - b["value"],
                    "prompt": rs.prompt_of(run[doc_id]) or rs.prompt_of(base[doc_id]), "before": b, "after": r})
    out.sort(key=lambda e: (e["kind"] != WORSE[kind], -abs(e["change"]), rs.doc_key(e["doc_id"])))
    return out
