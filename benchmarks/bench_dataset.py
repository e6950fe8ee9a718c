#!/usr/bin/env python
"""`lmms-sgm dataset build` on 10,000 records with images: time, records/s, peak memory, and the
memory growth from 1,000 to 10,000 records (flat = streamed, not held in RAM).

    .venv/bin/python benchmarks/bench_dataset.py                  # 1k and 10k records, ~6-10 min on 2 cores
    .venv/bin/python benchmarks/bench_dataset.py --sizes 200,2000 # quicker
    .venv/bin/python benchmarks/bench_dataset.py --kind jsonl     # our JSONL + image files instead of parquet
    .venv/bin/python benchmarks/bench_dataset.py --json out.json  # also write the figures

The fixture is written first, in the published layout of the source: by default BeaverTails-V
(``data/<category>/train.parquet`` in 10 categories, the ``datasets`` Image feature holding a
256 x 256 JPEG per row, two labelled responses per row), so the build reads image bytes out of
parquet; ``--kind jsonl`` writes our own schema (one JSONL, one JPEG file per record). Every image
has unique pixels and every question is unique, so nothing is deduplicated or grouped away.

Each build runs in a fresh subprocess (the build is what the CLI runs: read, validate and hash
every image, split, write, draw the attack image of every harmful prompt, self-check), which
reports its wall time and its memory from ``/proc/self/status``: ``VmRSS`` after imports
(baseline) and ``VmHWM`` at the end (peak; reset by exec, so a child does not inherit its parent's
peak). Growth = peak - baseline. Measured for each size with the default attack drawing
(``--adv sd_typo``: a PNG of ~512 x 600 per harmful prompt in validation and test) and, at the
largest size, with ``--adv none``, and ``lmms-sgm dataset check`` (which decodes every image) on
the largest build.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import print_load, print_table, write_json

CATEGORIES = 10
IMAGE_SIDE = 256


def _image(k: int, rng) -> bytes:
    """A 256 x 256 JPEG with a few coloured discs, its number and grain: unique pixels."""
    import numpy as np
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (IMAGE_SIDE, IMAGE_SIDE), tuple(int(v) for v in rng.integers(0, 256, 3)))
    d = ImageDraw.Draw(im)
    for _ in range(6):
        x, y = (int(v) for v in rng.integers(0, IMAGE_SIDE, 2))
        d.ellipse([x - 24, y - 24, x + 24, y + 24], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    d.text((8, 8), str(k), fill="black")
    # Photo-like grain, so the JPEGs weigh what photos of this size do (~20-30 KB, not ~4 KB).
    grain = rng.integers(-24, 25, (IMAGE_SIDE, IMAGE_SIDE, 3))
    im = Image.fromarray((np.asarray(im, dtype=np.int16) + grain).clip(0, 255).astype(np.uint8))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def write_fixture(root: Path, n: int, kind: str) -> str:
    """Write ``n`` records; returns the --source specification."""
    import numpy as np

    rng = np.random.default_rng(n)
    if kind == "jsonl":
        (root / "images").mkdir(parents=True)
        with open(root / "records.jsonl", "w") as f:
            for k in range(n):
                name = f"images/{k:06d}.jpg"
                (root / name).write_bytes(_image(k, rng))
                base = {"id": f"r{k}", "image": name, "question": f"What could one do with item {k} in this picture?",
                        "category": f"cat_{k % CATEGORIES:02d}"}
                f.write(json.dumps({**base, "text": f"you stupid idiot {k}" if k % 2 else f"it looks fine {k}",
                                    "label": k % 2, "harmful": 1}) + "\n")
        return f"jsonl:{root / 'records.jsonl'}"
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    features = datasets.Features({"question": datasets.Value("string"), "image": datasets.Image(),
                                  "category": datasets.Value("string"), "image_severity": datasets.Value("int64"),
                                  **{c: datasets.Value("string") for c in ("response_1", "response_2", "is_response_1_safe",
                                                                           "is_response_2_safe")}})
    for c in range(CATEGORIES):
        folder = root / "data" / f"cat_{c:02d}"
        folder.mkdir(parents=True)
        with pq.ParquetWriter(folder / "train.parquet", features.arrow_schema) as writer:
            rows = []
            for k in range(c, n, CATEGORIES):
                rows.append({"question": f"What could one do with item {k} in this picture?",
                             "image": {"bytes": _image(k, rng), "path": None}, "category": f"cat_{c:02d}",
                             "image_severity": k % 4, "response_1": f"you stupid idiot {k}", "response_2": f"it looks fine {k}",
                             "is_response_1_safe": "no", "is_response_2_safe": "yes"})
                if len(rows) == 100:  # `datasets` writes image data in row groups of 100
                    writer.write_table(pa.Table.from_pylist(rows, schema=features.arrow_schema))
                    rows = []
            if rows:
                writer.write_table(pa.Table.from_pylist(rows, schema=features.arrow_schema))
    return f"beavertails-v:{root}"


def _status() -> dict:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024  # MiB
    return fields


def child(args) -> None:
    """Runs in a fresh process: one build (or check), then its time and memory as JSON on stdout."""
    from lmms_sgm.datasets import build_dataset, check_dataset

    baseline = _status()["VmRSS"]
    t0 = time.perf_counter()
    if args.check:
        report = check_dataset(args.out)
        result = {"ok": report.ok}
    else:
        manifest = build_dataset([args.source], args.out, adv=args.adv)
        c = manifest["counts"]
        result = {"pairs": c["profile"]["pairs"], "prompts": sum(c[s]["harmful"] + c[s]["benign"] for s in ("validation", "test")),
                  "attacks": sum(c[s]["adv"] for s in ("validation", "test"))}
    wall = time.perf_counter() - t0
    status = _status()
    print(json.dumps({**result, "wall_s": wall, "baseline_mib": baseline, "peak_mib": status["VmHWM"],
                      "growth_mib": status["VmHWM"] - baseline}))


def run_child(source: str, out: Path, adv: str, check: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--_child", "--source", source, "--out", str(out), "--adv", adv] + (["--check"] if check else [])
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"child failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def du_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000,10000", help="record counts, comma-separated (the last is the headline)")
    p.add_argument("--kind", choices=("beavertails-v", "jsonl"), default="beavertails-v")
    p.add_argument("--workdir", default=None, help="keep fixtures and builds here (default: a temporary folder, removed)")
    p.add_argument("--json", default=None)
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--source", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--adv", default="sd_typo", help=argparse.SUPPRESS)
    p.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        child(args)
        return

    started, load_start = time.perf_counter(), os.getloadavg()[0]
    sizes = [int(x) for x in args.sizes.split(",")]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_dataset_"))
    rows, runs = [], []
    try:
        for n in sizes:
            t0 = time.perf_counter()
            source = write_fixture(work / f"src_{n}", n, args.kind)
            gen_s = time.perf_counter() - t0
            variants = [("sd_typo", False)] + ([("none", False), ("sd_typo", True)] if n == sizes[-1] else [])
            for adv, check in variants:
                out = work / f"ds_{n}_{adv}"
                r = run_child(source, out, adv, check=check)
                r.update(records=n, adv=adv, step="check" if check else "build", fixture_mib=du_mib(work / f"src_{n}"),
                         fixture_s=gen_s, output_mib=du_mib(out))
                runs.append(r)
                rows.append((f"{n:,}", r["step"], adv, f"{r['wall_s']:.1f}", f"{n / r['wall_s']:.0f}",
                             f"{r['baseline_mib']:.0f}", f"{r['peak_mib']:.0f}", f"{r['growth_mib']:.0f}",
                             f"{r['fixture_mib']:.0f} -> {r['output_mib']:.0f}"))
                if not check and adv == "none":
                    shutil.rmtree(out)
            print(f"[{n:,} records written in {gen_s:.0f} s]", flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n`lmms-sgm dataset build` on {args.kind} records with {IMAGE_SIDE}x{IMAGE_SIDE} JPEG images "
          f"({CATEGORIES} categories; split 0.6/0.2/0.2)\n")
    print_table(["records", "step", "--adv", "wall s", "records/s", "RSS after import MiB", "peak RSS MiB", "growth MiB",
                 "source -> dataset MiB"], rows, left={1, 2})
    builds = [r for r in runs if r["step"] == "build" and r["adv"] == "sd_typo"]
    if len(builds) > 1:
        a, b = builds[0], builds[-1]
        print(f"\npeak RSS {a['records']:,} -> {b['records']:,} records: {a['peak_mib']:.0f} -> {b['peak_mib']:.0f} MiB "
              f"({b['peak_mib'] - a['peak_mib']:+.0f} MiB for {b['records'] / a['records']:.0f}x the records)")
    print_load(load_start, started)
    if args.json:
        write_json(args.json, {"kind": args.kind, "runs": runs, "loadavg": [load_start, os.getloadavg()[0]]})


if __name__ == "__main__":
    main()
