"""Profiling (nnsight traces) against an independent plain-PyTorch-hook implementation run on
each example alone, and its independence from the batch size and the batch's other examples."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from lmms_sgm.options import ProfileOptions
from lmms_sgm.profiling import ResponseStore, profile

MODULES = ("gate_proj", "up_proj", "intermediate", "down_proj")
BATCH = 4
N_LAYERS = 2


def site_name(layer: int, module: str) -> str:
    base = f"model.language_model.layers.{layer}.mlp"
    return f"{base}.down_proj.input" if module == "intermediate" else f"{base}.{module}"


# ---------------------------------------------------------------- the independent reference


def encode(processor, pairs, **padding):
    """Chat prompt (one user turn: image + response) and one processor call per batch."""
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p.text}]}],
            tokenize=False,
            add_generation_prompt=False,
        )
        for p in pairs
    ]
    images = [Image.open(p.image).convert("RGB") for p in pairs]
    return processor(images=images, text=texts, return_tensors="pt", padding=True, **padding)


def raw_activations(model, enc):
    """{(layer, module): [batch, seq, width]} from forward hooks on the HF modules."""
    acts, handles = {}, []
    for layer in range(N_LAYERS):
        mlp = model.model.language_model.layers[layer].mlp
        for m in ("gate_proj", "up_proj", "down_proj"):
            handles.append(getattr(mlp, m).register_forward_hook(
                lambda mod, args, out, key=(layer, m): acts.__setitem__(key, out.detach().clone())))
        handles.append(mlp.down_proj.register_forward_pre_hook(
            lambda mod, args, key=(layer, "intermediate"): acts.__setitem__(key, args[0].detach().clone())))
    try:
        with torch.no_grad():
            model(**enc)
    finally:
        for h in handles:
            h.remove()
    return acts


def pool_rows(act, input_ids, attention_mask, positions, pooling, image_id):
    """Pool one batch, row by row, over explicitly listed positions."""
    rows = []
    for b in range(act.shape[0]):
        ids = input_ids[b].tolist()
        image_pos = [t for t, tok in enumerate(ids) if tok == image_id]
        keep = []
        for t, tok in enumerate(ids):
            if attention_mask[b, t] == 0:
                continue  # padding never counts
            if positions == "text" and tok == image_id:
                continue
            if positions == "after_image" and t <= max(image_pos):
                continue
            keep.append(t)
        sel = act[b, keep].double()
        rows.append(sel.mean(0) if pooling == "mean" else sel.max(0).values)
    return torch.stack(rows).float().numpy()


@pytest.fixture(scope="module")
def reference(model_and_processor, toy_pairs):
    """Raw activations and encodings of every example run alone (no padding), computed once:
    what the model computes for an example is what profiling must report, whatever the batch."""
    model, processor = model_and_processor
    batches = []
    for pair in toy_pairs:
        enc = encode(processor, [pair])
        batches.append((enc, raw_activations(model, enc)))
    lengths = {int(enc["attention_mask"].sum()) for enc, _ in batches}
    assert len(lengths) > 2, "toy texts must differ in length, so that a padded batch would be padded"
    return batches


def reference_pooled(reference, model, positions, pooling):
    image_id = model.config.image_token_id
    out = {}
    for layer in range(N_LAYERS):
        for m in MODULES:
            out[site_name(layer, m)] = np.concatenate([
                pool_rows(acts[(layer, m)], enc["input_ids"], enc["attention_mask"], positions, pooling, image_id)
                for enc, acts in reference
            ])
    return out


# ---------------------------------------------------------------- profile == reference


@pytest.mark.parametrize("positions", ["all", "text", "after_image"])
@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_profile_matches_plain_hooks(model_and_processor, toy_pairs, reference, pooling, positions):
    model, processor = model_and_processor
    opts = ProfileOptions(modules=MODULES, pooling=pooling, positions=positions, batch_size=BATCH)
    sites, store = profile(model, processor, toy_pairs, opts, progress=False)
    try:
        want = reference_pooled(reference, model, positions, pooling)
        # sites in forward order: per layer gate, up, down input, down output
        assert [s.name for s in sites] == [site_name(layer, m) for layer in range(N_LAYERS)
                                          for m in ("gate_proj", "up_proj", "intermediate", "down_proj")]
        assert [(s.layer, s.module, s.kind) for s in sites][:4] == [
            (0, "gate_proj", "output"), (0, "up_proj", "output"), (0, "intermediate", "input"), (0, "down_proj", "output")]
        assert {s.name: s.width for s in sites} == {n: w.shape[1] for n, w in want.items()}
        assert {s.width for s in sites} == {64, 32}
        for s in sites:
            got = store[s.name]
            assert got.shape == (len(toy_pairs), s.width) and got.dtype == np.float32
            np.testing.assert_allclose(got, want[s.name], atol=1e-6, rtol=0, err_msg=s.name)
    finally:
        store.close()


def test_positions_and_pooling_differ(model_and_processor, toy_pairs, reference):
    """The options must actually change what is pooled (guards against an ignored option)."""
    model, _ = model_and_processor
    a = reference_pooled(reference, model, "all", "mean")
    for positions, pooling in [("text", "mean"), ("after_image", "mean"), ("all", "max")]:
        b = reference_pooled(reference, model, positions, pooling)
        assert np.abs(a[site_name(1, "down_proj")] - b[site_name(1, "down_proj")]).max() > 1e-3


def test_disk_store_equals_ram_store(model_and_processor, toy_pairs):
    model, processor = model_and_processor
    opts = ProfileOptions(modules=MODULES, pooling="max", batch_size=BATCH)
    sites, ram = profile(model, processor, toy_pairs, opts, progress=False)
    sites2, disk = profile(model, processor, toy_pairs, opts, progress=False, spill_mb=0)
    try:
        assert sites == sites2
        assert ram._tmp is None and all(not isinstance(a, np.memmap) for a in ram.arrays.values())
        assert disk._tmp is not None and all(isinstance(a, np.memmap) for a in disk.arrays.values())
        tmpdir = disk._tmp.name
        assert len([f for f in os.listdir(tmpdir) if f.endswith(".npy")]) == len(sites)
        for s in sites:
            np.testing.assert_array_equal(disk[s.name], ram[s.name])
            # neuron-major on disk, one .npy per site, readable with plain numpy
        first = np.load(os.path.join(tmpdir, "0000.npy"))
        np.testing.assert_array_equal(first.T, ram[sites[0].name])
    finally:
        ram.close()
        disk.close()
    assert not os.path.exists(tmpdir)  # the temporary spill directory goes with the store


def test_response_store_auto_threshold():
    from lmms_sgm.sites import Site

    sites = [Site("a", "a", "output", 0, "gate_proj", 256)]
    small = ResponseStore.auto(sites, 1024, spill_mb=1.0)  # exactly 1 MiB stays in RAM
    big = ResponseStore.auto(sites, 1025, spill_mb=1.0)
    try:
        assert small._tmp is None and big._tmp is not None
    finally:
        small.close()
        big.close()


# ---------------------------------------------------------------- layer ranges


@pytest.fixture(scope="module")
def full_profile(model_and_processor, toy_pairs):
    model, processor = model_and_processor
    opts = ProfileOptions(modules=MODULES, batch_size=BATCH)
    sites, store = profile(model, processor, toy_pairs, opts, progress=False)
    out = {s.name: np.array(store[s.name]) for s in sites}
    store.close()
    return out


@pytest.mark.parametrize("layers, expected", [("1", [1]), ("0", [0]), ("0-1", [0, 1]), ("1,0", [0, 1]), ("all", [0, 1])])
def test_layer_subranges(model_and_processor, toy_pairs, full_profile, layers, expected):
    model, processor = model_and_processor
    opts = ProfileOptions(modules=("gate_proj", "intermediate", "down_proj"), layers=layers, batch_size=BATCH)
    sites, store = profile(model, processor, toy_pairs, opts, progress=False)
    try:
        assert sorted({s.layer for s in sites}) == expected
        assert [s.name for s in sites] == [site_name(layer, m) for layer in expected
                                          for m in ("gate_proj", "intermediate", "down_proj")]
        for s in sites:
            np.testing.assert_allclose(store[s.name], full_profile[s.name], atol=1e-6, rtol=0)
    finally:
        store.close()


# ---------------------------------------------------------------- errors


def test_unknown_module_name():
    with pytest.raises(ValueError, match="unknown modules 'o_proj'; choose from gate_proj, up_proj, down_proj, intermediate"):
        ProfileOptions(modules=("gate_proj", "o_proj"))


@pytest.mark.parametrize("layers, bad", [("2", r"\[2\]"), ("0-5", r"\[2, 3, 4, 5\]"), ("1,7", r"\[7\]")])
def test_layers_out_of_range(model_and_processor, toy_pairs, layers, bad):
    model, processor = model_and_processor
    with pytest.raises(ValueError, match=rf"layers {bad} do not exist: the model has 2 decoder layers \(0-1\)"):
        profile(model, processor, toy_pairs, ProfileOptions(layers=layers), progress=False)


@pytest.mark.parametrize("spec", ["last", "1-", "0..1", "1;2"])
def test_bad_layers_spec(spec):
    with pytest.raises(ValueError, match="bad layers spec"):
        ProfileOptions(layers=spec)


def test_profile_needs_both_classes(model_and_processor, toy_pairs):
    from lmms_sgm.data import DataError, PairDataset

    model, processor = model_and_processor
    toxic_only = PairDataset([p for p in toy_pairs if p.label == 1])
    with pytest.raises(DataError, match="both classes"):
        profile(model, processor, toxic_only, ProfileOptions(), progress=False)


# ---------------------------------------------------------------- response and decision positions


def encode_qr(processor, pairs):
    """question as the user turn, the response as the assistant turn."""
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p.question}]},
             {"role": "assistant", "content": [{"type": "text", "text": p.text}]}],
            tokenize=False, add_generation_prompt=False)
        for p in pairs
    ]
    images = [Image.open(p.image).convert("RGB") for p in pairs]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


@pytest.mark.parametrize("positions", ["response", "decision"])
@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_response_and_decision_positions_match_reference(model_and_processor, toy_pairs, positions, pooling):
    """Reference: the response is the last k non-padding tokens, k counted by tokenizing the
    response and the end-of-turn token alone; the decision position is the token before them."""
    model, processor = model_and_processor
    tok = processor.tokenizer
    want = {site_name(layer, m): [] for layer in range(N_LAYERS) for m in MODULES}
    for p in toy_pairs:  # each example alone
        enc = encode_qr(processor, [p])
        acts = raw_activations(model, enc)
        seq = enc["input_ids"].shape[1]
        k = len(tok(p.text + " " + tok.eos_token, add_special_tokens=False)["input_ids"])
        keep = list(range(seq - k, seq)) if positions == "response" else [seq - k - 1]
        for layer in range(N_LAYERS):
            for m in MODULES:
                sel = acts[(layer, m)][0, keep].double()
                want[site_name(layer, m)].append((sel.mean(0) if pooling == "mean" else sel.max(0).values).float().numpy())
    sites, store = profile(model, processor, toy_pairs,
                           ProfileOptions(modules=MODULES, positions=positions, pooling=pooling,
                                          text_field="question+response", batch_size=BATCH), progress=False)
    for s in sites:
        np.testing.assert_allclose(np.asarray(store[s.name]), np.stack(want[s.name]), atol=1e-6, rtol=1e-5)
    store.close()


def test_decision_without_response_turn_is_the_last_token(model_and_processor, toy_pairs, reference):
    model, processor = model_and_processor
    sites, store = profile(
        model,
        processor,
        toy_pairs,
        ProfileOptions(modules=("up_proj",), positions="decision", batch_size=BATCH),
        progress=False,
    )
    want = np.concatenate([acts[(0, "up_proj")][:, -1].float().numpy() for _, acts in reference])  # alone: the last token
    np.testing.assert_allclose(np.asarray(store[sites[0].name]), want, atol=1e-6)
    store.close()


def test_response_positions_need_the_response_turn():
    with pytest.raises(ValueError, match="question\\+response"):
        ProfileOptions(positions="response")


# ---------------------------------------------------------------- batch size and batch composition

SYSTEM_PROMPT = "you answer the question . i help with this ."
TOXIC_TEXTS = ["you stupid idiot i hate this ugly picture", "that is bad and stupid you idiot",
               "i hate you ugly stupid idiot . bad", "stupid ugly bad idiot ! i hate it"]
BENIGN_TEXTS = ["a red circle", "nice image", "it looks fine", "a blue square"]


@pytest.fixture(scope="module")
def system_prompt_model(load_model):
    """The tiny model with a private processor whose chat template opens with a system prompt
    shared by every example, as LLaVA-1.5's does. Max pooling then often takes a value from
    that shared prefix, so examples of both labels tie exactly: the ties a padded batch splits
    by label (the issue: spurious experts)."""
    from lmms_sgm.tiny import CHAT_TEMPLATE

    model, processor = load_model()
    processor.chat_template = CHAT_TEMPLATE.replace("{{ bos_token }}", "{{ bos_token }}" + SYSTEM_PROMPT + " ")
    return model, processor


@pytest.fixture(scope="module")
def by_length_pairs(tmp_path_factory):
    """24 pairs, labels alternating, every toxic text longer than every non-toxic one (so padding
    falls on the non-toxic side, as in the issue); every batch of 3 or 8 mixes lengths."""
    from lmms_sgm.data import Pair, PairDataset
    from lmms_sgm.tiny import random_image

    d = tmp_path_factory.mktemp("by_length")
    pairs = []
    for i in range(24):
        label = i % 2
        path = d / f"{i:02d}.png"
        random_image(1000 + i).save(path)
        text = (TOXIC_TEXTS if label else BENIGN_TEXTS)[(i // 2) % 4]
        pairs.append(Pair(image=path, text=text, label=label, question=["what is this ?", "what do you think ?"][i % 2]))
    return PairDataset(pairs)


def cross_label_ties(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[toxic, non-toxic, width] booleans: which toxic/non-toxic pairs of examples tie exactly."""
    return x[labels == 1][:, None, :] == x[labels == 0][None, :, :]


