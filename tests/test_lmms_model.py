"""The lmms-eval model ``sgm_llava`` driven directly: model_args strings in, hand-built
``Instance`` requests with a fake ``task_dict``, results checked against the HF model run here
(negative log-likelihoods computed from its logits, generations with the core ``glasses.apply``)."""
from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from lmms_eval.api.instance import GenerationResult, Instance

from lmms_sgm import pipeline, tiny
from lmms_sgm.interventions import GlassesMismatch, SafetyGlasses
from lmms_sgm.lmms.model import (
    SGM,
    SGMLlava,
    batched,
    is_loglikelihood_result,
    truncate,
)
from lmms_sgm.options import ProfileOptions, SelectionOptions

TASK, SPLIT = "toy", "test"
QUESTIONS = [
    "what is this ?",
    "what colour is the circle in the top left of this picture ?",
    "how many ?",
    "is this a nice image or a bad image , what do you think ?",
    "what shape",
    "which colour",
]
CHOICES = ["red", "blue circle", "a green square", "yes"]
ALL_MODULES = ("gate_proj", "up_proj", "intermediate", "down_proj")
MODES = ("hooks", "fold", "nnsight")
N_NEW = 6


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def docs():
    return [{"image": tiny.random_image(100 + i), "question": q} for i, q in enumerate(QUESTIONS)]


def doc_to_visual(doc):
    return [doc["image"]]


@pytest.fixture(scope="module")
def glasses_dir(load_model, toy_jsonl, tmp_path_factory):
    """det0 over every module kind: strong enough to change greedy generations of the tiny model."""
    model, processor = load_model()
    out = tmp_path_factory.mktemp("lmms_glasses") / "det0"
    pipeline.build_glasses(model, processor, toy_jsonl, ProfileOptions(modules=ALL_MODULES),
                           SelectionOptions(rule="det0", top_k=40), out=out, progress=False)
    return out


@pytest.fixture(scope="module")
def make(tiny_dir, docs):
    """Build the wrapper the way lmms-eval does: ``create_from_arg_string`` with the CLI's extras."""

    def _make(model_args: str = "", batch_size: int = 1):
        arg_string = f"pretrained={tiny_dir}" + (f",{model_args}" if model_args else "")
        lm = SGMLlava.create_from_arg_string(arg_string, {"batch_size": str(batch_size), "max_batch_size": None, "device": None})
        lm.task_dict = {TASK: {SPLIT: docs}}
        return lm

    return _make


def gen_request(doc_id, question, gen_kwargs):
    return Instance("generate_until", (question, dict(gen_kwargs), doc_to_visual, doc_id, TASK, SPLIT), idx=0,
                    metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})


def ll_requests(doc_id, question, choices):
    return [Instance("loglikelihood", (question, f" {c}", doc_to_visual, doc_id, TASK, SPLIT), idx=i,
                     metadata={"task": TASK, "doc_id": doc_id, "repeats": 1}) for i, c in enumerate(choices)]


def user_prompt(processor, question):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def reference_nll(model, processor, image, question, continuation):
    """Mean NLL of the continuation's tokens, from one unpadded forward pass of the HF model."""
    prompt = user_prompt(processor, question)
    full = processor(images=[image], text=[prompt + continuation], return_tensors="pt")
    n_prompt = processor(images=[image], text=[prompt], return_tensors="pt")["input_ids"].shape[1]
    logits = model(**full).logits[0].double()
    ids = full["input_ids"][0]
    logprobs = torch.log_softmax(logits, dim=-1)
    token_lp = [logprobs[t - 1, ids[t]] for t in range(n_prompt, len(ids))]
    greedy = all(int(logits[t - 1].argmax()) == int(ids[t]) for t in range(n_prompt, len(ids)))
    return -float(torch.stack(token_lp).mean()), greedy


@torch.no_grad()
def reference_generate(generator, processor, docs, ids, nnsight=False):
    """Greedy generation of the given docs in one left-padded batch, decoded like the wrapper."""
    processor.tokenizer.padding_side = "left"
    enc = processor(images=[docs[i]["image"] for i in ids], text=[user_prompt(processor, docs[i]["question"]) for i in ids],
                    return_tensors="pt", padding=True)
    kw = {"max_new_tokens": N_NEW, "do_sample": False, "pad_token_id": processor.tokenizer.pad_token_id}
    if nnsight:
        with generator.generate(**enc, **kw) as tracer:
            out = tracer.result.save()
    else:
        out = generator.generate(**enc, **kw)
    return processor.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


# ---------------------------------------------------------------- loglikelihood


