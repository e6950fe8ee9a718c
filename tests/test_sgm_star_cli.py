"""SGM* and the baselines through the real ``lmms-eval`` CLI on the tiny LLaVA, then ``lmms-sgm
report`` on all their folders: each defense alone, SGM alone, SGM* (SGM glasses + two defenses),
and the baselines (AurA-style text-only profiling, Det0 and Damp at top-k, ungated activation
steering), every run labelled by what it wore.

All runs are entries of one ``--config`` file, so lmms-eval starts once."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from lmms_sgm_tasks.mm_toxic_qa.make_sample import write_sample as write_mm_toxic_qa
from lmms_sgm_tasks.mmbench_local.make_sample import write_sample as write_mmbench

from lmms_sgm.defenses import REFUSAL
from lmms_sgm.options import ProfileOptions, SelectionOptions, SteeringOptions
from lmms_sgm.pipeline import build_glasses, build_steering_glasses

BIN = Path(sys.executable).parent
TASKS = "mm_toxic_qa,mmbench_local_mc"
LIMIT = 6


def runs_spec(world) -> dict[str, str]:
    g, steer, pairs = world["glasses"], world["steering"], world["pairs"]
    return {
        "vanilla": "sgm=off",
        "system_prompt": "sgm=off,defenses=system_prompt",
        "output_filter": "sgm=off,defenses=output_filter",
        "sgm": f"glasses={g}",
        "sgm_star": f"glasses={g},defenses=system_prompt+output_filter",
        "aura_text_only": f"profile_data={pairs},profile_text_only=true",
        "det0": f"glasses={g},select_rule=det0,select_top_k=16",
        "damp": f"glasses={g},select_rule=damp,select_top_k=16,select_damp_factor=0.1",
        "steering": f"glasses={steer}",
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_dir, model_and_processor, toy_jsonl):
    root = tmp_path_factory.mktemp("sgm_star")
    model, processor = model_and_processor
    glasses = root / "glasses"
    build_glasses(model, processor, toy_jsonl, ProfileOptions(), SelectionOptions(), out=glasses, progress=False)
    steering = root / "steering"
    build_steering_glasses(model, processor, toy_jsonl, None, SteeringOptions(gated=False, c=4.0), out=steering, progress=False)
    # The AurA-style baseline's data: the same pairs without their images, written by the CLI.
    text_pairs = root / "text_pairs.jsonl"
    proc = subprocess.run([str(BIN / "lmms-sgm"), "text-pairs", str(toy_jsonl), str(text_pairs)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0 and "records without images" in proc.stdout, proc.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("MM_TOXIC_QA_DIR", "MMBENCH_LOCAL_TSV")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", LMMS_SGM_JUDGE="lexicon",
               MM_TOXIC_QA_DIR=str(write_mm_toxic_qa(root / "mm_toxic_qa")),
               MMBENCH_LOCAL_TSV=str(write_mmbench(root / "mmbench.tsv")), LMMS_SGM_CACHE=str(root / "cache"))
    return {"root": root, "glasses": glasses, "steering": steering, "pairs": text_pairs, "env": env, "tiny": tiny_dir}


@pytest.fixture(scope="module")
def runs(world):
    root = world["root"]
    entries, outs = [], {}
    for name, extra in runs_spec(world).items():
        outs[name] = root / "runs" / name
        entries.append({"model": "sgm", "model_args": f"pretrained={world['tiny']},{extra}", "tasks": TASKS,
                        "batch_size": 3, "limit": LIMIT, "gen_kwargs": "max_new_tokens=8", "log_samples": True,
                        "output_path": str(outs[name])})
    config = root / "runs.yaml"
    config.write_text(yaml.safe_dump(entries))
    proc = subprocess.run([str(BIN / "lmms-eval"), "--config", str(config)], env=world["env"], capture_output=True,
                          text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = {}
    for name, out in outs.items():
        found = sorted(out.rglob("*_results.json"))
        assert len(found) == 1, f"{name}: {found}"
        samples = {p.stem.split("_samples_", 1)[1]: [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
                   for p in found[0].parent.glob("*_samples_*.jsonl")}
        results[name] = (json.loads(found[0].read_text()), samples)
    return results, outs


def answers(run) -> dict:
    return {s["doc_id"]: s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"]
            for s in run[1]["mm_toxic_qa"]}


def wore(run) -> dict:
    return run[0]["results"]["mm_toxic_qa"]["sgm,none"]


def test_sgm_star_wears_glasses_and_two_defenses(runs):
    results, _ = runs
    star, sgm, vanilla = wore(results["sgm_star"]), wore(results["sgm"]), wore(results["vanilla"])
    assert star["sgm"] is True and star["glasses_digest"] == sgm["glasses_digest"]
    assert [d["name"] for d in star["defenses"]] == ["system_prompt", "output_filter"]
    assert star["defenses"][1]["config"]["judge"]["name"] == "lexicon"
    assert "defenses" not in sgm and "defenses" not in vanilla
    stats = star["defense_stats"]["output_filter"]
    assert stats["judged"] == LIMIT
    # The filter used the scoring judge: what it replaced is exactly what was unsafe, now refused.
    star_answers = answers(results["sgm_star"])
    assert sum(a == REFUSAL for a in star_answers.values()) == stats["replaced"]
    assert results["sgm_star"][0]["results"]["mm_toxic_qa"]["harmful_rate,none"] == 0.0
    assert results["output_filter"][0]["results"]["mm_toxic_qa"]["harmful_rate,none"] == 0.0


def test_each_defense_alone_changes_answers_the_way_it_should(runs):
    results, _ = runs
    vanilla, prompt, filt = (answers(results[n]) for n in ("vanilla", "system_prompt", "output_filter"))
    assert vanilla.keys() == prompt.keys() == filt.keys() and len(vanilla) == LIMIT
    assert any(vanilla[k] != prompt[k] for k in vanilla)  # the system turn changes what the model says
    unsafe = {s["doc_id"] for s in results["vanilla"][1]["mm_toxic_qa"] if s["harmful_rate"]["score"] == 1}
    assert unsafe, "the tiny model said nothing the lexicon calls unsafe: the filter case is empty"
    assert {k for k in filt if filt[k] != vanilla[k]} == unsafe and all(filt[k] == REFUSAL for k in unsafe)


def test_baselines_record_what_they_are(runs, world):
    results, _ = runs
    assert wore(results["aura_text_only"]).get("text_only") is True and "text_only" not in wore(results["sgm"])
    assert wore(results["det0"])["selection"]["rule"] == "det0" and wore(results["det0"])["experts"] == 16
    assert wore(results["damp"])["selection"]["damp_factor"] == 0.1
    steer = wore(results["steering"])
    assert steer["gated"] is False and steer["c"] == 4.0
    for name in ("aura_text_only", "det0", "damp", "steering"):
        assert isinstance(results[name][0]["results"]["mmbench_local_mc"]["acc,none"], float)


def test_report_reads_every_run_labelled_by_what_it_wore(runs, tmp_path):
    _, outs = runs
    names = list(outs)
    proc = subprocess.run([str(BIN / "lmms-sgm"), "report", *(str(outs[n]) for n in names), "--names", ",".join(names),
                           "--out", str(tmp_path / "report"), "--resamples", "200"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    got = {r["label"]: r["wore"] for r in report["runs"]}
    assert got == {
        "vanilla": "vanilla", "system_prompt": "system_prompt", "output_filter": "output_filter",
        "sgm": "SGM t=0.5 s=1", "sgm_star": "SGM t=0.5 s=1 + system_prompt+output_filter",
        "aura_text_only": "SGM t=0.5 text-only s=1", "det0": "Det0 top-16 s=1", "damp": "Damp top-16 x0.1 s=1",
        "steering": f"steering layer {wore(runs[0]['steering'])['layer']} c=4 s=1",
    }
    assert "- sgm_star (SGM t=0.5 s=1 + system_prompt+output_filter): `" in proc.stdout
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| sgm_star | SGM t=0.5 s=1 + system_prompt+output_filter |" in md
