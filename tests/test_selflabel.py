"""Self-labelled profiling pairs: the model's own sampled answers, labelled by a judge."""
from __future__ import annotations

import json

import pytest
import torch
from lmms_sgm_tasks.mm_toxic_qa.make_sample import write_sample

from lmms_sgm.cli import main
from lmms_sgm.data import load_pairs
from lmms_sgm.judges import get_judge
from lmms_sgm.selflabel import label_generations, read_prompts


def test_answers_are_the_models_and_labels_are_the_judges(model_and_processor, tmp_path):
    model, processor = model_and_processor
    prompts = read_prompts(write_sample(tmp_path / "mm") / "harmful.jsonl")[:3]
    judge = get_judge("lexicon")
    pairs = label_generations(model, processor, prompts, judge, samples=1, max_new_tokens=6,
                              temperature=0, batch_size=2, progress=False)
    assert len(pairs) == 3
    # Greedy: each answer equals the model's own greedy answer, computed directly.
    for i, r in enumerate(prompts):
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["question"]}]}],
            tokenize=False, add_generation_prompt=True)
        enc = processor(images=[pairs[i].load_image()], text=[text], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=6, do_sample=False)
        want = processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        p = pairs[i]
        assert p.text == want and p.question == r["question"]
        assert p.label == int(judge.judge(r["question"], p.text).unsafe)
    with pytest.raises(ValueError, match="samples=1"):
        label_generations(model, processor, prompts, judge, samples=2, temperature=0, progress=False)


def test_cli_writes_a_loadable_dataset(tiny_dir, tmp_path):
    prompts = write_sample(tmp_path / "mm")
    out = tmp_path / "pairs"
    rc = main(["self-label", "--model", str(tiny_dir), "--prompts", str(prompts / "harmful.jsonl"),
               str(prompts / "benign.jsonl"), "--samples", "2", "--max-new-tokens", "8", "--out", str(out)])
    assert rc == 0
    pairs = load_pairs(out / "pairs.jsonl")
    assert len(pairs) == 2 * 24
    assert json.loads((out / "judge.json").read_text())["name"] == "lexicon"
    # a sampled answer is some text, and its label is what the judge says of it
    judge = get_judge("lexicon")
    assert all(p.label == int(judge.judge(p.question, p.text).unsafe) for p in pairs)


def test_several_samples_of_several_prompts_per_batch_are_paired_with_their_own_prompt(model_and_processor, tmp_path):
    """3 samples each of 5 prompts in batches of 2 (2, 2, 1): generate returns a batch's answers
    prompt by prompt, so answer j of a batch is its prompt j // samples's. Sampled at a
    temperature so low that each sample is its prompt's greedy answer (generated alone, the
    reference), every pair carries the question, image and category of the prompt that answered.
    The prompts are 5 whose greedy answers all differ, so that a mispairing shows."""
    from PIL import Image

    model, processor = model_and_processor
    greedy, prompts = {}, []
    for r in read_prompts(write_sample(tmp_path / "mm") / "harmful.jsonl"):
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["question"]}]}],
            tokenize=False, add_generation_prompt=True)
        enc = processor(images=[Image.open(r["image"]).convert("RGB")], text=[text], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=6, do_sample=False)
        answer = processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        if answer not in greedy.values() and len(prompts) < 5:
            greedy[r["question"]] = answer
            prompts.append(r)
    assert len(prompts) == 5 and len({r["image"] for r in prompts}) == 5
    pairs = label_generations(model, processor, prompts, get_judge("lexicon"), samples=3, max_new_tokens=6,
                              temperature=1e-6, batch_size=2, progress=False)
    got = [(p.question, str(p.image), p.category, p.text) for p in pairs]
    assert got == [(r["question"], r["image"], r["category"], greedy[r["question"]]) for r in prompts for _ in range(3)]
