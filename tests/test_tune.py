"""lmms-sgm tune: the rule, the grid, re-selection without re-profiling, the CLI on two families;
and self-label's judge arguments."""
from __future__ import annotations

import json

import pytest

from lmms_sgm import tiny, tune
from lmms_sgm.cli import main as cli
from lmms_sgm.interventions import SafetyGlasses
from lmms_sgm.options import ProfileOptions, RuleOptions, SelectionOptions, rule_from_dict

BASE = {"harmful_sampled": 0.5, "capability_open": 0.9, "capability_mc": 0.8, "over_refusal": 0.0}


def test_rule_lowest_harm_within_the_side_conditions():
    rows = {"vanilla": BASE,
            "best but breaks capability": {**BASE, "harmful_sampled": 0.1, "capability_open": 0.85},
            "best but refuses": {**BASE, "harmful_sampled": 0.2, "over_refusal": 0.03},
            "good": {**BASE, "harmful_sampled": 0.3, "capability_open": 0.856},  # 95.1% kept
            "worse": {**BASE, "harmful_sampled": 0.4}}
    assert tune.choose(RuleOptions(), rows) == "good"
    assert tune.choose(RuleOptions(retention=0.9), rows) == "best but breaks capability"
    assert tune.choose(RuleOptions(over_refusal_points=5), rows) == "best but refuses"  # points: 0% -> 3% is +3


def test_over_refusal_limit_is_points_above_vanilla_s_own_over_refusal():
    """Vanilla over-refuses 10%: +2 points allows 12% and refuses 12.5%; an option refusing less
    than vanilla is fine. (With vanilla at 0, the absolute rate and the difference either way
    round would give the same answers.)"""
    base = {**BASE, "over_refusal": 0.10}
    rule = RuleOptions()
    at_limit, over, below = ({**base, "harmful_sampled": h, "over_refusal": o} for h, o in ((0.3, 0.12), (0.2, 0.125), (0.4, 0.05)))
    assert tune.admissible(rule, at_limit, base) and tune.admissible(rule, below, base) and not tune.admissible(rule, over, base)
    rows = {"vanilla": base, "12.5% refused": over, "12% refused": at_limit, "5% refused": below}
    assert tune.choose(rule, rows) == "12% refused"
    assert tune.choose(RuleOptions(over_refusal_points=3), rows) == "12.5% refused"
    assert tune.choose(RuleOptions(over_refusal_points=0), rows) == "5% refused"


def test_no_option_that_does_not_lower_harm_is_chosen_and_the_verdict_says_so():
    rows = {"vanilla": BASE, "same": dict(BASE), "higher": {**BASE, "harmful_sampled": 0.6}}
    assert tune.choose(RuleOptions(), rows) is None
    result = tune.TuneResult(rows, None, RuleOptions(), {}, [], 0.0)
    assert result.verdict().startswith("no option helps on this model") and "no glasses written" in result.verdict()


def test_grid_file_round_trip_and_refusals(tmp_path):
    grid = [tune.Config("a", "self", ProfileOptions(text_field="question+response", positions="response"),
                        SelectionOptions(towards="nontoxic_mean"), 0.5)]
    path = tmp_path / "g.json"
    path.write_text(json.dumps([c.to_dict() for c in grid]))
    assert tune.read_grid(path) == grid
    path.write_text(json.dumps([{"name": "vanilla", "data": "x"}]))
    with pytest.raises(ValueError, match="unique and not 'vanilla'"):
        tune.read_grid(path)
    path.write_text(json.dumps([{"name": "a", "data": "x", "select": {"direction": "sideways"}}]))
    with pytest.raises(ValueError, match="unknown direction"):
        tune.read_grid(path)


