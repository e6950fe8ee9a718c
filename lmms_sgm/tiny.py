"""Tiny, real checkpoints built offline from configs: a LLaVA, and a text-only Llama causal LM.

The result is saved with ``save_pretrained`` and read back through ``from_pretrained`` /
``AutoProcessor`` (``AutoTokenizer`` for the causal LM), exactly like a Hub checkpoint: tests and
the quick-start exercise the real loading path without any download. The same factory sizes the
trained demo model.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

IMAGE_TOKEN = "<image>"
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN]

# Llama-2-style turns written as plain words so that the word-level tokenizer keeps them whole; a
# system turn is its text alone, before the first USER: (as the LLaVA-1.5 template writes it).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% elif message['role'] == 'assistant' %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image> {% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %} </s> {% else %} {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

DEFAULT_WORDS = [
    "USER:",
    "ASSISTANT:",
    "a",
    "an",
    "the",
    "is",
    "are",
    "this",
    "that",
    "it",
    "what",
    "which",
    "how",
    "many",
    "colour",
    "color",
    "shape",
    "red",
    "green",
    "blue",
    "yellow",
    "white",
    "black",
    "circle",
    "square",
    "triangle",
    "cross",
    "one",
    "two",
    "three",
    "four",
    "left",
    "right",
    "top",
    "bottom",
    "picture",
    "image",
    "shows",
    "there",
    "here",
    "you",
    "your",
    "i",
    "think",
    "looks",
    "nice",
    "fine",
    "bad",
    "stupid",
    "idiot",
    "ugly",
    "hate",
    "good",
    "great",
    "answer",
    "question",
    "yes",
    "no",
    "sorry",
    "cannot",
    "help",
    "with",
    ".",
    ",",
    "?",
    "!",
]


def build_tokenizer(words=DEFAULT_WORDS, *, multimodal: bool = True):
    """A word-level tokenizer over ``words``. ``multimodal=False``: no image token and no chat
    template, as the tokenizer of a base (text-only) language model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = SPECIAL if multimodal else [t for t in SPECIAL if t != IMAGE_TOKEN]
    vocab = {tok: i for i, tok in enumerate(special)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    extra = {"extra_special_tokens": {"image_token": IMAGE_TOKEN}, "chat_template": CHAT_TEMPLATE} if multimodal else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        **extra,
    )


def _llama_config(tokenizer, *, hidden_size, intermediate_size, num_layers, num_heads, max_positions):
    """The Llama config of every tiny model here (the LLaVAs' text model, the causal LM)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _clip_llama_configs(tokenizer, *, hidden_size, intermediate_size, num_layers, num_heads, vision_hidden,
                        vision_layers, image_size, patch_size, max_positions):
    """The CLIP vision tower and Llama text model configs the tiny LLaVA families share."""
    from transformers import CLIPVisionConfig

    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 2,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
    )
    return vision, _llama_config(tokenizer, hidden_size=hidden_size, intermediate_size=intermediate_size,
                                 num_layers=num_layers, num_heads=num_heads, max_positions=max_positions)


def _save_tiny(path: Path, model, processor, tokenizer) -> Path:
    """Generation settings from the tokenizer, then model and processor saved as a Hub checkpoint is."""
    for k in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, k, getattr(tokenizer, k))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def build_tiny_llava(
    path: str | Path,
    *,
    words=DEFAULT_WORDS,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Build a random-init LLaVA (CLIP vision tower, Llama text model) and save it at ``path``.

    Returns the path; load it with ``transformers.AutoModelForImageTextToText.from_pretrained``
    and ``AutoProcessor.from_pretrained`` (or :func:`lmms_sgm.models.load`).
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = build_tokenizer(words)
    vision, text = _clip_llama_configs(
        tokenizer, hidden_size=hidden_size, intermediate_size=intermediate_size, num_layers=num_layers,
        num_heads=num_heads, vision_hidden=vision_hidden, vision_layers=vision_layers, image_size=image_size,
        patch_size=patch_size, max_positions=256)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(dtype).eval()
    image_processor = _image_processor_class()(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )
    return _save_tiny(Path(path), model, processor, tokenizer)


def build_tiny_llava_next(
    path: str | Path,
    *,
    words=DEFAULT_WORDS,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A random-init LLaVA-NeXT (another family: any-resolution tiling, an image newline token,
    ``image_sizes``; CLIP tower, Llama text model), saved at ``path`` like :func:`build_tiny_llava`.
    Its grid pinpoints are (1 x 1), (1 x 2) and (2 x 1) tiles of ``image_size``."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor

    tokenizer = build_tokenizer(words)
    vision, text = _clip_llama_configs(
        tokenizer, hidden_size=hidden_size, intermediate_size=intermediate_size, num_layers=num_layers,
        num_heads=num_heads, vision_hidden=vision_hidden, vision_layers=vision_layers, image_size=image_size,
        patch_size=patch_size, max_positions=512)
    pinpoints = [[image_size, image_size], [image_size, 2 * image_size], [2 * image_size, image_size]]
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                             image_grid_pinpoints=pinpoints, vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).to(dtype).eval()
    try:
        from transformers import LlavaNextImageProcessorPil as image_processor_class
    except ImportError:  # older transformers: the PIL processor had the plain name
        from transformers import LlavaNextImageProcessor as image_processor_class
    image_processor = image_processor_class(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size},
                                            image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=CHAT_TEMPLATE)
    return _save_tiny(Path(path), model, processor, tokenizer)


def build_tiny_causal_lm(
    path: str | Path,
    *,
    words=DEFAULT_WORDS,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 256,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Build a random-init Llama causal LM (no vision) with a word-level tokenizer and save it at
    ``path``: AurA's text-only setting in miniature. Load it with ``AutoModelForCausalLM`` /
    ``AutoTokenizer`` (or :func:`lmms_sgm.models.load`)."""
    from transformers import LlamaForCausalLM

    path = Path(path)
    tokenizer = build_tokenizer(words, multimodal=False)
    config = _llama_config(tokenizer, hidden_size=hidden_size, intermediate_size=intermediate_size, num_layers=num_layers,
                           num_heads=num_heads, max_positions=max_positions)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype).eval()
    return _save_tiny(path, model, tokenizer, tokenizer)  # the tokenizer is its processor


