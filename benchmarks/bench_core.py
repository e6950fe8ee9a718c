#!/usr/bin/env python
"""Core benchmarks of lmms_sgm, each beside its baseline, in one run.

    .venv/bin/python benchmarks/bench_core.py [--quick] [--json PATH]

1. AUROC throughput: ``expertise.auroc`` vs a per-neuron ``sklearn.metrics.roc_auc_score`` loop.
2. Profiling throughput: ``profiling.profile`` (nnsight traces) vs a plain forward pass.
3. Generation throughput of each apply mode (hooks, fold, nnsight) vs the vanilla model.
4. Peak memory of profiling as the dataset grows 4x (fresh subprocess per size).

Timings are medians over repeats; the compared variants are interleaved inside every repeat (in a
rotating order) so that machine noise hits all of them, and ratios are medians of the per-repeat
paired ratios. Everything runs offline on CPU with a tiny random LLaVA built on the fly.
See benchmarks/README.md.
"""
from __future__ import annotations

# Heavy imports (torch, transformers, nnsight) are deferred: the memory children are spawned
# first, from a parent whose peak RSS is still small, because a child's ru_maxrss starts at the
# peak RSS of the process that spawned it (Linux carries it across fork/exec).
import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from common import environment, fmt_ratio, median, met_mark, paired_ratio, print_load, print_table, write_json

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. With spinning (the
# default), any other busy process on a 2-core machine slows torch's 2-thread forward ~25x
# (measured here while a test suite ran); passive waiting costs little on an idle machine and
# every variant runs under the same setting. Set OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

FULL = dict(
    auroc_neurons=20_000, auroc_examples=2_000, auroc_subset=1_000, auroc_repeats=5, auroc_one_thread=True,
    prof_pairs=64, prof_repeats=5,
    gen_new_tokens=32, gen_repeats=11, gen_batches=(1, 8),
    mem_sizes=(64, 256), mem_runs=2, mem_reference=True,
)
QUICK = dict(
    auroc_neurons=20_000, auroc_examples=2_000, auroc_subset=200, auroc_repeats=3, auroc_one_thread=False,
    prof_pairs=32, prof_repeats=3,
    gen_new_tokens=16, gen_repeats=3, gen_batches=(1, 8),
    mem_sizes=(32, 128), mem_runs=1, mem_reference=False,
)
# Tiny but not trivial: 8 Llama layers of 256/688, CLIP 64x64 images in 8x8 patches (64 image tokens).
MODEL = dict(hidden_size=256, intermediate_size=688, num_layers=8, num_heads=4,
             vision_hidden=64, vision_layers=2, image_size=64, patch_size=8)
BATCH = 8  # profiling batch size (ProfileOptions default)

GOALS = {"auroc": 100.0, "profile": 0.8, "fold": 0.98, "hooks": 0.95}
MEM_TOL_MIB, MEM_TOL_FRAC = 32.0, 0.25  # "flat": extra growth at 4x <= max(32 MiB, 25% of the 1x overhead)


# ------------------------------------------------------------------ helpers

def quiet():
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()



def interleaved(variants: dict, repeats: int) -> dict[str, list[float]]:
    """Wall times of every variant, interleaved: each repeat runs all variants, in a rotated order.

    A variant is ``run`` or ``(setup, run, teardown)``; only ``run`` is timed. One untimed
    warm-up call of every variant comes first.
    """
    norm = {k: v if isinstance(v, tuple) else (None, v, None) for k, v in variants.items()}

    def once(name):
        setup, run, teardown = norm[name]
        if setup:
            setup()
        gc.collect()  # untimed: every variant starts from the same garbage-collector state
        t = time.perf_counter()
        run()
        dt = time.perf_counter() - t
        if teardown:
            teardown()
        return dt

    names = list(norm)
    for name in names:
        once(name)
    # Freeze what exists now (torch, transformers, nnsight: ~0.5M objects) so that the per-call
    # collection above only walks the garbage of the calls themselves (~0.2 s -> microseconds).
    gc.collect()
    gc.freeze()
    try:
        times = {k: [] for k in names}
        for r in range(repeats):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                times[name].append(once(name))
    finally:
        gc.unfreeze()
    return times




def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (the mm's peak RSS) to the current RSS
        return True
    except OSError:
        return False


def ru_maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


MiB = 2**20


# ------------------------------------------------------------------ 4. memory (child side)

def mem_child(model_dir: str, data_path: str, n: int, mode: str) -> None:
    """Run in a fresh process: profile (or plain-forward) ``n`` pairs and print peak-RSS figures as JSON."""
    quiet()
    import nnsight  # noqa: F401  (imported before the baseline: its import is not dataset-dependent)
    import torch

    from lmms_sgm import models
    from lmms_sgm.data import PairDataset, encode_batch, load_pairs
    from lmms_sgm.options import ProfileOptions
    from lmms_sgm.profiling import profile

    model, processor = models.load(model_dir)
    pairs = PairDataset(load_pairs(data_path).pairs[:n])
    base = rss_bytes()
    ru_before = ru_maxrss_bytes()
    hwm_reset = reset_hwm()
    if mode == "profile":
        sites, store = profile(model, processor, pairs, ProfileOptions(batch_size=BATCH), progress=False)
        neurons = sum(s.width for s in sites)
        store.close()
    else:  # plain forward, same batches: the floor any forward pass pays
        with torch.inference_mode():
            for start in range(0, n, BATCH):
                model(**encode_batch(processor, pairs[start:start + BATCH], "response"))
        neurons = 0
    print(json.dumps({
        "n": n, "mode": mode, "rss_after_load": base, "ru_maxrss_after_load": ru_before,
        "ru_maxrss_peak": ru_maxrss_bytes(), "hwm_peak": hwm_bytes() if hwm_reset else None,
        "neurons": neurons,
    }))


def run_mem_children(cfg, model_dir, data_path) -> dict:
    small, large = cfg["mem_sizes"]
    jobs = []
    for _ in range(cfg["mem_runs"]):
        jobs += [(small, "profile"), (large, "profile")]
    if cfg["mem_reference"]:
        jobs.append((large, "plain"))
    # All children run at once: only their memory is measured, and that does not depend on CPU
    # contention, so this saves wall time without touching the timed benchmarks (which come after).
    procs = [
        ((n, mode), subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--_mem-child", model_dir, data_path, str(n), mode],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for n, mode in jobs
    ]
    results = {}
    for key, proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"memory child {key[0]}/{key[1]} failed:\n{err[-3000:]}")
        results.setdefault(key, []).append(json.loads(out.strip().splitlines()[-1]))
    return results


def report_memory(cfg, results, summary) -> None:
    small, large = cfg["mem_sizes"]
    print(f"\n== 4. Peak memory of profiling: {small} vs {large} pairs (fresh subprocess each, "
          f"{cfg['mem_runs']} run(s) per size, median) ==")
    print("   growth = peak RSS (ru_maxrss) - RSS after model load; the parent spawns the children before")
    print("   it grows, so ru_maxrss is the child's own; VmHWM reset after load is shown as a cross-check.")
    print("   The children ran concurrently, before the timed benchmarks (memory does not depend on CPU contention).")
    excess = {}
    for n in (small, large):
        runs = results[(n, "profile")]
        growth = median([r["ru_maxrss_peak"] - r["rss_after_load"] for r in runs]) / MiB
        hwm = [r["hwm_peak"] for r in runs if r["hwm_peak"] is not None]
        hwm_growth = median([h - r["rss_after_load"] for h, r in zip(hwm, runs)]) / MiB if hwm else float("nan")
        pooled = n * runs[0]["neurons"] * 4 / MiB
        excess[n] = growth - pooled
        spread = ", ".join(f"{(r['ru_maxrss_peak'] - r['rss_after_load']) / MiB:.1f}" for r in runs)
        print(f"   {n:>4} pairs: RSS after load {median([r['rss_after_load'] for r in runs]) / MiB:7.1f} MiB, "
              f"peak growth {growth:6.1f} MiB (runs: {spread}; VmHWM {hwm_growth:.1f}), "
              f"pooled responses {n} x {runs[0]['neurons']} x 4 B = {pooled:5.1f} MiB, beyond them {excess[n]:6.1f} MiB")
    plain_growth = None
    if (large, "plain") in results:
        plain = results[(large, "plain")][0]
        plain_growth = (plain["ru_maxrss_peak"] - plain["rss_after_load"]) / MiB
        print(f"   reference: a plain forward over the same {large} pairs (no observation) grows peak RSS by {plain_growth:.1f} MiB")
    extra = excess[large] - excess[small]
    tol = max(MEM_TOL_MIB, MEM_TOL_FRAC * excess[small])
    met = extra <= tol
    print(f"   growth beyond pooled responses, {large} vs {small} pairs: {excess[large]:.1f} vs {excess[small]:.1f} MiB "
          f"({extra:+.1f} MiB for 4x the data; flat if <= +{tol:.0f} MiB): {'MET' if met else 'NOT MET'}")
    summary.append(dict(
        measurement=f"profiling peak RSS beyond pooled responses, {large} vs {small} pairs",
        ours=excess[large], baseline=excess[small], unit="MiB",
        ratio=excess[large] / excess[small] if excess[small] > 0 else float("nan"),
        goal=f"flat (<= +{tol:.0f} MiB)", met=met,
        extra={"delta_mib": extra, "plain_forward_growth_mib": plain_growth,
               "runs": {f"{k[0]}/{k[1]}": v for k, v in results.items()}},
    ))


# ------------------------------------------------------------------ 1. AUROC

def bench_auroc(cfg, summary) -> None:
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from lmms_sgm.expertise import auroc

    N, E, S = cfg["auroc_neurons"], cfg["auroc_examples"], cfg["auroc_subset"]
    rng = np.random.default_rng(0)
    neuron_major = rng.standard_normal((N, E), dtype=np.float32)  # ResponseStore layout [neurons, examples]
    labels = rng.integers(0, 2, E)
    store_view = neuron_major.T  # what store[name] returns: a transposed [examples, neurons] view
    example_major = np.ascontiguousarray(store_view)  # C-contiguous [examples, neurons]
    pristine = neuron_major[:S].copy()  # sklearn reads this copy: a correct result needs untouched inputs
    res = {}

    def sk():
        res["sk"] = np.array([roc_auc_score(labels, pristine[j]) for j in range(S)])

    variants = {
        "ours_view": lambda: res.__setitem__("view", auroc(store_view, labels).numpy()),
        "ours_contig": lambda: res.__setitem__("contig", auroc(example_major, labels).numpy()),
        "ours_view_1t": lambda: res.__setitem__("view_1t", auroc(store_view, labels, threads=1).numpy()),
        "sklearn": sk,
    }
    if not cfg["auroc_one_thread"]:
        del variants["ours_view_1t"]
    times = interleaved(variants, cfg["auroc_repeats"])
    ours = [k for k in ("view", "contig", "view_1t") if k in res]
    diffs = {k: float(np.abs(res[k][:S] - res["sk"]).max()) for k in ours}
    same = all(np.array_equal(res["view"], res[k]) for k in ours)
    untouched = bool(np.array_equal(neuron_major[:S], pristine) and np.array_equal(example_major[:, :S], pristine.T))
    sk_per_neuron = median(times["sklearn"]) / S
    sk_tput = 1 / sk_per_neuron
    print(f"\n== 1. AUROC throughput: {N:,} neurons x {E:,} examples, float32 random responses, random labels "
          f"({cfg['auroc_repeats']} repeats) ==")
    print(f"   sklearn roc_auc_score loop (1 thread) timed on the first {S} neurons only, scaled per neuron to {N:,}:"
          f"\n   median {median(times['sklearn']):.2f} s for {S} -> {sk_per_neuron * N:.1f} s for {N:,} ({sk_tput:,.0f} neurons/s)")
    rows = (
        ("ours_view", "view", "store layout: auroc(neuron_major.T, y), a transposed view", "store .T view", True),
        ("ours_contig", "contig", "C-contiguous [examples, neurons] input", "C-contig [ex, neurons]", True),
        ("ours_view_1t", "view_1t", "store layout, threads=1 (per-core speed-up, info)", "store .T view, threads=1", False),
    )
    for key, rkey, label, short, has_goal in rows:
        if key not in times:
            continue
        t = median(times[key])
        ratio = paired_ratio([s / S * N for s in times["sklearn"]], times[key])
        goal = f"goal >= {GOALS['auroc']:.0f}x" if has_goal else "no goal"
        print(f"   lmms_sgm.auroc, {label}:\n      median {t:.3f} s ({N / t:,.0f} neurons/s), speed-up {fmt_ratio(*ratio)}; {goal}")
        summary.append(dict(
            measurement=f"AUROC {N // 1000}k x {E // 1000}k, {short}",
            ours=N / t, baseline=sk_tput, unit="neurons/s", ratio=ratio[0],
            goal=f">= {GOALS['auroc']:.0f}x" if has_goal else "-", met=(ratio[0] >= GOALS["auroc"]) if has_goal else None,
            extra={"times_s": times[key], "sklearn_times_s_subset": times["sklearn"], "sklearn_subset": S,
                   "max_abs_diff_vs_sklearn": diffs[rkey], "inputs_unchanged": untouched},
        ))
    names = {"view": "view", "contig": "contiguous", "view_1t": "threads=1"}
    print(f"   agreement with sklearn on the {S}-neuron subset: max |diff| = "
          + ", ".join(f"{diffs[k]:.3g} ({names[k]})" for k in ours)
          + f"; results of all layouts identical: {same};\n   inputs unchanged after all calls: {untouched}")


# ------------------------------------------------------------------ 2. profiling

def bench_profile(cfg, model_dir, all_pairs, summary) -> None:
    import torch

    from lmms_sgm import models
    from lmms_sgm.data import PairDataset, encode_batch
    from lmms_sgm.options import ProfileOptions
    from lmms_sgm.profiling import profile
    from lmms_sgm.sites import resolve_sites

    P = cfg["prof_pairs"]
    pairs = PairDataset(all_pairs.pairs[:P])
    options = ProfileOptions(batch_size=BATCH)
    # Two loads of the same checkpoint: profiling wraps its model with nnsight (which patches every
    # module's forward for good), so the plain forward runs on a model nnsight never touched.
    observed, processor = models.load(model_dir)
    plain, _ = models.load(model_dir)
    sites = resolve_sites(observed, options)
    pre = [encode_batch(processor, pairs[s:s + BATCH], options.text_field) for s in range(0, P, BATCH)]

    def run_profile():
        _, store = profile(observed, processor, pairs, options, progress=False)
        store.close()

    def run_plain():  # the same encode_batch calls profile makes, then a full forward (LM head included)
        with torch.inference_mode():
            for s in range(0, P, BATCH):
                plain(**encode_batch(processor, pairs[s:s + BATCH], options.text_field))

    def run_plain_pre():  # forward only, batches encoded beforehand
        with torch.inference_mode():
            for enc in pre:
                plain(**enc)

    times = interleaved({"profile": run_profile, "plain": run_plain, "plain_pre": run_plain_pre}, cfg["prof_repeats"])
    tp, tb, tpre = (median(times[k]) for k in ("profile", "plain", "plain_pre"))
    ratio = paired_ratio(times["plain"], times["profile"])
    ratio_pre = paired_ratio(times["plain_pre"], times["profile"])
    lm = plain.lm_head.weight.numel()
    text_params = sum(p.numel() for p in plain.model.language_model.parameters())
    vision_params = sum(p.numel() for p in plain.model.vision_tower.parameters())
    seq = pre[0]["input_ids"].shape[1]
    print(f"\n== 2. Profiling throughput: {P} pairs, batch {BATCH}, {len(sites)} sites "
          f"({sum(s.width for s in sites):,} neurons, gate/up/down of {MODEL['num_layers']} layers), "
          f"mean pooling, ~{seq} tokens/example ({cfg['prof_repeats']} repeats) ==")
    print(f"   profile (nnsight traces, encoding included):          median {tp:.3f} s, {P / tp:6.1f} examples/s")
    print(f"   plain forward, same encode_batch calls, full model:   median {tb:.3f} s, {P / tb:6.1f} examples/s")
    print(f"   plain forward only, batches pre-encoded (info):       median {tpre:.3f} s, {P / tpre:6.1f} examples/s")
    print(f"   profile / plain: {fmt_ratio(*ratio)}; goal >= {GOALS['profile']}x   "
          f"(vs pre-encoded forward only: {ratio_pre[0]:.3g}x)")
    print(f"   fairness: profile stops after the last profiled layer (tracer.stop), skipping the final norm and LM head;"
          f"\n   the plain forward computes them. Here the LM head is {lm:,} params ({lm / (text_params + vision_params + lm):.2%}"
          f" of the model; vocab {plain.lm_head.out_features}), so the skip is worth well under 1%;"
          f"\n   in LLaVA-1.5-7B it would be ~2% (32k x 4096 of ~7B).")
    summary.append(dict(
        measurement=f"profiling, {P} pairs, all {len(sites)} gate/up/down sites",
        ours=P / tp, baseline=P / tb, unit="examples/s", ratio=ratio[0], goal=f">= {GOALS['profile']}x",
        met=ratio[0] >= GOALS["profile"],
        extra={"times_s": times, "ratio_vs_preencoded_forward": ratio_pre[0], "lm_head_params": lm},
    ))


# ------------------------------------------------------------------ 3. generation

def bench_generate(cfg, model_dir, all_pairs, summary) -> None:
    import torch

    from lmms_sgm import models
    from lmms_sgm.data import PairDataset, encode_batch
    from lmms_sgm.interventions.wearing import as_generator
    from lmms_sgm.options import ProfileOptions, SelectionOptions
    from lmms_sgm.pipeline import build_glasses

    T = cfg["gen_new_tokens"]
    # Glasses from the profiling pairs. build_glasses wraps `profiled` with nnsight, which patches
    # its modules' forward for good: the timed models are separate, fresh loads.
    profiled, processor = models.load(model_dir)
    t0 = time.perf_counter()
    glasses = build_glasses(profiled, processor, PairDataset(all_pairs.pairs[:cfg["prof_pairs"]]),
                            ProfileOptions(batch_size=BATCH), SelectionOptions(), progress=False)
    t_build = time.perf_counter() - t0
    counts = glasses.counts()
    hf, _ = models.load(model_dir)           # vanilla, hooks and fold (applied/removed around each call)
    nn_edit_model, _ = models.load(model_dir)  # nnsight mode, edit kept for the whole benchmark
    nn_plain_model, _ = models.load(model_dir)  # nnsight wrapper without any edit
    nn_handle = glasses.apply(nn_edit_model, mode="nnsight", processor=processor)
    nn_plain = as_generator(nn_plain_model, processor)
    n_changed = len(glasses.factors(1.0))
    kw = dict(max_new_tokens=T, min_new_tokens=T, do_sample=False)

    print(f"\n== 3. Generation throughput: greedy, {T} new tokens (min_new_tokens={T}), "
          f"{cfg['gen_repeats']} repeats per batch size ==")
    print(f"   glasses: {counts['experts']:,} experts of {counts['neurons']:,} neurons, {n_changed} sites changed "
          f"(SelectionOptions() defaults); build_glasses on {cfg['prof_pairs']} pairs took {t_build:.2f} s")
    print("   tokens/s = batch x new tokens / wall time of generate (prompt pass included); apply/remove not timed")

    for bs in cfg["gen_batches"]:
        enc = encode_batch(processor, all_pairs.pairs[:bs], "question", padding_side="left")  # generate
        prompt = enc["input_ids"].shape[1]
        outs = {}
        handle = {}

        def hf_gen(model, key):
            def run():
                outs[key] = model.generate(**enc, **kw)
            return run

        def nn_gen(wrapper, key):
            def run():
                with wrapper.generate(**enc, **kw) as tracer:
                    out = tracer.result.save()
                outs[key] = out
            return run

        def wear(mode):
            return lambda: handle.__setitem__(mode, glasses.apply(hf, mode=mode))

        def take_off(mode):
            return lambda: handle.pop(mode).remove()

        variants = {
            "vanilla": hf_gen(hf, "vanilla"),
            "hooks": (wear("hooks"), hf_gen(hf, "hooks"), take_off("hooks")),
            "fold": (wear("fold"), hf_gen(hf, "fold"), take_off("fold")),
            "nnsight": nn_gen(nn_handle.model, "nnsight"),
            "nnsight_no_edit": nn_gen(nn_plain, "nnsight_no_edit"),
            "vanilla_after_nnsight": hf_gen(profiled, "vanilla_after_nnsight"),
        }
        times = interleaved(variants, cfg["gen_repeats"])
        tokens = bs * T
        lengths = {k: tuple(v.shape) for k, v in outs.items()}
        edited_agree = all(torch.equal(outs["hooks"], outs[k]) for k in ("fold", "nnsight"))
        plain_agree = all(torch.equal(outs["vanilla"], outs[k]) for k in ("nnsight_no_edit", "vanilla_after_nnsight"))
        print(f"   -- batch {bs} (prompt {prompt} tokens, output {lengths['vanilla']}) --")
        tv = median(times["vanilla"])
        print(f"   {'vanilla HF generate':<44} {tokens / tv:8.1f} tok/s")
        rows = [
            ("fold", "fold (weights scaled in place)", GOALS["fold"]),
            ("hooks", "hooks (forward hooks)", GOALS["hooks"]),
            ("nnsight", "nnsight (persistent edit)", None),
            ("nnsight_no_edit", "nnsight wrapper, no edit", None),
            ("vanilla_after_nnsight", "HF generate on model build_glasses wrapped", None),
        ]
        for key, label, goal in rows:
            t = median(times[key])
            ratio = paired_ratio(times["vanilla"], times[key])
            goal_s = f"goal >= {goal}x" if goal else "no goal"
            print(f"   {label:<44} {tokens / t:8.1f} tok/s, vs vanilla {fmt_ratio(*ratio)}; {goal_s}")
            summary.append(dict(
                measurement=f"generate bs={bs}: {label}", ours=tokens / t, baseline=tokens / tv, unit="tok/s",
                ratio=ratio[0], goal=f">= {goal}x" if goal else "-", met=(ratio[0] >= goal) if goal else None,
                extra={"times_s": times[key], "vanilla_times_s": times["vanilla"]},
            ))
        edit_cost = paired_ratio(times["nnsight_no_edit"], times["nnsight"])
        print(f"   nnsight: wrapper alone {paired_ratio(times['vanilla'], times['nnsight_no_edit'])[0]:.3f}x of vanilla; "
              f"the edit on top of the wrapper {edit_cost[0]:.3f}x")
        print(f"   outputs: all {len(outs)} variants {sorted(set(lengths.values()))}; hooks == fold == nnsight tokens: "
              f"{edited_agree}; vanilla == nnsight wrapper == wrapped HF model: {plain_agree}")
    nn_handle.remove()


# ------------------------------------------------------------------ main

def print_summary(summary, started, load_start) -> None:
    print("\n== Summary (medians; ratio = ours / baseline throughput, median of per-repeat paired ratios) ==")
    head = ("measurement", "ours", "baseline", "ratio", "goal", "met?")
    rows = []
    for r in summary:
        unit = r["unit"]
        num = (lambda v: f"{v:,.0f} {unit}") if r["ours"] >= 1000 else (lambda v: f"{v:.1f} {unit}")
        rows.append(
            (
                r["measurement"],
                num(r["ours"]),
                num(r["baseline"]),
                (f"{r['ratio']:.3f}x" if r["ratio"] < 10 else f"{r['ratio']:.1f}x"),
                r["goal"],
                met_mark(r["met"]),
            )
        )
    print_table(head, rows, left={0, 4})
    print_load(load_start, started)

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (under a minute)")
    ap.add_argument("--json", metavar="PATH", help="also write the summary (and raw timings) as JSON here")
    ap.add_argument("--workdir", metavar="DIR", help="where the tiny model and data go (default: a temporary directory)")
    ap.add_argument("--threads", type=int, metavar="N", help="torch intra-op threads for the timed benchmarks (default: torch's)")
    ap.add_argument("--_mem-child", nargs=4, dest="mem_child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.mem_child:
        model_dir, data_path, n, mode = args.mem_child
        mem_child(model_dir, data_path, int(n), mode)
        return 0

    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    cfg = QUICK if args.quick else FULL
    tmp = None
    if args.workdir:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="lmms_sgm_bench_")
        work = Path(tmp.name)
    # The model and data are built by a short-lived child too, so this process stays small until
    # the memory children have run (see the note at the imports).
    model_dir, data_dir = work / "tiny-llava", work / "pairs"
    n_data = max(max(cfg["mem_sizes"]), cfg["prof_pairs"], max(cfg["gen_batches"]))
    subprocess.run([sys.executable, "-c", (
        "import sys, warnings; warnings.filterwarnings('ignore');"
        "import transformers; transformers.utils.logging.set_verbosity_error(); transformers.utils.logging.disable_progress_bar();"
        "from lmms_sgm import tiny;"
        f"tiny.build_tiny_llava(sys.argv[1], **{MODEL!r});"
        f"tiny.write_toy_pairs(sys.argv[2], {n_data}, image_size={MODEL['image_size']})"
    ), str(model_dir), str(data_dir)], check=True, stderr=subprocess.DEVNULL)
    data_path = str(data_dir / "pairs.jsonl")
    print(f"lmms_sgm core benchmarks ({'quick' if args.quick else 'full'}) - python {platform.python_version()}, "
          f"{os.cpu_count()} cores, load average {load_start:.2f}")
    print(f"tiny LLaVA: {MODEL}; {n_data} toy pairs; work dir {work}")

    summary: list[dict] = []
    sections = {}
    t = time.perf_counter()
    mem_results = run_mem_children(cfg, str(model_dir), data_path)  # first: see the note at the imports
    sections["memory (children)"] = time.perf_counter() - t

    quiet()
    import torch

    from lmms_sgm.data import load_pairs

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    all_pairs = load_pairs(data_path)
    for name, bench in (("auroc", bench_auroc), ("profiling", bench_profile), ("generation", bench_generate)):
        t = time.perf_counter()
        bench(cfg, summary) if name == "auroc" else bench(cfg, str(model_dir), all_pairs, summary)
        sections[name] = time.perf_counter() - t
    report_memory(cfg, mem_results, summary)
    print_summary(summary, started, load_start)
    print("section wall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in sections.items()))

    if args.json:
        import numpy
        import sklearn

        doc = {
            "quick": args.quick, "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
            "model": MODEL, "summary": summary,
            "environment": environment(load_start, numpy=numpy.__version__, sklearn=sklearn.__version__),
            "total_s": time.perf_counter() - started,
        }
        write_json(args.json, doc)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
