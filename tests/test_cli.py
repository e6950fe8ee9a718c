"""The lmms-sgm CLI: profile -> inspect -> select, flags from the option dataclasses, clean errors."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from lmms_sgm.cli import main
from lmms_sgm.interventions import SafetyGlasses
from lmms_sgm.options import ProfileOptions, SelectionOptions
from lmms_sgm.pipeline import build_glasses


def test_profile_then_inspect(tiny_dir, toy_jsonl, tmp_path, capsys, model_and_processor):
    out = tmp_path / "g"
    rc = main(["profile", "--model", str(tiny_dir), "--data", str(toy_jsonl), "--out", str(out),
               "--modules", "up_proj,intermediate", "--layers", "1", "--pooling", "max",
               "--positions", "text", "--batch-size", "3", "--threshold", "0.6", "--no-progress"])
    assert rc == 0
    g = SafetyGlasses.load(out)
    assert [s.name for s in g.sites] == [
        "model.language_model.layers.1.mlp.up_proj",
        "model.language_model.layers.1.mlp.down_proj.input",
    ]
    assert g.manifest["profile_options"]["pooling"] == "max"
    assert g.manifest["selection_options"]["threshold"] == 0.6
    # The CLI computes what the Python API computes with the same options.
    model, processor = model_and_processor
    api = build_glasses(model, processor, toy_jsonl,
                        ProfileOptions(modules=("up_proj", "intermediate"), layers="1", pooling="max",
                                       positions="text", batch_size=3),
                        SelectionOptions(threshold=0.6), progress=False)
    for s in g.sites:
        assert torch.equal(g.auroc[s.name], api.auroc[s.name])
        assert torch.equal(g.alpha[s.name], api.alpha[s.name])

    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "experts:" in text and "layers.1" not in text  # a table by layer/module, not raw paths
    assert f"experts: {g.counts()['experts']} of {g.counts()['neurons']} neurons" in text
    assert "AUROC histogram" in text and '"threshold": 0.6' in text


def test_select_reuses_expertise(tiny_dir, toy_jsonl, tmp_path):
    src, dst = tmp_path / "g", tmp_path / "det0"
    assert main(["profile", "--model", str(tiny_dir), "--data", str(toy_jsonl), "--out", str(src), "--no-progress"]) == 0
    assert main(["select", str(src), "--out", str(dst), "--rule", "det0", "--top-k", "7"]) == 0
    a, b = SafetyGlasses.load(src), SafetyGlasses.load(dst)
    assert all(torch.equal(a.auroc[n], b.auroc[n]) for n in a.auroc)
    assert b.counts()["experts"] == 7
    assert sum(int((b.alpha[n] == 0).sum()) for n in b.alpha) == 7


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--pooling", "median"], "unknown pooling 'median'"),
        (["--modules", "q_proj"], "unknown modules 'q_proj'"),
        (["--layers", "5"], r"layers \[5\] do not exist"),
        (["--rule", "det0"], "needs top_k"),
    ],
)
def test_bad_options_exit_2_and_write_nothing(tiny_dir, toy_jsonl, tmp_path, capsys, extra, message):
    out = tmp_path / "g"
    rc = main(["profile", "--model", str(tiny_dir), "--data", str(toy_jsonl), "--out", str(out), "--no-progress", *extra])
    assert rc == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists() and os.listdir(tmp_path) == []


def test_bad_data_fails_before_loading_the_model(toy_jsonl, tmp_path, capsys):
    rows = [json.loads(line) for line in toy_jsonl.read_text().splitlines()]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(dict(r, label=0, image=str(toy_jsonl.parent / r["image"]))) + "\n" for r in rows))
    # The model path does not exist: the data error must come first.
    rc = main(["profile", "--model", str(tmp_path / "nope"), "--data", str(bad), "--out", str(tmp_path / "g")])
    assert rc == 2
    assert "both classes" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


def test_existing_output_is_refused(tiny_dir, toy_jsonl, tmp_path, capsys):
    out = tmp_path / "g"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = main(["profile", "--model", str(tiny_dir), "--data", str(toy_jsonl), "--out", str(out), "--no-progress"])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_console_script_is_installed():
    exe = os.path.join(os.path.dirname(sys.executable), "lmms-sgm")
    res = subprocess.run([exe, "inspect", "/nonexistent"], capture_output=True, text=True, check=False)
    assert res.returncode == 2
    assert "not a glasses directory" in res.stderr


# ---------------------------------------------------------------- errors: one line, exit 2, nothing lost

LMMS_SGM = os.path.join(os.path.dirname(sys.executable), "lmms-sgm")


def one_error_line(err: str, command: str = "profile") -> str:
    """The whole of stderr is one line ``lmms-sgm <command>: error: ...``; returns it."""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"lmms-sgm {command}: error: "), err
    return lines[0]


def snapshot(root):
    """Every file under ``root`` with its bytes (and every directory): what must survive an error."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _pairs_with(toy_jsonl, directory, image_bytes=None, n=None):
    """A copy of the toy pairs in ``directory``, record 3's image replaced by ``image_bytes``."""
    rows = [json.loads(line) for line in toy_jsonl.read_text().splitlines()][:n]
    (directory / "images").mkdir(parents=True)
    for r in rows:
        (directory / r["image"]).write_bytes((toy_jsonl.parent / r["image"]).read_bytes())
    if image_bytes is not None:
        (directory / rows[3]["image"]).write_bytes(image_bytes)
    path = directory / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, directory / rows[3]["image"]


