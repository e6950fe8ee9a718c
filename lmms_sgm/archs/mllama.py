"""Mllama (Llama 3.2 Vision).

Unlike the other families, the image is not written into the token sequence: the decoder's
layer list holds self-attention layers and, at ``text_config.cross_attention_layers``,
cross-attention layers whose queries are the text positions and whose keys are the vision
features (text tokens after an ``<|image|>`` token attend to that image). The layers before the
first cross-attention layer never see the image, so post-fusion is **from the first
cross-attention layer on** (``post_fusion="cross_attention"``): every layer from there, self- or
cross-attention, carries image information in its hidden states. Every layer has the same MLP
(Linear gate/up/down, SwiGLU); in a cross-attention layer its output is scaled by the tanh gate
``cross_attn_mlp_gate`` before the residual, which does not change what a neuron is.

Trap for tiny random checkpoints: the tanh gates start at zero, so the image has no effect until
they are set (``lmms_sgm.tiny_families`` does).
"""
from lmms_sgm.archs import ArchAdapter
from lmms_sgm.plugins import hookimpl

MLLAMA = ArchAdapter(name="mllama", model_types=("mllama",), post_fusion="cross_attention",
                     layers_paths=("model.language_model.layers",))


@hookimpl
def sgm_arch_adapters():
    return [MLLAMA]
