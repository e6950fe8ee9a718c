"""`lmms-sgm dataset export`: the Hub layout (parquet with embedded images + card with configs)
loads with `datasets.load_dataset` as the tasks and the profiler read a Hub dataset."""
from __future__ import annotations

import json

import datasets
import pytest
from lmms_sgm_tasks.mm_toxic_qa import core as tasks_core

from lmms_sgm.cli import main
from lmms_sgm.data import load_pairs
from lmms_sgm.datasets import build_dataset
from lmms_sgm.datasets import miniature as mini


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    mini.write_beavertails_v(root / "btv", train=6, evaluation=1)
    mini.write_vlguard(root / "vlg", safe=2, unsafe=1)
    manifest = build_dataset([f"beavertails-v:{root / 'btv'}", f"vlguard:{root / 'vlg'}"], root / "ds")
    return root, manifest


def test_export_loads_as_the_tasks_and_profiler_read_it(built, tmp_path, capsys, monkeypatch):
    root, manifest = built
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    assert main(["dataset", "export", str(root / "ds"), "--out", str(tmp_path / "hub")]) == 0
    assert "hf upload ORG/NAME" in capsys.readouterr().out
    readme = (tmp_path / "hub/README.md").read_text()
    assert "configs:\n- config_name: profile\n  data_files:\n  - split: train\n    path: data/profile/train-*.parquet" in readme
    for split in ("validation", "test"):
        dd = datasets.load_dataset(str(tmp_path / "hub"), split)  # what load_dataset("ORG/NAME", split) gives
        assert sorted(dd) == ["adv", "benign", "harmful"]
        assert isinstance(dd["harmful"].features["image"], datasets.Image)
        for kind in ("harmful", "benign", "adv"):
            assert len(dd[kind]) == manifest["counts"][split][kind]
            docs = tasks_core.rows_to_docs(dd[kind], "benign" if kind == "benign" else "harmful")  # the tasks' Hub path
            rows = [json.loads(x) for x in (root / "ds/eval" / split / f"{kind}.jsonl").read_text().splitlines()]
            assert list(docs["question"]) == [r["question"] for r in rows]
            assert list(docs["id"]) == [r["id"] for r in rows]
    profile = datasets.load_dataset(str(tmp_path / "hub"), "profile", split="train")
    pairs = load_pairs(profile)
    assert pairs.counts()["examples"] == manifest["counts"]["profile"]["pairs"]
    assert pairs.labels == [json.loads(x)["label"] for x in (root / "ds/profile.jsonl").read_text().splitlines()]


def test_export_refuses_a_dataset_that_fails_its_check(built, tmp_path, capsys):
    import shutil

    root, _ = built
    shutil.copytree(root / "ds", tmp_path / "ds")
    (tmp_path / "ds/eval/test/benign.jsonl").unlink()
    assert main(["dataset", "export", str(tmp_path / "ds"), "--out", str(tmp_path / "hub")]) == 2
    assert "fails `lmms-sgm dataset check`" in capsys.readouterr().err and not (tmp_path / "hub").exists()
