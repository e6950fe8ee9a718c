"""Loading models the way a Hub checkpoint is loaded, and fingerprinting them."""
from __future__ import annotations

import hashlib
import json

import torch

from lmms_sgm.archs import adapter_for

# Config keys that vary between loads of the same weights and must not change a fingerprint.
_VOLATILE = {"transformers_version", "dtype", "torch_dtype", "use_cache", "output_hidden_states",
             "return_dict", "output_attentions", "architectures"}

DTYPES = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load(pretrained: str, *, device: str = "cpu", dtype: str = "auto"):
    """(model, processor) from a Hub id or a local directory, through ``from_pretrained``.

    ``"sgm-demo-llava"`` names the trained demo model bundled with the package (lmms_sgm/demo)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from lmms_sgm.demo import MODEL_DIR, SHORT_NAME

    if pretrained == SHORT_NAME:
        pretrained = str(MODEL_DIR)

    model = AutoModelForImageTextToText.from_pretrained(pretrained, dtype=DTYPES[dtype]).to(device).eval()
    adapter_for(model)  # unsupported architectures fail here, before any work
    processor = AutoProcessor.from_pretrained(pretrained)
    return model, processor


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


def image_token_id(model) -> int:
    config = unwrap(model).config
    for key in ("image_token_id", "image_token_index"):
        value = getattr(config, key, None)
        if value is not None:
            return int(value)
    raise ValueError("the model config names no image token (image_token_id / image_token_index)")
