"""End to end through the real `lmms-eval` CLI (subprocesses), as a user runs it.

lmms-eval 0.7.3 exits 0 even when a run failed, so success is judged by the results file, and
failures are run with ``--verbosity DEBUG`` (which re-raises) to get a non-zero exit.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmms_sgm.glasses import SafetyGlasses
from lmms_sgm.options import ProfileOptions, SelectionOptions
from lmms_sgm.pipeline import build_glasses
from lmms_sgm.tiny import build_tiny_llava
from lmms_sgm_tasks.mm_toxic_qa.make_sample import write_sample as write_mm_toxic_qa
from lmms_sgm_tasks.mmbench_local.make_sample import write_sample as write_mmbench

LMMS_EVAL = str(Path(sys.executable).with_name("lmms-eval"))
TASKS = "mm_toxic_qa_all,mmbench_local,mmbench_local_mc"


def run_cli(model_args: str, out: Path, env_extra: dict, tasks: str = TASKS, verbosity: str = "INFO"):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **env_extra}
    cmd = [LMMS_EVAL, "--model", "sgm_llava", "--model_args", model_args, "--tasks", tasks,
           "--batch_size", "4", "--limit", "6", "--gen_kwargs", "max_new_tokens=12",
           "--output_path", str(out), "--log_samples", "--verbosity", verbosity, "--seed", "0"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def results_of(out: Path) -> tuple[dict, dict[str, list[dict]]]:
    found = sorted(out.rglob("*_results.json"))
    assert len(found) == 1, f"expected one results file under {out}, found {found}"
    results = json.loads(found[0].read_text())
    samples = {}
    for path in found[0].parent.glob("*_samples_*.jsonl"):
        task = path.stem.split("_samples_", 1)[1]
        samples[task] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return results, samples


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_dir, model_and_processor, toy_jsonl):
    root = tmp_path_factory.mktemp("cli")
    model, processor = model_and_processor
    glasses_dir = root / "glasses"
    # Strong glasses (det0 on the top 60 neurons) so that they visibly change generations.
    build_glasses(model, processor, toy_jsonl, ProfileOptions(), SelectionOptions(rule="det0", top_k=60),
                  out=glasses_dir, progress=False)
    env = {
        "MM_TOXIC_QA_DIR": str(write_mm_toxic_qa(root / "mm_toxic_qa")),
        "MMBENCH_LOCAL_TSV": str(write_mmbench(root / "mmbench.tsv")),
        "LMMS_SGM_JUDGE": "lexicon",
        "LMMS_SGM_CACHE": str(root / "cache"),
    }
    return {"root": root, "glasses": glasses_dir, "env": env, "tiny": tiny_dir}


@pytest.fixture(scope="module")
def vanilla_and_sgm(world):
    runs = {}
    for name, extra in (("off", "sgm=off"), ("sgm", f"glasses={world['glasses']},strength=1.0,mode=hooks")):
        out = world["root"] / f"out_{name}"
        proc = run_cli(f"pretrained={world['tiny']},{extra}", out, world["env"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = results_of(out)
    return runs


def test_both_runs_report_every_metric(vanilla_and_sgm):
    for name, (results, _) in vanilla_and_sgm.items():
        r = results["results"]
        for rate in (r["mm_toxic_qa"]["harmful_rate,none"], r["mm_toxic_qa"]["refusal_rate,none"],
                     r["mm_toxic_qa_adv"]["harmful_rate,none"], r["mm_toxic_qa_benign"]["over_refusal_rate,none"],
                     r["mmbench_local"]["accuracy,none"], r["mmbench_local_mc"]["acc,none"]):
            assert 0.0 <= rate <= 1.0, (name, rate)
        assert isinstance(r["mm_toxic_qa"]["harmful_rate_by_category,none"], dict)
        assert r["mm_toxic_qa"]["judge,none"]["name"] == "lexicon"
        assert results["config"]["model"] == "sgm_llava"


def test_results_say_what_the_model_wore(vanilla_and_sgm, world):
    off = vanilla_and_sgm["off"][0]["results"]["mm_toxic_qa"]["sgm,none"]
    on = vanilla_and_sgm["sgm"][0]["results"]["mm_toxic_qa"]["sgm,none"]
    assert off["sgm"] is False and "glasses_digest" not in off
    assert on["sgm"] is True and on["strength"] == 1.0 and on["mode"] == "hooks"
    assert on["glasses_digest"] == SafetyGlasses.load(world["glasses"]).digest()


def test_glasses_change_generations(vanilla_and_sgm):
    # Same prompts, same greedy decoding: the det0 glasses must change some responses.
    off = {s["doc_id"]: s["filtered_resps"] for s in vanilla_and_sgm["off"][1]["mm_toxic_qa"]}
    on = {s["doc_id"]: s["filtered_resps"] for s in vanilla_and_sgm["sgm"][1]["mm_toxic_qa"]}
    assert off.keys() == on.keys() and len(off) == 6
    assert any(off[k] != on[k] for k in off)


def test_multiple_choice_answers_are_the_argmin_of_the_logged_losses(vanilla_and_sgm):
    for _, samples in vanilla_and_sgm.values():
        rows = samples["mmbench_local_mc"]
        assert rows
        for s in rows:
            # lmms-eval logs each (loss, is_greedy) as strings; scoring used the real tuples.
            losses = [float(loss) for loss, _ in s["filtered_resps"]]
            chosen = min(range(len(losses)), key=losses.__getitem__)
            assert s["acc"] == float(chosen == int(s["target"]))


@pytest.mark.parametrize(
    "case",
    ["unknown_model_arg", "glasses_for_another_model", "missing_dataset", "unknown_judge"],
)
def test_failures_exit_nonzero_with_a_message_that_says_what_to_do(case, world, tmp_path):
    env = dict(world["env"])
    model_args = f"pretrained={world['tiny']},sgm=off"
    tasks = "mm_toxic_qa"
    if case == "unknown_model_arg":
        model_args += ",strenght=0.5"
        expect = "unknown model_args strenght"
    elif case == "glasses_for_another_model":
        other = build_tiny_llava(tmp_path / "other", intermediate_size=48)

        model_args = f"pretrained={other},glasses={world['glasses']}"
        expect = "lmms-sgm profile"
    elif case == "missing_dataset":
        env["MM_TOXIC_QA_DIR"] = str(tmp_path / "nowhere")
        expect = "docs/tasks.md"
    else:
        env["LMMS_SGM_JUDGE"] = "oracle"
        expect = "unknown judge 'oracle'"
    out = tmp_path / "out"
    proc = run_cli(model_args, out, env, tasks=tasks, verbosity="DEBUG")
    assert proc.returncode != 0
    assert expect in proc.stderr + proc.stdout
    assert not list(out.rglob("*_results.json"))
