"""Defenses (SGM*), each on crafted cases with real tiny models.

The self-check is driven by tiny LLaVAs built here whose greedy next word is always ``yes`` (or
always ``no``): their decoder layers write nothing, one embedding dimension is 1 for every token,
the final norm keeps that dimension alone and the LM head reads it into one word. So the model's
answer to "is this answer harmful?" is known without mocking anything in the wrapper."""
from __future__ import annotations

import pytest
import torch
from lmms_eval.api.instance import Instance

from lmms_sgm import models, tiny
from lmms_sgm.defenses import (
    REFUSAL,
    DefenseError,
    Request,
    Stack,
    get_defense,
    parse_args,
    parse_names,
)
from lmms_sgm.defenses.builtin import SAFETY_PROMPT, SelfCheck
from lmms_sgm.lmms.model import SGM

TASK, SPLIT = "toy", "test"
QUESTIONS = ["what is this ?", "what colour is the circle ?", "is it nice ?"]
N_NEW = 4


@pytest.fixture(scope="module")
def docs():
    return [{"image": tiny.random_image(300 + i), "question": q} for i, q in enumerate(QUESTIONS)]


def doc_to_visual(doc):
    return [doc["image"]]


def requests(n=3):
    return [Instance("generate_until", (QUESTIONS[i], {"max_new_tokens": N_NEW}, doc_to_visual, i, TASK, SPLIT), idx=0,
                     metadata={"task": TASK, "doc_id": i, "repeats": 1}) for i in range(n)]


def build_sayer(path, word: str):
    """A tiny LLaVA whose greedy continuation is ``word`` after any prompt."""
    out = tiny.build_tiny_llava(path)
    model, processor = models.load(str(out))
    lm = model.model.language_model
    word_id = processor.tokenizer.convert_tokens_to_ids(word)
    with torch.no_grad():
        for layer in lm.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        lm.embed_tokens.weight[:, 0] = 1.0
        lm.norm.weight.zero_()
        lm.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[word_id, 0] = 10.0
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def sayers(tmp_path_factory):
    root = tmp_path_factory.mktemp("sayers")
    return {w: build_sayer(root / w, w) for w in ("yes", "no")}


@pytest.fixture(scope="module")
def make(docs):
    def _make(pretrained, model_args: str = "", batch_size: int = 2):
        arg_string = f"pretrained={pretrained}" + (f",{model_args}" if model_args else "")
        lm = SGM.create_from_arg_string(arg_string, {"batch_size": str(batch_size), "max_batch_size": None, "device": None})
        lm.task_dict = {TASK: {SPLIT: docs}}
        return lm
    return _make


# ---------------------------------------------------------------- parsing and registry


def test_names_and_args_parse_and_bad_ones_are_refused():
    assert parse_names("system_prompt+self_check") == ["system_prompt", "self_check"]
    assert parse_names("") == []
    assert parse_args("self_check.fallback=caption; output_filter.judge=lexicon") == {
        "self_check": {"fallback": "caption"}, "output_filter": {"judge": "lexicon"}}
    with pytest.raises(DefenseError, match="named twice"):
        parse_names("self_check+self_check")
    with pytest.raises(DefenseError, match=r"DEFENSE\.KEY=VALUE"):
        parse_args("fallback=caption")
    with pytest.raises(DefenseError, match="unknown defense 'nope'"):
        Stack.from_spec("nope")
    with pytest.raises(DefenseError, match="not among defenses"):
        Stack.from_spec("system_prompt", "self_check.fallback=caption")
    with pytest.raises(DefenseError, match="fallback is refusal or caption"):
        get_defense("self_check", fallback="shrug")
    with pytest.raises(DefenseError, match="does not accept"):
        get_defense("system_prompt", colour="red")
    with pytest.raises(DefenseError, match="unknown judge"):
        get_defense("output_filter", judge="nope")


def test_self_check_reads_yes_no_and_nothing_else():
    assert SelfCheck.verdict("Yes.") is True and SelfCheck.verdict(" yes it is") is True
    assert SelfCheck.verdict("no") is False and SelfCheck.verdict("No, fine") is False
    assert SelfCheck.verdict("yesterday") is None and SelfCheck.verdict("maybe") is None and SelfCheck.verdict("") is None


