"""Helpers shared by the benchmark scripts (imported as `common`: scripts run from this folder)."""
from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path


def median(xs):
    return statistics.median(xs)


def paired_ratio(base_times, ours_times, scale=1.0):
    """Median over repeats of (baseline time * scale) / (our time): a throughput ratio, ours / baseline."""
    ratios = [b * scale / o for b, o in zip(base_times, ours_times)]
    return median(ratios), min(ratios), max(ratios)


def fmt_ratio(med, lo, hi):
    return f"{med:.3f}x (per-repeat {lo:.3f}-{hi:.3f})"


def environment(load_start: float, **versions) -> dict:
    """Machine and library versions for the JSON report."""
    import nnsight
    import torch
    import transformers

    return {
        "python": platform.python_version(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__, "nnsight": nnsight.__version__,
        **versions,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "loadavg_start": load_start, "loadavg_end": os.getloadavg()[0],
    }


def write_json(path: str, doc: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"JSON written to {path}")


def met_mark(met) -> str:
    return "-" if met is None else ("yes" if met else "NO")


def print_table(head, rows, left: set[int]) -> None:
    """A plain-text table: columns in ``left`` left-aligned, the others right-aligned."""
    rows = [tuple(str(c) for c in row) for row in rows]
    widths = [max(len(x[i]) for x in rows + [tuple(head)]) for i in range(len(head))]
    print(" | ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))


def print_load(load_start: float, started: float) -> None:
    import time

    print(f"(load average 1 min: {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end on {os.cpu_count()} cores; "
          f"total {time.perf_counter() - started:.0f} s. Other processes on the machine add noise to every ratio.)")
