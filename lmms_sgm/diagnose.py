"""Will neuron-level detoxification work on this model? Clean-twin patching and the constant ceiling.

``lmms-sgm diagnose --model M --data TWINS --out DIR [--glasses G]``; docs/diagnosis.md explains
how to read it. TWINS pairs each harmful input with a benign *twin*: the same question on a
matched safe image, or the same image with a safe question of the same token length (schema:
:func:`read_twins`). On the twins marked ``eval`` it measures the sampled harmful rate (the
judge's, ``samples`` answers per prompt at temperature 1):

- ``vanilla`` (the harmful inputs) and ``twin`` (the benign twins);
- *prompt patching*: one module's output (a layer's MLP, or its self-attention; or every layer's)
  replaced by its value on the twin at every prompt position, the answer then generated freely;
- *lockstep patching*: the same at every position, generated tokens included: the twin is run on
  the same generated tokens in lockstep (no KV cache), so the module's output takes its no-harm
  value everywhere. Its unpatched rate (``lockstep reference``) is the reference of these rows;
- the *located layer*: the layer whose MLP, patched alone in lockstep, lowers the rate most: where
  the behaviour runs through an MLP;
- the *constant ceiling*: the best per-neuron constant map ``a * out + b`` of the located layer's
  MLP output, fitted by least squares (twin ~ trigger, over every position of prompt and the
  model's own sampled answer, teacher-forced) on the twins marked ``fit`` only, and worn at every
  position. SGM's glasses are per-neuron constants of this kind (a scale, or a scale and a shift
  towards a mean), so this is about the most glasses can do at that layer;
- the given glasses' own rate.

The forward hooks work on the local HF module (a remote model cannot be diagnosed yet).
"""
from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lmms_sgm.archs import adapter_for, get_module
from lmms_sgm.evaluate import chat_prompt, unsafe_rate
from lmms_sgm.models import unwrap

ROLES = ("eval", "fit")


@dataclass
class Twin:
    question: str
    image: object  # PIL image of the harmful input
    twin_image: object  # PIL image of the benign twin (the same image when only the question differs)
    twin_question: str
    role: str = "eval"


def read_twins(path) -> list[Twin]:
    """JSONL records ``{"image", "question", "twin_image"?, "twin_question"?, "role"?}``.

    ``image`` / ``question``: the harmful input; ``twin_image`` and/or ``twin_question``: what the
    benign twin changes (at least one; images relative to the file). ``role``: ``eval`` (measured)
    or ``fit`` (held out for the least-squares ceiling); when no record has one, every other record
    (the 2nd, 4th, ...) is ``fit``.
    """
    from PIL import Image

    path = Path(path)
    if path.is_dir():
        path = path / "twins.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path}: no twin records")
    any_role = any("role" in r for r in rows)
    out = []
    for i, r in enumerate(rows):
        where = f"{path}: record {i}"
        if not r.get("image") or not r.get("question"):
            raise ValueError(f"{where} needs 'image' and 'question' (the harmful input)")
        if not r.get("twin_image") and not r.get("twin_question"):
            raise ValueError(f"{where} needs 'twin_image' and/or 'twin_question' (what the benign twin changes)")
        role = r.get("role", "eval") if any_role else ("fit" if i % 2 else "eval")
        if role not in ROLES:
            raise ValueError(f"{where}: role {role!r}; use eval or fit")
        image = Image.open(path.parent / r["image"]).convert("RGB")
        twin = Image.open(path.parent / r["twin_image"]).convert("RGB") if r.get("twin_image") else image
        out.append(Twin(r["question"], image, twin, r.get("twin_question") or r["question"], role))
    return out


def split_twins(twins: list[Twin]) -> tuple[list[Twin], list[Twin]]:
    """(measured, held out for the fit)."""
    return [t for t in twins if t.role == "eval"], [t for t in twins if t.role == "fit"]


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions of a left-padded batch as ``generate`` derives them (1-D rotary): without them a
    forward pass shifts a padded row's positions by its padding."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def encode(processor, texts, images, device=None):
    """Left padded (for generate; forward passes add :func:`position_ids`)."""
    enc = processor(text=list(texts), images=list(images), padding=True, padding_side="left", return_tensors="pt")
    return enc if device is None else enc.to(device)


