"""Every family beyond LLaVA-1.5 on its tiny checkpoint (``lmms_sgm.tiny_families``: its own
config, image processor, tokenizer and chat template, saved and loaded back like a Hub checkpoint).

What is written out here, per family, independently of the adapters: where the decoder layers
are in transformers 5.24, which of them are post-fusion, and the image token. Profiling is checked
against plain forward hooks on those modules with inputs from HF's own chat-template tokenization;
the apply modes against plain hooks scaling outputs by the alphas read from the safetensors file.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from unittest import mock

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoProcessor

from conftest import FAMILIES
from lmms_sgm import archs, models, processors, prompting, selflabel, tiny
from lmms_sgm.archs import ArchAdapter
from lmms_sgm.interventions import GlassesMismatch, SafetyGlasses
from lmms_sgm.options import ProfileOptions, SelectionOptions
from lmms_sgm.pipeline import build_glasses
from lmms_sgm.plugins import hookimpl, plugin_manager
from lmms_sgm.profiling import profile
from lmms_sgm.sites import resolve_sites

# transformers 5.24: the language decoder's layer list, and its post-fusion layers.
DECODER = {
    "llava_next": ("model.language_model.layers", (0, 1)),
    "llava_onevision": ("model.language_model.layers", (0, 1)),
    "qwen2_vl": ("model.language_model.layers", (0, 1)),
    "qwen2_5_vl": ("model.language_model.layers", (0, 1)),
    "idefics3": ("model.text_model.layers", (0, 1)),
    "gemma3": ("model.language_model.layers", (0, 1)),
    "mllama": ("model.language_model.layers", (1, 2)),  # layer 0 precedes the first cross-attention layer
}
# The token whose positions carry the image (Mllama: the one after which text attends to it).
IMAGE_TOKEN = {"llava_next": "<image>", "llava_onevision": "<image>", "qwen2_vl": "<|image_pad|>",
               "qwen2_5_vl": "<|image_pad|>", "idefics3": "<image>", "gemma3": "<image_soft_token>", "mllama": "<|image|>"}
WITH_VIDEO_PROCESSOR = {"llava_onevision", "qwen2_vl", "qwen2_5_vl"}
MODULES = ("gate_proj", "up_proj", "intermediate", "down_proj")
MODES = ("hooks", "fold", "nnsight")
N_NEW = 4
GEN = {"max_new_tokens": N_NEW, "min_new_tokens": N_NEW, "do_sample": False, "output_logits": True,
       "return_dict_in_generate": True}


def site_paths(family: str) -> list[str]:
    path, layers = DECODER[family]
    out = []
    for layer in layers:
        mlp = f"{path}.{layer}.mlp"
        out += [f"{mlp}.gate_proj", f"{mlp}.up_proj", f"{mlp}.down_proj.input", f"{mlp}.down_proj"]
    return out


# ---------------------------------------------------------------- fixtures (one family at a time)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def mp(family, family_dir):
    """The family's model and processor; tests that change the model restore it (checked)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", processors.ImageOnlyProcessorWarning)
        return models.load(str(family_dir(family)))


@pytest.fixture(scope="module")
def pristine(mp):
    return {k: v.clone() for k, v in mp[0].state_dict().items()}


@pytest.fixture(scope="module")
def glasses(mp, toy_jsonl, tmp_path_factory, pristine):
    """det0 over every module kind: strong enough to change greedy generations."""
    out = tmp_path_factory.mktemp("family_glasses") / "g"
    build_glasses(mp[0], mp[1], toy_jsonl, ProfileOptions(modules=MODULES), SelectionOptions(rule="det0", top_k=40),
                  out=out, progress=False)
    return SafetyGlasses.load(out), out


@pytest.fixture(autouse=True)
def _model_restored(request):
    yield
    if "mp" not in request.fixturenames or "pristine" not in request.fixturenames:
        return
    model = request.getfixturevalue("mp")[0]
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in request.getfixturevalue("pristine").items()), "weights not restored"
    hooks = [n for n, m in model.named_modules()
             for h in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
             if not getattr(h, "__module__", "").startswith("transformers.")]
    assert not hooks, f"hooks left on the model: {hooks[:3]}"


