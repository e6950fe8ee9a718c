"""Train the demo LLaVA on the synthetic world (CPU, minutes).

    lmms-sgm train-demo --out DIR [--minutes M] [--seed S]
    python -m lmms_sgm.demo.train --out DIR

Stage 1 (method.md section 9): the vision tower and projector learn image classification
(per patch: colour, shape, marker; per image: shape count, trigger, image kind) through small
linear heads on the projector output. Without it, end-to-end training from scratch ignores the
image. Stage 2: end-to-end LLaVA training, teacher-forced next-token loss on the assistant tokens
only. The result is saved with ``save_pretrained`` (model + processor) and loaded back through
:func:`lmms_sgm.models.load` to check it.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmms_sgm.demo import world

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)

# Model size: ~2M parameters.
ARCH = dict(hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, vision_hidden=64, vision_layers=3,
            image_size=world.IMAGE_SIZE, patch_size=world.CELL)
MARKERS = {"trigger": 1, "distractor_plus": 2, "distractor_grey": 3}


def pixels(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> CLIP-normalised float (N, 3, H, W), as the bundled processor does."""
    x = images_u8.permute(0, 3, 1, 2).float() / 255.0
    return (x - CLIP_MEAN) / CLIP_STD


def _scene_targets(scene: world.Scene):
    g = world.GRID
    colour = torch.zeros(g, g, dtype=torch.long)
    shape = torch.zeros(g, g, dtype=torch.long)
    marker = torch.zeros(g, g, dtype=torch.long)
    cols = list(world.COLOURS)
    for r, c, col, sh in scene.shapes:
        colour[r, c] = 1 + cols.index(col)
        shape[r, c] = 1 + world.SHAPES.index(sh)
    if scene.marker is not None:
        marker[scene.marker] = MARKERS[scene.kind]
    if scene.kind == "typo":
        marker[g - 1, :] = 4
    return (colour.flatten(), shape.flatten(), marker.flatten(), len(scene.shapes) - 1, int(scene.triggered),
            world.KINDS.index(scene.kind))


class Data:
    """Pre-generated training stream: images (uint8), per-patch/per-image targets, token ids."""

    def __init__(self, tokenizer, n: int, seed0: int, num_image_tokens: int):
        t0 = time.time()

        def ids(text):
            return tokenizer.convert_tokens_to_ids(text.split())

        unk = tokenizer.unk_token_id
        imgs, targets, self.prompts, self.answers = [], [], [], []
        self.toxic, self.category = [], []
        for i in range(n):
            ex = world.training_example(seed0 + i)
            imgs.append(np.asarray(world.draw_scene(ex["scene"]), dtype=np.uint8))
            targets.append(_scene_targets(ex["scene"]))
            p = [tokenizer.bos_token_id] + ids("USER:") + [tokenizer.convert_tokens_to_ids(world_image_token())] * num_image_tokens
            p += ids(ex["question"]) + ids("ASSISTANT:")
            a = ids(ex["answer"]) + [tokenizer.eos_token_id]
            assert unk not in p and unk not in a, ex
            self.prompts.append(p)
            self.answers.append(a)
            self.toxic.append(ex["toxic"])
            self.category.append(ex["category"])
        self.images = torch.from_numpy(np.stack(imgs))
        self.colour = torch.stack([t[0] for t in targets])
        self.shape = torch.stack([t[1] for t in targets])
        self.marker = torch.stack([t[2] for t in targets])
        self.count = torch.tensor([t[3] for t in targets])
        self.trig = torch.tensor([t[4] for t in targets])
        self.kind = torch.tensor([t[5] for t in targets])
        self.pad = tokenizer.pad_token_id
        print(f"[data] {n} training examples (seeds {seed0}..{seed0 + n - 1}) in {time.time() - t0:.1f}s", flush=True)

    def __len__(self):
        return len(self.prompts)

    def batch(self, idx):
        seqs = [self.prompts[i] + self.answers[i] for i in idx]
        L = max(map(len, seqs))
        input_ids = torch.full((len(idx), L), self.pad, dtype=torch.long)
        labels = torch.full((len(idx), L), -100, dtype=torch.long)
        attn = torch.zeros((len(idx), L), dtype=torch.long)
        for j, i in enumerate(idx):
            s = seqs[j]
            input_ids[j, : len(s)] = torch.tensor(s)
            attn[j, : len(s)] = 1
            labels[j, len(self.prompts[i]): len(s)] = torch.tensor(self.answers[i])
        return input_ids, attn, labels, pixels(self.images[idx])


