"""Bad input files and options, as a new user gives them: one line ``lmms-sgm <command>: error: ...``
naming the file (and line), exit 2, nothing written, and no model loaded first (issue 22).

The model loader is replaced by one that raises: a test that sees "MODEL LOADED" found a check
that runs after the load."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmms_sgm import models, tiny
from lmms_sgm.cli import main

DEMO = Path(__file__).resolve().parents[1] / "lmms_sgm" / "demo"


@pytest.fixture
def no_model(monkeypatch):
    """models.load raises: whatever a command refuses, it must refuse before loading a model."""
    def load(*args, **kwargs):
        raise RuntimeError("MODEL LOADED")

    monkeypatch.setattr(models, "load", load)


def run(capsys, *argv) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return rc, err


def one_error(rc: int, err: str, command: str) -> str:
    """The single error line of a refused command (exit 2), without its prefix."""
    lines = [x for x in err.splitlines() if x.strip() and ": warning: " not in x]
    assert rc == 2, err
    assert len(lines) == 1, err
    prefix = f"lmms-sgm {command}: error: "
    assert lines[0].startswith(prefix), err
    assert "MODEL LOADED" not in err and "unexpected" not in err
    return lines[0][len(prefix):]


def toy_rows(n=6) -> list[dict]:
    return [{"text": f"answer {i}", "label": i % 2, "question": f"question {i}?"} for i in range(n)]


def jsonl_bytes(rows) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


# ------------------------------------------------------------------ the files a command reads

BAD_FILES = {
    # name: (file name, bytes, what the message must hold after the path)
    "jsonl-not-utf8": ("pairs.jsonl", jsonl_bytes(toy_rows(2)) + b'{"text": "caf\xe9", "label": 0}\n' + jsonl_bytes(toy_rows(2)),
                       ":3: not UTF-8 text (byte 0xe9 at column 14)"),
    "jsonl-bad-json": ("pairs.jsonl", jsonl_bytes(toy_rows(3)) + b'{"text": "x", label: 0}\n', ":4: not valid JSON"),
    "jsonl-not-a-record": ("pairs.jsonl", jsonl_bytes(toy_rows(1)) + b'[1, 2]\n', ":2: expected a JSON object"),
    "csv-not-utf8": ("pairs.csv", b"text,label\na,1\nb,0\n\xffc,1\n", ":4: not UTF-8 text (byte 0xff at column 1)"),
    "csv-extra-field": ("pairs.csv", b"text,label\na,1\nb,0,extra\n",
                        ": not a readable CSV file (Error tokenizing data. C error: Expected 2 fields in line 3, saw 3)"),
    "json-truncated": ("pairs.json", b'[{"text": "a", "label": 1},\n {"text": "b"', ":2: not valid JSON"),
    "json-not-utf8": ("pairs.json", b'[{"text": "a", "label": 1},\n {"text": "\xc3(", "label": 0}]', ":2: not UTF-8 text"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_profiling_data_names_the_file_and_line(case, tmp_path, capsys):
    """text-pairs and profile read the same loader (load_pairs): every bad file names itself."""
    name, raw, expected = BAD_FILES[case]
    data = tmp_path / name
    data.write_bytes(raw)
    out = tmp_path / "out.jsonl"
    message = one_error(*run(capsys, "text-pairs", data, out), "text-pairs")
    assert message.startswith(f"{data}{expected}"), message
    assert not out.exists()


def test_profile_and_steer_name_a_non_utf8_data_file_before_loading(tmp_path, capsys, no_model):
    data = tmp_path / "pairs.jsonl"
    data.write_bytes(jsonl_bytes(toy_rows(4)) + b'{"text": "\xff", "label": 1}\n')
    message = one_error(*run(capsys, "profile", "--model", "m", "--data", data, "--out", tmp_path / "g"), "profile")
    assert message.startswith(f"{data}:5: not UTF-8 text")
    good = tmp_path / "good.jsonl"
    good.write_bytes(jsonl_bytes(toy_rows(4)))
    message = one_error(*run(capsys, "steer", "--model", "m", "--data", good, "--gate-data", data, "--out", tmp_path / "g"),
                        "steer")
    assert message.startswith(f"{data}:5: not UTF-8 text")
    assert not (tmp_path / "g").exists()


def test_a_fifo_given_as_data_is_named_and_not_read(tmp_path):
    """Reading a FIFO with no writer blocks for ever: refused as not a regular file (subprocess with
    a timeout, so that a hang fails the test instead of the run)."""
    fifo = tmp_path / "pairs.jsonl"
    os.mkfifo(fifo)
    proc = subprocess.run([sys.executable, "-m", "lmms_sgm.cli", "text-pairs", str(fifo), str(tmp_path / "o.jsonl")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (f"lmms-sgm text-pairs: error: {fifo} is a FIFO (named pipe), not a regular file: "
                                   "give the profiling data")


def _val(tmp_path) -> Path:
    return tiny.write_toy_validation(tmp_path / "val", 2)


def test_tune_names_its_bad_files_before_loading(tmp_path, capsys, no_model):
    """tune reads --data, --grid, the --val split and --self-label prompts: each bad one named by
    file and line, before the model loads (the prompts were read only after it)."""
    pairs = tiny.write_toy_pairs(tmp_path / "pairs", 6)
    val = _val(tmp_path)
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps([{"name": "paper", "data": "toy"}]))
    base = ["tune", "--model", "m", "--data", f"toy={pairs}", "--val", val, "--samples", "1", "--no-progress"]

    bad_grid = tmp_path / "bad_grid.json"
    bad_grid.write_text('[{"name": "paper",\n "data": toy}]')
    message = one_error(*run(capsys, *base, "--grid", bad_grid, "--out", tmp_path / "o"), "tune")
    assert message.startswith(f"{bad_grid}:2: not valid JSON")

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(b'{"image": "a.png", "question": "\xe9?"}\n')
    message = one_error(*run(capsys, *base, "--grid", grid, "--self-label", prompts, "--out", tmp_path / "o"), "tune")
    assert message.startswith(f"{prompts}:1: not UTF-8 text")

    broken = tmp_path / "val2"
    shutil.copytree(val, broken)
    lines = (broken / "benign.jsonl").read_bytes().splitlines(keepends=True)
    (broken / "benign.jsonl").write_bytes(lines[0] + b'{"image": "x.png", "question": "\xff"}\n')
    argv = [a if a is not val else broken for a in base]
    message = one_error(*run(capsys, *argv, "--grid", grid, "--out", tmp_path / "o"), "tune")
    assert message.startswith(f"{broken / 'benign.jsonl'}:2: not UTF-8 text")
    assert not (tmp_path / "o").exists()


def _tsv(path: Path, header: str, *rows: str) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def test_tune_val_mc_without_mmbench_columns_is_one_line_not_a_key_error(tmp_path, capsys, no_model):
    """--val-mc with a TSV lacking MMBench's columns ended in an "unexpected" KeyError: 'image'."""
    pairs = tiny.write_toy_pairs(tmp_path / "pairs", 6)
    val = _val(tmp_path)
    good = (val / "mmbench.tsv").read_text(encoding="utf-8").splitlines()
    header, row = good[0].split("\t"), good[1].split("\t")
    base = ["tune", "--model", "m", "--data", f"toy={pairs}", "--val", val, "--out", tmp_path / "o", "--no-progress"]

    tsv = _tsv(tmp_path / "mc.tsv", "index\tquestion\tanswer", "0\twhat colour?\tA")
    message = one_error(*run(capsys, *base, "--val-mc", tsv), "tune")
    assert message == (f"{tsv}: not an MMBench-format TSV: no column(s) A, B, image "
                       "(it needs question, A, B, answer, image; C and D optional)")

    bad_image = dict(zip(header, row), image="not base64!")
    tsv = _tsv(tmp_path / "mc2.tsv", "\t".join(header), "\t".join(row), "\t".join(bad_image[h] for h in header))
    message = one_error(*run(capsys, *base, "--val-mc", tsv), "tune")
    assert message == f"{tsv}:3: the image column is not a base64-encoded image (Error)"

    bad_answer = dict(zip(header, row), answer="D")
    tsv = _tsv(tmp_path / "mc3.tsv", "\t".join(header), "\t".join(bad_answer[h] for h in header))
    message = one_error(*run(capsys, *base, "--val-mc", tsv), "tune")
    assert message.startswith(f"{tsv}:2: answer 'D' is not one of the row's options A, B")
    assert not (tmp_path / "o").exists()


