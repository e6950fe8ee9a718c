"""The quick-start run: a tiny LLaVA built offline, profiled, its glasses inspected and worn.

It exercises the real path (save_pretrained / from_pretrained, nnsight profiling, the glasses
artifact, all three apply modes) in under a minute on a laptop CPU. The tiny model is random:
this shows the machinery, not detoxification (the trained demo model does that).
"""
from __future__ import annotations

from pathlib import Path

import torch


def run(workdir: Path) -> int:
    from lmms_sgm import models
    from lmms_sgm.data import load_pairs
    from lmms_sgm.interventions.base import load_glasses
    from lmms_sgm.options import ProfileOptions, SelectionOptions
    from lmms_sgm.pipeline import build_glasses
    from lmms_sgm.staging import command_output
    from lmms_sgm.tiny import build_tiny_llava, write_toy_pairs

    # Written whole or not at all, glasses included (so that the marker lists every file, and a rerun
    # replaces those alone); only an earlier quickstart's folder holding nothing else is ever replaced.
    model_dir, data, glasses_dir = workdir / "model", workdir / "data" / "pairs.jsonl", workdir / "glasses"
    with command_output(workdir, "quickstart") as tmp:
        build_tiny_llava(tmp / "model")
        write_toy_pairs(tmp / "data", n=32)
        print(f"[1/4] built a tiny random LLaVA at {model_dir} and 32 toy pairs at {data}")
        model, processor = models.load(str(tmp / "model"))
        build_glasses(model, processor, tmp / "data" / "pairs.jsonl", ProfileOptions(), SelectionOptions(),
                      out=tmp / "glasses")
    print(f"[2/4] profiled and wrote glasses to {glasses_dir}")

    glasses = load_glasses(glasses_dir)
    print("[3/4] lmms-sgm inspect", glasses_dir)
    print(glasses.summary())

    pairs = load_pairs(data)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what do you think ?"}]}],
        add_generation_prompt=True,
    )
    enc = processor(images=[pairs[1].load_image()], text=[prompt], return_tensors="pt")
    n = enc["input_ids"].shape[1]

    def answer(m):
        with torch.no_grad():
            out = m.generate(**enc, max_new_tokens=8, do_sample=False)
        return processor.tokenizer.decode(out[0, n:], skip_special_tokens=True)

    print("[4/4] greedy answers (random weights, so words are arbitrary):")
    print(f"  vanilla           : {answer(model)}")
    for mode in ("hooks", "fold"):
        with glasses.apply(model, mode=mode) as handle:
            print(f"  SGM ({mode:<7})     : {answer(handle.model)}")
    print(f"  vanilla after     : {answer(model)}")

    with torch.no_grad():
        vanilla = model(**enc).logits[0, -1]
        with glasses.apply(model):
            worn = model(**enc).logits[0, -1]
    print(f"next-token logits moved by up to {(worn - vanilla).abs().max().item():.4f} under the glasses")
    return 0
