"""`lmms-sgm profile` over several processes (torchrun, gloo on CPU) and after a real SIGKILL.

The reference is a plain single-process CLI run. Two processes must write byte-identical glasses
(same batches, same bits: the batch plan does not depend on the number of processes), with the
work actually shared; a failure in one process must stop both with one message and a non-zero
exit, never hang; a run killed with SIGKILL must resume (here with two processes) to the same
glasses, tracing only the missing batches; a resume with other data is refused.

Faults and delays are injected by tests/cli_faults.py, not by the package.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmms_sgm.checkpoint import KEY_FILE, default_dir
from lmms_sgm.cli import main
from lmms_sgm.tiny import write_toy_pairs

BIN = Path(sys.executable).parent
FAULTS = str(Path(__file__).with_name("cli_faults.py"))
# --standalone: a free rendezvous port on localhost (other runs on this machine may hold 29500).
TORCHRUN = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python"]
LAUNCH_ENVS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def env(**extra) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENVS and not k.startswith("FAULT_")}
    # One thread everywhere: torchrun gives its workers OMP_NUM_THREADS=1; the reference gets the same.
    base.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    base.update({k: str(v) for k, v in extra.items()})
    return base


def profile_args(model, data, out, *extra) -> list[str]:
    return ["profile", "--model", str(model), "--data", str(data), "--out", str(out), "--no-progress",
            "--batch-size", "2", "--pooling", "max", *extra]


def run(cmd, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, **kwargs)


def glasses_bytes(path: Path) -> dict:
    return {name: (path / name).read_bytes() for name in ("manifest.json", "glasses.safetensors")}


def traced(count_dir: Path) -> dict[str, int]:
    return {p.name: int(p.read_text()) for p in sorted(count_dir.glob("traced-*"))}


@pytest.fixture(scope="module")
def reference(tiny_dir, toy_jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "glasses"
    proc = run([str(BIN / "lmms-sgm"), *profile_args(tiny_dir, toy_jsonl, out)], env=env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_two_processes_write_the_single_process_glasses_and_share_the_work(reference, tiny_dir, toy_jsonl, tmp_path):
    out = tmp_path / "glasses"
    counts = tmp_path / "counts"
    counts.mkdir()
    proc = run(TORCHRUN + [sys.executable, FAULTS, *profile_args(tiny_dir, toy_jsonl, out)],
               env=env(FAULT_COUNT_DIR=counts))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1  # process 0 alone writes and prints
    assert glasses_bytes(out) == glasses_bytes(reference)
    shares = traced(counts)
    assert set(shares) == {"traced-0", "traced-1"} and min(shares.values()) >= 1, shares
    assert abs(shares["traced-0"] - shares["traced-1"]) <= 1  # handed out in rounds
    assert not default_dir(out).exists() and sorted(p.name for p in tmp_path.iterdir()) == ["counts", "glasses"]


def test_a_failure_in_one_process_stops_both_with_one_message(tiny_dir, toy_jsonl, tmp_path):
    out = tmp_path / "glasses"
    started = time.monotonic()
    proc = run(TORCHRUN + [sys.executable, FAULTS, *profile_args(tiny_dir, toy_jsonl, out)],
               env=env(FAULT_RANK=1, FAULT_AT_BATCH=2))
    assert proc.returncode != 0
    assert time.monotonic() - started < 120  # no hang until a timeout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lmms-sgm profile")]
    expected = ("lmms-sgm profile: error: process 1 of 2 failed: RuntimeError: injected fault in batch call 2 "
                "of process 1")
    assert errors == [expected], proc.stderr[-3000:]
    assert not out.exists()


def test_an_existing_output_is_refused_by_process_0_and_every_process_stops(reference, tiny_dir, toy_jsonl):
    proc = run(TORCHRUN + [str(BIN / "lmms-sgm"), *profile_args(tiny_dir, toy_jsonl, reference)], env=env())
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lmms-sgm profile")]
    assert len(errors) == 1 and "exists and is not empty" in errors[0], proc.stderr[-3000:]


def test_a_sigkilled_run_resumes_under_two_processes_to_the_same_glasses(reference, tiny_dir, toy_jsonl, tmp_path, capsys):
    out = tmp_path / "glasses"
    ckpt = default_dir(out)
    cmd = [sys.executable, FAULTS, *profile_args(tiny_dir, toy_jsonl, out)]
    victim = subprocess.Popen(cmd, env=env(FAULT_BATCH_DELAY_S=0.5), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(list(ckpt.glob("batch-*.safetensors"))) < 3:
            assert victim.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpointed batch within 120 s"
            time.sleep(0.05)
        victim.send_signal(signal.SIGKILL)
    finally:
        victim.kill()
        victim.wait()
    total = json.loads((ckpt / KEY_FILE).read_text())["batches"]["count"]
    done = len(list(ckpt.glob("batch-*.safetensors")))
    assert 3 <= done < total and not out.exists()

    # Other data: refused; the same command without --resume: refused. Nothing is lost.
    other = write_toy_pairs(tmp_path / "other", n=20, seed=3)
    assert main(profile_args(tiny_dir, other, out, "--resume")) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "data differ" in err, err
    assert main(profile_args(tiny_dir, toy_jsonl, out)) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert len(list(ckpt.glob("batch-*.safetensors"))) == done

    counts = tmp_path / "counts"
    counts.mkdir()
    proc = run(TORCHRUN + [sys.executable, FAULTS, *profile_args(tiny_dir, toy_jsonl, out, "--resume")],
               env=env(FAULT_COUNT_DIR=counts))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sum(traced(counts).values()) == total - done  # no batch lost or traced twice
    assert glasses_bytes(out) == glasses_bytes(reference)
    assert not ckpt.exists()


def test_device_auto_spreads_one_model_and_gives_the_same_glasses(tiny_dir, toy_jsonl, tmp_path, reference):
    """device=auto (device_map="auto": every visible GPU, here the CPU) in one process."""
    out = tmp_path / "glasses"
    assert main(profile_args(tiny_dir, toy_jsonl, out, "--device", "auto")) == 0
    got, want = glasses_bytes(out), glasses_bytes(reference)
    assert got["manifest.json"] == want["manifest.json"]  # same options, data and model fingerprint
    from lmms_sgm.interventions import SafetyGlasses

    assert SafetyGlasses.load(out).digest() == SafetyGlasses.load(reference).digest()


@pytest.mark.parametrize("device, expect", [("cuda", "cuda:1"), ("cpu", "cpu"), ("cuda:0", None), ("auto", None)])
def test_under_several_processes_each_takes_its_own_gpu(device, expect):
    from lmms_sgm.distributed import TorchGroup

    group = object.__new__(TorchGroup)  # the device rule alone, without joining a process group
    group.world_size, group.rank, group.local_rank = 2, 1, 1
    if expect is None:
        with pytest.raises(ValueError, match="each process takes its own GPU"):
            group.device(device)
    else:
        assert group.device(device) == expect


def test_on_a_multi_node_run_the_gpu_is_the_local_rank_not_the_global_rank(monkeypatch):
    """Second node of two with four GPUs each: process RANK=5 is LOCAL_RANK=1 there, so its GPU (the
    device it loads on, the one nccl binds, the one it exchanges through) is cuda:1; cuda:5 does not
    exist on that node. The process group is stubbed: no GPU and no peers needed."""
    import torch.distributed as dist

    from lmms_sgm.distributed import TorchGroup, from_env

    for k in LAUNCH_ENVS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(calls) and calls[-1][0] == "init")
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend, kw["init_method"])))
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a: calls.append(("destroy",)))
    group = from_env()
    assert isinstance(group, TorchGroup) and (group.rank, group.local_rank, group.world_size) == (5, 1, 8)
    assert not group.is_main
    assert calls == [("set_device", 1), ("init", "nccl", "env://")]
    assert group.device("cuda") == "cuda:1" and group.comm == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="device=cuda:5 under 8 processes"):
        group.device("cuda:5")
    group.close()
    assert calls[-1] == ("destroy",)


def test_bare_flags():
    from lmms_sgm.cli import build_parser
    from lmms_sgm.options import ExecutionOptions, from_namespace

    def parse(*extra):
        return from_namespace(ExecutionOptions, build_parser().parse_args(
            ["profile", "--model", "m", "--data", "d", "--out", "o", *extra]))

    assert parse() == ExecutionOptions()
    assert parse("--resume").resume is True and parse("--resume", "false").resume is False
    assert parse("--remote").remote == "ndif" and parse("--remote", "local").remote == "local"
    assert parse("--remote", "http://h:1", "--remote-retries", "0").remote_retries == 0
