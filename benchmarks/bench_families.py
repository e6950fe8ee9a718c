#!/usr/bin/env python
"""Per-family benchmarks: profiling throughput and generation overhead, each beside the bare model.

    .venv/bin/python benchmarks/bench_families.py [--quick] [--families qwen2_vl,mllama] [--json PATH]

For every family's tiny checkpoint (``lmms_sgm.tiny_families``, the ones the tests use: hidden 32,
2-3 decoder layers, 32 px images; LLaVA-1.5 from ``lmms_sgm.tiny``):

1. profiling: ``profiling.profile`` (nnsight traces, every gate/up/down site, batch 8) against a
   plain forward of an untouched copy of the model on the same pairs, ``encode_batch`` batches of 8
   encoded inside the timed loop as profiling encodes them (pairs/s, ratio ours / bare);
2. greedy generation of 16 new tokens for 4 prompts with an image each (one left-padded batch):
   glasses worn in ``hooks`` and ``fold`` modes against the bare model (tokens/s, ratio).

Variants are interleaved in every repeat in a rotating order after one untimed warm-up each
(``bench_core.interleaved``); ratios are medians of the per-repeat paired ratios. On models this
small the fixed costs (image processing, nnsight's tracing, Python per layer) dominate: the ratios
bound the overhead on tiny models, they do not predict it on real ones (bench_core.py uses a
larger LLaVA).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from bench_core import interleaved, quiet
from common import environment, fmt_ratio, median, paired_ratio, print_load, print_table, write_json

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

FULL = dict(pairs=32, prof_repeats=5, new_tokens=16, gen_repeats=7)
QUICK = dict(pairs=16, prof_repeats=3, new_tokens=8, gen_repeats=3)
BATCH = 8
PROMPTS = 4


def bench_family(family: str, workdir: Path, cfg: dict) -> dict:
    import torch

    from lmms_sgm import models, prompting, tiny, tiny_families
    from lmms_sgm.data import encode_batch, load_pairs
    from lmms_sgm.options import ProfileOptions, SelectionOptions
    from lmms_sgm.pipeline import build_glasses
    from lmms_sgm.profiling import profile

    path = tiny_families.build(family, workdir / family)
    pairs = load_pairs(tiny.write_toy_pairs(workdir / f"{family}_pairs", cfg["pairs"]))
    prof_model, processor = models.load(str(path))
    bare, _ = models.load(str(path))  # never wrapped by nnsight (profiling wraps its model for good)
    opts = ProfileOptions(batch_size=BATCH)

    def run_profile():
        _, store = profile(prof_model, processor, pairs, opts, progress=False)
        store.close()

    def run_forward():  # the encode_batch calls profiling makes, then a full forward (LM head included)
        with torch.inference_mode():
            for i in range(0, len(pairs), BATCH):
                bare(**prompting.to_model(encode_batch(processor, pairs[i:i + BATCH], "response"), bare))

    prof = interleaved({"profile": run_profile, "forward": run_forward}, cfg["prof_repeats"])

    # Generation: glasses of this model (det0 on 40 neurons), worn by a third copy.
    worn, _ = models.load(str(path))
    glasses = build_glasses(worn, processor, pairs, ProfileOptions(), SelectionOptions(rule="det0", top_k=40), progress=False)
    worn, _ = models.load(str(path))  # a fresh copy: build_glasses left the other one nnsight-wrapped
    prompts = [prompting.request_prompt(processor, q, [tiny.random_image(60 + i)])
               for i, q in enumerate(["what is this ?", "is it nice ?", "what colour is it ?", "what do you think of it ?"][:PROMPTS])]
    enc = prompting.encode(processor, [p.text for p in prompts], [p.images for p in prompts], padding_side="left")
    gen = dict(max_new_tokens=cfg["new_tokens"], min_new_tokens=cfg["new_tokens"], do_sample=False,
               pad_token_id=processor.tokenizer.pad_token_id)
    handles = {}

    def wear(mode):
        def setup():
            handles[mode] = glasses.apply(worn, mode=mode)

        def run():
            with torch.inference_mode():
                worn.generate(**prompting.to_model(enc, worn), **gen)

        def teardown():
            handles.pop(mode).remove()

        return setup, run, teardown

    def run_bare():
        with torch.inference_mode():
            bare.generate(**prompting.to_model(enc, bare), **gen)

    timed = interleaved({"vanilla": run_bare, "hooks": wear("hooks"), "fold": wear("fold")}, cfg["gen_repeats"])
    tokens = PROMPTS * cfg["new_tokens"]
    return {
        "family": family, "pairs": len(pairs), "decoder_layers": glasses.manifest["fingerprint"]["num_layers"],
        "post_fusion_layers": sorted({s.layer for s in glasses.sites}),
        "profile_pairs_per_s": len(pairs) / median(prof["profile"]), "forward_pairs_per_s": len(pairs) / median(prof["forward"]),
        "profile_ratio": paired_ratio(prof["forward"], prof["profile"]),
        "vanilla_tokens_per_s": tokens / median(timed["vanilla"]),
        "hooks_ratio": paired_ratio(timed["vanilla"], timed["hooks"]),
        "fold_ratio": paired_ratio(timed["vanilla"], timed["fold"]),
        "raw": {"profile": prof, "generate": timed},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--families", default=None, help="comma-separated; default: every family")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    quiet()
    load_start, started = os.getloadavg()[0], time.perf_counter()
    import torch

    from lmms_sgm import tiny_families

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else FULL
    families = args.families.split(",") if args.families else list(tiny_families.FAMILIES)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_families_") as tmp:
        for family in families:
            print(f"{family} ...", file=sys.stderr, flush=True)
            results.append(bench_family(family, Path(tmp), cfg))
    print(f"\nPer family, tiny checkpoints: {cfg['pairs']} pairs profiled (batch {BATCH}, every gate/up/down site); "
          f"greedy generation of {cfg['new_tokens']} new tokens x {PROMPTS} prompts (one batch). Ratios: ours / bare model "
          "throughput (> 1 is faster).")
    print_table(
        ["family", "profile pairs/s", "bare forward pairs/s", "profile / bare", "bare gen tok/s", "hooks / bare", "fold / bare"],
        [(r["family"], f"{r['profile_pairs_per_s']:.1f}", f"{r['forward_pairs_per_s']:.1f}", fmt_ratio(*r["profile_ratio"]),
          f"{r['vanilla_tokens_per_s']:.1f}", fmt_ratio(*r["hooks_ratio"]), fmt_ratio(*r["fold_ratio"])) for r in results],
        left={0},
    )
    print_load(load_start, started)
    if args.json:
        write_json(args.json, {"config": cfg, "environment": environment(load_start), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