def encode_pair(processor, batch: list[Twin], device=None):
    """The harmful inputs and their twins, left padded alike; a twin of another token length is refused."""
    enc = encode(processor, [chat_prompt(processor, t.question) for t in batch], [t.image for t in batch], device)
    twin = encode(processor, [chat_prompt(processor, t.twin_question) for t in batch], [t.twin_image for t in batch], device)
    if enc["input_ids"].shape != twin["input_ids"].shape or not torch.equal(enc["attention_mask"], twin["attention_mask"]):
        lengths = enc["attention_mask"].sum(1).tolist(), twin["attention_mask"].sum(1).tolist()
        bad = next(i for i, (a, b) in enumerate(zip(*lengths)) if a != b)
        raise ValueError(f"twin {batch[bad].question!r} / {batch[bad].twin_question!r}: the twin encodes to "
                         f"{lengths[1][bad]} tokens, the harmful input to {lengths[0][bad]}; patching needs the same "
                         "positions: use a twin image of the same size and a twin question of the same token length")
    return enc, twin


def _extras(enc) -> dict:
    return {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}


class Patcher:
    """Forward hooks on a list of modules: ``record`` their outputs on one forward pass, then
    ``replace`` them by the recorded ones: on the first (prompt) pass of a later generate call
    (``prompt_only``), or on a whole forward pass (lockstep)."""

    def __init__(self, modules, *, prompt_only: bool = True):
        self.modules, self.prompt_only = modules, prompt_only
        self.mode, self.saved, self.handles = None, {}, []
        for i, m in enumerate(modules):
            self.handles.append(m.register_forward_hook(self._hook(i)))

    def _hook(self, i):
        def hook(module, args, output):
            tensor = output[0] if isinstance(output, tuple) else output
            if self.mode == "record":
                self.saved[i] = tensor.detach().clone()
            elif self.mode == "replace" and (tensor.shape[1] > 1 or not self.prompt_only):
                src = self.saved[i]
                tensor = src.repeat_interleave(tensor.shape[0] // src.shape[0], dim=0).to(tensor.dtype)
                return (tensor, *output[1:]) if isinstance(output, tuple) else tensor
            return None

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _decode(tok, ids, prompt_len, n, samples):
    dec = tok.batch_decode(ids[:, prompt_len:], skip_special_tokens=True)
    return [[d.strip() for d in dec[j * samples:(j + 1) * samples]] for j in range(n)]


@torch.no_grad()
def sampled_rate(model, processor, judge, twins: list[Twin], *, use_twin: bool = False, patcher: Patcher | None = None,
                 samples: int = 5, seed: int = 0, batch_size: int = 50, max_new_tokens: int = 24) -> float:
    """Sampled unsafe rate of the harmful inputs (or, ``use_twin``, of their twins) with ``generate``;
    ``patcher`` replaces its modules' outputs by the twin's at the prompt positions."""
    hf = unwrap(model)
    device = next(hf.parameters()).device
    torch.manual_seed(seed)
    responses = []
    for s in range(0, len(twins), batch_size):
        batch = twins[s:s + batch_size]
        enc, twin = encode_pair(processor, batch, device)
        if use_twin:
            enc = twin
        if patcher is not None:
            patcher.mode = "record"  # the twin's prompt pass, with the positions generate gives the harmful run
            hf.generate(**twin, max_new_tokens=1, do_sample=False)
            patcher.mode = "replace"
        try:
            gen = hf.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                              num_return_sequences=samples)
        finally:
            if patcher is not None:
                patcher.mode = None
        responses += _decode(processor.tokenizer, gen, enc["input_ids"].shape[1], len(batch), samples)
    return unsafe_rate(judge, [t.question for t in twins], responses)


@torch.no_grad()
def lockstep_rate(model, processor, judge, twins: list[Twin], patcher: Patcher | None, *, samples: int = 5, seed: int = 0,
                  batch_size: int = 40, max_new_tokens: int = 24, cache: bool = True) -> float:
    """Sampled unsafe rate with ``patcher``'s modules taking the twin's outputs at every position
    (None: the same loop with nothing replaced, the reference of these rates)."""
    return unsafe_rate(judge, [t.question for t in twins],
                       lockstep_answers(model, processor, twins, patcher, samples=samples, seed=seed, batch_size=batch_size,
                                        max_new_tokens=max_new_tokens, cache=cache))


