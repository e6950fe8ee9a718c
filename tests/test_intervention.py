"""Wearing glasses: hooks, fold and nnsight modes against each other, an independent plain-hook
implementation, and the unmodified model. Greedy generation, logits compared at every step."""
from __future__ import annotations

import types
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file

from lmms_sgm import intervention
from lmms_sgm.archs import adapter_for
from lmms_sgm.interventions import SafetyGlasses
from lmms_sgm.options import ProfileOptions, SelectionOptions
from lmms_sgm.pipeline import build_glasses
from lmms_sgm.profiling import profile

MODES = ("hooks", "fold", "nnsight")
N_NEW = 5
GEN = {"max_new_tokens": N_NEW, "min_new_tokens": N_NEW, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
ALL_MODULES = ("gate_proj", "up_proj", "intermediate", "down_proj")
SUPPORTED = ("supported: gemma, gemma2, gemma3, idefics3, llama, llava, llava_next, llava_onevision, mistral, mllama, "
             "qwen2, qwen2_5_vl, qwen2_vl, qwen3, smolvlm")


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def mp(load_model):
    """A private copy of the tiny model: these tests change and restore it."""
    return load_model()


@pytest.fixture(scope="module")
def prompt(mp, toy_pairs):
    """Two prompts of different lengths (left padding), each with an image, ready to generate."""
    _, processor = mp
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            tokenize=False, add_generation_prompt=True)
        for q in ("what is this ?", "what do you think of this picture ? is it nice ?")
    ]
    images = [toy_pairs[0].load_image(), toy_pairs[1].load_image()]
    enc = processor(images=images, text=texts, return_tensors="pt", padding=True)
    assert (enc["attention_mask"][0] == 0).any()
    return enc


@pytest.fixture(scope="module")
def pristine(mp):
    """The weights before anything was applied."""
    return {k: v.clone() for k, v in mp[0].state_dict().items()}


@pytest.fixture(scope="module")
def vanilla(mp, prompt, pristine):
    return hf_generate(mp[0], prompt)


def _build(mp, toy_jsonl, tmp_path_factory, modules, selection):
    out = tmp_path_factory.mktemp("glasses") / "g"
    build_glasses(mp[0], mp[1], toy_jsonl, ProfileOptions(modules=modules), selection, out=out, progress=False)
    return SafetyGlasses.load(out), out


@pytest.fixture(scope="module")
def det0(mp, toy_jsonl, tmp_path_factory, vanilla):
    """Every module kind (intermediate included), the 40 highest-AUROC neurons set to zero."""
    return _build(mp, toy_jsonl, tmp_path_factory, ALL_MODULES, SelectionOptions(rule="det0", top_k=40))


@pytest.fixture(scope="module")
def sgm(mp, toy_jsonl, tmp_path_factory, vanilla):
    """The paper's rule with the precursor's threshold: neurons damped and amplified."""
    return _build(mp, toy_jsonl, tmp_path_factory, ALL_MODULES, SelectionOptions(rule="sgm", threshold=0.3))


@pytest.fixture(scope="module")
def intermediate_only(mp, toy_jsonl, tmp_path_factory, vanilla):
    return _build(mp, toy_jsonl, tmp_path_factory, ("intermediate",), SelectionOptions(rule="damp", top_k=24, damp_factor=0.1))


@pytest.fixture(autouse=True)
def _restore_private_model(request):
    """Whatever a test does, the private model is clean afterwards (and was left clean)."""
    yield
    if "mp" not in request.fixturenames:
        return
    model = request.getfixturevalue("mp")[0]
    leftover = intervention._WEARING.get(model)
    if leftover is not None and leftover.active:
        leftover.remove()
        pytest.fail("test left glasses applied")
    pristine = request.getfixturevalue("pristine")
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in pristine.items()), "weights not restored"


# ---------------------------------------------------------------- generation helpers


def hf_generate(model, enc):
    with torch.no_grad():
        out = model.generate(**enc, **GEN)
    return out.sequences, torch.stack(out.logits)


def nnsight_generate(nn_model, enc):
    # Nested on purpose: nnsight reads the traced block from this file's source.
    with torch.no_grad():  # noqa: SIM117
        with nn_model.generate(**enc, **GEN) as tracer:
            out = tracer.result.save()
    return out.sequences, torch.stack(out.logits)


