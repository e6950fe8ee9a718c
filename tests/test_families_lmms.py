"""The general lmms-eval model ``sgm`` on every family's tiny checkpoint, driven directly with
hand-built ``Instance`` requests of the shapes lmms-eval's standard tasks send: one image,
several, none, ``<image k>`` placeholders (MMMU), bare ``<image>`` (the LLaVA convention), and a
video. Results are checked against HF's own chat-template tokenization of the same turn
(``apply_chat_template(tokenize=True)`` with the images in the messages) run on the HF model."""
from __future__ import annotations

import warnings

import pytest
import torch
from lmms_eval.api.instance import Instance

from conftest import FAMILIES
from lmms_sgm import models, pipeline, processors, tiny
from lmms_sgm.interventions import SafetyGlasses
from lmms_sgm.lmms.model import SGM
from lmms_sgm.options import ProfileOptions, SelectionOptions

TASK, SPLIT = "shapes", "test"
N_NEW = 5
RED, BLUE, GREEN = (tiny.random_image(s) for s in (41, 42, 43))
# (context, visuals, the user turn's items as HF gets them)
DOCS = [
    ("what is this ?", [RED], [{"type": "image", "image": RED}, {"type": "text", "text": "what is this ?"}]),
    ("which one is red ?", [RED, BLUE], [{"type": "image", "image": RED}, {"type": "image", "image": BLUE},
                                         {"type": "text", "text": "which one is red ?"}]),
    ("answer yes or no .", [], [{"type": "text", "text": "answer yes or no ."}]),
    ("is <image 2> like <image 1> ?", [RED, BLUE],  # MMMU's interleaved placeholders
     [{"type": "text", "text": "is "}, {"type": "image", "image": BLUE}, {"type": "text", "text": " like "},
      {"type": "image", "image": RED}, {"type": "text", "text": " ?"}]),
    ("<image> then <image> : same ?", [GREEN, RED],  # bare <image>, one per visual
     [{"type": "image", "image": GREEN}, {"type": "text", "text": " then "}, {"type": "image", "image": RED},
      {"type": "text", "text": " : same ?"}]),
]
CONTINUATIONS = [" yes", " a red circle"]


def doc_to_visual(doc):
    return doc["visuals"]


def gen_request(doc_id, gen_kwargs=None):
    return Instance("generate_until", (DOCS[doc_id][0], dict(gen_kwargs or {"max_new_tokens": N_NEW}), doc_to_visual,
                                       doc_id, TASK, SPLIT), idx=0, metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})


