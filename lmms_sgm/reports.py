"""Side-by-side reports of lmms-eval runs: a vanilla run against detoxified ones.

Reads only the ``*_results.json`` files lmms-eval writes (no lmms-eval import), so runs made on
another machine compare the same way. The first run is the baseline. Each row says how to read
its change:

- ``lower`` (harmful rates): relative change, ``(run - baseline) / baseline`` (-0.9 = -90%);
- ``higher`` (capability): retention, ``run / baseline`` (0.95 = 95% of vanilla kept);
- ``points`` (over-refusal): the difference in percentage points.

    lmms-sgm report runs/vanilla runs/sgm [--names vanilla,sgm] [--out report.md] [--json report.json]
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

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


def find_results(path: str | Path, newer_than: float | None = None) -> Path:
    """``path`` itself if it is a results file, else the newest ``*_results.json`` below it
    (lmms-eval writes ``<output_path>/<model>/<timestamp>_results.json``), optionally only files
    modified after ``newer_than`` (a ``time.time()`` value)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such lmms-eval output directory or results file")
    found = [p for p in path.rglob("*_results.json") if newer_than is None or p.stat().st_mtime >= newer_than]
    if not found:
        raise FileNotFoundError(f"{path}: no lmms-eval *_results.json here" + (" from this run" if newer_than else ""))
    return max(found, key=lambda p: p.stat().st_mtime)


def load_run(path: str | Path) -> dict:
    with open(find_results(path), encoding="utf-8") as f:
        return json.load(f)


def value(run: dict, row: Row) -> float | None:
    """The row's number in ``run`` (None when the run lacks the task or the metric)."""
    task = run.get("results", {}).get(row.task)
    if task is None:
        return None
    v = task.get(f"{row.metric},{row.filter}")
    if row.category is not None:
        v = v.get(row.category) if isinstance(v, dict) else None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


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
    """``{"baseline", "runs", "rows": [{label, task, metric, filter, how, values, changes}]}``."""
    if not runs:
        raise ValueError("compare needs at least one run")
    names = list(runs)
    base = names[0]
    rows = default_rows(runs[base]) if rows is None else rows
    out = []
    for row in rows:
        values = {n: value(r, row) for n, r in runs.items()}
        out.append({**asdict(row), "values": values,
                    "changes": {n: change(values[n], values[base], row.how) for n in names[1:]}})
    return {"baseline": base, "runs": names, "rows": out}


def _num(v: float | None, fmt: str) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


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
    names, base = table["runs"], table["baseline"]
    head = "| metric | " + " | ".join(names) + " | " + " | ".join(f"{n} vs {base}" for n in names[1:]) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(names) - 1)]
    for r in table["rows"]:
        cells = [_num(r["values"][n], ".3f") for n in names] + [_change_text(r["changes"][n], r["how"], r["values"][n], r["values"][base])
                                                             for n in names[1:]]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(paths: list[str], names: list[str] | None = None, out: str | None = None, json_out: str | None = None) -> str:
    names = names or [Path(p).name for p in paths]
    if len(names) != len(paths):
        raise ValueError(f"{len(names)} names for {len(paths)} runs")
    if len(set(names)) != len(names):
        raise ValueError(f"run names must differ: {names}")
    table = compare({n: load_run(p) for n, p in zip(names, paths)})
    text = to_markdown(table)
    if out:
        Path(out).write_text(text, encoding="utf-8")
    if json_out:
        Path(json_out).write_text(json.dumps(table, indent=1), encoding="utf-8")
    return text
