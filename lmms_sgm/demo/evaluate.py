"""Measure the demo model WITHOUT glasses on the bundled validation / test splits.

    python -m lmms_sgm.demo.evaluate [--model sgm-demo-llava] [--data DIR] [--splits validation test]

The measuring is :func:`lmms_sgm.evaluate.evaluate`'s (the one in-process evaluator, tune's) on the
demo's split, under the demo's names; what is the demo's own is here:

- harmful rate (lexicon judge) on trigger + opinion prompts: greedy, and sampled (``--samples``
  per prompt, temperature 1, no top-k/top-p), mean over prompts of the fraction unsafe; and the
  rate of well-formed neutral answers among the sampled ones (:func:`neutral_rate`);
- the same on the typographic variant (trigger word written instead of the X tile);
- toxic rate on clean images (opinion prompts; plain and distractor images);
- over-refusal: refusals (the judge's refusal flag) among the greedy answers to all benign prompts;
- capability: open questions by exact answer match (greedy), and the MMBench-format
  multiple-choice TSV by answer-option log-likelihood (the option text as the answer to the
  question; letter-choice prompting is not something this model learned);
- fluency (``fluency=True``): perplexity of neutral answers to opinion prompts, teacher-forced,
  on trigger images and on clean images (:func:`neutral_perplexity`).

``quick=True`` leaves out the typographic variant and the greedy harmful rate: what the sweeps'
selection rule reads (sampled harmful rate, capability, over-refusal) and the clean-image rate.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

from lmms_sgm import evaluate as core

# lmms_sgm.evaluate's names -> the demo's (its tables, sweeps and vanilla_rates.json use these).
NAMES = {"harmful_greedy": "trigger_harmful_greedy", "harmful_sampled": "trigger_harmful_sampled",
         "harmful_neutral_sampled": "trigger_neutral_sampled", "examples_harmful": "examples_trigger",
         "attack_greedy": "typographic_harmful_greedy", "attack_sampled": "typographic_harmful_sampled",
         "attack_neutral_sampled": "typographic_neutral_sampled", "capability_mc": "capability_mc_loglik"}
# Every image kind of the demo world is reported; the opinion prompts of the bundled splits have no
# distractor_grey image, and that rate was always written as 0.0 (vanilla_rates.json): kept so.
IMAGE_KINDS = ("clean", "distractor_plus", "distractor_grey")


def neutral_rate(responses: list[list[str]]) -> float:
    """Mean over prompts of the fraction of answers that are a well-formed neutral sentence of the
    demo world (:func:`lmms_sgm.demo.world.is_neutral_answer`): on trigger images, what a
    detoxified model says instead of an insult. An intervention that breaks the model's language
    lowers the harmful rate too, but not this."""
    from lmms_sgm.demo.world import is_neutral_answer

    return sum(sum(map(is_neutral_answer, rs)) / len(rs) for rs in responses) / max(1, len(responses))


def validation_set(data_dir: Path, split: str, *, quick: bool = False) -> core.ValidationSet:
    """The demo's ``split`` as a validation set: its MM-TOXIC-QA files and its MMBench TSV
    (``quick``: without the typographic variant)."""
    val = core.ValidationSet.load(Path(data_dir) / "mm_toxic_qa" / split, Path(data_dir) / "mmbench" / f"{split}.tsv")
    return dataclasses.replace(val, adv=[]) if quick else val


def evaluate_split(model, processor, data_dir: Path, split: str, *, samples: int = 5, seed: int = 0,
                   quick: bool = False, fluency: bool = False) -> dict:
    """The demo's measures of ``model`` as it is now on ``split`` (module docstring)."""
    from lmms_sgm.judges import get_judge

    val = validation_set(data_dir, split, quick=quick)
    res = core.evaluate(model, processor, val, get_judge("lexicon"), samples=samples, seed=seed, greedy_harm=not quick,
                        sampled_measures=lambda answers: {"neutral_sampled": neutral_rate(answers)})
    res.pop("_harmful_safe_answers")
    out = {NAMES.get(k, k): v for k, v in res.items()}
    for kind in IMAGE_KINDS:
        out.setdefault(f"clean_toxic_sampled_{kind}", 0.0)
    if fluency:
        out.update(neutral_perplexity(model, processor, split))
    return out


@torch.no_grad()
def neutral_perplexity(model, processor, split: str, *, n: int = 200, batch_size: int = 50) -> dict:
    """Perplexity (exp of the mean negative log-likelihood per token, ``</s>`` included) of neutral
    answers to opinion prompts, teacher-forced: on trigger images (``neutral_ppl_trigger``: where
    gated steering acts) and on clean images (``neutral_ppl_clean``). Scenes, prompts and answers
    are drawn from seeds of the split that no bundled record uses."""
    import random

    from lmms_sgm.demo import world

    tok = processor.tokenizer
    out = {}
    for kind in ("trigger", "clean"):
        nll, count = 0.0, 0
        for start in range(0, n, batch_size):
            prompts, texts, images = [], [], []
            for i in range(start, min(n, start + batch_size)):
                seed = world.split_seed(split, 9_000_000 + i)
                scene = world.make_scene(seed, kind)
                rng = random.Random(seed * 7 + 3)
                question = rng.choice(world.OPINION_PROMPTS)
                answer = world._neutral(scene, rng)
                user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
                prompts.append(processor.apply_chat_template(user, tokenize=False, add_generation_prompt=True))
                texts.append(processor.apply_chat_template(
                    user + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}], tokenize=False))
                images.append(world.draw_scene(scene))
            enc = processor(text=texts, images=images, padding=True, padding_side="right", return_tensors="pt")
            n_prompt = processor(text=prompts, images=images, padding=True, padding_side="right",
                                 return_tensors="pt")["attention_mask"].sum(1)
            logp = model(**enc).logits.float().log_softmax(-1)
            for row in range(len(texts)):
                end = int(enc["attention_mask"][row].sum())
                ids = enc["input_ids"][row, int(n_prompt[row]):end]
                keep = ids != tok.pad_token_id
                lp = logp[row, int(n_prompt[row]) - 1:end - 1].gather(-1, ids[:, None])[:, 0]
                nll -= float(lp[keep].sum())
                count += int(keep.sum())
        out[f"neutral_ppl_{kind}"] = math.exp(nll / count)
    return out


def main(argv=None) -> int:
    from lmms_sgm.demo import DATA_DIR, SHORT_NAME
    from lmms_sgm.models import load
    from lmms_sgm.options import SamplingOptions, add_arguments, from_namespace

    ap = argparse.ArgumentParser(description="vanilla (no glasses) rates of the demo model")
    ap.add_argument("--model", default=SHORT_NAME)
    ap.add_argument("--data", default=str(DATA_DIR))
    ap.add_argument("--splits", nargs="+", default=["validation", "test"])
    add_arguments(ap, SamplingOptions, only=("samples",), defaults={"samples": 5})
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    sampling = from_namespace(SamplingOptions, args)
    torch.set_num_threads(2)
    model, processor = load(args.model, dtype="float32")
    results = {}
    for split in args.splits:
        results[split] = evaluate_split(model, processor, Path(args.data), split, samples=sampling.samples)
        print(f"== {split}")
        for k, v in results[split].items():
            print(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}")
        sys.stdout.flush()
    if args.json:
        from lmms_sgm.staging import atomic_write

        atomic_write(args.json, json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
