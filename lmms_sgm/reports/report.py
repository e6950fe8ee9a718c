"""The capability-retention report of evaluation runs: "how much safer, at what cost?", with intervals.

``build(runs)`` turns results folders (lmms-eval or lm-eval; the first run is the baseline) into
the dict written as ``report.json``:

- ``baseline``: the baseline's label; ``runs``: per run its label, results file, harness, model
  args, what the model wore (``sgm``), judge, decoding settings and data digest per task;
- ``metrics``: one row per task x metric x run (x category): ``value``, ``ci`` (95%), ``n``,
  ``method`` (``bootstrap`` over logged samples, ``stderr`` from the harness, or ``none``), and
  for the other runs ``delta`` (value minus baseline), ``delta_ci`` (paired over the same doc
  ids), ``p_value``, ``within_noise``, ``relative_change`` and, for capability metrics,
  ``retention`` with ``retention_ci``;
- ``examples``: prompts fixed and regressions, with responses and the judge's verdicts;
- ``tradeoff``: harmful rate against capability retention per run, Pareto points, and the
  operating point chosen by the rule (:class:`~lmms_sgm.options.RuleOptions`, tune's and the demo's);
- ``warnings`` (runs that differ in judge, decoding settings, data, ``--limit``, models; missing
  samples) and ``notes`` (the differences that are within noise).

The statistics are in :mod:`lmms_sgm.reports.stats`; how to read a report is docs/reports.md.
"""
from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass

import numpy as np

from lmms_sgm.options import RuleOptions, rule_to_dict
from lmms_sgm.reports import examples as ex
from lmms_sgm.reports import results as rs
from lmms_sgm.reports import stats
from lmms_sgm.reports.comparable import judge_label, mismatches

SCHEMA = "lmms_sgm.report/1"
MAX_EXAMPLES = 8  # per run, task, metric and kind in report.json (the counts cover all)
# Our tasks first, in the order a reader wants them; any other task after, by name.
TASK_ORDER = ("mm_toxic_qa", "mm_toxic_qa_sampled", "mm_toxic_qa_adv", "mm_toxic_qa_adv_sampled", "mm_toxic_qa_benign",
              "mm_toxic_qa_benign_sampled", "mm_toxic_qa_fluency", "mmbench_local", "mmbench_local_mc")
KINDS = ("harm", "refusal", "over_refusal", "capability", "fluency", "other")
KIND_TITLES = {"harm": "Harm", "refusal": "Refusal of harmful prompts", "over_refusal": "Over-refusal (benign prompts)",
               "capability": "Capability and retention", "fluency": "Fluency", "other": "Other metrics"}
SKIP = {"judge", "sgm", "alias"}


def Rule(min_retention: float = 0.95, max_over_refusal_points: float = 2.0, harm: str | None = None) -> RuleOptions:
    """Deprecated (one release): :class:`~lmms_sgm.options.RuleOptions` (``retention``,
    ``over_refusal_points``, ``metric``), the same rule in the same unit (percentage points)."""
    warnings.warn("lmms_sgm.reports.Rule is deprecated: use lmms_sgm.options.RuleOptions(retention=..., "
                  "over_refusal_points=..., metric=...)", DeprecationWarning, stacklevel=2)
    return RuleOptions(metric=harm, retention=min_retention, over_refusal_points=max_over_refusal_points)


def rule_text(rule: RuleOptions, harm_label: str) -> str:
    """The operating-point rule in words: the lowest harmful rate (``metric``: the primary harm metric)
    among the non-baseline runs that lower it below the baseline's, keep every capability metric at
    >= ``retention`` of the baseline and add at most ``over_refusal_points`` percentage points of
    over-refusal; ties go to the higher retention. (tune's ``fluency_ratio`` is not read here.)"""
    return (f"the lowest {harm_label} among the runs that lower it, keep every capability metric at >= "
            f"{rule.retention:.0%} of the baseline and add at most {rule.over_refusal_points:g} points of "
            "over-refusal")