def test_tune_val_mc_rows_are_the_tsv_s_with_their_images(tmp_path):
    """The reader that replaced csv.DictReader keeps every row, its fields and its decoded image."""
    import base64

    from PIL import Image

    from lmms_sgm.evaluate import ValidationSet

    val = _val(tmp_path)
    lines = (val / "mmbench.tsv").read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    loaded = ValidationSet.load(val)
    assert len(loaded.mc) == len(lines) - 1 >= 2
    for line, row in zip(lines[1:], loaded.mc):
        want = dict(zip(header, line.split("\t")))
        assert {k: row[k] for k in header} == want
        with Image.open(io.BytesIO(base64.b64decode(want["image"]))) as im:
            assert row["_image"].tobytes() == im.convert("RGB").tobytes()
    assert len(ValidationSet.load(val, limit=1).mc) == 1


def test_diagnose_and_self_label_name_their_bad_files_before_loading(tmp_path, capsys, no_model):
    twins = tmp_path / "twins.jsonl"
    twins.write_bytes(b'{"image": "a.png", "question": "q", "twin_question": "r"}\n{"image": "a.png", "question": "\xe9"}\n')
    message = one_error(*run(capsys, "diagnose", "--model", "m", "--data", twins, "--out", tmp_path / "d"), "diagnose")
    assert message.startswith(f"{twins}:2: not UTF-8 text")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(b'{"image": "a.png", "question": "q"}\n\n{"image": "a.png" "question": "q"}\n')
    message = one_error(*run(capsys, "self-label", "--model", "m", "--prompts", prompts, "--out", tmp_path / "s"),
                        "self-label")
    assert message.startswith(f"{prompts}:3: not valid JSON")
    words = tmp_path / "words.txt"
    words.write_bytes(b"bad\n\xffworse\n")
    message = one_error(*run(capsys, "self-label", "--model", "m", "--prompts", prompts, "--judge", "lexicon",
                             "--judge-args", f"lexicon={words}", "--out", tmp_path / "s"), "self-label")
    assert message.startswith(f"{words}:2: not UTF-8 text")
    assert not (tmp_path / "d").exists() and not (tmp_path / "s").exists()


