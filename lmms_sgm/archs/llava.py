"""The LLaVA family: llava (1.5), llava_next (1.6) and llava_onevision.

A CLIP/SigLIP tower and a projector write the image features into the token embeddings (the
``<image>`` positions, expanded by the processor) before the first decoder layer, so every decoder
layer is post-fusion. The decoder is a Llama, Mistral, Vicuna or Qwen2 model with SwiGLU MLPs
(gate/up/down, Linear). LLaVA-OneVision's processor carries a video processor: without
torchvision it loads image-only (``lmms_sgm.processors``).
"""
from lmms_sgm.archs import ArchAdapter
from lmms_sgm.plugins import hookimpl

_PATHS = (
    "model.language_model.layers",  # transformers 5
    "language_model.model.layers",  # transformers 4.x
)

LLAVA = ArchAdapter(name="llava", model_types=("llava",), layers_paths=_PATHS)
LLAVA_NEXT = ArchAdapter(name="llava_next", model_types=("llava_next",), layers_paths=_PATHS)
LLAVA_ONEVISION = ArchAdapter(
    name="llava_onevision", model_types=("llava_onevision",), layers_paths=_PATHS
)


@hookimpl
def sgm_arch_adapters():
    return [LLAVA, LLAVA_NEXT, LLAVA_ONEVISION]