@pytest.mark.parametrize("content", [b"not an image at all", "truncated"], ids=["text-file", "truncated-png"])
def test_unreadable_image_is_one_line_before_the_model_loads(toy_jsonl, tmp_path, capsys, content):
    data = tmp_path / "data"
    png = (toy_jsonl.parent / "images" / "00003.png").read_bytes()
    path, image = _pairs_with(toy_jsonl, data, png[: len(png) // 2] if content == "truncated" else content)
    before = snapshot(tmp_path)
    # The model path does not exist: the image error must come first.
    rc = main(["profile", "--model", str(tmp_path / "no-model"), "--data", str(path), "--out", str(tmp_path / "g")])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and f"{path}: record 3: image {image} is not a readable image" in line
    assert snapshot(tmp_path) == before


def test_out_naming_a_file_is_one_line(tiny_dir, toy_jsonl, tmp_path, capsys):
    out = tmp_path / "results.txt"
    out.write_text("mine")
    for overwrite in ([], ["--overwrite"]):
        rc = main(["profile", "--model", str(tiny_dir), "--data", str(toy_jsonl), "--out", str(out), *overwrite])
        line = one_error_line(capsys.readouterr().err)
        assert rc == 2 and f"{out} is a file, not a glasses directory" in line
    assert os.listdir(tmp_path) == ["results.txt"] and out.read_text() == "mine"


def _results_folder(tmp_path, toy_jsonl, glasses):
    out = tmp_path / "results"
    out.mkdir()
    (out / "results.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    return out, r"results is not a glasses directory \(.*results/manifest.json is missing"


def _data_folder(tmp_path, toy_jsonl, glasses):
    path, _ = _pairs_with(toy_jsonl, tmp_path / "data")
    return path.parent, r"data holds the profiling data .*data/pairs.jsonl"


def _data_parent(tmp_path, toy_jsonl, glasses):
    _pairs_with(toy_jsonl, tmp_path / "data")
    return tmp_path, r"holds the profiling data .*data/pairs.jsonl"


def _glasses_and_more(tmp_path, toy_jsonl, glasses):
    g = tmp_path / "g"
    assert main(["select", str(glasses), "--out", str(g)]) == 0
    (g / "plot.png").write_bytes(tiny_png())
    return g, r"g holds glasses and other files \(plot.png\)"


def tiny_png() -> bytes:
    import io

    from lmms_sgm.tiny import random_image

    buf = io.BytesIO()
    random_image(0, 8).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shared_glasses(tiny_dir, toy_jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("glasses") / "g"
    assert main(["profile", "--model", str(tiny_dir), "--data", str(toy_jsonl), "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.mark.parametrize("make", [_results_folder, _data_folder, _data_parent, _glasses_and_more],
                         ids=["results-folder", "data-folder", "data-parent", "glasses-and-more"])
@pytest.mark.parametrize("command", ["profile", "select"])
def test_overwrite_refuses_what_is_not_only_glasses(tiny_dir, toy_jsonl, tmp_path, capsys, shared_glasses, make, command):
    root = tmp_path / "work"
    root.mkdir()
    out, message = make(root, toy_jsonl, shared_glasses)
    data = root / "data" / "pairs.jsonl" if (root / "data").exists() else toy_jsonl
    before = snapshot(root)
    capsys.readouterr()
    if command == "profile":
        argv = ["profile", "--model", str(tiny_dir), "--data", str(data), "--no-progress"]
    else:
        argv = ["select", str(shared_glasses), "--rule", "det0", "--top-k", "3"]
    rc = main([*argv, "--out", str(out), "--overwrite"])
    line = one_error_line(capsys.readouterr().err, command)
    if make is _data_folder or make is _data_parent:
        message = message if command == "profile" else r"is not a glasses directory"  # select reads no data
    assert rc == 2 and re.search(message, line), line
    assert snapshot(root) == before  # nothing of the user's deleted, nothing left behind


@pytest.mark.parametrize("command", ["profile", "select"])
def test_overwrite_replaces_glasses(tiny_dir, toy_jsonl, tmp_path, capsys, shared_glasses, command):
    out = tmp_path / "g"
    assert main(["select", str(shared_glasses), "--out", str(out)]) == 0
    if command == "profile":
        argv = ["profile", "--model", str(tiny_dir), "--data", str(toy_jsonl), "--no-progress"]
    else:
        argv = ["select", str(out)]  # onto itself
    assert main([*argv, "--out", str(out), "--overwrite", "--rule", "det0", "--top-k", "3"]) == 0
    assert SafetyGlasses.load(out).counts()["experts"] == 3
    assert os.listdir(tmp_path) == ["g"] and sorted(os.listdir(out)) == ["glasses.safetensors", "manifest.json"]


def test_profiling_runs_write_identical_bytes(tiny_dir, toy_jsonl, tmp_path, shared_glasses):
    """The header order used to vary from save to save (p = 1/2 per pair of runs): five more runs."""
    for i in range(5):
        out = tmp_path / f"g{i}"
        assert main(["profile", "--model", str(tiny_dir), "--data", str(toy_jsonl), "--out", str(out), "--no-progress"]) == 0
        for name in ("glasses.safetensors", "manifest.json"):
            assert (out / name).read_bytes() == (shared_glasses / name).read_bytes(), (i, name)


DAMAGES = {
    "tensor-byte": lambda g: (g / "glasses.safetensors").write_bytes(
        (lambda b: b[:-5] + bytes([b[-5] ^ 0x40]) + b[-4:])((g / "glasses.safetensors").read_bytes())),
    "truncated": lambda g: (g / "glasses.safetensors").write_bytes((g / "glasses.safetensors").read_bytes()[:1000]),
    "edited-digest": lambda g: (g / "manifest.json").write_text(
        (g / "manifest.json").read_text().replace('"digest": "', '"digest": "0')),
    "not-json": lambda g: (g / "manifest.json").write_text("{"),
    "missing-manifest": lambda g: (g / "manifest.json").unlink(),
}


@pytest.mark.parametrize("case", sorted(DAMAGES))
@pytest.mark.parametrize("command", ["inspect", "select"])
def test_damaged_glasses_are_one_line_naming_the_file(shared_glasses, tmp_path, capsys, case, command):
    g = tmp_path / "g"
    g.mkdir()
    for name in ("glasses.safetensors", "manifest.json"):
        (g / name).write_bytes((shared_glasses / name).read_bytes())
    DAMAGES[case](g)
    argv = [command, str(g)] + (["--out", str(tmp_path / "new")] if command == "select" else [])
    rc = main(argv)
    line = one_error_line(capsys.readouterr().err, command)
    file = {"tensor-byte": "glasses.safetensors", "truncated": "glasses.safetensors"}.get(case, "manifest.json")
    assert rc == 2 and str(g / file) in line
    assert sorted(os.listdir(tmp_path)) == ["g"]


def test_inspect_says_integrity_ok(shared_glasses, capsys):
    assert main(["inspect", str(shared_glasses)]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("integrity: ok (content digest ")


def test_missing_local_model_is_never_sent_to_the_hub(toy_jsonl, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("lmms_sgm.models.hub_unreachable", lambda: pytest.fail("asked the Hub about a local path"))
    for model in (str(tmp_path / "no" / "model"), "./no-model", "runs/a/model"):
        rc = main(["profile", "--model", model, "--data", str(toy_jsonl), "--out", str(tmp_path / "g")])
        line = one_error_line(capsys.readouterr().err)
        assert rc == 2 and "does not exist" in line and model.lstrip("./") in line
    assert os.listdir(tmp_path) == []


def test_unreachable_hub_fails_fast_in_one_line(toy_jsonl, tmp_path):
    """No network here: huggingface_hub alone retried each file for ~23 s (53 s in all)."""
    import time

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_HOME"] = str(tmp_path / "hf")  # an empty cache
    t0 = time.monotonic()
    res = subprocess.run([LMMS_SGM, "profile", "--model", "nobody/nothing", "--data", str(toy_jsonl),
                          "--out", str(tmp_path / "g"), "--no-progress"], capture_output=True, text=True, env=env,
                         check=False)
    elapsed = time.monotonic() - t0
    line = one_error_line(res.stderr)
    assert res.returncode == 2 and "nobody/nothing" in line
    assert elapsed < 25, f"took {elapsed:.0f} s"
    assert not (tmp_path / "g").exists()


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    for argv in (["--debug", "inspect", str(tmp_path)], ["inspect", str(tmp_path), "--debug"]):
        with pytest.raises(FileNotFoundError, match="is not a glasses directory"):
            main(argv)
    monkeypatch.setenv("LMMS_SGM_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(["inspect", str(tmp_path)])


def test_unexpected_error_is_one_line_with_exit_1(tmp_path, capsys, monkeypatch):
    def bug(path):
        raise KeyError("sites")

    from lmms_sgm.interventions import base

    monkeypatch.setattr(base, "load_glasses", bug)  # what inspect loads any kind with
    assert main(["inspect", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert err.startswith("lmms-sgm inspect: error: KeyError: 'sites' (unexpected: run with --debug for the traceback)")


def test_commands_writing_a_new_directory_refuse_a_used_one(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["tiny", str(out)]) == 2
    assert f"{out} exists and is not empty" in one_error_line(capsys.readouterr().err, "tiny")
    assert os.listdir(out) == ["notes.txt"]


def test_sigint_exits_130_in_one_line_and_leaves_only_the_checkpoint(tiny_dir, toy_jsonl, tmp_path):
    """Ctrl-C in the middle of profiling: exit 130, one line, no output, no temporary directory; at most the
    resumable checkpoint, which the line names."""
    import signal
    import time

    rows = [json.loads(line) for line in toy_jsonl.read_text().splitlines()]
    # 10,000 pairs: well over 8 s of profiling on an idle core, stopped after a second (1,000 pairs took
    # 2.5 s here, short enough that under load a run could finish before the signal and exit 0)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(dict(r, image=str(toy_jsonl.parent / r["image"]))) + "\n" for r in rows * 500))
    runs = tmp_path / "runs"
    runs.mkdir()
    # The child gets Ctrl-C's default disposition: a suite started in the background by a shell (`cmd &`)
    # inherits SIGINT ignored, and Python then leaves it ignored (the run ends normally, exit 0).
    proc = subprocess.Popen([LMMS_SGM, "profile", "--model", str(tiny_dir), "--data", str(data), "--out",
                             str(runs / "g"), "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 150
        while not [e for e in os.listdir(runs) if not e.endswith(".lock")]:  # the temporary directory: profiling starts
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        time.sleep(1)
        assert proc.poll() is None, "profiling ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert out == "" and err.count("\n") == 1 and err.startswith("lmms-sgm profile: interrupted")
    # No output and no staging directory; only the checkpoint of the finished batches, which the line names.
    left = os.listdir(runs)
    assert left in ([], [".g.ckpt"]), left
    if left:
        assert f"kept in {runs / '.g.ckpt'}" in err and "--resume" in err
        assert all(f == "checkpoint.json" or f.startswith("batch-") for f in os.listdir(runs / ".g.ckpt"))


def test_hub_model_from_the_cache_when_the_hub_is_unreachable(tiny_dir, toy_jsonl, tmp_path, monkeypatch, capsys):
    """Unreachable Hub (probed once): a Hub id that is in the local cache still loads, offline."""
    import shutil

    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--someone--tiny-llava"
    shutil.copytree(tiny_dir, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("lmms_sgm.models.hub_unreachable", lambda: "https://huggingface.co: ConnectError: test")
    out = tmp_path / "g"
    assert main(["profile", "--model", "someone/tiny-llava", "--data", str(toy_jsonl), "--out", str(out), "--no-progress"]) == 0
    assert SafetyGlasses.load(out).counts()["neurons"] == 320
    rc = main(["profile", "--model", "someone/other", "--data", str(toy_jsonl), "--out", str(tmp_path / "h"), "--no-progress"])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and "model someone/other: not a local directory, not in the Hugging Face cache" in line
    assert "ConnectError: test" in line


@pytest.mark.parametrize("command", [["quickstart", "--workdir"], ["train-demo", "--minutes", "0.001", "--out"]])
def test_rebuilding_commands_never_delete_a_user_folder(tmp_path, capsys, command):
    """quickstart and train-demo used to rmtree whatever folder they were pointed at."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.json").write_text("{}")
    assert main([*command, str(mine)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not an earlier" in err and "nothing was deleted" in err
    assert sorted(p.name for p in mine.iterdir()) == ["results.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary siblings


def test_quickstart_replaces_only_its_own_earlier_output(tmp_path, capsys):
    work = tmp_path / "qs"
    assert main(["quickstart", "--workdir", str(work)]) == 0
    first = sorted(p.name for p in work.iterdir())
    assert {"model", "data", "glasses"} <= set(first)
    (work / "model" / "notes.txt").write_text("the user's")  # not the quickstart's: refused, kept
    assert main(["quickstart", "--workdir", str(work)]) == 2
    err = capsys.readouterr().err
    assert "did not write (model/notes.txt)" in err and "nothing was deleted" in err
    assert (work / "model" / "notes.txt").read_text() == "the user's"
    (work / "model" / "notes.txt").unlink()
    assert main(["quickstart", "--workdir", str(work)]) == 0  # an earlier quickstart alone: rebuilt whole
    assert sorted(p.name for p in work.iterdir()) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qs"]