def test_report_names_a_results_file_that_is_not_utf8_or_not_json(tmp_path, capsys):
    results = tmp_path / "run" / "2026_results.json"
    results.parent.mkdir()
    results.write_bytes(b'{"results": {"mm_toxic_qa": {"harmful_rate,none": 0.5}},\n "config": "\xe9"}\n')
    message = one_error(*run(capsys, "report", results, "--out", tmp_path / "r"), "report")
    assert message.startswith(f"{results}:2: not UTF-8 text")
    results.write_text('{"results": {"mm_toxic_qa": \n\n {"harmful_rate,none": 0.5}', encoding="utf-8")
    message = one_error(*run(capsys, "report", results, "--out", tmp_path / "r"), "report")
    assert message.startswith(f"{results}:3: not valid JSON")
    assert not (tmp_path / "r").exists()


def test_dataset_build_names_a_non_utf8_source_line(tmp_path, capsys):
    from lmms_sgm.datasets import miniature as mini

    records = mini.write_ours(tmp_path / "ours", pairs=4, prompts=2)
    lines = records.read_bytes().splitlines(keepends=True)
    records.write_bytes(b"".join(lines[:2]) + lines[2].replace(b"nice", b"n\xefce") + b"".join(lines[3:]))
    message = one_error(*run(capsys, "dataset", "build", "--source", f"jsonl:{records}", "--out", tmp_path / "ds", "--quiet"),
                        "dataset")
    assert message.startswith(f"{records}:3: not UTF-8 text (byte 0xef")
    assert not (tmp_path / "ds").exists()


