"""Tiny, real checkpoints of every supported family, built offline from configs.

Each builder makes a random-init model of one family (its own config class, vision tower and
decoder), a byte-level BPE tokenizer carrying the family's special tokens, the family's processor
(its own image processor, in the PIL form that needs no torchvision) and a chat template written
in the family's own turn format, and saves them with ``save_pretrained``. Loading them back goes
through ``lmms_sgm.models.load`` (``from_pretrained`` / ``AutoProcessor``) exactly as a Hub
checkpoint would. ``build(family, path)`` dispatches; :data:`FAMILIES` lists the names.

Three things a random init would otherwise hide:

* Gemma 3 initialises its image projection (``mm_input_projection_weight``) to zeros and Mllama
  its cross-attention tanh gates to zeros: the image then has no effect on the logits. The
  builders give them random values, so tests about image positions and post-fusion layers mean
  something (``tests/test_families.py`` checks that the image changes the logits).
* Processors that carry a video processor (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision) are saved
  with their video processor's entry in ``processor_config.json`` as a Hub checkpoint has it
  (written as JSON: the class itself needs torchvision to exist), so that loading meets what
  users meet: ``AutoProcessor`` fails without torchvision, ``lmms_sgm.processors`` loads the
  processor image-only.
* Tokenizers whose family adds a BOS token on encoding (Llama 3, Gemma) do so here too, while
  their chat templates also write it: prompts must be encoded without a second BOS
  (``lmms_sgm.prompting.encode``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from lmms_sgm import tiny

# Words the BPE is trained on (the toy pairs, the tasks' samples): common words become one token.
CORPUS = " ".join(tiny.DEFAULT_WORDS) + (
    " is there a dog in the image ? please answer yes or no . which option is correct ? answer with the "
    "option's letter from the given choices directly . describe the picture . what do you think of it ? "
    "you stupid idiot , i hate this ugly picture . the picture shows a red circle . this is a nice image ."
)
VOCAB_SIZE = 400
HIDDEN, INTERMEDIATE, HEADS = 32, 64, 4
IMAGE_SIZE, PATCH = 32, 8


# ---------------------------------------------------------------- tokenizers


def bpe_tokenizer(special: list[str], *, bos: str | None, eos: str, pad: str, add_bos: bool = False,
                  named: dict[str, str] | None = None, chat_template: str | None = None):
    """A byte-level BPE (any text encodes and decodes) over :data:`CORPUS`, with ``special`` tokens
    first. ``add_bos``: the tokenizer puts ``bos`` before every encoded text, as Llama 3's and
    Gemma's do. ``named``: extra special tokens by attribute (``image_token`` ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS] * 4, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    kwargs = {"bos_token": bos} if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad, padding_side="left",
                                   extra_special_tokens=named or {}, chat_template=chat_template, **kwargs)


def _ids(tokenizer, *tokens: str) -> list[int]:
    """The ids of special tokens the config must name (an unknown one would be a silent bug)."""
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    missing = [t for t, i in zip(tokens, ids) if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise ValueError(f"tokens {missing} are not in the tokenizer")
    return ids


def _generation(model, tokenizer) -> None:
    gc = model.generation_config
    gc.pad_token_id, gc.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    gc.bos_token_id = tokenizer.bos_token_id


def _llama(tokenizer, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                       num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                       max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **kw)


def _qwen2(tokenizer):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                       num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=2,
                       max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def _clip(**kw):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=2,
                            num_attention_heads=HEADS, image_size=IMAGE_SIZE, patch_size=PATCH,
                            projection_dim=HIDDEN, **kw)


def _siglip(**kw):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=2,
                              num_attention_heads=HEADS, image_size=IMAGE_SIZE, patch_size=PATCH, **kw)