def test_tie_fixture_is_split_by_left_padding(system_prompt_model, by_length_pairs):
    """The data of the batch-size test can catch the bug: examples of both labels tie exactly
    when run alone, and a left-padded batch without position ids (the old profiling forward,
    here with plain hooks) splits some of those ties."""
    model, processor = system_prompt_model
    labels = np.array(by_length_pairs.labels)
    image_id = model.config.image_token_id
    alone = [encode(processor, [p]) for p in by_length_pairs]
    lengths = np.array([int(e["attention_mask"].sum()) for e in alone])
    assert lengths[labels == 1].min() > lengths[labels == 0].max(), "toxic texts must be the longer ones"
    key = (0, "up_proj")
    x = np.concatenate([pool_rows(raw_activations(model, e)[key], e["input_ids"], e["attention_mask"], "all", "max", image_id)
                        for e in alone])
    ties = cross_label_ties(x, labels)
    assert ties.sum() > 100
    rows = []
    for start in range(0, len(by_length_pairs), 8):
        enc = encode(processor, by_length_pairs[start:start + 8], padding_side="left")
        assert (enc["attention_mask"] == 0).any()
        rows.append(pool_rows(raw_activations(model, enc)[key], enc["input_ids"], enc["attention_mask"], "all", "max", image_id))
    padded = np.concatenate(rows)
    assert (ties & ~cross_label_ties(padded, labels)).any(), "left padding no longer splits the ties: the fixture lost its power"