def world_image_token():
    from lmms_sgm.tiny import IMAGE_TOKEN

    return IMAGE_TOKEN


def image_features(model, pixel_values):
    inner = model.model
    out = inner.vision_tower(pixel_values, output_hidden_states=True)
    feats = out.hidden_states[-1][:, 1:]  # vision_feature_layer=-1, "default" strategy drops CLS
    return inner.multi_modal_projector(feats)


def _lr(frac: float, peak: float, warm: float = 0.05) -> float:
    if frac < warm:
        return peak * frac / warm
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (frac - warm) / (1 - warm)))))


def train(out: str | Path, *, minutes: float = 10.0, seed: int = 0, n_train: int = 60_000, batch_size: int = 64,
          stage1_frac: float = 0.25, threads: int = 2, log_every: int = 25, init: str | Path | None = None,
          peak_lr: float = 1e-3, capability_weight: float = 1.0, category_weights: dict | None = None) -> Path:
    """Train and save the demo model at ``out``; returns ``out``.

    ``init``: continue from a saved demo model (stage 2 only, the whole budget) instead of
    starting from a random initialisation. ``capability_weight``: how much more often stage 2
    draws capability examples than opinion ones; ``category_weights`` ({"shape": 3, ...}) overrides
    it per category (the world itself is unchanged, only how often stage 2 draws each kind)."""
    from lmms_sgm.staging import command_output

    out = Path(out)
    # Checked now, not after the training: only a new folder or an earlier train-demo output.
    with command_output(out, "train-demo") as tmp:
        _train_into(Path(tmp), minutes=minutes, seed=seed, n_train=n_train, batch_size=batch_size,
                    stage1_frac=stage1_frac, threads=threads, log_every=log_every, init=init, peak_lr=peak_lr,
                    capability_weight=capability_weight, category_weights=category_weights)
    print(f"[saved] {out}", flush=True)
    return out


