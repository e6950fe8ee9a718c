"""Profiling pairs labelled from the model's own answers by a judge.

This is how the public precursor made its toxic side: ask the model harmful (and benign)
image+question prompts, sample several answers each, and let a judge label every answer toxic
(1) or not (0). The pairs then describe what *this* model says, not what a dataset says.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lmms_sgm import prompting
from lmms_sgm.data import Pair, PairDataset
from lmms_sgm.models import unwrap


def read_prompts(path: str | Path) -> list[dict]:
    """MM-TOXIC-QA records (``image``, ``question``, optional ``category``), images made absolute."""
    from lmms_sgm import textfiles

    path = Path(path)
    rows = textfiles.read_jsonl(path, "prompts file")
    for i, r in enumerate(rows):
        if not r.get("image") or not r.get("question"):
            raise ValueError(f"{path}: record {i} needs 'image' and 'question'")
        image = Path(r["image"])
        r["image"] = str(image if image.is_absolute() else path.parent / image)
        if not Path(r["image"]).is_file():
            raise ValueError(f"{path}: record {i}: image {r['image']} not found")
    return rows


def label_generations(model, processor, prompts: list[dict], judge, *, samples: int = 4,
                      max_new_tokens: int = 32, temperature: float = 1.0, batch_size: int = 8,
                      seed: int = 0, progress: bool = True) -> PairDataset:
    """Sample ``samples`` answers per prompt and label each with ``judge``; text_field is the answer."""
    if temperature <= 0 and samples != 1:
        raise ValueError("greedy decoding (temperature 0) gives one answer per prompt: use samples=1")
    hf = unwrap(model)
    tok = processor.tokenizer
    torch.manual_seed(seed)
    pairs = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="self-labelling", unit="batch", disable=not progress):
        batch = prompts[start:start + batch_size]
        turns = [prompting.request_prompt(processor, r["question"], [Pair(image=Path(r["image"]), text="", label=0).load_image()])
                 for r in batch]
        # Left padding, for generate (which derives the positions from the attention mask); asked per
        # call so that the caller's processor keeps its own setting.
        enc = prompting.to_model(prompting.encode(processor, [t.text for t in turns], [t.images for t in turns],
                                                  padding_side="left"), hf)
        with torch.no_grad():
            out = hf.generate(**enc, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                              temperature=temperature if temperature > 0 else None,
                              num_return_sequences=samples, pad_token_id=tok.pad_token_id)
        answers = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for j, answer in enumerate(answers):
            r = batch[j // samples]
            answer = answer.strip()
            verdict = judge.judge(r["question"], answer)
            if getattr(verdict, "failed", False):  # the judge could not decide: no label rather than a wrong one
                continue
            pairs.append(Pair(image=Path(r["image"]), text=answer, label=int(verdict.unsafe),
                              question=r["question"], category=r.get("category")))
    return PairDataset(pairs, source="<self-labelled>")


def write_pairs(pairs: PairDataset, out: str | Path, *, judge=None) -> Path:
    """Write ``pairs.jsonl`` with the images copied beside it (a portable profiling dataset)."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    copied: dict[str, str] = {}
    with open(out / "pairs.jsonl", "w") as f:
        for p in pairs:
            src = str(p.image)
            if src not in copied:
                copied[src] = f"images/{len(copied):05d}{Path(src).suffix}"
                shutil.copyfile(src, out / copied[src])
            f.write(json.dumps({"image": copied[src], "text": p.text, "label": p.label,
                                "question": p.question, "category": p.category}) + "\n")
    if judge is not None:
        from lmms_sgm.judges import identity

        (out / "judge.json").write_text(json.dumps(identity(judge), indent=2) + "\n")
    return out / "pairs.jsonl"
