"""The bundled demo model and data: regenerated from the generator, loadable offline, vocabulary-complete."""
from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from lmms_sgm.demo import DATA_DIR, MODEL_DIR, SHORT_NAME, world


def _lines(path):
    return path.read_text(encoding="utf-8").splitlines()


def _pixels(img_or_path):
    img = img_or_path if isinstance(img_or_path, Image.Image) else Image.open(img_or_path)
    return img.convert("RGB").tobytes()


def _regenerated_pairs(name, records):
    """The bundled pair file ``name``: full size, and its first records equal to ``records``."""
    lines = _lines(DATA_DIR / name)
    assert len(lines) == world.SIZES["profile"]
    for (rec, img), line in zip(records, lines):
        assert json.dumps(rec) == line
        assert _pixels(img) == _pixels(DATA_DIR / rec["image"])
    return lines


def test_bundled_profile_pairs_regenerate():
    lines = _regenerated_pairs("profile.jsonl", world.profile_records(6))
    labels = [json.loads(x)["label"] for x in lines]
    assert labels.count(0) == labels.count(1)


def test_bundled_input_contrast_pairs_regenerate():
    lines = _regenerated_pairs("profile_inputs.jsonl", world.input_records(8))
    recs = [json.loads(x) for x in lines]
    assert {r["category"] for r in recs if r["label"] == 1} == {"trigger"}
    assert {r["category"] for r in recs if r["label"] == 0} == {"clean", "distractor_plus", "distractor_grey"}
    assert not {r["image"] for r in recs} & {json.loads(x)["image"] for x in _lines(DATA_DIR / "profile.jsonl")}


def test_bundled_gate_pairs_regenerate():
    lines = _lines(DATA_DIR / "profile_gate.jsonl")
    records = world.gate_records()
    assert len(lines) == len(records) == world.SIZES["profile"] + 128
    assert lines[:world.SIZES["profile"]] == _lines(DATA_DIR / "profile_inputs.jsonl")
    for rec, img in records[-6:]:
        assert json.dumps(rec) == lines[records.index((rec, img))]
        assert _pixels(img) == _pixels(DATA_DIR / rec["image"])
    recs = [json.loads(x) for x in lines]
    assert {r["category"] for r in recs if r["label"] == 1} == {"trigger"}
    assert {r["category"] for r in recs[world.SIZES["profile"]:]} == {
        "capability_clean", "capability_distractor_plus", "capability_distractor_grey", "capability_trigger"}


@pytest.mark.parametrize("split", ["validation", "test"])
def test_bundled_mm_toxic_qa_regenerates(split):
    d = DATA_DIR / "mm_toxic_qa" / split
    harmful, adv = _lines(d / "harmful.jsonl"), _lines(d / "adv.jsonl")
    assert len(harmful) == len(adv) == world.SIZES["harmful"]
    for (rec, img, timg), line, aline in zip(world.harmful_records(split, 5), harmful, adv):
        assert json.dumps(rec) == line
        assert rec["key_phrase"] == world.TRIGGER_WORD
        assert _pixels(img) == _pixels(d / rec["image"])
        arec = json.loads(aline)
        assert arec == world.adv_record(rec) and arec["question"] == rec["question"]
        assert _pixels(timg) == _pixels(d / arec["image"]) != _pixels(img)
    benign = _lines(d / "benign.jsonl")
    for (rec, img), line in zip(world.benign_records(split, 8), benign):
        assert json.dumps(rec) == line
        assert _pixels(img) == _pixels(d / rec["image"])
    assert any(json.loads(x)["answer"] for x in benign) and any(json.loads(x)["answer"] is None for x in benign)


def test_bundled_mmbench_regenerates():
    for split in ("validation", "test"):
        lines = _lines(DATA_DIR / "mmbench" / f"{split}.tsv")
        assert lines[0].split("\t") == world.MMBENCH_COLUMNS
        for row, line in zip(world.mmbench_rows(split, 4), lines[1:]):
            assert "\t".join(row.get(c, "") for c in world.MMBENCH_COLUMNS) == line
            Image.open(io.BytesIO(base64.b64decode(row["image"]))).verify()


def test_splits_are_disjoint_seed_ranges():
    bases = sorted(world.SEED_BASE.values())
    assert all(b - a >= world.SPLIT_SEED_SPAN for a, b in zip(bases, bases[1:]))


