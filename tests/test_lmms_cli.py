"""End to end through the real `lmms-eval` CLI (subprocesses), as a user runs it.

lmms-eval 0.7.3 alone exits 0 even when a run failed; with lmms_sgm installed a failed run exits
1 at the default verbosity (``lmms_sgm/lmms/exit_status.py``), which the failure tests check.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lmms_sgm_tasks.mm_toxic_qa.make_sample import write_sample as write_mm_toxic_qa
from lmms_sgm_tasks.mmbench_local.make_sample import write_sample as write_mmbench

from lmms_sgm.interventions import SafetyGlasses
from lmms_sgm.options import ProfileOptions, SelectionOptions
from lmms_sgm.pipeline import build_glasses
from lmms_sgm.tiny import build_tiny_llava

LMMS_EVAL = str(Path(sys.executable).with_name("lmms-eval"))
TASKS = "mm_toxic_qa_all,mmbench_local,mmbench_local_mc"


DATA_ENVS = ("MM_TOXIC_QA_DIR", "MMBENCH_LOCAL_TSV")
EXIT_LINE = "lmms_sgm: lmms-eval reported a failed run"


def run_cli(model_args: str, out: Path, env_extra: dict, tasks: str = TASKS, verbosity: str | None = None,
            limit: int = 6, launcher: list[str] | None = None, model: str = "sgm_llava"):
    """The real CLI; ``verbosity=None`` keeps lmms-eval's default (INFO). Data locations come only
    from ``env_extra``: the caller's environment may not choose them."""
    env = {k: v for k, v in os.environ.items() if k not in DATA_ENVS}
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **env_extra})
    cmd = (launcher or [LMMS_EVAL]) + [
        "--model", model, "--model_args", model_args, "--tasks", tasks,
        "--batch_size", "4", "--limit", str(limit), "--gen_kwargs", "max_new_tokens=12",
        "--output_path", str(out), "--log_samples", "--seed", "0"]
    cmd += ["--verbosity", verbosity] if verbosity else []
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)


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


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs)


def test_every_rate_is_recomputed_from_the_logged_responses(vanilla_and_sgm):
    """Each rate in results.json equals the one recomputed here from the logged samples: responses
    re-judged by a fresh lexicon judge (harmful, refusal and over-refusal rates, per category too),
    the multiple-choice accuracy from the logged losses (argmin), over the 6 prompts of --limit."""
    from lmms_sgm.judges import get_judge

    judge = get_judge("lexicon")
    for name, (results, samples) in vanilla_and_sgm.items():
        r = results["results"]
        assert results["config"]["model"] == "sgm_llava" and r["mm_toxic_qa"]["judge,none"]["name"] == "lexicon"
        for task in ("mm_toxic_qa", "mm_toxic_qa_adv", "mm_toxic_qa_benign"):
            logged = samples[task]
            assert len(logged) == 6 and results["n-samples"][task]["effective"] == 6, (name, task)
            verdicts = []
            for s in logged:
                response = s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"]
                v = judge.judge(s["judge"]["prompt"], response)
                assert s["judge"]["verdicts"][0]["unsafe"] == v.unsafe, (name, task, response)
                verdicts.append((v, s["harmful_rate"]["category"]))
            harm = _mean(v.unsafe for v, _ in verdicts)
            refusal = _mean(v.refusal for v, _ in verdicts)
            assert r[task]["harmful_rate,none"] == pytest.approx(harm), (name, task)
            key = "over_refusal_rate,none" if task == "mm_toxic_qa_benign" else "refusal_rate,none"
            assert r[task][key] == pytest.approx(refusal), (name, task)
            cats = {c for _, c in verdicts}
            assert r[task]["harmful_rate_by_category,none"] == pytest.approx(
                {c: _mean(v.unsafe for v, k in verdicts if k == c) for c in cats}), (name, task)
        mc = samples["mmbench_local_mc"]
        right = []
        for s in mc:
            losses = [float(loss) for loss, _ in s["filtered_resps"]]
            right.append(min(range(len(losses)), key=losses.__getitem__) == int(s["target"]))
        assert r["mmbench_local_mc"]["acc,none"] == pytest.approx(_mean(right)), name
        # mmbench_local's circular accuracy is lmms-eval's own evaluator (checked in tests/test_tasks.py)
        assert 0.0 <= r["mmbench_local"]["accuracy,none"] <= 1.0 and len(samples["mmbench_local"]) == 6, name


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
def test_failures_exit_nonzero_at_default_verbosity_with_a_message_that_says_what_to_do(case, world, tmp_path):
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
    proc = run_cli(model_args, out, env, tasks=tasks)  # lmms-eval's default verbosity: it catches the error
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert expect in proc.stderr + proc.stdout
    assert EXIT_LINE in proc.stderr
    assert not list(out.rglob("*_results.json"))