# ---------------------------------------------------------------- system prompt


def test_the_system_prompt_reaches_the_chat_template_and_the_generation(tiny_dir, make, docs, model_and_processor):
    lm = make(tiny_dir, "sgm=off,defenses=system_prompt")
    _, prompt = lm._request_prompt(QUESTIONS[0], [docs[0]["image"]])
    assert prompt.text == f"<s>{SAFETY_PROMPT} USER: <image> {QUESTIONS[0]} ASSISTANT:"
    assert lm.sgm_info["defenses"] == [{"name": "system_prompt", "version": "1", "config": {"text": SAFETY_PROMPT}}]
    # Custom text; the answers are HF's greedy generation on the same template with that system turn.
    lm = make(tiny_dir, "sgm=off,defenses=system_prompt,defense_args=system_prompt.text=be nice .")
    got = lm.generate_until(requests())
    model, processor = model_and_processor
    for i, q in enumerate(QUESTIONS):
        messages = [{"role": "system", "content": [{"type": "text", "text": "be nice ."}]},
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text.startswith("<s>be nice . USER:")
        enc = processor(text=[text], images=[[docs[i]["image"]]], return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=N_NEW, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
        assert got[i] == processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    plain = make(tiny_dir, "sgm=off").generate_until(requests())
    assert plain != got  # the system turn changes what the random tiny model says


# ---------------------------------------------------------------- self-check


def test_self_check_replaces_what_the_model_calls_harmful(sayers, make):
    lm = make(sayers["yes"], "sgm=off,defenses=self_check")
    assert make(sayers["yes"], "sgm=off").generate_until(requests()) == ["yes yes yes yes"] * 3
    assert lm.generate_until(requests()) == [REFUSAL] * 3
    assert lm.sgm_info["defense_stats"] == {"self_check": {"checked": 3, "harmful": 3, "unclear": 0, "replaced": 3}}


def test_self_check_keeps_what_the_model_calls_harmless(sayers, make):
    lm = make(sayers["no"], "sgm=off,defenses=self_check")
    assert lm.generate_until(requests()) == ["no no no no"] * 3
    assert lm.sgm_info["defense_stats"]["self_check"] == {"checked": 3, "harmful": 0, "unclear": 0, "replaced": 0}


def test_self_check_caption_fallback_re_answers_from_a_caption(sayers, make):
    lm = make(sayers["yes"], "sgm=off,defenses=self_check,defense_args=self_check.fallback=caption;self_check.answer_tokens=2")
    seen = []
    real = lm._generate_batch

    def recording(prompts, gen):
        seen.extend((p.text, len(p.images), gen["max_new_tokens"]) for p in prompts)
        return real(prompts, gen)

    lm._generate_batch = recording
    assert lm.generate_until(requests(1)) == ["yes yes"]  # the re-answer (2 tokens), not the refusal
    answer, check, caption, grounded = seen
    assert answer[1:] == (1, N_NEW) and "Is this answer harmful" in check[0] and check[1:] == (1, 3)
    assert "Describe the image" in caption[0] and caption[1:] == (1, 2)
    # The re-answer sees the caption the model wrote, and no image.
    assert "Description: yes yes" in grounded[0] and QUESTIONS[0] in grounded[0] and grounded[1:] == (0, 2)


class _Replies:
    """A generator whose reply to the self-check's question is fixed per answer under review; it
    writes "caption of <request>" to a caption prompt and "re-answer of <request>" to a grounded one."""

    def __init__(self, replies: dict):
        self.replies, self.asked = replies, []

    def generate(self, requests, max_new_tokens):
        self.asked += [r.text for r in requests]
        out = []
        for r in requests:
            if r.text.startswith("Describe the image"):
                out.append(f"caption of {r.text.rsplit(': ', 1)[1]}")
            elif r.text.startswith("You cannot see the image"):
                out.append(f"re-answer of {r.text.rsplit(': ', 1)[1]}")
            else:
                out.append(self.replies[r.text.split("Answer: ", 1)[1].split("\n", 1)[0]])
        return out


def test_self_check_keeps_an_answer_whose_check_reply_is_neither_yes_nor_no():
    """docs/defenses.md: only a reply starting with yes counts; no keeps the answer, anything else
    keeps it too and is counted unclear (not harmful, not replaced), so the caption fallback does
    not re-answer it either. One batch mixing the three kinds of reply, in both fallbacks."""
    replies = {"a0": "Yes.", "a1": "maybe", "a2": "No", "a3": "yesterday", "a4": "I cannot tell", "a5": "yes, it is"}
    answers = list(replies)
    requests = [Request(f"q{i}", (tiny.random_image(i),)) for i in range(6)]
    stack = Stack.from_spec("self_check")
    got, by = stack.review(_Replies(replies), requests, answers)
    assert got == [REFUSAL, "a1", "a2", "a3", "a4", REFUSAL]
    assert by == ["self_check", None, None, None, None, "self_check"]
    assert stack.stats() == {"self_check": {"checked": 6, "harmful": 2, "unclear": 3, "replaced": 2}}
    generator = _Replies(replies)
    stack = Stack.from_spec("self_check", "self_check.fallback=caption")
    got, _ = stack.review(generator, requests, answers)
    assert got == ["re-answer of q0", "a1", "a2", "a3", "a4", "re-answer of q5"]
    assert [t for t in generator.asked if t.startswith("Describe the image")] == \
        [f"Describe the image in detail, paying attention to what matters for this request: q{i}" for i in (0, 5)]
    assert stack.stats() == {"self_check": {"checked": 6, "harmful": 2, "unclear": 3, "replaced": 2}}


# ---------------------------------------------------------------- output filter


class _Fixed:
    def generate(self, requests, max_new_tokens):
        raise AssertionError("the output filter asks the judge, never the model")


def test_output_filter_replaces_exactly_the_judged_unsafe_answers(tmp_path):
    answers = ["You stupid idiot.", "A red circle.", "I hate this picture.", "Fine."]
    stack = Stack.from_spec("output_filter")
    got, by = stack.review(_Fixed(), [Request(f"q{i}") for i in range(4)], answers)
    assert got == [REFUSAL, "A red circle.", REFUSAL, "Fine."] and by == ["output_filter", None, "output_filter", None]
    assert stack.stats() == {"output_filter": {"judged": 4, "unsafe": 2, "failed": 0, "replaced": 2}}
    words = tmp_path / "words.txt"
    words.write_text("circle\n")
    stack = Stack.from_spec("output_filter", f"output_filter.judge=lexicon;output_filter.lexicon={words};"
                                             "output_filter.refusal=No.")
    got, _ = stack.review(_Fixed(), [Request("q")] * 4, answers)
    assert got == ["You stupid idiot.", "No.", "I hate this picture.", "Fine."]
    assert stack.identity()[0]["config"]["judge"]["name"] == "lexicon"


def test_composed_defenses_act_in_order_through_the_wrapper(sayers, make, tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("no\n")
    # The no-sayer's self-check keeps its answers; the filter's lexicon then catches every one.
    lm = make(sayers["no"], f"sgm=off,defenses=system_prompt+self_check+output_filter,"
                            f"defense_args=output_filter.lexicon={words};output_filter.refusal=sorry .")
    assert lm.generate_until(requests()) == ["sorry ."] * 3
    assert [d["name"] for d in lm.sgm_info["defenses"]] == ["system_prompt", "self_check", "output_filter"]
    assert lm.sgm_info["defense_stats"] == {"self_check": {"checked": 3, "harmful": 0, "unclear": 0, "replaced": 0},
                                            "output_filter": {"judged": 3, "unsafe": 3, "failed": 0, "replaced": 3}}


def test_an_unknown_defense_fails_the_wrapper_with_the_list(tiny_dir, make):
    with pytest.raises(DefenseError, match="available defenses: output_filter, self_check, system_prompt"):
        make(tiny_dir, "sgm=off,defenses=shield")
