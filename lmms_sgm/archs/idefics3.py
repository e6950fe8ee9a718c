"""Idefics3 (and SmolVLM, which shares its layout).

A SigLIP tower, pixel shuffle and a connector write the features of each image tile into the
``<image>`` tokens (the processor expands one ``<image>`` into tiles: ``<fake_token_around_image>``,
``<row_i_col_j>`` and ``image_seq_len`` ``<image>`` tokens per tile, plus a global view) before
the first decoder layer: every decoder layer is post-fusion. The decoder is a Llama (SwiGLU,
Linear gate/up/down) at ``model.text_model``, not ``model.language_model``. SmolVLM's processor
carries a video processor: without torchvision it loads image-only.
"""
from lmms_sgm.archs import ArchAdapter
from lmms_sgm.plugins import hookimpl

IDEFICS3 = ArchAdapter(name="idefics3", model_types=("idefics3", "smolvlm"),
                       layers_paths=("model.text_model.layers",))


@hookimpl
def sgm_arch_adapters():
    return [IDEFICS3]
