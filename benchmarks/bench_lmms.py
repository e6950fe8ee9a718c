#!/usr/bin/env python
"""Throughput of the ``sgm_llava`` lmms-eval model with SGM on vs off, per apply mode, in one run.

    .venv/bin/python benchmarks/bench_lmms.py [--quick] [--json PATH]

Every run goes through lmms-eval 0.7.3's own evaluator, in process: ``simple_evaluate`` with one
``TaskManager`` built once (our tasks on its search path), on two of our tasks:

* ``mm_toxic_qa``       generate_until (12 image+question docs, greedy, fixed max_new_tokens)
* ``mmbench_local_mc``  loglikelihood / multiple choice (7 docs, 25 option requests)

Variants (all the same ``sgm_llava`` class): ``sgm=off`` (the baseline, plain HF model through the
wrapper), ``sgm=off,mode=nnsight`` (the nnsight wrapper without an edit), and glasses worn with
``mode=hooks``, ``mode=fold`` and ``mode=nnsight``. Variants are interleaved in every repeat (in a
rotating order), times are medians, and ratios are medians of per-repeat paired ratios
(variant / sgm=off throughput, so > 1 is faster). See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

from common import environment, fmt_ratio, median, met_mark, paired_ratio, print_load, print_table, write_json

# Before torch loads OpenMP (see bench_core.py): idle OpenMP threads sleep instead of spinning,
# which on a shared 2-core machine otherwise slows torch many times over. Same for all variants.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Never touch the network; no progress bars (tqdm reads TQDM_DISABLE when a bar is created).
for _k, _v in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"),
               ("TOKENIZERS_PARALLELISM", "false"), ("TQDM_DISABLE", "1")):
    os.environ.setdefault(_k, _v)

# Repeats per batch size and task; the loglikelihood task is ~3x cheaper per run, so it gets more.
FULL = dict(batches=(4, 1), max_new_tokens=32,
            repeats={4: {"mm_toxic_qa": 7, "mmbench_local_mc": 9}, 1: {"mm_toxic_qa": 3, "mmbench_local_mc": 7}})
QUICK = dict(batches=(4,), max_new_tokens=32, repeats={4: {"mm_toxic_qa": 3, "mmbench_local_mc": 5}})
# The tiny LLaVA of bench_core: 8 Llama layers of 256/688, CLIP 64x64 images in 8x8 patches.
MODEL = dict(hidden_size=256, intermediate_size=688, num_layers=8, num_heads=4,
             vision_hidden=64, vision_layers=2, image_size=64, patch_size=8)
N_PAIRS = 32  # toy pairs the glasses are profiled on

TASKS = {"mm_toxic_qa": "generate_until", "mmbench_local_mc": "loglikelihood"}
BASELINE = "off"
# name -> (model_args beyond pretrained, label)
VARIANTS = {
    "off": ("sgm=off,mode=hooks", "sgm=off (vanilla, same wrapper)"),
    "off_nnsight": ("sgm=off,mode=nnsight", "sgm=off, mode=nnsight (wrapper, no edit)"),
    "hooks": ("glasses={g},strength=1.0,mode=hooks", "glasses, mode=hooks"),
    "fold": ("glasses={g},strength=1.0,mode=fold", "glasses, mode=fold"),
    "nnsight": ("glasses={g},strength=1.0,mode=nnsight", "glasses, mode=nnsight"),
}
# The generation goals of bench_core.py (#3), applied here to the wrapper's request throughput.
GOALS = {"fold": 0.98, "hooks": 0.95}
try:
    from importlib.metadata import version as _version

    LMMS_EVAL_VERSION = _version("lmms_eval")
except Exception:  # noqa: BLE001 - informational only
    LMMS_EVAL_VERSION = "?"


# ------------------------------------------------------------------ helpers




def quiet():
    warnings.filterwarnings("ignore")
    import transformers
    from loguru import logger

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # lmms-eval and sgm_llava log through loguru at INFO (one line per model and task per call).
    logger.remove()
    logger.add(sys.stderr, level="ERROR")


def prepare(work: Path, cfg) -> dict:
    """Tiny model, toy pairs, glasses and task data under ``work``; returns their paths."""
    from lmms_sgm_tasks.mm_toxic_qa.make_sample import write_sample as write_mm_toxic_qa
    from lmms_sgm_tasks.mmbench_local.make_sample import write_sample as write_mmbench
    from transformers import GenerationConfig

    from lmms_sgm import models, tiny
    from lmms_sgm.options import ProfileOptions, SelectionOptions
    from lmms_sgm.pipeline import build_glasses

    model_dir = tiny.build_tiny_llava(work / "tiny-llava", **MODEL)
    # Same generation length for every variant: sgm_llava passes no min_new_tokens (and `until`
    # only truncates the decoded text), so HF generate stops a batch early once every row has
    # emitted EOS, and glasses that change the text change the work. The checkpoint's generation
    # config therefore asks for exactly max_new_tokens (as bench_core passes min_new_tokens).
    gc_ = GenerationConfig.from_pretrained(model_dir)
    gc_.min_new_tokens = cfg["max_new_tokens"]
    gc_.save_pretrained(model_dir)
    pairs = tiny.write_toy_pairs(work / "pairs", N_PAIRS, image_size=MODEL["image_size"])
    model, processor = models.load(str(model_dir))
    t = time.perf_counter()
    glasses = build_glasses(model, processor, pairs, ProfileOptions(), SelectionOptions(),
                            out=work / "glasses", progress=False)
    t_build = time.perf_counter() - t
    del model
    return {
        "model": model_dir, "glasses_dir": work / "glasses", "counts": glasses.counts(),
        "n_changed": len(glasses.factors(1.0)), "t_build": t_build,
        "mm_toxic_qa": write_mm_toxic_qa(work / "mm_toxic_qa"),
        "mmbench": write_mmbench(work / "mmbench_local.tsv"),
    }


# ------------------------------------------------------------------ one evaluator run

class Runner:
    """One ``simple_evaluate`` call per (task, variant, batch size), as the CLI makes it."""

    def __init__(self, paths, cfg, task_manager):
        self.paths, self.cfg, self.task_manager = paths, cfg, task_manager

    def model_args(self, variant: str) -> str:
        extra = VARIANTS[variant][0].format(g=self.paths["glasses_dir"])
        return f"pretrained={self.paths['model']},{extra}"

    def run(self, task: str, variant: str, batch_size: int, limit=None) -> dict:
        """Build the model (timed apart), then simple_evaluate on it; the model's request method is
        wrapped on the instance to time it and keep its outputs, ``_generate`` to count tokens."""
        from lmms_eval import evaluator
        from lmms_eval.models import get_model

        rec = {"task": task, "variant": variant, "batch_size": batch_size, "model_s": 0.0,
               "gen_rows": 0, "gen_steps": 0, "gen_tokens": 0, "prompt_tokens": 0, "gen_calls": 0}
        gc.collect()  # untimed: every call starts from the same garbage-collector state
        t0 = time.perf_counter()
        # What simple_evaluate(model="sgm_llava", model_args=..., batch_size=...) does first.
        lm = get_model("sgm_llava").create_from_arg_string(
            self.model_args(variant), {"batch_size": batch_size, "max_batch_size": None, "device": None})
        rec["construct_s"] = time.perf_counter() - t0
        rec["sgm_info"] = {k: v for k, v in lm.sgm_info.items() if k in ("sgm", "mode", "experts")}
        rec["edit_on"] = lm._handle is not None

        reqtype = TASKS[task]
        method = getattr(lm, reqtype)

        def timed(requests):
            rec["edit_on_at_call"] = lm._handle is not None  # evaluate's lm.clean() removes it only afterwards
            rec["n_requests"] = len(requests)
            rec["n_docs"] = len({(r.task_name, r.doc_id) for r in requests})
            t = time.perf_counter()
            out = method(requests)
            rec["model_s"] += time.perf_counter() - t
            rec["outputs"] = list(out)
            return out

        setattr(lm, reqtype, timed)  # evaluate calls getattr(lm, reqtype)(requests)
        if reqtype == "generate_until":
            generate = lm._generate

            def counted(enc, gen):
                out = generate(enc, gen)
                rows, prompt = enc["input_ids"].shape
                steps = out.shape[1] - prompt
                rec["gen_calls"] += 1
                rec["gen_rows"] += rows
                rec["gen_steps"] += steps
                rec["gen_tokens"] += rows * steps
                rec["prompt_tokens"] += int(enc["attention_mask"].sum())
                return out

            lm._generate = counted

        # sgm_llava and lmms-eval draw tqdm bars on sys.stderr whatever TQDM_DISABLE says: into a
        # buffer (its tail is shown if the call fails). The loguru handler keeps the real stderr.
        buf = io.StringIO()
        try:
            with contextlib.redirect_stderr(buf):
                t1 = time.perf_counter()
                results = evaluator.simple_evaluate(
                    model=lm, tasks=[task], batch_size=batch_size, limit=limit,
                    gen_kwargs=f"max_new_tokens={self.cfg['max_new_tokens']},temperature=0",
                    task_manager=self.task_manager, log_samples=False, verbosity="ERROR",
                )
                rec["eval_s"] = time.perf_counter() - t1
        except BaseException:
            sys.stderr.write(buf.getvalue()[-3000:])
            raise
        rec["metrics"] = {k: v for k, v in results["results"][task].items()
                          if isinstance(v, (int, float)) and not k.endswith("_stderr,none") and k != "alias"}
        return rec


def interleave(runner, units: list[tuple[str, str]], batch_size: int, repeats: dict, warmup_limit) -> dict:
    """Records of every (task, variant): each repeat runs every unit, tasks in turn, the variants of
    a task in a rotated order; a task leaves the rotation after ``repeats[task]`` repeats. An
    untimed warm-up call per unit first (``warmup_limit`` docs) unless ``warmup_limit`` is None."""
    if warmup_limit is not None:
        for task, variant in units:
            runner.run(task, variant, batch_size, limit=warmup_limit)
    gc.collect()
    gc.freeze()  # the per-call gc.collect() then walks only the calls' own garbage
    try:
        recs = {u: [] for u in units}
        tasks = list(dict.fromkeys(t for t, _ in units))
        for r in range(max(repeats.values())):
            for task in tasks:
                if r >= repeats[task]:
                    continue
                names = [v for t, v in units if t == task]
                k = r % len(names)
                for variant in names[k:] + names[:k]:
                    recs[(task, variant)].append(runner.run(task, variant, batch_size))
    finally:
        gc.unfreeze()
    return recs


# ------------------------------------------------------------------ reporting

def agreement(task, recs) -> str:
    """Are the outputs of the unedited variants identical, and those of the edited ones?"""
    out = {v: rs[0]["outputs"] for (t, v), rs in recs.items() if t == task}
    if TASKS[task] == "generate_until":
        plain_same = out["off"] == out["off_nnsight"]
        edited_same = out["hooks"] == out["fold"] == out["nnsight"]
        changed = sum(a != b for a, b in zip(out["off"], out["hooks"]))
        return (f"outputs: sgm=off == off+nnsight: {plain_same}; hooks == fold == nnsight: {edited_same}; "
                f"glasses change {changed}/{len(out['off'])} generations")

    def maxdiff(a, b):
        return max(abs(x[0] - y[0]) for x, y in zip(out[a], out[b]))

    return (f"losses: max |diff| off vs off+nnsight {maxdiff('off', 'off_nnsight'):.2g}; hooks vs fold "
            f"{maxdiff('hooks', 'fold'):.2g}, hooks vs nnsight {maxdiff('hooks', 'nnsight'):.2g}; "
            f"off vs hooks {maxdiff('off', 'hooks'):.2g} (the glasses' effect)")


def report(task, batch_size, recs, summary) -> None:
    reqtype = TASKS[task]
    base = recs[(task, BASELINE)]
    n_docs, n_req = base[0]["n_docs"], base[0]["n_requests"]
    print(f"   -- {task} ({reqtype}), batch {batch_size}: {n_docs} docs, {n_req} requests per run, "
          f"{len(base)} repeats --")
    if reqtype == "generate_until":
        b = base[0]
        print(f"   each run: {b['gen_calls']} generate calls, {b['gen_tokens']} generated tokens "
              f"({b['gen_rows']} rows x new tokens), {b['prompt_tokens']} prompt tokens")
    head = (f"   {'variant':<42} {'model s':>8} {'samples/s':>9} {'vs off':>21} | {'evaluate s':>10} "
            f"{'samples/s':>9} {'vs off':>21} | {'load s':>6}")
    print(head)
    for variant, (_, label) in VARIANTS.items():
        rs = recs[(task, variant)]
        tm, te, tc = (median([r[k] for r in rs]) for k in ("model_s", "eval_s", "construct_s"))
        rm = paired_ratio([r["model_s"] for r in base], [r["model_s"] for r in rs])
        re_ = paired_ratio([r["eval_s"] for r in base], [r["eval_s"] for r in rs])
        tokens = sorted({r["gen_tokens"] for r in rs})
        same_work = tokens == sorted({r["gen_tokens"] for r in base})
        print(f"   {label:<42} {tm:8.3f} {n_docs / tm:9.2f} {fmt_ratio(*rm):>21} | {te:10.3f} "
              f"{n_docs / te:9.2f} {fmt_ratio(*re_):>21} | {tc:6.2f}")
        goal = GOALS.get(variant)
        summary.append(dict(
            task=task, batch_size=batch_size, variant=variant, label=label,
            model_samples_s=n_docs / tm, model_ratio=rm[0], model_ratio_range=rm[1:],
            eval_samples_s=n_docs / te, eval_ratio=re_[0], eval_ratio_range=re_[1:],
            construct_s=tc, gen_tokens=tokens[0] if len(tokens) == 1 else tokens, same_work_as_off=same_work,
            goal=f">= {goal}x" if goal else "-", met=(rm[0] >= goal) if goal else None,
            n_docs=n_docs, n_requests=n_req,
            edit_on_at_call=all(r["edit_on_at_call"] for r in rs),
            metrics=rs[0]["metrics"],
            times={k: [r[k] for r in rs] for k in ("model_s", "eval_s", "construct_s")},
        ))
    wrapper = paired_ratio([r["model_s"] for r in base], [r["model_s"] for r in recs[(task, "off_nnsight")]])
    edit = paired_ratio([r["model_s"] for r in recs[(task, "off_nnsight")]], [r["model_s"] for r in recs[(task, "nnsight")]])
    print(f"   nnsight, model time: the wrapper alone {wrapper[0]:.3f}x of sgm=off; the edit on top of the wrapper {edit[0]:.3f}x")
    print(f"   {agreement(task, recs)}")
    mismatched = [s["variant"] for s in summary[-len(VARIANTS):] if not s["same_work_as_off"]]
    edits = [s["variant"] for s in summary[-len(VARIANTS):] if s["variant"] in ("hooks", "fold", "nnsight")
             and not s["edit_on_at_call"]]
    if mismatched:
        print(f"   WARNING: generated-token counts differ from sgm=off for {mismatched}: their samples/s are not the same work")
    if edits:
        print(f"   WARNING: glasses were off while {edits} ran")


def print_summary(summary, started, load_start) -> None:
    print("\n== Summary (medians; vs off = variant / sgm=off throughput, median of per-repeat paired ratios; "
          "model = the request method, evaluate = simple_evaluate without model load) ==")
    head = ("task", "bs", "variant", "model samples/s", "vs off", "evaluate samples/s", "vs off", "load s", "goal", "met?")
    rows = []
    for s in summary:
        rows.append((s["task"], str(s["batch_size"]), s["label"], f"{s['model_samples_s']:.2f}",
                     f"{s['model_ratio']:.3f}x", f"{s['eval_samples_s']:.2f}", f"{s['eval_ratio']:.3f}x",
                     f"{s['construct_s']:.2f}", s["goal"], met_mark(s["met"])))
    print_table(head, rows, left={0, 2, 8, 9})
    gen = [s for s in summary if TASKS[s["task"]] == "generate_until"]
    same = all(s["same_work_as_off"] for s in gen)
    print(f"(generate_until: every variant generated the same number of tokens as sgm=off in every run: {same}; "
          + ", ".join(sorted({f"batch {s['batch_size']}: {s['gen_tokens']} tokens per run" for s in gen})) + ")")
    print_load(load_start, started)


# ------------------------------------------------------------------ main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batch 4 only, fewer repeats (~1 min)")
    ap.add_argument("--json", metavar="PATH", help="also write the summary (and raw timings) as JSON here")
    ap.add_argument("--workdir", metavar="DIR", help="where the tiny model, glasses and task data go (default: a temporary directory)")
    ap.add_argument("--threads", type=int, metavar="N", help="torch intra-op threads (default: torch's)")
    args = ap.parse_args(argv)

    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    cfg = QUICK if args.quick else FULL
    tmp = None
    if args.workdir:
        work = Path(args.workdir).resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="lmms_sgm_bench_lmms_")
        work = Path(tmp.name)
    # The task data and the datasets cache live in the work dir: nothing read from or written to ~.
    os.environ["HF_DATASETS_CACHE"] = str(work / "hf_datasets")
    os.environ["LMMS_SGM_CACHE"] = str(work / "glasses_cache")
    os.environ["LMMS_SGM_JUDGE"] = "lexicon"
    os.environ.pop("LMMS_SGM_JUDGE_ARGS", None)

    print(f"lmms_sgm lmms-eval benchmark ({'quick' if args.quick else 'full'}) - python {platform.python_version()}, "
          f"{os.cpu_count()} cores, load average {load_start:.2f}")
    quiet()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    paths = prepare(work, cfg)
    t_prepare = time.perf_counter() - t
    os.environ["MM_TOXIC_QA_DIR"] = str(paths["mm_toxic_qa"])
    os.environ["MMBENCH_LOCAL_TSV"] = str(paths["mmbench"])

    t = time.perf_counter()
    from lmms_eval.tasks import TaskManager

    from lmms_sgm.lmms import registration

    registration.manifests()  # puts our tasks on TaskManager's search path (sgm_llava is an entry point)
    # Imported now: they add their own loguru handlers, which quiet() removes below.
    import lmms_eval.evaluator
    import lmms_eval.models  # noqa: F401
    t_import = time.perf_counter() - t
    t = time.perf_counter()
    task_manager = TaskManager("ERROR")
    t_tm = time.perf_counter() - t
    quiet()  # lmms-eval's import re-adds its loguru handler
    missing = [name for name in TASKS if name not in task_manager.all_tasks]
    if missing:
        raise SystemExit(f"tasks {missing} not found by lmms-eval's TaskManager (is lmms_sgm installed?)")

    c = paths["counts"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; "
          f"lmms-eval {LMMS_EVAL_VERSION}")
    print(f"tiny LLaVA: {MODEL}; work dir {work}")
    print(f"glasses: build_glasses on {N_PAIRS} toy pairs, ProfileOptions()/SelectionOptions() defaults: "
          f"{c['experts']:,} experts of {c['neurons']:,} neurons, {paths['n_changed']} sites changed ({paths['t_build']:.1f} s)")
    print(f"set-up: model+pairs+glasses+task data {t_prepare:.1f} s, importing lmms-eval {t_import:.1f} s, "
          f"TaskManager (once) {t_tm:.1f} s - none of it timed below")
    print(f"gen_kwargs max_new_tokens={cfg['max_new_tokens']},temperature=0 (greedy; the task's `until` stays). "
          f"Every generation is exactly {cfg['max_new_tokens']} tokens: the tiny checkpoint's generation_config sets "
          "min_new_tokens to it, so all variants do the same work (token counts checked below); sgm_llava applies "
          "`until` to the decoded text only, so stop strings never change the work.")
    print("Timed per call: 'model' = the wrapper's generate_until / loglikelihood on the requests lmms-eval built "
          "(prompt formatting, image processing, batching, forward/generate, decoding); 'evaluate' = the whole "
          "simple_evaluate(model=<instance>, tasks=[task], ...) call (task and request building, the model, filters, "
          "metrics, the judge); 'load' = building the sgm_llava instance (from_pretrained, glasses load + apply), "
          "which simple_evaluate(model=\"sgm_llava\", ...) would do first. A fresh instance per call: lmms-eval's "
          "evaluate() ends with lm.clean(), which deletes the model's modules.")

    summary: list[dict] = []
    runner = Runner(paths, cfg, task_manager)
    units = [(task, v) for task in TASKS for v in VARIANTS]
    raw = {}
    sections = {}
    for i, bs in enumerate(cfg["batches"]):
        t = time.perf_counter()
        reps = cfg["repeats"][bs]
        warm = f", after one untimed warm-up call each ({bs} docs)" if i == 0 else ""
        print(f"\n== batch size {bs}: {len(units)} (task, variant) units, repeats "
              + ", ".join(f"{k} {v}" for k, v in reps.items()) + f"{warm} ==")
        recs = interleave(runner, units, bs, reps, warmup_limit=bs if i == 0 else None)
        for task in TASKS:
            report(task, bs, {k: v for k, v in recs.items() if k[0] == task}, summary)
        raw[bs] = {f"{k[0]}/{k[1]}": [{kk: vv for kk, vv in r.items() if kk != "outputs"} for r in v]
                   for k, v in recs.items()}
        sections[f"batch {bs}"] = time.perf_counter() - t

    print_summary(summary, started, load_start)
    print("section wall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in sections.items()))

    if args.json:
        doc = {
            "quick": args.quick, "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
            "model": MODEL, "glasses": paths["counts"], "summary": summary, "raw": raw,
            "environment": environment(load_start, lmms_eval=LMMS_EVAL_VERSION),
            "total_s": time.perf_counter() - started,
        }
        write_json(args.json, doc)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