@pytest.mark.parametrize("config", ["sgm=off", "mode=hooks", "mode=fold", "mode=nnsight"])
def test_loglikelihood_equals_reference_nll_and_argmin(config, make, docs, glasses_dir, load_model):
    """Each loss is the mean NLL of the continuation computed directly from the HF model (with the
    core glasses.apply when glasses are worn), also in padded batches; argmin picks the answer."""
    ref_model, processor = load_model()
    with_glasses = config != "sgm=off"
    handle = SafetyGlasses.load(glasses_dir).apply(ref_model, mode="hooks") if with_glasses else None
    try:
        # One choice per doc is the reference's own greedy next word, so is_greedy is exercised both ways.
        cases = []
        for doc_id in (0, 1, 3):
            prompt = user_prompt(processor, docs[doc_id]["question"])
            with torch.no_grad():
                enc = processor(images=[docs[doc_id]["image"]], text=[prompt], return_tensors="pt")
                greedy_word = processor.tokenizer.decode([int(ref_model(**enc).logits[0, -1].argmax())])
            choices = CHOICES + [greedy_word]
            refs = [reference_nll(ref_model, processor, docs[doc_id]["image"], docs[doc_id]["question"], f" {c}") for c in choices]
            cases.append((doc_id, choices, refs))
    finally:
        if handle is not None:
            handle.remove()

    model_args = config if not with_glasses else f"glasses={glasses_dir},{config}"
    lm = make(model_args, batch_size=3)
    requests = [r for doc_id, choices, _ in cases for r in ll_requests(doc_id, docs[doc_id]["question"], choices)]
    results = lm.loglikelihood(requests)
    assert len(results) == len(requests)
    at = 0
    for _doc_id, choices, refs in cases:
        got = results[at: at + len(choices)]
        at += len(choices)
        for (loss, greedy), (ref_loss, ref_greedy) in zip(got, refs):
            assert isinstance(loss, float) and isinstance(greedy, bool)
            assert loss == pytest.approx(ref_loss, abs=1e-5)
            assert greedy == ref_greedy
        assert refs[-1][1] is True  # the reference's greedy word is greedy
        losses = [g[0] for g in got]
        assert losses.index(min(losses)) == min(range(len(refs)), key=lambda i: refs[i][0])


@torch.no_grad()
def reference_token_greedy(model, processor, image, question, continuation) -> list[bool]:
    """Per continuation token: is it the argmax of the step before it (one unpadded forward pass)."""
    prompt = user_prompt(processor, question)
    full = processor(images=[image], text=[prompt + continuation], return_tensors="pt")
    n_prompt = processor(images=[image], text=[prompt], return_tensors="pt")["input_ids"].shape[1]
    logits, ids = model(**full).logits[0], full["input_ids"][0]
    return [int(logits[t - 1].argmax()) == int(ids[t]) for t in range(n_prompt, len(ids))]


def test_is_greedy_needs_every_continuation_token_to_be_greedy(make, docs, load_model):
    """is_greedy (lmms-eval's exact-match of greedy decoding) is true only when every token of the
    continuation is the argmax: multi-token continuations whose first token is greedy and a later
    one is not must read False; a two-token greedy chain reads True."""
    model, processor = load_model()
    tok = processor.tokenizer
    cases = []  # (doc_id, continuation, per-token flags from the reference)
    for doc_id in range(len(docs)):
        image, question = docs[doc_id]["image"], docs[doc_id]["question"]
        with torch.no_grad():
            enc = processor(images=[image], text=[user_prompt(processor, question)], return_tensors="pt")
            first = tok.decode([int(model(**enc).logits[0, -1].argmax())]).strip()
            enc = processor(images=[image], text=[user_prompt(processor, question) + f" {first}"], return_tensors="pt")
            second = tok.decode([int(model(**enc).logits[0, -1].argmax())]).strip()
        for cont in (f" {first} {second}", *(f" {first} {c}" for c in CHOICES), *(f" {c} {first}" for c in CHOICES)):
            cases.append((doc_id, cont, reference_token_greedy(model, processor, image, question, cont)))
    mixed = [c for c in cases if len(c[2]) > 1 and any(c[2]) and not all(c[2])]
    chains = [c for c in cases if len(c[2]) > 1 and all(c[2])]
    assert len(mixed) >= 3 and chains, "the cases must exercise some-but-not-all greedy tokens and a greedy chain"
    requests = [Instance("loglikelihood", (docs[d]["question"], cont, doc_to_visual, d, TASK, SPLIT), idx=i,
                         metadata={"task": TASK, "doc_id": d, "repeats": 1}) for i, (d, cont, _) in enumerate(cases)]
    results = make("sgm=off", batch_size=4).loglikelihood(requests)
    assert [greedy for _, greedy in results] == [all(flags) for _, _, flags in cases]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_loglikelihood_does_not_depend_on_batch_composition(make, docs, attn):
    """A request's loss is the one it has alone, whichever requests share its right-padded batch:
    bit for bit with eager attention; with sdpa within float noise (its CPU kernel changes the low
    bits of a row's last positions, where the continuation is, with the padded length)."""
    requests = [r for doc_id in range(len(docs)) for r in ll_requests(doc_id, docs[doc_id]["question"], CHOICES)]
    results, padded = {}, []
    for bs in (1, 3, 8):
        lm = make("sgm=off", batch_size=bs)
        lm._model.set_attn_implementation(attn)
        encode = lm._encode

        def spy(texts, images, videos, padding_side, encode=encode):
            enc = encode(texts, images, videos, padding_side)
            padded.append(bool((enc["attention_mask"] == 0).any()))
            return enc

        lm._encode = spy
        results[bs] = lm.loglikelihood(requests)
    assert any(padded), "some batch must be padded"
    for bs in (3, 8):
        if attn == "eager":
            assert results[bs] == results[1]
        else:
            assert [g for _, g in results[bs]] == [g for _, g in results[1]]
            assert [loss for loss, _ in results[bs]] == pytest.approx([loss for loss, _ in results[1]], rel=1e-6, abs=1e-7)