# ------------------------------------------------------------------ dataset check lists the line


def test_dataset_check_lists_a_non_utf8_line_and_checks_the_others(tmp_path, capsys):
    """One bad byte was an abort (UnicodeDecodeError, exit 2); it is now one problem among the
    others, and the lines after it are still checked."""
    ds = tmp_path / "ds"
    ds.mkdir()
    pairs = tiny.write_toy_pairs(tmp_path / "toy", 6)
    shutil.copytree(pairs.parent / "images", ds / "images")
    lines = pairs.read_bytes().splitlines(keepends=True)
    bad_label = json.loads(lines[5])
    bad_label["label"] = 7
    (ds / "profile.jsonl").write_bytes(b"".join(lines[:3]) + lines[3].replace(b'"text": "', b'"text": "\xe9') +
                                       lines[4] + json.dumps(bad_label).encode() + b"\n")
    rc = main(["dataset", "check", str(ds)])
    out = capsys.readouterr()
    text = out.out + out.err
    assert rc == 1, text
    assert "profile.jsonl:4: not UTF-8 text (byte 0xe9" in text
    assert "profile.jsonl:6: 'label' must be 1 (toxic) or 0 (non-toxic), got 7" in text
    assert "FAILED: 2 error(s)" in text
    assert "profile.jsonl: 5 records" in text  # the bad line is not a record; the 5 others are


# ------------------------------------------------------------------ checks before the model loads


def test_profile_refuses_an_out_under_a_file_before_loading(tmp_path, capsys, no_model):
    pairs = tiny.write_toy_pairs(tmp_path / "pairs", 6)
    blocker = tmp_path / "a_file"
    blocker.write_text("mine\n")
    for command in ("profile", "steer"):
        argv = [command, "--model", "m", "--data", pairs, "--out", blocker / "glasses"]
        if command == "steer":
            argv += ["--gated", "false"]
        message = one_error(*run(capsys, *argv), command)
        assert message == f"--out {blocker / 'glasses'}: {blocker} is a file, not a directory; choose another output path"
    assert blocker.read_text() == "mine\n"


def test_profile_checks_layers_against_a_local_model_before_loading(tiny_dir, tmp_path, capsys, no_model):
    """The tiny model has 2 decoder layers: --layers 1-3 is refused from its config.json."""
    pairs = tiny.write_toy_pairs(tmp_path / "pairs", 6)
    n = json.loads((tiny_dir / "config.json").read_text())["text_config"]["num_hidden_layers"]
    assert n == 2
    message = one_error(*run(capsys, "profile", "--model", tiny_dir, "--data", pairs, "--out", tmp_path / "g",
                             "--layers", "1-3"), "profile")
    assert message == "layers [2, 3] do not exist: the model has 2 decoder layers (0-1)"
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("case", ["missing-data", "unknown-judge", "steer-no-gate", "profile-bad-layers-spec",
                                  "diagnose-missing-glasses", "tune-unknown-set"])
def test_option_errors_come_before_the_model_load(case, tmp_path, capsys, no_model):
    """Guards of the order that already held (these passed before issue 22 too)."""
    pairs = tiny.write_toy_pairs(tmp_path / "pairs", 6)
    twins = tmp_path / "twins.jsonl"
    twins.write_text(json.dumps({"image": "images/00000.png", "question": "q", "twin_question": "r"}) + "\n")
    shutil.copytree(pairs.parent / "images", tmp_path / "images")
    out = tmp_path / "out"
    argv, command = {
        "missing-data": (["profile", "--model", "m", "--data", tmp_path / "none.jsonl", "--out", out], "profile"),
        "unknown-judge": (["self-label", "--model", "m", "--prompts", pairs, "--judge", "nosuchjudge", "--out", out],
                          "self-label"),
        "steer-no-gate": (["steer", "--model", "m", "--data", pairs, "--out", out], "steer"),
        "profile-bad-layers-spec": (["profile", "--model", "m", "--data", pairs, "--out", out, "--layers", "x-y"], "profile"),
        "diagnose-missing-glasses": (["diagnose", "--model", "m", "--data", twins, "--glasses", tmp_path / "nog",
                                      "--out", out], "diagnose"),
        "tune-unknown-set": (["tune", "--model", "m", "--data", f"toy={pairs}", "--val", _val(tmp_path), "--grid",
                              _grid(tmp_path), "--out", out], "tune"),
    }[case]
    one_error(*run(capsys, *argv), command)
    assert not out.exists()


