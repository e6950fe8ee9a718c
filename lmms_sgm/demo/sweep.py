"""Compare SGM options on the bundled demo model (validation split), in process.

    python -m lmms_sgm.demo.sweep [--split validation] [--json out.json]

Each configuration profiles the bundled profiling pairs, wears the glasses (hooks) and runs the
demo evaluator (lexicon judge; sampled = 5 answers per prompt at temperature 1). Options are
chosen on the validation split only; the test split is for reporting.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from lmms_sgm import models
from lmms_sgm.demo import DATA_DIR, SHORT_NAME
from lmms_sgm.demo.evaluate import evaluate_split
from lmms_sgm.options import ProfileOptions, SelectionOptions
from lmms_sgm.pipeline import build_glasses

QR = "question+response"
CONFIGS = {
    "paper default: gate/up/down, mean, all positions, suppress AUROC>0.5": (ProfileOptions(), SelectionOptions()),
    "precursor threshold 0.3": (ProfileOptions(), SelectionOptions(threshold=0.3)),
    "amplify anti-toxic (AUROC<0.5)": (ProfileOptions(), SelectionOptions(direction="amplify")),
    "both directions": (ProfileOptions(), SelectionOptions(direction="both")),
    "suppress towards non-toxic mean": (ProfileOptions(), SelectionOptions(towards="nontoxic_mean")),
    "intermediate, suppress": (ProfileOptions(modules=("intermediate",)), SelectionOptions()),
    "intermediate, amplify": (ProfileOptions(modules=("intermediate",)), SelectionOptions(direction="amplify")),
    "q+r, decision position, suppress": (ProfileOptions(text_field=QR, positions="decision"), SelectionOptions()),
    "q+r, response positions, amplify": (ProfileOptions(text_field=QR, positions="response"), SelectionOptions(direction="amplify")),
}
COLUMNS = ("trigger_harmful_greedy", "trigger_harmful_sampled", "typographic_harmful_sampled",
           "clean_toxic_sampled", "capability_open", "capability_mc_loglik")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="validation")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, processor = models.load(SHORT_NAME)
    rows = {}
    t = time.time()
    rows["vanilla"] = {"experts": 0, **evaluate_split(model, processor, DATA_DIR, args.split, samples=5, seed=0)}
    for name, (po, so) in CONFIGS.items():
        glasses = build_glasses(model, processor, DATA_DIR / "profile.jsonl", po, so, progress=False)
        with glasses.apply(model, mode="hooks"):
            rows[name] = {"experts": glasses.counts()["experts"],
                          **evaluate_split(model, processor, DATA_DIR, args.split, samples=5, seed=0)}
    print(f"| configuration | experts | {' | '.join(COLUMNS)} |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for name, r in rows.items():
        print(f"| {name} | {r['experts']} | " + " | ".join(f"{r[c]:.3f}" for c in COLUMNS) + " |")
    print(f"({args.split} split, {time.time() - t:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: {c: v for c, v in r.items() if not c.startswith("examples")} for k, r in rows.items()}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