def hf_inputs(processor, items, *, generation_prompt=True):
    """HF's own path: ``apply_chat_template(tokenize=True)`` with the images in the messages."""
    return processor.apply_chat_template([{"role": "user", "content": items}], tokenize=True, return_dict=True,
                                         return_tensors="pt", add_generation_prompt=generation_prompt)


# ---------------------------------------------------------------- loading, prompts


def test_checkpoint_loads_like_a_hub_checkpoint(family, family_dir, monkeypatch):
    """AutoProcessor fails without torchvision where the processor carries a video processor (the
    real trap); load_processor then loads it image-only, warning once."""
    path = str(family_dir(family))
    monkeypatch.setattr(processors, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, processor = models.load(path)
        models.load(path)
    image_only = [w for w in caught if issubclass(w.category, processors.ImageOnlyProcessorWarning)]
    assert type(model).__name__.endswith("ForConditionalGeneration")
    assert processor.chat_template
    if family in WITH_VIDEO_PROCESSOR:
        with pytest.raises(ImportError, match="requires the Torchvision library"):
            AutoProcessor.from_pretrained(path)
        assert len(image_only) == 1 and "loaded image-only" in str(image_only[0].message)
        assert type(processor).__name__ == type(processor).__mro__[1].__name__  # the real class's name
        assert getattr(processor, "video_processor", None) is None
        with pytest.raises(processors.VideoUnsupported, match=r"without its video processor .*torchvision"):
            prompting.request_prompt(processor, "what happens ?", ["clip.mp4"])
    else:
        assert type(AutoProcessor.from_pretrained(path)) is type(processor)
        assert not image_only
        with pytest.raises(processors.VideoUnsupported, match="takes images only"):
            prompting.request_prompt(processor, "what happens ?", ["clip.mp4"])


@pytest.mark.parametrize("request_kind", ["one_image", "two_images", "interleaved", "text_only"])
def test_prompts_equal_hf_chat_template_tokenization(family, mp, request_kind):
    """Our prompt and encoding of a request equal HF's own apply_chat_template(tokenize=True) with
    the images in the messages: same tokens (one BOS), same pixel inputs."""
    _, processor = mp
    red, blue = tiny.random_image(1), tiny.random_image(2)
    text, visuals, items = {
        "one_image": ("what is this ?", [red], [{"type": "image", "image": red}, {"type": "text", "text": "what is this ?"}]),
        "two_images": ("which is red ?", [red, blue], [{"type": "image", "image": red}, {"type": "image", "image": blue},
                                                     {"type": "text", "text": "which is red ?"}]),
        "interleaved": ("left <image 2> or right <image 1> ?", [red, blue],
                        [{"type": "text", "text": "left "}, {"type": "image", "image": blue},
                         {"type": "text", "text": " or right "}, {"type": "image", "image": red}, {"type": "text", "text": " ?"}]),
        "text_only": ("say yes or no .", [], [{"type": "text", "text": "say yes or no ."}]),
    }[request_kind]
    prompt = prompting.request_prompt(processor, text, visuals)
    ours = prompting.encode(processor, [prompt.text], [prompt.images])
    want = hf_inputs(processor, items)
    assert sorted(ours.keys()) == sorted(want.keys())
    for key in want:
        assert torch.equal(ours[key], want[key]), key
    bos = processor.tokenizer.bos_token_id
    if bos is not None:
        assert int((ours["input_ids"][0, :2] == bos).sum()) == 1  # no second BOS
    n_image_tokens = int((ours["input_ids"] == processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN[family])).sum())
    assert (n_image_tokens > 0) == bool(visuals)


