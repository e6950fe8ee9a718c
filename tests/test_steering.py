"""Gated steering glasses: building, the artifact, and wearing them (hooks, nnsight) against the
vanilla model and an independent plain-hook reference written here from docs/steering.md.

Each generation test checks that the batch holds gated-on and gated-off rows and that steering
changes the gated-on ones, so a gate that never opens or a steer that does nothing fails."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lmms_sgm import intervention, tiny
from lmms_sgm.interventions import Glasses, GlassesError, GlassesMismatch, SafetyGlasses
from lmms_sgm.interventions.steering import SteeringGlasses, decision_positions
from lmms_sgm.options import SteeringOptions
from lmms_sgm.pipeline import build_steering_glasses

N_NEW = 5
GEN = {"max_new_tokens": N_NEW, "min_new_tokens": N_NEW, "do_sample": False, "output_logits": True,
       "return_dict_in_generate": True}
QUESTIONS = ("what is this ?", "what do you think of this picture ? is it nice ?", "how many are there ?",
             "which colour is the shape in the top left ?", "is it a red circle ?", "what shape is it ?")
# (layer, gate_layer, steer_from): the tiny model has decoder layers 0 and 1
VARIANTS = {
    "last-layer": (-1, None, "prompt"),
    "gate-below-steer": (1, 0, "decision"),
    "early-from-decision": (0, None, "decision"),
    "early-all-positions": (0, None, "prompt"),
}
C = 6.0


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def mp(load_model):
    """A private copy of the tiny model (glasses are applied and removed on it)."""
    return load_model()


@pytest.fixture(autouse=True)
def _nothing_left_on(request):
    yield
    if "mp" in request.fixturenames:
        model = request.getfixturevalue("mp")[0]
        leftover = intervention._WEARING.get(model)
        if leftover is not None and leftover.active:
            leftover.remove()
            pytest.fail("test left glasses applied")
        hooks = [h for m in model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
                 if not getattr(h, "__module__", "").startswith("transformers.")]
        assert not hooks, f"test left hooks: {hooks}"


def chat(processor, question):
    return processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                                         tokenize=False, add_generation_prompt=True)


def encode(processor, questions, images, side="left"):
    return processor(text=[chat(processor, q) for q in questions], images=list(images), padding=True,
                     padding_side=side, return_tensors="pt")


@pytest.fixture(scope="module")
def images():
    return [tiny.random_image(500 + i) for i in range(len(QUESTIONS))]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def built(request, mp, toy_jsonl, tmp_path_factory, images):
    """Glasses of one variant, saved, with a threshold that gates on half of the test prompts
    (the tiny random model's own gate data would put them all on one side)."""
    model, processor = mp
    layer, gate_layer, steer_from = VARIANTS[request.param]
    options = SteeringOptions(layer=layer, gate_layer=gate_layer, steer_from=steer_from, c=C, batch_size=4)
    glasses = build_steering_glasses(model, processor, toy_jsonl, toy_jsonl, options, progress=False)
    proj = reference_projections(model, glasses, encode(processor, QUESTIONS, images))
    middle = proj.sort().values[len(proj) // 2 - 1: len(proj) // 2 + 1].mean().item()
    g = glasses.manifest["gate"]
    glasses = glasses.with_options(gate_threshold=(middle - g["benign_mean"]) / (g["harmful_mean"] - g["benign_mean"]))
    path = glasses.save(tmp_path_factory.mktemp("steer") / request.param)
    return SafetyGlasses.load(path), path


# ---------------------------------------------------------------- the reference


def reference_projections(model, glasses, enc) -> torch.Tensor:
    """Each row's gate projection: the gate layer's output at the prompt's last token (left padding)."""
    seen = {}
    layer = model.get_submodule(glasses.gate_site.module_path)
    handle = layer.register_forward_hook(lambda m, a, out: seen.update(h=out[:, -1]))  # returns None: output kept
    try:
        with torch.no_grad():
            positions = (enc["attention_mask"].cumsum(-1) - 1).clamp_min(0)  # as generate gives a left-padded row
            model(**enc, position_ids=positions)
    finally:
        handle.remove()
    return seen["h"].float() @ glasses.gate_direction


class Reference:
    """Gated steering from docs/steering.md with plain hooks, reading only the saved files: at the
    prompt pass (more than one position) each row is gated on when the gate layer's output at its
    decision position, projected on gate_direction, exceeds the threshold; then c * strength *
    steer is subtracted from the steered layer's output of gated-on rows at every position (or
    from the decision position on), and at every later step. ``decision``: per row, given by the
    test (the last prompt column for left-padded prompts; the context end when scoring)."""

    def __init__(self, model, path, decision, strength=1.0):
        tensors = load_file(str(path / "glasses.safetensors"))
        manifest = json.loads((path / "manifest.json").read_text())
        o = manifest["steering_options"]
        self.steer = tensors["steer"] * (o["c"] * strength)
        self.direction, self.threshold = tensors.get("gate_direction"), manifest["gate"].get("threshold")
        self.gated, self.from_decision = o["gated"], o["steer_from"] == "decision"
        self.steer_module = model.get_submodule(manifest["sites"]["steer"]["module_path"])
        self.gate_module = model.get_submodule(manifest["sites"]["gate"]["module_path"]) if self.gated else None
        self.decision = torch.as_tensor(decision)
        self.gate = None

    def _gate(self, module, args, out):
        if out.shape[1] > 1:
            at = out[torch.arange(out.shape[0]), self.decision.repeat_interleave(out.shape[0] // len(self.decision))]
            self.gate = at.float() @ self.direction > self.threshold

    def _steer(self, module, args, out):
        if not self.gated and out.shape[1] > 1:
            self.gate = torch.ones(out.shape[0], dtype=torch.bool)
        mask = self.gate[:, None].expand(out.shape[0], out.shape[1])
        if out.shape[1] > 1 and self.from_decision:
            d = self.decision.repeat_interleave(out.shape[0] // len(self.decision))
            mask = mask & (torch.arange(out.shape[1])[None, :] >= d[:, None])
        return out - mask[..., None] * self.steer

    def __enter__(self):
        self.handles = []
        if self.gated:
            self.handles.append(self.gate_module.register_forward_hook(self._gate))
        self.handles.append(self.steer_module.register_forward_hook(self._steer))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------- helpers


def hf_generate(model, enc, **kw):
    with torch.no_grad():
        out = model.generate(**enc, **{**GEN, **kw})
    return out.sequences, torch.stack(out.logits, 1)  # logits [batch, step, vocab]


def nnsight_generate(nn_model, enc, **kw):
    with torch.no_grad():  # noqa: SIM117 -- nnsight reads the traced block from this file's source
        with nn_model.generate(**enc, **{**GEN, **kw}) as tracer:
            out = tracer.result.save()
    return out.sequences, torch.stack(out.logits, 1)


def wear_and_generate(glasses, model, processor, enc, mode, **kw):
    with glasses.apply(model, mode=mode, processor=processor) as handle:
        run = nnsight_generate if mode == "nnsight" else hf_generate
        seqs, logits = run(handle.model, enc, **kw)
        gate = handle.state.get("gate")
    return seqs, logits, gate


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize("mode", ["hooks", "nnsight"])
def test_gated_off_rows_are_vanilla_bit_for_bit_and_gated_on_rows_the_reference(mp, built, images, mode):
    model, processor = mp
    glasses, path = built
    enc = encode(processor, QUESTIONS, images)
    assert (enc["attention_mask"] == 0).any()  # left padding in the batch
    vanilla_seqs, vanilla = hf_generate(model, enc)
    decision = torch.full((len(QUESTIONS),), enc["input_ids"].shape[1] - 1)
    with Reference(model, path, decision) as ref:
        ref_seqs, ref_logits = hf_generate(model, enc)
    on = ref.gate
    assert 0 < int(on.sum()) < len(QUESTIONS), "the threshold must split the batch"
    seqs, logits, _ = wear_and_generate(glasses, model, processor, enc, mode)
    off = ~on
    assert torch.equal(logits[off], vanilla[off]) and torch.equal(seqs[off], vanilla_seqs[off])  # every step
    assert not torch.allclose(logits[on], vanilla[on], atol=1e-3), "steering changed nothing"
    assert torch.equal(seqs[on], ref_seqs[on])
    torch.testing.assert_close(logits[on], ref_logits[on], atol=1e-5, rtol=0)


def test_handle_reports_the_gates_the_reference_decides(mp, built, images):
    model, processor = mp
    glasses, path = built
    enc = encode(processor, QUESTIONS, images)
    with Reference(model, path, torch.full((len(QUESTIONS),), enc["input_ids"].shape[1] - 1)) as ref:
        hf_generate(model, enc)
    _, _, gate = wear_and_generate(glasses, model, processor, enc, "hooks")
    assert torch.equal(gate, ref.gate)


@pytest.mark.parametrize("mode", ["hooks", "nnsight"])
def test_batch_size_invariance(mp, built, images, mode):
    """A prompt generates the same alone as in a left-padded batch of other lengths and gates,
    all under one application (as in an evaluation): each call's gates are its own prompts'."""
    model, processor = mp
    glasses, _ = built
    run = nnsight_generate if mode == "nnsight" else hf_generate
    with glasses.apply(model, mode=mode, processor=processor) as handle:
        seqs, logits = run(handle.model, encode(processor, QUESTIONS, images))
        width = seqs.shape[1]
        for i in [*range(len(QUESTIONS)), *reversed(range(len(QUESTIONS)))]:
            alone, alone_logits = run(handle.model, encode(processor, [QUESTIONS[i]], [images[i]]))
            assert torch.equal(alone[0, -N_NEW:], seqs[i, width - N_NEW:])
            torch.testing.assert_close(alone_logits[0], logits[i], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["hooks", "nnsight"])
def test_several_return_sequences_per_prompt(mp, built, images, mode):
    """Sampling 3 answers per prompt: the batch is expanded before the prompt pass, each copy
    carries its prompt's gate, and the samples equal the reference's under the same seed."""
    model, processor = mp
    glasses, path = built
    enc = encode(processor, QUESTIONS, images)
    kw = {"do_sample": True, "num_return_sequences": 3, "temperature": 1.0, "top_k": 0}
    torch.manual_seed(11)
    with Reference(model, path, torch.full((len(QUESTIONS),), enc["input_ids"].shape[1] - 1)) as ref:
        ref_seqs, ref_logits = hf_generate(model, enc, **kw)
    torch.manual_seed(11)
    with glasses.apply(model, mode=mode, processor=processor) as handle:
        run = nnsight_generate if mode == "nnsight" else hf_generate
        seqs, logits = run(handle.model, enc, **kw)
        if mode == "hooks":
            assert torch.equal(handle.state["gate"], ref.gate)
    assert ref.gate.shape == (3 * len(QUESTIONS),) and 0 < int(ref.gate.sum()) < 3 * len(QUESTIONS)
    assert torch.equal(ref.gate.view(-1, 3), ref.gate.view(-1, 3)[:, :1].expand(-1, 3))  # one gate per prompt
    assert torch.equal(seqs, ref_seqs)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)


def test_nnsight_equals_hooks(mp, built, images):
    model, processor = mp
    glasses, _ = built
    enc = encode(processor, QUESTIONS, images)
    hook_seqs, hook_logits, _ = wear_and_generate(glasses, model, processor, enc, "hooks")
    nn_seqs, nn_logits, _ = wear_and_generate(glasses, model, processor, enc, "nnsight")
    assert torch.equal(hook_seqs, nn_seqs)
    torch.testing.assert_close(nn_logits, hook_logits, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- one forward pass (log-likelihood)


def scoring_batch(processor, images, continuation=" it is a red circle ."):
    """Prompt + continuation in one right-padded batch (how sgm_llava scores options), and each
    row's context end."""
    texts = [chat(processor, q) + continuation for q in QUESTIONS]
    enc = processor(text=texts, images=list(images), padding=True, padding_side="right", return_tensors="pt")
    context = processor(text=[chat(processor, q) for q in QUESTIONS], images=list(images), padding=True,
                        padding_side="right", return_tensors="pt")["attention_mask"].sum(1)
    return enc, context - 1


@pytest.mark.parametrize("mode", ["hooks", "nnsight"])
def test_scoring_pass_gates_at_the_context_end(mp, built, images, mode):
    """One forward over prompt + continuation: the gate is read where the prompt ends (the last
    token of the generation prompt), not at the last token, so a continuation cannot open or
    close it; the logits equal the reference gating at the context end."""
    model, processor = mp
    glasses, path = built
    enc, context_end = scoring_batch(processor, images)
    with torch.no_grad():
        vanilla = model(**enc).logits
        with Reference(model, path, context_end) as ref:
            want = model(**enc).logits
        with glasses.apply(model, mode=mode, processor=processor) as handle:
            if mode == "nnsight":
                with handle.model.trace(**enc):
                    got = handle.model.output.logits.save()
            else:
                got = model(**enc).logits
                assert torch.equal(handle.state["decision"], context_end)
    assert 0 < int(ref.gate.sum()) < len(QUESTIONS)
    off = ~ref.gate
    assert torch.equal(got[off], vanilla[off])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # the same gates as the prompts alone get at generation
    _, _, gen_gate = wear_and_generate(glasses, model, processor, encode(processor, QUESTIONS, images), "hooks",
                                       max_new_tokens=1, min_new_tokens=1)
    assert torch.equal(ref.gate, gen_gate)


def test_decision_positions():
    marker = [6, 7]
    ids = torch.tensor([[0, 0, 5, 6, 7, 9],   # left padded, marker then a continuation
                        [5, 6, 7, 6, 7, 0],   # right padded: the last occurrence counts
                        [5, 5, 5, 6, 0, 0]])  # no marker: the last non-padding token
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    assert decision_positions(ids, mask, marker, 6, 3).tolist() == [4, 4, 3]
    assert decision_positions(ids, None, [], 6, 3).tolist() == [5, 5, 5]
    # a marker that starts in the padding is no occurrence
    assert decision_positions(torch.tensor([[7, 6, 7]]), torch.tensor([[0, 1, 1]]), [7, 6], 3, 1).tolist() == [2]


# ---------------------------------------------------------------- strength, variants, refusals


def test_strength_scales_c_and_zero_is_vanilla(mp, built, images):
    model, processor = mp
    glasses, _ = built
    enc = encode(processor, QUESTIONS, images)
    _, vanilla = hf_generate(model, enc)
    with glasses.apply(model, strength=0.0):
        assert torch.equal(hf_generate(model, enc)[1], vanilla)
    with glasses.apply(model, strength=0.5):
        half = hf_generate(model, enc)[1]
    with glasses.with_options(c=C / 2).apply(model, strength=1.0):
        torch.testing.assert_close(hf_generate(model, enc)[1], half, atol=1e-5, rtol=0)
    assert not torch.equal(half, vanilla)
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
        glasses.apply(model, strength=2.0)


def test_ungated_variant_steers_every_row(mp, built, images):
    model, processor = mp
    glasses, path = built
    ungated = glasses.with_options(gated=False)
    assert ungated.digest() != glasses.digest()
    enc = encode(processor, QUESTIONS, images)
    _, vanilla = hf_generate(model, enc)
    _, logits, gate = wear_and_generate(ungated, model, processor, enc, "hooks")
    assert bool(gate.all())
    assert all(not torch.allclose(logits[i], vanilla[i], atol=1e-3) for i in range(len(QUESTIONS)))
    saved = ungated.save(path.parent / f"{path.name}-ungated")
    with Reference(model, saved, torch.full((len(QUESTIONS),), enc["input_ids"].shape[1] - 1)):
        _, ref_logits = hf_generate(model, enc)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)


def test_fold_is_refused(mp, built):
    model, _ = mp
    with pytest.raises(ValueError, match="mode='fold' cannot wear gated-steering glasses: the gate is decided per sequence"):
        built[0].apply(model, mode="fold")
    assert intervention._WEARING.get(model) is None or not intervention._WEARING[model].active


def test_remote_execution_applies_the_edits_inside_each_trace(mp, built, images):
    """Steering glasses worn remotely (remote=local: nnsight's emulation, the trace serialised as for
    a server) used to be refused: every trace now applies the same edits (begin_forward and the
    layer edits) on every step, and gives the hooks' logits and greedy tokens; nothing is installed
    on the model."""
    from lmms_sgm.interventions.wearing import wear

    model, processor = mp
    glasses, _ = built
    enc = encode(processor, QUESTIONS, images)
    hook_seqs, _, _ = wear_and_generate(glasses, model, processor, enc, "hooks")
    with glasses.apply(model) as handle, torch.no_grad():
        hook_logits = model(**enc).logits
    del handle
    with wear(model, glasses, "nnsight", processor=processor, remote="local") as remote_handle:
        assert intervention._WEARING.get(model) is None or not intervention._WEARING[model].active
        logits = remote_handle.logits(dict(enc))
        seqs = remote_handle.generate(dict(enc), max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False)
    torch.testing.assert_close(logits, hook_logits, atol=1e-5, rtol=0)
    assert torch.equal(seqs, hook_seqs)


def test_a_decoding_step_without_its_prompt_pass_is_refused(mp, built, images):
    """A cache passed in from elsewhere has no gate decided for it: an error, not a guess."""
    model, processor = mp
    enc = encode(processor, QUESTIONS[:2], images[:2])
    with torch.no_grad():
        out = model(**enc, use_cache=True)
        with built[0].apply(model), pytest.raises(RuntimeError, match="without the prefill that decides its gates"):
            model(input_ids=out.logits[:, -1:].argmax(-1), attention_mask=torch.cat(
                [enc["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1), cache=out.cache)


def test_one_pair_of_glasses_at_a_time(mp, built):
    model, _ = mp
    with built[0].apply(model), pytest.raises(RuntimeError, match="already wears glasses"):
        built[0].apply(model)


# ---------------------------------------------------------------- the artifact


def test_round_trip_and_identical_bytes(mp, built, tmp_path):
    glasses, path = built
    again = SafetyGlasses.load(path)
    assert isinstance(again, SteeringGlasses) and isinstance(Glasses.load(path), SteeringGlasses)
    assert again.digest() == glasses.digest() and again.integrity.startswith("ok")
    assert torch.equal(again.steer, glasses.steer) and torch.equal(again.gate_direction, glasses.gate_direction)
    copy = again.save(tmp_path / "copy")
    for name in ("manifest.json", "glasses.safetensors"):
        assert (copy / name).read_bytes() == (path / name).read_bytes()
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == 3 and manifest["kind"] == "gated_steering"
    assert set(load_file(str(path / "glasses.safetensors"))) == {"steer", "gate_direction", "gate_projections", "gate_labels"}
    gate = manifest["gate"]
    assert {"auroc", "overlap", "misclassified", "margin", "threshold"} <= set(gate)
    # the threshold is where gate_threshold says, between the class means
    t = manifest["steering_options"]["gate_threshold"]
    assert gate["threshold"] == pytest.approx(gate["benign_mean"] + t * (gate["harmful_mean"] - gate["benign_mean"]))


def test_rebuilding_gives_the_same_bytes(mp, toy_jsonl, tmp_path):
    model, processor = mp
    options = SteeringOptions(c=2.0, batch_size=3)
    a = build_steering_glasses(model, processor, toy_jsonl, toy_jsonl, options, out=tmp_path / "a", progress=False)
    options = SteeringOptions(c=2.0, batch_size=8)
    build_steering_glasses(model, processor, toy_jsonl, toy_jsonl, options, out=tmp_path / "b", progress=False)
    assert (tmp_path / "a" / "glasses.safetensors").read_bytes() == (tmp_path / "b" / "glasses.safetensors").read_bytes()
    assert a.digest() == SafetyGlasses.load(tmp_path / "b").digest()


def test_steer_and_gate_are_the_class_mean_differences(mp, toy_jsonl, toy_pairs):
    """The steer is the toxic minus the non-toxic mean of the layer's output over the response
    positions; the gate direction the unit harmful-minus-benign mean at the decision position."""
    from lmms_sgm.data import encode_batch
    from lmms_sgm.profiling import prompt_lengths

    model, processor = mp
    glasses = build_steering_glasses(model, processor, toy_jsonl, toy_jsonl, SteeringOptions(layer=0), progress=False)
    acts = []
    layer = model.get_submodule(glasses.steer_site.module_path)
    responses, decisions = [], []
    for pair in toy_pairs:
        enc = encode_batch(processor, [pair], "question+response")
        start = int(prompt_lengths(processor, [pair], enc)[0])
        handle = layer.register_forward_hook(lambda m, a, out: acts.append(out[0]))  # None: output kept
        with torch.no_grad():
            model(**enc)
        handle.remove()
        h = acts.pop().double()
        responses.append(h[start:].mean(0))
        decisions.append(h[start - 1])
    labels = torch.tensor(toy_pairs.labels, dtype=torch.bool)
    r, d = torch.stack(responses), torch.stack(decisions)
    steer = r[labels].mean(0) - r[~labels].mean(0)
    direction = d[labels].mean(0) - d[~labels].mean(0)
    torch.testing.assert_close(glasses.steer.double(), steer, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(glasses.gate_direction.double(), direction / direction.norm(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(glasses.gate_projections, d @ glasses.gate_direction.double(), atol=1e-4, rtol=1e-6)
    from sklearn.metrics import roc_auc_score

    assert glasses.manifest["gate"]["auroc"] == roc_auc_score(labels.int(), glasses.gate_projections)


def test_wrong_model_is_refused(built, tmp_path):
    from lmms_sgm import models

    other, _ = models.load(str(tiny.build_tiny_llava(tmp_path / "other", num_layers=3)))
    with pytest.raises(GlassesMismatch, match="num_layers: glasses 2 vs model 3"):
        built[0].apply(other)
    assert not [h for m in other.modules() for h in m._forward_hooks.values()
                if not getattr(h, "__module__", "").startswith("transformers.")]


def _edit(path, **changes):
    m = json.loads((path / "manifest.json").read_text())
    m.update(changes)
    (path / "manifest.json").write_text(json.dumps(m))


def test_damaged_or_edited_steering_glasses_are_refused(built, tmp_path):
    glasses, _ = built
    p = glasses.save(tmp_path / "edited")
    _edit(p, gate={**glasses.manifest["gate"], "threshold": 0.0})
    with pytest.raises(GlassesError, match="content digest mismatch"):
        SafetyGlasses.load(p)
    p = glasses.save(tmp_path / "flipped")
    raw = bytearray((p / "glasses.safetensors").read_bytes())
    raw[-3] ^= 1
    (p / "glasses.safetensors").write_bytes(bytes(raw))
    with pytest.raises(GlassesError, match="content does not match the sha256"):
        SafetyGlasses.load(p)
    p = glasses.save(tmp_path / "kind")
    _edit(p, kind="telepathy")
    with pytest.raises(GlassesError, match="unknown glasses kind 'telepathy'"):
        SafetyGlasses.load(p)


def test_sgm_glasses_are_not_steering_glasses(mp, toy_jsonl, tmp_path):
    from lmms_sgm.pipeline import build_glasses

    model, processor = mp
    build_glasses(model, processor, toy_jsonl, out=tmp_path / "sgm", progress=False)
    manifest = json.loads((tmp_path / "sgm" / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and "kind" not in manifest  # SGM glasses: format 2, unchanged
    with pytest.raises(GlassesError, match="these are sgm glasses, not gated_steering"):
        SteeringGlasses.load(tmp_path / "sgm")


# ---------------------------------------------------------------- building: refusals


def test_build_refusals(mp, toy_jsonl, tmp_path):
    model, processor = mp
    with pytest.raises(ValueError, match="gate_layer 1 comes after the steered layer 0"):
        build_steering_glasses(model, processor, toy_jsonl, toy_jsonl, SteeringOptions(layer=0, gate_layer=1), progress=False)
    with pytest.raises(ValueError, match="needs gate data"):
        build_steering_glasses(model, processor, toy_jsonl, None, SteeringOptions(), progress=False)
    with pytest.raises(ValueError, match="layer 5 is not a post-fusion decoder layer"):
        build_steering_glasses(model, processor, toy_jsonl, toy_jsonl, SteeringOptions(layer=5), progress=False)
    ungated = build_steering_glasses(model, processor, toy_jsonl, None, SteeringOptions(gated=False),
                                     out=tmp_path / "u", progress=False)
    assert ungated.gate_direction is None and SafetyGlasses.load(tmp_path / "u").digest() == ungated.digest()
    with pytest.raises(ValueError, match="built without gate data"):
        ungated.with_options(gated=True)
    with pytest.raises(ValueError, match="layer change what is profiled"):
        ungated.with_options(layer=0)
    for bad, message in (({"c": -1.0}, "c must be a finite number"), ({"gate_threshold": float("nan")}, "gate_threshold"),
                         ({"steer_from": "end"}, "unknown steer_from")):
        with pytest.raises(ValueError, match=message):
            SteeringOptions(**bad)


def test_summary_names_layer_norms_threshold_and_separation(built):
    text = built[0].summary()
    for needed in ("integrity: ok", "kind: gated_steering", "output of decoder layer", "|steer| =", "threshold",
                   "projection AUROC", "on the wrong side of the threshold", "decision marker"):
        assert needed in text
    assert "\n" not in repr(built[0]) and "SteeringGlasses(layer" in repr(built[0])


# ---------------------------------------------------------------- command line and lmms-eval


def test_cli_steer_inspect_and_select(tiny_dir, toy_jsonl, tmp_path, capsys, mp):
    from lmms_sgm.cli import main

    out = tmp_path / "s"
    rc = main(["steer", "--model", str(tiny_dir), "--data", str(toy_jsonl), "--gate-data", str(toy_jsonl), "--out", str(out),
               "--layer", "-1", "--gate-layer", "0", "--c", "3", "--steer-from", "decision", "--batch-size", "3", "--no-progress"])
    assert rc == 0
    assert "wrote" in capsys.readouterr().out
    g = SafetyGlasses.load(out)
    assert (g.steer_site.layer, g.gate_site.layer, g.options.c, g.options.steer_from) == (1, 0, 3.0, "decision")
    # the CLI computes what the Python API computes with the same options
    api = build_steering_glasses(*mp, toy_jsonl, toy_jsonl, SteeringOptions(layer=-1, gate_layer=0, c=3, steer_from="decision"),
                                 progress=False)
    assert api.digest() == g.digest()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "kind: gated_steering" in text and "projection AUROC" in text and "|steer| =" in text
    assert main(["select", str(out), "--out", str(tmp_path / "x")]) == 2
    assert "gated_steering glasses, which have no experts to select" in capsys.readouterr().err
    assert main(["steer", "--model", str(tiny_dir), "--data", str(toy_jsonl), "--out", str(tmp_path / "y")]) == 2
    assert "--gate-data is required" in capsys.readouterr().err and not (tmp_path / "y").exists()


def test_lmms_eval_wrapper_wears_steering_glasses(tiny_dir, built, images, mp):
    """``--model_args glasses=DIR`` as for SGM glasses; ``strength`` scales c; loglikelihood and
    generation equal the core API's results."""
    from lmms_eval.api.instance import Instance

    from lmms_sgm.lmms.model import SGMLlava

    glasses, path = built
    model, processor = mp
    docs = [{"image": img, "question": q} for img, q in zip(images, QUESTIONS)]

    def make(args):
        lm = SGMLlava.create_from_arg_string(f"pretrained={tiny_dir},{args}", {"batch_size": "3"})
        lm.task_dict = {"t": {"s": docs}}
        return lm

    def visual(doc):
        return [doc["image"]]

    gen = [Instance("generate_until", (q, {"max_new_tokens": N_NEW, "temperature": 0}, visual, i, "t", "s"), idx=0,
                    metadata={"task": "t", "doc_id": i, "repeats": 1}) for i, q in enumerate(QUESTIONS)]
    ll = [Instance("loglikelihood", (q, " it is a red circle .", visual, i, "t", "s"), idx=0,
                   metadata={"task": "t", "doc_id": i, "repeats": 1}) for i, q in enumerate(QUESTIONS)]
    lm = make(f"glasses={path}")
    assert lm.sgm_info["kind"] == "gated_steering" and lm.sgm_info["glasses_digest"] == glasses.digest()
    texts, losses = lm.generate_until(gen), [r[0] for r in lm.loglikelihood(ll)]
    lm.clean()
    with glasses.apply(model) as handle:
        want = []
        for q, img in zip(QUESTIONS, images):
            seqs, _ = hf_generate(handle.model, encode(processor, [q], [img]))
            want.append(processor.tokenizer.decode(seqs[0, -N_NEW:], skip_special_tokens=True))
    assert texts == want
    vanilla = make("sgm=off")
    plain = [r[0] for r in vanilla.loglikelihood(ll)]
    vanilla.clean()
    assert losses != plain  # some rows are steered ...
    assert any(a == b for a, b in zip(losses, plain))  # ... and gated-off rows score as without glasses
    half = make(f"glasses={path},strength=0.5")
    assert half.sgm_info["strength"] == 0.5
    half_losses = [r[0] for r in half.loglikelihood(ll)]
    half.clean()
    saved = glasses.with_options(c=C / 2).save(path.parent / f"{path.name}-half")
    also = make(f"glasses={saved}")
    assert [r[0] for r in also.loglikelihood(ll)] == pytest.approx(half_losses, abs=1e-5)
    also.clean()
    with pytest.raises(ValueError, match="select_\\* options re-select SGM experts"):
        make(f"glasses={path},select_threshold=0.3")
