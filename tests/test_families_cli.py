"""``lmms-eval --model sgm`` through the real CLI for every family: vanilla and with glasses, on
``mm_toxic_qa`` and one local standard-format task each, chosen so that together they cover every
request shape (tests/test_standard_tasks.py runs all of them against lmms-eval's own tasks).

All fourteen runs are entries of one ``--config`` file, so lmms-eval starts once (imports are
most of a run's start-up); each entry still builds its own model and task index. Glasses damp 100
neurons x25: a random tiny model's greedy words survive milder glasses."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import yaml
from lmms_sgm_tasks.mm_toxic_qa.make_sample import write_sample as write_mm_toxic_qa

from conftest import FAMILIES
from lmms_sgm import models, processors
from lmms_sgm.interventions import SafetyGlasses
from lmms_sgm.options import ProfileOptions, SelectionOptions
from lmms_sgm.pipeline import build_glasses

LMMS_EVAL = str(Path(sys.executable).with_name("lmms-eval"))
# One standard-format task per family: several images (MUIRBench) for the LLaVA-OneVision and
# Gemma 3 multi-image paths, <image k> (MMMU) where images are rendered in place, text-only rows
# (ScienceQA) for Mllama, which batches by image count.
STANDARD = {"llava_next": "mme_local", "llava_onevision": "muirbench_local", "qwen2_vl": "mmmu_val_local",
            "qwen2_5_vl": "pope_local", "idefics3": "scienceqa_img_local", "gemma3": "muirbench_local",
            "mllama": "scienceqa_local"}
METRICS = {"mm_toxic_qa": "harmful_rate,none", "mme_local": "mme_perception_score,none", "pope_local": "pope_accuracy,none",
           "scienceqa_img_local": "exact_match,none", "scienceqa_local": "exact_match,none", "mmmu_val_local": "mmmu_acc,none",
           "muirbench_local": "muirbench_score_overall,flexible-extract"}
VARIANTS = ("vanilla", "sgm")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, family_dir, toy_jsonl):
    root = tmp_path_factory.mktemp("families_cli")
    entries, outs = [], {}
    for family in FAMILIES:
        path = family_dir(family)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", processors.ImageOnlyProcessorWarning)
            model, processor = models.load(str(path))
        glasses = root / family / "glasses"
        build_glasses(model, processor, toy_jsonl, ProfileOptions(), SelectionOptions(rule="damp", top_k=100, damp_factor=25.0),
                      out=glasses, progress=False)
        for variant, extra in zip(VARIANTS, ("sgm=off", f"glasses={glasses},mode=hooks")):
            outs[family, variant] = root / family / variant
            entries.append({"model": "sgm", "model_args": f"pretrained={path},{extra}", "tasks": f"mm_toxic_qa,{STANDARD[family]}",
                            "batch_size": 2, "limit": 2, "gen_kwargs": "max_new_tokens=6", "log_samples": True,
                            "output_path": str(outs[family, variant])})
    config = root / "runs.yaml"
    config.write_text(yaml.safe_dump(entries))
    env = {k: v for k, v in os.environ.items() if k not in ("MM_TOXIC_QA_DIR", "MMBENCH_LOCAL_TSV")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", LMMS_SGM_JUDGE="lexicon",
               MM_TOXIC_QA_DIR=str(write_mm_toxic_qa(root / "mm_toxic_qa")),
               LMMS_EVAL_DATASETS_CACHE=str(root / "hf_datasets"))
    started = time.perf_counter()
    proc = subprocess.run([LMMS_EVAL, "--config", str(config)], env=env, capture_output=True, text=True, timeout=1500,
                          check=False)
    print(f"lmms-eval, {len(entries)} runs: {time.perf_counter() - started:.0f} s")
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = {}
    for key, out in outs.items():
        found = sorted(out.rglob("*_results.json"))
        assert len(found) == 1, f"{key}: {found}"
        samples = {p.stem.split("_samples_", 1)[1]: [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
                   for p in found[0].parent.glob("*_samples_*.jsonl")}
        results[key] = (json.loads(found[0].read_text()), samples)
    return results, root


@pytest.mark.parametrize("family", FAMILIES)
def test_every_task_runs_vanilla_and_with_glasses(family, runs):
    results, root = runs
    for variant in VARIANTS:
        doc, samples = results[family, variant]
        assert doc["config"]["model"] == "sgm"
        for task in ("mm_toxic_qa", STANDARD[family]):
            value = doc["results"][task][METRICS[task]]
            assert isinstance(value, (int, float)), (variant, task, value)
            assert len(samples[task]) == 2
    on = results[family, "sgm"][0]["results"]["mm_toxic_qa"]["sgm,none"]
    off = results[family, "vanilla"][0]["results"]["mm_toxic_qa"]["sgm,none"]
    assert off["sgm"] is False and on["sgm"] is True
    assert on["glasses_digest"] == SafetyGlasses.load(root / family / "glasses").digest()


@pytest.mark.parametrize("family", FAMILIES)
def test_glasses_change_what_the_model_says(family, runs):
    results, _ = runs
    answers = {variant: {(task, s["doc_id"]): s["filtered_resps"] for task, rows in results[family, variant][1].items() for s in rows}
               for variant in VARIANTS}
    assert answers["vanilla"].keys() == answers["sgm"].keys()
    assert any(answers["vanilla"][k] != answers["sgm"][k] for k in answers["vanilla"])
