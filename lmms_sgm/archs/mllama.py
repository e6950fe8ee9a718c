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

Batching: in transformers' implementation a text position with no image to attend to (text
before the first ``<|image|>``, or a whole row without images) gets a zero attention bias over
every vision token of the batch's image slots for its row, padded slots included, so it attends
to all of them uniformly (only its MLP output is masked). A row's outputs then depend on how many
image slots the batch pads it to: ``batch_by_image_count`` makes the lmms-eval wrapper batch only
requests with one number of images, so a request's result is the one it has alone (tiles are
always padded to ``max_image_tiles``, so image sizes do not matter). Profiling pairs hold one
image each. A batch without any image skips the cross-attention layers altogether: in nnsight
mode, whose edit needs every edited module to run, such requests are refused (hooks and fold
leave the skipped layers alone).

Trap for tiny random checkpoints: the tanh gates start at zero, so the image has no effect until
they are set (``lmms_sgm.tiny_families`` does).
"""
from lmms_sgm.archs import ArchAdapter
from lmms_sgm.plugins import hookimpl

MLLAMA = ArchAdapter(name="mllama", model_types=("mllama",), post_fusion="cross_attention", batch_by_image_count=True,
                     layers_paths=("model.language_model.layers",))


@hookimpl
def sgm_arch_adapters():
    return [MLLAMA]