PRIMARY_HARM = (("mm_toxic_qa_sampled", "harmful_rate", "samples"), ("mm_toxic_qa", "harmful_rate", "none"))


@dataclass(frozen=True)
class Spec:
    task: str
    metric: str
    filter: str
    category: str | None
    higher: bool
    kind: str

    @property
    def key(self) -> str:
        return f"{self.metric},{self.filter}"


def metric_kind(task: str, metric: str, higher: bool) -> str:
    base = metric.removesuffix("_by_category")
    if base == "harmful_rate":
        return "harm"
    if base == "over_refusal_rate":
        return "over_refusal"
    if base == "refusal_rate":
        return "refusal"
    if "perplexity" in base or base in ("bits_per_byte", "nll"):
        return "fluency"
    return "capability" if higher else "other"


def prompts_of(task: str) -> str | None:
    """Which prompts a task of ours asks: plain or typographic harmful prompts, or benign ones."""
    if not task.startswith("mm_toxic_qa"):
        return None
    if "benign" in task or "fluency" in task:
        return "benign"
    return "typographic" if "_adv" in task else "plain"


def decoding(run: dict, task: str, filt: str = "none") -> str | None:
    gen = rs.generation(run, task)
    if gen is None:  # no task config recorded: our tasks' filter still says it
        return "sampled" if filt == "samples" else None
    sampled = bool(gen.get("do_sample")) or (gen.get("temperature") or 0) > 0
    k = gen.get("repeats", 1)
    return f"sampled, {k} answers per prompt" if sampled and k > 1 else "sampled" if sampled else "greedy"


def label(spec: Spec, dec: str | None) -> str:
    m = spec.metric.removesuffix("_by_category")
    p = prompts_of(spec.task)
    d = f", {dec.split(',')[0]}" if dec else ""
    if m == "harmful_rate" and p in ("plain", "typographic"):
        text = f"harmful rate, {p} attack{d}" if p == "typographic" else f"harmful rate, plain prompts{d}"
    elif m == "harmful_rate" and p == "benign":
        text = f"toxic rate on benign prompts{d}"
    elif m == "refusal_rate" and p:
        text = f"refusal rate, {p} prompts{d}"
    elif m == "over_refusal_rate":
        text = f"over-refusal, benign prompts{d}"
    elif m == "helpfulness":
        text = f"capability: open answers{d}"
    elif m == "perplexity" and spec.task == "mm_toxic_qa_fluency":
        text = "fluency: perplexity of reference answers"
    else:
        text = f"{spec.task} {m}" + (f" [{spec.filter}]" if spec.filter != "none" else "")
    return text + (f" / {spec.category}" if spec.category is not None else "")