def _grid(tmp_path) -> Path:
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps([{"name": "x", "data": "elsewhere"}]))
    return grid


# ------------------------------------------------------------------ glasses


def _edit_manifest(src: Path, dst: Path, edit) -> Path:
    from lmms_sgm.interventions import base as glasses_mod

    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    edit(m)
    m["content_digest"] = glasses_mod.content_digest(m)  # digests recomputed: the edit hides from them
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


@pytest.fixture(scope="module")
def demo_model():
    return models.load(str(DEMO / "model"))


@pytest.mark.parametrize("path", ["model.language_model.layers.0.mlp.nothing", "model.language_model.layers.99.mlp.down_proj",
                                  "model.language_model.layers.0.mlp.down_proj.weight", "lm_head.__class__"])
def test_sgm_glasses_naming_a_module_outside_the_model_are_refused_in_one_line(path, demo_model, tmp_path):
    from lmms_sgm.interventions import GlassesMismatch, SafetyGlasses

    def edit(m):
        m["sites"][0]["module_path"] = path

    glasses = SafetyGlasses.load(_edit_manifest(DEMO / "glasses" / "paper_default", tmp_path / "g", edit))
    model, _ = demo_model
    for mode in ("hooks", "fold", "nnsight"):
        with pytest.raises(GlassesMismatch) as e:
            glasses.apply(model, mode=mode)
        assert str(e.value) == (f"the glasses name module_path {path!r} (site {glasses.sites[0].name!r}), which is not a "
                                f"module of the model (LlavaForConditionalGeneration {DEMO / 'model'}); the manifest was "
                                "edited or belongs to another model: re-create the glasses")
    assert not model._forward_hooks and all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_steering_glasses_naming_a_module_outside_the_model_are_refused_in_one_line(demo_model, tmp_path):
    from lmms_sgm.interventions import Glasses, GlassesMismatch

    def edit(m):
        m["sites"]["steer"]["module_path"] = "model.language_model.nowhere.3"

    glasses = Glasses.load(_edit_manifest(DEMO / "glasses" / "gated_steering", tmp_path / "g", edit))
    with pytest.raises(GlassesMismatch, match=r"^the glasses name module_path 'model.language_model.nowhere.3' \(site "):
        glasses.apply(demo_model[0])


def _glasses_copy(tmp_path) -> Path:
    g = tmp_path / "g"
    shutil.copytree(DEMO / "glasses" / "paper_default", g)
    return g


def _inspect(path) -> subprocess.CompletedProcess:
    """In a subprocess with a timeout: reading /dev/zero or a FIFO would hang (or fill memory)."""
    return subprocess.run([sys.executable, "-m", "lmms_sgm.cli", "inspect", str(path)], capture_output=True, text=True, check=False,
                          timeout=60)


@pytest.mark.parametrize("name, what", [("manifest.json", "dev-zero"), ("glasses.safetensors", "dev-zero"),
                                        ("manifest.json", "directory"), ("glasses.safetensors", "fifo")])
def test_a_glasses_file_that_is_not_a_regular_file_is_named_as_such(name, what, tmp_path):
    g = _glasses_copy(tmp_path)
    (g / name).unlink()
    if what == "dev-zero":
        (g / name).symlink_to("/dev/zero")
        kind = "a character device"
    elif what == "directory":
        (g / name).mkdir()
        kind = "a directory"
    else:
        os.mkfifo(g / name)
        kind = "a FIFO (named pipe)"
    proc = _inspect(g)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"lmms-sgm inspect: error: {g / name} is {kind}, not a regular file: not glasses; re-create the glasses"


