"""lmms_sgm.evaluate: each measure from scripted answers (no model), and the split's layout."""
from __future__ import annotations

import pytest

from lmms_sgm import evaluate as ev
from lmms_sgm import tiny
from lmms_sgm.judges import get_judge


@pytest.fixture(scope="module")
def val(tmp_path_factory):
    return ev.ValidationSet.load(tiny.write_toy_validation(tmp_path_factory.mktemp("val"), 4))


def test_measures_from_scripted_answers(val, monkeypatch):
    """4 harmful, 4 attack, 4 benign (2 open-ended opinion, 2 colour questions answering 'red'), 4 MC."""
    def fake_generate(model, processor, images, questions, *, samples=1, sample=False, **kw):
        n = len(questions)
        if questions[0] == "what colour is it ?":  # capability: one right (normalised), one wrong and refusing
            return [["Red ."], ["sorry , i cannot help with that"]]
        if sample:
            return [["you idiot", "fine", "fine", "fine", "fine"]] * n  # 1 of 5 unsafe per prompt
        return [["you stupid idiot"]] + [["nice"]] * (n - 1)  # 1 of n prompts unsafe

    monkeypatch.setattr(ev, "generate", fake_generate)
    monkeypatch.setattr(ev, "option_loglik", lambda m, p, img, q, opts: [0.0, -1.0])  # always A
    res = ev.evaluate(None, None, val, get_judge("lexicon"), samples=5)
    assert res["harmful_greedy"] == 0.25 and res["harmful_sampled"] == pytest.approx(0.2)
    assert res["attack_greedy"] == 0.25 and res["attack_sampled"] == pytest.approx(0.2)
    assert res["clean_toxic_greedy"] == 0.5 and res["clean_toxic_sampled"] == pytest.approx(0.2)  # 2 opinion prompts
    assert res["capability_open"] == 0.5 and res["capability_open_colour"] == 0.5
    assert res["over_refusal"] == 0.25  # 1 refusal among the 4 benign greedy answers
    assert res["capability_mc"] == 0.5  # answers alternate A, B
    assert res["examples_harmful"][0] == ("what do you think ?", "you stupid idiot", ["you idiot", "fine"])


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"harmful\.jsonl is missing"):
        ev.ValidationSet.load(tmp_path)


def test_optional_parts(tmp_path, model_and_processor):
    d = tiny.write_toy_validation(tmp_path / "v", 2)
    (d / "adv.jsonl").unlink()
    (d / "mmbench.tsv").unlink()
    val = ev.ValidationSet.load(d)
    model, processor = model_and_processor
    res = ev.evaluate(model, processor, val, get_judge("lexicon"), samples=2)
    assert "attack_sampled" not in res and "capability_mc" not in res and "harmful_sampled" in res
    assert res == ev.evaluate(model, processor, val, get_judge("lexicon"), samples=2)  # seeded: the same figures


def test_sampled_only_and_extra_measures_of_the_sampled_answers(val, monkeypatch):
    """greedy_harm=False: no greedy harmful/attack rate, no examples, the same sampled figures;
    sampled_measures sees each set's sampled answers and its results are stored per set."""
    calls = []

    def fake_generate(model, processor, images, questions, *, samples=1, sample=False, **kw):
        calls.append((questions[0], sample))
        if sample:
            return [["you idiot", "fine", "fine", "fine", "fine"]] * len(questions)
        return [["nice"]] * len(questions)

    monkeypatch.setattr(ev, "generate", fake_generate)
    monkeypatch.setattr(ev, "option_loglik", lambda m, p, img, q, opts: [0.0, -1.0])
    seen = []

    def fine_rate(answers):  # the fraction of "fine" answers, over all answers of the set
        seen.append(answers)
        flat = [a for rs in answers for a in rs]
        return {"fine_sampled": flat.count("fine") / len(flat), "prompts": len(answers)}

    full = ev.evaluate(None, None, val, get_judge("lexicon"), samples=5)
    n_full = len(calls)
    quick = ev.evaluate(None, None, val, get_judge("lexicon"), samples=5, greedy_harm=False, sampled_measures=fine_rate)
    assert len(calls) - n_full == n_full - 2  # the harmful and attack sets are not answered greedily
    assert not {"harmful_greedy", "attack_greedy", "examples_harmful"} & set(quick)
    assert quick["harmful_sampled"] == full["harmful_sampled"] == pytest.approx(0.2)
    assert quick["harmful_fine_sampled"] == quick["attack_fine_sampled"] == pytest.approx(0.8)
    assert quick["harmful_prompts"] == len(val.harmful) == 4 and quick["attack_prompts"] == len(val.adv)
    assert len(seen) == 2 and all(len(rs) == 5 for a in seen for rs in a)
    rest = {k: v for k, v in full.items() if not k.startswith(("harmful_greedy", "attack_greedy", "examples_"))}
    assert {k: v for k, v in quick.items() if "fine" not in k and "prompts" not in k} == rest


def test_sampled_figures_do_not_depend_on_the_greedy_answers(tmp_path, model_and_processor):
    """Greedy decoding draws no random number: a sampled-only call (the demo's quick sweeps) gives
    the sampled figures of a full call with the same seed, on a real (tiny) model."""
    val = ev.ValidationSet.load(tiny.write_toy_validation(tmp_path / "v", 3))
    model, processor = model_and_processor
    judge = get_judge("lexicon")
    answers = {}

    def keep(tag):
        def measure(a):
            answers.setdefault(tag, []).append(a)
            return {}
        return measure

    full = ev.evaluate(model, processor, val, judge, samples=3, seed=7, max_new_tokens=6, sampled_measures=keep("full"))
    quick = ev.evaluate(model, processor, val, judge, samples=3, seed=7, max_new_tokens=6, greedy_harm=False,
                        sampled_measures=keep("quick"))
    assert answers["full"] == answers["quick"] and len(answers["full"]) == 2  # harmful and attack, the same answers
    assert {k: v for k, v in quick.items() if k != "_harmful_safe_answers"} == \
        {k: v for k, v in full.items() if k not in ("harmful_greedy", "attack_greedy", "examples_harmful", "_harmful_safe_answers")}
    ev.evaluate(model, processor, val, judge, samples=3, seed=8, max_new_tokens=6, greedy_harm=False,
                sampled_measures=keep("other seed"))
    assert answers["other seed"] != answers["quick"]  # the seed is what the sampled answers depend on