def test_glasses_change_the_losses(make, docs, glasses_dir):
    requests = ll_requests(1, docs[1]["question"], CHOICES)
    off = [r[0] for r in make("sgm=off").loglikelihood(requests)]
    for mode in MODES:
        on = [r[0] for r in make(f"glasses={glasses_dir},mode={mode}").loglikelihood(requests)]
        assert max(abs(a - b) for a, b in zip(on, off)) > 1e-4, mode
    # strength 0 is the vanilla model
    zero = [r[0] for r in make(f"glasses={glasses_dir},strength=0").loglikelihood(requests)]
    assert zero == pytest.approx(off, abs=1e-6)


def test_unconditional_and_doc_target_requests(make, docs, model_and_processor):
    """lmms-eval's acc_mutual_info requests carry only (context, continuation); plain loglikelihood
    tasks pass doc_to_target instead of a string."""
    model, processor = model_and_processor
    lm = make("sgm=off")
    bare = Instance("loglikelihood", ("", "red circle"), idx=0, metadata={"task": TASK, "doc_id": 0, "repeats": 1})
    by_target = Instance("loglikelihood", (docs[2]["question"], lambda doc: " yes", doc_to_visual, 2, TASK, SPLIT), idx=0,
                         metadata={"task": TASK, "doc_id": 2, "repeats": 1})
    (bare_loss, _), (target_loss, _) = lm.loglikelihood([bare, by_target])
    assert target_loss == pytest.approx(reference_nll(model, processor, docs[2]["image"], docs[2]["question"], " yes")[0], abs=1e-5)
    text_only = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": ""}]}],
                                              tokenize=False, add_generation_prompt=True)
    with torch.no_grad():
        full = processor(text=[text_only + "red circle"], return_tensors="pt")
        n = processor(text=[text_only], return_tensors="pt")["input_ids"].shape[1]
        lp = torch.log_softmax(model(**full).logits[0].double(), -1)
    ids = full["input_ids"][0]
    expected = -float(torch.stack([lp[t - 1, ids[t]] for t in range(n, len(ids))]).mean())
    assert bare_loss == pytest.approx(expected, abs=1e-5)


def test_loglikelihood_results_survive_lmms_eval_unwrapping(make, docs):
    """lmms-eval 0.7.3 stringifies every result that is not text; our wrapper of its
    unwrap_generation_output keeps (loss, is_greedy) pairs and leaves everything else alone."""
    from lmms_eval import evaluator
    from lmms_eval.api.task import ConfigurableTask

    lm = make("sgm=off")
    make("sgm=off")  # a second model must not wrap the wrapper again
    unwrap = evaluator.unwrap_generation_output
    assert unwrap._lmms_sgm_passthrough and not getattr(unwrap.__wrapped__, "_lmms_sgm_passthrough", False)
    assert unwrap.__wrapped__((0.5, False)) == ("(0.5, False)", None)  # the bug being worked around
    assert unwrap("text") == ("text", None)
    assert unwrap(GenerationResult(text="hi")) == ("hi", None)
    assert unwrap(["a", "b"]) == (["a", "b"], None)
    assert unwrap([1.25, True]) == ((1.25, True), None)  # as the response cache hands them back

    # lmms-eval's own multiple-choice scoring on what the evaluator stores (TakeFirst filter: r[0]).
    requests = ll_requests(0, docs[0]["question"], CHOICES)
    stored = [unwrap(x)[0] for x in lm.loglikelihood(requests)]
    losses = [s[0] for s in stored]
    for gold in range(len(CHOICES)):
        fake_task = type("FakeTask", (), {
            "OUTPUT_TYPE": "multiple_choice", "config": type("C", (), {"process_results": None})(),
            "_metric_fn_list": {"acc": None}, "multiple_input": False, "multiple_target": False,
            "doc_to_choice": lambda self, doc: CHOICES, "doc_to_target": lambda self, doc, g=gold: g,
        })()
        metrics = ConfigurableTask.process_results(fake_task, docs[0], stored)
        assert metrics["acc"] == float(gold == losses.index(min(losses)))


def test_the_passthrough_wraps_lmms_evals_unwrap_once(monkeypatch):
    """Installed on lmms-eval's own function (not only on a wrapper installed earlier): the wrapper
    is marked, names what it wraps, keeps loss pairs whole, hands the rest on, and a second
    install leaves it alone."""
    from lmms_eval import evaluator

    from lmms_sgm.lmms.model import install_loglikelihood_passthrough
    original = evaluator.unwrap_generation_output
    while getattr(original, "_lmms_sgm_passthrough", False):
        original = original.__wrapped__
    monkeypatch.setattr(evaluator, "unwrap_generation_output", original)
    install_loglikelihood_passthrough()
    ours = evaluator.unwrap_generation_output
    assert ours is not original and ours._lmms_sgm_passthrough is True and ours.__wrapped__ is original
    install_loglikelihood_passthrough()
    assert evaluator.unwrap_generation_output is ours
    assert ours((0.5, False)) == ((0.5, False), None) and ours([1.5, np.bool_(True)]) == ((1.5, np.bool_(True)), None)
    for other in ("text", ["a", "b"], GenerationResult(text="hi"), (0.5, "no")):
        assert ours(other) == original(other)