def test_dev_zero_as_the_glasses_directory_is_named_as_a_device(tmp_path):
    proc = _inspect("/dev/zero")
    assert proc.returncode == 2 and "missing" not in proc.stderr
    assert proc.stderr.strip().startswith("lmms-sgm inspect: error: /dev/zero is not a glasses directory (it is a "
                                          "character device;")


def test_a_huge_tensors_file_is_refused_by_its_size_without_reading_it(tmp_path, monkeypatch):
    from lmms_sgm.interventions import GlassesError, SafetyGlasses

    g = _glasses_copy(tmp_path)
    recorded = json.loads((g / "manifest.json").read_text())["tensors_bytes"]
    with open(g / "glasses.safetensors", "r+b") as f:
        f.truncate(8 << 30)  # sparse: 8 GiB that take no disk
    read = []
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: read.append(self) or real(self))
    with pytest.raises(GlassesError) as e:
        SafetyGlasses.load(g)
    assert str(e.value) == (f"{g / 'glasses.safetensors'}: {8 << 30} bytes, but manifest.json records {recorded} "
                            "(truncated or damaged); re-create the glasses")
    assert g / "glasses.safetensors" not in read


# ------------------------------------------------------------------ a one-class dataset build


@pytest.mark.parametrize("keep", [0, 1])
def test_a_one_class_build_is_a_user_error_saying_what_is_missing(keep, tmp_path, capsys):
    from lmms_sgm.datasets import miniature as mini

    records = mini.write_ours(tmp_path / "ours", pairs=8, prompts=4)
    rows = [json.loads(x) for x in records.read_text().splitlines()]
    rows = [r for r in rows if r.get("label") in (None, keep)]
    assert sum("label" in r for r in rows) == 4
    records.write_text("".join(json.dumps(r) + "\n" for r in rows))
    message = one_error(*run(capsys, "dataset", "build", "--source", f"jsonl:{records}", "--out", tmp_path / "ds", "--quiet"),
                        "dataset")
    missing = "toxic (label 1)" if keep == 0 else "non-toxic (label 0)"
    counts = "0 toxic and 4 non-toxic" if keep == 0 else "4 toxic and 0 non-toxic"
    assert message == (f"the sources (jsonl:{records}) give {counts} profiling pairs: profiling (AUROC) needs both "
                       f"classes; add a source with {missing} texts")
    assert "bug" not in message
    assert not (tmp_path / "ds").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".ds")]


def test_a_build_of_prompts_alone_still_needs_no_pairs(tmp_path):
    """An evaluation-only dataset (no pairs at all) is not a one-class dataset."""
    from lmms_sgm.datasets import build_dataset
    from lmms_sgm.datasets import miniature as mini

    records = mini.write_ours(tmp_path / "ours", pairs=0, prompts=6)
    manifest = build_dataset([f"jsonl:{records}"], tmp_path / "ds")
    assert manifest["counts"]["profile"]["pairs"] == 0


# ------------------------------------------------------------------ a full disk


