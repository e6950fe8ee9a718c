#!/usr/bin/env python
"""lmms-sgm diagnose on the demo model (wall time), and what input-conditional glasses cost.

    .venv/bin/python benchmarks/bench_diagnose.py [--n 40] [--repeats 3] [--json PATH]

1. Diagnosis: the stages of ``lmms_sgm.diagnose.diagnose`` on ``--n`` demo twins (validation
   split; the fit on as many held-out ones), 5 samples per prompt: a generate-based rate (vanilla,
   and prompt patching), a lockstep rate (twin and patched run in step), and the least-squares fit, each the median
   of ``--repeats``, through forward hooks and as nnsight traces (``--backend nnsight``), and the
   uncached lockstep that remote execution uses; then the whole diagnosis once per backend (4
   layers, MLP and attention: 2 + 10 prompt + 11 lockstep runs + fit + 2 ceiling rows + the
   glasses' row), and the ratios between stages.
2. Generation overhead: greedy generation of exactly 24 tokens for 64 demo prompts, vanilla; the bundled
   best glasses worn with hooks; the same glasses gated (gate=evidence, built here from the same
   profiling: hooks, and nnsight). Median seconds over ``--repeats``, ratios to vanilla and
   gated / ungated hooks.
"""
from __future__ import annotations

import argparse
import os
import time

from common import environment, median, print_load, print_table, write_json

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main() -> int:
    import torch

    from lmms_sgm import diagnose, models
    from lmms_sgm.demo import BEST, DATA_DIR, GLASSES_DIR
    from lmms_sgm.demo.diagnose import demo_twins
    from lmms_sgm.evaluate import ValidationSet, encode_prompts
    from lmms_sgm.interventions import SafetyGlasses
    from lmms_sgm.judges import get_judge
    from lmms_sgm.options import SelectionOptions
    from lmms_sgm.pipeline import build_glasses

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    load_start, started = os.getloadavg()[0], time.perf_counter()
    model, processor = models.load("sgm-demo-llava", dtype="float32")
    judge = get_judge("lexicon")
    records = demo_twins("validation", args.n)
    measured, held_out = diagnose.split_twins(records)
    best = SafetyGlasses.load(GLASSES_DIR / BEST)
    mlp3 = ["model.language_model.layers.3.mlp"]
    stages = {}
    for backend in ("hooks", "nnsight"):
        e = diagnose.as_engine(model, processor, backend=backend)
        stages.update({
            f"generate-based rate (vanilla), {backend}": timed(lambda: diagnose.sampled_rate(e, processor, judge, measured),
                                                               args.repeats),
            f"generate-based rate, prompt patching, {backend}": timed(
                lambda: diagnose.sampled_rate(e, processor, judge, measured, paths=mlp3), args.repeats),
            f"lockstep rate (KV-cached), {backend}": timed(
                lambda: diagnose.lockstep_rate(e, processor, judge, measured, mlp3), args.repeats),
            f"lockstep rate, uncached (the remote way), {backend}": timed(
                lambda: diagnose.lockstep_rate(e, processor, judge, measured, mlp3, cache=False), args.repeats),
            f"least-squares fit (layer 3 MLP), {backend}": timed(
                lambda: diagnose.fit_affine(e, processor, mlp3[0], held_out), args.repeats),
        })
    whole = {}
    for backend in ("hooks", "nnsight"):
        t0 = time.perf_counter()
        report = diagnose.diagnose(model, processor, records, judge, glasses=best, backend=backend)
        whole[backend] = time.perf_counter() - t0
    base = median(stages["generate-based rate (vanilla), hooks"])
    rows = [(k, f"{median(v):.2f}", f"{median(v) / base:.2f}x") for k, v in stages.items()]
    rows += [(f"whole diagnosis ({len(report['rows'])} rows, once), {b}", f"{w:.1f}", f"{w / base:.1f}x")
             for b, w in whole.items()]
    print(f"== diagnosis on {len(measured)} demo twins (+{len(held_out)} held out), 5 samples per prompt")
    print_table(("stage", "median s", "vs one generate-based rate (hooks)"), rows, {0})
    print(f"whole diagnosis, nnsight / hooks: {whole['nnsight'] / whole['hooks']:.2f}x")

    # generation overhead of gated glasses
    val = ValidationSet.load(DATA_DIR / "mm_toxic_qa" / "validation", limit=64)
    images, questions = [r["_image"] for r in val.harmful], [r["question"] for r in val.harmful]
    gated = build_glasses(model, processor, DATA_DIR / "self_labelled" / "pairs.jsonl", best.profile_options,
                          SelectionOptions(towards="nontoxic_mean", gate="evidence"), progress=False)

    enc = encode_prompts(processor, questions, images)
    fixed = {"max_new_tokens": 24, "min_new_tokens": 24, "do_sample": False}  # the same work whatever the answers

    def gen_with(glasses):
        def run():
            with torch.no_grad():
                if glasses is None:
                    return model.generate(**enc, **fixed)
                with glasses.apply(model, mode="hooks"):
                    return model.generate(**enc, **fixed)
        return run

    def gen_nnsight(glasses):
        def run():
            with glasses.apply(model, mode="nnsight", processor=processor) as h, torch.no_grad(), \
                    h.model.generate(**enc, **fixed) as tracer:
                out = tracer.result.save()
            return out
        return run

    steering = SafetyGlasses.load(GLASSES_DIR / "gated_steering")
    cases = {"vanilla": gen_with(None), "best glasses, hooks": gen_with(best),
             "best glasses gated, hooks": gen_with(gated), "best glasses, nnsight": gen_nnsight(best),
             "best glasses gated, nnsight": gen_nnsight(gated), "gated steering, hooks": gen_with(steering),
             "gated steering, nnsight": gen_nnsight(steering)}
    times = {k: timed(fn, args.repeats) for k, fn in cases.items()}
    v = median(times["vanilla"])
    rows = [(k, f"{median(t):.3f}", f"{median(t) / v:.2f}x") for k, t in times.items()]
    print("\n== greedy generation, 64 prompts x 24 tokens")
    print_table(("configuration", "median s", "vs vanilla"), rows, {0})
    ratio_hooks = median(times["best glasses gated, hooks"]) / median(times["best glasses, hooks"])
    ratio_nn = median(times["best glasses gated, nnsight"]) / median(times["best glasses, nnsight"])
    print(f"gated / ungated: hooks {ratio_hooks:.2f}x, nnsight {ratio_nn:.2f}x")
    print_load(load_start, started)
    if args.json:
        write_json(args.json, {"stages_s": stages, "whole_s": whole, "generation_s": times,
                               "gated_over_ungated": {"hooks": ratio_hooks, "nnsight": ratio_nn},
                               "environment": environment(load_start)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
