"""Text-only models and records (AurA's setting): the text-decoder adapter, loading a causal LM,
profiling image-less records (against plain forward hooks on each text alone), and the rules
that say which records a model may be profiled on."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmms_sgm import cli, data, models
from lmms_sgm.archs import adapter_for
from lmms_sgm.data import DataError, load_pairs
from lmms_sgm.interventions import SafetyGlasses
from lmms_sgm.options import ProfileOptions, SelectionOptions
from lmms_sgm.pipeline import build_glasses
from lmms_sgm.profiling import profile
from lmms_sgm.sites import resolve_sites

MODULES = ("gate_proj", "up_proj", "intermediate", "down_proj")


@pytest.fixture(scope="module")
def lm(tiny_lm_dir):
    return models.load(str(tiny_lm_dir))


# ---------------------------------------------------------------- adapters and loading


def _tiny_config(family: str):
    import transformers

    cls = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
           "gemma": "GemmaConfig", "gemma2": "Gemma2Config"}[family]
    return getattr(transformers, cls)(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, head_dim=8)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"])
def test_each_listed_family_has_its_mlp_where_the_text_adapter_says(family):
    """A family is listed only if a real model of it has model.layers[i].mlp.{gate,up,down}_proj."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(_tiny_config(family))
    adapter = adapter_for(model)
    assert adapter.name == "text_decoder" and adapter.text_only
    sites = resolve_sites(model, ProfileOptions(modules=MODULES))
    assert [(s.module_path, s.width) for s in sites] == [
        (f"model.layers.{i}.mlp.{m}", w) for i in range(2)
        for m, w in (("gate_proj", 24), ("up_proj", 24), ("down_proj", 24), ("down_proj", 16))]
    for s in sites:
        assert isinstance(dict(model.named_modules())[s.module_path], torch.nn.Linear)


def test_load_reads_a_causal_lm_and_its_tokenizer(lm, model_and_processor):
    model, tokenizer = lm
    assert type(model).__name__ == "LlamaForCausalLM" and models.is_text_only(model)
    assert data.plain_text(tokenizer) and tokenizer("ugly idiot")["input_ids"] == tokenizer.convert_tokens_to_ids(["ugly", "idiot"])
    fp = models.fingerprint(model)
    assert fp["architecture"] == "LlamaForCausalLM" and fp["num_layers"] == 2 and fp["intermediate_size"] == 64
    assert not models.is_text_only(model_and_processor[0])


# ---------------------------------------------------------------- profiling == plain hooks on each text alone


def raw_activations(model, layers, input_ids):
    """{(layer, module): [seq, width]} of one unpadded sequence, from forward hooks."""
    acts, handles = {}, []
    for i, layer in enumerate(layers):
        mlp = layer.mlp
        for m in ("gate_proj", "up_proj", "down_proj"):
            handles.append(getattr(mlp, m).register_forward_hook(
                lambda mod, args, out, key=(i, m): acts.__setitem__(key, out[0].detach().clone())))
        handles.append(mlp.down_proj.register_forward_pre_hook(
            lambda mod, args, key=(i, "intermediate"): acts.__setitem__(key, args[0][0].detach().clone())))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([input_ids]))
    finally:
        for h in handles:
            h.remove()
    return acts


def reference(model, layers, token_lists, keep, pooling):
    """Pooled responses per (layer, module): ``keep(ids)`` lists the positions of each sequence."""
    out: dict = {}
    for ids in token_lists:
        acts = raw_activations(model, layers, ids)
        for key, a in acts.items():
            sel = a[keep(ids)].double()
            out.setdefault(key, []).append((sel.mean(0) if pooling == "mean" else sel.max(0).values).float().numpy())
    return {k: np.stack(v) for k, v in out.items()}


def check(store, sites, want, prefix):
    for s in sites:
        module = "intermediate" if s.kind == "input" else s.module
        assert s.name.startswith(prefix)
        np.testing.assert_allclose(np.asarray(store[s.name]), want[(s.layer, module)], atol=1e-6, rtol=1e-5, err_msg=s.name)


