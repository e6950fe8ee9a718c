"""Reading evaluation outputs: lmms-eval 0.7 and lm-eval 0.4 results folders and their logged samples.

Only files are read (no lmms-eval, lm-eval or model import), so runs made on another machine read
the same way. Both harnesses write one results JSON of the same shape (``results``, ``configs``,
``n-samples``, ``higher_is_better``, ``config.limit``) into ``<output_path>/<model>/``:

- lmms-eval: ``<date>_results.json`` and, with ``--log_samples``, ``<date>_samples_<task>.jsonl``;
- lm-eval: ``results_<date>.json`` and ``samples_<task>_<date>.jsonl`` (lines carry ``filter``).

A sample line holds ``doc_id``, the responses (``filtered_resps``), the prompt (lmms-eval:
``input``; lm-eval: ``arguments``) and every metric's per-document value under its name: a number,
or for our tasks a dict (``score`` / ``value`` / ``nll``, ``category``), or for lm-eval's
perplexities a ``[loglikelihood, weight]`` pair.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmms_sgm.reports import stats

RESULTS_GLOBS = ("*_results.json", "results_*.json")  # lmms-eval, lm-eval


def find_results(path: str | Path, newer_than: float | None = None) -> Path:
    """``path`` itself if it is a results file, else the one results file below it (lmms-eval
    writes ``<output_path>/<model>/<date>_results.json``, lm-eval ``.../results_<date>.json``),
    optionally only among files modified after ``newer_than`` (a ``time.time()`` value). Several
    candidates are an error that lists them: taking the newest silently once compared a smoke run
    instead of the measurement."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such lmms-eval output directory or results file")
    found = sorted({p for g in RESULTS_GLOBS for p in path.rglob(g)
                    if p.is_file() and (newer_than is None or p.stat().st_mtime >= newer_than)})
    if not found:
        raise FileNotFoundError(f"{path}: no lmms-eval *_results.json (nor lm-eval results_*.json) here"
                                + (" from this run" if newer_than else ""))
    if len(found) > 1:
        raise ValueError(f"{path} holds {len(found)} lmms-eval results files; pass the one to read instead of the "
                         "folder:\n" + "\n".join(f"  {p}" for p in found))
    return found[0]


def _read_results(source: Path) -> dict:
    from lmms_sgm import textfiles

    run = textfiles.read_json(source, "results file")
    if not isinstance(run, dict) or not isinstance(run.get("results"), dict):
        # a bad file is an input error like the others (the CLI reports ValueError in one line)
        raise ValueError(f"{source}: not an lmms-eval / lm-eval results file (no 'results' object)")
    run["source_file"] = str(source)
    return run


MERGED = ("results", "configs", "n-samples", "higher_is_better", "versions")


def load_run(path: str | Path) -> dict:
    """The results dict of ``path`` (see :func:`find_results`), plus ``source_file``: the file read.

    A folder holding exactly one lmms-eval and one lm-eval results file (a model's multimodal run
    and its text-only leg) is one run: the tasks of both, each read beside its own file
    (``task_sources``); the run-wide ``config`` is lmms-eval's."""
    path = Path(path)
    if path.is_dir():
        found = sorted({p for g in RESULTS_GLOBS for p in path.rglob(g) if p.is_file()})
        lm = [p for p in found if p.name.startswith("results_")]
        if len(found) == 2 and len(lm) == 1:
            return merge(_read_results(next(p for p in found if p not in lm)), _read_results(lm[0]))
    return _read_results(find_results(path))


def merge(lmms: dict, lm: dict) -> dict:
    """One run from an lmms-eval results dict and an lm-eval one (tasks must not overlap)."""
    both = set(lmms["results"]) & set(lm["results"])
    if both:
        raise ValueError(f"{lmms['source_file']} and {lm['source_file']} both hold {', '.join(sorted(both))}: "
                         "pass them as two runs")
    run = dict(lmms)
    for key in MERGED:
        run[key] = {**lmms.get(key, {}), **lm.get(key, {})}
    run["task_sources"] = {**dict.fromkeys(lmms["results"], lmms["source_file"]), **dict.fromkeys(lm["results"], lm["source_file"])}
    run["lm_eval_config"] = lm.get("config", {})
    return run


def harness(run: dict) -> str:
    if run.get("task_sources"):
        return "lmms-eval + lm-eval"
    source = Path(run.get("source_file") or "")
    if source.name.startswith("results_") or "lm_eval_version" in run or "pretty_env_info" in run:
        return "lm-eval"
    return "lmms-eval"


def samples_path(source: str | Path, task: str) -> Path:
    """Where the harness writes ``task``'s logged samples beside results file ``source``."""
    source = Path(source)
    if source.name.startswith("results_"):  # lm-eval: results_<date>.json -> samples_<task>_<date>.jsonl
        return source.with_name(f"samples_{task}_{source.name[len('results_'):-len('.json')]}.jsonl")
    return source.with_name(source.name.replace("_results.json", f"_samples_{task}.jsonl"))