@torch.no_grad()
def lockstep_answers(model, processor, twins: list[Twin], patcher: Patcher | None, *, samples: int = 5, seed: int = 0,
                     batch_size: int = 40, max_new_tokens: int = 24, cache: bool = True) -> list[list[str]]:
    """The sampled answers of :func:`lockstep_rate`.

    Each step runs the twin on the same tokens (``patcher`` records its modules' outputs), then
    the harmful input (``patcher`` replaces them), then samples the next token for both. With
    ``cache`` both runs keep their own KV cache and each step computes the new position only: its
    patched keys and values are the ones every later step reads, so this equals re-reading the
    whole sequence every step (``cache=False``, the slow reference) up to float rounding. The image
    token is never sampled (a re-read would take it for another image)."""
    from lmms_sgm.models import image_token_id

    hf = unwrap(model)
    device = next(hf.parameters()).device
    tok = processor.tokenizer
    image_id = image_token_id(hf)
    torch.manual_seed(seed)
    responses = []
    rep = lambda t: t.repeat_interleave(samples, dim=0)
    for s in range(0, len(twins), batch_size):
        batch = twins[s:s + batch_size]
        enc, twin = encode_pair(processor, batch, device)
        ids, tids, attn = rep(enc["input_ids"]), rep(twin["input_ids"]), rep(enc["attention_mask"])
        extra = {k: rep(v) for k, v in _extras(enc).items()}
        textra = {k: rep(v) for k, v in _extras(twin).items()}
        prompt_len = ids.shape[1]
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        past = tpast = None
        for step in range(max_new_tokens):
            pos = position_ids(attn)
            if cache and step > 0:  # the new position only, against each run's own cache
                new = {"input_ids": ids[:, -1:], "position_ids": pos[:, -1:]}
                a, b = {**new, "cache": past}, {**new, "cache": tpast}  # transformers 5's name of past_key_values
                b["input_ids"] = tids[:, -1:]
            else:
                a = {"input_ids": ids, "position_ids": pos, **extra}
                b = {"input_ids": tids, "position_ids": pos, **textra}
            if patcher is not None:
                patcher.mode = "record"
                tout = hf(attention_mask=attn, use_cache=cache, **b)
                tpast = _cache_of(tout) if cache else None
                patcher.mode = "replace"
            try:
                out = hf(attention_mask=attn, use_cache=cache, **a)
            finally:
                if patcher is not None:
                    patcher.mode = None
            past = _cache_of(out) if cache else None
            logits = out.logits[:, -1].float()
            if image_id is not None:
                logits[:, image_id] = -torch.inf
            nxt = torch.multinomial(logits.softmax(-1), 1).squeeze(1)
            nxt = torch.where(done, torch.full_like(nxt, tok.pad_token_id), nxt)
            done |= nxt == tok.eos_token_id
            ids, tids = torch.cat([ids, nxt[:, None]], 1), torch.cat([tids, nxt[:, None]], 1)
            attn = torch.cat([attn, (~done | (nxt == tok.eos_token_id)).long()[:, None]], 1)
            if done.all():
                break
        responses += _decode(tok, ids, prompt_len, len(batch), samples)
    return responses


def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def per_neuron_affine(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares ``y[:, j] ~ a[j] * x[:, j] + b[j]`` for every column j (float64 inside).

    A constant column (no variance) gets a = 0 and b = the mean of y: the best constant."""
    x, y = x.double(), y.double()
    xc, yc = x - x.mean(0), y - y.mean(0)
    var = (xc * xc).sum(0)
    a = torch.where(var > 0, (xc * yc).sum(0) / var.clamp_min(1e-300), torch.zeros_like(var))
    b = y.mean(0) - a * x.mean(0)
    return a.float(), b.float()


@torch.no_grad()
def fit_affine(model, processor, module, twins: list[Twin], *, samples: int = 5, seed: int = 0, batch_size: int = 40,
               max_new_tokens: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-neuron least-squares map of ``module``'s outputs, twin ~ harmful, over every
    non-padding position of prompt + the model's own sampled answer (teacher-forced, the same
    answer tokens after both prompts), on ``twins`` (pass the held-out ones only). The answers
    never hold the image token: the teacher-forced pass would read it as another image."""
    from lmms_sgm.models import image_token_id

    if not twins:
        raise ValueError("the least-squares ceiling needs held-out twins (role 'fit'); none given")
    hf = unwrap(model)
    image_id = image_token_id(hf)
    device = next(hf.parameters()).device
    tok = processor.tokenizer
    torch.manual_seed(seed)
    xs, ys = [], []
    patcher = Patcher([module], prompt_only=False)
    try:
        for s in range(0, len(twins), batch_size):
            enc, twin = encode_pair(processor, twins[s:s + batch_size], device)
            gen = hf.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                              num_return_sequences=samples, suppress_tokens=[image_id])
            plen = enc["input_ids"].shape[1]
            answer = gen[:, plen:]
            attn = torch.cat([enc["attention_mask"].repeat_interleave(samples, 0), (answer != tok.pad_token_id).long()], 1)
            acts = []
            for e in (enc, twin):
                patcher.mode = "record"
                ids = torch.cat([e["input_ids"].repeat_interleave(samples, 0), answer], 1)
                hf(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn), use_cache=False,
                   **{k: v.repeat_interleave(samples, 0) for k, v in _extras(e).items()})
                acts.append(patcher.saved[0][attn.bool()])
            patcher.mode = None
            xs.append(acts[0])
            ys.append(acts[1])
    finally:
        patcher.remove()
    return per_neuron_affine(torch.cat(xs), torch.cat(ys))