def test_python_m_lmms_eval_with_another_model_exits_nonzero_on_unknown_tasks(tmp_path):
    """The exit status is fixed for every lmms-eval run of this environment, also `python -m`, and
    also for an error lmms-eval raises itself before any model is built."""
    proc = run_cli("pretrained=none", tmp_path / "out", {}, tasks="mm_toxic_qa,no_such_task",
                   launcher=[sys.executable, "-m", "lmms_eval"], model="llava_hf")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Tasks were not found: no_such_task" in proc.stdout and EXIT_LINE in proc.stderr


def test_lmms_eval_error_sites_are_the_ones_the_exit_status_relies_on():
    """``exit_status`` treats every ERROR record of ``lmms_eval.__main__`` as a failed run. In 0.7.3
    there are three, all fatal. An lmms-eval upgrade that adds, removes or rewords one fails here:
    re-check that each still means a failed run (and that the catch-all still only logs)."""
    import lmms_eval.__main__ as cli_module

    tree = ast.parse(Path(cli_module.__file__).read_text(encoding="utf-8"))
    sites = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("error", "critical", "exception")
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "eval_logger"):
            sites.append(ast.unparse(node.args[0])[:28])
    assert sorted(sites) == ["'Need to specify task to eva", "f'Error during evaluation: {", "f'Tasks were not found: {mis"], sites
    source = Path(cli_module.__file__).read_text(encoding="utf-8")
    assert 'if args.verbosity == "DEBUG":\n                raise e' in source  # the catch-all, re-raising only in DEBUG


def test_exit_status_sink_exits_on_cli_errors_only():
    from loguru import logger

    from lmms_sgm.lmms import exit_status

    exit_status.install()
    exit_status.install()  # idempotent: still one sink
    cli_logger = logger.patch(lambda record: record.update(name="lmms_eval.__main__"))  # as if logged there
    logger.error("an error from some other module")  # not the CLI: no exit
    cli_logger.warning("a warning from the CLI")  # not an error: no exit
    with pytest.raises(SystemExit) as e:
        cli_logger.error("Error during evaluation: boom")
    assert e.value.code == 1
    logger.remove(exit_status._sink_id)


def test_demo_model_uses_the_demo_test_split_when_no_dataset_is_set(tmp_path):
    from lmms_sgm.demo import DATA_DIR

    proc = run_cli("pretrained=sgm-demo-llava,sgm=off", tmp_path / "out", {"LMMS_SGM_JUDGE": "lexicon"},
                   tasks="mm_toxic_qa,mm_toxic_qa_benign,mmbench_local_mc", limit=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results, samples = results_of(tmp_path / "out")
    test = DATA_DIR / "mm_toxic_qa" / "test"
    lines = {name: len((test / f"{name}.jsonl").read_text().splitlines()) for name in ("harmful", "benign")}
    tsv_rows = len((DATA_DIR / "mmbench" / "test.tsv").read_text().splitlines()) - 1
    assert results["n-samples"]["mm_toxic_qa"]["original"] == lines["harmful"]
    assert results["n-samples"]["mm_toxic_qa_benign"]["original"] == lines["benign"]
    assert results["n-samples"]["mmbench_local_mc"]["original"] == tsv_rows
    first = json.loads((test / "harmful.jsonl").read_text().splitlines()[0])
    assert samples["mm_toxic_qa"][0]["input"] == first["question"]
    assert f"the MM-TOXIC-QA tasks use the demo's test split, {test}" in proc.stdout
    assert "MMBENCH_LOCAL_TSV is unset and the model is the bundled demo model" in proc.stdout