# ---------------------------------------------------------------- generation


def test_batched_generation_equals_unbatched(make):
    """batch_size 4 (left padding, prompts of different lengths, two generation settings) gives
    the same text as one request at a time, in request order."""
    requests = [gen_request(i, q, {"max_new_tokens": N_NEW if i % 2 else N_NEW - 2, "temperature": 0}) for i, q in enumerate(QUESTIONS)]
    for config in ("sgm=off", "mode=nnsight,sgm=off"):
        one = make(config, batch_size=1).generate_until(requests)
        four = make(config, batch_size=4).generate_until(requests)
        assert four == one
        assert all(isinstance(t, str) and t for t in one)
        single = [make(config).generate_until([r])[0] for r in requests[:2]]
        assert single == one[:2]


@pytest.mark.parametrize("mode", MODES)
def test_glasses_generation_equals_core_apply(mode, make, docs, glasses_dir, load_model):
    """The wrapper's generations equal generating with glasses.apply from the core on the same
    inputs, and the glasses change what the model says (else this test could not fail)."""
    ids = [0, 1, 2, 3]
    ref_model, processor = load_model()
    vanilla = reference_generate(ref_model, processor, docs, ids)
    with SafetyGlasses.load(glasses_dir).apply(ref_model, mode=mode, processor=processor) as handle:
        expected = reference_generate(handle.model, processor, docs, ids, nnsight=mode == "nnsight")
    assert expected != vanilla
    lm = make(f"glasses={glasses_dir},mode={mode}", batch_size=4)
    got = lm.generate_until([gen_request(i, docs[i]["question"], {"max_new_tokens": N_NEW}) for i in ids])
    assert got == expected
    assert lm.sgm_info["glasses_digest"] == SafetyGlasses.load(glasses_dir).digest()
    assert lm.sgm_info["strength"] == 1.0 and lm.sgm_info["mode"] == mode


def test_until_truncates_at_the_first_stop_string(make, docs):
    lm = make("sgm=off", batch_size=2)
    free = lm.generate_until([gen_request(i, docs[i]["question"], {"max_new_tokens": 8}) for i in range(2)])
    words = free[0].split()
    assert len(words) >= 4
    stop_late, stop_early = words[3], words[1]
    got = lm.generate_until([gen_request(i, docs[i]["question"], {"max_new_tokens": 8, "until": [stop_late, stop_early]})
                             for i in range(2)])
    assert got[0] == free[0][: free[0].index(stop_early)]
    assert len(got[0]) < len(free[0])
    one = lm.generate_until([gen_request(0, docs[0]["question"], {"max_new_tokens": 8, "until": stop_late})])
    assert one[0] == free[0][: free[0].index(stop_late)]


@pytest.mark.parametrize("text, until, expected", [
    ("hello world. bye", [".", " "], "hello"),  # the earliest stop wins, whatever its place in the list
    ("hello world. bye", [" ", "."], "hello"),
    ("abcabc", ["c"], "ab"),  # the first occurrence
    ("xabc", ["x"], ""),  # a stop at position 0
    ("abc", ["z"], "abc"),
    ("abc", [], "abc"),
])
def test_truncate_cuts_at_the_earliest_stop_string(text, until, expected):
    assert truncate(text, until) == expected


@pytest.mark.parametrize("order, keys, size, expected", [
    ([2, 0, 1, 3], ["a", "a", "b", "a"], 2, [[2], [0, 1], [3]]),  # a key change or a full batch starts another
    ([0, 1, 2, 3, 4], [0, 0, 0, 0, 0], 2, [[0, 1], [2, 3], [4]]),
    ([0, 1, 2], [0, 0, 0], 1, [[0], [1], [2]]),
    ([1, 0, 2], [5, 5, 5], 8, [[1, 0, 2]]),  # order kept inside a batch
    ([0, 2, 1], ["x", "x", "y"], 4, [[0], [2], [1]]),  # batches are runs of the order, not groups
    ([], [], 3, []),
])
def test_batched_cuts_the_order_into_runs_of_one_key(order, keys, size, expected):
    assert batched(order, keys, size) == expected


@pytest.mark.parametrize("output, expected", [
    ((0.5, False), True), ([1.25, True], True), ((3, np.bool_(False)), True), ((np.float32(0.5), True), True),
    ((True, False), False), ((np.bool_(True), True), False),  # the loss is a number, not a bool
    ((0.5, 1), False), ((0.5, "True"), False), (("0.5", False), False), ((None, True), False),
    ((0.5,), False), ((0.5, False, 1), False), ("ab", False), ({0.5: False}, False), (0.5, False),
])
def test_what_counts_as_a_loglikelihood_result(output, expected):
    assert is_loglikelihood_result(output) is expected


def _settings(gen_kwargs, pad=None, eos=7):
    """``SGM._generation_settings`` without a model: it reads only the tokenizer's pad and eos ids."""
    import types
    fake = types.SimpleNamespace(tokenizer=types.SimpleNamespace(pad_token_id=pad, eos_token_id=eos), _warned=set())
    return SGM._generation_settings(fake, gen_kwargs), fake