@pytest.mark.parametrize("pooling", ["max", "mean"])
@pytest.mark.parametrize("text_field, positions", [
    ("response", "all"), ("response", "text"), ("response", "after_image"), ("response", "decision"),
    ("question+response", "response"), ("question+response", "decision")])
def test_profiles_do_not_depend_on_batch_size(system_prompt_model, by_length_pairs, text_field, positions, pooling):
    """Batch sizes 1, 3 and 8 give the same pooled responses (exact ties stay exact ties, values
    equal within float noise), the same AUROCs and the same experts."""
    from sklearn.metrics import roc_auc_score

    from lmms_sgm.expertise import auroc, select

    model, processor = system_prompt_model
    labels = np.array(by_length_pairs.labels)
    runs = {}
    for bs in (1, 3, 8):
        opts = ProfileOptions(modules=MODULES, pooling=pooling, positions=positions, text_field=text_field, batch_size=bs)
        sites, store = profile(model, processor, by_length_pairs, opts, progress=False)
        runs[bs] = {s.name: np.array(store[s.name]) for s in sites}
        store.close()
    aurocs = {bs: {name: auroc(x, labels) for name, x in run.items()} for bs, run in runs.items()}
    experts = {bs: {name: set((alpha != 1).nonzero().flatten().tolist()) for name, alpha in select(a).items()}
               for bs, a in aurocs.items()}
    for bs in (3, 8):
        for name, x in runs[1].items():
            y = runs[bs][name]
            ties = cross_label_ties(x, labels)
            split = ties & ~cross_label_ties(y, labels)
            assert not split.any(), f"{name}: {split.sum()} exact ties at batch size 1 split at batch size {bs}"
            np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-6, err_msg=f"{name}, batch size {bs}")
            np.testing.assert_allclose(aurocs[bs][name].numpy(), aurocs[1][name].numpy(), rtol=0, atol=1e-12,
                                       err_msg=f"{name}, batch size {bs}")
            for j in ties.any((0, 1)).nonzero()[0]:  # the neurons a split tie would move: scikit-learn too
                assert roc_auc_score(labels, y[:, j]) == roc_auc_score(labels, x[:, j])
        assert experts[bs] == experts[1]