def run(handle, enc):
    if handle.options.mode == "nnsight":
        return nnsight_generate(handle.model, enc)
    return hf_generate(handle.model, enc)


@contextmanager
def reference_hooks(model, glasses_dir, strength):
    """SGM written from method.md with plain torch hooks, reading the safetensors file directly."""
    handles = []
    for key, alpha in load_file(str(glasses_dir / "glasses.safetensors")).items():
        if not key.endswith(".alpha"):
            continue
        site = key[: -len(".alpha")]
        factor = ((1 - strength) + strength * alpha.double()).float()
        if site.endswith(".input"):  # the MLP intermediate activation: the input of down_proj
            module = model.get_submodule(site[: -len(".input")])
            handles.append(module.register_forward_pre_hook(lambda m, args, f=factor: (args[0] * f, *args[1:])))
        else:
            module = model.get_submodule(site)
            handles.append(module.register_forward_hook(lambda m, args, out, f=factor: out * f))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def reference_generate(model, glasses_dir, strength, enc):
    with reference_hooks(model, glasses_dir, strength):
        return hf_generate(model, enc)


def assert_same(got, want, atol=1e-5):
    seq, logits = got
    want_seq, want_logits = want
    assert logits.shape == want_logits.shape == (N_NEW, 2, want_logits.shape[-1])
    diff = (logits - want_logits).abs().max().item()
    assert diff <= atol, f"logits differ by {diff}"
    assert torch.equal(seq, want_seq)


def max_diff(a, b):
    return (a[1] - b[1]).abs().max().item()


# ---------------------------------------------------------------- the reference really intervenes


def test_reference_changes_logits(mp, prompt, vanilla, det0, sgm, intermediate_only):
    model = mp[0]
    for glasses_dir in (det0[1], sgm[1], intermediate_only[1]):
        for s in (1.0, 0.5):
            assert max_diff(reference_generate(model, glasses_dir, s, prompt), vanilla) > 1e-4
    # and the prompt pass alone already differs (first generated step)
    assert (reference_generate(model, det0[1], 1.0, prompt)[1][0] - vanilla[1][0]).abs().max() > 1e-4
    # the reference leaves no hook behind
    assert torch.equal(hf_generate(model, prompt)[1], vanilla[1])


# ---------------------------------------------------------------- modes == reference


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("which", ["det0", "sgm"])
def test_mode_matches_reference(mp, prompt, vanilla, det0, sgm, mode, which):
    model, processor = mp
    glasses, glasses_dir = {"det0": det0, "sgm": sgm}[which]
    want = reference_generate(model, glasses_dir, 1.0, prompt)
    with glasses.apply(model, mode=mode, processor=processor) as handle:
        assert handle.active and handle.options.mode == mode
        got = run(handle, prompt)
    assert_same(got, want)
    assert max_diff(got, vanilla) > 1e-4


@pytest.mark.parametrize("mode", MODES)
def test_modes_agree_with_each_other(mp, prompt, det0, mode):
    """Same tokens, logits within 1e-5 at every step, whichever mode (hooks as the anchor)."""
    model, processor = mp
    glasses, _ = det0
    with glasses.apply(model, mode="hooks") as h:
        anchor = run(h, prompt)
    with glasses.apply(model, mode=mode, processor=processor) as h:
        assert_same(run(h, prompt), anchor)


@pytest.mark.parametrize("mode", MODES)
def test_strength_half_is_the_blend(mp, prompt, vanilla, sgm, mode):
    model, processor = mp
    glasses, glasses_dir = sgm
    want = reference_generate(model, glasses_dir, 0.5, prompt)
    full = reference_generate(model, glasses_dir, 1.0, prompt)
    with glasses.apply(model, strength=0.5, mode=mode, processor=processor) as handle:
        got = run(handle, prompt)
    assert_same(got, want)
    assert max_diff(got, full) > 1e-4 and max_diff(got, vanilla) > 1e-4


@pytest.mark.parametrize("mode", MODES)
def test_strength_zero_is_vanilla(mp, prompt, vanilla, det0, mode):
    model, processor = mp
    glasses, _ = det0
    with glasses.apply(model, strength=0.0, mode=mode, processor=processor) as handle:
        seq, logits = run(handle, prompt)
    assert torch.equal(logits, vanilla[1]) and torch.equal(seq, vanilla[0])


