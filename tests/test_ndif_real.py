"""Remote execution against NDIF's own server code: the ``ndif`` 0.1.2 package's API service,
queue and model actor, a real redis, all on 127.0.0.1 (tests/ndif_real.py says exactly which
GPU-cluster plumbing is replaced: Ray, the controller's placement, GPU placement, the Postgres
key table; everything a request passes through otherwise is NDIF's).

Through our client, as a user runs it (the model a Hub id whose config and processor come from a
Hugging Face cache without weights; the server's cache holds the weights under the same id):
remote profiling gives byte-identical glasses (same machine, same run), generation and scores
equal hooks mode, lmms-eval equals a local run, diagnose runs; a model the cluster does not
serve, a refused key and a killed server each end in one line and exit 2; ``--resume`` after a
server restart traces only the missing batches; and the API key is in no file our commands
write (it is in NDIF's own logs: docs/scale.md warns about it).

Needs ``redis-server`` and ``ndif==0.1.2`` (``.ci/run`` installs both; LMMS_SGM_REQUIRE_NDIF=1
turns their absence into a failure instead of a skip).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

import ndif_real
import remote_client
from lmms_sgm.options import ProfileOptions, SelectionOptions
from lmms_sgm.pipeline import build_glasses


def _missing() -> str | None:
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (Debian: apt-get install redis-server)"
    if importlib.util.find_spec("ndif") is None:
        return "the ndif package is not installed (scripts/setup.sh installs ndif==0.1.2 with LMMS_SGM_NDIF=1)"
    from importlib.metadata import version

    if version("ndif") != ndif_real.NDIF_VERSION:
        return f"ndif {version('ndif')} is installed; these tests are written against {ndif_real.NDIF_VERSION}"
    return None


if (_why := _missing()) is not None:
    if os.environ.get("LMMS_SGM_REQUIRE_NDIF"):
        pytest.fail(f"LMMS_SGM_REQUIRE_NDIF is set (CI) but {_why}", pytrace=False)
    pytest.skip(_why, allow_module_level=True)

HUB_ID = "tiny-org/tiny-llava"
NOT_SERVED = "tiny-org/not-served"  # in the client's cache, not deployed by the cluster
KEY = str(uuid.uuid4())  # NDIF keys are UUIDs; unique, so finding it anywhere means it leaked
BIN = Path(sys.executable).parent
OPTS = ["--pooling", "max", "--rule", "det0", "--top-k", "60"]
OUTPUTS: list[str] = []  # everything our commands printed
PRODUCED: list[Path] = []  # every directory our commands wrote


def _seed_cache(home: Path, tiny_dir, repo_id: str, *, weights: bool) -> None:
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for f in Path(tiny_dir).iterdir():
        if weights or f.suffix != ".safetensors":
            shutil.copy(f, snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)


@pytest.fixture(scope="module")
def world(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ndif_real")
    server_home, client_home = root / "hf_server", root / "hf_client"
    _seed_cache(server_home, tiny_dir, HUB_ID, weights=True)
    for repo in (HUB_ID, NOT_SERVED):
        _seed_cache(client_home, tiny_dir, repo, weights=False)
    cluster = ndif_real.Cluster({HUB_ID: "float32"}, hf_home=server_home, key=KEY, workdir=root / "cluster")
    started = time.monotonic()
    cluster.start()
    print(f"NDIF cluster up in {time.monotonic() - started:.1f} s at {cluster.url}")
    yield {"root": root, "client_home": client_home, "cluster": cluster}
    cluster.kill()


def client_env(world, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NDIF_", "NNSIGHT_"))}
    env.update({"HF_HOME": str(world["client_home"]), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "OMP_NUM_THREADS": "1", "NNSIGHT_CONFIG": str(world["root"] / "no-nnsight-config.yaml"),
                "NDIF_API_KEY": KEY, "NDIF_HOST": world["cluster"].url})
    env.update(extra)
    return env


def run(cmd, env, out: Path | None = None) -> subprocess.CompletedProcess:
    if out is not None:
        PRODUCED.append(out)
    proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=300, check=False)
    OUTPUTS.extend([proc.stdout, proc.stderr])
    return proc


def profile_cmd(model: str, data, out: Path, *extra) -> list:
    return [BIN / "lmms-sgm", "profile", "--model", model, "--data", data, "--out", out, *OPTS, "--no-progress", *extra]


def last_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


def completed_jobs(world) -> int:
    """Jobs NDIF's model actor reported completed (its own status log line, one per request)."""
    log = world["cluster"].workdir / "queue.log"
    return log.read_text(errors="replace").count("Your job has been completed.")