@pytest.mark.parametrize("batch_size", [1, 8])
def test_identical_prefixes_give_identical_responses(model_and_processor, tmp_path, batch_size):
    """Pairs sharing image and question, answers of different lengths: at the decision position
    (the end of the shared prompt) every neuron's response is the same bits in each pair,
    whatever follows. (The model's sdpa attention breaks this on short sequences: its CPU kernel
    blocks a sequence by its length; profiling runs eager attention, then restores the model's.)"""
    from lmms_sgm.data import Pair, PairDataset
    from lmms_sgm.tiny import random_image

    model, processor = model_and_processor
    assert model.config._attn_implementation == "sdpa"
    pairs = []
    for i in range(4):
        random_image(2000 + i).save(tmp_path / f"{i}.png")
        for label, texts in ((0, BENIGN_TEXTS), (1, TOXIC_TEXTS)):
            for text in texts[:2]:
                pairs.append(Pair(image=tmp_path / f"{i}.png", text=text, label=label, question="what do you think ?"))
    opts = ProfileOptions(modules=MODULES, positions="decision", text_field="question+response", batch_size=batch_size)
    sites, store = profile(model, processor, PairDataset(pairs), opts, progress=False)
    try:
        for s in sites:
            x = np.asarray(store[s.name]).reshape(4, 4, s.width)  # [image, answer, neuron]
            assert (x == x[:, :1]).all(), s.name
    finally:
        store.close()
    assert model.config._attn_implementation == "sdpa"
    assert model.config.text_config._attn_implementation == "sdpa"


def test_length_batches():
    from lmms_sgm.profiling import length_batches

    lengths = [5, 7, 5, 5, 7, 6, 5, 5]
    batches = length_batches(lengths, 3)
    assert batches == [[0, 2, 3], [6, 7], [5], [1, 4]]
    assert length_batches(lengths, 1) == [[i] for i in (0, 2, 3, 6, 7, 5, 1, 4)]


@pytest.mark.parametrize("positions", ["all", "text", "after_image", "response", "decision"])
def test_position_mask_is_the_same_on_either_padding_side(model_and_processor, toy_pairs, positions):
    """Padded on the left or on the right, each row pools over the positions it has alone."""
    from lmms_sgm.data import encode_batch
    from lmms_sgm.profiling import position_mask, prompt_lengths

    model, processor = model_and_processor
    image_id = model.config.image_token_id
    pairs = toy_pairs[:6]
    alone = []
    for p in pairs:
        enc = encode_batch(processor, [p], "question+response")
        alone.append(position_mask(enc["input_ids"], enc["attention_mask"], positions, image_id,
                                   prompt_lengths(processor, [p], enc))[0])
    for side in ("left", "right"):
        enc = encode_batch(processor, pairs, "question+response", padding_side=side)
        assert (enc["attention_mask"] == 0).any()
        mask = position_mask(enc["input_ids"], enc["attention_mask"], positions, image_id,
                             prompt_lengths(processor, pairs, enc))
        for i, want in enumerate(alone):
            real = enc["attention_mask"][i].bool()
            assert torch.equal(mask[i][real], want), f"{side} padding, row {i}"
            assert not mask[i][~real].any()


