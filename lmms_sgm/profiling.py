"""Profiling: pooled per-neuron responses to labelled pairs, observed with nnsight traces.

Each batch is one ``model.trace``: for every site, in forward order, the activation is read,
pooled over the chosen positions, moved to the CPU and saved; ``tracer.stop()`` then skips the
rest of the forward (the LM head is never computed). Pooled responses are written into a
:class:`ResponseStore` as they arrive, which spills to a disk memmap for large runs, so memory
does not grow with the dataset beyond the responses themselves.

A batch holds examples of one token length (:func:`length_batches`), so no row is ever padded
and each example's pooled responses are the ones it has alone, whatever the batch size and
whichever examples share its batch; the forward runs with eager attention
(:func:`eager_attention`), so that identical prefixes give identical activations (exact ties)
whatever follows them.

The batch loop is the same wherever it runs; thin layers around it send each trace to an NDIF
server (lmms_sgm/remote.py), share the batches between processes (lmms_sgm/distributed.py) and
keep each batch's responses on disk so that an interrupted run resumes (lmms_sgm/checkpoint.py).
Since the batch plan does not depend on any of them, neither do the responses.
"""
from __future__ import annotations

import contextlib
import tempfile
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from lmms_sgm import prompting
from lmms_sgm.checkpoint import Checkpoint
from lmms_sgm.data import PairDataset, encode_batch, encode_texts, prompt_prefix
from lmms_sgm.models import image_token_id, is_text_only, unwrap
from lmms_sgm.options import ExecutionOptions, ProfileOptions, to_dict
from lmms_sgm.sites import Site, resolve_sites

if TYPE_CHECKING:
    from lmms_sgm.distributed import Group


# Pooled responses up to this size (MiB) stay in RAM; larger ones go to a temporary directory.
SPILL_MB = 512.0


class ResponseStore:
    """Pooled responses per site, in RAM or in memmaps on disk.

    Stored neuron-major (``[width, examples]``) because expertise reads one neuron's responses
    to all examples at a time; ``store[name]`` gives the ``[examples, width]`` view.
    """

    def __init__(self, sites: list[Site], n: int, *, directory: str | Path | None = None):
        self.sites = sites
        self.n = n
        self._tmp: tempfile.TemporaryDirectory | None = None
        if directory is None:
            self.arrays = {s.name: np.zeros((s.width, n), np.float32) for s in sites}
        else:
            directory = Path(directory)
            directory.mkdir(parents=True, exist_ok=True)
            self.arrays = {
                s.name: np.lib.format.open_memmap(directory / f"{i:04d}.npy", "w+", np.float32, (s.width, n))
                for i, s in enumerate(sites)
            }

    @classmethod
    def auto(cls, sites: list[Site], n: int, spill_mb: float = SPILL_MB) -> ResponseStore:
        """In RAM when small, otherwise in a temporary directory removed with the store."""
        size_mb = n * sum(s.width for s in sites) * 4 / 2**20
        if size_mb <= spill_mb:
            return cls(sites, n)
        tmp = tempfile.TemporaryDirectory(prefix="lmms_sgm_responses_")
        store = cls(sites, n, directory=tmp.name)
        store._tmp = tmp
        return store

    def write(self, rows: int | Sequence[int], pooled: dict[str, torch.Tensor]) -> None:
        """Store a batch's responses at example ``rows`` (a list), or from row ``rows`` on (an int)."""
        for name, value in pooled.items():
            where = slice(rows, rows + len(value)) if isinstance(rows, int) else np.asarray(rows)
            self.arrays[name][:, where] = value.numpy().T

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name].T

    def close(self) -> None:
        self.arrays = {}
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def position_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: str, image_id: int,
                  prompt_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean ``[batch, seq]`` mask of the positions to pool over; padding is never included.

    ``prompt_lengths`` (tokens before the response, per row) locate the response and the decision
    position when the response is the assistant turn; padding may sit on either side.
    """
    mask = attention_mask.bool()
    idx = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    if positions in ("response", "decision") and prompt_lengths is not None:
        start = mask.int().argmax(1, keepdim=True) + prompt_lengths.view(-1, 1)  # first response token
        mask = mask & ((idx >= start) if positions == "response" else (idx == start - 1))
    elif positions == "decision":  # no response turn: the last non-padding token
        last = torch.where(mask, idx, torch.full_like(idx, -1)).amax(1, keepdim=True)
        mask = idx == last
    elif positions == "response":
        raise ValueError("positions='response' needs the prompt lengths (text_field='question+response')")
    elif positions == "text":
        mask = mask & (input_ids != image_id)
    elif positions == "after_image":
        is_img = input_ids == image_id
        last_img = torch.where(is_img, idx, torch.full_like(idx, -1)).amax(1, keepdim=True)
        mask = mask & (idx > last_img)
    elif positions != "all":
        raise ValueError(f"unknown positions {positions!r}")
    empty = (~mask.any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"no position to pool over for batch rows {empty} (positions={positions!r})")
    return mask


def prompt_lengths(processor, pairs, enc) -> torch.Tensor:
    """Tokens before the response in each row: the user turn plus the generation prompt.

    Checked against the full encoding, so a tokenizer that merges across the boundary is an
    error rather than a silently shifted position.
    """
    prefix = encode_texts(processor, [prompt_prefix(processor, p) for p in pairs], pairs)
    lengths = prefix["attention_mask"].sum(1)
    first_full = enc["attention_mask"].int().argmax(1)
    first_prefix = prefix["attention_mask"].int().argmax(1)
    for i, n in enumerate(lengths.tolist()):
        full = enc["input_ids"][i, first_full[i]:first_full[i] + n]
        part = prefix["input_ids"][i, first_prefix[i]:first_prefix[i] + n]
        if not torch.equal(full, part):
            raise ValueError("the prompt's tokens change when the response follows them; positions "
                             "'response'/'decision' cannot be located for this tokenizer or chat template (one that "
                             "writes the assistant turn otherwise than its generation prompt, as LLaVA-OneVision's does)")
    return lengths


def pool(act: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool ``[batch, seq, width]`` over the masked positions -> ``[batch, width]`` float32."""
    act = act.float()
    m = mask.to(act.device).unsqueeze(-1)
    if pooling == "mean":
        return (act * m).sum(1) / m.sum(1)
    if pooling == "max":
        return act.masked_fill(~m, float("-inf")).amax(1)
    raise ValueError(f"unknown pooling {pooling!r}")