def test_fluency_condition_rejects_options_whose_safe_answers_the_unmodified_model_finds_unlikely():
    rows = {"vanilla": {**BASE, tune.FLUENCY: 1.5},
            "word salad": {**BASE, "harmful_sampled": 0.0, tune.FLUENCY: 3.01},
            "fluent": {**BASE, "harmful_sampled": 0.2, tune.FLUENCY: 3.0}}
    assert tune.choose(RuleOptions(), rows) == "fluent"  # 2 x 1.5 is the limit, inclusive
    assert tune.choose(RuleOptions(fluency_ratio=0), rows) == "word salad"
    assert tune.choose(RuleOptions(fluency_ratio=1.9), rows) is None
    assert "2x that of vanilla's safe answers" in tune.describe(RuleOptions())
    assert "perplexity" not in tune.describe(RuleOptions(fluency_ratio=0))


def test_the_rule_is_one_dataclass_in_points_and_the_old_names_still_work_with_a_warning():
    """tune, report, sweep and the demo choose by one RuleOptions, over-refusal in percentage points
    (the unit reports show). tune.Rule and reports.Rule still build it, warning, each in its old
    unit: tune.Rule's fraction 0.03 is 3 points, reports.Rule's 3 points are 3 points."""
    from lmms_sgm import reports
    from lmms_sgm.demo import run as demo_run
    from lmms_sgm.demo import sweep as demo_sweep

    assert RuleOptions().over_refusal_points == 2.0 and RuleOptions().retention == 0.95
    assert demo_run.RULE == RuleOptions() and demo_sweep.RULE == RuleOptions()
    with pytest.warns(DeprecationWarning, match="lmms_sgm.tune.Rule is deprecated"):
        old = tune.Rule(over_refusal_points=0.03, retention=0.9)
    assert (old.over_refusal_points, old.retention, old.metric) == (3.0, 0.9, "harmful_sampled")
    base = {**BASE, "over_refusal": 0.10}
    rows = {"vanilla": base, "13% refused": {**base, "harmful_sampled": 0.2, "over_refusal": 0.13}}
    assert old.choose(rows) == "13% refused" == tune.choose(RuleOptions(over_refusal_points=3), rows)
    assert tune.choose(RuleOptions(over_refusal_points=2.9), rows) is None
    assert old.describe() == tune.describe(RuleOptions(metric="harmful_sampled", retention=0.9, over_refusal_points=3))
    assert "within +3 points" in old.describe()
    with pytest.warns(DeprecationWarning, match="lmms_sgm.reports.Rule is deprecated"):
        r = reports.Rule(0.9, 3.0, "mm_toxic_qa:harmful_rate")
    assert r == RuleOptions(metric="mm_toxic_qa:harmful_rate", retention=0.9, over_refusal_points=3.0)


def test_rules_recorded_by_earlier_versions_are_read_in_their_unit():
    """tune's table.json of before stored over_refusal_points as a fraction (0.03 = 3 points); a
    report.json's tradeoff.rule of before as min_retention / max_over_refusal_points / harm (points);
    today's files say their unit. Each reads back as the rule it was."""
    old_tune = {"metric": "harmful_greedy", "retention": 0.9, "over_refusal_points": 0.03, "fluency_ratio": 1.5,
                "text": "lowest harmful_greedy ..."}
    assert rule_from_dict(old_tune) == RuleOptions(metric="harmful_greedy", retention=0.9, over_refusal_points=3,
                                                   fluency_ratio=1.5)
    old_report = {"min_retention": 0.9, "max_over_refusal_points": 3.0, "harm": "mm_toxic_qa:harmful_rate", "text": "..."}
    assert rule_from_dict(old_report) == RuleOptions(metric="mm_toxic_qa:harmful_rate", retention=0.9, over_refusal_points=3)
    new = RuleOptions(metric="harmful_greedy", retention=0.9, over_refusal_points=3, fluency_ratio=1.5)
    from lmms_sgm.options import rule_to_dict

    assert rule_to_dict(new)["over_refusal_points"] == 3.0 and rule_from_dict(json.loads(json.dumps(rule_to_dict(new)))) == new


