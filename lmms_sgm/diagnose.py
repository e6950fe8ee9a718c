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

It runs through forward hooks on the local module (``backend="hooks"``, the default) or as nnsight
traces (``backend="nnsight"``), which also run on an NDIF server (``remote``).
"""
from __future__ import annotations

import contextlib
import html
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from lmms_sgm.archs import adapter_for, get_module
from lmms_sgm.evaluate import chat_prompt, unsafe_rate
from lmms_sgm.models import unwrap
from lmms_sgm.prompting import extended

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
    from lmms_sgm import textfiles

    rows = textfiles.read_jsonl(path, "twins file")
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


def _rope_index(model):
    """The model's multimodal position function (Qwen2-VL's mrope: ``get_rope_index``), or None
    for 1-D positions."""
    hf = unwrap(model)
    return next((m.get_rope_index for m in (getattr(hf, "model", None), hf) if hasattr(m, "get_rope_index")), None)


def repeated(extras: dict, samples: int) -> dict:
    """``extras`` of a batch with each row repeated ``samples`` times (``num_return_sequences``):
    per-row tensors repeat along dim 0; Qwen2-VL's flat patch rows repeat per image."""
    out = {k: v.repeat_interleave(samples, dim=0) for k, v in extras.items()}
    grid = extras.get("image_grid_thw")
    if grid is not None and extras["pixel_values"].dim() == 2:  # [patches of every image, features]
        chunks = extras["pixel_values"].split(grid.prod(-1).tolist())
        out["pixel_values"] = torch.cat([c for c in chunks for _ in range(samples)])
    return out


def positions(model, attention_mask: torch.Tensor, input_ids=None, extras=None) -> dict:
    """The ``position_ids`` of a left-padded forward pass over the whole sequence: 1-D (cumsum of
    the mask), or, for a model with multimodal positions, the model's own function over the whole
    sequence, generated tokens included (what it would compute for it from scratch; its own
    incremental guess assumes a cache position generate passes)."""
    rope = _rope_index(model)
    if rope is None:
        return {"position_ids": position_ids(attention_mask)}
    extras = extended(extras or {}, input_ids.shape[-1])
    pos, _ = rope(input_ids, mm_token_type_ids=extras.get("mm_token_type_ids"), image_grid_thw=extras.get("image_grid_thw"),
                  video_grid_thw=extras.get("video_grid_thw"), attention_mask=attention_mask)
    return {"position_ids": pos}


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions of a left-padded batch as ``generate`` derives them (1-D rotary): without them a
    forward pass shifts a padded row's positions by its padding."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def encode(processor, texts, images, device=None):
    """Left padded (for generate; forward passes add :func:`positions`), one image per row."""
    from lmms_sgm.prompting import encode as encode_batch

    enc = encode_batch(processor, texts, [[image] for image in images], padding_side="left")
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


# ---------------------------------------------------------------- engines
#
# What the measurements need from a model: the outputs of some modules on a prompt pass, a
# generate call with module outputs replaced on the prompt pass or mapped on every pass, and one
# forward pass recording or replacing module outputs. Modules are named by their paths (e.g.
# ``model.language_model.layers.3.mlp``), so that the same measurement runs on the local module
# through forward hooks (:class:`HookEngine`, the fast path) or as nnsight traces
# (:class:`NNsightEngine`), which can run on an NDIF server.


def _tensor(output):
    return output[0] if isinstance(output, tuple) else output


def _with(output, tensor):
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