def as_nnsight(model):
    """An nnsight view of ``model`` (kept if it already is one)."""
    from nnsight import NNsight
    from nnsight.intervention.envoy import Envoy

    return model if isinstance(model, Envoy) else NNsight(model)


def token_lengths(processor, pairs, text_field: str, batch_size: int) -> list[int]:
    """Each pair's length in tokens once encoded (image tokens expanded by the processor)."""
    out: list[int] = []
    for start in range(0, len(pairs), batch_size):
        out += encode_batch(processor, pairs[start:start + batch_size], text_field)["attention_mask"].sum(1).tolist()
    return out


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Example indices in batches of at most ``batch_size`` examples of one token length.

    No row is padded, so an example's forward pass is the one it has alone, whatever the batch
    size and whichever examples share its batch. A padded batch is not, measured on CPU (torch
    2.13, transformers 5.24), demo model, 256 pairs, batch size 8 against 1:

    - left padding without ``position_ids`` (the old way) shifts a padded row's rotary
      positions: exact ties between examples (a shared chat-prefix token holding the max) split
      by ~1e-7, and by label when lengths differ by label. Default options with max pooling:
      AUROC up to 0.175 off and 22 experts changed (0.389 and 50 at batch size 32);
    - left padding with ``position_ids = cumsum(mask) - 1`` (1-D only: wrong for Qwen2-VL's
      mrope) or right padding (exact positions for every family, no ``position_ids``): bitwise
      equal with eager attention (but for left padding's mean, 1.5e-5 off from the summation
      order); with sdpa, whose CPU kernel gives a row's later positions other low bits when the
      padded length changes, 14-48 tied pairs split and AUROCs 6.1e-5 off;
    - batches of one length: bitwise equal for every pooling, positions and text_field, with
      sdpa and with eager attention.

    The cost: every pair is encoded twice (once for its length) and there are a few more
    batches when lengths vary (demo pairs: 35 instead of 32, 134 instead of 128), but no
    compute goes to padding; on the demo's 1,024 self-labelled pairs profiling takes as long as
    the padded way did (4.6 s, medians of 3, with eager attention).
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and lengths[batches[-1][0]] == lengths[i]:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _attn_implementations(config) -> dict:
    """The attention implementation of ``config`` and of its sub-configs, in the nested form
    ``set_attn_implementation`` takes."""
    out = {"": config._attn_implementation}
    for key in getattr(config, "sub_configs", {}):
        sub = getattr(config, key, None)
        if sub is not None:
            out[key] = _attn_implementations(sub)
    return out


