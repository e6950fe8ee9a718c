"""Qwen2-VL and Qwen2.5-VL.

The vision tower's merged patch features replace the ``<|image_pad|>`` tokens (between
``<|vision_start|>`` and ``<|vision_end|>``) in the token embeddings before the first decoder
layer: every decoder layer is post-fusion. The decoder is a Qwen2 model (SwiGLU MLPs, Linear
gate/up/down) with 3-D multimodal rotary positions (mrope) that the model computes itself from
``input_ids``, ``image_grid_thw`` and the attention mask: never pass ``position_ids``.

Trap: Qwen2.5-VL's vision blocks (``model.visual.blocks[i].mlp``) have gate/up/down projections
too; the adapter names the decoder's layer list, never a search for ``gate_proj``. Both
processors carry a video processor: without torchvision they load image-only.
"""
from lmms_sgm.archs import ArchAdapter
from lmms_sgm.plugins import hookimpl

_PATHS = ("model.language_model.layers",)  # transformers 5 (the vision tower is model.visual)

QWEN2_VL = ArchAdapter(name="qwen2_vl", model_types=("qwen2_vl",), layers_paths=_PATHS)
QWEN2_5_VL = ArchAdapter(name="qwen2_5_vl", model_types=("qwen2_5_vl",), layers_paths=_PATHS)


@hookimpl
def sgm_arch_adapters():
    return [QWEN2_VL, QWEN2_5_VL]