@pytest.fixture(scope="module")
def few_pairs(tmp_path_factory):
    """8 pairs, profiled one per job in the resume test."""
    from lmms_sgm import tiny

    return tiny.write_toy_pairs(tmp_path_factory.mktemp("ndif_real_pairs"), 8)


@pytest.fixture(scope="module")
def reference(model_and_processor, toy_jsonl, few_pairs, tmp_path_factory):
    """Glasses profiled here, in this process, with the CLI's options: the toy pairs in batches
    of 4, and the 8 pairs one at a time."""
    model, processor = model_and_processor
    root = tmp_path_factory.mktemp("ndif_real_reference")
    selection = SelectionOptions(rule="det0", top_k=60)
    for data, batch_size in ((toy_jsonl, 4), (few_pairs, 1)):
        build_glasses(model, processor, data, ProfileOptions(batch_size=batch_size, pooling="max"), selection,
                      out=root / f"glasses_b{batch_size}", progress=False)
    return root


def n_batches(model_and_processor, pairs, batch_size: int) -> int:
    """How many batches (one job each) profiling cuts ``pairs`` into."""
    from lmms_sgm.profiling import length_batches, token_lengths

    _, processor = model_and_processor
    return len(length_batches(token_lengths(processor, pairs, "response", batch_size), batch_size))


def same_bytes(a: Path, b: Path) -> bool:
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in ("manifest.json", "glasses.safetensors"))