GREEDY = {"max_new_tokens": 1024, "do_sample": False, "num_beams": 1, "pad_token_id": 7}


@pytest.mark.parametrize("gen_kwargs, gen, until", [
    ({}, GREEDY, []),  # lmms-eval's llava_hf defaults: greedy, 1024 new tokens
    ({"until": None, "max_new_tokens": None, "num_beams": None}, GREEDY, []),
    ({"until": "\n\n", "max_new_tokens": "16", "num_beams": 2}, {**GREEDY, "max_new_tokens": 16, "num_beams": 2}, ["\n\n"]),
    ({"until": ["", "Q:", "\n"]}, GREEDY, ["Q:", "\n"]),  # empty stop strings dropped
    ({"until": ("a",)}, GREEDY, ["a"]),
    ({"temperature": 0}, GREEDY, []),
    ({"temperature": 0, "do_sample": True, "top_p": 0.9}, GREEDY, []),  # temperature 0 means greedy
    ({"do_sample": False, "temperature": 0.7, "top_k": 5}, GREEDY, []),  # do_sample wins over a temperature
    ({"do_sample": True}, {**GREEDY, "do_sample": True, "temperature": 1.0}, []),
    ({"temperature": "0.7"}, {**GREEDY, "do_sample": True, "temperature": 0.7}, []),
    ({"temperature": 0.5, "top_p": "0.9", "top_k": "0"},  # top_k 0 kept: no cut (HF's default would be 50)
     {**GREEDY, "do_sample": True, "temperature": 0.5, "top_p": 0.9, "top_k": 0}, []),
    ({"temperature": 0.5, "top_p": None, "top_k": None}, {**GREEDY, "do_sample": True, "temperature": 0.5}, []),
    ({"do_sample": 1, "image_sizes": [1], "use_cache": True}, {**GREEDY, "do_sample": True, "temperature": 1.0}, []),
])
def test_generation_settings_from_lmms_eval_gen_kwargs(gen_kwargs, gen, until):
    (got_gen, got_until), _ = _settings(gen_kwargs)
    assert got_gen == gen and type(got_gen["do_sample"]) is bool and got_until == until
    assert type(got_gen["max_new_tokens"]) is int and type(got_gen["num_beams"]) is int


def test_generation_settings_pad_id_and_refused_until():
    assert _settings({}, pad=3)[0][0]["pad_token_id"] == 3
    assert _settings({}, pad=0)[0][0]["pad_token_id"] == 0  # id 0 is an id, not a missing one
    for bad in (5, ["a", 5], {"a": 1}):
        with pytest.raises(ValueError, match="gen_kwargs\\['until'\\] must be a string or a list of strings"):
            _settings({"until": bad})


def test_unused_generation_kwargs_are_warned_about_once_per_set():
    from loguru import logger
    seen = []
    sink = logger.add(lambda m: seen.append(m.record["message"]), level="WARNING")
    try:
        (_, fake) = _settings({"foo": 1, "bar": 2, "until": "x", "image_sizes": 1, "temperature": 0})
        SGM._generation_settings(fake, {"bar": 3, "foo": 4})
        SGM._generation_settings(fake, {"temperature": 0.2, "num_beams": 1})
        SGM._generation_settings(fake, {"foo": 1})
    finally:
        logger.remove(sink)
    assert fake._warned == {("bar", "foo"), ("foo",)}
    assert [m for m in seen if "are not used" in m] == [
        "sgm: generation kwargs ['bar', 'foo'] are not used", "sgm: generation kwargs ['foo'] are not used"]


def _fake_wrapper(image_counts, batch_size=2, reviews=False):
    """An ``SGM`` without a model for its request bookkeeping: prompts are the contexts, each
    request's images are named by ``image_counts``, a batch's answer is the prompt plus a tail."""
    import types
    fake = types.SimpleNamespace(batch_size=batch_size, rank=0, _warned=set(), batches=[],
                                 tokenizer=types.SimpleNamespace(pad_token_id=0, eos_token_id=0),
                                 _adapter=types.SimpleNamespace(batch_by_image_count=True),
                                 defenses=types.SimpleNamespace(reviews=reviews))
    fake._visuals = lambda doc_to_visual, task, split, doc_id: [f"img{doc_id}"] * image_counts[doc_id]
    fake._generation_settings = lambda kw: SGM._generation_settings(fake, kw)
    fake._batch_key = lambda prompt: SGM._batch_key(fake, prompt)
    fake._request_prompt = lambda context, visuals: (("asked", context), types.SimpleNamespace(text=context, images=visuals, videos=[]))

    def generate_batch(prompts, gen):
        fake.batches.append(([p.text for p in prompts], gen["do_sample"]))
        return [f"{p.text}. Then more." for p in prompts]
    fake._generate_batch = generate_batch
    return fake


def _fake_requests(specs):
    import types
    return [types.SimpleNamespace(args=(context, gen_kwargs, None, i, TASK, SPLIT)) for i, (context, gen_kwargs) in enumerate(specs)]