def logged_samples(run: dict, task: str) -> list[dict] | None:
    """``task``'s logged sample lines beside the run's results file (None without ``--log_samples``)."""
    source = run.get("task_sources", {}).get(task) or run.get("source_file")
    if not source:
        return None
    path = samples_path(source, task)
    return _read_jsonl(str(path), path.stat().st_mtime) if path.is_file() else None


@functools.lru_cache(maxsize=64)
def _read_jsonl(path: str, mtime: float) -> list[dict]:  # mtime: a rewritten file is read again
    from lmms_sgm import textfiles

    return textfiles.read_jsonl(path, "samples file")


# ------------------------------------------------------------------ per-document values


@dataclass
class PerDoc:
    """One metric's per-document items of one run, sorted by doc id: value ``g(sum a / sum w)``."""

    ids: list
    a: np.ndarray
    w: np.ndarray
    categories: list

    def subset(self, category: str) -> PerDoc:
        keep = [i for i, c in enumerate(self.categories) if c == category]
        return PerDoc([self.ids[i] for i in keep], self.a[keep], self.w[keep], [category] * len(keep))

    def value(self, g: str) -> float | None:
        return stats.value(self.a, self.w, g) if self.ids and self.w.sum() else None


_BAD = object()


def _item(v):
    """``(a, w, category)`` of one logged per-document value; None when the document has no value
    for the metric (e.g. helpfulness without a reference answer); ``_BAD`` when it is not a number."""
    if isinstance(v, bool):
        return float(v), 1.0, None
    if isinstance(v, (int, float)):
        return (float(v), 1.0, None) if math.isfinite(v) else _BAD
    if isinstance(v, dict):
        for key in ("score", "value", "nll"):
            x = v.get(key)
            if isinstance(x, (int, float)) and not isinstance(x, bool):
                return float(x), 1.0, v.get("category")
        return None if "category" in v and not any(k in v for k in ("score", "value", "nll")) else _BAD
    if (isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
        return float(v[0]), float(v[1]), None  # lm-eval's [loglikelihood, weight]
    return _BAD


def doc_key(doc_id):
    return (0, doc_id, "") if isinstance(doc_id, (int, float)) else (1, 0, str(doc_id))


def samples_for_filter(samples: list[dict], filt: str) -> dict | str:
    """``{doc_id: sample line}`` of one filter, or a reason string when that is ambiguous."""
    out: dict = {}
    for s in samples:
        if "filter" in s and s["filter"] != filt:
            continue
        if "doc_id" not in s:
            return "sample lines carry no doc_id"
        if s["doc_id"] in out:
            return f"doc {s['doc_id']} is logged more than once (several filters without a filter key)"
        out[s["doc_id"]] = s
    return out


def per_doc(samples: list[dict] | None, metric: str, filt: str) -> PerDoc | str:
    """The metric's per-document items, or why there are none (a reason string)."""
    if samples is None:
        return "samples not logged"
    lines = samples_for_filter(samples, filt)
    if isinstance(lines, str):
        return lines
    ids, a, w, cats = [], [], [], []
    for doc_id in sorted(lines, key=doc_key):
        s = lines[doc_id]
        if metric not in s:
            continue
        item = _item(s[metric])
        if item is _BAD:
            return f"per-sample values of {metric} are not numbers"
        if item is None:
            continue
        ids.append(doc_id)
        a.append(item[0])
        w.append(item[1])
        cats.append(item[2])
    if not ids:
        return f"no per-sample values of {metric} logged"
    return PerDoc(ids, np.array(a), np.array(w), cats)


def estimator(docs: PerDoc, reported: float) -> str | None:
    """The transform ``g`` under which the per-document items reproduce the harness's aggregate
    (None: they do not, e.g. a circular-evaluation accuracy)."""
    weighted = bool(np.any(docs.w != 1))
    for g in (("exp_neg_mean", "bits", "mean") if weighted else ("mean", "exp_mean", "exp_neg_mean")):
        with np.errstate(over="ignore"):
            v = docs.value(g)
        if v is not None and math.isfinite(v) and abs(v - reported) <= 1e-9 + 1e-6 * abs(reported):
            return g
    return None


# ------------------------------------------------------------------ run descriptions


def model_args(run: dict) -> str | None:
    cfg = run.get("config", {})
    v = cfg.get("model_args")
    return v if isinstance(v, str) or v is None else json.dumps(v, sort_keys=True)


def judge_of(run: dict, task: str):
    """The judge recorded by our tasks (``judge,<filter>``), or None."""
    for key, v in run.get("results", {}).get(task, {}).items():
        if key.startswith("judge,") and isinstance(v, dict):
            return v
    return None


def sgm_of(run: dict) -> dict | None:
    """What the model wore, as our tasks recorded it (the ``sgm`` metric)."""
    for metrics in run.get("results", {}).values():
        for key, v in metrics.items():
            if key.startswith("sgm,") and isinstance(v, dict):
                return v
    return None


def wore(sgm: dict | None) -> str:
    """What a run wore, in a few words, from its ``sgm`` record: the glasses (rule or kind, strength)
    and the defenses, e.g. ``SGM t=0.5 s=1 + self_check+output_filter`` (SGM*)."""
    if not sgm or "sgm" not in sgm:
        return "not recorded"
    if not sgm["sgm"]:
        parts = ["vanilla"]
    elif (sgm.get("glasses_kind") or sgm.get("kind")) == "gated_steering":
        parts = [f"{'gated ' if sgm.get('gated') else ''}steering layer {sgm.get('layer')} c={sgm.get('c'):g} s={sgm.get('strength'):g}"]
    elif (sgm.get("glasses_kind") or sgm.get("kind")) not in (None, "sgm", "causal_lm", "mllm_text_only"):
        # A kind from a plugin: its name (lm-eval records it as glasses_kind, beside the model's kind).
        parts = [f"{sgm.get('glasses_kind') or sgm.get('kind')} s={sgm.get('strength', 1):g}"]
    else:
        sel = sgm.get("selection") or {}
        rule = sel.get("rule", "sgm")
        what = {"sgm": f"SGM t={sel.get('threshold', 0.5):g}", "det0": f"Det0 top-{sel.get('top_k')}",
                "damp": f"Damp top-{sel.get('top_k')} x{sel.get('damp_factor', 0.5):g}"}.get(rule, rule)
        parts = [what + (" text-only" if sgm.get("text_only") else "") + f" s={sgm.get('strength', 1):g}"]
    names = [d.get("name", "?") for d in sgm.get("defenses") or []]
    if names:
        parts = (["+".join(names)] if not sgm["sgm"] else parts + ["+".join(names)])
    return " + ".join(parts)


def generation(run: dict, task: str) -> dict | None:
    """The decoding settings a task ran with: its config's ``generation_kwargs`` (with lmms-eval's
    ``--gen_kwargs`` already merged in), ``repeats``, and the run-wide ``--gen_kwargs`` and seed.
    None for tasks that do not generate (log-likelihood)."""
    cfg = run.get("configs", {}).get(task)
    if cfg is None or cfg.get("output_type", "generate_until") != "generate_until":
        return None
    gen = dict(cfg.get("generation_kwargs") or {})
    if cfg.get("repeats", 1) != 1:
        gen["repeats"] = cfg.get("repeats")
    cli = run.get("config", {}).get("gen_kwargs")
    if cli:
        gen["--gen_kwargs"] = cli
    return gen


def seed(run: dict):
    cfg = run.get("config", {})
    return cfg.get("random_seed", cfg.get("seed"))


def data_digest(run: dict, task: str) -> str | None:
    """A digest of what ``task`` was evaluated on: with logged samples, the doc ids, prompts and
    targets (``samples:<sha>``); without, the task's dataset settings and document count
    (``config:<sha>``: weaker, environment-chosen data does not show there)."""
    samples = logged_samples(run, task)
    if samples:
        lines = samples_for_filter(samples, _first_filter(run, task))
        if isinstance(lines, dict):
            rows = [[str(k), _prompt(s), str(s.get("target"))] for k, s in sorted(lines.items(), key=lambda kv: doc_key(kv[0]))]
            return "samples:" + hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]
    cfg = run.get("configs", {}).get(task)
    if cfg is None:
        return None
    keep = {k: cfg.get(k) for k in ("dataset_path", "dataset_name", "dataset_kwargs", "test_split")}
    keep["n"] = run.get("n-samples", {}).get(task)
    return "config:" + hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _first_filter(run: dict, task: str) -> str:
    for key in run.get("results", {}).get(task, {}):
        name, _, filt = key.partition(",")
        if filt and "_stderr" not in name:
            return filt
    return "none"


def _prompt(sample: dict) -> str:
    """The prompt text of a sample line (lmms-eval ``input``; lm-eval the first request argument)."""
    if isinstance(sample.get("input"), str):
        return sample["input"]
    args = sample.get("arguments")
    if isinstance(args, dict):
        first = next(iter(args.values()), {})
        if isinstance(first, dict):
            return str(first.get("arg_0", ""))
    if isinstance(args, list) and args:
        return str(args[0][0] if isinstance(args[0], (list, tuple)) else args[0])
    doc = sample.get("doc")
    return str(doc.get("question", "")) if isinstance(doc, dict) else ""


prompt_of = _prompt


def responses(sample: dict) -> list[str]:
    """The responses of a sample line, flattened to strings."""
    r = sample.get("filtered_resps", sample.get("resps"))
    out: list[str] = []

    def walk(x):
        if isinstance(x, (list, tuple)):
            for y in x:
                walk(y)
        elif x is not None:
            out.append(str(x))

    walk(r)
    return out


def verdicts(sample: dict) -> list[dict]:
    """The judge's per-response verdicts our tasks log (``judge.verdicts``), else []."""
    j = sample.get("judge")
    return list(j.get("verdicts") or []) if isinstance(j, dict) else []
