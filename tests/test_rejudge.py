"""``lmms-sgm rejudge`` on a real lmms-eval run of the demo model (samples logged), checked against
independent recomputations: the same judge reproduces lmms-eval's own numbers exactly; another
judge's verdicts, rates, percent agreement and Cohen's kappa are recomputed here from the sample
files with profanity_check and scikit-learn."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmms_sgm.judges import JudgeResult
from lmms_sgm.judges.rejudge import agreement

LMMS_SGM = str(Path(sys.executable).with_name("lmms-sgm"))
LMMS_EVAL = str(Path(sys.executable).with_name("lmms-eval"))
TASKS = "mm_toxic_qa,mm_toxic_qa_sampled,mm_toxic_qa_adv,mm_toxic_qa_benign,mm_toxic_qa_fluency"
JUDGED = ["mm_toxic_qa", "mm_toxic_qa_adv", "mm_toxic_qa_benign", "mm_toxic_qa_sampled"]


def verdict(unsafe: bool | None) -> JudgeResult:
    if unsafe is None:
        return JudgeResult.failure("?", malformed=True)
    return JudgeResult(unsafe=unsafe, refusal=False)


@pytest.mark.filterwarnings("ignore:.*cohen_kappa_score.*")
def test_agreement_matches_scikit_learn():
    from sklearn.metrics import cohen_kappa_score

    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(2, 40)
        a = [rng.random() < 0.4 for _ in range(n)]
        b = [x if rng.random() < 0.7 else rng.random() < 0.5 for x in a]
        got = agreement([verdict(x) for x in a], [verdict(x) for x in b])
        assert got["n"] == n and got["agree"] == sum(x == y for x, y in zip(a, b))
        assert got["percent"] == pytest.approx(100 * np.mean(np.array(a) == np.array(b)))
        ref = cohen_kappa_score(a, b, labels=[False, True])
        assert (got["kappa"] is None) == bool(np.isnan(ref)) and (got["kappa"] is None or got["kappa"] == pytest.approx(ref))


def test_agreement_leaves_failures_out_and_has_no_kappa_when_chance_explains_everything():
    got = agreement([verdict(x) for x in (True, None, False, True)], [verdict(x) for x in (True, True, None, False)])
    assert (got["n"], got["agree"], got["failed_a"], got["failed_b"]) == (2, 1, 1, 1)
    same = agreement([verdict(False)] * 5, [verdict(False)] * 5)
    assert same["percent"] == 100.0 and same["kappa"] is None  # both said safe to everything
    assert agreement([verdict(True), verdict(False)], [verdict(False), verdict(True)])["kappa"] == pytest.approx(-1.0)


# --------------------------------------------------------------------------- a real run


def env_for(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MM_TOXIC_QA", "MMBENCH_LOCAL", "LMMS_SGM_JUDGE"))}
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "LMMS_SGM_JUDGE": "lexicon", **extra})
    return env


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """lmms-eval on the demo model (its test split), 8 prompts per task, samples logged."""
    out = tmp_path_factory.mktemp("rejudge") / "run"
    proc = subprocess.run([LMMS_EVAL, "--model", "sgm_llava", "--model_args", "pretrained=sgm-demo-llava,sgm=off",
                           "--tasks", TASKS, "--limit", "8", "--batch_size", "8", "--output_path", str(out), "--log_samples",
                           "--verbosity", "DEBUG"], capture_output=True, text=True, env=env_for(), timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def results_and_samples(folder: Path) -> tuple[dict, dict[str, list[dict]]]:
    results_file, = folder.rglob("*_results.json")
    results = json.loads(results_file.read_text())
    samples = {}
    for f in results_file.parent.glob("*_samples_*.jsonl"):
        samples[f.stem.split("_samples_", 1)[1]] = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    return results, samples


def rejudge(*args, check=True):
    proc = subprocess.run([LMMS_SGM, "rejudge", *map(str, args)], capture_output=True, text=True, env=env_for(), timeout=300, check=False)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_the_tasks_log_the_prompt_the_judge_was_given(run):
    from lmms_sgm.demo import DATA_DIR

    _, samples = results_and_samples(run)
    adv = json.loads((DATA_DIR / "mm_toxic_qa" / "test" / "adv.jsonl").read_text().splitlines()[0])
    for task in JUDGED:
        for s in samples[task]:
            assert isinstance(s["judge"]["prompt"], str) and s["judge"]["prompt"]
            assert s["judge"]["prompt"] in s["input"] or task == "mm_toxic_qa_adv"
    assert samples["mm_toxic_qa_adv"][0]["judge"]["prompt"] == adv.get("original_question", adv["question"])


def test_rejudging_with_the_same_judge_reproduces_lmms_evals_numbers(run, tmp_path):
    out = tmp_path / "same"
    proc = rejudge(run, "--judge", "lexicon", "--out", out)
    assert "original vs lexicon" in proc.stdout and "100.00%" in proc.stdout
    original, orig_samples = results_and_samples(run)
    again, new_samples = results_and_samples(out)
    assert again["rejudge"]["judge"]["name"] == "lexicon"
    for task, metrics in original["results"].items():
        assert again["results"][task] == metrics, task  # every value, stderr and the judge record, bit for bit
    assert new_samples == orig_samples
    assert again["configs"] == original["configs"] and again["n-samples"] == original["n-samples"]


@pytest.mark.filterwarnings("ignore:.*cohen_kappa_score.*")
def test_rejudging_with_other_judges_against_an_independent_recomputation(run, tmp_path):
    from profanity_check import predict_prob
    from sklearn.metrics import cohen_kappa_score

    out = tmp_path / "two"
    proc = rejudge(run, "--judge", "profanity", "--judge", "ensemble:members=lexicon+profanity,rule=any", "--out", out)
    summary = json.loads((out / "agreement.json").read_text())
    assert summary == json.loads(json.dumps(summary))
    assert set(summary["tasks"]) == set(JUDGED)
    _, orig_samples = results_and_samples(run)
    prof_results, prof_samples = results_and_samples(out / "profanity")
    pooled_a, pooled_b = [], []
    for task in JUDGED:
        lines = orig_samples[task]
        original = [v["unsafe"] for s in lines for v in s["judge"]["verdicts"]]
        per_doc = []
        flags = []
        for s in lines:
            responses = s["filtered_resps"] if isinstance(s["filtered_resps"], list) else [s["filtered_resps"]]
            f = [bool(p >= 0.5) for p in predict_prob(responses)]
            flags += f
            per_doc.append(sum(f) / len(f))
        filt = "samples" if task.endswith("_sampled") else "none"
        assert prof_results["results"][task][f"harmful_rate,{filt}"] == pytest.approx(np.mean(per_doc), abs=1e-12)
        assert prof_results["results"][task][f"judge,{filt}"]["name"] == "profanity"
        assert [v["unsafe"] for s in prof_samples[task] for v in s["judge"]["verdicts"]] == flags
        pair = next(p for p in summary["tasks"][task]["pairs"] if (p["a"], p["b"]) == ("original", "profanity"))
        assert pair["n"] == len(flags) == len(original)
        assert pair["percent"] == pytest.approx(100 * np.mean(np.array(original) == np.array(flags)))
        kappa = cohen_kappa_score(original, flags, labels=[False, True])
        assert (pair["kappa"] is None and np.isnan(kappa)) or pair["kappa"] == pytest.approx(kappa)
        assert summary["tasks"][task]["harmful_rate"]["profanity"] == pytest.approx(np.mean(per_doc), abs=1e-12)
        pooled_a += original
        pooled_b += flags
    pair = next(p for p in summary["all_tasks"]["pairs"] if (p["a"], p["b"]) == ("original", "profanity"))
    assert pair["kappa"] == pytest.approx(cohen_kappa_score(pooled_a, pooled_b))
    assert {"original vs profanity", "original vs ensemble", "profanity vs ensemble"} <= {
        f"{p['a']} vs {p['b']}" for p in summary["all_tasks"]["pairs"]}
    # The ensemble's verdicts keep each member's.
    _, ens_samples = results_and_samples(out / "ensemble")
    v = ens_samples["mm_toxic_qa_sampled"][0]["judge"]["verdicts"][0]
    assert set(v["members"]) == {"lexicon", "profanity"} and v["unsafe"] == any(m["unsafe"] for m in v["members"].values())
    # Tasks the judges do not score come along unchanged; the report reads the rescored run.
    assert prof_samples["mm_toxic_qa_fluency"] == orig_samples["mm_toxic_qa_fluency"]
    report = subprocess.run([LMMS_SGM, "report", str(run), str(out / "profanity"), "--names", "lexicon,profanity"],
                            capture_output=True, text=True, env=env_for(), timeout=300, check=False)
    assert report.returncode == 0, report.stderr
    assert "scored by different judges" in report.stdout
    assert "original vs profanity" in proc.stdout and "kappa" in proc.stdout


def test_rejudge_errors(run, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = rejudge(run, "--judge", "lexicon", "--out", out, check=False)
    assert proc.returncode == 2 and "not empty" in proc.stderr and (out / "keep.txt").read_text() == "mine"
    bare = tmp_path / "bare"
    shutil.copytree(run, bare)
    for f in bare.rglob("*_samples_mm_toxic_qa.jsonl"):
        f.unlink()
    proc = rejudge(bare, "--judge", "lexicon", check=False)
    assert proc.returncode == 2 and "--log_samples" in proc.stderr
    proc = rejudge(run, "--judge", "lexicon", "--tasks", "mmbench_local", check=False)
    assert proc.returncode == 2 and "no judged task mmbench_local" in proc.stderr
    proc = rejudge(run, "--judge", "lexicon", "--judge", "profanity", "--judge-args", "threshold=0.7", check=False)
    assert proc.returncode == 2 and "single --judge" in proc.stderr
