#!/usr/bin/env python
"""Report generation time: ``lmms-sgm report`` on runs of 1,000 logged samples per task.

    .venv/bin/python benchmarks/bench_report.py [--runs 2] [--docs 1000] [--repeats 3] [--json PATH]

Writes ``--runs`` lmms-eval output folders (results.json and ``--log_samples`` files in lmms-eval
0.7.3's format) with ``--docs`` prompts in each of five tasks: greedy and sampled (5 answers per
prompt) harmful rates with 5 categories and judge verdicts, benign over-refusal and helpfulness,
multiple-choice accuracy, and the fluency perplexity. Then times, in process, what the command
does: reading the folders (``load_run``) and every sample file, building the report (per metric
and run a 2,000-resample bootstrap, paired bootstraps and sign-flip tests against the baseline,
examples) and writing report.html / .md / .json; plus the whole ``lmms-sgm report`` command as a
subprocess (interpreter start-up and imports included). Medians over ``--repeats``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import median, print_load, print_table, write_json

JUDGE = {"name": "lexicon", "version": "1", "config": {"lexicon": {"source": "builtin", "terms": 20, "sha256": "59c1452971c40ae9"}}}
CATS = ["insult", "threat", "harassment", "deception", "self-harm"]


def write_run(root: Path, docs: int, seed: int, harm_p: float) -> Path:
    """One lmms-eval output folder; per-prompt values drawn with ``harm_p`` as the harmful rate."""
    rng = np.random.default_rng(seed)
    d = root / "model"
    d.mkdir(parents=True)
    stamp = "20260101_000000"
    samples: dict[str, list] = {t: [] for t in ("mm_toxic_qa", "mm_toxic_qa_sampled", "mm_toxic_qa_benign",
                                                "mm_toxic_qa_fluency", "mmbench_local_mc")}
    greedy = (rng.random(docs) < harm_p).astype(float)
    flags = rng.random((docs, 5)) < harm_p
    over = (rng.random(docs) < 0.02).astype(float)
    helpful = (rng.random(docs) < 0.9).astype(float)
    nll = rng.exponential(0.3, docs)
    acc = (rng.random(docs) < 0.85).astype(float)
    def verdict(u):
        return {"unsafe": bool(u), "refusal": False, "score": float(u), "reason": "lexicon hits: idiot" if u else "no lexicon term"}

    for i in range(docs):
        c = CATS[i % len(CATS)]
        samples["mm_toxic_qa"].append({"doc_id": i, "target": "", "filtered_resps": ["you idiot ." if greedy[i] else "a calm answer ."],
                                       "input": f"what do you think of picture {i} ?", "harmful_rate": {"score": greedy[i], "category": c},
                                       "harmful_rate_by_category": {"value": greedy[i], "category": c},
                                       "judge": {**JUDGE, "verdicts": [verdict(greedy[i])]}})
        samples["mm_toxic_qa_sampled"].append({"doc_id": i, "target": "", "filtered_resps": [f"answer {k}" for k in range(5)],
                                               "input": f"what do you think of picture {i} ?",
                                               "harmful_rate": {"score": float(flags[i].mean()), "category": c},
                                               "judge": {**JUDGE, "verdicts": [verdict(u) for u in flags[i]]}})
        samples["mm_toxic_qa_benign"].append({"doc_id": i, "target": "red", "filtered_resps": ["red"], "input": f"which colour {i} ?",
                                              "over_refusal_rate": {"score": over[i], "category": "colour"},
                                              "helpfulness": {"score": helpful[i], "category": "colour", "answer": "red"}})
        samples["mm_toxic_qa_fluency"].append({"doc_id": i, "target": " red", "filtered_resps": [str(nll[i]), "True"],
                                               "input": f"which colour {i} ?", "perplexity": {"nll": float(nll[i]), "category": "colour"}})
        samples["mmbench_local_mc"].append({"doc_id": i, "target": "0", "filtered_resps": [["0.1", "True"], ["2.0", "False"]],
                                            "input": f"q {i}", "acc": acc[i]})
    results = {
        "mm_toxic_qa": {
            "harmful_rate,none": float(greedy.mean()),
            "harmful_rate_stderr_clt,none": float(greedy.std(ddof=1) / math.sqrt(docs)),
            "harmful_rate_by_category,none": {c: float(greedy[i::5].mean()) for i, c in enumerate(CATS)},
            "judge,none": JUDGE,
        },
        "mm_toxic_qa_sampled": {"harmful_rate,samples": float(flags.mean(1).mean()), "judge,samples": JUDGE},
        "mm_toxic_qa_benign": {
            "over_refusal_rate,none": float(over.mean()),
            "helpfulness,none": float(helpful.mean()),
            "judge,none": JUDGE,
        },
        "mm_toxic_qa_fluency": {"perplexity,none": float(math.exp(nll.mean()))},
        "mmbench_local_mc": {"acc,none": float(acc.mean())},
    }
    hib = {"mm_toxic_qa": {"harmful_rate": False, "harmful_rate_by_category": False, "judge": None},
           "mm_toxic_qa_sampled": {"harmful_rate": False, "judge": None},
           "mm_toxic_qa_benign": {"over_refusal_rate": False, "helpfulness": True, "judge": None},
           "mm_toxic_qa_fluency": {"perplexity": False}, "mmbench_local_mc": {"acc": True}}
    path = d / f"{stamp}_results.json"
    path.write_text(json.dumps({"results": results, "higher_is_better": hib, "configs": {},
                                "n-samples": {t: {"original": docs, "effective": docs} for t in results},
                                "config": {"model": "sgm_llava", "model_args": "pretrained=m", "limit": None}}))
    for task, lines in samples.items():
        (d / f"{stamp}_samples_{task}.jsonl").write_text("".join(json.dumps(s) + "\n" for s in lines))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--docs", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    load_start, started = os.getloadavg()[0], time.perf_counter()
    from lmms_sgm import reports
    from lmms_sgm.reports import results as rs

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = [str(write_run(tmp / f"run{k}", args.docs, seed=k, harm_p=0.45 - 0.08 * k).parent.parent) for k in range(args.runs)]
        names = [f"run{k}" for k in range(args.runs)]
        timings: dict[str, list[float]] = {"read": [], "build": [], "write": [], "in process": [], "lmms-sgm report (subprocess)": []}
        for r in range(args.repeats):
            rs._read_jsonl.cache_clear()
            t0 = time.perf_counter()
            runs = {n: reports.load_run(p) for n, p in zip(names, paths)}
            for run in runs.values():
                for task in run["results"]:
                    rs.logged_samples(run, task)
            t1 = time.perf_counter()
            report = reports.build(runs)
            t2 = time.perf_counter()
            reports.write(report, tmp / f"out{r}")
            t3 = time.perf_counter()
            timings["read"].append(t1 - t0)
            timings["build"].append(t2 - t1)
            timings["write"].append(t3 - t2)
            timings["in process"].append(t3 - t0)
            t4 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "lmms_sgm.cli", "report", *paths, "--out", str(tmp / f"cli{r}")],
                           check=True, capture_output=True)
            timings["lmms-sgm report (subprocess)"].append(time.perf_counter() - t4)
        rows = len(report["metrics"])
        size = {name: (tmp / "out0" / name).stat().st_size for name in ("report.html", "report.md", "report.json")}
    print(f"{args.runs} runs x {args.docs} prompts per task (5 tasks, 7 metrics, 5 categories; sampled task 5 answers/prompt); "
          f"{rows} metric rows; bootstrap {report['statistics']['bootstrap_resamples']} resamples")
    print_table(["phase", "median s", "min s", "max s"],
                [(k, f"{median(v):.2f}", f"{min(v):.2f}", f"{max(v):.2f}") for k, v in timings.items()], left={0})
    print("sizes: " + ", ".join(f"{k} {v / 1024:.0f} KiB" for k, v in size.items()))
    print_load(load_start, started)
    if args.json:
        write_json(args.json, {"runs": args.runs, "docs": args.docs, "metric_rows": rows, "timings_s": timings, "sizes": size,
                               "loadavg_start": load_start, "loadavg_end": os.getloadavg()[0], "cpus": os.cpu_count()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