def test_steering_grid_entries_round_trip_and_refusals(tmp_path):
    from lmms_sgm.options import SteeringOptions

    grid = [tune.Config("g", "answers", kind="steering", gate_data="contexts", steer=SteeringOptions(layer=1, c=4.0)),
            tune.Config("u", "answers", kind="steering", steer=SteeringOptions(gated=False), strength=0.5)]
    path = tmp_path / "g.json"
    path.write_text(json.dumps([c.to_dict() for c in grid]))
    assert tune.read_grid(path) == grid and grid[0].sets() == {"answers", "contexts"}
    for bad, match in (({"kind": "steering"}, "needs gate_data"), ({"kind": "sideways"}, "kind 'sideways'"),
                       ({"gate_data": "x"}, "a grid entry needs"), ({"kind": "steering", "select": {}}, "a grid entry needs")):
        path.write_text(json.dumps([{"name": "a", "data": "x", **bad}]))
        with pytest.raises(ValueError, match=match):
            tune.read_grid(path)


def test_answer_perplexity_is_the_per_token_mean_of_each_answer_scored_alone(model_and_processor):
    """Against a plain forward pass per answer (prompt + answer + end of sequence, no batching, no
    padding), summed over every token of every answer; prompts without answers are skipped."""
    import math

    import torch

    from lmms_sgm.evaluate import answer_perplexity, chat_prompt

    model, processor = model_and_processor
    tok = processor.tokenizer
    images = [tiny.random_image(i) for i in range(3)]
    questions = ["what is this ?", "describe the picture .", "is it red ?"]
    answers = [["a red circle", "it is a very large blue square on a field"], [], ["yes"]]
    nll, count = 0.0, 0
    with torch.no_grad():
        for image, q, rs in zip(images, questions, answers):
            for a in rs:
                enc = processor(text=[chat_prompt(processor, q)], images=[image], return_tensors="pt")
                ids = tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                full = torch.cat([enc["input_ids"], torch.tensor([ids])], 1)
                logp = model(input_ids=full, pixel_values=enc["pixel_values"]).logits[0].double().log_softmax(-1)
                start = enc["input_ids"].shape[1]
                nll -= sum(float(logp[start - 1 + t, i]) for t, i in enumerate(ids))
                count += len(ids)
    got = answer_perplexity(model, processor, images, questions, answers)
    assert got == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert math.isnan(answer_perplexity(model, processor, images[:1], questions[:1], [[]]))


def test_demo_grid_is_the_demo_s_table():
    """The demo's 32 SGM configurations (docs/demo.md), the paper's default first, 4 input-conditional
    ones and the 16 gated-steering ones of `python -m lmms_sgm.demo.sweep --kind steering`."""
    from lmms_sgm.demo import HERE
    from lmms_sgm.demo.sweep import CONFIGS, STEERING_CONFIGS

    grid = tune.read_grid(HERE / "tune_grid.json")
    sgm = [c for c in grid if c.kind == "sgm"]
    assert len(sgm) == 36 and sgm[0].profile == ProfileOptions() and sgm[0].select == SelectionOptions()
    assert [(c.name, c.data, c.profile, c.select) for c in sgm[:32]] == [(n, *v) for n, v in CONFIGS.items()]
    best = next(c for c in grid if c.name == "self-labelled, q+r, response positions, towards non-toxic mean")
    assert best.data == "self" and best.profile.positions == "response" and best.select.towards == "nontoxic_mean"
    assert all(c.select.gate == "evidence" for c in sgm[32:])
    steering = [c for c in grid if c.kind == "steering"]
    assert [(c.data, c.gate_data, c.steer) for c in steering] == list(STEERING_CONFIGS.values())
    assert set().union(*(c.sets() for c in grid)) == {"responses", "inputs", "self", "gate"}