@pytest.mark.parametrize("mode", MODES)
def test_intermediate_site(mp, prompt, vanilla, intermediate_only, mode):
    model, processor = mp
    glasses, glasses_dir = intermediate_only
    assert {s.kind for s in glasses.sites} == {"input"} and {s.module for s in glasses.sites} == {"intermediate"}
    want = reference_generate(model, glasses_dir, 1.0, prompt)
    with glasses.apply(model, mode=mode, processor=processor) as handle:
        got = run(handle, prompt)
    assert_same(got, want)
    assert max_diff(got, vanilla) > 1e-4


# ---------------------------------------------------------------- removal restores exactly


@pytest.mark.parametrize("mode", MODES)
def test_remove_restores_vanilla(mp, prompt, vanilla, pristine, det0, mode):
    model, processor = mp
    glasses, _ = det0
    handle = glasses.apply(model, mode=mode, processor=processor)
    worn = run(handle, prompt)
    assert max_diff(worn, vanilla) > 1e-4
    handle.remove()
    assert not handle.active
    handle.remove()  # a second remove is harmless
    seq, logits = hf_generate(model, prompt)
    assert torch.equal(logits, vanilla[1]) and torch.equal(seq, vanilla[0])
    if mode == "nnsight":  # the wrapper itself must have dropped the edit too
        seq, logits = nnsight_generate(handle.model, prompt)
        assert torch.equal(logits, vanilla[1]) and torch.equal(seq, vanilla[0])
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in pristine.items())


def halve_the_logits(nn_model):
    """An edit of the caller's own, made before any glasses: every step's logits halved."""
    with nn_model.edit(inplace=True) as tracer:
        for _ in tracer.iter[:]:
            nn_model.lm_head.output = nn_model.lm_head.output * 0.5


@pytest.mark.filterwarnings("ignore:.*was never reached")
def test_nnsight_mode_keeps_the_callers_own_edits(mp, prompt, vanilla, det0):
    """Removing nnsight-mode glasses drops their edit, not one the caller had made before."""
    model, processor = mp
    glasses, _ = det0
    nn_model = intervention.as_generator(model, processor)
    halve_the_logits(nn_model)
    try:
        mine = nnsight_generate(nn_model, prompt)
        assert torch.allclose(mine[1], vanilla[1] * 0.5, atol=1e-5)
        handle = glasses.apply(nn_model, mode="nnsight")
        assert max_diff(nnsight_generate(handle.model, prompt), mine) > 1e-4
        handle.remove()
        assert torch.equal(nnsight_generate(nn_model, prompt)[1], mine[1])
    finally:
        nn_model.clear_edits()


@pytest.mark.parametrize("mode", MODES)
def test_context_manager_restores_vanilla(mp, prompt, vanilla, det0, mode):
    model, processor = mp
    glasses, _ = det0
    with glasses.apply(model, mode=mode, processor=processor) as handle:
        assert max_diff(run(handle, prompt), vanilla) > 1e-4
    assert not handle.active
    assert torch.equal(hf_generate(model, prompt)[1], vanilla[1])
    if mode == "nnsight":
        assert torch.equal(nnsight_generate(handle.model, prompt)[1], vanilla[1])


def test_context_manager_restores_on_error(mp, prompt, vanilla, det0):
    model, _ = mp
    glasses, _ = det0
    with pytest.raises(KeyError), glasses.apply(model, mode="fold"):
        raise KeyError("boom")
    assert torch.equal(hf_generate(model, prompt)[1], vanilla[1])


