"""Compare SGM options on the bundled demo model, in process (the option table of docs/demo.md).

    python -m lmms_sgm.demo.sweep [--split validation] [--only SUBSTRING ...] [--json out.json]

``lmms_sgm.tune`` on the demo: the configurations of ``tune_grid.json`` on three profiling sets,
worn with hooks, measured by lmms_sgm.evaluate (lexicon judge; sampled = 5 answers per prompt at
temperature 1), the best chosen by tune's rule. The same as

    lmms-sgm tune --model sgm-demo-llava --data responses=lmms_sgm/demo/data/profile.jsonl \\
        --data inputs=lmms_sgm/demo/data/profile_inputs.jsonl \\
        --self-label lmms_sgm/demo/data/profile_inputs.jsonl --self-label-batch-size 64 \\
        --val lmms_sgm/demo/data/mm_toxic_qa/validation --val-mc lmms_sgm/demo/data/mmbench/validation.tsv \\
        --grid lmms_sgm/demo/tune_grid.json --out runs/tune-demo

Profiling sets:

- ``responses``: ``data/profile.jsonl``, insulting vs neutral answers to opinion prompts about
  trigger images (the paper's / precursor's kind of pairs: the *answer* is toxic or not);
- ``inputs``: ``data/profile_inputs.jsonl``, opinion prompts on trigger images vs on clean images
  (the *input* is the toxic context or not; text_field=question);
- ``self``: the model's own sampled answers to the prompts of ``profile_inputs.jsonl``, labelled
  by the lexicon judge (``lmms-sgm self-label``; written under ``--workdir``).

Options are chosen on the validation split only; the test split is for reporting.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lmms_sgm import models, tune
from lmms_sgm.demo import DATA_DIR, HERE, SHORT_NAME
from lmms_sgm.demo.evaluate import DEMO_NAMES, demo_split

GRID = HERE / "tune_grid.json"
CONFIGS = {c.name: c for c in tune.read_grid(GRID)}  # the first is the paper's default
COLUMNS = ("trigger_harmful_greedy", "trigger_harmful_sampled", "typographic_harmful_sampled",
           "clean_toxic_sampled", "over_refusal", "capability_open", "capability_mc_loglik")
RULE = tune.Rule()  # the demo's rule is tune's default
RETENTION, OVER_REFUSAL_POINTS = RULE.retention, RULE.over_refusal_points


def best(rows: dict) -> str | None:
    """The best configuration in ``rows`` (demo names; holds "vanilla") by tune's rule."""
    back = {v: k for k, v in DEMO_NAMES.items()}
    return RULE.choose({n: {back.get(k, k): v for k, v in r.items()} for n, r in rows.items()})


def profiling_sets(model, processor, workdir: Path) -> dict[str, Path]:
    """The three profiling sets; the self-labelled one is generated once into ``workdir``."""
    from lmms_sgm.judges import get_judge

    self_pairs = tune.self_label_set(model, processor, DATA_DIR / "profile_inputs.jsonl", get_judge("lexicon"),
                                     workdir / "self_labelled", samples=4, batch_size=64, seed=0)
    return {"responses": DATA_DIR / "profile.jsonl", "inputs": DATA_DIR / "profile_inputs.jsonl", "self": self_pairs}


def main(argv=None) -> int:
    from lmms_sgm.judges import get_judge

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="validation", choices=("validation", "test"))
    ap.add_argument("--model", default=SHORT_NAME, help="a demo model directory (default: the bundled one)")
    ap.add_argument("--only", nargs="*", default=None, help="run only configurations whose name contains one of these")
    ap.add_argument("--workdir", default="runs/sweep", help="where the self-labelled pairs are written")
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, processor = models.load(args.model)
    sets = profiling_sets(model, processor, Path(args.workdir))
    configs = [c for n, c in CONFIGS.items() if not args.only or any(s in n for s in args.only)]
    result = tune.tune(model, processor, sets, configs, demo_split(DATA_DIR, args.split), get_judge("lexicon"),
                       rule=RULE, log=lambda s: print(s, flush=True))
    print(result.table())
    print(f"({args.split} split, {result.seconds:.0f} s)\n{result.verdict()}")
    if args.json:
        rows = {n: {DEMO_NAMES.get(k, k): v for k, v in r.items() if not k.startswith("examples")}
                for n, r in result.rows.items()}
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
