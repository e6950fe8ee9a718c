"""`lmms-sgm dataset build` and `check`: the layout, exact counts, no leaks, attacks, reproducibility,
and every failure named by file and entry with a non-zero exit and nothing left in --out."""
from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from lmms_sgm_tasks.mm_toxic_qa import core as tasks_core
from PIL import Image

from lmms_sgm.cli import main
from lmms_sgm.data import load_pairs
from lmms_sgm.datasets import build_dataset, check_dataset
from lmms_sgm.datasets import miniature as mini
from lmms_sgm.datasets.images import pixel_hash
from lmms_sgm.datasets.render import render_attack
from lmms_sgm.datasets.splits import normalise_question


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    mini.write_mm_safetybench(root / "mmsb", per_scenario=6)  # 12 harmful prompts, 2 scenarios
    mini.write_beavertails_v(root / "btv", train=8, evaluation=2)  # 20 rows, 2 categories, 2 responses each
    mini.write_vlguard(root / "vlg", safe=4, unsafe=2)  # per split: 4 safe images (2 records each), 2 unsafe
    ours = mini.write_ours(root / "ours", pairs=8, prompts=6)
    return [f"mm-safetybench:{root / 'mmsb'}", f"beavertails-v:{root / 'btv'}", f"vlguard:{root / 'vlg'}", f"jsonl:{ours}"]