def test_generate_until_batches_one_setting_and_image_count_longest_first_and_answers_in_order():
    greedy, sample = {"max_new_tokens": 8}, {"max_new_tokens": 8, "temperature": 0.5}
    requests = _fake_requests([("aaaa", {**greedy, "until": ["."]}), ("bbbbbbbb", greedy), ("cc", sample),
                               ("dddddd", {**greedy, "until": "Then"}), ("eeeee", greedy), ("ffffffffff", sample)])
    fake = _fake_wrapper([1, 1, 1, 1, 2, 1])
    got = SGM.generate_until(fake, requests)
    # each request's own stop strings, though it shares a batch with requests that have others
    assert got == ["aaaa", "bbbbbbbb. Then more.", "cc. Then more.", "dddddd. ", "eeeee. Then more.", "ffffffffff. Then more."]
    # groups: (greedy, 1 image) = 1, 3, 0 longest first; (greedy, 2 images) = 4; (sampling, 1 image) = 5, 2
    assert fake.batches == [(["bbbbbbbb", "dddddd"], False), (["aaaa"], False), (["eeeee"], False),
                            (["ffffffffff", "cc"], True)]


def test_loglikelihood_batches_one_image_count_longest_first_and_answers_in_order():
    import types
    fake = _fake_wrapper({0: 1, 1: 1, 2: 2}, batch_size=2)
    fake._doc = lambda task, split, doc_id: {"answer": f"gold{doc_id}", "task": (task, split)}
    fake._loglikelihood_batch = lambda items: fake.batches.append([c + t for c, t in ((p.text, t) for p, t in items)]) or [
        (float(len(p.text + t)), len(p.images) == 2) for p, t in items]
    requests = [
        types.SimpleNamespace(args=("ctx", " yes", None, 0, TASK, SPLIT)),
        types.SimpleNamespace(args=("context", lambda doc: " " + doc["answer"] + str(doc["task"] == (TASK, SPLIT)), None, 1, TASK, SPLIT)),
        types.SimpleNamespace(args=("c", " no", None, 2, TASK, SPLIT)),
        types.SimpleNamespace(args=("unconditional", " maybe")),  # acc_mutual_info: no doc, no image
    ]
    got = SGM.loglikelihood(fake, requests)
    assert got == [(7.0, False), (17.0, False), (4.0, True), (19.0, False)]
    # keys: 0 images for the unconditional request, 1 or 2 for the others; longest context + target first
    assert fake.batches == [["unconditional maybe"], ["context gold1True", "ctx yes"], ["c no"]]


@pytest.mark.parametrize("rank", [0, 1])
def test_progress_bars_count_the_requests_on_the_main_process_only(rank, monkeypatch):
    from lmms_sgm.lmms import model as wrapper
    bars = []

    class Bar:
        def __init__(self, **kw):
            self.kw, self.done, self.closed = kw, 0, False
            bars.append(self)

        def update(self, n):
            self.done += n

        def close(self):
            self.closed = True

    monkeypatch.setattr(wrapper, "tqdm", Bar)
    fake = _fake_wrapper([1, 1, 2], batch_size=2)
    fake.rank = rank
    fake._doc = lambda task, split, doc_id: {}
    fake._loglikelihood_batch = lambda items: [(1.0, True)] * len(items)
    SGM.generate_until(fake, _fake_requests([("a", {}), ("bb", {}), ("c", {})]))
    SGM.loglikelihood(fake, [types.SimpleNamespace(args=("q", " a", None, i, TASK, SPLIT)) for i in range(3)])
    assert [b.kw for b in bars] == [{"total": 3, "disable": rank != 0, "desc": "sgm generate_until"},
                                    {"total": 3, "disable": rank != 0, "desc": "sgm loglikelihood"}]
    assert [(b.done, b.closed) for b in bars] == [(3, True), (3, True)]


def test_generate_until_hands_the_requests_and_answers_to_the_defenses():
    fake = _fake_wrapper([1, 1], reviews=True)
    seen = []
    fake._review = lambda asked, answers: seen.append((asked, answers)) or ["reviewed"] * len(answers)
    assert SGM.generate_until(fake, _fake_requests([("q1", {"until": "."}), ("q22", {})])) == ["reviewed", "reviewed"]
    assert seen == [([("asked", "q1"), ("asked", "q22")], ["q1", "q22. Then more."])]


def test_review_publishes_what_the_defenses_did(monkeypatch):
    import types

    from loguru import logger

    from lmms_sgm.lmms import model as wrapper
    published, calls, logs = [], [], []
    monkeypatch.setattr(wrapper.run_info, "publish", lambda info: published.append(dict(info)))
    stats = {"self_check": {"replaced": 1}}
    fake = types.SimpleNamespace(sgm_info={"sgm": True})
    fake.defenses = types.SimpleNamespace(
        review=lambda gen, asked, answers: calls.append((gen.model, asked, answers)) or (["a", "safe", "c"], [None, "self_check", None]),
        stats=lambda: stats)
    sink = logger.add(lambda m: logs.append(m.record["message"]), level="INFO")
    try:
        assert SGM._review(fake, ["r1", "r2", "r3"], ["a", "b", "c"]) == ["a", "safe", "c"]
    finally:
        logger.remove(sink)
    assert calls == [(fake, ["r1", "r2", "r3"], ["a", "b", "c"])]
    assert fake.sgm_info == {"sgm": True, "defense_stats": stats} and published == [fake.sgm_info]
    assert logs == ['sgm: defenses replaced 1 of 3 answers: {"self_check": {"replaced": 1}}']