def test_tune_steering_profiles_once_and_equals_building_directly(load_model, toy_jsonl, tmp_path, monkeypatch):
    """Two coefficients of one steer share its profiling; each equals build_steering_glasses with
    its options; every row carries the fluency column, vanilla's too."""
    from lmms_sgm import pipeline
    from lmms_sgm.evaluate import ValidationSet
    from lmms_sgm.judges import get_judge
    from lmms_sgm.options import SteeringOptions

    model, processor = load_model()
    calls = []
    real = pipeline.build_steering_glasses
    monkeypatch.setattr(pipeline, "build_steering_glasses", lambda *a, **k: calls.append(a[4]) or real(*a, **k))
    grid = [tune.Config(f"c={c}", "toy", kind="steering", gate_data="toy", steer=SteeringOptions(layer=1, c=c))
            for c in (2.0, 5.0)]
    val = ValidationSet.load(tiny.write_toy_validation(tmp_path / "val", 2))
    result = tune.tune(model, processor, {"toy": toy_jsonl}, grid, val, get_judge("lexicon"), samples=1)
    assert len(calls) == 1
    direct = real(model, processor, toy_jsonl, toy_jsonl, SteeringOptions(layer=1, c=5.0), progress=False)
    assert result.glasses["c=5.0"].digest() == direct.digest() != result.glasses["c=2.0"].digest()
    assert all(r[tune.FLUENCY] > 1 for r in result.rows.values())


def test_tune_steering_entries_differing_only_in_their_gate_layer_are_built_apart(load_model, toy_jsonl, tmp_path,
                                                                                 monkeypatch):
    """The gate layer changes what is profiled (the gate's direction is read there): two entries
    that differ only in it are two profilings, each equal to building it directly, not one reused."""
    from lmms_sgm import pipeline
    from lmms_sgm.evaluate import ValidationSet
    from lmms_sgm.judges import get_judge
    from lmms_sgm.options import SteeringOptions

    model, processor = load_model()
    calls = []
    real = pipeline.build_steering_glasses
    monkeypatch.setattr(pipeline, "build_steering_glasses", lambda *a, **k: calls.append(a[4]) or real(*a, **k))
    options = {f"gate {g}": SteeringOptions(layer=1, gate_layer=g, c=3.0) for g in (0, 1)}
    grid = [tune.Config(n, "toy", kind="steering", gate_data="toy", steer=so) for n, so in options.items()]
    val = ValidationSet.load(tiny.write_toy_validation(tmp_path / "val", 2))
    result = tune.tune(model, processor, {"toy": toy_jsonl}, grid, val, get_judge("lexicon"), samples=1)
    assert [so.gate_layer for so in calls] == [0, 1]
    direct = {n: real(model, processor, toy_jsonl, toy_jsonl, so, progress=False).digest() for n, so in options.items()}
    assert {n: g.digest() for n, g in result.glasses.items()} == direct and len(set(direct.values())) == 2


def test_tune_profiles_once_per_profiling_and_reselects(load_model, toy_jsonl, tmp_path, monkeypatch):
    """Selections of one profiling share its AUROCs: one profile() call each; the result equals
    profiling with that selection directly."""
    from lmms_sgm.evaluate import ValidationSet
    from lmms_sgm.judges import get_judge
    from lmms_sgm.pipeline import build_glasses

    model, processor = load_model()
    calls = []
    real = tune.profiled
    monkeypatch.setattr(tune, "profiled", lambda m, p, pairs, po, **k: calls.append(po) or real(m, p, pairs, po, **k))
    grid = [tune.Config("s", "toy"), tune.Config("a", "toy", select=SelectionOptions(direction="amplify")),
            tune.Config("i", "toy", ProfileOptions(modules=("intermediate",)))]
    val = ValidationSet.load(tiny.write_toy_validation(tmp_path / "val", 2))
    result = tune.tune(model, processor, {"toy": toy_jsonl}, grid, val, get_judge("lexicon"), samples=1)
    assert calls == [ProfileOptions(), ProfileOptions(modules=("intermediate",))]
    direct = build_glasses(model, processor, toy_jsonl, ProfileOptions(), SelectionOptions(direction="amplify"), progress=False)
    assert result.glasses["a"].digest() == direct.digest()
    assert list(result.rows) == ["vanilla", "s", "a", "i"] and all("harmful_sampled" in r for r in result.rows.values())


def _tune_cli(model_dir, toy_jsonl, val, out, grid, *extra):
    return cli(["tune", "--model", str(model_dir), "--data", f"toy={toy_jsonl}", "--val", str(val), "--grid", str(grid),
                "--samples", "2", "--out", str(out), "--no-progress", *extra])