@pytest.mark.parametrize("attention, seen", [("eager", "eager"), ("model", "sdpa")])
def test_attention_option_chooses_the_kernel_profiled_with(model_and_processor, toy_pairs, attention, seen):
    """attention=eager (default) profiles with eager attention; attention=model keeps the model's own
    (sdpa here: less memory on long inputs). Either way the model's setting is restored."""
    model, processor = model_and_processor
    during = []
    hook = model.register_forward_pre_hook(lambda m, a: during.append(m.config._attn_implementation))
    try:
        _, store = profile(model, processor, toy_pairs, ProfileOptions(attention=attention), progress=False)
        store.close()
    finally:
        hook.remove()
    assert during and set(during) == {seen}
    assert model.config._attn_implementation == "sdpa"


# ---------------------------------------------------------------- the pieces, on literal tensors (no model)

IMG = 9
# Row 0: one pad on the left, image at 2-3; row 1: no padding, image at 1; row 2: two pads on the right.
IDS = torch.tensor([[0, 5, IMG, IMG, 6, 7, 8], [4, IMG, 5, 6, 7, 8, 3], [4, IMG, IMG, 5, 6, 0, 0]])
ATT = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])


def _rows(*rows):
    return torch.tensor(rows, dtype=torch.bool)


@pytest.mark.parametrize("positions, lengths, want", [
    ("all", None, ATT.bool()),
    ("text", None, _rows([0, 1, 0, 0, 1, 1, 1], [1, 0, 1, 1, 1, 1, 1], [1, 0, 0, 1, 1, 0, 0])),
    ("after_image", None, _rows([0, 0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0, 0])),
    ("decision", None, _rows([0, 0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 1, 0, 0])),
    # prompt lengths 4, 5, 3 from each row's first real token (1, 0, 0)
    ("response", [4, 5, 3], _rows([0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 0, 0])),
    ("decision", [4, 5, 3], _rows([0, 0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 0, 0], [0, 0, 1, 0, 0, 0, 0])),
])
def test_position_mask_by_hand(positions, lengths, want):
    from lmms_sgm.profiling import position_mask

    lengths = None if lengths is None else torch.tensor(lengths)
    assert torch.equal(position_mask(IDS, ATT, positions, IMG, lengths), want)


def test_position_mask_without_an_image_or_with_one_real_token():
    """No image: every real token is after it; a row of one token at position 0: that one decides."""
    from lmms_sgm.profiling import position_mask

    ids, att = torch.tensor([[4, 0, 0], [5, 6, 7]]), torch.tensor([[1, 0, 0], [1, 1, 1]])
    assert torch.equal(position_mask(ids, att, "after_image", IMG), _rows([1, 0, 0], [1, 1, 1]))
    assert torch.equal(position_mask(ids, att, "decision", IMG), _rows([1, 0, 0], [0, 0, 1]))


def test_position_mask_refusals():
    from lmms_sgm.profiling import position_mask

    with pytest.raises(ValueError, match=r"positions='response' needs the prompt lengths \(text_field='question\+response'\)"):
        position_mask(IDS, ATT, "response", IMG)
    with pytest.raises(ValueError, match="unknown positions 'middle'"):
        position_mask(IDS, ATT, "middle", IMG)
    ids = IDS.clone()
    ids[0, 6] = ids[2, 4] = IMG  # rows 0 and 2 end on an image token: nothing after it
    with pytest.raises(ValueError, match=r"no position to pool over for batch rows \[0, 2\] \(positions='after_image'\)"):
        position_mask(ids, ATT, "after_image", IMG)


def test_pool_by_hand():
    from lmms_sgm.profiling import pool

    act = torch.tensor([[[1.0, -2.0], [3.0, 4.0], [100.0, -100.0]], [[-5.0, 0.5], [2.0, 0.25], [0.0, -1.0]]],
                       dtype=torch.float16)
    mask = _rows([1, 1, 0], [0, 1, 1])
    mean, top = pool(act, mask, "mean"), pool(act, mask, "max")
    assert mean.dtype == top.dtype == torch.float32
    assert torch.equal(mean, torch.tensor([[2.0, 1.0], [1.0, -0.375]]))
    assert torch.equal(top, torch.tensor([[3.0, 4.0], [2.0, 0.25]]))
    with pytest.raises(ValueError, match="unknown pooling 'sum'"):
        pool(act, mask, "sum")