def _save(path, model, processor, *, video_processor: dict | None = None) -> Path:
    """Save like a Hub checkpoint; ``video_processor``: that entry of processor_config.json."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    if video_processor is not None:
        cfg_file = path / "processor_config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg["video_processor"] = video_processor
        cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return path


def _image_only(cls):
    from lmms_sgm.processors import image_only_class

    return image_only_class(cls)


# ---------------------------------------------------------------- chat templates (each family's turn format)

def _items(image: str, video: str | None = None, *, text: str = "{{ c['text'] }}") -> str:
    """Jinja for a message's content list rendered in place: images, videos and text in order."""
    vid = f"{{% elif c['type'] == 'video' %}}{video}" if video else ""
    return (f"{{% if m['content'] is string %}}{{{{ m['content'] }}}}{{% else %}}{{% for c in m['content'] %}}"
            f"{{% if c['type'] == 'image' %}}{image}{vid}{{% elif c['type'] == 'text' %}}{text}{{% endif %}}"
            f"{{% endfor %}}{{% endif %}}")


def _images_first(image: str, video: str | None = None, sep: str = "") -> str:
    """Jinja for LLaVA-NeXT/OneVision: all images (then videos) first, then all texts."""
    vids = (f"{{% for c in m['content'] | selectattr('type', 'equalto', 'video') %}}{video}{{% endfor %}}"
            if video else "")
    return (f"{{% if m['content'] is string %}}{{{{ m['content'] }}}}{{% else %}}"
            f"{{% for c in m['content'] | selectattr('type', 'equalto', 'image') %}}{image}{{% endfor %}}{vids}"
            f"{{% for c in m['content'] | selectattr('type', 'equalto', 'text') %}}{sep}{{{{ c['text'] }}}}{{% endfor %}}"
            f"{{% endif %}}")


