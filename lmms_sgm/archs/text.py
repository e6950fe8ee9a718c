"""Text-only decoders (AurA's setting): causal LMs whose layers are ``model.layers[i]`` with a
SwiGLU MLP ``mlp.gate_proj / up_proj / down_proj`` (Llama, Mistral, Qwen2/3, Gemma 1/2).

Families with other MLP names (GPT-2's ``c_fc``/``c_proj``, Phi-3's fused ``gate_up_proj``) need
an adapter of their own (docs/extending.md). ``tests/test_text_only.py`` builds each listed
family from a tiny config and checks the paths.
"""
from lmms_sgm.archs import ArchAdapter
from lmms_sgm.plugins import hookimpl

_PATHS = ("model.layers",)

TEXT_DECODERS = ArchAdapter(
    name="text_decoder",
    model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"),
    layers_paths=_PATHS,
    text_only=True,
)


@hookimpl
def sgm_arch_adapters():
    return [TEXT_DECODERS]