@contextmanager
def eager_attention(model):
    """Run ``model`` with eager attention inside the block, then restore what it had.

    Exact ties mean identical prefixes only if a position's activations do not depend on what
    follows it. With sdpa on CPU they do: its kernel blocks a sequence by its length, so the
    same image + question gives other low bits at the decision position when the answer is
    longer. Measured, each pair alone: tiny LLaVA (26-61 tokens) 260 differing values under
    sdpa, 0 under eager (none under either at 586-1069 tokens); demo self-labelled pairs, 11,455
    of 913,920 neuron x prompt groups untied under sdpa, 0 under eager. On the tiny test model
    with a system prompt, max pooling, sdpa moved an AUROC by 0.375 and changed an expert. The price is
    memory: eager attention holds batch x heads x length^2 weights per layer (lower
    ``batch_size`` if it runs out).
    """
    saved = _attn_implementations(model.config)
    with contextlib.suppress(ValueError, ImportError):
        model.set_attn_implementation("eager")
    if model.config._attn_implementation != "eager":  # a model that cannot switch: profile it as it is
        warnings.warn(f"profiling with {saved['']} attention: exact ties between examples may split", stacklevel=1)
    try:
        yield model
    finally:
        if _attn_implementations(model.config) != saved:
            model.set_attn_implementation(saved)


def profile(
    model,
    processor,
    pairs: PairDataset,
    options: ProfileOptions = ProfileOptions(),
    *,
    progress: bool = True,
    spill_mb: float = SPILL_MB,
    execution: ExecutionOptions = ExecutionOptions(),
    checkpoint: Checkpoint | None = None,
    group: Group | None = None,
    sites: Sequence[Site] | None = None,
) -> tuple[list[Site], ResponseStore | None]:
    """Pooled responses of every site to every pair, in dataset order.

    One trace per batch, wherever it runs: in this process, or on an NDIF server
    (``execution.remote``; lmms_sgm/remote.py). With a ``group`` of several processes
    (lmms_sgm/distributed.py) each traces its share of the batches and process 0 gathers them;
    with a ``checkpoint`` (lmms_sgm/checkpoint.py) every batch's responses are kept on disk as
    they arrive and a resumed run traces only the batches it lacks. The store is returned on
    process 0; other processes get None. ``sites`` (in forward order) replaces the sites
    ``options`` name: gated steering profiles decoder-layer outputs
    (:func:`lmms_sgm.sites.layer_output_site`) through this same loop.
    """
    from lmms_sgm import remote
    from lmms_sgm.checkpoint import make_key, processor_digest
    from lmms_sgm.distributed import Group
    from lmms_sgm.models import fingerprint

    group = group or Group()
    pairs.require_both_classes()
    pairs.require_text_field(options.text_field)
    hf = unwrap(model)
    sites = resolve_sites(hf, options) if sites is None else list(sites)
    require_modality(pairs, hf, options)
    nn_model = remote.wrap(model, processor) if execution.is_remote else as_nnsight(model)
    dtype = next(hf.parameters()).dtype
    image_id = -1 if is_text_only(hf) else image_token_id(hf)  # -1: no token is an image token
    width = sum(s.width for s in sites)
    batch_size = options.batch_size
    if execution.is_remote:  # a request and its result must stay under the service's limit
        sample = encode_batch(processor, [pairs[0]], options.text_field)
        batch_size = remote.fit_batch_size(batch_size, width * 4, remote.tensor_bytes(sample.values()) * 2, execution)
    batches = length_batches(token_lengths(processor, pairs, options.text_field, options.batch_size), batch_size)
    session = None  # the remote session, once opened below

    def compute(i: int) -> torch.Tensor:
        """Batch ``i``'s pooled responses, ``[rows, sum of widths]`` float32 (one tensor travels best)."""
        rows = batches[i]
        batch = [pairs[j] for j in rows]
        enc = encode_batch(processor, batch, options.text_field)
        if not enc["attention_mask"].bool().all():  # the processor encoded a pair differently
            raise RuntimeError("a batch of one token length came out padded; profiling needs "
                               "a processor that encodes a pair the same way every time")
        lengths = None
        if options.positions in ("response", "decision") and options.text_field == "question+response":
            lengths = prompt_lengths(processor, batch, enc)
        mask = position_mask(enc["input_ids"], enc["attention_mask"], options.positions, image_id, lengths)
        inputs = prompting.to_model(enc, hf)
        if session is None:
            pooled = _trace_batch(nn_model, sites, inputs, mask, options.pooling)
        else:
            pooled = session.call(_trace_batch, nn_model, sites, inputs, mask, options.pooling, **session.trace_kwargs)
        return torch.cat([pooled[s.name].to(torch.float32) for s in sites], dim=1)

    store = ResponseStore.auto(sites, len(pairs), spill_mb) if group.is_main else None
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode())
            if options.attention == "eager":  # on a remote model, the setting travels with every request
                stack.enter_context(eager_attention(hf))
            if execution.is_remote:
                session = stack.enter_context(remote.Session(nn_model, execution))
            done: set[int] = set()
            with group.together():  # a refused checkpoint stops every process
                if checkpoint is not None and group.is_main:
                    checkpoint.open(make_key(fingerprint=fingerprint(hf), weights=_weights_id(hf, nn_model, execution),
                                             dtype=str(dtype), attention=_attn_implementations(hf.config),
                                             processor=processor_digest(processor), data_digest=pairs.digest(),
                                             examples=len(pairs), profile_options=to_dict(options), sites=sites,
                                             batches=batches))
                    done = checkpoint.restore(store, batches, sites)
            todo = group.broadcast([i for i in range(len(batches)) if i not in done])
            show = progress and group.is_main
            with tqdm(total=len(batches), initial=len(batches) - len(todo), desc="profiling", unit="batch",
                      disable=not show) as bar:
                for i, flat in group.rounds(todo, compute, lambda i: (len(batches[i]), width)):
                    pooled = _split(flat, sites)
                    assert store is not None  # rounds() yields on the main process only
                    store.write(batches[i], pooled)
                    if checkpoint is not None:
                        checkpoint.save(i, batches[i], pooled)
                    bar.update()
    except BaseException:
        if store is not None:
            store.close()
        raise
    return sites, store


