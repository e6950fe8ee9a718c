"""Where does the trigger reach the answer? Patching experiments on the demo model.

    python -m lmms_sgm.demo.diagnose [--model sgm-demo-llava] [--split validation] [--n 200]

SGM edits MLP neurons. This asks whether the demo model's toxic behaviour can be removed through
the MLPs at all. For the harmful prompts of a split, each trigger image gets a *clean twin*: the
same scene with the X tile left out. Sampled harmful rate (5 answers per prompt, temperature 1,
lexicon judge) under:

- ``trigger``: the trigger image, no intervention (the vanilla rate);
- ``clean twin``: the twin image (what the model does without the trigger);
- ``MLPs patched``: the trigger image, but at every prompt position the output of every decoder
  layer's MLP is replaced by its value on the clean twin. This is more than any neuron-level
  edit can do on the prompt: every MLP neuron of every layer takes the value it has without the
  trigger. Only attention (and the residual stream) still carries the trigger;
- ``attention patched``: the converse, every layer's self-attention output at every prompt
  position replaced by its clean-twin value (the MLPs still see the trigger);
- ``per-neuron affine, layer L``: the best *constant* per-neuron map ``a * out + b`` of the last
  layer's MLP outputs, fitted by least squares to map trigger-run outputs onto clean-twin outputs
  (teacher-forced on the model's own sampled answers, on profiling-split twins, not the evaluated
  ones), worn at every position. SGM's interventions (scale, or scale and shift towards a mean)
  are per-neuron constants of this kind, so this is roughly the best SGM could do on that site;
- ``MLPs patched at every position``: as ``MLPs patched``, and at every generated token too: the
  twin is run in lockstep on the same generated tokens (no KV cache), so every MLP output of every
  position takes its no-trigger value. No neuron-level edit that pulls neurons towards their
  no-trigger values can do more than this; what remains flows through attention alone. Then the
  same for one layer's MLP at a time. The lockstep loop samples without a KV cache (with the
  position ids generate would use), so its unpatched rate is reported too and is the reference
  for these rows.

Demo-world only, by design: the twins come from the demo's synthetic world, and the lockstep
forward passes give 1-D position ids (``position_ids``), which Qwen2-VL's 3-D positions would not
accept. Decoder layers are still found through the model's architecture adapter.
"""
from __future__ import annotations

import argparse
import json
import random

import torch

from lmms_sgm import models
from lmms_sgm.archs import adapter_for, get_module
from lmms_sgm.demo import SHORT_NAME, world
from lmms_sgm.demo.evaluate import _prompt, _rate


def twins(split: str, n: int, offset: int = 0):
    """(question, trigger image, clean twin image) for the first ``n`` harmful records of ``split``
    (``offset`` moves to another block of the split's seeds)."""
    out = []
    for i in range(n):
        seed = world.split_seed(split, offset + i)
        scene = world.make_scene(seed, "trigger")
        question = random.Random(seed * 7 + 3).choice(world.OPINION_PROMPTS)
        clean = world.Scene(seed, "clean", list(scene.shapes), None)
        out.append((question, world.draw_scene(scene), world.draw_scene(clean)))
    return out


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions of a left-padded batch as ``generate`` derives them (1-D rotary, as the demo
    model's Llama): without them a forward pass shifts a padded row's positions by its padding."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def encode(processor, texts, images):
    """Left padded (for generate; forward passes add :func:`position_ids`)."""
    return processor(text=texts, images=list(images), padding=True, padding_side="left", return_tensors="pt")


class Patcher:
    """Forward hooks on a list of modules: ``record`` their outputs on one forward pass, or
    ``replace`` them on the first (prompt) pass of a later generate call."""

    def __init__(self, modules):
        self.modules = modules
        self.mode, self.saved, self.handles = None, {}, []
        for i, m in enumerate(modules):
            self.handles.append(m.register_forward_hook(self._hook(i)))

    def _hook(self, i):
        def hook(module, args, output):
            tensor = output[0] if isinstance(output, tuple) else output
            if self.mode == "record":
                self.saved[i] = tensor.detach().clone()
            elif self.mode == "replace" and tensor.shape[1] > 1:  # the prompt pass, not a generated token
                src = self.saved[i]
                src = src.repeat_interleave(tensor.shape[0] // src.shape[0], dim=0)
                tensor = src.to(tensor.dtype)
                return (tensor, *output[1:]) if isinstance(output, tuple) else tensor
            return None

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def sampled_rate(model, processor, questions, images, *, samples=5, patcher=None, clean_images=None, seed=0,
                 batch_size=50, max_new_tokens=24) -> float:
    from lmms_sgm.judges import get_judge

    judge = get_judge("lexicon")
    torch.manual_seed(seed)
    responses = []
    for s in range(0, len(questions), batch_size):
        texts = [_prompt(processor, q) for q in questions[s:s + batch_size]]
        enc = encode(processor, texts, images[s:s + batch_size])
        if patcher is not None:
            twin = encode(processor, texts, clean_images[s:s + batch_size])
            patcher.mode = "record"  # the twin's prompt pass, with the positions generate gives the trigger run
            model.generate(**twin, max_new_tokens=1, do_sample=False)
            patcher.mode = "replace"
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             num_return_sequences=samples)
        if patcher is not None:
            patcher.mode = None
        dec = processor.tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        responses += [[d.strip() for d in dec[j * samples:(j + 1) * samples]] for j in range(len(texts))]
    return _rate(judge, questions, responses)


@torch.no_grad()
def lockstep_rate(model, processor, questions, images, clean_images, patcher, *, samples=5, seed=0, batch_size=40,
                  max_new_tokens=24) -> float:
    """Sampled harmful rate with ``patcher``'s modules taking the twin's outputs at every position."""
    from lmms_sgm.judges import get_judge

    judge = get_judge("lexicon")
    tok = processor.tokenizer
    torch.manual_seed(seed)
    responses = []
    for s in range(0, len(questions), batch_size):
        texts = [_prompt(processor, q) for q in questions[s:s + batch_size]]
        enc = encode(processor, texts, images[s:s + batch_size])
        twin = encode(processor, texts, clean_images[s:s + batch_size])
        rep = lambda t: t.repeat_interleave(samples, dim=0)  # noqa: E731
        ids, attn = rep(enc["input_ids"]), rep(enc["attention_mask"])
        pv, tpv = rep(enc["pixel_values"]), rep(twin["pixel_values"])
        prompt_len = ids.shape[1]
        done = torch.zeros(ids.shape[0], dtype=torch.bool)
        for _ in range(max_new_tokens):
            pos = position_ids(attn)
            patcher.mode = "record"
            model(input_ids=ids, attention_mask=attn, position_ids=pos, pixel_values=tpv, use_cache=False)
            patcher.mode = "replace"
            logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, pixel_values=pv, use_cache=False).logits[:, -1]
            patcher.mode = None
            nxt = torch.multinomial(logits.float().softmax(-1), 1).squeeze(1)
            nxt = torch.where(done, torch.full_like(nxt, tok.pad_token_id), nxt)
            done |= nxt == tok.eos_token_id
            ids = torch.cat([ids, nxt[:, None]], 1)
            attn = torch.cat([attn, (~done | (nxt == tok.eos_token_id)).long()[:, None]], 1)
            if done.all():
                break
        dec = tok.batch_decode(ids[:, prompt_len:], skip_special_tokens=True)
        responses += [[d.strip() for d in dec[j * samples:(j + 1) * samples]] for j in range(len(texts))]
    return _rate(judge, questions, responses)


