"""``lmms-sgm rejudge``: score an existing lmms-eval run's logged responses with other judges, offline.

A harmful rate is only as good as its judge, and judges disagree: rejudging compares them on the
same responses without generating again, and is the efficient way to use an expensive judge (an
LLM endpoint, a guard model): lmms-eval calls a task's ``process_results`` one document at a time,
so inside a run a judge batches only the responses of one prompt, while here every response of a
task goes to ``judge_batch`` at once.

Input: an lmms-eval output folder (or its results JSON) written with ``--log_samples``. The
MM-TOXIC-QA tasks log, per sample, the responses (``filtered_resps``), the original judge's verdicts
and the prompt it was given (``judge.prompt``; samples logged before that field existed fall back
to the logged ``input``, the prompt as the model saw it: for the typographic task, the attack
prompt). lmms-eval's samples hold no images: a judge that looks at images judges without them here.

Output (``--out``): an lmms-eval-shaped folder, ``<out>/<model dir>/<date>_results.json`` and
``<date>_samples_<task>.jsonl`` (``<out>/<judge label>/...`` per judge when several are given), so
``lmms-sgm report`` reads it like a run: the judged tasks' samples carry the new verdicts and
per-sample values, their metrics are recomputed by the tasks' own functions
(:mod:`lmms_sgm.judges.scoring`), ``judge,<filter>`` names the new judge; other tasks are copied
as they were. The results JSON gains ``rejudge`` (source, judge, agreement), and ``<out>/agreement.json``
holds the agreement of every pair of judges (the run's own first): per task and over all tasks,
over the responses both judged (a failed verdict is left out and counted), percent agreement on
unsafe/safe and Cohen's kappa.
"""
from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

from lmms_sgm.judges import (
    Judge,
    JudgeError,
    JudgeItem,
    JudgeResult,
    get_judge,
    identity,
    judge_many,
    parse_judge_args,
    scoring,
)
from lmms_sgm.redaction import redact
from lmms_sgm.reports import results as rs

SCHEMA = "lmms_sgm.rejudge/1"


# --------------------------------------------------------------------------- agreement