def test_remote_profiling_gives_byte_identical_glasses(world, toy_jsonl, reference, tmp_path, model_and_processor,
                                                        toy_pairs):
    out = tmp_path / "glasses"
    before = completed_jobs(world)
    proc = run(profile_cmd(HUB_ID, toy_jsonl, out, "--batch-size", "4", "--remote", world["cluster"].url),
               client_env(world), out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert completed_jobs(world) - before == n_batches(model_and_processor, toy_pairs, 4)  # a job of NDIF's actor each
    assert same_bytes(out, reference / "glasses_b4")


def test_remote_generation_and_scores_equal_hooks(world, load_model, reference, toy_jsonl, tmp_path):
    import test_remote
    from lmms_sgm.interventions import SafetyGlasses

    model, processor = load_model()
    glasses_dir = reference / "glasses_b4"
    test_remote.TOY_DATA[:] = [toy_jsonl]
    want = test_remote.local_reference(model, processor, SafetyGlasses.load(glasses_dir))
    out = tmp_path / "remote.pt"
    before = completed_jobs(world)
    proc = run([sys.executable, remote_client.__file__, glasses_dir, HUB_ID, toy_jsonl, out], client_env(world))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert completed_jobs(world) - before == 2  # one generate, one scoring trace
    test_remote.assert_matches_hooks(torch.load(out, weights_only=False), want)  # tokens equal, logits within 1e-5


def test_lmms_eval_remotely_equals_the_local_run(world, tiny_dir, reference, tmp_path):
    from lmms_sgm_tasks.mm_toxic_qa.make_sample import write_sample as write_mm_toxic_qa
    from lmms_sgm_tasks.mmbench_local.make_sample import write_sample as write_mmbench

    from test_lmms_cli import run_cli
    from test_lmms_scale import answers, assert_same_answers

    tasks, glasses = "mm_toxic_qa,mmbench_local_mc", reference / "glasses_b4"
    env = {"MM_TOXIC_QA_DIR": str(write_mm_toxic_qa(tmp_path / "mm_toxic_qa")),
           "MMBENCH_LOCAL_TSV": str(write_mmbench(tmp_path / "mmbench.tsv")), "LMMS_SGM_JUDGE": "lexicon",
           "LMMS_SGM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    local = run_cli(f"pretrained={tiny_dir},glasses={glasses}", tmp_path / "local", env, tasks=tasks, limit=2)
    assert local.returncode == 0, local.stderr[-3000:]
    remote_env = {**env, **{k: v for k, v in client_env(world).items() if k.startswith(("HF_", "NDIF_", "NNSIGHT_"))}}
    PRODUCED.append(tmp_path / "remote")
    remote = run_cli(f"pretrained={HUB_ID},glasses={glasses},remote={world['cluster'].url}", tmp_path / "remote",
                     remote_env, tasks=tasks, limit=2)
    OUTPUTS.extend([remote.stdout, remote.stderr])
    assert remote.returncode == 0, remote.stderr[-3000:]
    # generations token for token; option losses from the server's process: low bits may differ
    assert_same_answers(answers(tmp_path / "remote"), answers(tmp_path / "local"), loss_tol=1e-5)


def test_diagnose_runs_remotely(world, tiny_dir, tmp_path):
    from lmms_sgm import diagnose, models, tiny
    from lmms_sgm.judges import get_judge

    twins = tiny.write_toy_twins(tmp_path / "twins", 4)
    out = tmp_path / "diag"
    proc = run([BIN / "lmms-sgm", "diagnose", "--model", HUB_ID, "--data", twins, "--remote", world["cluster"].url,
                "--samples", "2", "--limit", "1", "--no-per-layer", "--no-attention", "--out", out, "--no-progress"],
               client_env(world), out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((out / "diagnosis.json").read_text())
    assert (got["backend"], got["remote"]) == ("nnsight", world["cluster"].url)
    model, processor = models.load(str(tiny_dir))
    measured, held_out = diagnose.split_twins(diagnose.read_twins(twins))
    local = diagnose.diagnose(model, processor, measured[:1] + held_out[:1], get_judge("lexicon"), samples=2,
                              per_layer=False, attention=False, lockstep_cache=False)
    assert [r["name"] for r in got["rows"]] == [r["name"] for r in local["rows"]]
    lockstep = [(a["rate"], b["rate"]) for a, b in zip(got["rows"], local["rows"]) if a["name"].startswith("lockstep")
                or a["kind"] == "lockstep"]  # sampled by the client from its seeded generator: equal
    assert lockstep and all(a == b for a, b in lockstep)


def test_a_model_the_cluster_does_not_serve_is_one_line_exit_2(world, toy_jsonl, tmp_path):
    out = tmp_path / "g"
    proc = run(profile_cmd(NOT_SERVED, toy_jsonl, out, "--remote", world["cluster"].url), client_env(world), out)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = last_line(proc)
    assert line.startswith("lmms-sgm profile: error: the trace failed on the NDIF server"), line
    assert "Could not deploy this model" in line and NOT_SERVED in line  # NDIF's Processor's own words
    assert not out.exists() and not list(tmp_path.glob(".g*"))


def test_a_malformed_key_is_one_line_exit_2_without_the_key(world, toy_jsonl, tmp_path):
    """NDIF's auth answers a key that is not a UUID with a 400 whose detail quotes the key."""
    out = tmp_path / "g"
    wrong = "wrong-format-" + KEY[:8]
    proc = run(profile_cmd(HUB_ID, toy_jsonl, out, "--remote", world["cluster"].url),
               client_env(world, NDIF_API_KEY=wrong), out)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = last_line(proc)
    assert line.startswith("lmms-sgm profile: error: NDIF server"), line
    assert "the API key was refused" in line and "Invalid API key format" in line and "set NDIF_API_KEY" in line
    assert wrong not in proc.stdout + proc.stderr and not out.exists()


def test_an_unknown_key_is_refused_without_retries(world, load_model, toy_jsonl, monkeypatch):
    """A well-formed key NDIF's key table does not hold: 403, no retry, the key in no message."""
    from nnsight.schema.config import CONFIG

    from lmms_sgm import remote
    from lmms_sgm.options import ExecutionOptions

    waits = []
    monkeypatch.setattr(remote, "_sleep", waits.append)
    unknown = str(uuid.uuid4())
    monkeypatch.setattr(CONFIG.API, "APIKEY", unknown)
    hf, processor = load_model()
    nn_model = remote.wrap(hf, processor)
    nn_model.repo_id = HUB_ID  # all a client needs to name the model
    with pytest.raises(remote.RemoteAuthError, match=r"the API key was refused.*Invalid API key") as e:
        build_glasses(nn_model, processor, toy_jsonl, ProfileOptions(batch_size=4, pooling="max"),
                      SelectionOptions(rule="det0", top_k=60), progress=False,
                      execution=ExecutionOptions(remote=world["cluster"].url, checkpoint_dir="off", remote_retries=3))
    assert not waits and unknown not in str(e.value)


def test_a_killed_server_then_resume_after_its_restart(world, few_pairs, reference, tmp_path, model_and_processor):
    """Profiling one pair per job, the whole server (API, queue, model actor, redis) is killed
    after a few batches: one line, exit 2, the finished batches kept. Restarted, ``--resume``
    sends only the batches the checkpoint lacks, and the glasses are the local ones, bytes equal."""
    cluster = world["cluster"]
    from lmms_sgm.data import load_pairs

    total = n_batches(model_and_processor, load_pairs(few_pairs), 1)
    out = tmp_path / "glasses"
    checkpoint = tmp_path / ".glasses.ckpt"
    cmd = profile_cmd(HUB_ID, few_pairs, out, "--batch-size", "1", "--remote", cluster.url, "--remote-retries", "0")
    PRODUCED.append(tmp_path)
    OUTPUTS.append("")  # the killed run's output is read below
    child = subprocess.Popen([str(c) for c in cmd], env=client_env(world), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(list(checkpoint.glob("batch-*.safetensors"))) < 2 and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.05)
    cluster.kill()
    stdout, stderr = child.communicate(timeout=120)
    OUTPUTS.extend([stdout, stderr])
    assert child.returncode == 2, stderr[-3000:]
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("lmms-sgm profile: error: ") and "NDIF server" in line, line
    saved = len(list(checkpoint.glob("batch-*.safetensors")))
    assert 2 <= saved < total and not out.exists()

    cluster.start()  # the same ports, a fresh redis and a fresh model actor
    before = completed_jobs(world)
    proc = run(cmd + ["--resume"], client_env(world), out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert completed_jobs(world) - before == total - saved  # only the missing batches were sent
    assert same_bytes(out, reference / "glasses_b1") and not checkpoint.exists()


def test_the_key_is_in_no_file_or_output_of_ours(world):
    """Last: every output directory our commands wrote, and everything they printed, holds no key.
    NDIF's own log does: its status events carry the caller's api_key (docs/scale.md)."""
    assert OUTPUTS and all(KEY not in text for text in OUTPUTS)
    files = [p for d in PRODUCED if d.exists() for p in ([d] if d.is_file() else d.rglob("*")) if p.is_file()]
    assert len(files) > 10
    leaked = [str(p) for p in files if KEY.encode() in p.read_bytes()]
    assert not leaked, leaked
    assert any(KEY in log.read_text(errors="replace") for log in world["cluster"].logs)