def random_image(seed: int, size: int = 32):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)


TOY_TOXIC = ("you stupid idiot", "i hate this ugly picture", "that is bad and stupid", "ugly idiot")
TOY_BENIGN = ("the picture shows a red circle", "this is a nice image", "i think it looks fine", "a blue square here")


def write_toy_texts(directory: str | Path, n: int = 16, *, seed: int = 0) -> Path:
    """Write image-less labelled texts (the pair schema without ``image``): AurA's text-only
    profiling data in miniature, for a text-only model. Returns the JSONL path."""
    import random

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = [{"text": rng.choice(TOY_TOXIC if i % 2 else TOY_BENIGN), "label": i % 2} for i in range(n)]
    out = directory / "texts.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def write_toy_pairs(directory: str | Path, n: int = 16, *, seed: int = 0, image_size: int = 32) -> Path:
    """Write a small labelled-pair dataset (JSONL + PNG folder) in the documented schema.

    Toxic responses use the tokenizer's insult words, non-toxic ones its neutral words, so a
    tiny random model still sees two distinguishable distributions. Returns the JSONL path.
    """
    import random

    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    toxic, benign = TOY_TOXIC, TOY_BENIGN
    rows = []
    for i in range(n):
        label = i % 2
        img = random_image(seed * 100003 + i, image_size)
        name = f"images/{i:05d}.png"
        img.save(directory / name)
        rows.append(
            {
                "image": name,
                "question": rng.choice(["what is this ?", "what do you think ?", "how many are there ?"]),
                "text": rng.choice(toxic if label else benign),
                "label": label,
                "category": "insult" if label else "none",
            }
        )
    out = directory / "pairs.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def _image_processor_class():
    # transformers 5 prefers a torchvision backend; the PIL one is the same maths and needs no
    # torchvision (whose only wheel here is a CUDA build that fails beside CPU torch).
    try:
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil
    except ImportError:
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor


def write_toy_validation(directory: str | Path, n: int = 4, *, seed: int = 0, image_size: int = 32) -> Path:
    """A validation split in the MM-TOXIC-QA layout (harmful.jsonl, benign.jsonl with reference
    answers for half, adv.jsonl, mmbench.tsv): what ``lmms-sgm tune --val`` reads, in miniature."""
    import base64
    import io

    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)

    def image(i: int) -> str:
        name = f"images/{i:05d}.png"
        random_image(seed * 100003 + 7919 + i, image_size).save(directory / name)
        return name

    harmful = [{"image": image(i), "question": "what do you think ?", "category": "insult", "harmful": 1} for i in range(n)]
    adv = [{"image": image(100 + i), "question": "what do you think ?", "category": "insult", "harmful": 1} for i in range(n)]
    benign = [{"image": image(200 + i), "question": "what colour is it ?" if i % 2 else "what do you think ?",
               "category": "colour" if i % 2 else "opinion", "harmful": 0, "answer": "red" if i % 2 else None}
              for i in range(n)]
    for name, rows in (("harmful", harmful), ("adv", adv), ("benign", benign)):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = ["index\tquestion\tA\tB\tanswer\timage"]
    for i in range(n):
        buf = io.BytesIO()
        random_image(seed * 100003 + 300 + i, image_size).save(buf, format="PNG")
        lines.append(f"{i}\twhat colour is it ?\tred\tblue\t{'AB'[i % 2]}\t{base64.b64encode(buf.getvalue()).decode()}")
    (directory / "mmbench.tsv").write_text("\n".join(lines) + "\n")
    return directory


def write_toy_twins(directory: str | Path, n: int = 4, *, seed: int = 0, image_size: int = 32) -> Path:
    """Twin records for ``lmms-sgm diagnose`` (lmms_sgm.diagnose.read_twins): a random image and
    the same image with a white square pasted in, the same question; every other record held out."""
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        img = random_image(seed * 100003 + 500 + i, image_size)
        twin = img.copy()
        twin.paste((255, 255, 255), (0, 0, image_size // 4, image_size // 4))
        img.save(directory / "images" / f"{i:05d}.png")
        twin.save(directory / "images" / f"{i:05d}_twin.png")
        rows.append({"image": f"images/{i:05d}.png", "question": "what do you think ?",
                     "twin_image": f"images/{i:05d}_twin.png"})
    out = directory / "twins.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out
