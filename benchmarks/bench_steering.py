#!/usr/bin/env python
"""Generation overhead of gated steering glasses beside vanilla and SGM hooks, in one run.

    .venv/bin/python benchmarks/bench_steering.py [--quick] [--json PATH] [--threads N]

Greedy generation (``min_new_tokens`` = ``max_new_tokens``), batch 1 and 8, on the tiny random
LLaVA of bench_core.py (Llama 256/688 x 8 layers, 64 image tokens). Variants, interleaved in every
repeat (bench_core.interleaved):

- vanilla ``generate``;
- SGM glasses (``build_glasses`` defaults) in ``hooks`` mode: the baseline of the second ratio;
- gated steering (``build_steering_glasses`` defaults: last layer, gate at the last layer) in
  ``hooks`` mode with its threshold moved so the gate opens on about half of the rows ("half
  on"), on every row ("all on") and on none ("all off"); the ungated variant; and ``nnsight`` mode
  (half on).

Throughput ratios (ours / baseline, > 1 faster) are medians of per-repeat paired ratios.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_core import MODEL, interleaved, quiet
from common import environment, fmt_ratio, median, paired_ratio, print_load, print_table, write_json

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench_core: idle OpenMP threads sleep

FULL = dict(new_tokens=32, repeats=11, batches=(1, 8), pairs=64)
QUICK = dict(new_tokens=16, repeats=3, batches=(1, 8), pairs=32)


def threshold_for(glasses, model, enc, fraction: float):
    """The glasses with the gate threshold placed so that ``fraction`` of ``enc``'s rows open it."""
    import torch

    seen = {}  # each row's gate-layer output at its last prompt token (left padding), vanilla model
    layer = model.get_submodule(glasses.gate_site.module_path)
    hook = layer.register_forward_hook(lambda m, a, out: seen.update(h=out[:, -1].float()))  # None: output kept
    try:
        with torch.no_grad():
            model.generate(**enc, max_new_tokens=1, do_sample=False)
    finally:
        hook.remove()
    proj = (seen["h"] @ glasses.gate_direction).sort().values
    k = round(fraction * len(proj))
    cut = proj[0] - 1 if k == len(proj) else proj[-1] + 1 if k == 0 else (proj[-k - 1] + proj[-k]) / 2
    g = glasses.manifest["gate"]
    return glasses.with_options(gate_threshold=float((cut - g["benign_mean"]) / (g["harmful_mean"] - g["benign_mean"])))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer tokens and repeats (about a minute)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    ap.add_argument("--threads", type=int, metavar="N", help="torch intra-op threads (default: torch's)")
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    tmp = tempfile.TemporaryDirectory(prefix="lmms_sgm_bench_steer_")
    work = Path(tmp.name)
    subprocess.run([sys.executable, "-c", (
        "import sys, warnings; warnings.filterwarnings('ignore');"
        "import transformers; transformers.utils.logging.set_verbosity_error(); transformers.utils.logging.disable_progress_bar();"
        "from lmms_sgm import tiny;"
        f"tiny.build_tiny_llava(sys.argv[1], **{MODEL!r});"
        f"tiny.write_toy_pairs(sys.argv[2], {cfg['pairs']}, image_size={MODEL['image_size']})"
    ), str(work / "model"), str(work / "pairs")], check=True, stderr=subprocess.DEVNULL)
    quiet()
    import torch

    from lmms_sgm import models
    from lmms_sgm.data import encode_batch, load_pairs
    from lmms_sgm.options import SteeringOptions
    from lmms_sgm.pipeline import build_glasses, build_steering_glasses

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"gated steering generation benchmark ({'quick' if args.quick else 'full'}) - python "
          f"{platform.python_version()}, {os.cpu_count()} cores, torch {torch.__version__} {torch.get_num_threads()} "
          f"threads, load average {load_start:.2f}")
    print(f"tiny LLaVA: {MODEL}; greedy, {cfg['new_tokens']} new tokens, {cfg['repeats']} repeats")
    pairs = load_pairs(work / "pairs" / "pairs.jsonl")
    profiled, processor = models.load(str(work / "model"))  # profiling wraps it with nnsight: not timed on
    sgm = build_glasses(profiled, processor, pairs, progress=False)
    steer = build_steering_glasses(profiled, processor, pairs, pairs, SteeringOptions(c=4.0), progress=False)
    hf, _ = models.load(str(work / "model"))
    nn_model, _ = models.load(str(work / "model"))
    kw = dict(max_new_tokens=cfg["new_tokens"], min_new_tokens=cfg["new_tokens"], do_sample=False)
    results = []
    for bs in cfg["batches"]:
        enc = encode_batch(processor, pairs.pairs[:bs], "question", padding_side="left")
        half = threshold_for(steer, hf, enc, 0.5 if bs > 1 else 1.0)
        variants_glasses = {
            "sgm_hooks": sgm,
            f"steer_hooks_{'half' if bs > 1 else 'all'}_on": half,
            "steer_hooks_all_off": threshold_for(steer, hf, enc, 0.0),
            "steer_ungated": steer.with_options(gated=False),
        }
        if bs > 1:
            variants_glasses["steer_hooks_all_on"] = threshold_for(steer, hf, enc, 1.0)
        handles, outs = {}, {}

        def generate(key):
            def run():
                outs[key] = hf.generate(**enc, **kw)
            return run

        def wear(key, glasses):
            return lambda: handles.__setitem__(key, glasses.apply(hf, mode="hooks"))

        def take_off(key):
            return lambda: handles.pop(key).remove()

        nn_handle = half.apply(nn_model, mode="nnsight", processor=processor)

        def nn_generate():
            with nn_handle.model.generate(**enc, **kw) as tracer:
                out = tracer.result.save()
            outs["steer_nnsight"] = out

        variants = {"vanilla": generate("vanilla")}
        variants.update({k: (wear(k, g), generate(k), take_off(k)) for k, g in variants_glasses.items()})
        variants["steer_nnsight"] = nn_generate
        with torch.no_grad():
            times = interleaved(variants, cfg["repeats"])
        nn_handle.remove()
        on_key = f"steer_hooks_{'half' if bs > 1 else 'all'}_on"
        agree = torch.equal(outs[on_key], outs["steer_nnsight"])
        tokens = bs * cfg["new_tokens"]
        tv, ts = median(times["vanilla"]), median(times["sgm_hooks"])
        print(f"\n-- batch {bs} (prompt {enc['input_ids'].shape[1]} tokens): vanilla {tokens / tv:.1f} tok/s, "
              f"SGM hooks {tokens / ts:.1f} tok/s; hooks == nnsight tokens: {agree} --")
        rows = []
        for key in variants:
            if key == "vanilla":
                continue
            t = median(times[key])
            vs_vanilla = paired_ratio(times["vanilla"], times[key])
            vs_sgm = paired_ratio(times["sgm_hooks"], times[key]) if key != "sgm_hooks" else None
            rows.append((key, f"{tokens / t:.1f}", fmt_ratio(*vs_vanilla), "-" if vs_sgm is None else fmt_ratio(*vs_sgm)))
            results.append({"batch": bs, "variant": key, "tok_s": tokens / t, "vanilla_tok_s": tokens / tv,
                            "vs_vanilla": vs_vanilla[0], "vs_sgm_hooks": None if vs_sgm is None else vs_sgm[0],
                            "times_s": times[key], "vanilla_times_s": times["vanilla"]})
        print_table(("variant", "tok/s", "vs vanilla", "vs SGM hooks"), rows, left={0})
    print()
    print_load(load_start, started)
    if args.json:
        write_json(args.json, {"config": cfg, "model": MODEL, "environment": environment(load_start), "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