@pytest.mark.parametrize("positions", ["all", "text", "after_image", "decision"])
@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_causal_lm_profile_is_the_plain_text_alone(lm, toy_texts, positions, pooling):
    """Each text is fed as it is (no template): its token ids alone, as the tokenizer makes them.
    Without image tokens, ``text`` and ``after_image`` are every position."""
    model, tokenizer = lm
    pairs = load_pairs(toy_texts)
    token_lists = [tokenizer.convert_tokens_to_ids(p.text.split()) for p in pairs]
    assert len({len(t) for t in token_lists}) > 2, "texts of several lengths, so that batches are by length"
    keep = (lambda ids: [len(ids) - 1]) if positions == "decision" else (lambda ids: list(range(len(ids))))
    want = reference(model, model.model.layers, token_lists, keep, pooling)
    sites, store = profile(model, tokenizer, pairs, ProfileOptions(modules=MODULES, positions=positions, pooling=pooling,
                                                                   batch_size=4), progress=False)
    check(store, sites, want, "model.layers.")
    store.close()


def test_causal_lm_response_positions(lm):
    """question+response as plain text: the response positions are the tokens after the question's."""
    model, tokenizer = lm
    rows = [{"question": q, "text": t, "label": i % 2} for i, (q, t) in enumerate(
        [("what is this ?", "a red circle"), ("what do you think ?", "you stupid idiot"),
         ("how many ?", "two"), ("what do you think ?", "i hate this ugly picture")])]
    pairs = load_pairs(rows)
    token_lists = [tokenizer.convert_tokens_to_ids(f"{r['question']} {r['text']}".split()) for r in rows]
    starts = {tuple(ids): len(r["question"].split()) for ids, r in zip(token_lists, rows)}
    want = reference(model, model.model.layers, token_lists, lambda ids: list(range(starts[tuple(ids)], len(ids))), "mean")
    sites, store = profile(model, tokenizer, pairs, ProfileOptions(modules=MODULES, positions="response",
                                                                   text_field="question+response"), progress=False)
    check(store, sites, want, "model.layers.")
    store.close()


def test_mllm_text_only_profile_is_its_chat_template_without_image(model_and_processor, toy_texts):
    model, processor = model_and_processor
    pairs = load_pairs(toy_texts)
    tok = processor.tokenizer
    token_lists = [tok(f"<s>USER: {p.text} ", add_special_tokens=False)["input_ids"] for p in pairs]
    assert tok.convert_tokens_to_ids("<image>") not in sum(token_lists, [])
    want = reference(model, model.model.language_model.layers, token_lists, lambda ids: list(range(len(ids))), "max")
    sites, store = profile(model, processor, pairs, ProfileOptions(modules=MODULES, pooling="max", text_only=True),
                           progress=False)
    check(store, sites, want, "model.language_model.layers.")
    store.close()


# ---------------------------------------------------------------- which records a model takes


def test_records_must_fit_the_model(lm, model_and_processor, toy_texts, toy_pairs):
    texts = load_pairs(toy_texts)
    llava, processor = model_and_processor
    with pytest.raises(DataError, match=r"record 0 has no image, but an MLLM is profiled on image-text pairs; .*text_only=true"):
        profile(llava, processor, texts, ProfileOptions(), progress=False)
    with pytest.raises(DataError, match=r"record 0 has an image, but text_only profiling feeds text alone"):
        profile(llava, processor, toy_pairs, ProfileOptions(text_only=True), progress=False)
    model, tokenizer = lm
    with pytest.raises(DataError, match=r"record 0 has an image, but LlamaForCausalLM is a text-only model"):
        profile(model, tokenizer, toy_pairs, ProfileOptions(), progress=False)
    # a text-only model needs no option to read text-only records; asking is allowed
    for options in (ProfileOptions(modules=("up_proj",)), ProfileOptions(modules=("up_proj",), text_only=True)):
        profile(model, tokenizer, texts, options, progress=False)[1].close()