def test_mixed_batch_rows_equal_the_rows_alone(family, mp):
    """A right-padded batch of rows with two, no and one image: each row's tokens are its own."""
    _, processor = mp
    reqs = [("which is red ?", [tiny.random_image(1), tiny.random_image(2)]), ("say yes .", []),
            ("what is this ?", [tiny.random_image(3)])]
    prompts = [prompting.request_prompt(processor, t, v) for t, v in reqs]
    batch = prompting.encode(processor, [p.text for p in prompts], [p.images for p in prompts])
    for row, p in enumerate(prompts):
        alone = prompting.encode(processor, [p.text], [p.images])["input_ids"][0]
        assert torch.equal(batch["input_ids"][row, : len(alone)], alone)
        assert not batch["attention_mask"][row, len(alone):].any()


# ---------------------------------------------------------------- post-fusion: the image reaches exactly those layers


def mlp_inputs(model, enc, family):
    path, _ = DECODER[family]
    layers = model.get_submodule(path)
    acts, handles = {}, []
    for i, layer in enumerate(layers):
        handles.append(layer.mlp.register_forward_pre_hook(lambda m, args, i=i: acts.__setitem__(i, args[0].detach().clone())))
    try:
        with torch.no_grad():
            model(**enc)
    finally:
        for h in handles:
            h.remove()
    return acts


def test_image_reaches_exactly_the_post_fusion_layers(family, mp):
    """Two images, same text: every post-fusion layer's MLP input changes at the text positions
    after the image; a layer before fusion (Mllama's layer 0) does not change at all."""
    model, processor = mp
    path, post = DECODER[family]
    encs = [hf_inputs(processor, [{"type": "image", "image": tiny.random_image(s)}, {"type": "text", "text": "what is this ?"}])
            for s in (11, 12)]
    assert torch.equal(encs[0]["input_ids"], encs[1]["input_ids"])
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN[family])
    last_image = int((encs[0]["input_ids"][0] == image_id).nonzero().max())
    a, b = (mlp_inputs(model, enc, family) for enc in encs)
    for layer in range(len(model.get_submodule(path))):
        diff = (a[layer][0, last_image + 1:] - b[layer][0, last_image + 1:]).abs().max().item()
        if layer in post:
            assert diff > 1e-4, f"layer {layer}: the image does not reach it"
        else:
            assert diff == 0.0, f"layer {layer} precedes fusion but sees the image"
    assert archs.adapter_for(model).post_fusion_layers(model) == list(post)


@pytest.mark.parametrize("trap", ["gemma3", "mllama"])
def test_tiny_model_traps_are_real(trap, family_dir):
    """What the builders defuse: with Gemma 3's image projection or Mllama's tanh gates at their
    initial zeros the image has no effect, so image tests on a raw random checkpoint prove nothing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, processor = models.load(str(family_dir(trap)))
    encs = [hf_inputs(processor, [{"type": "image", "image": tiny.random_image(s)}, {"type": "text", "text": "what is this ?"}])
            for s in (11, 12)]
    with torch.no_grad():
        assert (model(**encs[0]).logits - model(**encs[1]).logits).abs().max() > 1e-4
        if trap == "gemma3":
            model.model.multi_modal_projector.mm_input_projection_weight.zero_()
        else:
            for layer in model.model.language_model.layers:
                if hasattr(layer, "cross_attn_attn_gate"):
                    layer.cross_attn_attn_gate.zero_()
                    layer.cross_attn_mlp_gate.zero_()
        assert torch.equal(model(**encs[0]).logits, model(**encs[1]).logits)


# ---------------------------------------------------------------- sites


def test_sites_are_the_decoder_mlps(family, mp):
    model, _ = mp
    sites = resolve_sites(model, ProfileOptions(modules=MODULES))
    assert [s.name for s in sites] == site_paths(family)
    for s in sites:
        module = model.get_submodule(s.module_path)
        assert isinstance(module, torch.nn.Linear)
        assert s.width == (module.out_features if s.kind == "output" else module.in_features)
    assert not any("vision" in s.name or "visual" in s.name for s in sites)
    with pytest.raises(ValueError, match=r"layers \[0\] are not post-fusion") if family == "mllama" else _nothing():
        resolve_sites(model, ProfileOptions(layers="0"))


@contextmanager
def _nothing():
    yield


def test_an_adapter_pointing_at_the_vision_blocks_is_refused(family_dir):
    """Qwen2.5-VL's vision blocks have gate/up/down MLPs too: an adapter naming them (a plugin that
    wins over ours) is refused by the layer count, before anything is profiled."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = models.load(str(family_dir("qwen2_5_vl")))
    assert hasattr(model.model.visual.blocks[0].mlp, "gate_proj")  # the trap exists
    plugin = type("broken_plugin", (), {})()
    plugin.sgm_arch_adapters = hookimpl(lambda: [ArchAdapter(name="broken", model_types=("qwen2_5_vl",),
                                                             layers_paths=("model.visual.blocks",))])
    pm = plugin_manager()
    pm.register(plugin)
    try:
        assert archs.adapter_for(model).name == "broken"
        with pytest.raises(ValueError, match=r"holds 3 layers but the text config has num_hidden_layers=2.*vision tower"):
            resolve_sites(model, ProfileOptions())
    finally:
        pm.unregister(plugin)
    assert archs.adapter_for(model).name == "qwen2_5_vl"


