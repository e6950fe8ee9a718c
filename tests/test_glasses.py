"""The glasses artifact: build, save/load, manifest, reselect, mismatch checks, atomic writes."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sklearn.metrics import roc_auc_score

import lmms_sgm.interventions.base as glasses_mod
import lmms_sgm.interventions.sgm as sgm_mod
import lmms_sgm.staging as staging
from lmms_sgm import models, tiny
from lmms_sgm.data import DataError
from lmms_sgm.expertise import select
from lmms_sgm.interventions.errors import GlassesError, GlassesMismatch, UnverifiedGlassesWarning
from lmms_sgm.interventions.sgm import SafetyGlasses
from lmms_sgm.options import ProfileOptions, SelectionOptions, to_dict
from lmms_sgm.pipeline import build_glasses
from lmms_sgm.profiling import profile
from lmms_sgm.sites import Site

MODULES = ("gate_proj", "up_proj", "intermediate", "down_proj")
PROFILE = ProfileOptions(modules=MODULES, batch_size=8)
SELECT = SelectionOptions(rule="sgm", threshold=0.5)


def expected_site_names():
    names = []
    for layer in range(2):
        base = f"model.language_model.layers.{layer}.mlp"
        names += [f"{base}.gate_proj", f"{base}.up_proj", f"{base}.down_proj.input", f"{base}.down_proj"]
    return names


@pytest.fixture(scope="module")
def built(model_and_processor, toy_jsonl, tmp_path_factory):
    model, processor = model_and_processor
    out = tmp_path_factory.mktemp("glasses") / "g"
    g = build_glasses(model, processor, toy_jsonl, PROFILE, SELECT, out=out, progress=False)
    return g, out


# ---------------------------------------------------------------- contents


def test_aurocs_and_alphas_are_right(built, model_and_processor, toy_pairs):
    """Every stored AUROC is sklearn's on the profiled responses; alpha follows the sgm rule."""
    g, _ = built
    model, processor = model_and_processor
    sites, store = profile(model, processor, toy_pairs, PROFILE, progress=False)
    y = np.array(toy_pairs.labels)
    try:
        for s in sites:
            want = np.array([roc_auc_score(y, store[s.name][:, j]) for j in range(s.width)])
            np.testing.assert_allclose(g.auroc[s.name].numpy(), want, atol=1e-6, rtol=0, err_msg=s.name)
            a = g.auroc[s.name].numpy()
            alpha = np.where(a > 0.5, 1 - 2 * (a - 0.5), 1.0).astype(np.float32)
            np.testing.assert_array_equal(g.alpha[s.name].numpy(), alpha)
    finally:
        store.close()
    assert g.manifest["counts"]["experts"] == sum(int((g.alpha[n] != 1).sum()) for n in g.alpha) > 0


def test_max_pooling_with_ties_matches_sklearn(model_and_processor, toy_jsonl, toy_pairs):
    """Max pooling makes exact ties (the BOS position is the same in every example)."""
    model, processor = model_and_processor
    opts = ProfileOptions(modules=("gate_proj", "down_proj"), pooling="max", batch_size=8)
    g = build_glasses(model, processor, toy_jsonl, opts, SELECT, progress=False)
    sites, store = profile(model, processor, toy_pairs, opts, progress=False)
    y = np.array(toy_pairs.labels)
    try:
        ties = 0
        for s in sites:
            x = np.array(store[s.name])
            ties += sum(len(np.unique(x[:, j])) < len(y) for j in range(s.width))
            want = np.array([roc_auc_score(y, x[:, j]) for j in range(s.width)])
            np.testing.assert_allclose(g.auroc[s.name].numpy(), want, atol=1e-6, rtol=0, err_msg=s.name)
        assert ties > 0
    finally:
        store.close()


def test_safetensors_keys_and_dtypes(built):
    g, out = built
    names = expected_site_names()
    assert [s.name for s in g.sites] == names
    with safe_open(str(out / "glasses.safetensors"), "pt") as f:
        assert set(f.keys()) == ({f"{n}.auroc" for n in names} | {f"{n}.alpha" for n in names}
                                 | {f"{n}.mean_nontoxic" for n in names})
        assert f.metadata()["format"] == "lmms_sgm.glasses"
        for n, s in zip(names, g.sites):
            auroc, alpha = f.get_tensor(f"{n}.auroc"), f.get_tensor(f"{n}.alpha")
            assert auroc.dtype == torch.float64 and alpha.dtype == torch.float32
            assert auroc.shape == alpha.shape == (s.width,)
            assert f.get_tensor(f"{n}.mean_nontoxic").dtype == torch.float32
    assert sorted(os.listdir(out)) == ["glasses.safetensors", "manifest.json"]


def test_manifest_contents(built, model_and_processor, toy_pairs):
    g, out = built
    model, _ = model_and_processor
    m = json.loads((out / "manifest.json").read_text())
    assert m["format_version"] == 2
    assert m["fingerprint"] == models.fingerprint(model)
    assert m["fingerprint"]["num_layers"] == 2 and m["fingerprint"]["intermediate_size"] == 64
    assert m["fingerprint"]["model_type"] == "llava"
    assert [s["name"] for s in m["sites"]] == expected_site_names()
    assert m["sites"][2] == {"name": "model.language_model.layers.0.mlp.down_proj.input",
                             "module_path": "model.language_model.layers.0.mlp.down_proj",
                             "kind": "input", "layer": 0, "module": "intermediate", "width": 64}
    assert m["profile_options"] == to_dict(PROFILE) and m["profile_options"]["modules"] == list(MODULES)
    # gate=off is left out, so that ungated glasses keep the bytes they had before gates existed
    assert m["selection_options"] == {k: v for k, v in to_dict(SELECT).items() if k != "gate"}
    assert m["data"] == {"digest": toy_pairs.digest(), "examples": 20, "toxic": 10, "non_toxic": 10}
    assert m["counts"]["neurons"] == 2 * (64 + 64 + 64 + 32)
    assert m["counts"]["experts"] == sum(int(v) for v in m["counts"]["experts_per_layer"].values())
    assert m["digest"] == g.digest()


# ---------------------------------------------------------------- persistence


def test_save_load_round_trip(built, tmp_path):
    g, out = built
    loaded = SafetyGlasses.load(out)
    assert loaded.sites == g.sites
    assert loaded.auroc.keys() == g.auroc.keys() == loaded.alpha.keys()
    for n in g.auroc:
        assert torch.equal(loaded.auroc[n], g.auroc[n]) and loaded.auroc[n].dtype == torch.float64
        assert torch.equal(loaded.alpha[n], g.alpha[n]) and loaded.alpha[n].dtype == torch.float32
    assert loaded.manifest == {**g.manifest, "digest": g.digest()}
    assert loaded.digest() == g.digest()
    assert loaded.selection == SELECT
    # and once more: saving what was loaded gives the same files' meaning and digest
    again = SafetyGlasses.load(loaded.save(tmp_path / "again"))
    assert again.digest() == g.digest() and again.manifest == loaded.manifest
    assert json.loads((tmp_path / "again" / "manifest.json").read_text()) == json.loads((out / "manifest.json").read_text())