def ll_request(doc_id, continuation):
    return Instance("loglikelihood", (DOCS[doc_id][0], continuation, doc_to_visual, doc_id, TASK, SPLIT), idx=0,
                    metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def path(family, family_dir):
    return family_dir(family)


@pytest.fixture(scope="module")
def make(path):
    def _make(model_args="sgm=off", batch_size=1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", processors.ImageOnlyProcessorWarning)
            lm = SGM.create_from_arg_string(f"pretrained={path},{model_args}", {"batch_size": str(batch_size), "device": None})
        lm.task_dict = {TASK: {SPLIT: [{"visuals": visuals} for _, visuals, _ in DOCS]}}
        return lm

    return _make


@pytest.fixture(scope="module")
def reference_model(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", processors.ImageOnlyProcessorWarning)
        return models.load(str(path))


@pytest.fixture(scope="module")
def glasses_dir(reference_model, toy_jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("lmms_family_glasses") / "g"
    pipeline.build_glasses(*reference_model, toy_jsonl, ProfileOptions(modules=("gate_proj", "up_proj", "intermediate", "down_proj")),
                           SelectionOptions(rule="det0", top_k=40), out=out, progress=False)
    return out


def hf_turn(processor, items, **kw):
    return processor.apply_chat_template([{"role": "user", "content": items}], tokenize=True, return_dict=True,
                                         return_tensors="pt", add_generation_prompt=True, **kw)


@torch.no_grad()
def reference_generate(model, processor, doc_id):
    enc = hf_turn(processor, DOCS[doc_id][2])
    out = model.generate(**enc, max_new_tokens=N_NEW, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    return processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def reference_nll(model, processor, doc_id, continuation):
    """Mean NLL of the continuation after HF's own encoding of the turn (tokens checked to extend it)."""
    prompt = hf_turn(processor, DOCS[doc_id][2])
    text = processor.apply_chat_template([{"role": "user", "content": DOCS[doc_id][2]}], tokenize=False, add_generation_prompt=True)
    images = [item["image"] for item in DOCS[doc_id][2] if item["type"] == "image"]
    n = prompt["input_ids"].shape[1]
    # The encoding of turn + continuation whose start is HF's own encoding of the turn (with or
    # without the tokenizer's special tokens, whichever HF used).
    for special in (False, True):
        full = processor(text=[text + continuation], images=[images] if images else None, return_tensors="pt",
                         add_special_tokens=special)
        if torch.equal(full["input_ids"][0, :n], prompt["input_ids"][0]):
            break
    else:
        raise AssertionError("no encoding of the turn + continuation extends HF's encoding of the turn")
    logits = model(**full).logits[0].double()
    ids = full["input_ids"][0]
    lp = torch.log_softmax(logits, -1)
    return -float(torch.stack([lp[t - 1, ids[t]] for t in range(n, len(ids))]).mean())


def test_generation_of_every_request_shape_equals_hf(make, reference_model):
    """One image, two, none, <image k> and <image> placeholders: the answer of each request
    equals greedy generation on HF's own encoding of the same turn; batched the same."""
    model, processor = reference_model
    expected = [reference_generate(model, processor, i) for i in range(len(DOCS))]
    requests = [gen_request(i) for i in range(len(DOCS))]
    assert make(batch_size=1).generate_until(requests) == expected
    assert make(batch_size=3).generate_until(requests) == expected


@pytest.mark.parametrize("config", ["sgm=off", "mode=hooks", "mode=fold", "mode=nnsight"])
def test_loglikelihood_equals_hf_nll(config, family, make, reference_model, glasses_dir):
    """Every request shape, right-padded batches of 4, each mode: the mean NLL of the continuation
    after HF's own encoding of the turn, on the HF model (wearing the glasses through the core)."""
    model, processor = reference_model
    cases = [(i, c) for i in range(len(DOCS)) for c in CONTINUATIONS]
    vanilla = [reference_nll(model, processor, i, c) for i, c in cases]
    expected = vanilla
    if config != "sgm=off":
        with SafetyGlasses.load(glasses_dir).apply(model, mode="hooks"):
            expected = [reference_nll(model, processor, i, c) for i, c in cases]
        assert max(abs(a - b) for a, b in zip(expected, vanilla)) > 1e-4  # the glasses change the losses
    lm = make(config if config == "sgm=off" else f"glasses={glasses_dir},{config}", batch_size=4)
    requests = [ll_request(i, c) for i, c in cases]
    if family == "mllama" and config == "mode=nnsight":  # text-only requests skip the cross-attention layers
        with pytest.raises(ValueError, match=r"mode=nnsight cannot run this batch: it holds no image.*mode=hooks"):
            lm.loglikelihood(requests)
        keep = [k for k, (i, _) in enumerate(cases) if DOCS[i][1]]
        requests, expected = [requests[k] for k in keep], [expected[k] for k in keep]
    got = lm.loglikelihood(requests)
    assert [loss for loss, _ in got] == pytest.approx(expected, abs=2e-5)


def test_glasses_change_generation_and_match_the_core(make, reference_model, glasses_dir):
    """Glasses re-selected through model_args (damp x25 on 100 neurons: a random tiny model's
    greedy words survive det0) change what the model says, as the core apply does."""
    model, processor = reference_model
    selection = SelectionOptions(rule="damp", top_k=100, damp_factor=25.0)
    requests = [gen_request(i) for i in range(len(DOCS))]
    vanilla = make().generate_until(requests)
    with SafetyGlasses.load(glasses_dir).reselect(selection).apply(model, mode="hooks"):
        expected = [reference_generate(model, processor, i) for i in range(len(DOCS))]
    got = make(f"glasses={glasses_dir},mode=fold,select_rule=damp,select_top_k=100,select_damp_factor=25", batch_size=3)
    got = got.generate_until(requests)
    assert got == expected and got != vanilla


def test_video_requests_are_refused_saying_why(family, make):
    lm = make()
    lm.task_dict[TASK][SPLIT].append({"visuals": ["/data/clip.mp4"]})
    request = Instance("generate_until", ("what happens ?", {"max_new_tokens": 2}, doc_to_visual, len(DOCS), TASK, SPLIT), idx=0,
                       metadata={"task": TASK, "doc_id": len(DOCS), "repeats": 1})
    why = "without its video processor" if family in ("llava_onevision", "qwen2_vl", "qwen2_5_vl") else "takes images only"
    with pytest.raises(processors.VideoUnsupported, match=why):
        lm.generate_until([request])
