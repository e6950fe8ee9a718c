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

    ``layers_paths`` name the decoder's layer list (never the vision tower's: Qwen2.5-VL's vision
    blocks have gate/up/down MLPs too), tried in order (transformers 5 first, then 4.x), so one
    adapter serves both layouts. The list must hold as many layers as the text config says
    (``num_hidden_layers``), which catches a path that points at another stack.

    ``post_fusion`` names the rule that says which of those layers see image and text together
    (:data:`POST_FUSION_RULES`): ``"all"`` where the image features are written into the token
    embeddings before layer 0 (LLaVA, Qwen2-VL, Idefics3, Gemma 3); ``"cross_attention"`` where
    the image enters through cross-attention layers inside the decoder (Mllama): from the first
    cross-attention layer on. ``first_post_fusion_layer`` is a floor under either rule.

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
    post_fusion: str = "all"
    # True where a row's outputs depend on how many images the other rows of its batch hold, so
    # batches of requests must hold rows with one number of images (Mllama, see archs/mllama.py).
    batch_by_image_count: bool = False
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.post_fusion not in POST_FUSION_RULES:
            raise ValueError(f"adapter {self.name!r}: unknown post_fusion rule {self.post_fusion!r}; "
                             f"choose from {', '.join(POST_FUSION_RULES)}")

    def layers_path(self, model: nn.Module) -> str:
        for path in self.layers_paths:
            if _has_path(model, path):
                layers = get_module(model, path)
                config = getattr(model, "config", None)
                expected = None if config is None else getattr(self.text_config(config), "num_hidden_layers", None)
                if expected is not None and len(layers) != expected:
                    raise ValueError(
                        f"{type(model).__name__}.{path} holds {len(layers)} layers but the text config has "
                        f"num_hidden_layers={expected}: the {self.name!r} adapter points at another stack "
                        "(the vision tower?), not the language decoder")
                return path
        raise ValueError(
            f"{type(model).__name__} has none of the decoder-layer paths {list(self.layers_paths)} "
            f"expected by the {self.name!r} adapter"
        )

    def num_layers(self, model: nn.Module) -> int:
        return len(get_module(model, self.layers_path(model)))

    def post_fusion_layers(self, model: nn.Module) -> list[int]:
        """The decoder layers SGM may profile and change (``ProfileOptions.layers`` picks among them)."""
        n = self.num_layers(model)
        first = max(self.first_post_fusion_layer, POST_FUSION_RULES[self.post_fusion](self.text_config(model.config), n))
        return list(range(first, n))

    def mlp_path(self, model: nn.Module, layer: int) -> str:
        return f"{self.layers_path(model)}.{layer}.{self.mlp}"

    def text_config(self, config):
        return getattr(config, self.text_config_attr, config)


def _all_layers(text_config, num_layers: int) -> int:
    return 0


def _from_first_cross_attention(text_config, num_layers: int) -> int:
    layers = getattr(text_config, "cross_attention_layers", None)
    if not layers:
        raise ValueError("post_fusion='cross_attention' needs text_config.cross_attention_layers (the decoder "
                         "layers that attend to the image); this config lists none")
    return min(layers)


# How the first post-fusion layer is found, by rule name (ArchAdapter.post_fusion).
POST_FUSION_RULES = {
    # The image features are written into the token embeddings before layer 0: every layer sees them.
    "all": _all_layers,
    # The image enters through cross-attention layers inside the decoder (Mllama): the layers before
    # the first one see text only.
    "cross_attention": _from_first_cross_attention,
}


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