def _expanded(src: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``src`` for a batch of ``like``'s size (generate repeats each row ``num_return_sequences`` times)."""
    return src.repeat_interleave(like.shape[0] // src.shape[0], dim=0).to(like.dtype)


class HookEngine:
    """The local Hugging Face module, through forward hooks."""

    name = "hooks"

    def __init__(self, model):
        self.hf = unwrap(model)
        self.device = next(self.hf.parameters()).device

    def module(self, path: str):
        return get_module(self.hf, path)

    def prompt_outputs(self, enc, paths) -> list[torch.Tensor]:
        """The modules' outputs on the prompt pass ``generate`` makes of ``enc``."""
        patcher = Patcher([self.module(p) for p in paths])
        patcher.mode = "record"
        try:
            self.hf.generate(**enc, max_new_tokens=1, do_sample=False)
        finally:
            patcher.remove()
        return [patcher.saved[i] for i in range(len(paths))]

    def generate(self, enc, gen: dict, *, prompt=(), every=()) -> torch.Tensor:
        """``generate(**enc, **gen)``; ``prompt``: ``(path, tensor)`` outputs replaced on the prompt
        pass; ``every``: ``(path, a, b)``, the output mapped to ``a * out + b`` on every pass."""
        handles = []
        try:
            for path, t in prompt:
                handles.append(self.module(path).register_forward_hook(
                    lambda m, i, o, t=t: _with(o, _expanded(t, _tensor(o))) if _tensor(o).shape[1] > 1 else None))
            for path, a, b in every:
                handles.append(self.module(path).register_forward_hook(
                    lambda m, i, o, a=a, b=b: _with(o, _tensor(o) * a.to(o.dtype) + b.to(o.dtype))))
            return self.hf.generate(**enc, **gen)
        finally:
            for h in handles:
                h.remove()

    def forward(self, inputs: dict, *, record=(), replace=()):
        """One forward pass: ``(last position's logits as float32, the cache if use_cache, the
        outputs of the ``record`` paths)``; ``replace``: ``(path, tensor)`` outputs replaced."""
        saved: dict = {}
        handles = []
        try:
            for i, path in enumerate(record):
                handles.append(self.module(path).register_forward_hook(
                    lambda m, a, o, i=i: saved.__setitem__(i, _tensor(o).detach().clone())))
            for path, t in replace:
                handles.append(self.module(path).register_forward_hook(lambda m, a, o, t=t: _with(o, _expanded(t, _tensor(o)))))
            out = self.hf(**inputs)
        finally:
            for h in handles:
                h.remove()
        return out.logits[:, -1].float(), (_cache_of(out) if inputs.get("use_cache") else None), \
            [saved[i] for i in range(len(record))]

    @contextlib.contextmanager
    def wearing(self, glasses):
        with glasses.apply(self.hf, mode="hooks"):
            yield


def remote_input_device(nn_model, options) -> torch.device:
    """Where an engine's inputs are built: the model's device when it runs here (no remote, or
    ``local`` emulation), else the CPU (they are serialised and the server places them)."""
    if options is None or options.remote == "local":
        return next(unwrap(nn_model).parameters()).device
    return torch.device("cpu")


class NNsightEngine:
    """The same measurements as nnsight traces: in this process, or (``remote``, a
    :class:`~lmms_sgm.options.RemoteOptions` other than off) on an NDIF server, each trace sent
    through :class:`lmms_sgm.remote.Session` (lmms_sgm travels by value, transport failures are
    retried). Remotely the lockstep loop re-reads the whole sequence each step (a KV cache does
    not travel between traces) and sampling draws from the server's random generator."""

    name = "nnsight"

    def __init__(self, model, processor, remote=None):
        from lmms_sgm.interventions.wearing import as_generator
        from lmms_sgm.remote import wrap

        if _rope_index(model) is not None:
            raise ValueError(f"{type(unwrap(model)).__name__} takes 3-D multimodal positions, which nnsight 0.8.1's input "
                             "batching splits as rows (position_ids must be [batch, tokens] there): diagnose it with "
                             "--backend hooks (locally)")
        self.remote = remote if remote is not None and remote.remote != "off" else None
        self.nn = wrap(model, processor) if self.remote else as_generator(model, processor)
        self.hf = self.nn._module
        # A server-side model is built on the meta device here (no weights): inputs stay on the
        # CPU, travel, and the server places them; nothing here computes with the model's tensors.
        self.device = remote_input_device(self.nn, self.remote)
        self._worn = None  # remote glasses being worn (their traces carry them)

    def _call(self, fn, *args):
        if self.remote is None:
            return fn(self.nn, *args, {})
        from lmms_sgm.remote import Session

        with Session(self.nn, self.remote) as session:
            return session.call(fn, self.nn, *args, session.trace_kwargs)

    def prompt_outputs(self, enc, paths) -> list[torch.Tensor]:
        return self._call(_nn_prompt_outputs, dict(enc), list(paths))

    def generate(self, enc, gen: dict, *, prompt=(), every=()) -> torch.Tensor:
        if self._worn is not None:
            if prompt or every:
                raise ValueError("patching while remote glasses are worn is not supported")
            return self._worn.generate(dict(enc), **gen)
        return self._call(_nn_generate, dict(enc), dict(gen), list(prompt), list(every))

    def forward(self, inputs: dict, *, record=(), replace=()):
        if self.remote is not None and inputs.get("use_cache"):
            raise ValueError("a KV cache does not travel between remote traces: use cache=False remotely")
        return self._call(_nn_forward, dict(inputs), list(record), list(replace))

    @contextlib.contextmanager
    def wearing(self, glasses):
        if self.remote is None:
            with glasses.apply(self.nn, mode="nnsight"):
                yield
            return
        handle = glasses.apply(self.nn, mode="nnsight", remote=self.remote.remote)
        self._worn = handle
        try:
            yield
        finally:
            self._worn = None
            handle.remove()


# Trace bodies: module-level functions, so that they travel by value to an NDIF server.


def _nn_prompt_outputs(nn_model, enc, paths, trace_kwargs):
    import nnsight

    with nn_model.generate(**enc, max_new_tokens=1, do_sample=False, **trace_kwargs):
        saved = nnsight.save([_tensor(get_module(nn_model, p).output) for p in paths])
    return saved


def _nn_set(envoy, value):
    out = envoy.output
    envoy.output = _with(out, _expanded(value, _tensor(out)))


def _nn_generate(nn_model, enc, gen, prompt, every, trace_kwargs):
    if not every:
        with nn_model.generate(**enc, **gen, **trace_kwargs) as tracer:
            for path, t in prompt:  # outside a step loop: the first (prompt) pass only
                _nn_set(get_module(nn_model, path), t)
            ids = tracer.result.save()
        return ids
    if prompt:
        raise ValueError("prompt replacement and an every-pass map in one generate call are not supported")
    with warnings.catch_warnings():
        # An open step loop (the length is unknown) warns that the step after the last was never
        # reached: expected. The result is read in a second invoke (nothing after the loop runs).
        warnings.filterwarnings("ignore", message=r".*was never reached.*", category=UserWarning)
        with nn_model.generate(**gen, **trace_kwargs) as tracer:
            with tracer.invoke(**enc):
                for _ in tracer.iter[:]:
                    for path, a, b in every:
                        envoy = get_module(nn_model, path)
                        out = envoy.output
                        envoy.output = _with(out, _tensor(out) * a.to(_tensor(out).dtype) + b.to(_tensor(out).dtype))
            with tracer.invoke():
                ids = tracer.result.save()
    return ids


def _nn_forward(nn_model, inputs, record, replace, trace_kwargs):
    import nnsight

    cache = None
    with nn_model.trace(**inputs, **trace_kwargs):
        for path, t in replace:
            _nn_set(get_module(nn_model, path), t)
        saved = nnsight.save([_tensor(get_module(nn_model, p).output) for p in record])
        out = nn_model.output
        logits = out.logits[:, -1].float().save()
        if inputs.get("use_cache"):
            cache = nnsight.save(_cache_of(out))
    return logits, cache, saved


def as_engine(model, processor=None, *, backend: str = "hooks", remote=None):
    """An engine for ``model`` (kept if it already is one): ``hooks`` or ``nnsight``; ``remote``
    (RemoteOptions) needs ``nnsight``."""
    if isinstance(model, (HookEngine, NNsightEngine)):
        return model
    if backend == "hooks":
        if remote is not None and remote.remote != "off":
            raise ValueError("remote execution runs nnsight traces: use backend nnsight")
        return HookEngine(model)
    if backend == "nnsight":
        return NNsightEngine(model, processor, remote)
    raise ValueError(f"backend {backend!r}: use hooks or nnsight")


def _decode(tok, ids, prompt_len, n, samples):
    dec = tok.batch_decode(ids[:, prompt_len:], skip_special_tokens=True)
    return [[d.strip() for d in dec[j * samples:(j + 1) * samples]] for j in range(n)]


SAMPLING = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}


@torch.no_grad()
def sampled_rate(model, processor, judge, twins: list[Twin], *, use_twin: bool = False, paths=None, every=(),
                 samples: int = 5, seed: int = 0, batch_size: int = 50, max_new_tokens: int = 24) -> float:
    """Sampled unsafe rate of the harmful inputs (or, ``use_twin``, of their twins) with ``generate``;
    ``paths``: modules whose outputs take the twin's value at the prompt positions; ``every``:
    ``(path, a, b)`` maps worn at every position. ``model``: a model or an engine."""
    return unsafe_rate(judge, [t.question for t in twins],
                       sampled_answers(model, processor, twins, use_twin=use_twin, paths=paths, every=every, samples=samples,
                                       seed=seed, batch_size=batch_size, max_new_tokens=max_new_tokens))


@torch.no_grad()
def sampled_answers(model, processor, twins: list[Twin], *, use_twin: bool = False, paths=None, every=(),
                    samples: int = 5, seed: int = 0, batch_size: int = 50, max_new_tokens: int = 24) -> list[list[str]]:
    """The sampled answers of :func:`sampled_rate`."""
    engine = as_engine(model)
    torch.manual_seed(seed)
    responses = []
    gen = {"max_new_tokens": max_new_tokens, "num_return_sequences": samples, **SAMPLING}
    for s in range(0, len(twins), batch_size):
        batch = twins[s:s + batch_size]
        enc, twin = encode_pair(processor, batch, engine.device)
        if use_twin:
            enc = twin
        prompt = ()
        if paths:  # the twin's prompt pass, with the positions generate gives the harmful run
            prompt = list(zip(paths, engine.prompt_outputs(twin, paths)))
        ids = engine.generate(enc, gen, prompt=prompt, every=every)
        responses += _decode(processor.tokenizer, ids, enc["input_ids"].shape[1], len(batch), samples)
    return responses


@torch.no_grad()
def lockstep_rate(model, processor, judge, twins: list[Twin], paths, *, samples: int = 5, seed: int = 0,
                  batch_size: int = 40, max_new_tokens: int = 24, cache: bool = True) -> float:
    """Sampled unsafe rate with the ``paths`` modules taking the twin's outputs at every position
    (None: the same loop with nothing replaced, the reference of these rates)."""
    return unsafe_rate(judge, [t.question for t in twins],
                       lockstep_answers(model, processor, twins, paths, samples=samples, seed=seed, batch_size=batch_size,
                                        max_new_tokens=max_new_tokens, cache=cache))


@torch.no_grad()
def lockstep_answers(model, processor, twins: list[Twin], paths, *, samples: int = 5, seed: int = 0,
                     batch_size: int = 40, max_new_tokens: int = 24, cache: bool = True) -> list[list[str]]:
    """The sampled answers of :func:`lockstep_rate`.

    Each step runs the twin on the same tokens (recording the ``paths`` modules' outputs), then
    the harmful input (replacing them), then samples the next token for both. With ``cache`` both
    runs keep their own KV cache and each step computes the new position only: its patched keys
    and values are the ones every later step reads, so this equals re-reading the whole sequence
    every step (``cache=False``, the slow reference, and the remote way) up to float rounding. The
    image token is never sampled (a re-read would take it for another image)."""
    from lmms_sgm.models import image_token_id

    engine = as_engine(model)
    tok = processor.tokenizer
    image_id = image_token_id(engine.hf)
    paths = list(paths or [])
    torch.manual_seed(seed)
    responses = []
    def rep(t):
        return t.repeat_interleave(samples, dim=0)

    for s in range(0, len(twins), batch_size):
        batch = twins[s:s + batch_size]
        enc, twin = encode_pair(processor, batch, engine.device)
        ids, tids, attn = rep(enc["input_ids"]), rep(twin["input_ids"]), rep(enc["attention_mask"])
        extra, textra = repeated(_extras(enc), samples), repeated(_extras(twin), samples)
        prompt_len = ids.shape[1]
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        past = tpast = None
        for step in range(max_new_tokens):
            ext = extended(extra, ids.shape[1])  # the extras grown to this step's length, once per step
            pos = positions(engine.hf, attn, ids, ext)
            if cache and step > 0:  # the new position only, against each run's own cache
                new = {"input_ids": ids[:, -1:], **{k: v[..., -1:] for k, v in pos.items()}}
                mask = ext.get("cross_attention_mask")
                if mask is not None:  # Mllama: the new token's row (the model caches the image's keys)
                    new["cross_attention_mask"] = mask[:, -1:]
                a, b = {**new, "cache": past}, {**new, "cache": tpast}  # transformers 5's name of past_key_values
                b["input_ids"] = tids[:, -1:]
            else:
                a = {"input_ids": ids, **pos, **ext}
                b = {"input_ids": tids, **pos, **extended(textra, tids.shape[1])}
            replace = ()
            if paths:
                _, tpast, saved = engine.forward({"attention_mask": attn, "use_cache": cache, **b}, record=paths)
                replace = list(zip(paths, saved))
            logits, past, _ = engine.forward({"attention_mask": attn, "use_cache": cache, **a}, replace=replace)
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
def fit_affine(model, processor, path: str, twins: list[Twin], *, samples: int = 5, seed: int = 0, batch_size: int = 40,
               max_new_tokens: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-neuron least-squares map of the ``path`` module's outputs, twin ~ harmful, over
    every non-padding position of prompt + the model's own sampled answer (teacher-forced, the
    same answer tokens after both prompts), on ``twins`` (pass the held-out ones only). The
    answers never hold the image token: the teacher-forced pass would read it as another image."""
    from lmms_sgm.models import image_token_id

    if not twins:
        raise ValueError("the least-squares ceiling needs held-out twins (role 'fit'); none given")
    engine = as_engine(model)
    image_id = image_token_id(engine.hf)
    tok = processor.tokenizer
    torch.manual_seed(seed)
    xs, ys = [], []
    gen = {"max_new_tokens": max_new_tokens, "num_return_sequences": samples, "suppress_tokens": [image_id], **SAMPLING}
    for s in range(0, len(twins), batch_size):
        enc, twin = encode_pair(processor, twins[s:s + batch_size], engine.device)
        answer = engine.generate(enc, gen)[:, enc["input_ids"].shape[1]:]
        attn = torch.cat([enc["attention_mask"].repeat_interleave(samples, 0), (answer != tok.pad_token_id).long()], 1)
        acts = []
        for e in (enc, twin):
            ids = torch.cat([e["input_ids"].repeat_interleave(samples, 0), answer], 1)
            extra = extended(repeated(_extras(e), samples), ids.shape[1])
            _, _, (out,) = engine.forward({"input_ids": ids, "attention_mask": attn, "use_cache": False,
                                           **positions(engine.hf, attn, ids, extra), **extra}, record=[path])
            acts.append(out[attn.bool()])
        xs.append(acts[0])
        ys.append(acts[1])
    return per_neuron_affine(torch.cat(xs), torch.cat(ys))


def _layers(hf):
    return get_module(hf, adapter_for(hf).layers_path(hf))


def _attention_name(layer) -> str:
    for name in ("self_attn", "attention", "attn", "cross_attn"):
        if hasattr(layer, name):
            return name
    raise ValueError(f"{type(layer).__name__} has no attention module this tool knows (self_attn, attention, attn, cross_attn)")


@dataclass
class Row:
    name: str
    kind: str  # reference | prompt | lockstep | ceiling | glasses
    rate: float
    module: str | None = None  # mlp | attention
    layer: int | str | None = None  # a layer index, or "all"
    reference: str = "vanilla"  # the row this one is compared with


def diagnose(model, processor, twins: list[Twin], judge, *, glasses=None, samples: int = 5, seed: int = 0,
             per_layer: bool = True, attention: bool = True, fit_twins: list[Twin] | None = None, log=None,
             backend: str = "hooks", remote=None, lockstep_cache: bool | None = None) -> dict:
    """Every measurement of the module docstring; returns the report (see :func:`headroom`).

    ``twins``: all records; the ``eval`` ones are measured, the ``fit`` ones (or ``fit_twins``,
    when given) are used by the least-squares fit alone. ``backend``: ``hooks`` (forward hooks on
    the local module) or ``nnsight`` (traces; with ``remote``, RemoteOptions, on an NDIF server).
    ``lockstep_cache``: keep a KV cache in the lockstep loop (default: yes, except remotely)."""
    log = log or (lambda s: None)
    engine = as_engine(model, processor, backend=backend, remote=remote)
    cache = (getattr(engine, "remote", None) is None) if lockstep_cache is None else lockstep_cache
    measured, held_out = split_twins(twins)
    if fit_twins is not None:
        held_out = fit_twins
    if not measured:
        raise ValueError("no twin to measure (role 'eval')")
    t0 = time.time()
    kw = {"samples": samples, "seed": seed}
    hf = engine.hf
    base = adapter_for(hf).layers_path(hf)
    n = len(get_module(hf, base))
    rows: list[Row] = []

    def add(row: Row):
        rows.append(row)
        log(f"[{time.time() - t0:.0f}s] {row.name}: {row.rate:.3f}")

    add(Row("vanilla (harmful inputs)", "reference", sampled_rate(engine, processor, judge, measured, **kw)))
    add(Row("twin (benign inputs)", "reference", sampled_rate(engine, processor, judge, measured, use_twin=True, **kw)))
    subs = {"mlp": ["mlp"] * n}
    if attention:  # a layer's own attention: self-attention, or cross-attention (Mllama's image layers)
        subs["attention"] = [_attention_name(get_module(hf, f"{base}.{i}")) for i in range(n)]
    targets = [(m, "all", [f"{base}.{i}.{sub[i]}" for i in range(n)]) for m, sub in subs.items()]
    if per_layer:
        targets += [(m, i, [f"{base}.{i}.{sub[i]}"]) for m, sub in subs.items() for i in range(n)]
    for m, layer, paths in targets:
        where = "every layer's" if layer == "all" else f"layer {layer}'s"
        add(Row(f"{where} {m} output = the twin's, prompt positions", "prompt",
                sampled_rate(engine, processor, judge, measured, paths=paths, **kw), m, layer))
    add(Row("lockstep reference (nothing replaced)", "reference",
            lockstep_rate(engine, processor, judge, measured, None, cache=cache, **kw)))
    for m, layer, paths in targets:
        where = "every layer's" if layer == "all" else f"layer {layer}'s"
        add(Row(f"{where} {m} output = the twin's, every position", "lockstep",
                lockstep_rate(engine, processor, judge, measured, paths, cache=cache, **kw), m, layer, "lockstep reference"))
    single = [r for r in rows if r.kind == "lockstep" and r.module == "mlp" and r.layer != "all"]
    located = min(single, key=lambda r: r.rate).layer if single else n - 1
    path = f"{base}.{located}.mlp"
    a, b = fit_affine(engine, processor, path, held_out, **kw)
    for name, ab in ((f"layer {located} MLP output -> a * out + b (least squares on {len(held_out)} held-out twins)", (a, b)),
                     (f"layer {located} MLP output -> a * out (the fitted scale alone)", (a, torch.zeros_like(b)))):
        add(Row(name, "ceiling", sampled_rate(engine, processor, judge, measured, every=[(path, *ab)], **kw), "mlp", located))
    if glasses is not None:
        with engine.wearing(glasses):
            add(Row(f"these glasses ({glasses.describe()})", "glasses",
                    sampled_rate(engine, processor, judge, measured, **kw)))
    report = {"rows": [r.__dict__ for r in rows], "located_layer": located, "layers": n,
              "twins": {"measured": len(measured), "held_out": len(held_out)}, "samples": samples, "seed": seed,
              "judge": getattr(judge, "name", str(judge)), "backend": engine.name,
              "remote": None if getattr(engine, "remote", None) is None else engine.remote.remote,
              "lockstep_cache": cache, "seconds": round(time.time() - t0, 1)}
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
    def rel(x, base):
        return (x / base - 1) if base else 0.0

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
