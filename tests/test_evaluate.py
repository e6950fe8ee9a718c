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
    with pytest.raises(FileNotFoundError, match="harmful.jsonl is missing"):
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
