"""Sites: the places in a model where neurons are observed and scaled.

A site is one linear map's output units (``kind="output"``), or the input units of ``down_proj``
(``kind="input"``: the MLP intermediate activation ``act(gate(x)) * up(x)``). Its name is the
module path, plus ``.input`` for input sites; glasses store ``<name>.auroc`` / ``<name>.alpha``.
Gated steering reads a decoder layer's output, the residual stream after it
(``kind="layer_output"``, one unit per hidden dimension; :func:`layer_output_site`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from lmms_sgm.archs import adapter_for, get_module
from lmms_sgm.models import unwrap
from lmms_sgm.options import ProfileOptions, parse_layers


@dataclass(frozen=True)
class Site:
    name: str
    module_path: str
    kind: str  # "output" | "input" | "layer_output"
    layer: int
    module: str  # gate_proj | up_proj | down_proj | intermediate | layer
    width: int

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_sites(model, options: ProfileOptions) -> list[Site]:
    """Sites for ``options`` on ``model``, in forward order (nnsight requires that order)."""
    model = unwrap(model)
    adapter = adapter_for(model)
    post_fusion = adapter.post_fusion_layers(model)
    # 'all' is every post-fusion layer (all decoder layers but for Mllama's first ones).
    layers = post_fusion if str(options.layers).strip() == "all" else parse_layers(options.layers, adapter.num_layers(model))
    assert layers is not None  # parse_layers returns None only for 'all' of an unknown depth
    not_fused = sorted(set(layers) - set(post_fusion))
    if not_fused:
        raise ValueError(f"layers {not_fused} are not post-fusion layers of this model ({post_fusion[0]}-{post_fusion[-1]})")
    # Order inside a SwiGLU MLP: gate output, up output, down input, down output.
    order = [m for m in ("gate_proj", "up_proj", "intermediate", "down_proj") if m in options.modules]
    sites = []
    for layer in layers:
        mlp_path = adapter.mlp_path(model, layer)
        for m in order:
            attr = {"gate_proj": adapter.gate, "up_proj": adapter.up}.get(m, adapter.down)
            path = f"{mlp_path}.{attr}"
            try:
                linear = get_module(model, path)
            except AttributeError:
                raise ValueError(f"module {path} not found in {type(model).__name__} (adapter {adapter.name!r})") from None
            if m == "intermediate":
                sites.append(Site(f"{path}.input", path, "input", layer, m, linear.in_features))
            else:
                sites.append(Site(path, path, "output", layer, m, linear.out_features))
    return sites


def layer_output_site(model, layer: int) -> Site:
    """The output of decoder layer ``layer`` (negative: from the end), a post-fusion layer."""
    model = unwrap(model)
    adapter = adapter_for(model)
    post_fusion = adapter.post_fusion_layers(model)
    n = adapter.num_layers(model)
    resolved = layer + n if layer < 0 else layer
    if resolved not in post_fusion:
        raise ValueError(f"layer {layer} is not a post-fusion decoder layer of this model ({post_fusion[0]}-{post_fusion[-1]}, "
                         f"or -1 to -{len(post_fusion)} from the end)")
    path = f"{adapter.layers_path(model)}.{resolved}"
    width = getattr(adapter.text_config(model.config), "hidden_size", None)
    if not width:
        raise ValueError(f"the text config of {type(model).__name__} names no hidden_size")
    return Site(path, path, "layer_output", resolved, "layer", int(width))
