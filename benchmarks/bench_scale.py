#!/usr/bin/env python
"""Profiling beyond one process: throughput with 1 vs 2 processes, and the cost of checkpoints.

    .venv/bin/python benchmarks/bench_scale.py [--quick] [--json PATH] [--pairs N]

1. Profiling throughput (examples/s of ``profiling.profile``, model load and start-up excluded):
   one process with 2 threads (the default on 2 cores), one process with 1 thread, and two
   processes of 1 thread each under ``torchrun`` (gloo; process 0 gathers). Every variant runs in
   fresh subprocesses, interleaved in a rotating order; the pooled responses of every run are
   hashed and must be identical across variants.
2. Checkpoint overhead: ``profile`` writing a checkpoint (one safetensors file per batch) vs
   without, in this process, interleaved; and a resume that finds every batch checkpointed
   (reading back only). Bytes written per example.
3. Remote emulation (``remote="local"``: every batch serialised and deserialised as for NDIF) vs
   local, in this process (info: the client-side cost of the remote path, no network).
4. Per-token forward cost of profiling on this CPU (tokens/s, and FLOP/s from the decoder's
   parameters), from which docs/scale.md extrapolates to real models.

Offline and CPU-only, on a tiny random LLaVA built on the fly (bench_core.py's size). Medians over
repeats; ratios are medians of per-repeat paired ratios. See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from common import (
    environment,
    fmt_ratio,
    median,
    paired_ratio,
    print_load,
    print_table,
    write_json,
)

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_core.py: spinning OpenMP threads on a shared machine

MODEL = {"hidden_size": 256, "intermediate_size": 688, "num_layers": 8, "num_heads": 4,
         "vision_hidden": 64, "vision_layers": 2, "image_size": 64, "patch_size": 8}
FULL = {"pairs": 128, "proc_repeats": 3, "ckpt_repeats": 5, "remote_repeats": 3}
QUICK = {"pairs": 48, "proc_repeats": 2, "ckpt_repeats": 3, "remote_repeats": 2}
BATCH = 8
VARIANTS = {  # name: (processes, threads per process)
    "1 process x 2 threads": (1, 2),
    "1 process x 1 thread": (1, 1),
    "2 processes x 1 thread": (2, 1),
}


def quiet():
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def store_digest(store, sites) -> str:
    h = hashlib.sha256()
    for s in sites:
        h.update(store.arrays[s.name].tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------ 1. processes (child side)

def child(model_dir: str, data: str, threads: int) -> None:
    """One timed profile in this process (under torchrun: in each); process 0 prints a JSON line."""
    quiet()
    import torch

    from lmms_sgm import distributed, models
    from lmms_sgm.data import load_pairs
    from lmms_sgm.options import ExecutionOptions, ProfileOptions
    from lmms_sgm.profiling import profile, token_lengths

    torch.set_num_threads(threads)
    group = distributed.from_env()
    model, processor = models.load(model_dir)
    pairs = load_pairs(data)
    options = ProfileOptions(batch_size=BATCH)
    off = ExecutionOptions(checkpoint_dir="off")
    warm = load_pairs(str(Path(data).with_name("warm.jsonl")))  # untimed: caches, allocator, lazy imports
    profile(model, processor, warm, options, progress=False, execution=off, group=group)
    with group.together():  # start together
        pass
    started = time.perf_counter()
    sites, store = profile(model, processor, pairs, options, progress=False, execution=off, group=group)
    seconds = time.perf_counter() - started
    if group.is_main:
        tokens = sum(token_lengths(processor, pairs, options.text_field, BATCH))
        print("RESULT " + json.dumps({"seconds": seconds, "examples": len(pairs), "tokens": tokens,
                                      "digest": store_digest(store, sites)}), flush=True)
        store.close()
    group.close()


def run_child(variant: str, model_dir: str, data: str) -> dict:
    processes, threads = VARIANTS[variant]
    me = [sys.executable, str(Path(__file__).resolve()), "--_child", model_dir, data, str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    if processes > 1:
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        cmd = [torchrun, "--standalone", "--nproc-per-node", str(processes), "--no-python", *me]
    else:
        cmd = me
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or len(lines) != 1:
        raise RuntimeError(f"{variant} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[0][len("RESULT "):])


def bench_processes(cfg, model_dir, data, summary) -> None:
    names = list(VARIANTS)
    runs = {k: [] for k in names}
    for r in range(cfg["proc_repeats"]):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            runs[name].append(run_child(name, model_dir, data))
            print(f"  repeat {r + 1}: {name}: {runs[name][-1]['seconds']:.2f} s", flush=True)
    # Same intra-op threads per process -> the same bits, whatever the number of processes; another
    # thread count splits the GEMMs differently and changes the low bits (so can the glasses).
    by_threads: dict = {}
    for name, rs in runs.items():
        by_threads.setdefault(VARIANTS[name][1], set()).update(run["digest"] for run in rs)
    times = {k: [run["seconds"] for run in rs] for k, rs in runs.items()}
    examples = runs[names[0]][0]["examples"]
    tokens = runs[names[0]][0]["tokens"]
    base = times["1 process x 2 threads"]
    rows = []
    for name in names:
        ratio = paired_ratio(base, times[name])
        rows.append((name, f"{median(times[name]):.2f}", f"{examples / median(times[name]):.1f}",
                     "1.000x" if name == names[0] else fmt_ratio(*ratio)))
        summary["processes"][name] = {"seconds": times[name], "examples_per_s": examples / median(times[name]),
                                      "ratio_to_1x2": ratio[0]}
    one = times["1 process x 1 thread"]
    two = times["2 processes x 1 thread"]
    summary["processes"]["2x1 vs 1x1"] = paired_ratio(one, two)[0]
    summary["processes"]["identical_at_same_threads"] = all(len(d) == 1 for d in by_threads.values())
    summary["processes"]["threads_change_bits"] = len(set().union(*by_threads.values())) > 1
    summary["per_token"] = {"tokens": tokens, "examples": examples,
                            "ms_per_token_1x2": 1000 * median(base) / tokens,
                            "ms_per_token_1x1": 1000 * median(one) / tokens}
    print(f"\n1. Profiling throughput, {examples} pairs ({tokens} tokens), batch {BATCH}, every gate/up/down site")
    print_table(("variant", "profile s (median)", "examples/s", "throughput vs 1 process x 2 threads"), rows, {0})
    print(f"   2 processes x 1 thread vs 1 process x 1 thread: {fmt_ratio(*paired_ratio(one, two))}")
    same = all(len(d) == 1 for d in by_threads.values())
    print(f"   pooled responses bit-identical across runs with the same threads per process (1 or 2 processes): "
          f"{'yes' if same else 'NO'}; 1 vs 2 threads: "
          f"{'different low bits' if len(set().union(*by_threads.values())) > 1 else 'identical'}")


# ------------------------------------------------------------------ 2-4. in this process

def interleaved(variants: dict, repeats: int) -> dict:
    names = list(variants)
    for name in names:  # untimed warm-up
        variants[name]()
    times = {k: [] for k in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - t)
    return times


def bench_in_process(cfg, model_dir, data, workdir: Path, summary) -> None:
    quiet()
    import shutil

    from lmms_sgm import models
    from lmms_sgm.checkpoint import Checkpoint
    from lmms_sgm.data import load_pairs
    from lmms_sgm.options import ExecutionOptions, ProfileOptions
    from lmms_sgm.profiling import profile

    model, processor = models.load(model_dir)
    pairs = load_pairs(data)
    options = ProfileOptions(batch_size=BATCH)
    off = ExecutionOptions(checkpoint_dir="off")
    ckpt_dir = workdir / "ckpt"

    def plain():
        profile(model, processor, pairs, options, progress=False, execution=off)[1].close()

    def checkpointed():
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        profile(model, processor, pairs, options, progress=False, execution=off, checkpoint=Checkpoint(ckpt_dir))[1].close()

    def resumed():  # every batch is in the checkpoint: read back, nothing traced
        profile(model, processor, pairs, options, progress=False, execution=off,
                checkpoint=Checkpoint(ckpt_dir, resume=True))[1].close()

    times = interleaved({"plain": plain, "checkpoint": checkpointed}, cfg["ckpt_repeats"])
    checkpointed()
    written = sum(p.stat().st_size for p in ckpt_dir.glob("batch-*"))
    resume_times = interleaved({"resume": resumed}, cfg["ckpt_repeats"])["resume"]
    ratio = paired_ratio(times["plain"], times["checkpoint"])
    summary["checkpoint"] = {"plain_s": times["plain"], "checkpoint_s": times["checkpoint"], "ratio": ratio[0],
                             "resume_all_done_s": resume_times, "bytes_per_example": written / len(pairs)}
    n = len(pairs)
    print(f"\n2. Checkpoint overhead, {n} pairs, {len(list(ckpt_dir.glob('batch-*')))} batch files, "
          f"{written / 2**20:.1f} MiB ({written / n / 1024:.1f} KiB per example)")
    print_table(("variant", "profile s (median)", "throughput vs no checkpoint"), [
        ("no checkpoint", f"{median(times['plain']):.2f}", "1.000x"),
        ("checkpoint every batch", f"{median(times['checkpoint']):.2f}", fmt_ratio(*ratio)),
        ("resume, all batches done (read back only)", f"{median(resume_times):.2f}", "-"),
    ], {0})
    shutil.rmtree(ckpt_dir, ignore_errors=True)

    emulated = ExecutionOptions(checkpoint_dir="off", remote="local")
    times = interleaved({"local": plain, "remote=local": lambda: profile(
        model, processor, pairs, options, progress=False, execution=emulated)[1].close()}, cfg["remote_repeats"])
    ratio = paired_ratio(times["local"], times["remote=local"])
    summary["remote_local"] = {"local_s": times["local"], "emulated_s": times["remote=local"], "ratio": ratio[0]}
    print("\n3. Remote emulation (serialise + deserialise every batch, no network) vs local")
    print_table(("variant", "profile s (median)", "throughput vs local"), [
        ("local", f"{median(times['local']):.2f}", "1.000x"),
        ("remote=local", f"{median(times['remote=local']):.2f}", fmt_ratio(*ratio)),
    ], {0})

    params = sum(p.numel() for n_, p in model.named_parameters() if "language_model" in n_ and "embed" not in n_)
    per = summary.get("per_token")
    if per:
        flops = 2 * params / (per["ms_per_token_1x2"] / 1000)
        summary["per_token"].update(decoder_params=params, gflops_1x2=flops / 1e9)
        print(f"\n4. Per-token cost of profiling here: {per['ms_per_token_1x2']:.3f} ms/token with 2 threads, "
              f"{per['ms_per_token_1x1']:.3f} ms/token with 1 ({per['tokens'] / per['examples']:.0f} tokens per pair; "
              f"decoder {params / 1e6:.2f}M parameters without embeddings: {flops / 1e9:.2f} GFLOP/s achieved "
              "counting 2 FLOP per parameter per token)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer pairs and repeats (~2 min)")
    ap.add_argument("--pairs", type=int, help="number of profiling pairs (default 128, quick 48)")
    ap.add_argument("--json", metavar="PATH", help="also write the summary and raw timings as JSON here")
    ap.add_argument("--workdir", metavar="DIR", help="where the tiny model and data go (default: a temporary directory)")
    ap.add_argument("--_child", nargs=3, dest="child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return 0
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    cfg = dict(QUICK if args.quick else FULL)
    if args.pairs:
        cfg["pairs"] = args.pairs
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="bench_scale_")
    workdir = Path(args.workdir or tmp.name)
    quiet()
    from lmms_sgm.tiny import build_tiny_llava, write_toy_pairs

    model_dir = workdir / "model"
    if not (model_dir / "config.json").exists():
        build_tiny_llava(model_dir, **MODEL)
    data = write_toy_pairs(workdir / f"data{cfg['pairs']}", n=cfg["pairs"], image_size=MODEL["image_size"])
    data.with_name("warm.jsonl").write_text("".join(data.read_text().splitlines(keepends=True)[:16]))
    summary = {"config": cfg, "model": MODEL, "processes": {}}
    bench_processes(cfg, str(model_dir), str(data), summary)
    bench_in_process(cfg, str(model_dir), str(data), workdir, summary)
    summary["environment"] = environment(load_start)
    print()
    print_load(load_start, started)
    if args.json:
        write_json(args.json, summary)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