def test_digest_is_deterministic_and_tracks_alphas(built, model_and_processor, toy_jsonl):
    g, _ = built
    model, processor = model_and_processor
    rebuilt = build_glasses(model, processor, toy_jsonl, PROFILE, SELECT, progress=False)
    assert rebuilt.digest() == g.digest()
    assert g.reselect(SelectionOptions(rule="det0", top_k=3)).digest() != g.digest()


def test_digest_covers_the_non_toxic_means_exactly_when_applying_uses_them(built):
    """Glasses that pull towards the non-toxic mean act through those means: two that differ only
    there must not share a digest (results.json identifies the intervention by it). Towards zero
    the means play no part, and the digest ignores them."""
    import dataclasses

    g, _ = built
    assert g.mean_nontoxic is not None
    towards = g.reselect(SelectionOptions(rule="sgm", threshold=0.5, towards="nontoxic_mean"))
    site = next(s.name for s in g.sites if bool((towards.alpha[s.name] != 1).any()))
    moved = {k: v.clone() for k, v in g.mean_nontoxic.items()}
    moved[site][int((towards.alpha[site] != 1).nonzero()[0])] += 0.5  # an expert's mean: applying changes
    other = dataclasses.replace(towards, mean_nontoxic=moved)
    assert not torch.equal(towards.transforms(1.0)[site][1], other.transforms(1.0)[site][1])  # it acts otherwise
    assert other.digest() != towards.digest()
    assert dataclasses.replace(g, mean_nontoxic=moved).digest() == g.digest()  # towards zero: means unused
    assert towards.digest() != g.digest()  # the same alphas, another target


def test_reselect_changes_alphas_not_aurocs(built):
    g, _ = built
    before_alpha = {n: a.clone() for n, a in g.alpha.items()}
    sel = SelectionOptions(rule="det0", top_k=10)
    r = g.reselect(sel)
    for n in g.auroc:
        assert torch.equal(r.auroc[n], g.auroc[n])
        assert torch.equal(g.alpha[n], before_alpha[n])  # the original is untouched
    assert any(not torch.equal(r.alpha[n], g.alpha[n]) for n in g.alpha)
    assert sum(int((a == 0).sum()) for a in r.alpha.values()) == 10
    want = select(g.auroc, sel)
    assert all(torch.equal(r.alpha[n], want[n]) for n in g.alpha)

    def ungated(o):
        return {k: v for k, v in to_dict(o).items() if k != "gate"}  # gate=off is left out

    assert r.manifest["selection_options"] == ungated(sel) and r.selection == sel
    assert r.manifest["counts"]["experts"] == 10
    assert g.manifest["selection_options"] == ungated(SELECT)
    t3 = g.reselect(SelectionOptions(threshold=0.3))
    assert any(bool((t3.alpha[n] > 1).any()) for n in t3.alpha)  # 0.3 < AUROC < 0.5 amplified


def test_load_rejects_non_glasses(tmp_path, built):
    with pytest.raises(FileNotFoundError, match="is not a glasses directory"):
        SafetyGlasses.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a glasses directory"):
        SafetyGlasses.load(tmp_path / "does-not-exist")
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="is not a glasses directory"):
        SafetyGlasses.load(tmp_path)


def test_load_rejects_other_format_version(tmp_path, built):
    g, _ = built
    path = g.save(tmp_path / "g")
    m = json.loads((path / "manifest.json").read_text())
    m["format_version"] = 99
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="glasses format 99 is not supported"):
        SafetyGlasses.load(path)


def test_save_into_existing_dir(built, tmp_path):
    g, _ = built
    target = tmp_path / "g"
    target.mkdir()
    g.save(target)  # an empty directory is fine
    assert SafetyGlasses.load(target).digest() == g.digest()
    other = g.reselect(SelectionOptions(rule="det0", top_k=2))
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        other.save(target)
    assert SafetyGlasses.load(target).digest() == g.digest()  # unchanged
    other.save(target, overwrite=True)
    assert SafetyGlasses.load(target).digest() == other.digest()
    assert sorted(os.listdir(tmp_path)) == ["g"]


def test_build_refuses_non_empty_out_before_profiling(model_and_processor, toy_jsonl, tmp_path, monkeypatch):
    model, processor = model_and_processor
    out = tmp_path / "g"
    out.mkdir()
    (out / "notes.txt").write_text("mine")

    def no_profiling(*a, **k):
        raise AssertionError("profiling started although the output directory is taken")

    monkeypatch.setattr("lmms_sgm.pipeline.profile", no_profiling)
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        build_glasses(model, processor, toy_jsonl, PROFILE, SELECT, out=out, progress=False)
    assert os.listdir(out) == ["notes.txt"]


