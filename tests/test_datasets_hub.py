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


def test_the_tasks_read_the_export_by_id_through_a_yaml(built, tmp_path, monkeypatch):
    """docs/dataset.md's YAMLs, with the export folder standing for the Hub id (same loader)."""
    from lmms_eval import utils as lmms_utils
    from lmms_eval.api import task as task_module
    from lmms_eval.tasks import TaskManager, get_task_dict

    from lmms_sgm.lmms import registration

    root, _ = built
    hub = tmp_path / "hub"
    main(["dataset", "export", str(root / "ds"), "--out", str(hub)])
    for var in ("MM_TOXIC_QA_DIR", "LMMS_SGM_JUDGE", "LMMS_SGM_JUDGE_ARGS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "cache"))
    task_module._resolve_hf_datasets_cache_dir.cache_clear()
    ours = tasks_core.Path(tasks_core.__file__).parent
    yamls = {"my_mm_toxic_qa": ("mm_toxic_qa.yaml", ""), "my_mm_toxic_qa_benign": ("mm_toxic_qa_benign.yaml", ""),
             "my_mm_toxic_qa_adv": ("mm_toxic_qa.yaml", "test_split: adv\n")}
    configs = []
    for name, (base, extra) in yamls.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"task: {name}\ninclude: {ours / base}\ndataset_path: {hub}\ndataset_name: test\ndataset_kwargs: {{}}\n{extra}")
        configs.append(lmms_utils.load_yaml_config(str(path)))
    registration.manifests()
    try:
        tasks = get_task_dict(configs, TaskManager())
    finally:
        task_module._resolve_hf_datasets_cache_dir.cache_clear()
    for name, kind in (("my_mm_toxic_qa", "harmful"), ("my_mm_toxic_qa_benign", "benign"), ("my_mm_toxic_qa_adv", "adv")):
        rows = [json.loads(x) for x in (root / "ds/eval/test" / f"{kind}.jsonl").read_text().splitlines()]
        assert tasks[name].eval_docs_no_media["question"] == [r["question"] for r in rows]
        assert tasks[name].eval_docs_no_media["id"] == [r["id"] for r in rows]
