"""Loading models the way a Hub checkpoint is loaded, and fingerprinting them."""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import torch

from lmms_sgm.archs import adapter_for

# Config keys that vary between loads of the same weights and must not change a fingerprint.
_VOLATILE = {"transformers_version", "dtype", "torch_dtype", "use_cache", "output_hidden_states",
             "return_dict", "output_attentions", "architectures"}

DTYPES = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load(pretrained: str, *, device: str = "cpu", dtype: str = "auto"):
    """(model, processor) from a Hub id or a local directory, through ``from_pretrained``.

    The architecture adapter of the checkpoint's config decides how: a multimodal model (every
    supported family, Mllama included) with ``AutoModelForImageTextToText`` and its processor; a text-only decoder (``text_only``
    adapters, AurA's setting) with ``AutoModelForCausalLM`` and ``AutoTokenizer``, the tokenizer
    standing in for the processor. An unsupported architecture fails before any weight is read.
    ``"sgm-demo-llava"`` names the trained demo model bundled with the package (lmms_sgm/demo).
    A local path is never sent to the Hub; a Hub id is loaded from the local cache alone when the
    Hub cannot be reached (one probe, instead of huggingface_hub's retries: ~50 s per model).
    ``device="auto"`` spreads the model over every visible GPU (``device_map="auto"``, layers
    placed in order; CPU when there is none): one process for a model too big for one GPU."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    from lmms_sgm.bundled import DEMO_MODEL, DEMO_MODEL_DIR
    from lmms_sgm.processors import load_processor

    if pretrained == DEMO_MODEL:
        pretrained = str(DEMO_MODEL_DIR)
    source, local = _locate(pretrained)
    unreachable = None if local else hub_unreachable()
    offline = local or bool(unreachable)
    # transformers 5.24 does not pass local_files_only on to its PEFT adapter lookup: say it twice.
    hub = {"local_files_only": True, "adapter_kwargs": {"local_files_only": True}} if offline else {}
    try:
        text_only = adapter_for(AutoConfig.from_pretrained(source, local_files_only=offline)).text_only
        auto_model = AutoModelForCausalLM if text_only else AutoModelForImageTextToText
        if device == "auto":
            model = auto_model.from_pretrained(source, dtype=DTYPES[dtype], device_map="auto", **hub).eval()
        else:
            model = auto_model.from_pretrained(source, dtype=DTYPES[dtype], **hub)
            model = model.to(device).eval()
        # Image-only (with a warning) when its video processor needs torchvision: lmms_sgm.processors.
        processor = (AutoTokenizer.from_pretrained(source, local_files_only=offline) if text_only
                     else load_processor(source, local_files_only=offline))
    except OSError as e:
        if unreachable:
            raise OSError(f"model {pretrained}: not a local directory, not in the Hugging Face cache, and the Hub "
                          f"cannot be reached ({unreachable}); check the network or proxy, or give a local directory") from e
        raise
    return model, processor


def _locate(pretrained: str) -> tuple[str, bool]:
    """(what to give ``from_pretrained``, whether it is a local directory). A name that exists on
    disk or cannot be a Hub id (``./m``, ``/abs/m``, ``a/b/c``, ``~/m``) is a local path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = Path(pretrained).expanduser()
    if not path.exists():
        try:
            validate_repo_id(pretrained)
            return pretrained, False
        except HFValidationError:
            raise FileNotFoundError(f"model directory {path} does not exist (and {pretrained!r} is not a Hub id)") from None
    if not path.is_dir():
        raise FileNotFoundError(f"model {path} is a file; give the directory a model was saved to (save_pretrained)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model directory {path} holds no config.json: not a saved model (save_pretrained writes one)")
    return str(path), True


def hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be reached now, or None (also in offline mode: then
    huggingface_hub itself stays off the network). One request, no retries, HF's etag timeout."""
    import huggingface_hub
    from huggingface_hub import constants

    if huggingface_hub.is_offline_mode():
        return None
    try:
        huggingface_hub.get_session().head(constants.ENDPOINT, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as e:  # noqa: BLE001 -- no answer: DNS, refused, timeout, TLS, proxy
        return f"{constants.ENDPOINT}: {type(e).__name__}: {e}"
    return None


def unwrap(model):
    """The torch module behind an nnsight wrapper (or the model itself)."""
    inner = getattr(model, "_module", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def _clean(obj):
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))
                if k not in _VOLATILE and not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def fingerprint(model) -> dict:
    """What identifies a model for glasses: architecture, sizes, and a digest of its config."""
    model = unwrap(model)
    adapter = adapter_for(model)
    text = adapter.text_config(model.config)
    cfg = _clean(model.config.to_dict())
    return {
        "architecture": type(model).__name__,
        "model_type": model.config.model_type,
        "num_layers": adapter.num_layers(model),
        "hidden_size": getattr(text, "hidden_size", None),
        "intermediate_size": getattr(text, "intermediate_size", None),
        "vocab_size": getattr(text, "vocab_size", None),
        "config_digest": hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest(),
    }


def weights_digest(model, *, workers: int | None = None) -> str:
    """sha256 over every parameter and persistent buffer of ``model``: name, dtype, shape and bytes.

    What the config fingerprint cannot tell apart: two models of one config with other weights
    (another seed, a fine-tune, glasses baked into a few rows), or the same weights in another
    dtype. Exact, not sampled, since an edit of a few rows must show. Tied tensors are read once.
    Each tensor is hashed on its own thread (hashlib releases the GIL) and read in 64 MiB slices,
    so a GPU model is copied to the host a slice at a time; the cost is one read of the weights at
    sha256's speed per core (about 1.7 GB/s with SHA extensions): a 7B model in bfloat16
    (13.5 GB) takes a few seconds on a 16-core machine. Tensors accelerate offloaded are read
    where it keeps them; a model on the meta device (a remote model's local stand-in) has no
    weights to read and is refused.
    """
    import os
    from concurrent.futures import ThreadPoolExecutor

    model = unwrap(model)
    tensors, seen = [], set()
    state = model.state_dict()
    offloaded = _offloaded(model) if any(t.is_meta for t in state.values()) else {}
    for name, t in state.items():
        if t.is_meta:
            t = offloaded.get(name)
            if t is None:
                raise ValueError(f"{name} is on the meta device: a model without weights has no weight digest")
        tied = (t.device, t.data_ptr(), t.dtype, tuple(t.shape))
        if t.numel() and tied in seen:
            continue
        seen.add(tied)
        tensors.append((name, t))

    def one(item) -> bytes:
        name, t = item
        h = hashlib.sha256(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        flat = t.detach().reshape(-1)
        if flat.numel():
            flat = flat.contiguous().view(torch.uint8)
        for start in range(0, flat.numel(), _SLICE):
            h.update(flat[start:start + _SLICE].cpu().numpy().data)
        return h.digest()

    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        return hashlib.sha256(b"".join(pool.map(one, tensors))).hexdigest()


_SLICE = 64 << 20


def _offloaded(model) -> dict:
    """The values of tensors accelerate has offloaded (``device_map="auto"`` on too small a GPU):
    they are on the meta device in the model, and kept in the ``weights_map`` of an offloading hook
    on their module, under their name relative to it."""
    out = {}
    for prefix, module in model.named_modules():
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            weights = getattr(h, "weights_map", None)
            if not getattr(h, "offload", False) or weights is None:
                continue
            recurse = bool(getattr(h, "place_submodules", False))
            for name, t in [*module.named_parameters(recurse=recurse), *module.named_buffers(recurse=recurse)]:
                if t.is_meta:
                    with contextlib.suppress(KeyError):
                        out[f"{prefix}.{name}" if prefix else name] = weights[name]
    return out


def is_text_only(model) -> bool:
    """The model reads text alone (its adapter is ``text_only``): no image token, no processor."""
    return adapter_for(unwrap(model)).text_only


def image_token_id(model) -> int:
    """The token id whose positions carry the image: the soft tokens the features replace
    (LLaVA ``<image>``, Qwen2-VL ``<|image_pad|>``, Idefics3 ``<image>``, Gemma 3
    ``<image_soft_token>``), or Mllama's ``<|image|>``, after which the text attends to the image."""
    config = unwrap(model).config
    for key in ("image_token_id", "image_token_index"):
        value = getattr(config, key, None)
        if value is not None:
            return int(value)
    raise ValueError("the model config names no image token (image_token_id / image_token_index)")
