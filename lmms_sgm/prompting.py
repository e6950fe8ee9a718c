"""Chat prompts and processor inputs for every family, built by the family's own processor.

The one place where a prompt is written and encoded: profiling (``data.encode_batch``), the
lmms-eval wrapper, self-labelling and the demo tools all come through here, so a family's quirks
are handled once:

* a user turn is a list of content items (``{"type": "image"}``, ``{"type": "video"}``,
  ``{"type": "text"}``) rendered by the processor's chat template: the family decides where its
  image tokens go (``<image>``, ``<|vision_start|><|image_pad|><|vision_end|>``,
  ``<start_of_image>``, ``<|image|>``...); no token is ever written here;
* image placeholders that lmms-eval tasks put in their text (MMMU's ``<image 1>``, the LLaVA
  convention ``<image>``) become image items at their place, so families whose template renders
  content in order (Qwen2-VL, Idefics3, Gemma 3, Mllama) get interleaved prompts, and the others
  (LLaVA-NeXT, -OneVision: images first) get what their template makes of it (:func:`content`);
* :func:`encode` gives the processor each row's images as a list of their own (what Mllama,
  Gemma 3 and LLaVA-OneVision's multi-image mode need; every family accepts it), leaves out
  ``images`` for a text-only batch, and does not add a second BOS token when the chat template
  already wrote one (Llama 3, Gemma and Idefics3 tokenizers add one on encoding);
* videos go to the processor's video processor, or are refused with the reason
  (:func:`lmms_sgm.processors.require_video`).
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE, VIDEO, TEXT = "image", "video", "text"
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpeg", ".mpg", ".flv", ".wmv")
NUMBERED = re.compile(r"<image (\d+)>")  # MMMU-style: <image 1> is the task's first visual
BARE = "<image>"  # the LLaVA convention: one per visual, in order


@dataclass
class Prompt:
    """One request made ready for the processor: the rendered chat text and its visuals, in the
    order their items appear in the text."""

    text: str
    images: list = field(default_factory=list)
    videos: list = field(default_factory=list)


def classify(visual) -> tuple[str, Any]:
    """``(kind, value)`` of one visual as lmms-eval tasks give them: a PIL image, a path to an
    image file, or a path to a video file."""
    from PIL import Image

    if isinstance(visual, Image.Image):
        return IMAGE, visual.convert("RGB")
    if isinstance(visual, (str, Path)):
        path = str(visual)
        if path.lower().endswith(VIDEO_SUFFIXES):
            return VIDEO, path
        with Image.open(path) as image:
            return IMAGE, image.convert("RGB")
    what = "audio" if isinstance(visual, dict) and "array" in visual else type(visual).__name__
    raise TypeError(f"a visual of type {what} cannot be given to an image-text model (images and videos only)")


def content(text: str, kinds: Sequence[str]) -> tuple[list[dict], list[int]]:
    """The content items of one user turn holding ``text`` and visuals of ``kinds``, and which
    visual each visual item is (indices into ``kinds``, in item order).

    - ``<image k>`` placeholders (every k in 1..n) put visual k there; a visual named twice
      appears twice;
    - otherwise, as many bare ``<image>`` as visuals put them there in order;
    - visuals no placeholder names go first, before the text (lmms-eval's convention for tasks
      that place none). Bare ``<image>`` that do not match the visuals are removed with a warning:
      left in the text, a processor whose image token is ``<image>`` would expand them.
    """
    n = len(kinds)
    numbered = [int(k) for k in NUMBERED.findall(text)]
    refs: list[int] | None = None
    pattern = None
    if numbered and all(1 <= k <= n for k in numbered):
        refs, pattern = [k - 1 for k in numbered], NUMBERED
    elif n and text.count(BARE) == n:
        refs, pattern = list(range(n)), re.compile(re.escape(BARE))
    elif BARE in text:
        warnings.warn(f"the request's text holds {text.count(BARE)} '{BARE}' for {n} visual(s); they are removed and "
                      "the visuals put before the text", stacklevel=2)
        text = text.replace(BARE, "")
    if refs is None:
        order = list(range(n))
        return [{"type": kinds[i]} for i in order] + [{"type": TEXT, "text": text}], order
    assert pattern is not None  # set with refs
    parts = pattern.split(text)[::2] if pattern is NUMBERED else pattern.split(text)  # NUMBERED captures k
    order = [i for i in range(n) if i not in refs]
    items = [{"type": kinds[i]} for i in order]
    for k, part in enumerate(parts):
        if part:
            items.append({"type": TEXT, "text": part})
        if k < len(refs):
            items.append({"type": kinds[refs[k]]})
            order.append(refs[k])
    return items, order


def render(processor, messages: list[dict], *, add_generation_prompt: bool) -> str:
    """The chat template's text for ``messages`` (not tokenized)."""
    if getattr(processor, "chat_template", None) is None:
        raise ValueError(f"{type(processor).__name__} has no chat template; prompts are always built with the model's own")
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def request_prompt(processor, text: str, visuals: Sequence = (), system: str | None = None) -> Prompt:
    """One user turn (``text`` with ``visuals``: PIL images, image paths, video paths), ready
    for the answer; ``system``: a system turn before it (the template decides how it is shown)."""
    classified = [classify(v) for v in visuals]
    kinds = [kind for kind, _ in classified]
    items, order = content(text, kinds)
    messages = [{"role": "user", "content": items}]
    if system:
        messages.insert(0, {"role": "system", "content": [{"type": TEXT, "text": system}]})
    prompt = Prompt(render(processor, messages, add_generation_prompt=True))
    for i in order:
        kind, value = classified[i]
        (prompt.videos if kind == VIDEO else prompt.images).append(value)
    if prompt.videos:
        from lmms_sgm.processors import require_video

        require_video(processor, "the request")
    return prompt