@pytest.mark.parametrize("on_disk", [False, True])
def test_response_store_writes_rows_neuron_major(tmp_path, on_disk):
    from lmms_sgm.profiling import _split
    from lmms_sgm.sites import Site

    sites = [Site("a", "a", "output", 0, "gate_proj", 2), Site("b", "b", "output", 0, "up_proj", 3)]
    store = ResponseStore(sites, 4, directory=tmp_path / "s" / "nested" if on_disk else None)  # parents made
    assert store.sites is sites and store.n == 4
    flat = torch.arange(10, dtype=torch.float32).reshape(2, 5)  # two examples, widths 2 + 3
    parts = _split(flat, sites)
    assert torch.equal(parts["a"], flat[:, :2]) and torch.equal(parts["b"], flat[:, 2:])
    store.write([3, 0], parts)  # examples 3 and 0, in that order
    store.write(1, {"a": torch.tensor([[7.0, 8.0]]), "b": torch.tensor([[1.0, 2.0, 3.0]])})  # from row 1 on
    assert store.arrays["a"].shape == (2, 4) and store["a"].dtype == store["b"].dtype == np.float32  # neuron-major
    np.testing.assert_array_equal(store["a"], [[5, 6], [7, 8], [0, 0], [0, 1]])
    np.testing.assert_array_equal(store["b"], [[7, 8, 9], [1, 2, 3], [0, 0, 0], [2, 3, 4]])
    if on_disk:
        np.testing.assert_array_equal(np.load(tmp_path / "s" / "nested" / "0001.npy").T, store["b"])
    store.close()
    store.close()  # twice is harmless
    assert store.arrays == {}


def test_response_store_spills_past_512_mib_into_a_named_temporary_directory():
    from pathlib import Path

    from lmms_sgm.sites import Site

    wide = [Site("w", "w", "output", 0, "gate_proj", 1024)]  # 4 KiB per example: 131072 examples are 512 MiB
    for n, spills in ((131072, False), (131073, True)):  # the default threshold (nothing is written: sparse, lazy)
        big = ResponseStore.auto(wide, n)
        try:
            assert (big._tmp is not None) == spills, n
        finally:
            big.close()
    store = ResponseStore.auto([Site("a", "a", "output", 0, "gate_proj", 2)], 3, spill_mb=0)
    spill = Path(store._tmp.name)
    try:
        assert spill.name.startswith("lmms_sgm_responses_")  # recognisable if a crash leaves it
    finally:
        store.close()
    store.close()  # twice is harmless
    assert not spill.exists()


def test_attention_implementations_of_nested_configs():
    from types import SimpleNamespace

    from lmms_sgm.profiling import _attn_implementations

    vision = SimpleNamespace(_attn_implementation="sdpa")
    text = SimpleNamespace(_attn_implementation="eager", sub_configs={"inner": None},
                           inner=SimpleNamespace(_attn_implementation="flex"))
    # audio_config: declared and None; absent_config: declared, no attribute at all
    config = SimpleNamespace(_attn_implementation="sdpa", sub_configs={"vision_config": None, "text_config": None,
                                                                       "audio_config": None, "absent_config": None},
                             vision_config=vision, text_config=text, audio_config=None)
    assert _attn_implementations(config) == {"": "sdpa", "vision_config": {"": "sdpa"},
                                             "text_config": {"": "eager", "inner": {"": "flex"}}}


def test_require_modality_asks_for_what_the_model_and_options_read(model_and_processor, tiny_lm_dir):
    """A text-only model: no images; an MLLM: images, unless text_only profiling is asked for."""
    from lmms_sgm import models
    from lmms_sgm.profiling import require_modality

    class Pairs:
        def __init__(self):
            self.asked = []

        def require_images(self, needed, why):
            self.asked.append((needed, why))

    lm, _ = models.load(str(tiny_lm_dir))
    mllm = model_and_processor[0]
    cases = [(lm, ProfileOptions(), False, f"{type(lm).__name__} is a text-only model: drop the images"),
             (mllm, ProfileOptions(text_only=True), False,
              "text_only profiling feeds text alone: drop the images, or profile with text_only=false"),
             (mllm, ProfileOptions(), True, ("an MLLM is profiled on image-text pairs; to profile it on text alone, ask "
                                             "for it: text_only=true (lmms-sgm profile --text-only true)"))]
    for model, options, needed, why in cases:
        pairs = Pairs()
        require_modality(pairs, model, options)
        assert pairs.asked == [(needed, why)]


def test_token_lengths_are_each_pairs_own(model_and_processor, toy_pairs):
    """Encoded in batches of 3 (padded), each length is the pair's token count encoded alone."""
    from lmms_sgm.data import encode_batch
    from lmms_sgm.profiling import token_lengths

    _, processor = model_and_processor
    pairs = toy_pairs[:7]
    alone = [encode_batch(processor, [p], "question+response")["input_ids"].shape[1] for p in pairs]
    assert len(set(alone)) > 1  # lengths differ, so padding inside a batch is there to be left out
    assert token_lengths(processor, pairs, "question+response", 3) == alone


def test_as_nnsight_wraps_once(model_and_processor):
    from nnsight import NNsight

    from lmms_sgm.profiling import as_nnsight

    model = model_and_processor[0]
    wrapped = as_nnsight(model)
    assert isinstance(wrapped, NNsight) and wrapped._module is model
    assert as_nnsight(wrapped) is wrapped


def _layer_output_reference(model, enc, layer, **kwargs):
    """Decoder layer ``layer``'s output for ``enc``, mean over every position, from a plain forward hook."""
    seen = []
    hook = model.model.language_model.layers[layer].register_forward_hook(
        lambda m, args, out: seen.append((out[0] if isinstance(out, tuple) else out).detach().clone()))
    try:
        with torch.no_grad():
            model(**enc, **kwargs)
    finally:
        hook.remove()
    return seen[0].double().mean(1).float().numpy()