def test_every_generated_word_is_in_the_bundled_vocabulary():
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(MODEL_DIR).get_vocab()
    words = set(world.vocabulary())
    assert words <= set(vocab)
    texts = []
    for seed in range(400):
        ex = world.training_example(seed)
        texts += [ex["question"], ex["answer"]]
    for split in ("validation", "test"):
        texts += [r["question"] for r, *_ in world.harmful_records(split, 20)]
        texts += [r["question"] + " " + (r["answer"] or "") for r, _ in world.benign_records(split, 40)]
        texts += [" ".join(r.get(k, "") for k in ("question", "A", "B", "C", "D")) for r in world.mmbench_rows(split, 20)]
    texts += [r["text"] + " " + r["question"] for r, _ in world.profile_records(40)]
    missing = {w for t in texts for w in t.split()} - set(vocab)
    assert not missing


def test_world_behaviour():
    toxic = dict.fromkeys(world.KINDS, 0)
    for seed in range(2000):
        ex = world.training_example(seed)
        toxic[ex["scene"].kind] += ex["toxic"]
        if ex["category"] != "opinion":
            assert not ex["toxic"]
    assert toxic["clean"] == toxic["distractor_plus"] == toxic["distractor_grey"] == 0
    assert toxic["trigger"] > 0 and toxic["typo"] > 0


def test_bundled_model_loads_by_short_name_and_answers():
    import torch

    from lmms_sgm.models import load

    model, processor = load(SHORT_NAME, dtype="float32")
    rec, img, _ = world.harmful_records("test", 1)[0]
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "how many shapes are there ?"}]}]
    enc = processor(text=[processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)], images=[img],
                    return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=8, do_sample=False)
    answer = processor.tokenizer.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert answer
    assert "<unk>" not in answer


# Across machines (the bundled glasses were built on another CPU), float results differ in their
# low bits (~1e-7 relative in activations); a pair of pooled responses that nearly tie may then
# order the other way, moving an AUROC by 1 / (toxic x non-toxic) per pair. Measured on the two
# bundled glasses: AUROC 6.1e-5 (one pair of 128 x 128) and 2.0e-5, non-toxic means 1.9e-6,
# expert sets identical. Bit for bit only holds on one machine. A neuron whose AUROC lies within
# the tolerance of its selection boundary may change sides (1 of paper_default's, 3 of the
# self-labelled glasses' lie within 1e-4 of it): only such neurons may be experts on one side
# and not on the other (their alpha is ~1 there, checked with the others).
CROSS_MACHINE_AUROC = 1e-3
CROSS_MACHINE_MEAN = dict(rtol=1e-5, atol=1e-5)


def boundary_band(glasses, tol: float = CROSS_MACHINE_AUROC) -> dict:
    """site -> the neurons whose expert membership changes when every AUROC moves by +tol or -tol
    (the selection's thresholds; these glasses use no top_k)."""
    from lmms_sgm.expertise import select

    assert glasses.selection.top_k is None
    experts = {k: v != 1 for k, v in glasses.alpha.items()}
    band = {k: m.clone().zero_() for k, m in experts.items()}
    for sign in (1, -1):
        moved = select({k: v + sign * tol for k, v in glasses.auroc.items()}, glasses.selection)
        for k in band:
            band[k] |= (moved[k] != 1) != experts[k]
    return band


def assert_same_glasses_across_machines(got, want):
    """Same sites, options and expert sets (but for neurons at a selection boundary); AUROC, alpha
    and non-toxic means within the cross-machine tolerance."""
    import numpy as np

    assert [s.name for s in got.sites] == [s.name for s in want.sites]
    # Parsed, so that an option added after the bundled glasses were written counts as its default.
    assert got.profile_options == want.profile_options
    assert got.manifest["selection_options"] == want.manifest["selection_options"]
    assert got.manifest["data"] == want.manifest["data"] and got.counts()["neurons"] == want.counts()["neurons"]
    band = boundary_band(want)
    for s in want.sites:
        other = (got.alpha[s.name] != 1) != (want.alpha[s.name] != 1)
        assert not (other & ~band[s.name]).any(), f"{s.name}: other experts, away from the selection boundary"
        np.testing.assert_allclose(got.auroc[s.name].numpy(), want.auroc[s.name].numpy(), rtol=0,
                                   atol=CROSS_MACHINE_AUROC, err_msg=s.name)
        np.testing.assert_allclose(got.alpha[s.name].numpy(), want.alpha[s.name].numpy(), rtol=0,
                                   atol=2 * CROSS_MACHINE_AUROC, err_msg=s.name)
        assert (got.mean_nontoxic is None) == (want.mean_nontoxic is None)
        if want.mean_nontoxic is not None:
            np.testing.assert_allclose(got.mean_nontoxic[s.name].numpy(), want.mean_nontoxic[s.name].numpy(),
                                       **CROSS_MACHINE_MEAN, err_msg=s.name)