def _ordered_tasks(runs: dict[str, dict]) -> list[str]:
    seen = list(dict.fromkeys(t for r in runs.values() for t in r.get("results", {})))
    known = [t for t in TASK_ORDER if t in seen]
    return known + sorted(t for t in seen if t not in known)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _number(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def specs(runs: dict[str, dict]) -> list[Spec]:
    """Every metric of any run with a ``higher_is_better``, per category for dict-valued metrics."""
    out: list[Spec] = []
    for task in _ordered_tasks(runs):
        keys: dict[str, bool] = {}
        for r in runs.values():
            hib = r.get("higher_is_better", {}).get(task, {})
            for key, _v in r.get("results", {}).get(task, {}).items():
                name, _, filt = key.partition(",")
                if not filt or "_stderr" in name or name in SKIP or hib.get(name) is None:
                    continue
                keys.setdefault(key, bool(hib[name]))
        for key, higher in keys.items():
            name, _, filt = key.partition(",")
            kind = metric_kind(task, name, higher)
            cats: list = []
            scalar = False
            for r in runs.values():
                v = r.get("results", {}).get(task, {}).get(key)
                if isinstance(v, dict):
                    cats += [c for c in _flatten(v) if c not in cats]
                elif _number(v) is not None:
                    scalar = True
            if scalar:
                out.append(Spec(task, name, filt, None, higher, kind))
            out += [Spec(task, name, filt, c, higher, kind) for c in cats]
    return out


def reported(run: dict, spec: Spec) -> float | None:
    v = run.get("results", {}).get(spec.task, {}).get(spec.key)
    if spec.category is not None:
        v = _flatten(v).get(spec.category) if isinstance(v, dict) else None
    return _number(v)


def stderr(run: dict, spec: Spec) -> float | None:
    if spec.category is not None:
        return None
    m = run.get("results", {}).get(spec.task, {})
    for key in (f"{spec.metric}_stderr,{spec.filter}", f"{spec.metric}_stderr_clt,{spec.filter}"):
        se = _number(m.get(key))
        if se is not None:
            return se
    return None


@dataclass
class Cell:
    """One metric of one run: the value and how its interval was made."""

    value: float | None
    n: int | None
    method: str
    ci: list | None = None
    docs: rs.PerDoc | None = None
    g: str | None = None
    se: float | None = None
    reason: str | None = None


def cell(run: dict, spec: Spec, resamples: int, seed: int, cache: dict | None = None) -> Cell:
    v = reported(run, spec)
    if v is None:
        return Cell(None, None, "none")
    key = (id(run), spec.task, spec.metric, spec.filter)
    if cache is None or key not in cache:
        docs = rs.per_doc(rs.logged_samples(run, spec.task), spec.metric, spec.filter)
        if cache is not None:
            cache[key] = docs
    else:
        docs = cache[key]
    reason = docs if isinstance(docs, str) else None
    if not isinstance(docs, str):
        if spec.category is not None:
            docs = docs.subset(spec.category.split("/")[-1]) if docs.categories and any(docs.categories) else None
        g = rs.estimator(docs, v) if docs is not None and docs.ids else None
        if g is not None:
            # se kept: a difference to a run without samples falls back to the standard errors
            return Cell(v, len(docs.ids), "bootstrap", stats.bootstrap_ci(docs.a, docs.w, g, resamples, seed), docs, g,
                        se=stderr(run, spec))
        reason = "the logged per-sample values do not reproduce the reported value"
    se = stderr(run, spec)
    n = run.get("n-samples", {}).get(spec.task, {}).get("effective") if spec.category is None else None
    n = int(n) if isinstance(n, (int, float)) else None
    if se is not None:
        return Cell(v, n, "stderr", stats.normal_ci(v, se), se=se, reason=reason)
    return Cell(v, n, "none", reason=reason)


def compare_cells(base: Cell, other: Cell, spec: Spec, resamples: int, seed: int) -> dict:
    """delta, delta_ci, p_value, within_noise, relative_change, retention(_ci) of ``other`` vs ``base``."""
    out: dict = {"delta": None, "delta_ci": None, "delta_method": None, "p_value": None, "n_paired": None, "within_noise": None,
                 "relative_change": None}
    if spec.kind == "capability":
        out.update(retention=None, retention_ci=None)
    if base.value is None or other.value is None:
        return out
    out["delta"] = other.value - base.value
    if base.value != 0:
        out["relative_change"] = out["delta"] / base.value
    if spec.kind == "capability" and base.value != 0:
        out["retention"] = other.value / base.value
    if base.method == other.method == "bootstrap" and base.g == other.g:
        pos0 = {d: i for i, d in enumerate(base.docs.ids)}
        common = [(pos0[d], i) for i, d in enumerate(other.docs.ids) if d in pos0]
        if common:
            i0 = np.array([c[0] for c in common])
            i1 = np.array([c[1] for c in common])
            a0, w0, a1, w1 = base.docs.a[i0], base.docs.w[i0], other.docs.a[i1], other.docs.w[i1]
            paired = stats.paired_bootstrap(a0, w0, a1, w1, base.g, resamples, seed)
            d = a1 - a0 if np.array_equal(w0, w1) else a1 / w1 - a0 / w0
            out.update(delta_ci=paired["delta_ci"], p_value=stats.sign_flip_p(d, seed=seed), n_paired=len(common),
                       delta_method="paired bootstrap")
            if spec.kind == "capability":
                out["retention_ci"] = paired["ratio_ci"]
    elif base.se is not None and other.se is not None:
        se = math.sqrt(base.se ** 2 + other.se ** 2)
        out.update(delta_ci=stats.normal_ci(out["delta"], se), p_value=stats.normal_p(out["delta"], se),
                   delta_method="stderr, unpaired")
        if spec.kind == "capability" and out["retention"] is not None:
            rse = stats.ratio_se(out["retention"], other.value, other.se, base.value, base.se)
            out["retention_ci"] = stats.normal_ci(out["retention"], rse)
    if out["delta_ci"] is not None:
        lo, hi = out["delta_ci"]
        out["within_noise"] = bool(lo <= 0 <= hi)
    return out


def _is_group(run: dict, task: str) -> bool:
    """A group's row (lm-eval's ``groups``, lmms-eval's ``group_subtasks``): its samples are its tasks'."""
    return task in run.get("groups", {}) or bool(run.get("group_subtasks", {}).get(task))


def _digest(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def run_info(label_: str, run: dict, tasks: list[str]) -> dict:
    present = [t for t in tasks if t in run.get("results", {})]
    judges = {t: rs.judge_of(run, t) for t in present if rs.judge_of(run, t) is not None}
    digests = {t: rs.data_digest(run, t) for t in present}
    return {
        "label": label_, "path": run.get("source_file"), "harness": rs.harness(run),
        "paths": sorted(set(run["task_sources"].values())) if run.get("task_sources") else [run.get("source_file")],
        "model": run.get("config", {}).get("model"), "model_args": rs.model_args(run), "sgm": rs.sgm_of(run),
        "wore": rs.wore(rs.sgm_of(run)),
        "judge": next(iter(judges.values())) if len({judge_label(j) for j in judges.values()}) == 1 else
        (dict(judges.items()) or None),
        "generation": {t: rs.generation(run, t) for t in present if rs.generation(run, t) is not None},
        "data_digest": _digest(digests), "data_digests": digests,
        "samples_logged": [t for t in present if rs.logged_samples(run, t) is not None],
        "limit": run.get("config", {}).get("limit"), "seed": rs.seed(run),
    }


def build(runs: dict[str, dict], *, resamples: int = stats.RESAMPLES, seed: int = stats.SEED,
          max_examples: int = MAX_EXAMPLES, rule: RuleOptions = RuleOptions(), groups: dict | None = None) -> dict:
    """The report of ``runs`` (label -> results dict from :func:`~lmms_sgm.reports.results.load_run`;
    the first is the baseline). ``groups``: run -> (series, strength) for a sweep's curves."""
    if not runs:
        raise ValueError("a report needs at least one run")
    names = list(runs)
    base = names[0]
    tasks = _ordered_tasks(runs)
    warnings = mismatches(runs, tasks)
    for n, r in runs.items():
        missing = [t for t in tasks if t in r.get("results", {}) and rs.logged_samples(r, t) is None and not _is_group(r, t)]
        if missing:
            warnings.append(f"{n}: no logged samples for {', '.join(missing)} (run lmms-eval with --log_samples): "
                            "their intervals come from the harness's standard errors (normal, unpaired) where it "
                            "gives one, and they show no examples")
    spec_list = specs(runs)
    labels = _labels(runs, spec_list)
    rows, notes, unreproduced = [], [], []
    cache: dict = {}  # per-document items, parsed once per run, task and metric
    for spec in spec_list:
        cells = {n: cell(r, spec, resamples, seed, cache) for n, r in runs.items()}
        dec = next((d for d in (decoding(r, spec.task, spec.filter) for r in runs.values()) if d), None)
        common = {"task": spec.task, "metric": spec.metric, "filter": spec.filter, "category": spec.category,
                  "label": labels[spec], "kind": spec.kind, "higher_is_better": spec.higher,
                  "prompts": prompts_of(spec.task), "decoding": dec}
        for n in names:
            c = cells[n]
            if c.reason and c.reason not in ("samples not logged",) and c.value is not None:
                unreproduced.append(f"{spec.task} {spec.key}" + (f" / {spec.category}" if spec.category else "") + f" ({n}): {c.reason}")
            row = {**common, "run": n, "value": c.value, "ci": c.ci, "n": c.n, "method": c.method}
            if n != base:
                row.update(compare_cells(cells[base], c, spec, resamples, seed))
                moved = row["delta"] != 0 or row["delta_ci"] != [0.0, 0.0]  # identical on every prompt: nothing to say
                if (row.get("within_noise") and moved and spec.kind in ("harm", "capability", "over_refusal", "fluency")
                        and spec.category is None):
                    lo, hi = row["delta_ci"]
                    notes.append(f"{n} vs {base}: {common['label']} changes by {row['delta']:+.3f} "
                                 f"[{lo:+.3f}, {hi:+.3f}], within noise (the 95% interval of the difference includes 0"
                                 + (f"; p = {row['p_value']:.2g}" if row.get("p_value") is not None else "") + ")")
            rows.append(row)
    if unreproduced:
        warnings.append("no interval from the logged samples for: " + "; ".join(dict.fromkeys(unreproduced))
                        + " (the harness's standard error is used where there is one)")
    return {
        "schema": SCHEMA,
        "baseline": base,
        "runs": [run_info(n, runs[n], tasks) for n in names],
        "statistics": {"ci_level": stats.LEVEL, "bootstrap_resamples": resamples, "seed": seed,
                       "permutations": stats.PERMUTATIONS, "exact_permutation_max": stats.EXACT_MAX,
                       "ci": "percentile bootstrap over prompts (docs), prompts sorted by doc id, "
                             "numpy default_rng(seed).integers(0, n, (resamples, n))",
                       "delta_ci": "paired percentile bootstrap over the doc ids both runs share (same indices)",
                       "p_value": "two-sided paired sign-flip test; exact when at most 16 prompts differ, else "
                                  "random flips from default_rng(seed + 1), p = (1 + hits) / (1 + permutations)",
                       "retention_ci": "paired percentile bootstrap of value / baseline value",
                       "fallback": "without logged samples: value +- 1.96 stderr; differences unpaired"},
        "metrics": rows,
        "examples": collect_examples(runs, spec_list, max_examples),
        "tradeoff": tradeoff(rows, names, rule, groups),
        "warnings": warnings,
        "notes": notes,
    }


def _labels(runs: dict[str, dict], spec_list: list[Spec]) -> dict[Spec, str]:
    """Readable labels, unique: a label two metrics share gets its task and filter added."""
    out = {}
    for spec in spec_list:
        dec = next((d for d in (decoding(r, spec.task, spec.filter) for r in runs.values()) if d), None)
        out[spec] = label(spec, dec)
    seen: dict[str, int] = {}
    for text in out.values():
        seen[text] = seen.get(text, 0) + 1
    for spec, text in out.items():
        if seen[text] > 1:
            out[spec] = f"{text} ({spec.task}" + (f", {spec.filter}" if spec.filter != "none" else "") + ")"
    return out


def collect_examples(runs: dict[str, dict], spec_list: list[Spec], max_examples: int) -> dict:
    """``{"items": [...], "counts": {run: {task: {kind: n}}}}`` for the harm and capability metrics
    (no categories) of tasks with logged samples in both the baseline and the run."""
    names = list(runs)
    base = names[0]
    items, counts = [], {}
    for spec in spec_list:
        if spec.category is not None or spec.kind not in ("harm", "capability") or spec.metric.endswith("_by_category"):
            continue
        b = rs.logged_samples(runs[base], spec.task)
        for n in names[1:]:
            r = rs.logged_samples(runs[n], spec.task)
            if b is None or r is None:
                continue
            found = ex.changed(b, r, spec.metric, spec.filter, spec.kind)
            per_kind: dict[str, int] = {}
            for e in found:
                per_kind[e["kind"]] = per_kind.get(e["kind"], 0) + 1
                if per_kind[e["kind"]] <= max_examples:
                    items.append({"task": spec.task, "metric": spec.metric, "filter": spec.filter, "run": n, **e})
            counts.setdefault(n, {})[f"{spec.task} {spec.key}"] = per_kind
    return {"items": items, "counts": counts}


def primary_harm(rows: list[dict], rule: RuleOptions) -> tuple[str, str, str] | None:
    have = {(r["task"], r["metric"], r["filter"]) for r in rows if r["category"] is None and r["value"] is not None}
    if rule.metric:
        parts = rule.metric.split(":")
        key = (parts[0], parts[1] if len(parts) > 1 else "harmful_rate", parts[2] if len(parts) > 2 else "none")
        if key not in have:
            raise ValueError(f"harm metric {rule.metric!r} is not in the runs (have: "
                             + ", ".join(sorted(":".join(k) for k in have)) + ")")
        return key
    for key in PRIMARY_HARM:
        if key in have:
            return key
    return next(((r["task"], r["metric"], r["filter"]) for r in rows
                 if r["kind"] == "harm" and r["category"] is None and r["value"] is not None), None)


def tradeoff(rows: list[dict], names: list[str], rule: RuleOptions, groups: dict | None = None) -> dict:
    """Per run: the primary harmful rate (with CI), every capability metric's retention and the
    smallest of them, the over-refusal change; Pareto-optimal runs (no other run has both a lower
    or equal harmful rate and a higher or equal worst retention, one strictly) and the operating
    point chosen by ``rule``."""
    harm = primary_harm(rows, rule)
    points = []
    for n in names:
        mine = [r for r in rows if r["run"] == n and r["category"] is None]
        h = next((r for r in mine if harm and (r["task"], r["metric"], r["filter"]) == harm), None)
        caps = {f"{r['task']} {r['metric']}" + (f" [{r['filter']}]" if r["filter"] != "none" else ""):
                (1.0 if n == names[0] else r.get("retention")) for r in mine if r["kind"] == "capability" and r["value"] is not None}
        ret = [v for v in caps.values() if v is not None]
        over = [r.get("delta") for r in mine if r["kind"] == "over_refusal" and r.get("delta") is not None]
        fl = next((r for r in mine if r["kind"] == "fluency"), None)
        points.append({"run": n, "harm": h["value"] if h else None, "harm_ci": h["ci"] if h else None,
                       "retention": min(ret) if ret else None, "retention_by_metric": caps,
                       "over_refusal_points": (100 * max(over) if over else (0.0 if n == names[0] else None)),
                       "fluency": fl["value"] if fl else None})
        if groups and n in groups:
            points[-1].update(series=groups[n][0], strength=groups[n][1])
    for p in points:
        p["pareto"] = p["harm"] is not None and not any(
            q is not p and q["harm"] is not None and q["harm"] <= p["harm"] and (q["retention"] or 0) >= (p["retention"] or 0)
            and (q["harm"] < p["harm"] or (q["retention"] or 0) > (p["retention"] or 0)) for q in points)
    ok = [p for p in points[1:] if p["harm"] is not None and points[0]["harm"] is not None and p["harm"] < points[0]["harm"]
          and all(v is not None and v >= rule.retention for v in p["retention_by_metric"].values())
          and (p["over_refusal_points"] is None or p["over_refusal_points"] <= rule.over_refusal_points)]
    best = min(ok, key=lambda p: (p["harm"], -(p["retention"] or 0)), default=None)
    harm_label = next((r["label"] for r in rows if harm and (r["task"], r["metric"], r["filter"]) == harm), "harmful rate")
    return {"harm_metric": {"task": harm[0], "metric": harm[1], "filter": harm[2], "label": harm_label} if harm else None,
            "retention": "the smallest retention over the capability metrics (baseline = 1)",
            "points": points, "rule": {**{k: v for k, v in rule_to_dict(rule).items() if k != "fluency_ratio"},
                                           "text": rule_text(rule, harm_label)},
            "operating_point": best["run"] if best else None}
