"""lmms_sgm.diagnose: clean-twin patching, the least-squares ceiling on held-out twins, the CLI.

Tiny random models: the figures mean nothing, the mechanics are what is checked (the demo-scale
figures are in docs/diagnosis.md)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmms_sgm import archs, diagnose, tiny
from lmms_sgm.cli import main as cli
from lmms_sgm.evaluate import chat_prompt
from lmms_sgm.judges import get_judge


@pytest.fixture(scope="module")
def twins_file(tmp_path_factory):
    return tiny.write_toy_twins(tmp_path_factory.mktemp("twins"), 6)


LAYERS = "model.language_model.layers"  # the tiny LLaVA's decoder layers


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    return tiny.build_tiny_llava_next(tmp_path_factory.mktemp("tiny_llava_next"))


def _patched_logits(model, processor, twins, modules):
    """Logits of the harmful inputs with ``modules``' outputs replaced by the twins' at every
    position, and the twins' own logits (one padded batch each, the same layout)."""
    enc, twin = diagnose.encode_pair(processor, twins)
    pos = diagnose.position_ids(enc["attention_mask"])
    with torch.no_grad():
        want = model(**twin, position_ids=pos).logits
        patcher = diagnose.Patcher(modules, prompt_only=False)
        try:
            patcher.mode = "record"
            model(**twin, position_ids=pos)
            patcher.mode = "replace"
            got = model(**enc, position_ids=pos).logits
        finally:
            patcher.remove()
    return enc, got, want


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_patching_every_module_everywhere_gives_the_twin_s_logits(family, tiny_dir, next_dir, twins_file):
    """Every layer's MLP and attention output replaced by the twin's at every position: the
    residual stream of a text position is then the twin's bit for bit (its embedding is the same),
    so the logits there are the twin's exactly; image positions keep their own embedding."""
    from lmms_sgm import models

    model, processor = models.load(str(tiny_dir if family == "llava" else next_dir))
    model.set_attn_implementation("eager")
    records = diagnose.read_twins(twins_file)[:3]
    layers = diagnose._layers(model)
    enc, got, want = _patched_logits(model, processor, records,
                                     [m for layer in layers for m in (layer.self_attn, layer.mlp)])
    text = enc["attention_mask"].bool() & (enc["input_ids"] != model.config.image_token_id)
    assert torch.equal(got[text], want[text])
    assert not torch.allclose(got[~text & enc["attention_mask"].bool()], want[~text & enc["attention_mask"].bool()])
    # MLPs alone are not enough: attention still carries the image's difference (the test can fail)
    _, got_mlp, _ = _patched_logits(model, processor, records, [layer.mlp for layer in layers])
    assert not torch.allclose(got_mlp[text], want[text], atol=1e-4)


