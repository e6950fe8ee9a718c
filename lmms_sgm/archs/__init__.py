"""Architecture adapters: where a model's post-fusion decoder layers and their MLPs are.

An adapter is data (module paths), not code, in the spirit of pyvene's model cards. Adapters are
contributed through the ``sgm_arch_adapters`` plugin hook, so a new family needs no edit here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from lmms_sgm.plugins import collect


@dataclass(frozen=True)
class ArchAdapter:
    """Where the language-model decoder layers and their MLP projections live.

    ``layers_paths`` are tried in order (transformers 5 first, then 4.x), so one adapter serves
    both layouts. Every decoder layer of the language model is post-fusion in LLaVA-style models:
    image features are scattered into the token embeddings before layer 0.

    ``text_only``: the model reads text alone (a causal LM, AurA's setting): it is loaded with
    ``AutoModelForCausalLM`` and a tokenizer, and profiled on records without images.
    """

    name: str
    model_types: tuple[str, ...]
    layers_paths: tuple[str, ...]
    mlp: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    first_post_fusion_layer: int = 0
    text_config_attr: str = "text_config"
    text_only: bool = False
    extra: dict = field(default_factory=dict, compare=False)

    def layers_path(self, model: nn.Module) -> str:
        for path in self.layers_paths:
            if _has_path(model, path):
                return path
        raise ValueError(
            f"{type(model).__name__} has none of the decoder-layer paths {list(self.layers_paths)} "
            f"expected by the {self.name!r} adapter"
        )

    def num_layers(self, model: nn.Module) -> int:
        return len(get_module(model, self.layers_path(model)))

    def post_fusion_layers(self, model: nn.Module) -> list[int]:
        return list(range(self.first_post_fusion_layer, self.num_layers(model)))

    def mlp_path(self, model: nn.Module, layer: int) -> str:
        return f"{self.layers_path(model)}.{layer}.{self.mlp}"

    def text_config(self, config):
        return getattr(config, self.text_config_attr, config)


def get_module(root, path: str):
    """Resolve a dotted path on a module or an nnsight Envoy (digits index a ModuleList)."""
    obj = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def _has_path(root, path: str) -> bool:
    try:
        get_module(root, path)
        return True
    except (AttributeError, IndexError, KeyError, TypeError):
        return False


def adapters() -> list[ArchAdapter]:
    return collect("sgm_arch_adapters")


def adapter_for(model_or_config) -> ArchAdapter:
    """The adapter for a model (or its config), by ``config.model_type``."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    known = adapters()
    for adapter in known:
        if model_type in adapter.model_types:
            return adapter
    supported = sorted({t for a in known for t in a.model_types})
    raise ValueError(
        f"unsupported architecture model_type={model_type!r}; supported: {', '.join(supported)}. "
        "A plugin can add one through the 'sgm_arch_adapters' hook (see docs/extending.md)."
    )