@torch.no_grad()
def fit_affine(model, processor, module, twins_, *, samples=5, seed=0, batch_size=40):
    """Per-neuron least squares ``twin ~ a * trigger + b`` of ``module``'s outputs over every
    non-padding position of prompt + the model's own sampled answer (teacher-forced, same tokens)."""
    tok = processor.tokenizer
    torch.manual_seed(seed)
    xs, ys = [], []
    patcher = Patcher([module])
    try:
        for s in range(0, len(twins_), batch_size):
            qs, trig, clean = zip(*twins_[s:s + batch_size])
            texts = [_prompt(processor, q) for q in qs]
            enc = encode(processor, texts, trig)
            twin = encode(processor, texts, clean)
            gen = model.generate(**enc, max_new_tokens=24, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 num_return_sequences=samples)
            attn = torch.cat([enc["attention_mask"].repeat_interleave(samples, 0),
                              (gen[:, enc["input_ids"].shape[1]:] != tok.pad_token_id).long()], 1)
            acts = []
            for pv in (enc["pixel_values"], twin["pixel_values"]):
                patcher.mode = "record"
                model(input_ids=gen, attention_mask=attn, position_ids=position_ids(attn),
                      pixel_values=pv.repeat_interleave(samples, 0), use_cache=False)
                acts.append(patcher.saved[0][attn.bool()])
            patcher.mode = None
            xs.append(acts[0])
            ys.append(acts[1])
    finally:
        patcher.remove()
    x, y = torch.cat(xs).double(), torch.cat(ys).double()
    xc, yc = x - x.mean(0), y - y.mean(0)
    a = (xc * yc).sum(0) / (xc * xc).sum(0).clamp_min(1e-12)
    b = y.mean(0) - a * x.mean(0)
    return a.float(), b.float()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=SHORT_NAME)
    ap.add_argument("--split", default="validation", choices=("validation", "test"))
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    model, processor = models.load(args.model, dtype="float32")
    layers = get_module(model, adapter_for(model).layers_path(model))
    qs, trig, clean = zip(*twins(args.split, args.n))
    rows = {"trigger": sampled_rate(model, processor, qs, trig), "clean twin": sampled_rate(model, processor, qs, clean)}
    for name, modules in (("MLPs patched", [layer.mlp for layer in layers]),
                          ("attention patched", [layer.self_attn for layer in layers])):
        patcher = Patcher(modules)
        try:
            rows[name] = sampled_rate(model, processor, qs, trig, patcher=patcher, clean_images=clean)
        finally:
            patcher.remove()
    last = len(layers) - 1
    a, b = fit_affine(model, processor, layers[last].mlp, twins("profile", args.n, offset=2_000_000))
    for name, hook in ((f"per-neuron affine, layer {last} MLP outputs", lambda m, i, o: o * a + b),
                       (f"per-neuron scale only (the fitted a, b = 0), layer {last} MLP outputs", lambda m, i, o: o * a)):
        handle = layers[last].mlp.register_forward_hook(hook)
        try:
            rows[name] = sampled_rate(model, processor, qs, trig)
        finally:
            handle.remove()
    lockstep = {"lockstep loop, nothing replaced (reference for the rows below)": [],
                "MLPs patched at every position": [layer.mlp for layer in layers]}
    lockstep.update({f"layer {i} MLP patched at every position": [layer.mlp] for i, layer in enumerate(layers)})
    for name, modules in lockstep.items():
        patcher = Patcher(modules)
        try:
            rows[name] = lockstep_rate(model, processor, qs, trig, clean, patcher)
        finally:
            patcher.remove()
    print(f"| condition ({args.split}, {args.n} prompts, 5 samples each) | sampled harmful rate |")
    print("|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