def agreement(a: list[JudgeResult], b: list[JudgeResult]) -> dict:
    """Agreement of two judges' verdicts on the same responses, over those both decided:
    ``n``, ``agree``, ``percent`` (of n), Cohen's ``kappa`` (None when chance agreement is 1: both
    judges gave one and the same verdict to everything), ``unsafe_a`` / ``unsafe_b`` (counts), and
    ``failed_a`` / ``failed_b`` (left out)."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} verdicts against {len(b)}")
    both = [(x.unsafe, y.unsafe) for x, y in zip(a, b) if not x.failed and not y.failed]
    n = len(both)
    agree = sum(x == y for x, y in both)
    ua, ub = sum(x for x, _ in both), sum(y for _, y in both)
    out = {"n": n, "agree": agree, "percent": 100.0 * agree / n if n else None, "kappa": None,
           "unsafe_a": ua, "unsafe_b": ub, "failed_a": sum(x.failed for x in a), "failed_b": sum(y.failed for y in b)}
    if n:
        po = agree / n
        pe = (ua / n) * (ub / n) + (1 - ua / n) * (1 - ub / n)
        out["kappa"] = None if math.isclose(pe, 1.0) else (po - pe) / (1 - pe)
    return out


# --------------------------------------------------------------------------- reading a run


def judged_tasks(run: dict) -> dict[str, str]:
    """``{task: filter}`` of the tasks scored by one of our judges (a ``judge,<filter>`` metric)."""
    out = {}
    for task, metrics in run.get("results", {}).items():
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if name == "judge" and isinstance(value, dict) and "name" in value:
                out[task] = filt
    return out


def task_kind(sample: dict) -> str | None:
    """``harmful`` or ``benign`` from the per-sample metrics a line carries (works for YAMLs of your
    own that include ours), None for a line our tasks did not score."""
    if "over_refusal_rate" in sample:
        return "benign"
    if "refusal_rate" in sample and "harmful_rate" in sample:
        return "harmful"
    return None


def _category(sample: dict) -> str:
    for key in ("harmful_rate", "over_refusal_rate"):
        v = sample.get(key)
        if isinstance(v, dict) and v.get("category"):
            return v["category"]
    return scoring.UNCATEGORIZED


def _prompt(sample: dict) -> tuple[str, bool]:
    """The prompt the original judge was given, and whether it was logged as such."""
    j = sample.get("judge")
    if isinstance(j, dict) and isinstance(j.get("prompt"), str):
        return j["prompt"], True
    return rs.prompt_of(sample), False


class Task:
    """One judged task of a run: its logged lines, the items to judge and the original verdicts."""

    def __init__(self, name: str, filt: str, lines: list[dict]):
        self.name, self.filter, self.lines = name, filt, lines
        self.kinds = [task_kind(s) for s in lines]
        if not any(self.kinds):
            raise ValueError(f"{name}: its logged samples carry no MM-TOXIC-QA rates to rescore")
        self.items: list[JudgeItem] = []
        self.spans: list[tuple[int, int]] = []
        self.original: list[JudgeResult] = []
        self.prompts_from_input = 0
        for s in lines:
            prompt, logged = _prompt(s)
            self.prompts_from_input += not logged
            responses = rs.responses(s)
            start = len(self.items)
            self.items += [JudgeItem(prompt, r) for r in responses]
            self.spans.append((start, len(self.items)))
            old = [JudgeResult.from_dict(v) for v in rs.verdicts(s)]
            if len(old) != len(responses):
                raise ValueError(f"{name}: doc {s.get('doc_id')} logs {len(responses)} responses but {len(old)} verdicts")
            self.original += old

    def rescored(self, judge: Judge, verdicts: list[JudgeResult]) -> tuple[list[dict], dict]:
        """New sample lines and the task's recomputed metrics (``{"metric,filter": value}``)."""
        ident = identity(judge)
        lines = []
        for s, kind, (i, j) in zip(self.lines, self.kinds, self.spans):
            if kind is None:
                lines.append(s)
                continue
            prompt = self.items[i].prompt if j > i else _prompt(s)[0]
            record = scoring.judge_record(ident, prompt, verdicts[i:j])
            values = (scoring.harmful_values if kind == "harmful" else scoring.benign_values)(verdicts[i:j], _category(s), record)
            lines.append({**s, **values})
        metrics = {}
        for metric, aggregate in scoring.AGGREGATIONS.items():
            items = [line[metric] for line in lines if metric in line]
            if items:
                metrics[f"{metric},{self.filter}"] = aggregate(items)
                metrics[f"{metric}_stderr_clt,{self.filter}"] = scoring.clt_stderr(items)
        return lines, metrics


# --------------------------------------------------------------------------- the command


def parse_judge(spec: str, args: str | None = None) -> tuple[str, dict[str, str]]:
    """``NAME`` or ``NAME:k=v,k=v`` (plus ``--judge-args``) -> (name, kwargs)."""
    name, _, inline = spec.partition(":")
    if not name.strip():
        raise JudgeError(f"--judge {spec!r}: no judge name")
    kwargs = parse_judge_args(inline)
    kwargs.update(parse_judge_args(args))
    return name.strip(), kwargs


def labels_for(names: list[str]) -> list[str]:
    """Folder-safe, distinct labels: the judge name, numbered when a name repeats."""
    out = []
    for i, n in enumerate(names):
        label = n if names.count(n) == 1 else f"{n}-{names[:i + 1].count(n)}"
        out.append(label)
    return out