# ---------------------------------------------------------------- profiling == plain hooks


@pytest.fixture(scope="module")
def reference_activations(family, mp, toy_pairs):
    """Raw MLP activations of every pair alone, from HF's own encoding and plain hooks on the
    modules written out above."""
    model, processor = mp
    out = []
    for pair in toy_pairs:
        enc = hf_inputs(processor, [{"type": "image", "image": pair.load_image()}, {"type": "text", "text": pair.text}],
                        generation_prompt=False)
        acts, handles = {}, []
        for name in site_paths(family):
            if name.endswith(".input"):
                module = model.get_submodule(name[: -len(".input")])
                handles.append(module.register_forward_pre_hook(lambda m, args, n=name, a=acts: a.__setitem__(n, args[0].detach().clone())))
            else:
                handles.append(model.get_submodule(name).register_forward_hook(
                    lambda m, args, o, n=name, a=acts: a.__setitem__(n, o.detach().clone())))
        try:
            with torch.no_grad():
                model(**enc)
        finally:
            for h in handles:
                h.remove()
        out.append((enc["input_ids"][0], acts))
    return out


def pooled(reference, name, positions, pooling, image_id):
    rows = []
    for ids, acts in reference:
        ids = ids.tolist()
        image_at = [t for t, tok in enumerate(ids) if tok == image_id]
        keep = [t for t, tok in enumerate(ids)
                if positions == "all" or (positions == "text" and tok != image_id) or (positions == "after_image" and t > max(image_at))]
        sel = acts[name][0, keep].double()
        rows.append(sel.mean(0) if pooling == "mean" else sel.max(0).values)
    return torch.stack(rows).float().numpy()


@pytest.mark.parametrize("positions, pooling", [("all", "mean"), ("text", "max"), ("after_image", "mean")])
def test_profile_matches_plain_hooks(family, mp, toy_pairs, reference_activations, positions, pooling):
    model, processor = mp
    sites, store = profile(model, processor, toy_pairs, ProfileOptions(modules=MODULES, positions=positions, pooling=pooling,
                                                                       batch_size=4), progress=False)
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN[family])
    try:
        assert [s.name for s in sites] == site_paths(family)
        for s in sites:
            want = pooled(reference_activations, s.name, positions, pooling, image_id)
            np.testing.assert_allclose(store[s.name], want, atol=2e-5, rtol=0, err_msg=s.name)
    finally:
        store.close()


# Qwen2-VL/2.5-VL: the vision merger's Linear layers run over all patches of a batch at once, and
# the CPU GEMM gives a row other low bits with another number of rows (measured: an image's merged
# features 2.4e-8 off between 1 and 4 images; MLP responses up to 1.6e-7).
NOT_BATCH_EXACT = {"qwen2_vl", "qwen2_5_vl"}


