"""The `sgm_llava` lmms-eval model under lmms-eval's multi-process evaluation and remotely.

The reference is one plain `lmms-eval` process wearing the glasses in hooks mode. Two processes
(``accelerate launch --multi_gpu --num_processes 2`` with ``ACCELERATE_USE_CPU=1``: gloo on CPU;
``--cpu`` would start one process) must give the same metrics and the same per-document answers,
with both processes serving; a failing run must exit non-zero from every process. A run with
``remote=URL`` against the loopback NDIF server (tests/ndif_server.py; the model a Hub id whose
config and processor come from a seeded Hugging Face cache) must give the same answers, with
the API key in no output or results file.
"""
from __future__ import annotations

import json
import secrets
import shutil
import sys
from pathlib import Path

import pytest
from lmms_sgm_tasks.mm_toxic_qa.make_sample import write_sample as write_mm_toxic_qa
from lmms_sgm_tasks.mmbench_local.make_sample import write_sample as write_mmbench

import ndif_server
from lmms_sgm.options import ProfileOptions, SelectionOptions
from lmms_sgm.pipeline import build_glasses
from test_lmms_cli import EXIT_LINE, run_cli

TASKS = "mm_toxic_qa,mmbench_local_mc"
HUB_ID = "tiny-org/tiny-llava"
KEY = "lmms-test-key-" + secrets.token_hex(8)
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]  # the `accelerate` script needs timm -> torchvision


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_dir, model_and_processor, toy_jsonl):
    root = tmp_path_factory.mktemp("lmms_scale")
    model, processor = model_and_processor
    glasses = root / "glasses"
    build_glasses(model, processor, toy_jsonl, ProfileOptions(), SelectionOptions(rule="det0", top_k=60), out=glasses,
                  progress=False)
    env = {
        "MM_TOXIC_QA_DIR": str(write_mm_toxic_qa(root / "mm_toxic_qa")),
        "MMBENCH_LOCAL_TSV": str(write_mmbench(root / "mmbench.tsv")),
        "LMMS_SGM_JUDGE": "lexicon",
        "LMMS_SGM_CACHE": str(root / "cache"),
        "OMP_NUM_THREADS": "1",
    }
    return {"root": root, "glasses": glasses, "env": env, "tiny": tiny_dir, "pairs": toy_jsonl}


def answers(out: Path) -> tuple[dict, dict]:
    """(metrics without stderrs and the `sgm` record, {task: {doc_id: filtered_resps}})."""
    found = sorted(out.rglob("*_results.json"))
    assert len(found) == 1, found
    results = json.loads(found[0].read_text())
    metrics = {task: {k: v for k, v in m.items() if "stderr" not in k and not k.startswith("sgm,")}
               for task, m in results["results"].items()}
    docs = {}
    for path in found[0].parent.glob("*_samples_*.jsonl"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        docs[path.stem.split("_samples_", 1)[1]] = {r["doc_id"]: r["filtered_resps"] for r in rows}
    return metrics, docs


def assert_same_answers(got: tuple, want: tuple, loss_tol: float = 0.0) -> None:
    assert got[0] == want[0]
    assert got[1].keys() == want[1].keys()
    for task, docs in want[1].items():
        assert got[1][task].keys() == docs.keys(), task
        for doc_id, resps in docs.items():
            if task == "mmbench_local_mc":  # (loss, is_greedy) per option, logged as strings
                for (loss_a, greedy_a), (loss_b, greedy_b) in zip(got[1][task][doc_id], resps):
                    assert abs(float(loss_a) - float(loss_b)) <= loss_tol and greedy_a == greedy_b, (doc_id, resps)
            else:
                assert got[1][task][doc_id] == resps, (task, doc_id)


@pytest.fixture(scope="module")
def reference(world):
    out = world["root"] / "one_process"
    proc = run_cli(f"pretrained={world['tiny']},glasses={world['glasses']}", out, world["env"], tasks=TASKS, limit=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return answers(out)


def accelerate(processes: int) -> list[str]:
    return ACCELERATE + ["--multi_gpu", "--num_processes", str(processes),
                         "--main_process_port", str(ndif_server.free_port()), "-m", "lmms_eval"]


def test_two_processes_give_the_single_process_results(world, reference):
    """The glasses are built from profile_data here (the same options as the reference's glasses),
    into an empty cache: process 0 builds them once, the other reads them from the cache."""
    out = world["root"] / "two_processes"
    model_args = f"pretrained={world['tiny']},profile_data={world['pairs']},select_rule=det0,select_top_k=60"
    env = {**world["env"], "ACCELERATE_USE_CPU": "1", "LMMS_SGM_CACHE": str(world["root"] / "cache_2p")}
    proc = run_cli(model_args, out, env, tasks=TASKS, limit=4, launcher=accelerate(2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "Running on rank 1 (local rank 1)" in log  # lmms-eval sharded the documents over two processes
    assert log.count("sgm: {") == 2  # each process built its model wearing the glasses
    assert log.count("sgm: building glasses from") == 1  # by process 0 only
    assert_same_answers(answers(out), reference)


def test_a_failed_run_exits_nonzero_from_every_process(world, tmp_path):
    # Without ACCELERATE_USE_CPU, accelerate on CPU joins each process alone: sgm_llava refuses to run.
    proc = run_cli(f"pretrained={world['tiny']},glasses={world['glasses']}", tmp_path / "out", world["env"],
                   tasks="mm_toxic_qa", limit=2, launcher=accelerate(2))
    assert proc.returncode != 0
    assert proc.stderr.count(EXIT_LINE) == 2, proc.stderr[-3000:]  # each process exited 1 itself
    assert "set ACCELERATE_USE_CPU=1" in proc.stdout + proc.stderr
    assert not list((tmp_path / "out").rglob("*_results.json"))


def test_a_remote_run_gives_the_local_results_and_never_shows_the_key(world, reference, tmp_path):
    home = tmp_path / "hf_home"  # config and processor of the Hub id, no weights
    snapshot = home / "hub" / ("models--" + HUB_ID.replace("/", "--")) / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for f in Path(world["tiny"]).iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, snapshot / f.name)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    server, url = ndif_server.start({HUB_ID: str(world["tiny"])}, api_key=KEY, log=tmp_path / "server.log")
    try:
        out = tmp_path / "remote"
        env = {**world["env"], "HF_HOME": str(home), "NDIF_API_KEY": KEY, "NNSIGHT_CONFIG": str(tmp_path / "none.yaml")}
        proc = run_cli(f"pretrained={HUB_ID},glasses={world['glasses']},remote={url}", out, env, tasks=TASKS, limit=4)
    finally:
        server.kill()
        server.wait()
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = answers(out)
    # Generations token for token; losses from the server's scores (a separate process: low bits may differ).
    assert_same_answers(got, reference, loss_tol=1e-5)
    sgm = json.loads(next(out.rglob("*_results.json")).read_text())["results"]["mm_toxic_qa"]["sgm,none"]
    assert sgm["remote"] == "ndif" and sgm["mode"] == "nnsight" and url not in json.dumps(sgm)
    assert KEY not in proc.stdout + proc.stderr
    leaked = [str(p) for p in tmp_path.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
    assert not leaked, leaked