# ---------------------------------------------------------------- glasses on a causal LM, end to end


def test_profile_cli_writes_glasses_a_causal_lm_wears(tiny_lm_dir, lm, toy_texts, tmp_path, capsys):
    out = tmp_path / "glasses"
    assert cli.main(["profile", "--model", str(tiny_lm_dir), "--data", str(toy_texts), "--out", str(out),
                     "--rule", "det0", "--top-k", "40", "--no-progress"]) == 0, capsys.readouterr().err
    glasses = SafetyGlasses.load(out)
    assert glasses.manifest["fingerprint"]["architecture"] == "LlamaForCausalLM"
    assert glasses.counts()["experts"] == 40 and glasses.sites[0].module_path == "model.layers.0.mlp.gate_proj"
    model, tokenizer = lm
    ids = tokenizer(["i think it looks fine", "you stupid idiot"], return_tensors="pt", padding=True)
    with torch.no_grad():
        vanilla = model(**ids).logits
        with glasses.apply(model, mode="hooks"):
            hooked = model(**ids).logits
        with glasses.apply(model, mode="fold"):
            folded = model(**ids).logits
        assert torch.equal(model(**ids).logits, vanilla)  # removed without a trace
    assert (hooked - vanilla).abs().max() > 1e-3
    torch.testing.assert_close(folded, hooked, atol=1e-5, rtol=1e-5)


def test_profile_cli_text_only_mllm_needs_the_option(tiny_dir, toy_texts, tmp_path, capsys):
    args = ["profile", "--model", str(tiny_dir), "--data", str(toy_texts), "--no-progress"]
    assert cli.main([*args, "--out", str(tmp_path / "refused")]) == 2
    assert "has no image, but an MLLM is profiled on image-text pairs" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    assert cli.main([*args, "--out", str(tmp_path / "g"), "--text-only", "true"]) == 0
    manifest = json.loads((tmp_path / "g" / "manifest.json").read_text())
    assert manifest["profile_options"]["text_only"] is True
    assert manifest["fingerprint"]["architecture"] == "LlavaForConditionalGeneration"


def test_build_glasses_from_texts_records_the_data(lm, toy_texts):
    model, tokenizer = lm
    glasses = build_glasses(model, tokenizer, toy_texts, ProfileOptions(modules=("up_proj",)), SelectionOptions(), progress=False)
    assert glasses.manifest["data"] == {"digest": load_pairs(toy_texts).digest(), "examples": 20, "toxic": 10, "non_toxic": 10}


def test_three_apply_modes_agree_on_a_causal_lm(lm, toy_texts):
    """hooks, fold and nnsight (with the tokenizer standing in for the processor): the same logits
    and the same greedy tokens, every generated step included; the model is left as it was."""
    model, tokenizer = lm
    glasses = build_glasses(model, tokenizer, toy_texts, ProfileOptions(), SelectionOptions(rule="det0", top_k=40),
                            progress=False)
    enc = tokenizer(["you stupid idiot", "i think it looks"], return_tensors="pt", padding=True, padding_side="left")
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        vanilla = model(**enc).logits
        out = {}
        for mode in ("hooks", "fold"):
            with glasses.apply(model, mode=mode):
                out[mode] = (model(**enc).logits, model.generate(**enc, **gen))
        handle = glasses.apply(model, mode="nnsight", processor=tokenizer)
        try:
            with handle.model.trace(**enc):
                logits = handle.model.output.logits.save()
            with handle.model.generate(**enc, **gen) as tracer:
                tokens = tracer.result.save()
            out["nnsight"] = (logits, tokens)
        finally:
            handle.remove()
        assert torch.equal(model(**enc).logits, vanilla)
    assert (out["hooks"][0] - vanilla).abs().max() > 1e-3
    for mode in ("fold", "nnsight"):
        torch.testing.assert_close(out[mode][0], out["hooks"][0], atol=1e-5, rtol=1e-5)
        assert torch.equal(out[mode][1], out["hooks"][1]), mode