def test_failed_save_leaves_nothing_and_keeps_old(built, tmp_path, monkeypatch):
    g, _ = built
    target = tmp_path / "g"
    g.save(target)

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(glasses_mod, "_write_file", broken)
    with pytest.raises(OSError, match="disk full"):
        g.reselect(SelectionOptions(rule="det0", top_k=2)).save(target, overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        g.save(tmp_path / "new")
    assert sorted(os.listdir(tmp_path)) == ["g"]  # no temp siblings, no partial "new"
    assert SafetyGlasses.load(target).digest() == g.digest()  # the old glasses survive


def test_interrupted_save_leaves_old_glasses_and_no_temporary_files(built, tmp_path, monkeypatch):
    """Ctrl-C while the files are written, and a failing exchange: the old glasses stay, alone."""
    g, _ = built
    target = tmp_path / "g"
    g.save(target)
    other = g.reselect(SelectionOptions(rule="det0", top_k=2))

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    for module, name in ((glasses_mod, "_write_file"), (staging, "_exchange")):
        with monkeypatch.context() as m:
            m.setattr(module, name, interrupt)
            with pytest.raises(KeyboardInterrupt):
                other.save(target, overwrite=True)
        assert sorted(os.listdir(tmp_path)) == ["g"], name
        assert SafetyGlasses.load(target).digest() == g.digest(), name
    # A new path under parents that did not exist: the parents this created go too.
    with monkeypatch.context() as m:
        m.setattr(glasses_mod, "_write_file", interrupt)
        with pytest.raises(KeyboardInterrupt):
            g.save(tmp_path / "a" / "b" / "g")
    assert sorted(os.listdir(tmp_path)) == ["g"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_overwrite_replaces_glasses_atomically(built, tmp_path, monkeypatch, exchange):
    """Both ways of swapping (an exchange where Linux allows it, two renames elsewhere) end with
    the new glasses and nothing else; a failed second rename puts the old glasses back."""
    g, _ = built
    target = tmp_path / "g"
    g.save(target)
    other = g.reselect(SelectionOptions(rule="det0", top_k=2))
    if not exchange:
        monkeypatch.setattr(staging, "_exchange", lambda a, b: False)
        real_rename, calls = os.rename, []

        def second_rename_fails(src, dst):
            calls.append(src)
            if len(calls) == 2:
                raise KeyboardInterrupt
            real_rename(src, dst)

        monkeypatch.setattr(staging.os, "rename", second_rename_fails)
        with pytest.raises(KeyboardInterrupt):
            other.save(target, overwrite=True)
        assert sorted(os.listdir(tmp_path)) == ["g"] and SafetyGlasses.load(target).digest() == g.digest()
        monkeypatch.setattr(staging.os, "rename", real_rename)
    else:
        real_exchange, swaps = staging._exchange, []
        monkeypatch.setattr(staging, "_exchange", lambda a, b: swaps.append(real_exchange(a, b)) or swaps[-1])
    other.save(target, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["g"] and sorted(os.listdir(target)) == ["glasses.safetensors", "manifest.json"]
    assert SafetyGlasses.load(target).digest() == other.digest()
    if exchange and sys.platform.startswith("linux"):
        assert swaps == [True]  # one atomic exchange (Linux >= 3.15, ext4/xfs/btrfs/tmpfs)


def _glasses_with_extra(built, tmp_path):
    g, _ = built
    target = g.save(tmp_path / "g")
    (target / "notes.txt").write_text("mine")
    return target


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda built, tmp: (tmp / "g").write_text("mine") and tmp / "g", r"g is a file, not a glasses directory"),
        (lambda built, tmp: (tmp / "g").mkdir() or (tmp / "g" / "results.json").write_text("mine") and tmp / "g",
         r"g is not a glasses directory \(.*manifest.json is missing"),
        (lambda built, tmp: (tmp / "g").mkdir() or (tmp / "g" / "manifest.json").write_text("mine") and tmp / "g",
         r"g is not a glasses directory \(.*manifest.json: not valid JSON"),
        (_glasses_with_extra, r"g holds glasses and other files \(notes.txt\)"),
    ],
    ids=["file", "results-folder", "broken-manifest", "glasses-and-more"],
)
def test_overwrite_refuses_anything_but_glasses(built, tmp_path, make, message):
    g, _ = built
    target = make(built, tmp_path)
    before = {p: p.read_bytes() for p in [target, *target.rglob("*")] if p.is_file()}
    with pytest.raises(FileExistsError, match=message):
        g.reselect(SelectionOptions(rule="det0", top_k=2)).save(target, overwrite=True)
    assert {p: p.read_bytes() for p in [target, *target.rglob("*")] if p.is_file()} == before
    assert sorted(os.listdir(tmp_path)) == ["g"]


def test_build_refuses_the_data_folder(model_and_processor, toy_jsonl, tmp_path, monkeypatch):
    model, processor = model_and_processor
    data_dir = tmp_path / "data"
    data = _write_rows(data_dir, _toy_rows(toy_jsonl))
    monkeypatch.setattr("lmms_sgm.pipeline.profile", lambda *a, **k: pytest.fail("profiling started"))
    for out in (data_dir, tmp_path):
        with pytest.raises(FileExistsError, match=r"holds the profiling data .*pairs\.jsonl"):
            build_glasses(model, processor, data, PROFILE, SELECT, out=out, overwrite=True, progress=False)
    assert os.listdir(data_dir) == ["pairs.jsonl"]


# ---------------------------------------------------------------- integrity and reproducibility


def test_identical_glasses_are_identical_bytes(built, model_and_processor, toy_jsonl, tmp_path):
    """safetensors writes its metadata from a hash map: with two entries their order varied
    between saves (and runs). Ten saves and a second profiling run give the same bytes."""
    g, out = built
    model, processor = model_and_processor
    build_glasses(model, processor, toy_jsonl, PROFILE, SELECT, out=tmp_path / "again", progress=False)
    paths = [out, tmp_path / "again", *(g.save(tmp_path / f"s{i}") for i in range(10))]
    for name in ("glasses.safetensors", "manifest.json"):
        contents = {(p / name).read_bytes() for p in paths}
        assert len(contents) == 1, name


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_files_are_created_with_the_users_umask(built, tmp_path, umask, file_mode, dir_mode):
    g, _ = built
    old = os.umask(umask)
    try:
        g.save(tmp_path / "new")
        g.save(tmp_path / "new", overwrite=True)  # the replacement too
        g.save(tmp_path / "parent" / "nested")
    finally:
        os.umask(old)
    for d in (tmp_path / "new", tmp_path / "parent", tmp_path / "parent" / "nested"):
        assert d.stat().st_mode & 0o777 == dir_mode, d
    for f in [*(tmp_path / "new").iterdir(), *(tmp_path / "parent" / "nested").iterdir()]:
        assert f.stat().st_mode & 0o777 == file_mode, f


def _flip_tensor_byte(path):
    raw = bytearray((path / "glasses.safetensors").read_bytes())
    raw[-5] ^= 0x40  # past the header: one value of the last tensor
    (path / "glasses.safetensors").write_bytes(bytes(raw))


def _edit_manifest(**changes):
    def edit(path):
        m = json.loads((path / "manifest.json").read_text())
        m.update(changes)
        (path / "manifest.json").write_text(json.dumps(m, indent=2))
    return edit