def encode(processor, texts: Sequence[str], images: Sequence[Sequence] | None = None,
           videos: Sequence[Sequence] | None = None, *, padding_side: str = "right"):
    """Processor-encode a padded batch: ``images[i]`` (and ``videos[i]``) are row i's visuals,
    in the order of their items in ``texts[i]``.

    Right padding by default, whatever the tokenizer's own setting: in a forward pass every row
    then keeps the positions it has alone, for any family (1-D rotary, Qwen2-VL's 3-D mrope) and
    without ``position_ids``; causal attention keeps the pads out of the real tokens. Left padding
    is for ``generate``, which derives the positions from the attention mask.
    """
    texts = list(texts)
    kwargs: dict = {"text": texts, "return_tensors": "pt", "padding": True, "padding_side": padding_side}
    if images is not None and any(len(row) for row in images):
        kwargs["images"] = [list(row) for row in images]
    if videos is not None and any(len(row) for row in videos):
        from lmms_sgm.processors import require_video

        require_video(processor, "the batch")
        kwargs["videos"] = [v for row in videos for v in row]
    bos = getattr(processor.tokenizer, "bos_token", None)
    if bos and texts and all(t.startswith(bos) for t in texts):
        kwargs["add_special_tokens"] = False  # the chat template wrote the BOS: no second one
    return processor(**kwargs)


def extended(extras: dict, length: int) -> dict:
    """``extras`` for a sequence continued to ``length`` tokens, as ``generate`` continues them:
    per-token type ids (Qwen2-VL's ``mm_token_type_ids``) grow with text (0) tokens, a per-token
    cross-attention mask (Mllama's) repeats its last row; the rest is per image."""
    import torch

    out = dict(extras)
    t = extras.get("mm_token_type_ids")
    if t is not None and t.shape[-1] < length:
        out["mm_token_type_ids"] = torch.cat([t, t.new_zeros(*t.shape[:-1], length - t.shape[-1])], -1)
    c = extras.get("cross_attention_mask")
    if c is not None and c.shape[1] < length:
        out["cross_attention_mask"] = torch.cat([c, c[:, -1:].expand(-1, length - c.shape[1], *c.shape[2:])], 1)
    return out


def to_model(enc, model):
    """``enc`` on the model's device, its floating-point tensors (pixel values) in the model's dtype.

    A model on the meta device (a remote one: its weights are on the server) gets CPU tensors,
    which nnsight sends."""
    param = next(model.parameters())
    import torch

    device = torch.device("cpu") if param.device.type == "meta" else param.device
    return {k: (v.to(device, param.dtype) if v.is_floating_point() else v.to(device)) if hasattr(v, "to") else v
            for k, v in enc.items()}