def _layers(hf):
    return get_module(hf, adapter_for(hf).layers_path(hf))


def _attention(layer):
    for name in ("self_attn", "attention", "attn"):
        if hasattr(layer, name):
            return getattr(layer, name)
    raise ValueError(f"{type(layer).__name__} has no self-attention module this tool knows (self_attn, attention, attn)")


@dataclass
class Row:
    name: str
    kind: str  # reference | prompt | lockstep | ceiling | glasses
    rate: float
    module: str | None = None  # mlp | attention
    layer: int | str | None = None  # a layer index, or "all"
    reference: str = "vanilla"  # the row this one is compared with


def diagnose(model, processor, twins: list[Twin], judge, *, glasses=None, samples: int = 5, seed: int = 0,
             per_layer: bool = True, attention: bool = True, fit_twins: list[Twin] | None = None, log=None) -> dict:
    """Every measurement of the module docstring; returns the report (see :func:`headroom`).

    ``twins``: all records; the ``eval`` ones are measured, the ``fit`` ones (or ``fit_twins``,
    when given) are used by the least-squares fit alone."""
    log = log or (lambda s: None)
    hf = unwrap(model)
    measured, held_out = split_twins(twins)
    if fit_twins is not None:
        held_out = fit_twins
    if not measured:
        raise ValueError("no twin to measure (role 'eval')")
    t0 = time.time()
    kw = {"samples": samples, "seed": seed}
    layers = _layers(hf)
    n = len(layers)
    rows: list[Row] = []

    def add(row: Row):
        rows.append(row)
        log(f"[{time.time() - t0:.0f}s] {row.name}: {row.rate:.3f}")

    add(Row("vanilla (harmful inputs)", "reference", sampled_rate(hf, processor, judge, measured, **kw)))
    add(Row("twin (benign inputs)", "reference", sampled_rate(hf, processor, judge, measured, use_twin=True, **kw)))
    modules = [("mlp", lambda layer: layer.mlp)] + ([("attention", _attention)] if attention else [])
    targets = [(m, "all", [get(layer) for layer in layers]) for m, get in modules]
    if per_layer:
        targets += [(m, i, [get(layers[i])]) for m, get in modules for i in range(n)]
    for m, layer, mods in targets:
        where = "every layer's" if layer == "all" else f"layer {layer}'s"
        patcher = Patcher(mods)
        try:
            rate = sampled_rate(hf, processor, judge, measured, patcher=patcher, **kw)
        finally:
            patcher.remove()
        add(Row(f"{where} {m} output = the twin's, prompt positions", "prompt", rate, m, layer))
    add(Row("lockstep reference (nothing replaced)", "reference", lockstep_rate(hf, processor, judge, measured, None, **kw)))
    for m, layer, mods in targets:
        where = "every layer's" if layer == "all" else f"layer {layer}'s"
        patcher = Patcher(mods, prompt_only=False)
        try:
            rate = lockstep_rate(hf, processor, judge, measured, patcher, **kw)
        finally:
            patcher.remove()
        add(Row(f"{where} {m} output = the twin's, every position", "lockstep", rate, m, layer, "lockstep reference"))
    single = [r for r in rows if r.kind == "lockstep" and r.module == "mlp" and r.layer != "all"]
    located = min(single, key=lambda r: r.rate).layer if single else n - 1
    a, b = fit_affine(hf, processor, layers[located].mlp, held_out, **kw)
    for name, hook in ((f"layer {located} MLP output -> a * out + b (least squares on {len(held_out)} held-out twins)",
                        lambda mod, i, o: o * a.to(o.dtype) + b.to(o.dtype)),
                       (f"layer {located} MLP output -> a * out (the fitted scale alone)", lambda mod, i, o: o * a.to(o.dtype))):
        handle = layers[located].mlp.register_forward_hook(hook)
        try:
            add(Row(name, "ceiling", sampled_rate(hf, processor, judge, measured, **kw), "mlp", located))
        finally:
            handle.remove()
    if glasses is not None:
        with glasses.apply(hf, mode="hooks"):
            add(Row(f"these glasses ({glasses.counts()['experts']} experts, digest {glasses.digest()[:12]})", "glasses",
                    sampled_rate(hf, processor, judge, measured, **kw)))
    report = {"rows": [r.__dict__ for r in rows], "located_layer": located, "layers": n,
              "twins": {"measured": len(measured), "held_out": len(held_out)}, "samples": samples, "seed": seed,
              "judge": getattr(judge, "name", str(judge)), "seconds": round(time.time() - t0, 1)}
    report.update(headroom(report))
    return report