LLAVA_NEXT_TEMPLATE = (  # llava-v1.6-mistral
    "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {% else %} {% endif %}"
    + _images_first("<image>\n") + "{% if m['role'] == 'user' %} [/INST]{% else %}</s>{% endif %}{% endfor %}"
)
CHATML_ONEVISION = (  # llava-onevision-qwen2
    "{% for m in messages %}<|im_start|>{{ m['role'] }} " + _images_first("<image>", "<video>", "{{ '\\n' }}")
    + "<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_VL_TEMPLATE = (  # Qwen2-VL / Qwen2.5-VL, with their default system turn
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n"
    + _items("<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>")
    + "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>{% for m in messages %}{{ m['role'] | capitalize }}"
    "{% if m['content'] is not string and m['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    + _items("<image>") + "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "<start_of_turn>{{ role }}\n" + _items("<start_of_image>", text="{{ c['text'] | trim }}")
    + "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
MLLAMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    + _items("<|image|>") + "<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


# ---------------------------------------------------------------- families


def build_llava_next(path, seed: int = 0) -> Path:
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    tok = bpe_tokenizer(["<unk>", "<s>", "</s>", "<image>"], bos="<s>", eos="</s>", pad="<unk>", add_bos=True,
                        named={"image_token": "<image>"}, chat_template=LLAVA_NEXT_TEMPLATE)
    pinpoints = [[32, 32], [32, 64], [64, 32]]
    config = LlavaNextConfig(vision_config=_clip(), text_config=_llama(tok), image_token_index=tok.image_token_id,
                             image_grid_pinpoints=pinpoints, vision_feature_layer=-1,
                             vision_feature_select_strategy="default", image_seq_length=(IMAGE_SIZE // PATCH) ** 2)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    _generation(model, tok)
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                                 image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=PATCH,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=LLAVA_NEXT_TEMPLATE)
    return _save(path, model, processor)


def build_llava_onevision(path, seed: int = 0) -> Path:
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionProcessor,
    )

    tok = bpe_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"], bos=None,
                        eos="<|im_end|>", pad="<|endoftext|>", named={"image_token": "<image>", "video_token": "<video>"},
                        chat_template=CHATML_ONEVISION)
    pinpoints = [[32, 32], [32, 64], [64, 32]]
    config = LlavaOnevisionConfig(vision_config=_siglip(vision_use_head=False), text_config=_qwen2(tok),
                                  image_token_index=tok.image_token_id, video_token_index=tok.video_token_id,
                                  image_grid_pinpoints=pinpoints, vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_1")
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    _generation(model, tok)
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                                      image_grid_pinpoints=pinpoints)
    processor = _image_only(LlavaOnevisionProcessor)(
        image_processor=image_processor, tokenizer=tok, num_image_tokens=(IMAGE_SIZE // PATCH) ** 2,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_1", chat_template=CHATML_ONEVISION)
    video = {"video_processor_type": "LlavaOnevisionVideoProcessor", "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
             "processor_class": "LlavaOnevisionProcessor"}
    return _save(path, model, processor, video_processor=video)


def _qwen_tokenizer():
    return bpe_tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
        bos=None, eos="<|im_end|>", pad="<|endoftext|>",
        named={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
               "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"},
        chat_template=QWEN_VL_TEMPLATE)


def _qwen_vl(path, seed, *, v25: bool) -> Path:
    import transformers

    name = "Qwen2_5_VL" if v25 else "Qwen2VL"
    tok = _qwen_tokenizer()
    head_dim = HIDDEN // HEADS
    text = dict(
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8],
        },
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    # Three vision blocks against two decoder layers: an adapter pointing at the vision blocks (whose
    # Qwen2.5-VL MLPs have gate/up/down too) is refused by its layer count.
    vision = dict(depth=3, hidden_size=HIDDEN, num_heads=HEADS, patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2)
    if v25:
        vision.update(intermediate_size=INTERMEDIATE, out_hidden_size=HIDDEN, window_size=2 * PATCH * 2, fullatt_block_indexes=[1])
    else:
        vision.update(embed_dim=HIDDEN, mlp_ratio=2)
    image_token_id, video_token_id, start, end = _ids(tok, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    config = getattr(transformers, f"{name}Config")(
        text_config=text, vision_config=vision, image_token_id=image_token_id, video_token_id=video_token_id,
        vision_start_token_id=start, vision_end_token_id=end)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{name}ForConditionalGeneration")(config).eval()
    _generation(model, tok)
    pixels = {"min_pixels": IMAGE_SIZE * IMAGE_SIZE, "max_pixels": IMAGE_SIZE * IMAGE_SIZE}
    image_processor = transformers.Qwen2VLImageProcessorPil(
        patch_size=PATCH,
        temporal_patch_size=2,
        merge_size=2,
        size={"shortest_edge": pixels["min_pixels"], "longest_edge": pixels["max_pixels"]},
    )
    processor = _image_only(getattr(transformers, f"{name}Processor"))(image_processor=image_processor, tokenizer=tok,
                                                                       chat_template=QWEN_VL_TEMPLATE)
    video = {"video_processor_type": "Qwen2VLVideoProcessor", "patch_size": PATCH, "temporal_patch_size": 2, "merge_size": 2,
             "size": {"shortest_edge": pixels["min_pixels"], "longest_edge": pixels["max_pixels"]},
             "processor_class": f"{name}Processor"}
    return _save(path, model, processor, video_processor=video)


def build_qwen2_vl(path, seed: int = 0) -> Path:
    return _qwen_vl(path, seed, v25=False)


def build_qwen2_5_vl(path, seed: int = 0) -> Path:
    return _qwen_vl(path, seed, v25=True)


IDEFICS3_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<fake_token_around_image>",
                   "<image>", "<end_of_utterance>", "<global-img>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]


def build_idefics3(path, seed: int = 0) -> Path:
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        Idefics3VisionConfig,
    )

    tok = bpe_tokenizer(IDEFICS3_TOKENS, bos="<|begin_of_text|>", eos="<end_of_utterance>", pad="<|finetune_right_pad_id|>",
                        add_bos=True, chat_template=IDEFICS3_TEMPLATE)
    scale = 2
    vision = Idefics3VisionConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=2,
                                  num_attention_heads=HEADS, image_size=IMAGE_SIZE, patch_size=PATCH)
    config = Idefics3Config(vision_config=vision, text_config=_llama(tok), image_token_id=_ids(tok, "<image>")[0],
                            scale_factor=scale, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    _generation(model, tok)
    # Images are resized to at most 64 px and split into 32 px tiles plus a global view: tiles stay tiny.
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 2 * IMAGE_SIZE}, max_image_size={"longest_edge": IMAGE_SIZE},
                                                do_image_splitting=True)
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok,
                                  image_seq_len=(IMAGE_SIZE // PATCH) ** 2 // scale ** 2, chat_template=IDEFICS3_TEMPLATE)
    return _save(path, model, processor)


def build_gemma3(path, seed: int = 0) -> Path:
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        Gemma3TextConfig,
    )

    tok = bpe_tokenizer(["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                         "<end_of_image>", "<image_soft_token>"], bos="<bos>", eos="<eos>", pad="<pad>", add_bos=True,
                        named={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
                        chat_template=GEMMA3_TEMPLATE)
    tokens_per_image = 4
    text = Gemma3TextConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=2,
                            num_attention_heads=HEADS, num_key_value_heads=2, head_dim=HIDDEN // HEADS, sliding_window=16,
                            max_position_embeddings=512, query_pre_attn_scalar=HIDDEN // HEADS,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    boi, eoi, image = _ids(tok, "<start_of_image>", "<end_of_image>", "<image_soft_token>")
    config = Gemma3Config(text_config=text, vision_config=_siglip(vision_use_head=False), mm_tokens_per_image=tokens_per_image,
                          boi_token_index=boi, eoi_token_index=eoi, image_token_index=image)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    # Trap: the projection starts at zero, so image tokens carry nothing at random init.
    with torch.no_grad():
        proj = model.model.multi_modal_projector.mm_input_projection_weight
        proj.copy_(torch.randn_like(proj) * 0.5)
    _generation(model, tok)
    image_processor = Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tok, image_seq_length=tokens_per_image,
                                chat_template=GEMMA3_TEMPLATE)
    return _save(path, model, processor)


MLLAMA_CROSS_ATTENTION_LAYERS = [1]  # of 3: layer 0 is pre-fusion, layers 1-2 post-fusion


def build_mllama(path, seed: int = 0) -> Path:
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessorPil, MllamaProcessor

    tok = bpe_tokenizer(["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                         "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>"],
                        bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|finetune_right_pad_id|>", add_bos=True,
                        named={"image_token": "<|image|>"}, chat_template=MLLAMA_TEMPLATE)
    max_tiles = 2
    vision = dict(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=2, num_global_layers=1,
                  attention_heads=HEADS, image_size=IMAGE_SIZE, patch_size=PATCH, max_num_tiles=max_tiles,
                  intermediate_layers_indices=[0], vision_output_dim=2 * HIDDEN,
                  supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]])
    text = dict(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=3,
                num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=512,
                cross_attention_layers=MLLAMA_CROSS_ATTENTION_LAYERS,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=_ids(tok, "<|image|>")[0])
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(config).eval()
    # Trap: the cross-attention tanh gates start at zero, so the image has no effect at random init.
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            for name in ("cross_attn_attn_gate", "cross_attn_mlp_gate"):
                if hasattr(layer, name):
                    getattr(layer, name).fill_(1.0)
    _generation(model, tok)
    image_processor = MllamaImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, max_image_tiles=max_tiles)
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tok, chat_template=MLLAMA_TEMPLATE)
    return _save(path, model, processor)


FAMILIES = {
    "llava": lambda path, seed=0: tiny.build_tiny_llava(path, seed=seed),
    "llava_next": build_llava_next,
    "llava_onevision": build_llava_onevision,
    "qwen2_vl": build_qwen2_vl,
    "qwen2_5_vl": build_qwen2_5_vl,
    "idefics3": build_idefics3,
    "gemma3": build_gemma3,
    "mllama": build_mllama,
}


def build(family: str, path, seed: int = 0) -> Path:
    """A tiny checkpoint of ``family`` (a key of :data:`FAMILIES`) saved at ``path``."""
    try:
        builder = FAMILIES[family]
    except KeyError:
        raise ValueError(f"no tiny builder for {family!r}; known: {', '.join(FAMILIES)}") from None
    return builder(path, seed=seed)