def test_per_neuron_affine_is_least_squares():
    """Against numpy's least squares, one column at a time; a constant column gets the best constant."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    y = 0.3 * x + torch.randn(200, 5, generator=g) * 0.1 + torch.arange(5.0)
    x[:, 4] = 2.0
    a, b = diagnose.per_neuron_affine(x, y)
    for j in range(4):
        coef, *_ = np.linalg.lstsq(np.stack([x[:, j].numpy(), np.ones(200)], 1).astype(np.float64), y[:, j].double().numpy(),
                                   rcond=None)
        assert a[j].item() == pytest.approx(coef[0], rel=1e-5) and b[j].item() == pytest.approx(coef[1], rel=1e-5, abs=1e-6)
    assert a[4].item() == 0 and b[4].item() == pytest.approx(y[:, 4].mean().item(), rel=1e-6)


def test_read_twins_roles_and_refusals(tmp_path, twins_file):
    records = diagnose.read_twins(twins_file)
    assert [t.role for t in records] == ["eval", "fit"] * 3  # no role given: every other record is held out
    rows = [json.loads(x) for x in twins_file.read_text().splitlines()]
    rows[0]["role"] = "fit"
    (tmp_path / "images").symlink_to(twins_file.parent / "images")
    (tmp_path / "twins.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [t.role for t in diagnose.read_twins(tmp_path)] == ["fit"] + ["eval"] * 5  # explicit roles: default eval
    del rows[1]["twin_image"]
    (tmp_path / "twins.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="record 1 needs 'twin_image' and/or 'twin_question'"):
        diagnose.read_twins(tmp_path)


def test_a_twin_of_another_length_is_refused(model_and_processor, twins_file):
    _, processor = model_and_processor
    t = diagnose.read_twins(twins_file)[0]
    t.twin_question = "what do you think of it ?"
    with pytest.raises(ValueError, match=r"the twin encodes to .* tokens, the harmful input to"):
        diagnose.encode_pair(processor, [t])


def test_the_ceiling_is_fitted_on_held_out_twins_only(load_model, twins_file, monkeypatch):
    """fit_affine sees the held-out twins and nothing else; every rate sees the measured ones only."""
    model, processor = load_model()
    records = diagnose.read_twins(twins_file)
    measured, held_out = diagnose.split_twins(records)
    seen = {"fit": [], "rates": []}
    real_fit, real_rate, real_lock = diagnose.fit_affine, diagnose.sampled_rate, diagnose.lockstep_rate
    monkeypatch.setattr(diagnose, "fit_affine", lambda m, p, mod, tw, **k: seen["fit"].append(list(tw)) or real_fit(m, p, mod, tw, **k))
    monkeypatch.setattr(diagnose, "sampled_rate", lambda m, p, j, tw, **k: seen["rates"].append(list(tw)) or real_rate(m, p, j, tw, **k))
    monkeypatch.setattr(diagnose, "lockstep_rate",
                        lambda m, p, j, tw, pa, **k: seen["rates"].append(list(tw)) or real_lock(m, p, j, tw, pa, **k))
    report = diagnose.diagnose(model, processor, records, get_judge("lexicon"), samples=1, per_layer=False, attention=False)
    assert seen["fit"] == [held_out]
    assert seen["rates"] and all(tw == measured for tw in seen["rates"])
    assert report["twins"] == {"measured": 3, "held_out": 3}
    # and the fit depends on the held-out twins, not on the measured ones
    path = f"{LAYERS}.1.mlp"
    a, _ = real_fit(model, processor, path, held_out, samples=1)
    a2, _ = real_fit(model, processor, path, held_out[:2], samples=1)
    assert not torch.equal(a, a2)


def test_headroom_sentence():
    rows = [{"name": "vanilla (harmful inputs)", "kind": "reference", "rate": 0.5, "layer": None, "module": None},
            {"name": "lockstep reference (nothing replaced)", "kind": "reference", "rate": 0.4, "layer": None, "module": None},
            {"name": "l3", "kind": "lockstep", "rate": 0.0, "layer": 3, "module": "mlp"},
            {"name": "c", "kind": "ceiling", "rate": 0.25, "layer": 3, "module": "mlp"},
            {"name": "g", "kind": "glasses", "rate": 0.4, "layer": None, "module": None}]
    h = diagnose.headroom({"rows": rows, "located_layer": 3})
    assert h["ceiling_change"] == pytest.approx(-0.5) and h["fraction_of_headroom"] == pytest.approx(0.4)
    assert "from 0.500 to 0.250 (-50%)" in h["sentence"] and "from 0.400 to 0.000 (-100%)" in h["sentence"]
    assert "these glasses take it to 0.400 (-20%): 40% of that headroom" in h["sentence"]


def test_diagnose_cli_on_llava_next_with_glasses(next_dir, twins_file, toy_jsonl, tmp_path, capsys):
    """Another family end to end: profile glasses, diagnose them, read the report back."""
    assert cli(["profile", "--model", str(next_dir), "--data", str(toy_jsonl), "--out", str(tmp_path / "g"),
                "--no-progress"]) == 0
    out = tmp_path / "diag"
    assert cli(["diagnose", "--model", str(next_dir), "--data", str(twins_file), "--glasses", str(tmp_path / "g"),
                "--samples", "1", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "diagnosis.json").read_text())
    kinds = [r["kind"] for r in report["rows"]]
    assert kinds.count("prompt") == 6 and kinds.count("lockstep") == 6 and kinds.count("ceiling") == 2 and kinds[-1] == "glasses"
    assert report["located_layer"] in (0, 1) and "these glasses take it to" in report["sentence"]
    assert report["sentence"] in (out / "diagnosis.html").read_text().replace("&#x27;", "'")
    assert report["sentence"] in capsys.readouterr().out


def test_diagnose_cli_errors_are_one_line(tmp_path, tiny_dir, capsys):
    (tmp_path / "twins.jsonl").write_text(json.dumps({"image": "x.png", "question": "q"}) + "\n")
    assert cli(["diagnose", "--model", str(tiny_dir), "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmms-sgm diagnose: error: ") and "twin_image" in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_chat_prompt_is_the_tasks_one(model_and_processor):
    _, processor = model_and_processor
    assert chat_prompt(processor, "what is this ?") == "<s>USER: <image> what is this ? ASSISTANT:"


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_cached_lockstep_equals_rereading_the_whole_sequence(family, tiny_dir, next_dir, twins_file):
    """The KV-cached lockstep loop draws the same answers as the slow one that re-reads every
    position every step, patched (every layer's MLP) or not."""
    from lmms_sgm import models

    model, processor = models.load(str(tiny_dir if family == "llava" else next_dir))
    model.set_attn_implementation("eager")
    _sharpened(model)  # sharper outputs than a random model's near-uniform ones, so that inputs matter
    records = diagnose.read_twins(twins_file)[:4]
    base = archs.adapter_for(model).layers_path(model)
    n = len(diagnose._layers(model))
    for paths in (None, [f"{base}.{i}.mlp" for i in range(n)]):
        got = {cache: diagnose.lockstep_answers(model, processor, records, paths, samples=3, cache=cache)
               for cache in (True, False)}
        assert got[True] == got[False]
    # every MLP and attention output patched at every position: the twin's own answers (text
    # positions then carry the twin's residual stream exactly)
    everything = [f"{base}.{i}.{m}" for i in range(n) for m in ("self_attn", "mlp")]
    patched = diagnose.lockstep_answers(model, processor, records, everything, samples=3)
    as_harmful = [diagnose.Twin(t.twin_question, t.twin_image, t.twin_image, t.twin_question) for t in records]
    assert patched == diagnose.lockstep_answers(model, processor, as_harmful, None, samples=3)
    assert patched != diagnose.lockstep_answers(model, processor, records, None, samples=3)


def _sharpened(model, head: bool = True):
    """Sharper outputs than a random model's near-uniform ones, so that patching changes answers:
    the language model's matrices (and, with ``head``, the output head) x4."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" in name and p.dim() == 2 and "embed" not in name:
                p.mul_(4)
        if head:
            model.lm_head.weight.mul_(4)
    return model


def test_nnsight_engine_equals_the_hooks(load_model, twins_file):
    """Every measurement as nnsight traces gives the answers and the fit the forward hooks give,
    bit for bit (same seed, same batches); and patching every module at every position through
    nnsight gives the twin's own logits at the last position."""
    model, processor = load_model()
    model.set_attn_implementation("eager")
    _sharpened(model)
    records = diagnose.read_twins(twins_file)[:4]
    hooks, nn = diagnose.as_engine(model), diagnose.as_engine(model, processor, backend="nnsight")
    assert (hooks.name, nn.name) == ("hooks", "nnsight")
    mlps = [f"{LAYERS}.{i}.mlp" for i in range(2)]
    half = [(mlps[1], torch.full((32,), 0.5), torch.full((32,), 0.1))]
    answers = {}
    for name, kw in (("vanilla", {}), ("prompt", {"paths": mlps}), ("every", {"every": half})):
        got = [diagnose.sampled_answers(e, processor, records, samples=3, max_new_tokens=8, **kw) for e in (hooks, nn)]
        assert got[0] == got[1], name
        answers[name] = got[0]
    assert answers["prompt"] != answers["vanilla"] != answers["every"]  # the patches do act
    for cache in (True, False):
        got = [diagnose.lockstep_answers(e, processor, records, mlps, samples=2, max_new_tokens=6, cache=cache)
               for e in (hooks, nn)]
        assert got[0] == got[1]
    fits = [diagnose.fit_affine(e, processor, mlps[1], records[:2], samples=1) for e in (hooks, nn)]
    assert all(torch.equal(x, y) for x, y in zip(*fits))
    enc, twin = diagnose.encode_pair(processor, records[:3])
    pos = diagnose.position_ids(enc["attention_mask"])
    everything = [f"{LAYERS}.{i}.{m}" for i in range(2) for m in ("self_attn", "mlp")]
    want, _, saved = nn.forward({**twin, "position_ids": pos}, record=everything)
    got, _, _ = nn.forward({**enc, "position_ids": pos}, replace=list(zip(everything, saved)))
    plain, _, _ = nn.forward({**enc, "position_ids": pos})
    assert torch.equal(got, want) and not torch.equal(plain, want)


def test_diagnose_runs_remotely_and_equals_the_local_run(tiny_dir, twins_file, tmp_path):
    """``--remote local`` (nnsight's in-process emulation of a remote trace: serialised, sent,
    run) gives every row the local hooks give with the same uncached lockstep loop."""
    from lmms_sgm import models

    out = tmp_path / "remote"
    assert cli(["diagnose", "--model", str(tiny_dir), "--data", str(twins_file), "--remote", "local", "--samples", "2",
                "--no-per-layer", "--out", str(out), "--no-progress"]) == 0
    remote = json.loads((out / "diagnosis.json").read_text())
    assert (remote["backend"], remote["remote"], remote["lockstep_cache"]) == ("nnsight", "local", False)
    model, processor = models.load(str(tiny_dir))
    local = diagnose.diagnose(model, processor, diagnose.read_twins(twins_file), get_judge("lexicon"), samples=2,
                              per_layer=False, lockstep_cache=False)
    assert [(r["name"], r["rate"]) for r in remote["rows"]] == [(r["name"], r["rate"]) for r in local["rows"]]
    assert len(remote["rows"]) == 9  # vanilla, twin, 2 prompt, lockstep reference, 2 lockstep, 2 ceiling


def test_remote_needs_the_nnsight_backend(tiny_dir, twins_file, tmp_path, capsys):
    assert cli(["diagnose", "--model", str(tiny_dir), "--data", str(twins_file), "--remote", "local", "--backend", "hooks",
                "--out", str(tmp_path / "o")]) == 2
    assert "use --backend nnsight" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    from lmms_sgm import tiny_families

    return {f: getattr(tiny_families, f"build_{f}")(tmp_path_factory.mktemp(f)) for f in ("qwen2_vl", "mllama", "gemma3")}


@pytest.mark.parametrize("family", ["qwen2_vl", "mllama", "gemma3"])
def test_lockstep_on_families_with_their_own_positions_and_masks(family, family_dirs, twins_file):
    """Qwen2-VL's 3-D positions (the model's own function over the whole sequence), Mllama's
    per-token cross-attention mask (grown as generate grows it) and Gemma 3's nested images: the
    cached lockstep loop draws the answers of the loop that re-reads every position, patched and
    not, two samples per prompt (Qwen2-VL's flat patch rows repeated per image)."""
    from lmms_sgm import models

    model, processor = models.load(str(family_dirs[family]))
    model.set_attn_implementation("eager")
    _sharpened(model, head=False)
    records = diagnose.read_twins(twins_file)[:3]
    base = archs.adapter_for(model).layers_path(model)
    mlps = [f"{base}.{i}.mlp" for i in range(len(diagnose._layers(model)))]
    for paths in (None, mlps):
        got = [diagnose.lockstep_answers(model, processor, records, paths, samples=2, max_new_tokens=6, cache=c)
               for c in (True, False)]
        assert got[0] == got[1]
    fit = diagnose.fit_affine(model, processor, mlps[-1], records[:2], samples=2)
    assert all(torch.isfinite(t).all() for t in fit)
    if family == "qwen2_vl":
        with pytest.raises(ValueError, match=r"3-D multimodal positions.*--backend hooks"):
            diagnose.as_engine(model, processor, backend="nnsight")



class _SteeringReference:
    """Gated steering (docs/steering.md) with plain hooks, read from the saved files: at a prompt
    pass (left-padded: the decision position is the last column) a row is gated on where the gate
    layer's output there, projected on gate_direction, exceeds the threshold; c * steer is then
    subtracted from the steered layer's output of gated-on rows at every position and step."""

    def __init__(self, model, path):
        from safetensors.torch import load_file

        tensors = load_file(str(path / "glasses.safetensors"))
        manifest = json.loads((path / "manifest.json").read_text())
        o = manifest["steering_options"]
        assert o["steer_from"] == "prompt"  # what this reference implements
        self.gated = o["gated"]
        self.steer, self.direction = tensors["steer"] * o["c"], tensors["gate_direction"]
        self.threshold = manifest["gate"]["threshold"]
        self.modules = [model.get_submodule(manifest["sites"][k]["module_path"]) for k in ("gate", "steer")]
        self.gated_on = 0

    def _gate(self, module, args, out):
        if out.shape[1] > 1:
            at = out[:, -1].float()
            self.gate = at @ self.direction > self.threshold if self.gated else torch.ones(len(at), dtype=torch.bool)
            self.gated_on += int(self.gate.sum())

    def _steer(self, module, args, out):
        return out - self.gate[:, None, None] * self.steer

    def __enter__(self):
        gate_module, steer_module = self.modules
        self.handles = [gate_module.register_forward_hook(self._gate), steer_module.register_forward_hook(self._steer)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
def test_diagnose_wears_steering_glasses_through_their_edits(twins_file, gated, tmp_path):
    """`diagnose --glasses <steering glasses>` used to die with "'SteeringGlasses' object has no
    attribute 'counts'": its glasses row now names any kind (describe()) and is worn through
    wear(); its answers equal plain hooks applying the steering formula (gated: the bundled
    glasses, whose gate stays off on these random-image twins, so the answers are the vanilla
    model's; ungated: the same vectors steering every row)."""
    from lmms_sgm import models
    from lmms_sgm.demo import GLASSES_DIR, SHORT_NAME, STEERING
    from lmms_sgm.interventions import load_glasses

    model, processor = models.load(SHORT_NAME)
    path = GLASSES_DIR / STEERING
    if not gated:
        path = load_glasses(path).with_options(gated=False).save(tmp_path / "ungated")
    glasses = load_glasses(path)
    twins = diagnose.read_twins(twins_file)
    judge = get_judge("lexicon")
    report = diagnose.diagnose(model, processor, twins, judge, glasses=glasses, samples=2, per_layer=False,
                               attention=False)
    row = report["rows"][-1]
    assert row["kind"] == "glasses"
    label = "gated-steering" if gated else "steering"
    assert row["name"] == f"these glasses ({label} at layer 2, c=8, digest {glasses.digest()[:12]})"
    measured, _ = diagnose.split_twins(twins)
    engine = diagnose.as_engine(model, processor)
    with engine.wearing(glasses):
        worn = diagnose.sampled_answers(engine, processor, measured, samples=2)
    with _SteeringReference(model, path) as ref:
        want = diagnose.sampled_answers(model, processor, measured, samples=2)
        rate = diagnose.sampled_rate(model, processor, judge, measured, samples=2)
    assert (ref.gated_on > 0) == (not gated)
    assert worn == want and row["rate"] == rate
    if not gated:
        assert worn != diagnose.sampled_answers(model, processor, measured, samples=2)  # steering changes answers