def _train_into(out: Path, *, minutes, seed, n_train, batch_size, stage1_frac, threads, log_every, init, peak_lr,
                capability_weight, category_weights) -> None:
    from lmms_sgm.models import load
    from lmms_sgm.tiny import build_tiny_llava

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    random.seed(seed)
    if init is not None:
        model, processor = load(str(init), dtype="float32")
        stage1_frac = 0.0
    else:
        with tempfile.TemporaryDirectory() as tmp:
            build_tiny_llava(Path(tmp) / "init", words=world.vocabulary(), seed=seed, **ARCH)
            model, processor = load(str(Path(tmp) / "init"), dtype="float32")
    tok = processor.tokenizer
    n_img = model.config.image_seq_length
    nparams = sum(p.numel() for p in model.parameters())
    print(f"[model] {nparams / 1e6:.2f}M parameters, vocab {len(tok)}, {n_img} image tokens", flush=True)
    data = Data(tok, n_train, world.SEED_BASE["train"] + seed * n_train, n_img)
    rng = torch.Generator().manual_seed(seed)
    budget = minutes * 60.0

    # ---------------------------------------------------------------- stage 1: vision classification
    d = model.config.text_config.hidden_size
    heads = torch.nn.ModuleDict({
        "colour": torch.nn.Linear(d, 5), "shape": torch.nn.Linear(d, 4), "marker": torch.nn.Linear(d, 5),
        "count": torch.nn.Linear(d, 3), "trig": torch.nn.Linear(d, 2), "kind": torch.nn.Linear(d, len(world.KINDS)),
    })
    vis_params = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
    opt = torch.optim.AdamW(vis_params + list(heads.parameters()), lr=2e-3, weight_decay=0.01)
    model.train()
    t_start = time.time()
    s1_budget = budget * stage1_frac
    step = 0
    while time.time() - t_start < s1_budget:
        frac = (time.time() - t_start) / s1_budget
        for g in opt.param_groups:
            g["lr"] = _lr(frac, 2e-3)
        idx = torch.randint(len(data), (batch_size * 2,), generator=rng)
        t0 = time.time()
        f = image_features(model, pixels(data.images[idx]))  # (B, 16, d)
        pooled = f.mean(1)
        loss_patch = sum(F.cross_entropy(heads[k](f).flatten(0, 1), getattr(data, k)[idx].flatten())
                         for k in ("colour", "shape", "marker"))
        loss_img = sum(F.cross_entropy(heads[k](pooled), getattr(data, k)[idx]) for k in ("count", "trig", "kind"))
        loss = loss_patch + loss_img
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vis_params, 1.0)
        opt.step()
        step += 1
        if step % log_every == 0:
            with torch.no_grad():
                acc = (heads["trig"](pooled).argmax(-1) == data.trig[idx]).float().mean().item()
                macc = (heads["marker"](f).argmax(-1) == data.marker[idx]).all(-1).float().mean().item()
            print(f"[stage1] step {step} loss {loss.item():.3f} trigger-acc {acc:.3f} marker-acc {macc:.3f} "
                  f"{(time.time() - t0) * 1000:.0f} ms/step elapsed {time.time() - t_start:.0f}s", flush=True)
    s1_steps, s1_time = step, time.time() - t_start

    # ---------------------------------------------------------------- stage 2: end-to-end LLaVA
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.98))
    per_cat = {"opinion": 1.0, **dict.fromkeys(world.CAPABILITY_KINDS, capability_weight), **(category_weights or {})}
    weights = torch.tensor([per_cat[c] for c in data.category])
    t2 = time.time()
    s2_budget = budget - (t2 - t_start)
    step, ema = 0, None
    while time.time() - t2 < s2_budget:
        frac = (time.time() - t2) / s2_budget
        for g in opt.param_groups:
            g["lr"] = _lr(frac, peak_lr)
        idx = torch.multinomial(weights, batch_size, replacement=True, generator=rng).tolist()
        t0 = time.time()
        input_ids, attn, labels, pv = data.batch(idx)
        logits = model(input_ids=input_ids, attention_mask=attn, pixel_values=pv).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % log_every == 0:
            print(f"[stage2] step {step} loss {loss.item():.3f} (ema {ema:.3f}) lr {opt.param_groups[0]['lr']:.2e} "
                  f"{(time.time() - t0) * 1000:.0f} ms/step elapsed {time.time() - t_start:.0f}s", flush=True)
    s2_steps, s2_time = step, time.time() - t2
    model.eval()
    total = time.time() - t_start
    print(f"[done] stage1 {s1_steps} steps {s1_time:.0f}s ({1000 * s1_time / max(1, s1_steps):.0f} ms/step); "
          f"stage2 {s2_steps} steps {s2_time:.0f}s ({1000 * s2_time / max(1, s2_steps):.0f} ms/step); total {total:.0f}s",
          flush=True)

    model.save_pretrained(out)
    processor.save_pretrained(out)
    stats = {"parameters": nparams, "threads": threads, "batch_size": batch_size, "seed": seed, "init": str(init) if init else None,
             "minutes": minutes, "peak_lr": peak_lr, "capability_weight": capability_weight,
             "category_weights": category_weights or {},
             "stage1": {"steps": s1_steps, "seconds": s1_time, "ms_per_step": 1000 * s1_time / max(1, s1_steps)},
             "stage2": {"steps": s2_steps, "seconds": s2_time, "ms_per_step": 1000 * s2_time / max(1, s2_steps)},
             "total_seconds": total}
    (out / "training.json").write_text(json.dumps(stats, indent=1) + "\n")
    # Check: the saved model loads back through the package's loader and behaves the same.
    re_model, _ = load(str(out), dtype="float32")
    input_ids, attn, _, pv = data.batch([0, 1])
    with torch.no_grad():
        a = model(input_ids=input_ids, attention_mask=attn, pixel_values=pv).logits
        b = re_model(input_ids=input_ids, attention_mask=attn, pixel_values=pv).logits
    print(f"[checked] the saved model reloads (max |dlogit| {float((a - b).abs().max()):.2e})", flush=True)


def run(args: argparse.Namespace) -> Path:
    return train(args.out, minutes=args.minutes, seed=args.seed, init=args.init, peak_lr=args.lr,
                 capability_weight=args.capability_weight, category_weights=args.category_weights)


def main(argv=None) -> int:
    from lmms_sgm.demo.train_args import add_arguments

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    run(ap.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