class _Traced:
    """What an nnsight ``trace`` / ``generate`` context gives: ``tracer.result`` / ``runner.output``."""

    def __init__(self, value, raise_on_enter=None):
        import types
        self.value, self.raise_on_enter = value, raise_on_enter
        self.result = types.SimpleNamespace(save=lambda: value)

    def __enter__(self):
        if self.raise_on_enter is not None:
            raise self.raise_on_enter
        return self

    def __exit__(self, *exc):
        return False


def _fake_runner_wrapper(mode, remote=False, raise_on_enter=None):
    import types
    calls = []
    fake = types.SimpleNamespace(args=types.SimpleNamespace(mode=mode, is_remote=remote), calls=calls)
    fake._handle = types.SimpleNamespace(generate=lambda enc, **gen: calls.append(("handle", enc, gen)) or "remote tokens")
    runner = types.SimpleNamespace(output=types.SimpleNamespace(logits=types.SimpleNamespace(save=lambda: "traced logits")))
    runner.generate = lambda **kw: calls.append(("generate", kw)) or (
        _Traced("traced tokens", raise_on_enter) if mode == "nnsight" else "plain tokens")
    runner.trace = lambda **kw: calls.append(("trace", kw)) or _Traced(None, raise_on_enter)
    fake._runner = runner
    return fake


def test_generation_and_logits_take_the_path_of_the_mode():
    enc, gen = {"input_ids": 1}, {"max_new_tokens": 2}
    fake = _fake_runner_wrapper("nnsight")
    assert SGM._generate(fake, enc, gen) == "traced tokens"
    assert SGM._forward_logits(fake, enc) == "traced logits"
    assert fake.calls == [("generate", {"input_ids": 1, "max_new_tokens": 2}), ("trace", {"input_ids": 1})]
    fake = _fake_runner_wrapper("hooks")
    assert SGM._generate(fake, enc, gen) == "plain tokens" and fake.calls == [("generate", {"input_ids": 1, "max_new_tokens": 2})]
    fake = _fake_runner_wrapper("nnsight", remote=True)
    assert SGM._generate(fake, enc, gen) == "remote tokens" and fake.calls == [("handle", enc, gen)]


def test_an_nnsight_batch_that_skips_an_edited_layer_is_explained():
    from nnsight.intervention.interleaver import OutOfOrderError
    fake = _fake_runner_wrapper("nnsight", raise_on_enter=OutOfOrderError("cross_attn not run"))
    for call in (lambda: SGM._generate(fake, {"input_ids": 1}, {}), lambda: SGM._forward_logits(fake, {"input_ids": 1})):
        with pytest.raises(ValueError, match="mode=nnsight cannot run this batch: it holds no image"):
            call()
    with pytest.raises(OutOfOrderError):  # with an image the error is nnsight's own
        SGM._generate(fake, {"input_ids": 1, "pixel_values": 2}, {})


def test_multi_round_is_refused(make):
    with pytest.raises(NotImplementedError, match="single-round"):
        make("sgm=off").generate_until_multi_round([])


# ---------------------------------------------------------------- model_args


@pytest.fixture(scope="module")
def other_glasses(tmp_path_factory, toy_jsonl):
    """Glasses of another tiny LLaVA (intermediate_size 48 instead of 64)."""
    from lmms_sgm import models

    other = tiny.build_tiny_llava(tmp_path_factory.mktemp("other_llava"), intermediate_size=48)
    model, processor = models.load(str(other))
    out = tmp_path_factory.mktemp("other_glasses") / "g"
    pipeline.build_glasses(model, processor, toy_jsonl, out=out, progress=False)
    return out


@pytest.mark.parametrize("model_args, error, message", [
    ("sgm=off,colour=red", ValueError, r"unknown model_args colour; known: .*pretrained.*profile_pooling.*select_threshold"),
    ("sgm=off,mode=magic", ValueError, r"unknown mode 'magic'; choose from hooks, nnsight, fold"),
    ("sgm=off,strength=2", ValueError, r"strength must be in \[0, 1\], got 2"),
    ("sgm=off,dtype=float8", ValueError, r"choose from auto, float32"),
    ("", ValueError, r"needs glasses: pass glasses=DIR .*profile_data=PAIRS.*sgm=off"),
    ("sgm=off,profile_pooling=max", ValueError, r"profile_pooling only apply .* add profile_data"),
    ("sgm=off,select_top_k=3", ValueError, r"select_top_k select experts of glasses; add glasses=DIR"),
    ("glasses=/nonexistent/glasses", FileNotFoundError, r"no such directory; build glasses with `lmms-sgm profile"),
])
def test_bad_model_args_say_what_to_do(model_args, error, message, make):
    with pytest.raises(error, match=message):
        make(model_args)


def test_missing_pretrained():
    with pytest.raises(ValueError, match="pretrained is required: a Hub id or a local model directory"):
        SGMLlava.create_from_arg_string("sgm=off", {"batch_size": "1"})


