#!/usr/bin/env python
"""Demo timings: training time per step, and the end-to-end wall time of the README's main command.

    .venv/bin/python benchmarks/bench_demo.py [--train-minutes 2] [--limit N] [--json PATH]

1. Training: ``lmms_sgm.demo.train.train`` from a random initialisation for ``--train-minutes``
   (half stage 1, half stage 2, 2 threads, batch 64 / 128 images in stage 1), ms per step of each
   stage (median of the logged per-step times and mean over the stage).
2. The README's main command, ``lmms-sgm demo`` (three lmms-eval runs on the test split), as a
   subprocess: its wall time, and per configuration. Beside it, the in-process demo evaluator
   (``lmms_sgm.demo.evaluate.evaluate_split``, same split, vanilla, same amount of generation) so
   the ratio shows what going through lmms-eval costs. ``--limit N`` passes ``--limit`` to the
   demo (a smoke test, not the README figure).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import environment, median, print_load, print_table, write_json

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


def bench_training(minutes: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "train.log"
        cmd = [sys.executable, "-c", ("import sys; from lmms_sgm.demo.train import train; "
                                      f"train(sys.argv[1], minutes={minutes}, stage1_frac=0.5, log_every=10)"),
               str(Path(tmp) / "m")]
        t0 = time.perf_counter()
        with open(log, "w") as f:
            subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - t0
        text = log.read_text()
        stats = json.loads((Path(tmp) / "m" / "training.json").read_text())
    per_step = {s: [float(x) for x in re.findall(rf"\[{s}\] step \d+ .*? (\d+) ms/step", text)] for s in ("stage1", "stage2")}
    return {"wall_s": wall, "stats": stats,
            "median_logged_ms": {s: median(v) if v else None for s, v in per_step.items()}}


def bench_demo(limit: int | None, out: str | None) -> dict:
    keep = out is not None
    out = out or tempfile.mkdtemp(prefix="bench_demo_")
    cmd = [sys.executable, "-m", "lmms_sgm.cli", "demo", "--out", out] + (["--limit", str(limit)] if limit else [])
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"lmms-sgm demo failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    per_config = {m.group(1): float(m.group(2)) for m in re.finditer(r"\[demo\] (\S+): done in (\d+) s", res.stdout)}
    if not keep:
        shutil.rmtree(out)
    return {"wall_s": wall, "per_config_s": per_config, "out": out if keep else None}


def bench_in_process() -> float:
    import torch

    from lmms_sgm import models
    from lmms_sgm.demo import DATA_DIR, SHORT_NAME
    from lmms_sgm.demo.evaluate import evaluate_split

    torch.set_num_threads(2)
    model, processor = models.load(SHORT_NAME)
    t0 = time.perf_counter()
    evaluate_split(model, processor, DATA_DIR, "test", samples=5)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-minutes", type=float, default=2.0)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--json", default="runs/bench_demo.json")
    ap.add_argument("--demo-out", default=None, help="keep the demo's lmms-eval outputs here (default: a temporary directory, removed)")
    args = ap.parse_args()
    load0, started = os.getloadavg()[0], time.perf_counter()
    train = bench_training(args.train_minutes)
    demo = bench_demo(args.limit, args.demo_out)
    inproc = bench_in_process()
    s = train["stats"]
    print_table(
        ["measurement", "value"],
        [
            (
                "training stage 1 (vision tower + projector, 128 images/step)",
                (
                    f"{s['stage1']['ms_per_step']:.0f} ms/step mean over {s['stage1']['steps']} steps "
                    f"(median logged {train['median_logged_ms']['stage1']:.0f})"
                ),
            ),
            (
                "training stage 2 (end-to-end, 64 conversations/step)",
                (
                    f"{s['stage2']['ms_per_step']:.0f} ms/step mean over {s['stage2']['steps']} steps "
                    f"(median logged {train['median_logged_ms']['stage2']:.0f})"
                ),
            ),
            (
                "training run wall time (incl. data generation, save, reload check)",
                f"{train['wall_s']:.0f} s for a {args.train_minutes} min budget",
            ),
            (
                "README main command `lmms-sgm demo`" + (f" --limit {args.limit}" if args.limit else ""),
                f"{demo['wall_s']:.0f} s end to end",
            ),
            *[(f"  lmms-eval run: {k}", f"{v:.0f} s") for k, v in demo["per_config_s"].items()],
            ("in-process evaluator, vanilla, test split (same generations)", f"{inproc:.0f} s"),
            (
                "one lmms-eval run (vanilla) / in-process evaluator",
                f"{demo['per_config_s'].get('vanilla', float('nan')) / inproc:.2f}x"
                if not args.limit
                else "n/a with --limit",
            ),
        ],
        left={0},
    )
    print_load(load0, started)
    write_json(args.json, {"training": train, "demo": demo, "in_process_s": inproc, "limit": args.limit,
                           "environment": environment(load0)})
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