def test_fold_scales_exactly_the_expert_rows(mp, pristine, det0, intermediate_only):
    """Fold edits weight rows (outputs) or columns (down_proj inputs) of experts only."""
    model, _ = mp
    for glasses, glasses_dir in (det0, intermediate_only):
        tensors = load_file(str(glasses_dir / "glasses.safetensors"))
        with glasses.apply(model, mode="fold"):
            state = model.state_dict()
            want = {}
            for key, alpha in tensors.items():
                if not key.endswith(".alpha"):
                    continue
                site = key[: -len(".alpha")]
                if site.endswith(".input"):  # input unit j of down_proj is weight column j
                    wkey = site[: -len(".input")] + ".weight"
                    want[wkey] = want.get(wkey, pristine[wkey]) * alpha[None, :]
                else:  # output unit j is weight row j
                    wkey = site + ".weight"
                    want[wkey] = want.get(wkey, pristine[wkey]) * alpha[:, None]
            touched = set(want)
            for wkey, w in want.items():
                assert torch.equal(state[wkey], w), wkey
            assert any(not torch.equal(pristine[k], state[k]) for k in touched)
            untouched = [k for k in pristine if k not in touched]
            assert all(torch.equal(pristine[k], state[k]) for k in untouched)


# ---------------------------------------------------------------- one pair at a time


@pytest.mark.parametrize("mode", MODES)
def test_applying_twice_raises(mp, det0, sgm, mode):
    model, processor = mp
    glasses, _ = det0
    handle = glasses.apply(model, mode=mode, processor=processor)
    try:
        for second in MODES:
            with pytest.raises(RuntimeError, match="already wears glasses"):
                sgm[0].apply(model, mode=second, processor=processor)
        with pytest.raises(RuntimeError, match="already wears glasses"):
            glasses.apply(handle.model, mode="hooks")  # through the nnsight wrapper too
    finally:
        handle.remove()
    again = sgm[0].apply(model, mode=mode, processor=processor)  # allowed once removed
    assert again.active
    again.remove()


def test_nnsight_mode_needs_processor(mp, det0):
    model, _ = mp
    with pytest.raises(ValueError, match="needs its processor"):
        det0[0].apply(model, mode="nnsight")
    assert intervention._WEARING.get(model) is None


def test_bad_apply_options(mp, det0):
    model, _ = mp
    with pytest.raises(ValueError, match="strength must be in"):
        det0[0].apply(model, strength=2.0)
    with pytest.raises(ValueError, match="unknown mode 'inplace'"):
        det0[0].apply(model, mode="inplace")


# ---------------------------------------------------------------- unsupported architectures


