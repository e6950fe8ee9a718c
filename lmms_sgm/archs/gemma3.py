"""Gemma 3 (image-text models: ``Gemma3ForConditionalGeneration``).

A SigLIP tower and a pooling projector write ``mm_tokens_per_image`` soft tokens per image into
the token embeddings (the processor expands ``<start_of_image>`` into them) before the first
decoder layer: every decoder layer is post-fusion. Image tokens attend to each other both ways
(``token_type_ids``). The MLP is Gemma's: Linear gate/up/down with GELU-tanh, so the same sites
and the same weight folding apply.

Trap for tiny random checkpoints: ``mm_input_projection_weight`` starts at zero, so the image has
no effect until it is set (``lmms_sgm.tiny_families`` does).
"""
from lmms_sgm.archs import ArchAdapter
from lmms_sgm.plugins import hookimpl

GEMMA3 = ArchAdapter(name="gemma3", model_types=("gemma3",), layers_paths=("model.language_model.layers",))


@hookimpl
def sgm_arch_adapters():
    return [GEMMA3]