def headroom(report: dict) -> dict:
    """The one-sentence answer, and its figures, from a report's rows."""
    rows = {r["kind"] + ":" + str(r.get("layer")) + ":" + str(r.get("module")): r for r in report["rows"]}
    by_name = {r["name"]: r for r in report["rows"]}
    v = report["rows"][0]["rate"]
    layer = report["located_layer"]
    ceiling = next(r for r in report["rows"] if r["kind"] == "ceiling")["rate"]
    ref = by_name["lockstep reference (nothing replaced)"]["rate"]
    patched = rows.get(f"lockstep:{layer}:mlp", {}).get("rate")
    glasses = next((r["rate"] for r in report["rows"] if r["kind"] == "glasses"), None)
    rel = lambda x, base: (x / base - 1) if base else 0.0
    out = {"vanilla": v, "ceiling": ceiling, "ceiling_change": rel(ceiling, v), "glasses": glasses}
    text = (f"On this model the best per-neuron constant map of layer {layer}'s MLP output (the ceiling of "
            f"neuron-level glasses there) takes the sampled harmful rate from {v:.3f} to {ceiling:.3f} ({rel(ceiling, v):+.0%})")
    if patched is not None:
        text += (f", where replacing that output by its no-harm value at every position takes it from {ref:.3f} to "
                 f"{patched:.3f} ({rel(patched, ref):+.0%})")
    if glasses is not None:
        drop, room = v - glasses, v - ceiling
        out["glasses_change"] = rel(glasses, v)
        out["fraction_of_headroom"] = drop / room if room > 0 else None
        reach = f"{drop / room:.0%} of that headroom" if room > 0 else "there is no headroom to reach"
        text += f"; these glasses take it to {glasses:.3f} ({rel(glasses, v):+.0%}): {reach}"
    out["sentence"] = text + "."
    return out


def markdown(report: dict) -> str:
    head = (f"| condition ({report['twins']['measured']} harmful inputs, {report['samples']} samples each, judge "
            f"{report['judge']}) | sampled harmful rate | compared with |")
    lines = [report["sentence"], "", head, "|---|---|---|"]
    lines += [f"| {r['name']} | {r['rate']:.3f} | {r['reference']} |" for r in report["rows"]]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> None:
    """``diagnosis.json``, ``diagnosis.md`` and a self-contained ``diagnosis.html`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnosis.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "diagnosis.md").write_text("# lmms-sgm diagnose\n\n" + markdown(report))
    cells = "".join(f"<tr class='{r['kind']}'><td>{html.escape(r['name'])}</td><td>{r['rate']:.3f}</td>"
                    f"<td>{html.escape(r['reference'])}</td></tr>" for r in report["rows"])
    (out / "diagnosis.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>lmms-sgm diagnose</title><style>body{font-family:sans-serif;"
        "max-width:60em;margin:2em auto}td,th{padding:.2em .6em;border-bottom:1px solid #ddd}tr.ceiling,tr.glasses"
        "{font-weight:bold}</style><h1>Headroom of neuron-level glasses</h1>"
        f"<p>{html.escape(report['sentence'])}</p><table><tr><th>condition</th><th>sampled harmful rate</th>"
        f"<th>compared with</th></tr>{cells}</table><p>{report['twins']['measured']} measured twins, "
        f"{report['twins']['held_out']} held out for the fit; {report['samples']} samples per prompt; judge "
        f"{html.escape(report['judge'])}; {report['seconds']} s. How to read it: docs/diagnosis.md.</p>\n")