def test_decoder_layer_outputs_are_profiled_whole(model_and_processor, toy_pairs):
    """Gated steering's sites (a decoder layer's output, [batch, seq, hidden]) pool like any other:
    every row of the batch its own, against a plain hook on each example alone."""
    from lmms_sgm.sites import layer_output_site

    model, processor = model_and_processor
    site = layer_output_site(model, 1)
    _, store = profile(model, processor, toy_pairs, ProfileOptions(batch_size=BATCH), sites=[site], progress=False)
    try:
        want = np.concatenate([_layer_output_reference(model, encode(processor, [p]), 1) for p in toy_pairs])
        np.testing.assert_allclose(store[site.name], want, atol=1e-5, rtol=0)
    finally:
        store.close()


def test_a_trace_gets_the_extra_keywords(model_and_processor, toy_pairs):
    """What _trace_batch is given beyond the inputs reaches the traced forward (remote execution
    passes its settings this way): here another vision layer's features (the tiny model reads its
    last, -1), which change every position after the image."""
    from lmms_sgm.profiling import _trace_batch, as_nnsight
    from lmms_sgm.sites import layer_output_site

    model, processor = model_and_processor
    site = layer_output_site(model, 0)
    enc = encode(processor, [toy_pairs[0]])
    mask = enc["attention_mask"].bool()
    with torch.no_grad():
        plain = _trace_batch(as_nnsight(model), [site], dict(enc), mask, "mean")[site.name].numpy()
        moved = _trace_batch(as_nnsight(model), [site], dict(enc), mask, "mean", vision_feature_layer=-2)[site.name].numpy()
    np.testing.assert_allclose(plain, _layer_output_reference(model, enc, 0), atol=1e-5, rtol=0)
    np.testing.assert_allclose(moved, _layer_output_reference(model, enc, 0, vision_feature_layer=-2), atol=1e-5, rtol=0)
    assert np.abs(moved - plain).max() > 1e-3


def test_a_text_field_the_records_cannot_fill_is_refused_before_any_forward(model_and_processor, toy_pairs):
    from lmms_sgm.data import DataError, Pair, PairDataset

    model, processor = model_and_processor
    pairs = PairDataset([Pair(image=toy_pairs[i].image, text=toy_pairs[i].text, label=toy_pairs[i].label) for i in (0, 1)])
    assert sorted(pairs.labels) == [0, 1]
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with pytest.raises(DataError, match=r"record 0: text_field='question\+response' needs a 'question' in every record"):
            profile(model, processor, pairs, ProfileOptions(text_field="question+response"), progress=False)
    finally:
        hook.remove()
    assert calls == []


def test_a_text_only_model_has_no_image_positions(tiny_lm_dir):
    """positions=text and after_image leave nothing out on a text-only model, whatever its token
    ids (an unknown word gives <unk>, a low id, in each text)."""
    from lmms_sgm import models
    from lmms_sgm.data import Pair, PairDataset

    lm, tokenizer = models.load(str(tiny_lm_dir))
    pairs = PairDataset([Pair(image=None, text="you are a zzzz idiot", label=1),
                         Pair(image=None, text="what a qqqq nice picture", label=0)])
    assert tokenizer.unk_token_id in tokenizer(pairs[0].text)["input_ids"]
    stores = {}
    for positions in ("all", "text", "after_image"):
        sites, stores[positions] = profile(lm, tokenizer, pairs, ProfileOptions(positions=positions), progress=False)
    try:
        for s in sites:
            np.testing.assert_array_equal(stores["text"][s.name], stores["all"][s.name])
            np.testing.assert_array_equal(stores["after_image"][s.name], stores["all"][s.name])
    finally:
        for store in stores.values():
            store.close()


def test_remote_profiling_cuts_batches_to_the_size_limit_and_sends_each_trace(model_and_processor, toy_pairs,
                                                                               monkeypatch):
    """The remote path with the transport replaced (nothing leaves the process; tests/test_remote.py
    runs the real one): the model is wrapped for remote use, the batch size is cut by
    remote.fit_batch_size from one example's result (4 bytes a neuron) and request (twice its
    tensors' bytes), every batch goes through the session with its trace settings, and the
    responses are the local ones."""
    from lmms_sgm import remote
    from lmms_sgm.data import encode_batch
    from lmms_sgm.options import ExecutionOptions
    from lmms_sgm.profiling import as_nnsight

    model, processor = model_and_processor
    opts = ProfileOptions(modules=MODULES, batch_size=BATCH)
    wrapped, fits, sent = [], [], []

    class Session:
        def __init__(self, nn_model, execution):
            self.given = (nn_model, execution)
            self.trace_kwargs = {"vision_feature_layer": -1}  # the tiny model's own setting: the same forward

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def call(self, fn, nn_model, sites, inputs, mask, pooling, **kwargs):
            sent.append((self.given == (nn_model, execution), len(inputs["input_ids"]), pooling, kwargs))
            return fn(nn_model, sites, inputs, mask, pooling, **kwargs)

    monkeypatch.setattr(remote, "wrap", lambda m, p: wrapped.append((m, p)) or as_nnsight(m))
    monkeypatch.setattr(remote, "fit_batch_size", lambda *a: fits.append(a) or 2)
    monkeypatch.setattr(remote, "Session", Session)
    execution = ExecutionOptions(remote="ndif", checkpoint_dir="off")
    sites, store = profile(model, processor, toy_pairs, opts, progress=False, execution=execution)
    _, local = profile(model, processor, toy_pairs, opts, progress=False)
    try:
        assert wrapped == [(model, processor)]
        first = encode_batch(processor, [toy_pairs[0]], opts.text_field)
        request = sum(t.numel() * t.element_size() for t in first.values() if isinstance(t, torch.Tensor))
        second = encode_batch(processor, [toy_pairs[1]], opts.text_field)
        assert second["input_ids"].shape != first["input_ids"].shape  # the first example is the one measured
        assert fits == [(BATCH, 4 * sum(s.width for s in sites), 2 * request, execution)]
        assert all(same and rows <= 2 and pooling == "mean" and kw == {"vision_feature_layer": -1}
                   for same, rows, pooling, kw in sent)
        assert sum(rows for _, rows, _, _ in sent) == len(toy_pairs)
        _assert_the_same_responses(store, local, sites)
    finally:
        store.close()
        local.close()


