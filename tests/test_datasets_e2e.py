"""A built dataset, used as built: `lmms-sgm profile` on profile.jsonl (tiny LLaVA), the real
`lmms-eval` CLI on eval/test (MM_TOXIC_QA_DIR), and that run's samples turned back into
profiling pairs by the model-outputs source."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmms_sgm.cli import main
from lmms_sgm.data import load_pairs
from lmms_sgm.datasets import build_dataset
from lmms_sgm.datasets import miniature as mini
from lmms_sgm.interventions import SafetyGlasses
from lmms_sgm.judges import get_judge

LMMS_EVAL = str(Path(sys.executable).with_name("lmms-eval"))
LIMIT = 4


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    mini.write_mm_safetybench(root / "mmsb", per_scenario=4)
    mini.write_beavertails_v(root / "btv", train=6, evaluation=1)
    mini.write_vlguard(root / "vlg", safe=3, unsafe=2)
    sources = [f"mm-safetybench:{root / 'mmsb'}", f"beavertails-v:{root / 'btv'}", f"vlguard:{root / 'vlg'}"]
    return root, build_dataset(sources, root / "ds")


def test_profile_reads_the_built_pairs(built, tiny_dir, tmp_path):
    root, manifest = built
    assert main(["profile", "--model", str(tiny_dir), "--data", str(root / "ds/profile.jsonl"), "--out", str(tmp_path / "g"),
                 "--no-progress"]) == 0
    data = SafetyGlasses.load(tmp_path / "g").manifest["data"]
    assert data["digest"] == manifest["digests"]["profile_data"]  # the manifest names the glasses' data
    assert data["examples"] == manifest["counts"]["profile"]["pairs"] and data["toxic"] == manifest["counts"]["profile"]["toxic"]


@pytest.fixture(scope="module")
def lmms_eval_run(built, tiny_dir):
    root, _ = built
    out = root / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "LMMS_SGM_JUDGE": "lexicon",
           "MM_TOXIC_QA_DIR": str(root / "ds/eval/test"), "LMMS_SGM_CACHE": str(root / "cache")}
    cmd = [LMMS_EVAL, "--model", "sgm_llava", "--model_args", f"pretrained={tiny_dir},sgm=off", "--tasks", "mm_toxic_qa_all",
           "--batch_size", "4", "--limit", str(LIMIT), "--gen_kwargs", "max_new_tokens=12", "--output_path", str(out),
           "--log_samples", "--verbosity", "INFO", "--seed", "0"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = sorted(out.rglob("*_results.json"))
    assert len(found) == 1, proc.stderr[-3000:]  # lmms-eval exits 0 even when a run failed
    return out, json.loads(found[0].read_text())


def test_the_mm_toxic_qa_tasks_read_the_built_test_split(built, lmms_eval_run):
    root, _ = built
    out, results = lmms_eval_run
    r = results["results"]
    for task in ("mm_toxic_qa", "mm_toxic_qa_adv"):
        assert 0.0 <= r[task]["harmful_rate,none"] <= 1.0
    assert 0.0 <= r["mm_toxic_qa_benign"]["over_refusal_rate,none"] <= 1.0
    for task, kind in (("mm_toxic_qa", "harmful"), ("mm_toxic_qa_benign", "benign"), ("mm_toxic_qa_adv", "adv")):
        samples = sorted((json.loads(x) for x in next(out.rglob(f"*_samples_{task}.jsonl")).read_text().splitlines()),
                         key=lambda s: s["doc_id"])
        rows = [json.loads(x) for x in (root / "ds/eval/test" / f"{kind}.jsonl").read_text().splitlines()][:LIMIT]
        # The prompts asked are the built records' questions, in file order (adv: our drawn or the
        # benchmark's attack questions, used as given, not the task's own drawing).
        assert [s["input"] for s in samples] == [x["question"] for x in rows]
        assert [s["harmful_rate"]["category"] for s in samples] == [x["category"] for x in rows]


def test_model_outputs_turn_the_run_into_profiling_pairs(built, lmms_eval_run, tmp_path):
    root, _ = built
    out, _ = lmms_eval_run
    manifest = build_dataset([f"model-outputs:{out},data={root / 'ds/eval/test'},judge=lexicon"], tmp_path / "self", split="1,0,0")
    judge = get_judge("lexicon")
    expected = []
    for task in ("mm_toxic_qa", "mm_toxic_qa_adv", "mm_toxic_qa_benign"):
        for line in next(out.rglob(f"*_samples_{task}.jsonl")).read_text().splitlines():
            answer = json.loads(line)["filtered_resps"].strip()  # one greedy answer per prompt
            if answer:
                expected.append((answer, int(judge.judge("", answer).unsafe)))  # lexicon: the answer decides
    pairs = load_pairs(tmp_path / "self/profile.jsonl")
    assert sorted((p.text, p.label) for p in pairs) == sorted(expected)  # one pair per answer, on its own image
    assert manifest["sources"][0]["judge"]["name"] == "lexicon"
    assert manifest["counts"]["profile"]["pairs"] == len(expected) > 0
