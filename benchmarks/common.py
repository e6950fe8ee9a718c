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