def sharpened(model_dir, out):
    """The tiny model with its language model's matrices x4: a random model's near-uniform
    outputs hardly move when neurons change, this one's greedy answers do."""
    import torch

    from lmms_sgm import models

    model, processor = models.load(str(model_dir))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" in name and p.dim() == 2 and "embed" not in name:
                p.mul_(4)
        model.lm_head.weight.mul_(4)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


GRID = [{"name": "paper", "data": "toy"}, {"name": "towards mean", "data": "toy", "select": {"towards": "nontoxic_mean"}},
        {"name": "det0 top-20, half strength", "data": "toy", "select": {"rule": "det0", "top_k": 20}, "strength": 0.5},
        {"name": "amplify", "data": "toy", "select": {"direction": "amplify"}}]


@pytest.mark.parametrize("family, metric", [("llava", "harmful_sampled"), ("llava_next", "harmful_greedy")])
def test_tune_cli_end_to_end(family, metric, tiny_dir, tmp_path_factory, toy_jsonl, tmp_path, capsys):
    """Both families: the table of every option, the rule, and the chosen glasses (if any), which
    load and apply; with none chosen, no glasses and a plain sentence. (The random LLaVA's sampled
    rate moves with no option: nothing is chosen; the sharpened LLaVA-NeXT's greedy rate does.)"""
    if family == "llava":
        model_dir = tiny_dir
    else:
        model_dir = sharpened(tiny.build_tiny_llava_next(tmp_path / "random"), tmp_path / "model")
    val = tiny.write_toy_validation(tmp_path / "val", 4)
    (tmp_path / "grid.json").write_text(json.dumps(GRID))
    out = tmp_path / "out"
    assert _tune_cli(model_dir, toy_jsonl, val, out, tmp_path / "grid.json", "--metric", metric) == 0
    doc = json.loads((out / "table.json").read_text())
    assert list(doc["rows"]) == ["vanilla", *[g["name"] for g in GRID]]
    assert {"harmful_sampled", "harmful_greedy", "attack_sampled", "clean_toxic_sampled", "over_refusal",
            "capability_open", "capability_mc"} <= set(doc["rows"]["vanilla"])
    assert len(doc["profiles"]) == 1  # one profiling for four selections
    SafetyGlasses.load(out / doc["profiles"][0]["dir"])
    printed = capsys.readouterr().out
    assert doc["verdict"] in printed and doc["verdict"] in (out / "table.md").read_text()
    rule = rule_from_dict(doc["rule"])  # the rule table.json recorded, read back
    assert rule == RuleOptions(metric=metric) and doc["rule"]["over_refusal_points"] == 2.0
    chosen = tune.choose(rule, doc["rows"])
    assert (doc["chosen"] or {}).get("name") == chosen
    assert (chosen is None) == (family == "llava")
    if chosen is None:
        assert not (out / "glasses").exists() and doc["verdict"].startswith("no option helps")
        return
    from lmms_sgm import models

    model, processor = models.load(str(model_dir))
    glasses = SafetyGlasses.load(out / "glasses")
    assert glasses.counts()["experts"] == doc["rows"][chosen]["experts"]
    enc = processor(text=["<s>USER: <image> what do you think ? ASSISTANT:"], images=[tiny.random_image(1)], return_tensors="pt")
    plain = model(**enc).logits
    with glasses.apply(model, strength=doc["chosen"]["strength"]):
        worn = model(**enc).logits
    assert not (worn == plain).all()


def test_tune_cli_refuses_a_grid_naming_a_missing_set(tiny_dir, toy_jsonl, tmp_path, capsys):
    val = tiny.write_toy_validation(tmp_path / "val", 2)
    (tmp_path / "grid.json").write_text(json.dumps([{"name": "x", "data": "elsewhere"}]))
    assert _tune_cli(tiny_dir, toy_jsonl, val, tmp_path / "out", tmp_path / "grid.json") == 2
    err = capsys.readouterr().err
    assert err.startswith("lmms-sgm tune: error: the grid names profiling set(s) elsewhere") and not (tmp_path / "out").exists()