def test_a_checkpoint_gets_the_runs_key_and_every_batch_it_lacks(model_and_processor, toy_pairs):
    """With a checkpoint (its files: tests/test_checkpoint.py): opened with the run's key, asked
    for the batches it holds (here batch 0, written from a local profile), given every other batch
    as it arrives; a restored batch is not traced again and the responses are the local ones."""
    from lmms_sgm.checkpoint import make_key, processor_digest
    from lmms_sgm.models import fingerprint, weights_digest
    from lmms_sgm.options import to_dict

    model, processor = model_and_processor
    opts = ProfileOptions(modules=MODULES, batch_size=BATCH)
    sites, local = profile(model, processor, toy_pairs, opts, progress=False)

    class Checkpoint:
        def __init__(self):
            self.key, self.plan, self.saved = None, None, []

        def open(self, key):
            self.key = key

        def restore(self, store, batches, restore_sites):
            self.plan = batches
            store.write(batches[0], {s.name: torch.from_numpy(local[s.name][batches[0]]) for s in restore_sites})
            return {0}

        def save(self, index, rows, pooled):
            self.saved.append((index, list(rows), {k: v.clone() for k, v in pooled.items()}))

    forwards = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: forwards.append(1), with_kwargs=True)
    checkpoint = Checkpoint()
    try:
        _, store = profile(model, processor, toy_pairs, opts, progress=False, checkpoint=checkpoint)
    finally:
        hook.remove()
    try:
        plan = checkpoint.plan
        assert sorted(i for rows in plan for i in rows) == list(range(len(toy_pairs))) and max(map(len, plan)) <= BATCH
        assert checkpoint.key == make_key(fingerprint=fingerprint(model), weights=weights_digest(model), dtype="torch.float32",
                                          attention={"": "eager", "text_config": {"": "eager"}, "vision_config": {"": "eager"}},
                                          processor=processor_digest(processor), data_digest=toy_pairs.digest(),
                                          examples=len(toy_pairs), profile_options=to_dict(opts), sites=sites, batches=plan)
        assert [(i, rows) for i, rows, _ in checkpoint.saved] == [(i, plan[i]) for i in range(1, len(plan))]
        for _, rows, pooled in checkpoint.saved:
            for s in sites:
                np.testing.assert_array_equal(pooled[s.name].numpy(), local[s.name][rows])
        assert len(forwards) == len(plan) - 1
        _assert_the_same_responses(store, local, sites)
    finally:
        store.close()
        local.close()


def _assert_the_same_responses(store, local, sites):
    for s in sites:
        np.testing.assert_array_equal(store[s.name], local[s.name])


def test_only_the_main_process_gets_a_store(model_and_processor, toy_pairs):
    """Another process of a group traces its share and hands it on (lmms_sgm/distributed.py; its
    tests run real processes): it keeps no store, and profile returns None there."""
    from contextlib import nullcontext

    model, processor = model_and_processor
    traced = []

    class Worker:
        is_main = False

        def together(self):
            return nullcontext()

        def broadcast(self, value):
            return value

        def rounds(self, todo, compute, shape):
            for i in todo:
                traced.append(compute(i).shape == shape(i))
            return iter(())  # process 0 gathers; nothing comes back here

    _, store = profile(model, processor, toy_pairs, ProfileOptions(modules=MODULES, batch_size=BATCH), progress=False,
                       group=Worker())
    assert store is None and traced and all(traced)


def test_a_failed_run_removes_its_spilled_store(model_and_processor, toy_pairs, tmp_path, monkeypatch):
    """An error mid-run (here the checkpoint failing to save) propagates, and the responses spilled
    to disk so far are removed with their temporary directory."""
    import tempfile

    model, processor = model_and_processor
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    class Failing:
        def open(self, key):
            pass

        def restore(self, store, batches, sites):
            assert list(tmp_path.glob("lmms_sgm_responses_*"))  # spilled, on disk
            return set()

        def save(self, index, rows, pooled):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full") as err:
        profile(model, processor, toy_pairs, ProfileOptions(batch_size=BATCH), progress=False, spill_mb=0,
                checkpoint=Failing())
    # removed by profile itself: the traceback (held by err) still holds the store
    assert list(tmp_path.glob("lmms_sgm_responses_*")) == [] and err.traceback
