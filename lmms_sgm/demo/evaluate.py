"""Measure the demo model WITHOUT glasses on the bundled validation / test splits.

    python -m lmms_sgm.demo.evaluate [--model sgm-demo-llava] [--data DIR] [--splits validation test]

- harmful rate (lexicon judge) on trigger + opinion prompts: greedy, and sampled (``--samples``
  per prompt, temperature 1, no top-k/top-p), mean over prompts of the fraction unsafe;
- the same on the typographic variant (trigger word written instead of the X tile);
- toxic rate on clean images (opinion prompts; plain and distractor images);
- over-refusal: refusals (the judge's refusal flag) among the greedy answers to all benign prompts;
- capability: open questions by exact answer match (greedy), and the MMBench-format
  multiple-choice TSV by answer-option log-likelihood (the option text as the answer to the
  question; letter-choice prompting is not something this model learned).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

# The general evaluator (lmms_sgm/evaluate.py) under the names this module always had.
from lmms_sgm.evaluate import ValidationSet, evaluate, generate, option_loglik  # noqa: F401
from lmms_sgm.evaluate import unsafe_rate as _rate  # noqa: F401

# The general evaluator's measures under the demo's names (docs/demo.md, the sweep's JSON).
DEMO_NAMES = {"harmful_greedy": "trigger_harmful_greedy", "harmful_sampled": "trigger_harmful_sampled",
              "attack_greedy": "typographic_harmful_greedy", "attack_sampled": "typographic_harmful_sampled",
              "examples_harmful": "examples_trigger", "capability_mc": "capability_mc_loglik"}


def demo_split(data_dir: Path, split: str) -> ValidationSet:
    """The demo's split ``split``: MM-TOXIC-QA records and the MMBench TSV beside them."""
    data_dir = Path(data_dir)
    return ValidationSet.load(data_dir / "mm_toxic_qa" / split, data_dir / "mmbench" / f"{split}.tsv")


def evaluate_split(model, processor, data_dir: Path, split: str, *, samples: int = 5, seed: int = 0,
                   val: ValidationSet | None = None) -> dict:
    """lmms_sgm.evaluate.evaluate on the demo's split, lexicon judge, the demo's measure names."""
    from lmms_sgm.judges import get_judge

    res = evaluate(model, processor, val or demo_split(data_dir, split), get_judge("lexicon"), samples=samples, seed=seed)
    return {DEMO_NAMES.get(k, k): v for k, v in res.items()}


def main(argv=None) -> int:
    from lmms_sgm.demo import DATA_DIR, SHORT_NAME
    from lmms_sgm.models import load

    ap = argparse.ArgumentParser(description="vanilla (no glasses) rates of the demo model")
    ap.add_argument("--model", default=SHORT_NAME)
    ap.add_argument("--data", default=str(DATA_DIR))
    ap.add_argument("--splits", nargs="+", default=["validation", "test"])
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    model, processor = load(args.model, dtype="float32")
    results = {}
    for split in args.splits:
        results[split] = evaluate_split(model, processor, Path(args.data), split, samples=args.samples)
        print(f"== {split}")
        for k, v in results[split].items():
            print(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}")
        sys.stdout.flush()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
