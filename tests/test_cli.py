"""The lmms-sgm CLI: profile -> inspect -> select, flags from the option dataclasses, clean errors."""
from __future__ import annotations

import json
import re
import os
import subprocess
import sys

import pytest
import torch

from lmms_sgm.cli import main
from lmms_sgm.glasses import SafetyGlasses
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
    res = subprocess.run([exe, "inspect", "/nonexistent"], capture_output=True, text=True)
    assert res.returncode == 2
    assert "not a glasses directory" in res.stderr