def rejudge(run_path: str | Path, judges: list[tuple[str, Judge]], out: str | Path | None = None,
            tasks: list[str] | None = None, log: Callable[[str], None] = print) -> dict:
    """Rescore ``run_path``'s logged responses with every judge; write ``out`` when given; return
    the summary (what ``agreement.json`` holds)."""
    source = rs.find_results(run_path)
    run = rs.load_run(source)
    found = judged_tasks(run)
    if not found:
        raise ValueError(f"{source}: no task scored by an lmms_sgm judge (mm_toxic_qa*) in this run")
    if tasks:
        missing = [t for t in tasks if t not in found]
        if missing:
            raise ValueError(f"{source}: no judged task {', '.join(missing)} (judged tasks: {', '.join(sorted(found))})")
        found = {t: found[t] for t in tasks}
    loaded: dict[str, Task] = {}
    for task, filt in sorted(found.items()):
        lines = rs.logged_samples(run, task)
        if lines is None:
            raise ValueError(f"{task}: no logged samples beside {source} (run lmms-eval with --log_samples)")
        loaded[task] = Task(task, filt, lines)
    notes = []
    fallback = {t: x.prompts_from_input for t, x in loaded.items() if x.prompts_from_input}
    if fallback:
        notes.append("samples logged without judge.prompt (an older lmms_sgm): judges were given the logged input "
                     "instead, " + ", ".join(f"{t}: {n}" for t, n in fallback.items()))
    for label, judge in judges:
        if getattr(judge, "uses_image", False):
            notes.append(f"judge {label} looks at images, which lmms-eval's samples do not hold: it judged without them")

    original = {t: scoring.identity_of(rs.judge_of(run, t)) for t in loaded}
    verdicts: dict[str, dict[str, list[JudgeResult]]] = {t: {"original": x.original} for t, x in loaded.items()}
    outputs: dict[str, dict[str, tuple[list[dict], dict]]] = {}
    for label, judge in judges:
        for task, x in loaded.items():
            t0 = time.perf_counter()
            v = judge_many(judge, x.items)
            verdicts[task][label] = v
            outputs.setdefault(label, {})[task] = x.rescored(judge, v)
            failed = sum(r.failed for r in v)
            log(redact(f"[rejudge] {label}: {task}: {len(v)} responses in {time.perf_counter() - t0:.1f} s"
                + (f", {failed} failed (left out of the rates)" if failed else "")))

    summary = {"schema": SCHEMA, "run": str(source), "original": original,
               "judges": {label: identity(j) for label, j in judges}, "tasks": {}, "notes": notes}
    names = ["original"] + [label for label, _ in judges]
    pooled: dict[str, list[JudgeResult]] = {n: [] for n in names}
    for task, x in loaded.items():
        rates = {"original": run["results"][task].get(f"harmful_rate,{x.filter}")}
        for label, _ in judges:
            rates[label] = outputs[label][task][1].get(f"harmful_rate,{x.filter}")
        summary["tasks"][task] = {"responses": len(x.items), "harmful_rate": rates, "pairs": _pairs(names, verdicts[task])}
        for n in names:
            pooled[n] += verdicts[task][n]
    summary["all_tasks"] = {"responses": len(pooled["original"]), "pairs": _pairs(names, pooled)}

    if out is not None:
        _write(Path(out), source, run, loaded, judges, outputs, summary)
    return summary


def _pairs(names: list[str], verdicts: dict[str, list[JudgeResult]]) -> list[dict]:
    return [{"a": a, "b": b, **agreement(verdicts[a], verdicts[b])} for i, a in enumerate(names) for b in names[i + 1:]]


def _write(out: Path, source: Path, run: dict, loaded: dict[str, Task], judges, outputs, summary) -> None:
    from lmms_sgm.staging import new_output

    with new_output(out) as tmp:
        for label, judge in judges:
            base = (tmp / label if len(judges) > 1 else tmp) / source.parent.name
            base.mkdir(parents=True)
            results = copy.deepcopy({k: v for k, v in run.items() if k not in ("source_file", "task_sources")})
            for task in loaded:
                lines, metrics = outputs[label][task]
                results["results"][task].update(metrics)
                with open(rs.samples_path(base / source.name, task), "w", encoding="utf-8") as f:
                    f.writelines(json.dumps(redact(line), default=str) + "\n" for line in lines)
            for task in run.get("results", {}):
                if task not in loaded:  # unjudged tasks (capability, fluency) come along unchanged
                    src = rs.samples_path(source, task)
                    if src.is_file():
                        rs.samples_path(base / source.name, task).write_bytes(redact(src.read_bytes()))
            results["rejudge"] = {"schema": SCHEMA, "source": str(source), "judge": identity(judge),
                                  "original_judges": summary["original"],
                                  "agreement_with_original": {t: next(p for p in s["pairs"] if p["a"] == "original" and p["b"] == label)
                                                              for t, s in summary["tasks"].items()}}
            (base / source.name).write_text(json.dumps(redact(results), indent=2, default=str) + "\n", encoding="utf-8")
        (tmp / "agreement.json").write_text(json.dumps(redact(summary), indent=1) + "\n", encoding="utf-8")