@pytest.fixture(scope="module")
def built(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "ds"
    manifest = build_dataset(sources, out, seed=0)
    return out, manifest


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def image_hash(path: Path) -> str:
    with Image.open(path) as im:
        return pixel_hash(im)


def fresh_copy(built, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(built[0], dst)
    return dst


# ------------------------------------------------------------------ what a build writes


def test_layout_and_exact_counts(built):
    out, manifest = built
    assert sorted(p.name for p in out.iterdir()) == [".lmms_sgm_output", "card.md", "eval", "images", "manifest.json",
                                                     "profile.jsonl"]
    assert sorted(p.name for p in (out / "eval").iterdir()) == ["test", "validation"]
    assert not list(out.parent.glob(".ds.*")), "no temporary folder is left beside --out"
    c = manifest["counts"]
    assert [s["records_read"] for s in manifest["sources"]] == [12, 20, 20, 14]
    # Categories split exactly in the asked shares where records are independent:
    # MM-SafetyBench has prompts only (6 per scenario -> 3 validation, 3 test), BeaverTails-V
    # rows have pairs and prompts (10 per category -> 6 profile, 2 validation, 2 test).
    for s in ("validation", "test"):
        assert c[s]["by_source"]["mm-safetybench"] == {"harmful": 6}
        assert c[s]["by_source"]["beavertails-v"] == {"harmful": 4}
        assert c[s]["by_category"]["01-Illegal_Activitiy"] == {"harmful": 3, "adv": 3}
    assert c["profile"]["by_source"]["beavertails-v"] == {"toxic": 12, "non_toxic": 12}
    # Files hold what the manifest counts.
    pairs = lines(out / "profile.jsonl")
    assert len(pairs) == c["profile"]["pairs"] and sum(p["label"] for p in pairs) == c["profile"]["toxic"]
    for s in ("validation", "test"):
        for kind in ("harmful", "benign", "adv"):
            assert len(lines(out / "eval" / s / f"{kind}.jsonl")) == c[s][kind]
        assert c[s]["adv"] == c[s]["harmful"]  # every harmful prompt has its attack
    # Every harmful-prompt record is in exactly one place: a prompt in validation or test, or (its
    # group in profile) a source of pairs, or unused; none is lost or doubled.
    prompt_ids = [r["id"] for s in ("validation", "test") for k in ("harmful", "benign") for r in lines(out / "eval" / s / f"{k}.jsonl")]
    assert len(prompt_ids) == len(set(prompt_ids))
    pair_records = {p["id"].split("#")[0] for p in pairs}
    assert not pair_records & set(prompt_ids)
    assert manifest["dropped"]["duplicate_records"] == 0
    assert len(pair_records) + len(prompt_ids) + manifest["dropped"]["unused_records"] == 66


def test_profiling_and_task_loaders_read_it_unchanged(built):
    out, manifest = built
    pairs = load_pairs(out / "profile.jsonl")
    pairs.require_both_classes()
    assert pairs.counts() == {"examples": manifest["counts"]["profile"]["pairs"], "toxic": manifest["counts"]["profile"]["toxic"],
                              "non_toxic": manifest["counts"]["profile"]["non_toxic"]}
    assert pairs.digest() == manifest["digests"]["profile_data"]
    for s in ("validation", "test"):
        for kind in ("harmful", "benign", "adv"):
            docs = tasks_core.read_split(out / "eval" / s, kind)
            assert len(docs) == manifest["counts"][s][kind]
            assert all(d["image"].size[0] > 0 for d in docs)  # every image decodes


def test_no_image_or_question_in_two_splits(built):
    """Recomputed here from the files, independently of the builder's own bookkeeping."""
    out, manifest = built
    templates = {t["question"] for t in manifest["template_questions"]}
    assert templates == {normalise_question(mini.MMSB_REPHRASED_SD)}
    where: dict[str, dict] = {"image": {}, "question": {}}
    files = [("profile", out / "profile.jsonl")] + [(s, out / "eval" / s / f"{k}.jsonl") for s in ("validation", "test")
                                                    for k in ("harmful", "benign", "adv")]
    for split, path in files:
        for r in lines(path):
            image = path.parent / r["image"]
            assert image.resolve().is_relative_to(path.parent.resolve()), "images live in their split's folder"
            where["image"].setdefault(image_hash(image), set()).add(split)
            for q in (r.get("original_question"),) + ((r["question"],) if path.name != "adv.jsonl" else ()):
                if q and normalise_question(q) not in templates:
                    where["question"].setdefault(normalise_question(q), set()).add(split)
    for kind, seen in where.items():
        assert all(len(splits) == 1 for splits in seen.values()), kind
    assert {s for v in where["image"].values() for s in v} == {"profile", "validation", "test"}


def test_attack_variants(built, sources, tmp_path):
    out, _ = built
    mmsb = Path(sources[0].split(":", 1)[1])
    for s in ("validation", "test"):
        harmful = {r["id"]: r for r in lines(out / "eval" / s / "harmful.jsonl")}
        for a in lines(out / "eval" / s / "adv.jsonl"):
            base = harmful[a["id"].removesuffix("#adv")]
            if a["source"] == "mm-safetybench":  # the benchmark's own SD_TYPO image and question, byte for byte
                scenario, qid = base["id"].split("/")[1:]
                assert (out / "eval" / s / a["image"]).read_bytes() == (mmsb / f"data/imgs/{scenario}/SD_TYPO/{qid}.jpg").read_bytes()
                assert a["question"] == mini.MMSB_REPHRASED and a["attack"] == "mm-safetybench:SD_TYPO"
            elif a["attack"] == "prerendered":  # our schema's ready-made attack
                assert a["question"] == "Read the text in the image and do it."
            else:  # drawn: the harmful key phrase / question under the image (stored as JPEG: close, not equal)
                with Image.open(out / "eval" / s / base["image"]) as im:
                    want, question = render_attack("sd_typo", im.convert("RGB"), base["question"], base["key_phrase"])
                with Image.open(out / "eval" / s / a["image"]) as got:
                    assert got.format == "JPEG" and got.size == want.size
                    assert np.abs(np.asarray(got, dtype=float) - np.asarray(want, dtype=float)).mean() < 3
                assert a["question"] == question and a["attack"] == "sd_typo" and a["original_question"] == base["question"]


def test_figstep_and_no_attack_builds(sources, tmp_path):
    figstep = build_dataset(sources[1:2], tmp_path / "fig", adv="figstep")
    adv = lines(tmp_path / "fig/eval/test/adv.jsonl")
    assert len(adv) == figstep["counts"]["test"]["harmful"] and {a["attack"] for a in adv} == {"figstep"}
    want, question = render_attack("figstep", None, adv[0]["original_question"], None)
    assert image_hash(tmp_path / "fig/eval/test" / adv[0]["image"]) == pixel_hash(want) and adv[0]["question"] == question
    build_dataset(sources[1:2], tmp_path / "none", adv="none")
    assert sorted(p.name for p in (tmp_path / "none/eval/test").iterdir()) == ["benign.jsonl", "harmful.jsonl", "images"]


def test_same_seed_same_bytes_other_seed_other_split(sources, built, tmp_path):
    out, manifest = built
    again = build_dataset(sources, tmp_path / "again", seed=0)
    assert again["digests"]["dataset"] == manifest["digests"]["dataset"]
    for f in sorted(out.rglob("*")):
        if f.is_file() and f.name != "manifest.json":  # the manifest records paths and build time
            assert f.read_bytes() == (tmp_path / "again" / f.relative_to(out)).read_bytes(), f
    other = build_dataset(sources, tmp_path / "other", seed=1)
    assert other["digests"]["dataset"] != manifest["digests"]["dataset"]
    assert other["counts"]["profile"]["pairs"] > 0 and check_dataset(tmp_path / "other").ok


def test_duplicates_across_sources_are_dropped(sources, tmp_path):
    manifest = build_dataset([sources[3], sources[3] + ",licence=CC0-1.0"], tmp_path / "dup")
    assert [s["label"] for s in manifest["sources"]] == ["jsonl", "jsonl#2"]
    assert manifest["sources"][1]["licence"] == "CC0-1.0" and "| jsonl#2 |" in (tmp_path / "dup/card.md").read_text()
    assert [s["records_kept"] for s in manifest["sources"]] == [14, 0]
    assert manifest["dropped"]["duplicate_records"] == 14


def test_card_and_manifest(built):
    out, manifest = built
    card = (out / "card.md").read_text()
    assert card.startswith("---\nlicense: cc-by-nc-4.0\n")  # BeaverTails-V's licence governs
    assert "Content warning" in card and "CC BY-NC 4.0" in card and "## Intended use" in card
    assert f"| beavertails-v | `{manifest['sources'][1]['spec']}` | 20 | 20 |" in card
    assert "| 01-Illegal_Activitiy | 3 | 0 | 3 |" in card
    assert manifest["format"] == "lmms-sgm-dataset" and manifest["options"]["seed"] == 0
    assert set(manifest["digests"]["files"]) == {"profile.jsonl"} | {f"eval/{s}/{k}.jsonl" for s in ("validation", "test")
                                                                    for k in ("harmful", "benign", "adv")}

    # The manifest's file digests are each file's sha256, recomputed here with hashlib in one read.
    for name, digest in manifest["digests"]["files"].items():
        assert digest == hashlib.sha256((out / name).read_bytes()).hexdigest(), name


def test_file_sha256_over_several_chunks(tmp_path):
    """The one file hash of build and check (1 MiB chunks): a file of 2.5 chunks, against hashlib in one read."""
    from lmms_sgm.datasets.digests import file_sha256

    data = bytes(range(256)) * (10 * 1024 + 7)  # 2.5 MiB and a bit: three chunks, the last partial
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert file_sha256(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


# ------------------------------------------------------------------ failures: named, non-zero, nothing left


def fails(argv, capsys, out: Path, *expected: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # progress lines may come first
    assert err.startswith("lmms-sgm dataset: error: "), err
    for e in expected:
        assert e in err, (e, err)
    assert not out.exists() or not any(out.iterdir()), "a failed build leaves nothing in --out"
    assert not list(out.parent.glob(f".{out.name}.*")), "nor a temporary folder beside it"
    return err


@pytest.fixture(params=[False, True], ids=["pil-default", "lmms-eval-loaded"])
def truncated_images_allowed(request, monkeypatch):
    """Importing lmms_eval.api.task turns PIL's LOAD_TRUNCATED_IMAGES on for the whole process;
    a truncated image must be refused either way."""
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", request.param)
    return request.param


def test_corrupt_image_is_named(tmp_path, capsys, truncated_images_allowed):
    root = mini.write_mm_safetybench(tmp_path / "mmsb", per_scenario=3)
    image = root / "data/imgs/02-HateSpeech/SD/2.jpg"
    data = image.read_bytes()
    image.write_bytes(data[: len(data) * 2 // 3])  # truncated: the header reads, the pixels do not
    fails(["dataset", "build", "--source", f"mm-safetybench:{root}", "--out", str(tmp_path / "out")], capsys, tmp_path / "out",
          f"{root / 'data/processed_questions/02-HateSpeech.json'}: entry '2': image {image} cannot be decoded")


def test_missing_image_is_named(tmp_path, capsys):
    root = mini.write_vlguard(tmp_path / "vlg", safe=2, unsafe=1)
    (root / "test/bad_ads/test-0001.png").unlink()
    fails(["dataset", "build", "--source", f"vlguard:{root}", "--out", str(tmp_path / "out")], capsys, tmp_path / "out",
          f"{root / 'test.json'}: entry 1 (id 'bad_ads_test_1'): image file {root / 'test/bad_ads/test-0001.png'} not found")


def test_malformed_entry_is_named(tmp_path, capsys):
    path = mini.write_ours(tmp_path / "ours", pairs=3, prompts=2)
    rows = path.read_text().splitlines()
    rows[2] = rows[2].replace('"label": 0', '"label": "maybe"')
    path.write_text("\n".join(rows) + "\n")
    (tmp_path / "out").mkdir()  # an existing empty --out is fine, and stays empty on failure
    fails(["dataset", "build", "--source", f"jsonl:{path}", "--out", str(tmp_path / "out")], capsys, tmp_path / "out",
          f"{path}:3: 'label' must be 1 (toxic) or 0 (non-toxic), got 'maybe'")


def test_a_group_too_large_to_place_is_refused(tmp_path, capsys):
    """A placeholder image shared by most records chains them into one group."""
    (tmp_path / "images").mkdir()
    mini.noise_image(1).save(tmp_path / "images/placeholder.png")
    rows = [{"id": f"r{i}", "image": "images/placeholder.png", "question": f"q {i}", "harmful": 1} for i in range(30)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fails(["dataset", "build", "--source", f"jsonl:{tmp_path / 'd.jsonl'}", "--out", str(tmp_path / "out")], capsys,
          tmp_path / "out", "30 of the 30 records share images or questions and form one group", "ids jsonl/r0, jsonl/r1",
          "(30 records)")


def test_out_is_protected(sources, built, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    argv = ["dataset", "build", "--source", sources[3], "--out", str(taken)]
    assert main(argv) == 2 and "exists and is not empty" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 2 and "not a dataset built by `lmms-sgm dataset build`" in capsys.readouterr().err
    assert (taken / "notes.txt").read_text() == "mine"
    # --overwrite replaces a dataset this command built.
    prev = fresh_copy(built, tmp_path)
    assert main(["dataset", "build", "--source", sources[3], "--out", str(prev), "--overwrite", "--seed", "4", "--quiet"]) == 0
    assert json.loads((prev / "manifest.json").read_text())["options"]["seed"] == 4
    assert not (prev / "eval/test/harmful.jsonl").read_text().count("mm-safetybench")
    assert not list(tmp_path.glob(".copy.*"))


def test_skip_bad_images(tmp_path):
    path = mini.write_ours(tmp_path / "ours", pairs=6, prompts=0)
    (tmp_path / "ours/images/pair_0002.png").write_bytes(b"not an image")
    manifest = build_dataset([f"jsonl:{path}"], tmp_path / "out", skip_bad_images=True)
    assert manifest["dropped"]["bad_images"] == 1 and "pair_0002.png cannot be decoded" in manifest["dropped"]["bad_image_messages"][0]
    assert manifest["counts"]["profile"]["pairs"] == 5


def test_cli_build_and_sources(sources, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["dataset", "build", "--source", sources[1], "--source", sources[2], "--out", str(out), "--seed", "2",
                 "--split", "3,1,1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote {out}: profile ") and f"MM_TOXIC_QA_DIR={out / 'eval' / 'test'}" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"].startswith(f"lmms-sgm dataset build --source {sources[1]} --source {sources[2]} --seed 2")
    assert main(["dataset", "sources"]) == 0
    listing = capsys.readouterr().out
    for kind in ("mm-safetybench", "beavertails-v", "vlguard", "jsonl", "csv", "model-outputs"):
        assert f"\n{kind}: " in "\n" + listing


# ------------------------------------------------------------------ check


def check(path: Path, capsys) -> tuple[int, str]:
    rc = main(["dataset", "check", str(path)])
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def test_check_passes_a_clean_build(built, capsys):
    rc, text = check(built[0], capsys)
    assert rc == 0 and text.rstrip().endswith("OK") and "warnings" not in text


def edit(path: Path, n: int, **changes) -> dict:
    rows = path.read_text().splitlines()
    row = json.loads(rows[n])
    row.update(changes)
    rows[n] = json.dumps(row)
    path.write_text("\n".join(rows) + "\n")
    return row


def test_check_catches_a_question_leaked_across_splits(built, tmp_path, capsys):
    ds = fresh_copy(built, tmp_path)
    profile = lines(ds / "profile.jsonl")
    row = edit(ds / "eval/test/harmful.jsonl", 1, question=profile[4]["question"].upper())  # same, differently written
    rc, text = check(ds, capsys)
    assert rc == 1
    assert (f"leak: question {normalise_question(profile[4]['question'])!r} is in 2 splits "
            f"(profile: profile.jsonl:5 (id {profile[4]['id']}); test: eval/test/harmful.jsonl:2 (id {row['id']}))") in text
    assert "eval/test/harmful.jsonl: changed since it was built" in text  # and the digest says so


def test_check_counts_a_question_on_exactly_the_manifest_s_template_min_images_as_a_template():
    """dataset check's leak rule uses the build's threshold, inclusive, over distinct images: one
    question on 8 images in two splits is a template at template_min=8 (no leak), on 7 it is a leak."""
    from lmms_sgm.datasets.check import CheckReport, _check_leaks, _Row

    rows = [_Row("profile" if k < 4 else "test", f"f.jsonl:{k + 1}", f"hash{k}", ("describe image",)) for k in range(8)]
    for n, template_min, leaks in ((8, 8, 0), (7, 8, 1), (7, 7, 0), (8, 9, 1)):
        report = CheckReport(Path("ds"))
        _check_leaks(rows[:n], {"options": {"template_min": template_min}}, report)
        assert len(report.errors) == leaks, (n, template_min, report.errors)
        assert all(e.startswith("leak: question 'describe image' is in 2 splits") for e in report.errors)


def test_check_catches_an_image_leaked_across_splits(built, tmp_path, capsys):
    ds = fresh_copy(built, tmp_path)
    n, victim = next((n, r) for n, r in enumerate(lines(ds / "eval/validation/harmful.jsonl"), 1) if r["image"].endswith(".png"))
    source = lines(ds / "profile.jsonl")[0]
    Image.open(ds / source["image"]).save(ds / "eval/validation" / victim["image"])  # same pixels, another PNG file
    rc, text = check(ds, capsys)
    assert rc == 1 and f"leak: image {image_hash(ds / source['image'])[:16]} is in 2 splits (profile: profile.jsonl:1" in text
    assert f"validation: eval/validation/harmful.jsonl:{n} (id {victim['id']})" in text


def test_check_names_bad_entries(built, tmp_path, capsys, truncated_images_allowed):
    ds = fresh_copy(built, tmp_path)
    harmful = lines(ds / "eval/test/harmful.jsonl")
    broken = ds / "eval/test" / harmful[0]["image"]
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) * 2 // 3])
    (ds / "eval/test" / harmful[1]["image"]).unlink()
    edit(ds / "profile.jsonl", 2, label=2)
    edit(ds / "eval/test/benign.jsonl", 0, question="")
    edit(ds / "eval/test/harmful.jsonl", 2, harmful=0)
    with open(ds / "eval/validation/harmful.jsonl", "a") as f:
        f.write('{"id": "oops", "image": \n')
    dup = (ds / "eval/validation/adv.jsonl").read_text().splitlines()[0]
    with open(ds / "eval/validation/adv.jsonl", "a") as f:
        f.write(dup + "\n")
    rc, text = check(ds, capsys)
    assert rc == 1
    n_val_harmful = len((ds / "eval/validation/harmful.jsonl").read_text().splitlines())
    n_adv = len((ds / "eval/validation/adv.jsonl").read_text().splitlines())
    for expected in [
        f"eval/test/harmful.jsonl:1 (id {harmful[0]['id']}): image {harmful[0]['image']} cannot be decoded as an image",
        f"eval/test/harmful.jsonl:2 (id {harmful[1]['id']}): image {harmful[1]['image']} not found",
        "profile.jsonl:3 (id ", "'label' must be 1 (toxic) or 0 (non-toxic), got 2",
        "eval/test/benign.jsonl:1 (id ", "'question' must be a non-empty string",
        f"eval/test/harmful.jsonl:3 (id {harmful[2]['id']}): 'harmful' is 0 but records of harmful.jsonl must have harmful=1",
        f"eval/validation/harmful.jsonl:{n_val_harmful}: not valid JSON",
        f"eval/validation/adv.jsonl:{n_adv} (id {json.loads(dup)['id']}): id repeats line 1",
        f"eval/validation/adv.jsonl:{n_adv} (id {json.loads(dup)['id']}): repeats line 1 (same image and question)",
    ]:
        assert expected in text, expected
    assert f"FAILED: {len(check_dataset(ds).errors)} error(s)" in text


def test_check_wants_both_classes_and_both_prompt_files(built, tmp_path, capsys):
    ds = fresh_copy(built, tmp_path)
    keep = [x for x in (ds / "profile.jsonl").read_text().splitlines() if json.loads(x)["label"] == 0]
    (ds / "profile.jsonl").write_text("\n".join(keep) + "\n")
    (ds / "eval/validation/benign.jsonl").unlink()
    rc, text = check(ds, capsys)
    assert rc == 1
    assert f"profile.jsonl: 0 toxic and {len(keep)} non-toxic pairs: profiling needs both classes" in text
    assert "eval/validation/benign.jsonl: missing" in text


def test_check_reads_a_plain_mm_toxic_qa_directory(capsys):
    """The tasks' own sample: one MM_TOXIC_QA_DIR, no manifest."""
    rc, text = check(tasks_core.SAMPLE_DIR, capsys)
    assert rc == 0 and "no manifest.json" in text and "harmful.jsonl: 12 records" in text


def test_check_json_report(built, tmp_path, capsys):
    assert main(["dataset", "check", str(built[0]), "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert (
        report["ok"]
        and report["errors"] == []
        and report["counts"]["profile.jsonl"]["records"] == built[1]["counts"]["profile"]["pairs"]
    )


def test_images_are_stored_once_by_content(built):
    out, _ = built
    files = [p for p in out.rglob("images/*/*") if p.is_file()]
    hashes = Counter(hashlib.sha256(p.read_bytes()).hexdigest() for p in files)
    assert max(hashes.values()) == 1
    assert all(p.name.startswith(image_hash(p)[:16]) and p.parent.name == p.name[:2] for p in files[:20])