def test_profile_does_not_depend_on_the_batch_with_images_of_several_sizes(family, mp):
    """Pairs of one text with square and wide images: responses in batches of 4 are the ones each
    pair has alone, bit for bit; for Qwen2-VL/2.5-VL within 1e-6 (the merger, below)."""
    from lmms_sgm.data import Pair, PairDataset

    model, processor = mp
    pairs = PairDataset([Pair(image=tiny.random_image(50 + i).resize((64 if i % 3 else 32, 32)), text="you stupid idiot",
                              label=i % 2) for i in range(8)])
    opts = dict(modules=("up_proj", "down_proj"), pooling="max")
    sites, one = profile(model, processor, pairs, ProfileOptions(batch_size=1, **opts), progress=False)
    _, four = profile(model, processor, pairs, ProfileOptions(batch_size=4, **opts), progress=False)
    try:
        for s in sites:
            if family in NOT_BATCH_EXACT:
                np.testing.assert_allclose(four[s.name], one[s.name], atol=1e-6, rtol=0, err_msg=s.name)
            else:
                np.testing.assert_array_equal(four[s.name], one[s.name], err_msg=s.name)
    finally:
        one.close()
        four.close()


def test_glasses_cover_exactly_the_decoder_mlps(family, mp, glasses):
    g, _ = glasses
    assert [s.name for s in g.sites] == site_paths(family)
    fp = g.manifest["fingerprint"]
    assert (fp["architecture"], fp["model_type"]) == (type(mp[0]).__name__, family)
    assert fp["num_layers"] == len(mp[0].get_submodule(DECODER[family][0]))
    assert g.counts()["experts"] == 40


# ---------------------------------------------------------------- wearing the glasses


@pytest.fixture(scope="module")
def prompt(mp):
    """Two prompts of different lengths with an image each: a left-padded generation batch."""
    _, processor = mp
    prompts = [prompting.request_prompt(processor, q, [tiny.random_image(20 + i)])
               for i, q in enumerate(("what is this ?", "what do you think of this picture ? is it nice ?"))]
    enc = prompting.encode(processor, [p.text for p in prompts], [p.images for p in prompts], padding_side="left")
    assert (enc["attention_mask"][0] == 0).any()
    return enc


@pytest.fixture(scope="module")
def vanilla(mp, prompt, pristine):
    return generate(mp[0], prompt)


def generate(model, enc, nnsight=False):
    with torch.no_grad():
        if nnsight:
            with model.generate(**enc, **GEN) as tracer:
                out = tracer.result.save()
        else:
            out = model.generate(**enc, **GEN)
    return out.sequences, torch.stack(out.logits)


@contextmanager
def reference_hooks(model, glasses_dir):
    """SGM at strength 1 with plain hooks, reading the safetensors file directly."""
    handles = []
    for key, alpha in load_file(str(glasses_dir / "glasses.safetensors")).items():
        if not key.endswith(".alpha"):
            continue
        site = key[: -len(".alpha")]
        if site.endswith(".input"):
            module = model.get_submodule(site[: -len(".input")])
            handles.append(module.register_forward_pre_hook(lambda m, args, a=alpha: (args[0] * a, *args[1:])))
        else:
            handles.append(model.get_submodule(site).register_forward_hook(lambda m, args, out, a=alpha: out * a))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@pytest.fixture(scope="module")
def reference(mp, prompt, glasses, vanilla):
    with reference_hooks(mp[0], glasses[1]):
        return generate(mp[0], prompt)


def test_reference_changes_generation(reference, vanilla):
    assert (reference[1] - vanilla[1]).abs().max() > 1e-4


@pytest.mark.parametrize("mode", MODES)
def test_mode_equals_reference_at_every_step_and_remove_restores(family, mp, prompt, glasses, reference, vanilla, mode):
    model, processor = mp
    handle = glasses[0].apply(model, mode=mode, processor=processor)
    try:
        seq, logits = generate(handle.model, prompt, nnsight=mode == "nnsight")
    finally:
        handle.remove()
    assert logits.shape == reference[1].shape == (N_NEW, 2, reference[1].shape[-1])
    assert (logits - reference[1]).abs().max().item() <= 1e-5
    assert torch.equal(seq, reference[0])
    after = generate(model, prompt)
    assert torch.equal(after[1], vanilla[1]) and torch.equal(after[0], vanilla[0])