@pytest.fixture(scope="module")
def gpt2():
    """A family without an adapter (its MLP is c_fc/c_proj, Conv1D)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=64)).eval()


def test_unsupported_architecture(gpt2, det0, mp, toy_pairs):
    match = f"unsupported architecture model_type='gpt2'; {SUPPORTED}"
    with pytest.raises(ValueError, match=match):
        adapter_for(gpt2)
    for mode in ("hooks", "fold"):
        with pytest.raises(ValueError, match=match):
            det0[0].apply(gpt2, mode=mode)
    with pytest.raises(ValueError, match=match):
        det0[0].check(gpt2)
    with pytest.raises(ValueError, match=match):
        profile(gpt2, mp[1], toy_pairs, ProfileOptions(), progress=False)
    assert not any(m._forward_hooks for m in gpt2.modules())


def test_unsupported_config():
    with pytest.raises(ValueError, match=f"unsupported architecture model_type='gpt2'; {SUPPORTED}"):
        adapter_for(types.SimpleNamespace(model_type="gpt2"))
    with pytest.raises(ValueError, match=f"model_type=None; {SUPPORTED}"):
        adapter_for(types.SimpleNamespace())
    assert adapter_for(types.SimpleNamespace(model_type="llava_next")).name == "llava_next"


# ---------------------------------------------------------------- towards the non-toxic mean


@pytest.fixture(scope="module")
def toward_mean(mp, toy_jsonl, tmp_path_factory, vanilla):
    """Damped neurons pulled towards their non-toxic mean instead of towards zero."""
    return _build(mp, toy_jsonl, tmp_path_factory, ALL_MODULES,
                  SelectionOptions(rule="damp", top_k=40, damp_factor=0.2, towards="nontoxic_mean"))


@contextmanager
def reference_mean_hooks(model, glasses_dir, strength):
    """method.md's 'suppress towards the non-toxic mean': out -> mu + f * (out - mu), plain hooks."""
    tensors = load_file(str(glasses_dir / "glasses.safetensors"))
    handles = []
    for key, alpha in tensors.items():
        if not key.endswith(".alpha"):
            continue
        site = key[: -len(".alpha")]
        mu = tensors[f"{site}.mean_nontoxic"]
        f = ((1 - strength) + strength * alpha.double()).float()
        if site.endswith(".input"):
            module = model.get_submodule(site[: -len(".input")])
            handles.append(module.register_forward_pre_hook(lambda m, args, f=f, mu=mu: (mu + f * (args[0] - mu), *args[1:])))
        else:
            module = model.get_submodule(site)
            handles.append(module.register_forward_hook(lambda m, args, out, f=f, mu=mu: mu + f * (out - mu)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("strength", [1.0, 0.5])
@pytest.mark.parametrize("mode", MODES)
def test_towards_mean_matches_reference(mp, prompt, vanilla, toward_mean, mode, strength):
    model, processor = mp
    glasses, glasses_dir = toward_mean
    with reference_mean_hooks(model, glasses_dir, strength):
        want = hf_generate(model, prompt)
    with glasses.apply(model, strength=strength, mode=mode, processor=processor) as handle:
        got = run(handle, prompt)
    assert_same(got, want)
    assert max_diff(got, vanilla) > 1e-4
    # and it is not the towards-zero intervention with the same alphas
    zero = glasses.reselect(SelectionOptions(rule="damp", top_k=40, damp_factor=0.2))
    with zero.apply(model, strength=strength, mode="hooks") as handle:
        assert max_diff(run(handle, prompt), got) > 1e-4
    # fold added biases for the shift and removed them again
    for layer in model.model.language_model.layers:
        for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            assert proj.bias is None
    assert torch.equal(hf_generate(model, prompt)[1], vanilla[1])


def test_towards_mean_strength_zero_is_vanilla(mp, prompt, vanilla, toward_mean):
    model, processor = mp
    for mode in MODES:
        with toward_mean[0].apply(model, strength=0.0, mode=mode, processor=processor) as handle:
            assert torch.equal(run(handle, prompt)[1], vanilla[1]), mode


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_affine_keeps_the_activations_dtype(dtype):
    """Factors and shifts are stored in float32; a half-precision model's activations stay in
    its dtype (float32 factors would silently promote every later layer)."""
    x = torch.linspace(-2, 2, 12, dtype=dtype).reshape(3, 4)
    f, b = torch.tensor([0.0, 0.5, 1.0, 2.0]), torch.tensor([1.0, 0.0, -1.0, 0.5])
    for shift in (None, b):
        got = intervention.affine(x, f, shift)
        want = x * f.to(dtype) + (0 if shift is None else shift.to(dtype))
        assert got.dtype == dtype and torch.equal(got, want)


def test_the_handle_says_what_is_worn(mp, det0):
    model, processor = mp
    glasses, _ = det0
    for mode in MODES:
        with glasses.apply(model, mode=mode, processor=processor) as handle:
            assert handle.glasses is glasses and handle.options.mode == mode, mode
    handle = glasses.apply(model, mode="hooks", strength=0.5)
    assert handle.glasses is glasses and handle.model is model and handle.options.strength == 0.5
    assert repr(handle) == "<GlassesHandle mode=hooks strength=0.5 active>"
    handle.remove()
    assert repr(handle) == "<GlassesHandle mode=hooks strength=0.5 removed>"


# ---------------------------------------------------------------- gates, wrappers, the remote branch


def test_transform_with_a_gate_changes_only_the_positions_whose_evidence_exceeds_the_threshold():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 4)
    f, b = torch.tensor([0.0, 0.5, 1.0, 2.0]), torch.tensor([1.0, 0.0, -1.0, 0.5])
    v, c, t = torch.tensor([1.0, -1.0, 0.5, 0.0]), 0.25, 0.1
    on = (x @ v - c) > t  # [2, 5]: which positions the gate lets through
    assert on.any() and not on.all()
    for shift in (None, b):
        want = torch.where(on[..., None], x * f + (0 if shift is None else shift), x)
        assert torch.equal(intervention.transform(x, f, shift, (v, c, t)), want)


@contextmanager
def reference_gated_hooks(model, glasses_dir, gates):
    """Towards zero at strength 1 (f = alpha), each gated site changed only where x @ v - c > t."""
    handles = []

    def act(x, f, g):
        if g is None:
            return x * f
        v, c, t = g
        return torch.where(((x @ v - c) > t)[..., None], x * f, x)

    for key, alpha in load_file(str(glasses_dir / "glasses.safetensors")).items():
        if not key.endswith(".alpha") or bool((alpha == 1).all()):
            continue
        site = key[: -len(".alpha")]
        g = gates.get(site)
        if site.endswith(".input"):
            module = model.get_submodule(site[: -len(".input")])
            handles.append(module.register_forward_pre_hook(lambda m, args, f=alpha, g=g: (act(args[0], f, g), *args[1:])))
        else:
            module = model.get_submodule(site)
            handles.append(module.register_forward_hook(lambda m, args, out, f=alpha, g=g: act(out, f, g)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("mode", ["hooks", "nnsight"])
def test_gated_glasses_match_a_plain_hook_reference(mp, prompt, vanilla, det0, mode):
    """Gates set by hand on one output site and one down_proj input site (the other sites
    ungated): each mode gives the reference's logits, which differ from the ungated glasses'."""
    import dataclasses

    model, processor = mp
    glasses, glasses_dir = det0
    changed = list(glasses.transforms(1.0))
    picked = [next(n for n in changed if not n.endswith(".input")), next(n for n in changed if n.endswith(".input"))]
    widths = {s.name: s.width for s in glasses.sites}
    torch.manual_seed(1)
    gates = {n: (torch.randn(widths[n]) / widths[n] ** 0.5, 0.05, 0.0) for n in picked}
    with reference_gated_hooks(model, glasses_dir, gates):
        want = hf_generate(model, prompt)
    with glasses.apply(model, mode="hooks") as handle:
        ungated = run(handle, prompt)
    assert max_diff(want, ungated) > 1e-4 and max_diff(want, vanilla) > 1e-4
    gated = dataclasses.replace(glasses, gate=gates)
    with gated.apply(model, mode=mode, processor=processor) as handle:
        got = run(handle, prompt)
    assert_same(got, want)
    with pytest.raises(ValueError, match="fold cannot express a gate"):
        gated.apply(model, mode="fold")
    assert intervention._WEARING.get(model) is None


def test_as_generator_hands_nnsight_the_models_preprocessors(mp, tiny_lm_dir):
    from nnsight.modeling.transformers import TransformersModel

    from lmms_sgm import models

    model, processor = mp
    nn_model = intervention.as_generator(model, processor)
    assert isinstance(nn_model, TransformersModel) and nn_model._module is model
    assert (nn_model.task, nn_model.processor, nn_model.tokenizer) == ("image-text-to-text", processor, processor.tokenizer)
    assert intervention.as_generator(nn_model) is nn_model  # already a wrapper: kept
    lm, tokenizer = models.load(str(tiny_lm_dir))
    nn_lm = intervention.as_generator(lm, tokenizer)
    assert nn_lm._module is lm and nn_lm.tokenizer is tokenizer and nn_lm.processor is None


def test_a_remote_setting_hands_the_glasses_to_the_remote_wearer(mp, det0, monkeypatch):
    """remote= other than off goes to lmms_sgm.remote.wear with the options and processor, and
    nothing is worn locally; remote=off wears them here."""
    from lmms_sgm import remote as remote_mod
    from lmms_sgm.options import ApplyOptions, RemoteOptions

    model, processor = mp
    glasses, _ = det0
    calls = []
    monkeypatch.setattr(remote_mod, "wear", lambda *a, **kw: calls.append((a, kw)) or "remote handle")
    options = ApplyOptions(strength=0.5, mode="nnsight")
    assert intervention.apply(glasses, model, options, processor=processor, remote="ndif") == "remote handle"
    given = RemoteOptions(remote="local")
    assert intervention.apply(glasses, model, options, remote=given) == "remote handle"
    assert calls == [((glasses, model, options, RemoteOptions(remote="ndif")), {"processor": processor}),
                     ((glasses, model, options, given), {"processor": None})]
    assert intervention._WEARING.get(model) is None
    with intervention.apply(glasses, model, ApplyOptions(mode="hooks"), remote="off") as handle:
        assert handle.active and intervention._WEARING.get(model) is handle
    assert len(calls) == 2
