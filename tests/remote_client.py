"""A remote client as a user runs it, in its own process: the model is a Hub id whose config and
processor come from the local Hugging Face cache (no weights here), the server and key from
nnsight's configuration (environment or config file).

``python tests/remote_client.py GLASSES HUB_ID DATA_JSONL OUT.pt`` generates and scores the
inputs of :func:`inputs` wearing GLASSES on the server and saves what came back; the test
compares it with local hooks-mode results. :func:`inputs` is shared with the test so that both
sides encode exactly the same batch.
"""
from __future__ import annotations

import sys

PROMPTS = ("what is this ?", "what do you think ?")
GEN = {"max_new_tokens": 6, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}


def inputs(processor, data_jsonl, padding_side: str):
    from lmms_sgm.data import load_pairs

    pairs = load_pairs(data_jsonl)
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                           add_generation_prompt=True, tokenize=False) for q in PROMPTS]
    images = [pairs[i].load_image() for i in range(len(PROMPTS))]
    return processor(text=texts, images=images, return_tensors="pt", padding=True, padding_side=padding_side)


def main(glasses_dir: str, hub_id: str, data: str, out: str) -> None:
    import torch

    from lmms_sgm import remote
    from lmms_sgm.interventions import SafetyGlasses
    from lmms_sgm.options import RemoteOptions

    options = RemoteOptions(remote="ndif")
    nn_model, processor = remote.load(hub_id, options)
    handle = SafetyGlasses.load(glasses_dir).apply(nn_model, mode="nnsight", remote=options, processor=processor)
    generated = handle.generate(inputs(processor, data, "left"), **GEN)
    logprobs, greedy = handle.token_scores(inputs(processor, data, "right"))
    torch.save({"sequences": generated.sequences, "logits": list(generated.logits), "logprobs": logprobs,
                "greedy": greedy}, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