def test_glasses_of_another_family_are_refused(family, mp, glasses, family_dir):
    other = FAMILIES[(FAMILIES.index(family) + 1) % len(FAMILIES)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other_model, _ = models.load(str(family_dir(other)))
    with pytest.raises(GlassesMismatch, match=f"model_type: glasses '{family}' vs model '{other}'"):
        glasses[0].apply(other_model, mode="hooks")
    assert not any(m._forward_hooks for m in other_model.modules())


# ---------------------------------------------------------------- self-labelling


def test_self_labelling_answers_are_the_models_greedy_answers(family, mp, tmp_path):
    """selflabel builds each family's prompts through the same code (left-padded batches of 2 over
    3 prompts); each greedy answer equals a generate on HF's own encoding of its prompt alone."""
    model, processor = mp
    questions = ["what is this ?", "is it nice ?", "what do you think of this picture ?"]
    records = []
    for i, q in enumerate(questions):
        tiny.random_image(30 + i).save(tmp_path / f"{i}.png")
        records.append({"image": str(tmp_path / f"{i}.png"), "question": q})
    judge = type("Judge", (), {"judge": lambda self, q, a: type("V", (), {"unsafe": "stupid" in a})()})()
    pairs = selflabel.label_generations(model, processor, records, judge, samples=1, max_new_tokens=N_NEW,
                                        temperature=0, batch_size=2, progress=False)
    assert [p.question for p in pairs] == questions
    for i, (pair, q) in enumerate(zip(pairs, questions)):
        enc = hf_inputs(processor, [{"type": "image", "image": tiny.random_image(30 + i)}, {"type": "text", "text": q}])
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=N_NEW, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
        assert pair.text == processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


# ---------------------------------------------------------------- the lmms-sgm CLI, and videos


def test_cli_tiny_profile_inspect(family, tmp_path, capsys):
    """A user trying a family offline: `lmms-sgm tiny --family`, `profile`, `inspect`."""
    from lmms_sgm.cli import main

    assert main(["tiny", str(tmp_path / "t"), "--family", family, "--pairs", "8"]) == 0
    out = tmp_path / "g"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", processors.ImageOnlyProcessorWarning)
        assert main(["profile", "--model", str(tmp_path / "t" / "model"), "--data", str(tmp_path / "t" / "data"),
                     "--out", str(out), "--modules", "down_proj", "--no-progress"]) == 0
    g = SafetyGlasses.load(out)
    path, post = DECODER[family]
    assert [s.name for s in g.sites] == [f"{path}.{layer}.mlp.down_proj" for layer in post]
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert f'"model_type": "{family}"' in capsys.readouterr().out


@pytest.mark.parametrize("qwen", ["qwen2_vl", "qwen2_5_vl"])
def test_a_video_reaches_the_video_processor_when_there_is_one(qwen, family_dir):
    """What torchvision would allow (not installable here): with a video processor the request's
    video becomes the template's video item and the processor's ``videos``. A recording stand-in
    takes the video processor's place; the rest is the real processor."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, processor = models.load(str(family_dir(qwen)))
    processor.video_processor = object()  # only its presence is looked at before the processor call
    prompt = prompting.request_prompt(processor, "what happens after <image 1> ?", [tiny.random_image(1), "/data/clip.mp4"])
    assert prompt.videos == ["/data/clip.mp4"] and len(prompt.images) == 1
    assert "<|vision_start|><|video_pad|><|vision_end|>what happens after <|vision_start|><|image_pad|><|vision_end|> ?" in prompt.text
    seen = {}
    with mock.patch.object(type(processor), "__call__", lambda self, **kwargs: seen.update(kwargs)):
        prompting.encode(processor, [prompt.text], [prompt.images], [prompt.videos])
    assert seen["videos"] == ["/data/clip.mp4"] and seen["images"] == [prompt.images]
