"""The LLaVA family: llava, llava_next, llava_onevision (Llama/Qwen2-style SwiGLU MLPs)."""
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