@pytest.fixture
def full_disk(monkeypatch):
    """Every file opened for writing under ``folder`` writes to /dev/full (ENOSPC), named as the
    file asked for: a disk that is full where the output goes."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    import builtins

    real_open = builtins.open
    folders = []

    def fake_open(file, mode="r", *args, **kwargs):
        writing = any(c in mode for c in "wax+")
        if writing and isinstance(file, (str, os.PathLike)) and any(
                Path(os.path.abspath(file)).is_relative_to(d) for d in folders):
            f = real_open("/dev/full", mode.replace("x", "w"), *args, **kwargs)
            (f.buffer.raw if hasattr(f, "buffer") else getattr(f, "raw", f)).name = os.fspath(file)
            return f
        return real_open(file, mode, *args, **kwargs)

    real_os_open = os.open

    def fake_os_open(file, flags, *args, **kwargs):  # a writer on a bare descriptor (an atomic write)
        if flags & (os.O_WRONLY | os.O_RDWR) and any(Path(os.path.abspath(file)).is_relative_to(d) for d in folders):
            return real_os_open("/dev/full", os.O_WRONLY)
        return real_os_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    return folders


def test_a_full_disk_names_the_file_being_written(tmp_path, capsys, full_disk):
    pairs = tiny.write_toy_pairs(tmp_path / "pairs", 6)
    full_disk.append(tmp_path / "full")
    out = tmp_path / "full" / "text.jsonl"
    message = one_error(*run(capsys, "text-pairs", pairs, out), "text-pairs")
    assert message.startswith("No space left on device: ") and message.endswith(" (free some space and run again)")
    named = Path(message[len("No space left on device: "):-len(" (free some space and run again)")])
    assert named.parent == out.parent  # the file itself, or a temporary sibling of it


def test_an_os_error_that_names_its_file_is_left_as_it_is(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "pairs.jsonl"
    message = one_error(*run(capsys, "text-pairs", missing, tmp_path / "o.jsonl"), "text-pairs")
    assert message == f"profiling data {missing} does not exist"


def test_a_disk_full_error_is_not_blamed_on_a_file_being_read(tmp_path):
    """Only a file open for writing is named for ENOSPC: a file the caller is reading is not it."""
    import errno

    from lmms_sgm.cli import _error_line

    src = tmp_path / "in.txt"
    src.write_text("x")

    def copy():
        with open(src) as f:  # noqa: F841 -- in a frame of the traceback, open for reading
            raise OSError(errno.ENOSPC, "No space left on device")

    def write_full():
        with open("/dev/full", "w") as f:
            f.write("y" * 10)

    def named_by_the_writer():  # an atomic writer that names its target itself
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out.jsonl"))

    for fn, want in ((copy, "[Errno 28] No space left on device"),
                     (write_full, "No space left on device: /dev/full (free some space and run again)"),
                     (named_by_the_writer, f"No space left on device: {tmp_path / 'out.jsonl'} (free some space and run again)")):
        try:
            fn()
        except OSError as e:
            assert _error_line(e) == want
        else:
            raise AssertionError("no OSError")


@pytest.mark.parametrize("flag, value", [("--layer", "2"), ("--layer", "-3"), ("--gate-layer", "5")])
def test_steer_checks_its_layers_against_a_local_model_before_loading(flag, value, tiny_dir, tmp_path, capsys, no_model):
    pairs = tiny.write_toy_pairs(tmp_path / "pairs", 6)
    message = one_error(*run(capsys, "steer", "--model", tiny_dir, "--data", pairs, "--gate-data", pairs,
                             "--out", tmp_path / "g", flag, value), "steer")
    assert message == f"{flag} {value}: the model has 2 decoder layers (0 to 1, or -1 to -2 from the end)"


def test_steer_layers_inside_the_model_reach_the_load(tiny_dir, tmp_path, capsys, no_model):
    """-2 and 1 exist on the 2-layer model: the check lets them through (the stand-in loader raises)."""
    pairs = tiny.write_toy_pairs(tmp_path / "pairs", 6)
    rc = main(["steer", "--model", str(tiny_dir), "--data", str(pairs), "--gate-data", str(pairs), "--out",
               str(tmp_path / "g"), "--layer", "-2", "--gate-layer", "1"])
    assert rc == 1 and "MODEL LOADED" in capsys.readouterr().err


def test_val_mc_reads_an_image_field_larger_than_the_csv_default_limit(tmp_path):
    """A 336 px MMBench image is ~200 KB of base64, over csv's default 131,072-character field
    limit (that read was an "unexpected" csv.Error)."""
    import base64

    import numpy as np
    from PIL import Image

    from lmms_sgm.evaluate import ValidationSet

    val = _val(tmp_path)
    rng = np.random.default_rng(3)
    big = Image.fromarray(rng.integers(0, 256, (336, 336, 3), dtype=np.uint8))
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    field = base64.b64encode(buf.getvalue()).decode()
    assert len(field) > 131_072
    _tsv(val / "mmbench.tsv", "index\tquestion\tA\tB\tanswer\timage", f"0\twhich?\tred\tblue\tB\t{field}")
    (row,) = ValidationSet.load(val).mc
    assert row["answer"] == "B" and row["_image"].tobytes() == big.tobytes()