def _weights_id(hf, nn_model, execution: ExecutionOptions) -> str:
    """The checkpoint key's name for the weights: their digest (lmms_sgm.models.weights_digest), or
    for a model served remotely (here on the meta device, without weights) its Hub id."""
    from lmms_sgm.models import weights_digest

    if execution.is_remote and any(p.is_meta for p in hf.parameters()):
        return f"hub:{getattr(nn_model, 'repo_id', None)}"
    return weights_digest(hf)


def require_modality(pairs: PairDataset, model, options: ProfileOptions) -> None:
    """Images in every record, or in none, as the model and ``options.text_only`` say.

    A text-only model reads no image. An MLLM is profiled text-only (its language model alone,
    records through its chat template without an image) only when asked, since glasses profiled
    that way measure something else than the paper's image-text pairs: image-less records given
    by mistake are refused rather than silently profiled.
    """
    if is_text_only(model):
        pairs.require_images(False, f"{type(unwrap(model)).__name__} is a text-only model: drop the images")
    elif options.text_only:
        pairs.require_images(False, "text_only profiling feeds text alone: drop the images, or profile with text_only=false")
    else:
        pairs.require_images(True, "an MLLM is profiled on image-text pairs; to profile it on text alone, "
                                   "ask for it: text_only=true (lmms-sgm profile --text-only true)")


def _split(flat: torch.Tensor, sites: list[Site]) -> dict[str, torch.Tensor]:
    """``[rows, sum of widths]`` -> one ``[rows, width]`` view per site."""
    return dict(zip([s.name for s in sites], torch.split(flat, [s.width for s in sites], dim=1)))


def _trace_batch(nn_model, sites: list[Site], inputs: dict, mask: torch.Tensor, pooling: str, **trace_kwargs) -> dict:
    """One forward pass, read site by site in forward order, pooled; the rest of the forward is skipped.

    Run remotely (``remote=`` in ``trace_kwargs``) the body is what travels: the pooled tensors go
    back in one saved dict, and nothing else does."""
    import nnsight

    from lmms_sgm.archs import get_module

    points = [(s.name, get_module(nn_model, s.module_path), s.kind) for s in sites]
    with nn_model.trace(**inputs, **trace_kwargs) as tracer:
        pooled = nnsight.save({})
        for name, envoy, kind in points:
            act = envoy.input if kind == "input" else envoy.output
            if kind == "layer_output" and isinstance(act, tuple):  # transformers 4.x decoder layers
                act = act[0]
            pooled[name] = pool(act, mask, pooling).cpu()
        tracer.stop()
    return pooled