def _truncate(path):
    raw = (path / "glasses.safetensors").read_bytes()
    (path / "glasses.safetensors").write_bytes(raw[: len(raw) // 2])


DAMAGE = {
    "tensor-byte": (_flip_tensor_byte, GlassesError, r"glasses.safetensors: content does not match the sha256"),
    "truncated": (_truncate, GlassesError, r"glasses.safetensors: \d+ bytes, but manifest.json records \d+ \(truncated"),
    "edited-digest": (_edit_manifest(digest="0" * 64), GlassesError, r"manifest.json: content digest mismatch"),
    "edited-counts": (_edit_manifest(counts={"experts": 1}), GlassesError, r"manifest.json: content digest mismatch"),
    "edited-tensor-sha": (_edit_manifest(tensors_sha256="0" * 64), GlassesError, r"manifest.json: content digest mismatch"),
    "no-content-digest": (lambda p: _edit_manifest()(p) or _drop_field(p, "content_digest"), GlassesError,
                          r"manifest.json: the manifest lacks content_digest"),
    "not-json": (lambda p: (p / "manifest.json").write_text('{"format_version": 2,'), GlassesError,
                 r"manifest.json: not valid JSON \(.* at line 1, column \d+\)"),
    "not-an-object": (lambda p: (p / "manifest.json").write_text("[]"), GlassesError,
                      r"manifest.json: not a glasses manifest \(a JSON object expected"),
    "no-tensors": (lambda p: (p / "glasses.safetensors").unlink(), FileNotFoundError,
                   r"is not a glasses directory \(.*glasses.safetensors is missing"),
}


def _drop_field(path, name):
    m = json.loads((path / "manifest.json").read_text())
    del m[name]
    (path / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_or_edited_glasses_are_refused_naming_the_file(built, tmp_path, case):
    g, _ = built
    path = g.save(tmp_path / "g")
    damage, exc, message = DAMAGE[case]
    damage(path)
    with pytest.raises(exc, match=message) as err:
        SafetyGlasses.load(path)
    assert str(path) in str(err.value)


def _forge(path, edit):
    """Rewrite the tensors with ``edit(tensors)`` and re-record their size and sha256 and the
    content digest, as a buggy writer would: every integrity check passes, the contents are wrong."""
    import hashlib

    tensors = load_file(str(path / "glasses.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "glasses.safetensors"))
    blob = (path / "glasses.safetensors").read_bytes()
    m = json.loads((path / "manifest.json").read_text())
    m.update(tensors_bytes=len(blob), tensors_sha256=hashlib.sha256(blob).hexdigest())
    m["content_digest"] = glasses_mod.content_digest(m)
    (path / "manifest.json").write_text(json.dumps(m, indent=2))


def _first(kind):
    return f"{expected_site_names()[0]}.{kind}"


def _set(name, fn):
    def edit(tensors):
        tensors[name] = fn(tensors[name])
    return edit


def _nudge_an_expert(tensors):
    alpha = tensors[_first("alpha")]
    j = int((alpha != 1).nonzero()[0])
    alpha[j] = alpha[j] * 0.5 if alpha[j] != 0 else 0.25  # still an expert: the counts stay, the digest not


FORGED = {
    "alpha-float64": (_set(_first("alpha"), lambda t: t.double()),
                      r"tensor .*\.gate_proj\.alpha is torch\.float64 \(64,\), expected torch\.float32 \(64,\)"),
    "auroc-short": (_set(_first("auroc"), lambda t: t[:-1].clone()), r"\.gate_proj\.auroc is torch\.float64 \(63,\), expected"),
    "mean-float64": (_set(_first("mean_nontoxic"), lambda t: t.double()), r"\.gate_proj\.mean_nontoxic is torch\.float64"),
    "alpha-missing": (lambda t: t.pop(_first("alpha")), r"tensor .*\.gate_proj\.alpha is missing, expected torch\.float32"),
    "alpha-value": (_nudge_an_expert, r"glasses\.safetensors: the alphas do not match the digest and expert counts"),
}


@pytest.mark.parametrize("case", sorted(FORGED))
def test_glasses_whose_integrity_fields_were_recomputed_are_still_checked(built, tmp_path, case):
    """Files that pass every integrity check but hold a tensor of the wrong dtype or width, or
    alphas other than the digest records, are refused naming the tensor file."""
    g, _ = built
    path = g.save(tmp_path / "g")
    edit, message = FORGED[case]
    _forge(path, edit)
    with pytest.raises(GlassesError, match=message) as err:
        SafetyGlasses.load(path)
    assert str(path / "glasses.safetensors") in str(err.value)


def test_non_toxic_means_are_optional_but_all_or_none(built, tmp_path):
    """Glasses without non-toxic means (written before they were kept) load, with none; one site's
    means missing leaves none at all rather than a partial dict."""
    g, _ = built
    all_gone = g.save(tmp_path / "a")
    _forge(all_gone, lambda t: [t.pop(n) for n in [k for k in t if k.endswith(".mean_nontoxic")]])
    loaded = SafetyGlasses.load(all_gone)
    assert loaded.mean_nontoxic is None and loaded.digest() == g.digest()
    one_gone = g.save(tmp_path / "b")
    _forge(one_gone, lambda t: t.pop(_first("mean_nontoxic")))
    assert SafetyGlasses.load(one_gone).mean_nontoxic is None
    with_means = SafetyGlasses.load(g.save(tmp_path / "c"))
    assert set(with_means.mean_nontoxic) == set(expected_site_names())


def test_current_glasses_load_silently_with_their_content_digest_named(built, tmp_path):
    import warnings

    g, _ = built
    path = g.save(tmp_path / "g")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = SafetyGlasses.load(path)
    digest = json.loads((path / "manifest.json").read_text())["content_digest"]
    assert loaded.integrity == f"ok (content digest {digest[:16]})"


@pytest.mark.parametrize("make, what", [
    (lambda p: p, "it does not exist"),
    (lambda p: p.write_text("x") and p, "it is a file"),
    (lambda p: p.mkdir() or p, "manifest.json is missing"),
])
def test_a_path_that_is_no_glasses_directory_says_why(tmp_path, make, what):
    path = tmp_path / "g"
    make(path)
    with pytest.raises(FileNotFoundError, match=rf"{path} is not a glasses directory \(.*{what}; needs manifest\.json and "
                                               r"glasses\.safetensors\); build glasses with `lmms-sgm profile`"):
        SafetyGlasses.load(path) if what != "manifest.json is missing" else glasses_mod.read_manifest(path)


def _as_format_1(path):
    """Rewrite saved glasses as the previous format wrote them: no integrity fields."""
    m = json.loads((path / "manifest.json").read_text())
    for k in ("content_digest", "tensors_sha256", "tensors_bytes"):
        del m[k]
    m["format_version"] = 1
    (path / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")


def test_format_1_loads_with_a_warning_and_resaves_as_format_2(built, tmp_path):
    """Format 1 has no content digest: loaded with a warning that says how to re-save, its alphas
    still checked against the recorded digest; re-saved, it acts the same (same digest)."""
    g, _ = built
    old = g.save(tmp_path / "old")
    _as_format_1(old)
    with pytest.warns(UnverifiedGlassesWarning, match=r"format 1 .* no content digest.*lmms-sgm select .*--rule sgm") as w:
        loaded = SafetyGlasses.load(old)
    assert f"`lmms-sgm select {old} --out NEW_DIR " in str(w[0].message)
    assert loaded.digest() == g.digest() and loaded.integrity.startswith("not verifiable")
    new = loaded.save(tmp_path / "new")
    assert json.loads((new / "manifest.json").read_text())["format_version"] == 2
    again = SafetyGlasses.load(new)
    assert again.digest() == g.digest() and again.integrity.startswith("ok")
    # Damaged alphas in format 1 are still caught by the recorded digest.
    name = f"{g.sites[0].name}.alpha"
    tensors = load_file(str(old / "glasses.safetensors"))
    tensors[name] = torch.where(tensors[name] == 1, torch.tensor(0.5), tensors[name])
    save_file(tensors, str(old / "glasses.safetensors"))
    with pytest.raises(GlassesError, match="alphas do not match the digest"):
        SafetyGlasses.load(old)


def test_repr_is_one_short_line(built):
    g, _ = built
    text = repr(g)
    assert "\n" not in text and len(text) < 200 and "tensor" not in text
    assert text == f"SafetyGlasses(8 sites, {g.counts()['experts']} experts of 448 neurons, rule=sgm, digest={g.digest()[:12]})"
    assert str(g) == text


# ---------------------------------------------------------------- errors write nothing


def _write_rows(directory, rows):
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _toy_rows(toy_jsonl):
    rows = [json.loads(line) for line in toy_jsonl.read_text().splitlines()]
    return [dict(r, image=str(toy_jsonl.parent / r["image"])) for r in rows]


CASES = {
    "one_class": (lambda rows, d: _write_rows(d, [dict(r, label=1) for r in rows]), PROFILE, DataError, "both classes"),
    "empty": (lambda rows, d: _write_rows(d, []), PROFILE, DataError, "empty"),
    "missing_image": (lambda rows, d: _write_rows(d, rows[:5] + [dict(rows[5], image=str(d / "gone.png"))] + rows[6:]),
                      PROFILE, DataError, "record 5: image .*gone.png not found"),
    "layer_out_of_range": (lambda rows, d: _write_rows(d, rows), ProfileOptions(layers="0-2"), ValueError, r"layers \[2\] do not exist"),
    "question_missing": (lambda rows, d: _write_rows(d, rows[:12] + [dict(rows[12], question=None)] + rows[13:]),
                         ProfileOptions(text_field="question", batch_size=4), DataError, "record 12: .*needs a .question."),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_errors_write_nothing(case, model_and_processor, toy_jsonl, tmp_path):
    model, processor = model_and_processor
    make_data, opts, exc, match = CASES[case]
    data_path = make_data(_toy_rows(toy_jsonl), tmp_path / "data")
    parent = tmp_path / "runs"
    parent.mkdir()
    out = parent / "glasses"
    with pytest.raises(exc, match=match):
        build_glasses(model, processor, data_path, opts, SELECT, out=out, progress=False)
    assert not out.exists()
    assert os.listdir(parent) == []  # no temporary siblings either


def test_unknown_module_writes_nothing(model_and_processor, toy_jsonl, tmp_path):
    model, processor = model_and_processor
    parent = tmp_path / "runs"
    parent.mkdir()
    with pytest.raises(ValueError, match="unknown modules 'mlp'"):
        build_glasses(model, processor, toy_jsonl, ProfileOptions(modules=("mlp",)), SELECT, out=parent / "g", progress=False)
    assert os.listdir(parent) == []


# ---------------------------------------------------------------- model mismatch


@pytest.fixture(scope="module", params=[{"intermediate_size": 48}, {"num_layers": 3}], ids=["intermediate48", "layers3"])
def other_model(request, tmp_path_factory):
    path = tiny.build_tiny_llava(tmp_path_factory.mktemp("other"), **request.param)
    model, _ = models.load(str(path))
    return model, request.param


def _logits(model, processor, toy_pairs):
    from lmms_sgm.data import encode_batch

    with torch.no_grad():
        return model(**encode_batch(processor, toy_pairs[:2], "response")).logits


def test_mismatch_refused_on_check_and_apply(built, other_model, model_and_processor, toy_pairs):
    g, _ = built
    model, changed = other_model
    key, value = next(iter(changed.items()))
    field = {"intermediate_size": "intermediate_size", "num_layers": "num_layers"}[key]
    original = {"intermediate_size": 64, "num_layers": 2}[key]
    processor = model_and_processor[1]
    vanilla = _logits(model, processor, toy_pairs)
    with pytest.raises(GlassesMismatch) as err:
        g.check(model)
    msg = str(err.value)
    assert f"{field}: glasses {original} vs model {value}" in msg and "profiled on another model" in msg
    for mode in ("hooks", "fold", "nnsight"):
        with pytest.raises(GlassesMismatch, match=f"{field}: glasses {original} vs model {value}"):
            g.apply(model, mode=mode, processor=processor)
    # nothing was half-applied
    assert torch.equal(_logits(model, processor, toy_pairs), vanilla)
    g.check(model_and_processor[0])  # the right model passes


def test_nontoxic_mean_is_the_mean_of_the_non_toxic_responses(model_and_processor, toy_jsonl, toy_pairs, tmp_path):
    from lmms_sgm.profiling import profile

    model, processor = model_and_processor
    opts = ProfileOptions(modules=("up_proj", "intermediate"))
    g = build_glasses(model, processor, toy_jsonl, opts, SelectionOptions(towards="nontoxic_mean"),
                      out=tmp_path / "g", progress=False)
    sites, store = profile(model, processor, toy_pairs, opts, progress=False)
    labels = np.asarray(toy_pairs.labels)
    for s in sites:
        want = np.asarray(store[s.name])[labels == 0].astype(np.float64).mean(0)
        np.testing.assert_allclose(g.mean_nontoxic[s.name].numpy(), want, rtol=1e-6, atol=1e-7)
    store.close()
    loaded = SafetyGlasses.load(tmp_path / "g")
    assert all(torch.equal(loaded.mean_nontoxic[n], g.mean_nontoxic[n]) for n in g.mean_nontoxic)
    assert loaded.digest() == g.digest()
    assert loaded.reselect(SelectionOptions()).digest() != g.digest()  # towards is part of the digest


def test_the_resave_command_names_every_set_selection_option():
    from pathlib import Path

    manifest = {"selection_options": {"top_k": None, "rule": "sgm", "threshold": 0.5, "towards": "nontoxic_mean"}}
    assert glasses_mod._resave_command(Path("/g/old"), manifest) == \
        "`lmms-sgm select /g/old --out NEW_DIR --rule sgm --threshold 0.5 --towards nontoxic_mean`"
    manifest = {"selection_options": {"rule": "damp", "top_k": 3, "damp_factor": 0.25}}  # underscores: dashes
    assert glasses_mod._resave_command(Path("/g/old"), manifest) == \
        "`lmms-sgm select /g/old --out NEW_DIR --damp-factor 0.25 --rule damp --top-k 3`"


def test_files_hold_canonical_dtypes_metadata_and_json(built, tmp_path):
    """Whatever dtypes the tensors in memory have, the files hold float64 AUROCs and float32
    alphas and means (what loading checks), the safetensors header carries the format tag, and
    the manifest is sorted, indented JSON ending in a newline (diff-friendly, the same bytes for the same glasses)."""
    import dataclasses

    g, _ = built
    odd = dataclasses.replace(g, auroc={k: v.float() for k, v in g.auroc.items()},
                              alpha={k: v.double() for k, v in g.alpha.items()},
                              mean_nontoxic={k: v.double() for k, v in g.mean_nontoxic.items()})
    path = odd.save(tmp_path / "g")
    with safe_open(str(path / "glasses.safetensors"), "pt") as f:
        assert f.metadata() == glasses_mod.TENSORS_METADATA
        dtypes = {k.rsplit(".", 1)[1]: f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    assert dtypes == {"auroc": torch.float64, "alpha": torch.float32, "mean_nontoxic": torch.float32}
    loaded = SafetyGlasses.load(path)
    assert all(torch.equal(loaded.alpha[n], g.alpha[n]) for n in g.alpha)
    text = (path / "manifest.json").read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"


def test_factors_and_shifts_are_computed_in_float64_and_stored_in_float32(built):
    g, _ = built
    towards = g.reselect(SelectionOptions(rule="sgm", threshold=0.5, towards="nontoxic_mean"))
    for strength in (0.3, 0.7, 1.0):
        transforms = towards.transforms(strength)
        for name, (f, shift) in transforms.items():
            want_f = (1 - strength) + strength * towards.alpha[name].double()
            assert f.dtype == torch.float32 and torch.equal(f, want_f.float()), name
            want_shift = (1 - want_f.float().double()) * towards.mean_nontoxic[name].double()
            assert shift.dtype == torch.float32 and torch.equal(shift, want_shift.float()), name
    # only the sites whose factors differ from 1 somewhere
    one = g.reselect(SelectionOptions(rule="det0", top_k=1))
    changed = {n for n, a in one.alpha.items() if bool((a != 1).any())}
    assert len(changed) == 1 and set(one.factors(1.0)) == changed and one.factors(0.0) == {}


def test_content_digest_is_sha256_of_compact_sorted_utf8_json():
    """A file-format contract (glasses already written must keep verifying): sha256 over the
    manifest without its content_digest, as compact JSON with sorted keys, non-ASCII kept as UTF-8."""
    import hashlib

    manifest = {"b": "café", "a": [1, 2.5, None], "content_digest": "ignored"}
    want = hashlib.sha256('{"a":[1,2.5,null],"b":"café"}'.encode()).hexdigest()
    assert glasses_mod.content_digest(manifest) == want


# ---------------------------------------------------------------- hand-made glasses (no model)

HAND_SITES = [Site("a.gate", "m.layers.0.mlp.gate_proj", "output", 0, "gate_proj", 4),
              Site("b.up", "m.layers.1.mlp.up_proj", "output", 1, "up_proj", 3)]
# AUROCs away from the histogram's bin edges, spanning less than [0, 1] (so that the histogram's
# fixed range shows); alphas of the sgm rule at threshold 0.5 (1 - 2 * (AUROC - 0.5)).
HAND_AUROC = {"a.gate": [0.05, 0.55, 0.75, 0.25], "b.up": [0.45, 0.65, 0.15]}
HAND_ALPHA = {"a.gate": [1.0, 0.9, 0.5, 1.0], "b.up": [1.0, 0.7, 1.0]}
HAND_MEAN = {"a.gate": [0.5, -1.0, 2.0, 0.0], "b.up": [1.0, 0.25, -0.5]}


def _hand_made(selection=SELECT, profile=None, gate=None):
    """SGM glasses from literal tensors: what saving, loading and the texts do, without a model."""
    sites = list(HAND_SITES)
    manifest = {
        "format_version": 2,
        "fingerprint": {"model_type": "toy", "hidden": 8},  # not in sorted order: the texts sort it
        "sites": [s.to_dict() for s in sites],
        "profile_options": to_dict(profile or ProfileOptions()),
        "selection_options": sgm_mod._selection_dict(selection),
        "data": {"pairs": 2, "digest": "d" * 64},
    }
    g = SafetyGlasses(sites, {k: torch.tensor(v, dtype=torch.float64) for k, v in HAND_AUROC.items()},
                      {k: torch.tensor(v, dtype=torch.float32) for k, v in HAND_ALPHA.items()}, manifest,
                      {k: torch.tensor(v, dtype=torch.float32) for k, v in HAND_MEAN.items()}, gate)
    g.manifest["counts"] = {"neurons": 7, "experts": 3, "experts_per_layer": {"0": 2, "1": 1}}
    assert g.counts() == g.manifest["counts"]
    return g


def test_summary_is_the_inspect_text():
    """`lmms-sgm inspect`'s text, written out by hand for the literal glasses above (torch's median
    of an even count is the lower middle value; the histogram counts AUROCs per tenth)."""
    g = _hand_made()
    profile = json.dumps(to_dict(ProfileOptions()), sort_keys=True)
    want = "\n".join([
        "integrity: not saved",
        'fingerprint: {"hidden": 8, "model_type": "toy"}',
        f'data: {{"digest": "{"d" * 64}", "pairs": 2}}',
        f"profile options: {profile}",
        ('selection options: {"damp_factor": 0.5, "direction": "suppress", "rule": "sgm", "threshold": 0.5, '
         '"top_k": null, "towards": "zero"}'),
        "experts: 3 of 7 neurons",
        "layer module         neurons  experts auroc min  median    max alpha min",
        "    0 gate_proj            4        2     0.050   0.250  0.750     0.500",
        "    1 up_proj              3        1     0.150   0.450  0.650     0.700",
        "AUROC histogram (0.0-1.0, 10 bins): 1 1 1 0 1 1 1 1 0 0",
    ])
    assert g.summary() == want
    g.integrity = "ok (content digest 0123)"
    assert g.summary().split("\n")[0] == "integrity: ok (content digest 0123)"


def test_identity_names_data_selection_experts_and_text_only():
    g = _hand_made()
    assert g.identity() == {"data_digest": "d" * 64, "selection": g.manifest["selection_options"], "experts": 3}
    text_only = _hand_made(profile=ProfileOptions(text_only=True))
    assert text_only.identity() == {"data_digest": "d" * 64, "selection": g.manifest["selection_options"],
                                    "experts": 3, "text_only": True}


def test_apply_passes_strength_mode_and_keywords_to_the_intervention(monkeypatch):
    from lmms_sgm.interventions import wearing

    calls = []
    monkeypatch.setattr(wearing, "wear", lambda *a, **kw: calls.append((a, kw)) or "handle")
    g, model = _hand_made(), object()
    assert g.apply(model) == "handle"
    assert g.apply(model, 0.25, "fold", processor="p", remote="off") == "handle"
    assert calls == [((model, g, "hooks", 1.0), {"processor": None, "remote": None}),
                     ((model, g, "fold", 0.25), {"processor": "p", "remote": "off"})]


def test_towards_zero_has_no_shift():
    g = _hand_made()
    transforms = g.transforms(0.5)
    assert set(transforms) == {"a.gate", "b.up"}
    assert all(shift is None for _, shift in transforms.values())


def _gated(gate):
    return _hand_made(selection=SelectionOptions(rule="sgm", threshold=0.5, gate="evidence"), gate=gate)


# float64 in memory, stored as float32; offset and threshold not float32 numbers (stored as float64).
GATE_B = (torch.tensor([0.0, 1.5, -0.25], dtype=torch.float64), 0.1, -1 / 3)


def test_a_gate_round_trips_exactly_and_only_for_its_sites(tmp_path):
    """The gate of the second site only (the first has none): written, read back bit for bit."""
    g = _gated({"b.up": GATE_B})
    path = g.save(tmp_path / "g")
    with safe_open(str(path / "glasses.safetensors"), "pt") as f:
        names = set(f.keys())
    assert {n for n in names if ".gate_" in n} == {"b.up.gate_weight", "b.up.gate_offset_threshold"}
    loaded = SafetyGlasses.load(path)
    assert set(loaded.gate) == {"b.up"}
    v, c, t = loaded.gate["b.up"]
    assert torch.equal(v, GATE_B[0].float()) and v.dtype == torch.float32 and (c, t) == (0.1, -1 / 3)
    assert loaded.digest() == g.digest()


def test_a_gate_without_sites_loads_as_an_empty_gate(tmp_path):
    """gate=evidence on glasses without experts: no gate tensors, an empty gate (not None, which
    would contradict the selection)."""
    g = _gated({})
    loaded = SafetyGlasses.load(g.save(tmp_path / "g"))
    assert loaded.gate == {} and loaded.digest() == g.digest()


GATE_DAMAGE = {
    "weight-only": lambda t: t.pop("b.up.gate_offset_threshold"),
    "offset-only": lambda t: t.pop("b.up.gate_weight"),
    "weight-float64": _set("b.up.gate_weight", lambda x: x.double()),
    "weight-short": _set("b.up.gate_weight", lambda x: x[:2].clone()),
    "offset-three": _set("b.up.gate_offset_threshold", lambda x: torch.cat([x, x[:1]])),
}


@pytest.mark.parametrize("case", sorted(GATE_DAMAGE))
def test_malformed_gate_tensors_are_refused(tmp_path, case):
    path = _gated({"b.up": GATE_B}).save(tmp_path / "g")
    _forge(path, GATE_DAMAGE[case])
    with pytest.raises(GlassesError, match=r"glasses\.safetensors: the gate tensors of b\.up are incomplete or malformed"):
        SafetyGlasses.load(path)


def test_reselect_with_a_gate_fits_it_on_the_given_responses():
    """Re-selection with gate=evidence fits the gate on ``store`` / ``labels``: weights 2 (AUROC - 0.5) / sd
    on the experts, offset v . mu, threshold midway between the classes (separable here)."""
    rng = np.random.default_rng(3)
    labels = np.array([1, 1, 1, 0, 0, 0])
    store = {s.name: rng.normal(size=(6, s.width)) + 3.0 * labels[:, None] for s in HAND_SITES}
    g = _hand_made().reselect(SelectionOptions(rule="sgm", threshold=0.5, gate="evidence"), store=store, labels=labels)
    assert set(g.gate) == {"a.gate", "b.up"}
    for s in HAND_SITES:
        auroc, x = np.array(HAND_AUROC[s.name]), store[s.name]
        experts = auroc > 0.5
        want_v = np.where(experts, 2 * (auroc - 0.5) / x.std(0), 0.0)
        v, c, t = g.gate[s.name]
        np.testing.assert_allclose(v.numpy(), want_v, rtol=1e-6)
        assert c == pytest.approx(float(want_v @ np.array(HAND_MEAN[s.name])), rel=1e-12)
        e = x @ want_v - c
        assert e[labels == 0].max() < e[labels == 1].min()  # separable, so the threshold is their midpoint
        assert t == pytest.approx((e[labels == 0].max() + e[labels == 1].min()) / 2, rel=1e-9)
    with pytest.raises(ValueError, match="gate=evidence chooses its thresholds on the pooled responses"):
        _hand_made().reselect(SelectionOptions(gate="evidence"))


# ---------------------------------------------------------------- kinds


def _steering(model):
    """Gated-steering glasses from random class data: built without a forward pass (the model
    gives only its fingerprint)."""
    from lmms_sgm.interventions.steering import SteeringGlasses
    from lmms_sgm.options import SteeringOptions

    rng = np.random.default_rng(0)
    labels = np.array([1, 1, 1, 0, 0, 0])
    site = Site("m.layers.1", "m.layers.1", "layer_output", 1, "layer", 8)
    return SteeringGlasses.from_profiles(
        model, SteeringOptions(layer=1), steer_site=site, answers=rng.normal(size=(6, 8)) + labels[:, None],
        answer_labels=labels, gate_site=site, gate=rng.normal(size=(6, 8)) + labels[:, None], gate_labels=labels,
        marker=[5, 6], data={"answers": {"digest": "a" * 64}, "gate": {"digest": "b" * 64}})


def test_each_kind_is_written_in_its_format_and_loaded_by_its_class(built, model_and_processor, tmp_path):
    """Steering glasses are written in format 3 with their kind, SGM glasses in format 2 without
    one (even when the manifest in memory names it); any loader reads steering glasses, the
    steering class refuses SGM ones. SafetyGlasses.load of another kind is deprecated (it warns)."""
    from lmms_sgm.interventions.registry import kind_class
    from lmms_sgm.interventions.steering import SteeringGlasses

    g, _ = built
    steering = _steering(model_and_processor[0])
    sp = steering.save(tmp_path / "steer")
    m = json.loads((sp / "manifest.json").read_text())
    assert (m["format_version"], m["kind"]) == (3, "gated_steering")
    for loader in (SafetyGlasses.load, glasses_mod.Glasses.load, glasses_mod.load_glasses, SteeringGlasses.load):
        if loader == SafetyGlasses.load:
            with pytest.warns(DeprecationWarning, match="SafetyGlasses.load of gated_steering glasses is deprecated: "
                                                        "use lmms_sgm.load_glasses"):
                loaded = loader(sp)
        else:
            loaded = loader(sp)
        assert type(loaded) is SteeringGlasses and torch.equal(loaded.steer, steering.steer)
        assert loaded.digest() == steering.digest()
    named = SafetyGlasses(g.sites, g.auroc, g.alpha, {**g.manifest, "kind": "sgm"}, g.mean_nontoxic)
    gp = named.save(tmp_path / "sgm")
    m = json.loads((gp / "manifest.json").read_text())
    assert m["format_version"] == 2 and "kind" not in m
    with pytest.raises(GlassesError, match=rf"{gp}/manifest\.json: these are sgm glasses, not gated_steering; load them "
                                           r"with lmms_sgm\.load_glasses"):
        SteeringGlasses.load(gp)
    assert kind_class("gated_steering") is SteeringGlasses
    assert kind_class("sgm") is SafetyGlasses
    with pytest.raises(GlassesError, match=r"unknown glasses kind 'other' \(lmms_sgm .* knows gated_steering, sgm; "
                                           r"a kind from a plugin needs that plugin installed\)"):
        kind_class("other")


def test_a_steering_digest_that_does_not_match_its_vectors_is_refused(model_and_processor, tmp_path):
    """The check every kind shares (Glasses._verify): a recorded digest edited, with the content
    digest recomputed to match, still fails against the vectors."""
    path = _steering(model_and_processor[0]).save(tmp_path / "g")
    m = json.loads((path / "manifest.json").read_text())
    m["digest"] = "0" * 64
    m["content_digest"] = glasses_mod.content_digest(m)
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(GlassesError, match=r"glasses\.safetensors: the tensors do not match the digest recorded in "
                                           r"manifest\.json"):
        SafetyGlasses.load(path)


def _rewrite(path, edit):
    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    (path / "manifest.json").write_text(json.dumps(m))


def test_read_manifest_names_what_is_wrong(built, model_and_processor, tmp_path):
    """Not UTF-8; format 3 without a kind; a field the manifest's own kind requires missing."""
    g, _ = built
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_bytes(b'{"format_version": "\xff"}')
    with pytest.raises(GlassesError, match=r"manifest\.json: not valid JSON \(not UTF-8\); the file is damaged"):
        glasses_mod.read_manifest(bad)
    steer = _steering(model_and_processor[0]).save(tmp_path / "steer")
    assert glasses_mod.read_manifest(steer)["kind"] == "gated_steering"
    _rewrite(steer, lambda m: m.pop("steer"))
    with pytest.raises(GlassesError, match=r"not a glasses manifest \(lacks steer\)$"):
        glasses_mod.read_manifest(steer)
    _rewrite(steer, lambda m: m.pop("kind"))
    with pytest.raises(GlassesError, match=r"not a glasses manifest \(format 3 lacks kind\)$"):
        glasses_mod.read_manifest(steer)
    sgm = g.save(tmp_path / "sgm")
    _rewrite(sgm, lambda m: m.pop("counts"))
    with pytest.raises(GlassesError, match=r"not a glasses manifest \(lacks counts\)$"):
        glasses_mod.read_manifest(sgm)


def test_check_lists_every_differing_fingerprint_field(built, model_and_processor):
    import dataclasses

    g, _ = built
    model = model_and_processor[0]
    fp = models.fingerprint(model)
    k1, k2 = list(fp)[:2]
    other = dataclasses.replace(g, manifest={**g.manifest, "fingerprint": {**fp, k1: "x", k2: 7}})
    want = f"{k1}: glasses 'x' vs model {fp[k1]!r}, {k2}: glasses 7 vs model {fp[k2]!r}"
    with pytest.raises(GlassesMismatch) as err:
        other.check(model)
    assert f"profiled on another model ({want}); profile this model" in str(err.value)


def test_discarding_replaced_glasses_tolerates_a_missing_file(tmp_path):
    import warnings

    d = tmp_path / "old"
    d.mkdir()
    (d / "manifest.json").write_text("{}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        glasses_mod._discard_glasses(d)
    assert not d.exists()


def test_digest_is_the_documented_sha256():
    """A file-format contract (recorded digests must keep verifying): sha256 over the sorted JSON
    fingerprint, then ``towards`` unless zero, then per site its name, float32 alphas, float32
    non-toxic means (nontoxic_mean only) and its gate (b"gate", float32 weights, float64 offset
    and threshold); in-memory dtypes do not matter."""
    import hashlib

    def reference(towards, gate):
        h = hashlib.sha256(b'{"hidden": 8, "model_type": "toy"}')
        if towards != "zero":
            h.update(towards.encode())
        for name in ("a.gate", "b.up"):
            h.update(name.encode() + np.array(HAND_ALPHA[name], dtype=np.float32).tobytes())
            if towards == "nontoxic_mean":
                h.update(np.array(HAND_MEAN[name], dtype=np.float32).tobytes())
            if name in gate:
                v, c, t = gate[name]
                h.update(b"gate" + v.numpy().astype(np.float32).tobytes() + np.array([c, t], dtype=np.float64).tobytes())
        return h.hexdigest()

    assert _hand_made().digest() == reference("zero", {})
    towards = _hand_made(selection=SelectionOptions(towards="nontoxic_mean"))
    towards.mean_nontoxic = {k: v.double() for k, v in towards.mean_nontoxic.items()}
    assert towards.digest() == reference("nontoxic_mean", {})
    assert _gated({"b.up": GATE_B}).digest() == reference("zero", {"b.up": GATE_B})


def test_from_expertise_selects_with_the_given_options_and_records_the_format(model_and_processor):
    """Built with a non-default threshold (0.6): only AUROCs above it are experts, alpha 2 (1 - AUROC)."""
    import lmms_sgm

    aurocs = {k: torch.tensor(v, dtype=torch.float64) for k, v in HAND_AUROC.items()}
    g = SafetyGlasses.from_expertise(HAND_SITES, aurocs, SelectionOptions(threshold=0.6), model=model_and_processor[0],
                                     profile_options=ProfileOptions(), data_digest="d" * 64, data_counts={"pairs": 2})
    assert g.alpha["a.gate"].tolist() == pytest.approx([1.0, 1.0, 0.5, 1.0])
    assert g.alpha["b.up"].tolist() == pytest.approx([1.0, 0.7, 1.0])
    assert g.manifest["format_version"] == 2 and g.manifest["lmms_sgm_version"] == lmms_sgm.__version__
    assert g.manifest["counts"] == {"neurons": 7, "experts": 2, "experts_per_layer": {"0": 1, "1": 1}}
    assert g.manifest["data"] == {"digest": "d" * 64, "pairs": 2} and g.gate is None
    labels = np.array([1, 1, 0, 0])
    store = {s.name: np.arange(4 * s.width, dtype=np.float64).reshape(4, s.width) ** 1.5 for s in HAND_SITES}
    gated = SafetyGlasses.from_expertise(HAND_SITES, aurocs, SelectionOptions(threshold=0.6, gate="evidence"),
                                         model=model_and_processor[0], profile_options=ProfileOptions(),
                                         data_digest="d" * 64, data_counts={"pairs": 2}, store=store, labels=labels,
                                         mean_nontoxic={k: torch.tensor(v) for k, v in HAND_MEAN.items()})
    assert set(gated.gate) == {"a.gate", "b.up"}  # the sites with experts, fitted on store and labels


def test_check_target_and_staged_output_refuse_glasses_unless_told_to_overwrite(built, tmp_path):
    g, _ = built
    path = g.save(tmp_path / "g")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        glasses_mod.check_target(path)
    with pytest.raises(FileExistsError, match="exists and is not empty"), glasses_mod.staged_output(path):
        pass
    glasses_mod.check_target(path, overwrite=True)  # glasses and nothing else: may be replaced


@pytest.mark.parametrize("n, shown", [(5, "f0, f1, f2, f3, f4)"), (6, "f0, f1, f2, f3, f4 and 1 more)")])
def test_overwrite_refusal_names_five_other_files_and_counts_the_rest(built, tmp_path, n, shown):
    g, _ = built
    path = g.save(tmp_path / "g")
    for i in range(n):
        (path / f"f{i}").write_text("x")
    with pytest.raises(FileExistsError) as err:
        glasses_mod.check_target(path, overwrite=True)
    assert f"holds glasses and other files ({shown}; --overwrite only replaces" in str(err.value)


def test_towards_the_mean_needs_the_means():
    g = _hand_made()
    g.mean_nontoxic = None
    with pytest.raises(ValueError, match="towards=nontoxic_mean needs the non-toxic means, which these glasses lack"):
        g.reselect(SelectionOptions(towards="nontoxic_mean"))


def test_steering_glasses_get_their_kind_and_no_other_field(model_and_processor, tmp_path):
    """The file's manifest is the one in memory plus the format, the digest and the integrity
    fields, and the kind, even when the manifest in memory lacks it."""
    steering = _steering(model_and_processor[0])
    del steering.manifest["kind"]
    path = steering.save(tmp_path / "g")
    m = json.loads((path / "manifest.json").read_text())
    assert m["kind"] == "gated_steering"
    assert set(m) == {*steering.manifest, "kind", "digest", "tensors_sha256", "tensors_bytes", "content_digest"}
