"""The point-value table of lmms-eval runs (the demo's comparison.md): a vanilla run against detoxified ones.

The full report (confidence intervals, paired differences, examples, plots) is
:mod:`lmms_sgm.reports.report`; this table is its short form, one value per run. The first run is
the baseline. Each row says how to read its change:

- ``lower`` (harmful rates): relative change, ``(run - baseline) / baseline`` (-0.9 = -90%);
- ``higher`` (capability): retention, ``run / baseline`` (0.95 = 95% of vanilla kept);
- ``points`` (over-refusal): the difference in percentage points.

Every value and change carries n, the number of prompts behind it (a "-100%" of 8 prompts is no
finding); the table names the results file of each run, keeps a task found in any run (n/a where
a run lacks it), and carries the warnings of :func:`lmms_sgm.reports.comparable.mismatches`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from lmms_sgm.reports.comparable import mismatches
from lmms_sgm.reports.results import logged_samples

HOW = ("lower", "higher", "points")


@dataclass(frozen=True)
class Row:
    """One line of a report: ``metric`` of ``task`` under lmms-eval filter ``filter``; for a
    ``*_by_category`` metric, ``category`` picks one entry of its dict."""

    label: str
    task: str
    metric: str
    filter: str = "none"
    how: str = "lower"
    category: str | None = None

    def __post_init__(self):
        if self.how not in HOW:
            raise ValueError(f"Row.how must be one of {HOW}, got {self.how!r}")


def value(run: dict, row: Row) -> float | None:
    """The row's number in ``run`` (None when the run lacks the task or the metric)."""
    task = run.get("results", {}).get(row.task)
    if task is None:
        return None
    v = task.get(f"{row.metric},{row.filter}")
    if row.category is not None:
        v = v.get(row.category) if isinstance(v, dict) else None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def count(run: dict, row: Row) -> int | None:
    """n: the number of prompts (documents) behind the row's value in ``run``: lmms-eval's
    ``n-samples`` (after ``--limit``); for a category, the logged samples of that category (None
    when the run was made without ``--log_samples``)."""
    if value(run, row) is None:
        return None
    if row.category is None:
        n = run.get("n-samples", {}).get(row.task, {}).get("effective")
        return int(n) if isinstance(n, (int, float)) else None
    samples = logged_samples(run, row.task)
    if samples is None:
        return None
    return sum(1 for s in samples if isinstance(s.get(row.metric), dict) and s[row.metric].get("category") == row.category)


def change(v: float | None, base: float | None, how: str) -> float | None:
    if v is None or base is None:
        return None
    if how == "points":
        return 100.0 * (v - base)
    if how == "higher":
        return v / base if base else None
    return (v - base) / base if base else None


def default_rows(run: dict) -> list[Row]:
    """Every scalar metric of ``run``, read by its task's ``higher_is_better``."""
    rows = []
    hib = run.get("higher_is_better", {})
    for task, metrics in sorted(run.get("results", {}).items()):
        for key, v in metrics.items():
            name, _, filt = key.partition(",")
            if not filt or "_stderr" in name or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            higher = hib.get(task, {}).get(name)
            if higher is None:
                continue
            rows.append(Row(f"{task} {name}" + (f" [{filt}]" if filt != "none" else ""), task, name, filt,
                            "higher" if higher else "lower"))
    return rows


def compare(runs: dict[str, dict], rows: list[Row] | None = None) -> dict:
    """``{"baseline", "runs", "sources", "warnings", "rows": [{label, task, metric, filter, how,
    category, values, n, changes}]}``; default rows: every scalar metric of any run."""
    if not runs:
        raise ValueError("compare needs at least one run")
    names = list(runs)
    base = names[0]
    if rows is None:
        rows = list(dict.fromkeys(row for r in runs.values() for row in default_rows(r)))
    out = []
    for row in rows:
        values = {n: value(r, row) for n, r in runs.items()}
        out.append({**asdict(row), "values": values, "n": {n: count(r, row) for n, r in runs.items()},
                    "changes": {n: change(values[n], values[base], row.how) for n in names[1:]}})
    return {"baseline": base, "runs": names, "sources": {n: r.get("source_file") for n, r in runs.items()},
            "warnings": mismatches(runs, list(dict.fromkeys(row.task for row in rows))), "rows": out}


def _num(v: float | None, fmt: str) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _n(n: int | None) -> str:
    return "?" if n is None else str(n)


def _change_text(c: float | None, how: str, v: float | None, base: float | None) -> str:
    if c is None and how == "lower" and v is not None and base == 0:
        return f"{100 * v:+.1f} pt (baseline 0)"
    if c is None:
        return "n/a"
    if how == "points":
        return f"{c:+.1f} pt"
    if how == "higher":
        return f"{c:.1%} kept"
    return f"{c:+.0%} ({100 * (v - base):+.1f} pt)"  # points too: a relative change of a tiny rate misleads


def to_markdown(table: dict) -> str:
    """The results files read, the warnings, then one line per row: each value with its n (prompts),
    each change with the n of both runs."""
    names, base = table["runs"], table["baseline"]
    lines = []
    sources = {n: s for n, s in table.get("sources", {}).items() if s}
    if sources:
        lines += ["Results files:", *[f"- {n}: `{s}`" for n, s in sources.items()], ""]
    for w in table.get("warnings", []):
        lines.append(f"**Warning:** {w}  ")
    if table.get("warnings"):
        lines.append("")
    lines.append("n: prompts behind each number.")
    lines.append("")
    lines.append("| metric | " + " | ".join(names) + " | " + " | ".join(f"{n} vs {base}" for n in names[1:]) + " |")
    lines.append("|" + "---|" * (1 + 2 * len(names) - 1))
    for r in table["rows"]:
        vals, ns = r["values"], r.get("n", {})
        cells = [_num(vals[n], ".3f") + ("" if vals[n] is None else f" (n={_n(ns.get(n))})") for n in names]
        for n in names[1:]:
            text = _change_text(r["changes"][n], r["how"], vals[n], vals[base])
            if text != "n/a":
                text += f", n={_n(ns.get(n))} vs {_n(ns.get(base))}"
            cells.append(text)
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