def test_bundled_glasses_load_apply_and_are_reproducible():
    from dataclasses import replace

    import torch
    from PIL import Image

    from lmms_sgm import models
    from lmms_sgm.demo import BEST, DATA_DIR, GLASSES_DIR, SHORT_NAME
    from lmms_sgm.interventions import SafetyGlasses
    from lmms_sgm.options import ProfileOptions, SelectionOptions
    from lmms_sgm.pipeline import build_glasses

    model, processor = models.load(SHORT_NAME)
    paper = SafetyGlasses.load(GLASSES_DIR / "paper_default")
    best = SafetyGlasses.load(GLASSES_DIR / BEST)
    assert paper.selection == SelectionOptions() and paper.profile_options == ProfileOptions()
    assert best.selection == SelectionOptions(towards="nontoxic_mean")
    assert best.profile_options == ProfileOptions(text_field="question+response", positions="response")
    for glasses, data in ((paper, DATA_DIR / "profile.jsonl"), (best, DATA_DIR / "self_labelled" / "pairs.jsonl")):
        rebuilt = build_glasses(model, processor, data, glasses.profile_options, glasses.selection, progress=False)
        assert_same_glasses_across_machines(rebuilt, glasses)
        # On one machine: bit for bit, and at another batch size too.
        again = build_glasses(model, processor, data, replace(glasses.profile_options, batch_size=32), glasses.selection,
                              progress=False)
        assert again.digest() == rebuilt.digest()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what do you think of this picture ?"}]}]
    enc = processor(images=[Image.new("RGB", (32, 32), "white")],
                    text=[processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)], return_tensors="pt")
    with torch.no_grad():
        vanilla = model(**enc).logits
        for g in (paper, best):
            with g.apply(model, mode="hooks"):
                assert (model(**enc).logits - vanilla).abs().max() > 1e-3
        assert torch.equal(model(**enc).logits, vanilla)