def test_self_label_passes_judge_arguments(tiny_dir, toy_jsonl, tmp_path, capsys):
    """A custom lexicon through --judge-args: every answer holding one of its words is toxic."""
    prompts = tmp_path / "prompts.jsonl"
    rows = [json.loads(x) for x in toy_jsonl.read_text().splitlines()][:4]
    prompts.write_text("".join(json.dumps({"image": str(toy_jsonl.parent / r["image"]), "question": r["question"]}) + "\n"
                               for r in rows))
    words = tmp_path / "words.txt"
    words.write_text("the\na\n")
    assert cli(["self-label", "--model", str(tiny_dir), "--prompts", str(prompts), "--samples", "2", "--judge", "lexicon",
                "--judge-args", f"lexicon={words}", "--out", str(tmp_path / "sl")]) == 0
    recs = [json.loads(x) for x in (tmp_path / "sl" / "pairs.jsonl").read_text().splitlines()]
    assert all(r["label"] == int(any(w in r["text"].split() for w in ("the", "a"))) for r in recs)
    assert str(words) in json.dumps(json.loads((tmp_path / "sl" / "judge.json").read_text()))
    assert cli(["self-label", "--model", str(tiny_dir), "--prompts", str(prompts), "--judge", "lexicon",
                "--judge-args", "nonsense=1", "--out", str(tmp_path / "sl2")]) == 2
    assert "lmms-sgm self-label: error: judge 'lexicon' does not accept" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [("--retention", "1.5", "a fraction in (0, 1]"),
                                                  ("--fluency-ratio", "-1", "fluency_ratio are >= 0")])
def test_tune_cli_refuses_a_bad_rule_before_loading_the_model(flag, value, message, tiny_dir, toy_jsonl, tmp_path, capsys):
    val = tiny.write_toy_validation(tmp_path / "val", 2)
    (tmp_path / "grid.json").write_text(json.dumps(GRID))
    assert _tune_cli(tiny_dir, toy_jsonl, val, tmp_path / "out", tmp_path / "grid.json", flag, value) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmms-sgm tune: error:") and message in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["gemma3", "mllama"])
def test_evaluate_encodes_each_family_s_images_per_row(family, tmp_path):
    """Processors that take one list of images per row (Gemma 3, Mllama) get them so: the greedy
    answers of the batched evaluation equal each prompt generated alone."""
    import torch

    from lmms_sgm import models, tiny_families
    from lmms_sgm.evaluate import ValidationSet, encode_prompts, evaluate, generate
    from lmms_sgm.judges import get_judge

    model, processor = models.load(str(getattr(tiny_families, f"build_{family}")(tmp_path / "m")))
    val = ValidationSet.load(tiny.write_toy_validation(tmp_path / "val", 3))
    res = evaluate(model, processor, val, get_judge("lexicon"), samples=1)
    assert {"harmful_greedy", "harmful_sampled", "over_refusal", "capability_open"} <= set(res)
    images, questions = [r["_image"] for r in val.harmful], [r["question"] for r in val.harmful]
    batched = generate(model, processor, images, questions, max_new_tokens=5)
    with torch.no_grad():
        alone = []
        for im, q in zip(images, questions):
            enc = encode_prompts(processor, [q], [im])
            out = model.generate(**enc, max_new_tokens=5, do_sample=False)
            alone.append([processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()])
    assert batched == alone


def test_glasses_grid_entries_round_trip_and_refusals():
    """kind=glasses: built glasses of any kind from a directory (no profiling set)."""
    entry = {"name": "g", "kind": "glasses", "glasses": "some/dir", "strength": 0.5}
    c = tune.Config.from_dict(entry)
    assert c.to_dict() == entry and c.sets() == set() and c.glasses == "some/dir"
    with pytest.raises(ValueError, match="a grid entry of kind glasses needs name and glasses"):
        tune.Config.from_dict({"name": "g", "kind": "glasses"})
    with pytest.raises(ValueError, match="a grid entry of kind glasses needs name and glasses"):
        tune.Config.from_dict({**entry, "data": "toy"})
    with pytest.raises(ValueError, match="glasses=DIR belongs to kind 'glasses'"):
        tune.Config("g", "toy", glasses="some/dir")