def test_auto_batch_size_is_refused(tiny_dir):
    with pytest.raises(ValueError, match=r"no automatic batch size.*--batch_size 4"):
        SGMLlava.create_from_arg_string(f"pretrained={tiny_dir},sgm=off", {"batch_size": "auto"})


def test_batch_size_in_model_args_and_on_the_command_line(tiny_dir):
    base = f"pretrained={tiny_dir},sgm=off"
    lm = SGMLlava.create_from_arg_string(base + ",batch_size=3", {"batch_size": 1, "device": None})
    assert lm.batch_size == 3  # model_args win over the CLI default
    lm = SGMLlava.create_from_arg_string(base + ",batch_size=3", {"batch_size": "3"})
    assert lm.batch_size == 3
    with pytest.raises(ValueError, match=r"batch_size given twice: 3 in --model_args and '5' by --batch_size"):
        SGMLlava.create_from_arg_string(base + ",batch_size=3", {"batch_size": "5"})
    with pytest.raises(ValueError, match="device given both in --model_args and as a command-line option"):
        SGMLlava.create_from_arg_string(base + ",device=cpu", {"batch_size": "1", "device": "cpu"})


def test_glasses_of_another_model_are_refused(make, other_glasses):
    with pytest.raises(GlassesMismatch, match=r"intermediate_size: glasses 48 vs model 64.*lmms-sgm profile.*profile_data=PAIRS"):
        make(f"glasses={other_glasses}")


def test_lmms_eval_value_types_are_parsed(make, glasses_dir):
    """lmms-eval turns "0.5"/"false"/"2" into Python values before the model sees them."""
    lm = make(f"glasses={glasses_dir},strength=0.5,mode=fold", batch_size=2)
    assert (lm.args.strength, lm.args.mode, lm.batch_size, lm.args.sgm) == (0.5, "fold", 2, True)
    assert make("sgm=false").args.sgm is False


def test_select_options_reselect_given_glasses(make, glasses_dir):
    lm = make(f"glasses={glasses_dir},select_rule=damp,select_top_k=5,select_damp_factor=0.25")
    expected = SafetyGlasses.load(glasses_dir).reselect(SelectionOptions(rule="damp", top_k=5, damp_factor=0.25))
    assert lm.sgm_info["glasses_digest"] == expected.digest()
    assert lm.sgm_info["experts"] == 5
    assert lm.glasses.digest() != SafetyGlasses.load(glasses_dir).digest()


# ---------------------------------------------------------------- profile_data and the cache


def test_profile_data_builds_once_then_hits_the_cache(make, toy_jsonl, load_model, monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LMMS_SGM_CACHE", str(cache))
    calls = []
    real_build = pipeline.build_glasses

    def counting_build(*args, **kwargs):
        calls.append(1)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(pipeline, "build_glasses", counting_build)
    args = f"profile_data={toy_jsonl},profile_modules=up_proj+intermediate,profile_pooling=max,select_rule=det0,select_top_k=12"

    first = make(args)
    assert (first.cache_hit, len(calls)) == (False, 1)
    entries = list(cache.iterdir())
    assert len(entries) == 1 and (entries[0] / "manifest.json").is_file()
    # The cached glasses are the ones the core builds from the same data and options.
    model, processor = load_model()
    direct = real_build(model, processor, toy_jsonl, ProfileOptions(modules=("up_proj", "intermediate"), pooling="max"),
                        SelectionOptions(rule="det0", top_k=12), progress=False)
    assert first.sgm_info["glasses_digest"] == direct.digest()
    assert json.loads((entries[0] / "manifest.json").read_text())["profile_options"]["pooling"] == "max"

    second = make(args)
    assert (second.cache_hit, len(calls)) == (True, 1)
    assert second.sgm_info["glasses_digest"] == first.sgm_info["glasses_digest"]
    requests = ll_requests(0, "what is this ?", CHOICES)
    assert second.loglikelihood(requests) == first.loglikelihood(requests)

    third = make(args.replace("select_top_k=12", "select_top_k=13"))  # other options: another entry
    assert (third.cache_hit, len(calls)) == (False, 2)
    assert len(list(cache.iterdir())) == 2


def test_damaged_cache_entry_is_rebuilt(make, toy_jsonl, monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LMMS_SGM_CACHE", str(cache))
    args = f"profile_data={toy_jsonl},profile_modules=up_proj,select_rule=det0,select_top_k=5"
    first = make(args)
    (entry,) = cache.iterdir()
    raw = bytearray((entry / "glasses.safetensors").read_bytes())
    raw[-3] ^= 0x40
    (entry / "glasses.safetensors").write_bytes(bytes(raw))
    second = make(args)
    assert second.cache_hit is False and second.sgm_info["glasses_digest"] == first.sgm_info["glasses_digest"]
    assert [p.name for p in cache.iterdir()] == [entry.name]
    assert SafetyGlasses.load(entry).digest() == first.sgm_info["glasses_digest"]


def test_profile_data_and_glasses_are_exclusive(make, toy_jsonl, glasses_dir):
    with pytest.raises(ValueError, match=r"either glasses .* or profile_data"):
        make(f"glasses={glasses_dir},profile_data={toy_jsonl}")