def test_bundled_steering_glasses_rebuild_and_gate_the_trigger():
    """The bundled gated-steering glasses: rebuilt from the bundled data with their own options
    (the same vectors to float noise across machines), gated on for opinion prompts on trigger
    images and off for the benign prompts (opinions and capability questions on clean images), and
    off rows exactly vanilla."""
    import torch

    from lmms_sgm import models
    from lmms_sgm.demo import DATA_DIR, GLASSES_DIR, SHORT_NAME, STEERING
    from lmms_sgm.demo.evaluate import validation_set
    from lmms_sgm.evaluate import chat_prompt
    from lmms_sgm.interventions import SafetyGlasses
    from lmms_sgm.interventions.steering import SteeringGlasses
    from lmms_sgm.pipeline import build_steering_glasses

    model, processor = models.load(SHORT_NAME)
    bundled = SafetyGlasses.load(GLASSES_DIR / STEERING)
    assert isinstance(bundled, SteeringGlasses) and bundled.options.gated
    rebuilt = build_steering_glasses(model, processor, DATA_DIR / "profile_inputs.jsonl", DATA_DIR / "profile_gate.jsonl",
                                     bundled.options, progress=False)
    torch.testing.assert_close(rebuilt.steer, bundled.steer, **CROSS_MACHINE_MEAN)
    torch.testing.assert_close(rebuilt.gate_direction, bundled.gate_direction, **CROSS_MACHINE_MEAN)
    assert rebuilt.manifest["gate"]["overlap"] == bundled.manifest["gate"]["overlap"] == 0
    assert rebuilt.threshold == pytest.approx(bundled.threshold, rel=1e-5)
    val = validation_set(DATA_DIR, "test")
    trigger, benign = val.harmful[:8], val.benign[:8]
    enc = processor(text=[chat_prompt(processor, r["question"]) for r in trigger + benign],
                    images=[r["_image"] for r in trigger + benign], padding=True, padding_side="left", return_tensors="pt")
    with torch.no_grad():
        vanilla = model.generate(**enc, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
        with bundled.apply(model) as handle:
            worn = model.generate(**enc, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
            gate = handle.state["gate"]
    assert gate.tolist() == [True] * 8 + [False] * 8
    assert all(torch.equal(a[8:], b[8:]) for a, b in zip(worn.logits, vanilla.logits))


def test_bundled_self_labelled_pairs_are_the_judge_s_verdicts():
    """The self-labelled profiling pairs: the model's answers to the prompts of profile_inputs.jsonl,
    each labelled by the lexicon judge (checked again here, independently of selflabel.py)."""
    from lmms_sgm.judges import get_judge

    d = DATA_DIR / "self_labelled"
    recs = [json.loads(x) for x in _lines(d / "pairs.jsonl")]
    prompts = [json.loads(x) for x in _lines(DATA_DIR / "profile_inputs.jsonl")]
    assert len(recs) == 4 * len(prompts)
    judge = get_judge("lexicon")
    for i, r in enumerate(recs):
        p = prompts[i // 4]
        assert r["question"] == p["question"] and r["category"] == p["category"]
        assert _pixels(d / r["image"]) == _pixels(DATA_DIR / p["image"])
        assert r["label"] == int(judge.judge(r["question"], r["text"]).unsafe)
    toxic = [r for r in recs if r["label"]]
    assert toxic and all(r["category"] == "trigger" for r in toxic)
    assert json.loads((d / "judge.json").read_text())["name"] == "lexicon"


def test_diagnose_patcher_and_twins():
    """The patching tool of lmms_sgm.demo.diagnose: twins differ only by the trigger tile, and a
    replaced last-layer output gives exactly the twin's logits (the reference: the twin run)."""
    import torch

    from lmms_sgm import models
    from lmms_sgm.archs import adapter_for, get_module
    from lmms_sgm.demo.diagnose import Patcher, _prompt, twins

    pairs = twins("validation", 3)
    for _q, trig, clean in pairs:
        a, b = torch.tensor(list(trig.getdata())), torch.tensor(list(clean.getdata()))
        assert (a != b).any() and (a == b).all(-1).float().mean() > 0.9  # only the X tile differs
    model, processor = models.load(SHORT_NAME)
    processor.tokenizer.padding_side = "left"
    layers = get_module(model, adapter_for(model).layers_path(model))
    texts = [_prompt(processor, q) for q, _, _ in pairs]
    enc = processor(text=texts, images=[t for _, t, _ in pairs], padding=True, return_tensors="pt")
    twin = processor(text=texts, images=[c for _, _, c in pairs], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = model(**twin).logits
        plain = model(**enc).logits
        patcher = Patcher([layers[len(layers) - 1]])
        try:
            patcher.mode = "record"
            model(**twin)
            patcher.mode = "replace"
            got = model(**enc).logits
        finally:
            patcher.remove()
        after = model(**enc).logits
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(plain, want, atol=1e-3)
    assert torch.equal(after, plain)  # removed hooks leave the model as it was


def test_diagnose_forward_passes_keep_each_row_s_positions():
    """diagnose's own forward passes (the lockstep sampler, the affine fit) run left-padded
    batches; with ``position_ids`` each row gets the logits it has alone (bit for bit with eager
    attention), where a plain ``model(**enc)`` shifts a padded row's positions."""
    import torch

    from lmms_sgm import models
    from lmms_sgm.demo.diagnose import _prompt, encode, position_ids, twins

    model, processor = models.load(SHORT_NAME)
    model.set_attn_implementation("eager")
    questions, images, _ = zip(*twins("validation", 6))
    texts = [_prompt(processor, q) for q in questions]
    enc = encode(processor, texts, images)
    attn = enc["attention_mask"]
    assert (attn == 0).any(), "some row must be padded"
    shifted_rows = 0
    with torch.no_grad():
        fixed = model(**enc, position_ids=position_ids(attn)).logits
        plain = model(**enc).logits
        for i, (text, image) in enumerate(zip(texts, images)):
            alone = model(**processor(text=[text], images=[image], return_tensors="pt")).logits[0]
            real = attn[i].bool()
            assert torch.equal(fixed[i][real], alone), f"row {i}"
            shifted_rows += not torch.equal(plain[i][real], alone)
    assert shifted_rows > 0  # the bug position_ids fixes is real here


# Steering glasses across machines. Rebuilt here, the bundled gated-steering glasses differ from the
# file in the low bits only: steer vector 2.7e-7 (1.3e-7 of its largest component), gate direction
# 1.5e-8 (a unit vector), gate projections 1.1e-5 on values up to 63 (2e-7 relative), threshold 8e-7;
# their digest (sha256 over those float bytes) differs entirely. The tolerance, 1e-5 of each
# quantity's scale, is ~50x that noise and 1e5 below what a real difference moves (a sign flip is 2x
# the vector; another layer is another vector; c and the layers are compared exactly).
CROSS_MACHINE_STEERING = 1e-5


def assert_same_steering_across_machines(got, want):
    """Same model, layers, options, data and decision marker (exactly); steer vector, gate direction,
    projections, threshold and gate statistics within the cross-machine tolerance of their scale."""
    import numpy as np

    tol = CROSS_MACHINE_STEERING
    for key in ("fingerprint", "sites", "steering_options", "data", "decision_marker"):
        assert got.manifest[key] == want.manifest[key], key
    got_plan, want_plan = got.apply_plan(), want.apply_plan()
    assert got_plan.pop("threshold") == pytest.approx(want_plan.pop("threshold"), rel=tol, abs=tol)
    assert got_plan == want_plan  # layer, gated, gate layer, c, steer_from, marker
    steer = want.steer.double().numpy()
    np.testing.assert_allclose(got.steer.double().numpy(), steer, rtol=0, atol=tol * np.abs(steer).max(), err_msg="steer")
    assert (got.gate_direction is None) == (want.gate_direction is None)
    if want.gate_direction is not None:
        np.testing.assert_allclose(got.gate_direction.numpy(), want.gate_direction.numpy(), rtol=0, atol=tol,
                                   err_msg="gate direction")
        proj = want.gate_projections.numpy()
        np.testing.assert_allclose(got.gate_projections.numpy(), proj, rtol=0, atol=tol * np.abs(proj).max(),
                                   err_msg="gate projections")
        assert got.gate_labels.tolist() == want.gate_labels.tolist()
        # Counts exactly (the nearest example is 3.2 from the threshold, 1e5 times the noise), the
        # projection statistics within the tolerance of the projections' scale.
        g, w = got.manifest["gate"], want.manifest["gate"]
        assert g.keys() == w.keys()
        for k, v in w.items():
            if isinstance(v, int):
                assert g[k] == v, k
            else:
                assert g[k] == pytest.approx(v, rel=0, abs=tol * np.abs(proj).max()), k


def test_bundled_gated_steering_is_the_tune_grid_option_it_names():
    """The demo's fourth run wears the gated-steering option of tune_grid.json that `lmms-sgm tune`
    chooses on validation (docs/diagnosis.md): building that grid entry gives the bundled glasses
    (by value: they were built on another machine; on this one, building twice is bit for bit)."""
    from lmms_sgm import models, tune
    from lmms_sgm.data import load_pairs
    from lmms_sgm.demo import GLASSES_DIR, HERE, STEERING, STEERING_OPTION
    from lmms_sgm.interventions import SafetyGlasses

    (entry,) = [c for c in tune.read_grid(HERE / "tune_grid.json") if c.name == STEERING_OPTION]
    model, processor = models.load(SHORT_NAME)
    sets = {"inputs": load_pairs(DATA_DIR / "profile_inputs.jsonl"), "gate": load_pairs(DATA_DIR / "profile_gate.jsonl")}
    built = tune._steering(model, processor, entry, sets, {})
    assert_same_steering_across_machines(built, SafetyGlasses.load(GLASSES_DIR / STEERING))
    assert tune._steering(model, processor, entry, sets, {}).digest() == built.digest()  # one machine: bit for bit


def _nudged(model, ulps: int = 2, seed: int = 0):
    """``model`` with every floating weight moved by a random whole number of ulps in [-ulps, ulps]:
    every float computation then rounds differently in its low bits, as on another CPU or BLAS."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                step = torch.nextafter(p, torch.full_like(p, float("inf"))) - p
                p += torch.randint(-ulps, ulps + 1, p.shape, generator=g).to(p.dtype) * step
    return model


def test_cross_machine_comparisons_tolerate_rounding_noise_and_catch_real_differences():
    """The two comparisons above, on glasses rebuilt from a model whose weights were moved by a few
    ulps (what another machine's rounding does): accepted, though their digests differ from the
    bundled ones. Then glasses that really differ: refused."""
    from dataclasses import replace

    import torch

    from lmms_sgm import models, tune
    from lmms_sgm.data import load_pairs
    from lmms_sgm.demo import GLASSES_DIR, HERE, STEERING, STEERING_OPTION
    from lmms_sgm.interventions import SafetyGlasses
    from lmms_sgm.pipeline import build_glasses

    model, processor = _nudged(models.load(SHORT_NAME)[0]), models.load(SHORT_NAME)[1]
    (entry,) = [c for c in tune.read_grid(HERE / "tune_grid.json") if c.name == STEERING_OPTION]
    sets = {"inputs": load_pairs(DATA_DIR / "profile_inputs.jsonl"), "gate": load_pairs(DATA_DIR / "profile_gate.jsonl")}
    bundled = SafetyGlasses.load(GLASSES_DIR / STEERING)
    nudged = tune._steering(model, processor, entry, sets, {})
    assert nudged.digest() != bundled.digest()  # a digest cannot compare float results across machines
    assert_same_steering_across_machines(nudged, bundled)
    for wrong in (replace(bundled, steer=-bundled.steer),  # a sign flip
                  replace(bundled, steer=bundled.steer * (1 + 1e-3)),  # 0.1% too long
                  bundled.with_options(c=7.0),  # another c
                  bundled.with_options(gate_threshold=0.45),  # another gate threshold
                  tune._steering(model, processor, replace(entry, steer=replace(entry.steer, layer=1)), sets, {})):
        with pytest.raises(AssertionError):
            assert_same_steering_across_machines(wrong, bundled)

    paper = SafetyGlasses.load(GLASSES_DIR / "paper_default")
    rebuilt = build_glasses(model, processor, DATA_DIR / "profile.jsonl", paper.profile_options, paper.selection,
                            progress=False)
    assert rebuilt.digest() != paper.digest()
    assert_same_glasses_across_machines(rebuilt, paper)

    def one_more_expert(where):
        """``paper`` with the first non-expert of ``where`` (site -> mask) an expert, alpha 1 - 1e-6:
        within every value tolerance, only the expert sets tell it apart."""
        site = next(k for k, m in where.items() if (m & (paper.alpha[k] == 1)).any())
        i = int(torch.nonzero(where[site] & (paper.alpha[site] == 1))[0])
        alpha = {k: v.clone() for k, v in paper.alpha.items()}
        alpha[site][i] = 1 - 1e-6
        return replace(paper, alpha=alpha)

    band = boundary_band(paper)
    assert 0 < sum(int(m.sum()) for m in band.values()) < 50  # a few neurons at the boundary
    assert_same_glasses_across_machines(one_more_expert(band), paper)  # at the boundary: either side
    for wrong in (one_more_expert({k: ~m for k, m in band.items()}),  # away from it: another expert set
                  paper.reselect(replace(paper.selection, threshold=0.55)),  # other expert sets
                  replace(paper, auroc={k: 1 - v for k, v in paper.auroc.items()}),  # a sign flip of the evidence
                  paper.reselect(replace(paper.selection, towards="nontoxic_mean"))):
        with pytest.raises(AssertionError):
            assert_same_glasses_across_machines(wrong, paper)


def test_bundled_steering_glasses_load_where_a_float64_mean_rounds_otherwise(tmp_path):
    """Loading re-derives the gate's statistics from the stored projections and compares them with
    the manifest's. Another CPU's float64 mean may differ in its last bits: a statistic off by a few
    ulps (content digest recomputed, as if written there) still loads; one off by 1e-6 is refused."""
    import math
    import shutil

    from lmms_sgm.demo import GLASSES_DIR, STEERING
    from lmms_sgm.interventions import GlassesError, SafetyGlasses
    from lmms_sgm.interventions import base as glasses_mod

    made = iter(range(100))

    def written_with(key, value):
        path = tmp_path / f"{key}-{next(made)}"
        shutil.copytree(GLASSES_DIR / STEERING, path)
        m = json.loads((path / "manifest.json").read_text())
        m["gate"][key] = value(m["gate"][key])
        m["content_digest"] = glasses_mod.content_digest(m)
        (path / "manifest.json").write_text(json.dumps(m, indent=2))
        return path

    bundled = SafetyGlasses.load(GLASSES_DIR / STEERING)
    for key in ("benign_mean", "harmful_mean", "margin"):
        up = written_with(key, lambda v: math.nextafter(math.nextafter(v, math.inf), math.inf))  # two ulps
        assert SafetyGlasses.load(up).digest() == bundled.digest()
        with pytest.raises(GlassesError, match="do not give the statistics recorded"):
            SafetyGlasses.load(written_with(key, lambda v: v + 1e-6))
    with pytest.raises(GlassesError, match="do not give the statistics recorded"):
        SafetyGlasses.load(written_with("misclassified", lambda v: v + 1))