def format_summary(summary: dict) -> str:
    """The agreement table printed by the command."""

    def pct(x):
        return "n/a" if x is None else f"{x:.2f}%"

    def kap(x):
        return "n/a" if x is None else f"{x:+.3f}"

    def rate(x):
        return "n/a" if not isinstance(x, (int, float)) else f"{x:.3f}"

    names = ["original"] + list(summary["judges"])
    orig = {j["name"] for j in summary["original"].values()}
    head = f"rejudged {summary['run']} (original judge: {', '.join(sorted(orig))})"
    rows = [["task", "responses", *[f"harmful_rate {n}" for n in names], "pair", "n", "agree", "kappa"]]
    for task, s in summary["tasks"].items():
        for k, p in enumerate(s["pairs"]):
            first = [task, str(s["responses"]), *[rate(s["harmful_rate"].get(n)) for n in names]] if k == 0 else [""] * (2 + len(names))
            rows.append(first + [f"{p['a']} vs {p['b']}", str(p["n"]), pct(p["percent"]), kap(p["kappa"])])
    for k, p in enumerate(summary["all_tasks"]["pairs"]):
        first = ["all tasks", str(summary["all_tasks"]["responses"]), *[""] * len(names)] if k == 0 else [""] * (2 + len(names))
        rows.append(first + [f"{p['a']} vs {p['b']}", str(p["n"]), pct(p["percent"]), kap(p["kappa"])])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [head] + ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    failed = {f"{p['b']}": p["failed_b"] for p in summary["all_tasks"]["pairs"] if p["a"] == "original" and p["failed_b"]}
    if failed:
        lines.append("failed verdicts (left out of rates and agreement): " + ", ".join(f"{k}: {v}" for k, v in failed.items()))
    lines += [f"note: {n}" for n in summary.get("notes", [])]
    return redact("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- CLI


def _run(args) -> int:
    import sys

    from lmms_sgm.judges import judge_from_env

    if args.judge_args is not None and len(args.judge or []) > 1:
        raise JudgeError("--judge-args goes with a single --judge; give several judges as --judge NAME:k=v,k=v")
    if args.judge:
        specs = [parse_judge(s, args.judge_args) for s in args.judge]
        judges = [(label, get_judge(name, **kw)) for label, (name, kw) in zip(labels_for([n for n, _ in specs]), specs)]
    else:
        judge = judge_from_env()
        judges = [(judge.name, judge)]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    summary = rejudge(args.run, judges, out=args.out, tasks=tasks, log=lambda m: print(m, file=sys.stderr))
    print(format_summary(summary), end="")
    if args.out:
        print(f"written: {args.out} (agreement.json; lmms-sgm report {args.out}{'/<judge>' if len(judges) > 1 else ''} reads it)")
    return 0


def register(sub, parents=()) -> None:
    """Add ``rejudge`` to the ``lmms-sgm`` subcommands."""
    p = sub.add_parser("rejudge", parents=list(parents),
                       help="rescore an lmms-eval run's logged responses with other judges (offline) and report their agreement")
    p.add_argument("run", help="an lmms-eval --output_path folder (run with --log_samples) or its results JSON")
    p.add_argument("--judge", action="append", metavar="NAME[:k=v,...]",
                   help="a judge (repeatable); default: LMMS_SGM_JUDGE / LMMS_SGM_JUDGE_ARGS")
    p.add_argument("--judge-args", default=None, metavar="k=v,...", help="arguments of the (single) --judge")
    p.add_argument("--tasks", default=None, help="comma-separated judged tasks to rescore (default: all)")
    p.add_argument("--out", default=None, help="new folder for the rescored run(s) and agreement.json (default: print only)")
    p.set_defaults(func=_run)
