"""Nothing of the user's lost, no half-written outputs (issue 22): ``--overwrite`` removes only what
the command wrote, ``report`` refuses earlier report files, every output file is written whole or
not at all on a full disk, a killed run's staging folders are removed by the next run, and one run
at a time writes an output (a lock naming the pid of the run holding it).

Full disk, two ways: a real tmpfs of a few KiB filled up (``ENOSPC``; needs root and ``mount``,
skipped otherwise with the reason) and, always, the process's file-size limit at 0 bytes
(``RLIMIT_FSIZE``: every write fails with ``EFBIG``, as on a full disk a write fails mid-file), in
a child process so the limit touches nothing else. Both fail the writes of any code, old or new.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmms_sgm import staging
from lmms_sgm.cli import main
from lmms_sgm.datasets import miniature as mini

LMMS_SGM = str(Path(sys.executable).with_name("lmms-sgm"))
SRC = str(Path(__file__).resolve().parents[1])


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------- --overwrite


@pytest.fixture(scope="module")
def jsonl_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    return f"jsonl:{mini.write_ours(root / 'ours', pairs=8, prompts=6)}"


def test_dataset_build_overwrite_refuses_a_folder_holding_a_users_file(jsonl_source, tmp_path, capsys):
    """Before: exit 0 and notes.txt gone. Now: exit 2, one line naming it, every file as it was."""
    out = tmp_path / "ds"
    argv = ["dataset", "build", "--source", jsonl_source, "--out", str(out), "--quiet"]
    assert main(argv) == 0
    capsys.readouterr()
    (out / "notes.txt").write_text("my notes on this build")
    (out / "eval" / "test" / "mine.jsonl").write_text("{}\n")
    before = _files(out)
    assert main([*argv, "--overwrite", "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmms-sgm dataset: error: ")
    assert "holds files the build did not write (eval/test/mine.jsonl, notes.txt)" in err and "nothing was deleted" in err
    assert _files(out) == before and sorted(os.listdir(tmp_path)) == ["ds"]
    # Once the user's files are gone, --overwrite replaces the build whole, and lists what it wrote.
    (out / "notes.txt").unlink()
    (out / "eval" / "test" / "mine.jsonl").unlink()
    assert main([*argv, "--overwrite", "--seed", "3"]) == 0
    assert json.loads((out / "manifest.json").read_text())["options"]["seed"] == 3
    marker = staging.read_marker(out)
    assert marker["command"] == "dataset build" and marker["files"] == staging.output_files(out)
    assert "profile.jsonl" in marker["files"] and "manifest.json" in marker["files"]
    assert sorted(os.listdir(tmp_path)) == ["ds"]  # no staging folder, no lock left


def test_command_output_overwrite_keeps_a_users_file(tmp_path):
    """quickstart / train-demo (``command_output``): before, the earlier output was removed whole
    (rmtree), a file the user put there with it."""
    out = tmp_path / "work"
    with staging.command_output(out, "quickstart") as tmp:
        (tmp / "model").mkdir()
        (tmp / "model" / "config.json").write_text("{}")
    (out / "model" / "README.md").write_text("mine")
    with pytest.raises(FileExistsError, match=r"did not write \(model/README.md\)"), \
            staging.command_output(out, "quickstart") as tmp:
        (tmp / "model").mkdir()
    assert _files(out)["model/README.md"] == b"mine" and sorted(os.listdir(tmp_path)) == ["work"]
    (out / "model" / "README.md").unlink()
    with staging.command_output(out, "quickstart") as tmp:
        (tmp / "data.jsonl").write_text("new")
    assert set(_files(out)) == {"data.jsonl", staging.MARKER}


def test_a_file_the_user_adds_during_the_run_is_seen_at_the_swap(tmp_path):
    """The check runs again at the swap: a file that appeared meanwhile is refused, not replaced."""
    out = tmp_path / "work"
    with staging.command_output(out, "tiny") as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(FileExistsError, match=r"did not write \(late.txt\)"), staging.command_output(out, "tiny") as tmp:
        (tmp / "b").write_text("2")
        (out / "late.txt").write_text("written by the user meanwhile")
    assert _files(out) == {"a": b"1", "late.txt": b"written by the user meanwhile",
                           staging.MARKER: (out / staging.MARKER).read_bytes()}
    assert sorted(os.listdir(tmp_path)) == ["work"]


# ----------------------------------------------------------------------------- report


def _results(harm: float, acc: float) -> dict:
    return {"results": {"mm_toxic_qa": {"harmful_rate,none": harm, "harmful_rate_stderr_clt,none": 0.02},
                        "mmbench_local_mc": {"acc,none": acc, "acc_stderr,none": 0.02}},
            "higher_is_better": {"mm_toxic_qa": {"harmful_rate": False}, "mmbench_local_mc": {"acc": True}},
            "n-samples": {t: {"original": 40, "effective": 40} for t in ("mm_toxic_qa", "mmbench_local_mc")},
            "config": {"model": "sgm_llava", "limit": None}}


@pytest.fixture
def runs(tmp_path):
    paths = []
    for name, harm, acc in (("vanilla", 0.45, 0.8), ("sgm", 0.15, 0.75)):
        p = tmp_path / "runs" / name / "m" / "20260101_000000_results.json"
        p.parent.mkdir(parents=True)
        p.write_text(json.dumps(_results(harm, acc)))
        paths.append(str(tmp_path / "runs" / name))
    return paths


def test_report_refuses_earlier_report_files_unless_overwrite(runs, tmp_path, capsys):
    out = tmp_path / "rep"
    out.mkdir()
    (out / "report.md").write_text("my earlier report, edited by hand")
    (out / "notes.txt").write_text("mine")
    js = tmp_path / "r.json"
    assert main(["report", *runs, "--out", str(out), "--json", str(js)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmms-sgm report: error: ")
    assert f"{out / 'report.md'} exist(s) from an earlier report; pass --overwrite" in err
    assert _files(out) == {"report.md": b"my earlier report, edited by hand", "notes.txt": b"mine"} and not js.exists()
    assert main(["report", *runs, "--out", str(out), "--json", str(js), "--overwrite"]) == 0
    capsys.readouterr()
    assert sorted(_files(out)) == ["notes.txt", "report.html", "report.json", "report.md"]
    assert _files(out)["notes.txt"] == b"mine" and "sgm" in (out / "report.md").read_text()
    assert json.loads(js.read_text())["runs"][1]["label"] == "sgm"
    assert main(["report", *runs, "--json", str(js)]) == 2  # --json alone: an existing file is refused too
    assert f"{js} exist(s) from an earlier report" in capsys.readouterr().err


# -------------------------------------------------------------------------- full disk


_FULL_CHILD = """
import resource, signal, sys
import lmms_sgm.cli, lmms_sgm.distributed, lmms_sgm.data, lmms_sgm.reports.cli, lmms_sgm.datasets.cli  # loaded first
import lmms_sgm.datasets.check, lmms_sgm.staging
if sys.argv[1] == "full":  # from here on every write to a file fails, as on a full disk
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
sys.argv[0] = "lmms-sgm"
sys.exit(lmms_sgm.cli.main(sys.argv[2:]))
"""


def _cli(args, *, full: bool):
    """``lmms-sgm ARGS`` in a child; ``full``: once its modules are loaded, its writes to files fail
    (file-size limit 0: ``EFBIG``, "File too large")."""
    return subprocess.run([sys.executable, "-c", _FULL_CHILD, "full" if full else "room", *args], capture_output=True, check=False,
                          text=True, timeout=300, cwd=SRC)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real file system with no space left: a 64 KiB tmpfs, filled. Skipped where it cannot be mounted."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the RLIMIT_FSIZE variant of this test runs instead")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True, check=False, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); the RLIMIT_FSIZE variant runs instead")
    try:
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 512)
        except OSError as e:
            assert e.errno == errno.ENOSPC
        finally:
            os.close(fd)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _no_partial_files(folder: Path) -> list[str]:
    """Files a failed write left: empty or temporary ones."""
    return sorted(p.name for p in folder.rglob("*") if p.is_file() and p.name != "filler"
                  and (p.stat().st_size == 0 or ".tmp-" in p.name))


@pytest.fixture(scope="module")
def text_source(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    rows = [{"text": f"answer {i} " + ("you idiot" if i % 2 else "a kind reply"), "label": i % 2} for i in range(12)]
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "pairs.jsonl"


@pytest.mark.parametrize("how", ["fsize", "tmpfs"])
def test_text_pairs_on_a_full_disk_leaves_no_file_and_a_rerun_works(how, text_source, tmp_path, request):
    """Before: a 0-byte file, and the rerun then failed with 'exists'."""
    folder = request.getfixturevalue("tiny_tmpfs") if how == "tmpfs" else tmp_path / "out"
    folder.mkdir(exist_ok=True)
    target = folder / "texts.jsonl"
    r = _cli(["text-pairs", str(text_source), str(target)], full=how == "fsize")
    assert r.returncode == 2, r.stderr
    assert not target.exists() and _no_partial_files(folder) == []
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("lmms-sgm text-pairs: error: ")
    assert str(target) in r.stderr and ("No space left" in r.stderr or "File too large" in r.stderr)
    if how == "tmpfs":
        (folder / "filler").unlink()  # space again
    r = _cli(["text-pairs", str(text_source), str(target)], full=False)
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["text"] for line in target.read_text().splitlines()][:2] == ["answer 0 a kind reply",
                                                                                          "answer 1 you idiot"]


@pytest.mark.parametrize("how", ["fsize", "tmpfs"])
def test_report_on_a_full_disk_leaves_no_empty_report(how, runs, tmp_path, request):
    folder = request.getfixturevalue("tiny_tmpfs") if how == "tmpfs" else tmp_path / "out"
    folder.mkdir(exist_ok=True)
    out = folder / "rep"
    if how == "tmpfs":
        out.mkdir()  # a folder takes no data blocks; its files need them
    r = _cli(["report", *runs, "--out", str(out), "--json", str(folder / "r.json")], full=how == "fsize")
    assert r.returncode == 2, r.stderr
    assert _no_partial_files(folder) == []
    assert r.stderr.count("\n") == 1 and str(out / "report.html") in r.stderr
    assert not (out / "report.html").exists() and not (folder / "r.json").exists()


def test_report_on_a_full_disk_keeps_the_earlier_report_whole(runs, tmp_path):
    out = tmp_path / "rep"
    assert _cli(["report", *runs, "--out", str(out)], full=False).returncode == 0
    before = _files(out)
    r = _cli(["report", *runs, "--out", str(out), "--overwrite"], full=True)
    assert r.returncode == 2 and str(out / "report.html") in r.stderr
    assert _files(out) == before and _no_partial_files(tmp_path) == []


@pytest.mark.parametrize("how", ["fsize", "tmpfs"])
def test_dataset_check_json_on_a_full_disk_leaves_no_empty_file(how, jsonl_source, tmp_path, request):
    ds = tmp_path / "ds"
    assert main(["dataset", "build", "--source", jsonl_source, "--out", str(ds), "--quiet"]) == 0
    folder = request.getfixturevalue("tiny_tmpfs") if how == "tmpfs" else tmp_path / "out"
    folder.mkdir(exist_ok=True)
    target = folder / "check.json"
    r = _cli(["dataset", "check", str(ds), "--json", str(target)], full=how == "fsize")
    assert r.returncode == 2, r.stderr
    assert not target.exists() and _no_partial_files(folder) == []
    assert r.stderr.startswith("lmms-sgm dataset: error: ") and str(target) in r.stderr


def test_atomic_write_on_enospc_leaves_the_old_file_and_names_the_new_one(tmp_path, monkeypatch):
    """The helper itself, with ``os.write`` failing after part of the data (a disk filling up)."""
    target = tmp_path / "table.json"
    staging.atomic_write(target, "old contents\n")
    real_write, calls = os.write, []

    def write_then_full(fd, data):
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, bytes(data)[:5])  # a short write first: the rest is retried, and fails

    monkeypatch.setattr(staging.os, "write", write_then_full)
    with pytest.raises(OSError, match="No space left on device") as e:
        staging.atomic_write(target, "new contents, longer than five bytes\n")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)
    assert calls[0] == len("new contents, longer than five bytes\n") and calls[1] == calls[0] - 5
    monkeypatch.undo()
    assert target.read_text() == "old contents\n" and os.listdir(tmp_path) == ["table.json"]


def test_atomic_write_exclusive_refuses_an_existing_file(tmp_path):
    target = tmp_path / "t.jsonl"
    target.write_text("mine\n")
    with pytest.raises(FileExistsError, match=r"t\.jsonl"):
        staging.atomic_write(target, "other\n", exclusive=True)
    assert target.read_text() == "mine\n" and os.listdir(tmp_path) == ["t.jsonl"]


# ------------------------------------------------------------- staging folders of a killed run


def _child(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], cwd=SRC, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc, seconds=150):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)


def test_a_killed_runs_staging_folder_is_removed_by_the_next_run(tmp_path):
    """``tune`` / ``self-label`` / ``tiny`` / ``diagnose`` (``new_output``): SIGKILL while writing, then run again."""
    out = tmp_path / "tune_out"
    code = (f"import time\nfrom lmms_sgm.staging import new_output\nwith new_output({str(out)!r}) as tmp:\n"
            "    (tmp / 'table.md').write_text('half')\n    print(tmp, flush=True)\n    time.sleep(600)\n")
    proc = _child(code)
    staged = Path(proc.stdout.readline().strip())
    assert staged.parent == tmp_path and staged.name.startswith(".tune_out.tmp-")
    proc.kill()
    proc.wait()
    assert staged.name in os.listdir(tmp_path)  # what a SIGKILL leaves (and its lock file, free)
    with staging.new_output(out) as tmp:
        (tmp / "table.md").write_text("whole")
    assert sorted(os.listdir(tmp_path)) == ["tune_out"] and (out / "table.md").read_text() == "whole"
    assert f"-{proc.pid}-" in staged.name  # the owner, by which the next run knew it was dead


def test_only_staging_folders_of_dead_owners_on_this_host_are_removed(tmp_path):
    out = tmp_path / "g"
    host = staging._host()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=False, text=True)
    dead_pid = int(dead.stdout)
    names = {"dead": f".g.tmp-0123abcd-{dead_pid}-{host}", "live": f".g.tmp-89abcdef-{os.getppid()}-{host}",
             "old": f".g.old-00000000-{dead_pid}-{host}", "other_host": f".g.tmp-11111111-{dead_pid}-elsewhere.example",
             "no_owner": ".g.tmp-22222222", "other_output": f".h.tmp-33333333-{dead_pid}-{host}"}
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "x").write_text("x")
    removed = staging.remove_stale_siblings(out)
    assert sorted(p.name for p in removed) == sorted([names["dead"], names["old"]])
    assert sorted(os.listdir(tmp_path)) == sorted(names[k] for k in ("live", "other_host", "no_owner", "other_output"))


# ---------------------------------------------------------------------------------- locks


def _holding_lock(out: Path) -> subprocess.Popen:
    proc = _child(f"import time\nfrom lmms_sgm.staging import output_lock\nwith output_lock({str(out)!r}):\n"
                  "    print('held', flush=True)\n    time.sleep(600)\n")
    assert proc.stdout.readline().strip() == "held", proc.communicate()
    return proc


def test_a_second_run_on_a_locked_output_fails_at_once_naming_the_first(jsonl_source, tmp_path, capsys):
    out = tmp_path / "ds"
    holder = _holding_lock(out)
    try:
        t0 = time.monotonic()
        assert main(["dataset", "build", "--source", jsonl_source, "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"another run (pid {holder.pid}) is writing {out}" in err
        assert time.monotonic() - t0 < 10 and not out.exists()
        assert main(["tiny", str(out)]) == 2  # any staged output: the same lock
        assert f"(pid {holder.pid}) is writing" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    # The holder was killed: its lock file is still there, but free, and taken over.
    assert (tmp_path / ".ds.lock").exists()
    assert main(["dataset", "build", "--source", jsonl_source, "--out", str(out), "--quiet"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["ds"]


def test_a_lock_is_reentrant_in_its_process_and_released_on_error(tmp_path):
    out = tmp_path / "o"
    with pytest.raises(RuntimeError), staging.output_lock(out), staging.output_lock(out):
        assert json.loads((tmp_path / ".o.lock").read_text())["pid"] == os.getpid()
        raise RuntimeError
    assert os.listdir(tmp_path) == []
    missing = tmp_path / "a" / "b" / "o"
    with staging.output_lock(missing):
        assert (tmp_path / "a" / "b" / ".o.lock").is_file()
    assert os.listdir(tmp_path) == []  # the parents it made for its lock, removed again


def test_profile_twice_on_one_output_and_a_killed_profile_resumed(tiny_dir, toy_jsonl, tmp_path):
    """Two real ``lmms-sgm profile --out SAME``: the second fails at once naming the first's pid
    (before: told to --resume the checkpoint the first was writing). The first is then killed
    (SIGKILL): ``--resume`` takes over its lock, finishes, and leaves no staging folder (before:
    its ``.g.tmp-*`` stayed)."""
    rows = [json.loads(line) for line in toy_jsonl.read_text().splitlines()]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(dict(r, image=str(toy_jsonl.parent / r["image"]))) + "\n" for r in rows * 40))
    runs = tmp_path / "runs"
    runs.mkdir()
    args = ["profile", "--model", str(tiny_dir), "--data", str(data), "--out", str(runs / "g"), "--no-progress",
            "--batch-size", "4"]
    first = subprocess.Popen([LMMS_SGM, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ckpt = runs / ".g.ckpt"
        _wait_for(lambda: ckpt.is_dir() and any(e.startswith("batch-") for e in os.listdir(ckpt)), first)
        second = subprocess.run([LMMS_SGM, *args], capture_output=True, check=False, text=True, timeout=300)
        assert first.poll() is None, "the first run ended before the second started"
        assert second.returncode == 2, second.stderr
        assert second.stderr.count("\n") == 1
        assert f"lmms-sgm profile: error: another run (pid {first.pid}) is writing {runs / 'g'}" in second.stderr
        assert "--resume" not in second.stderr
        first.kill()
        first.wait()
    finally:
        first.kill()
    left = sorted(os.listdir(runs))
    assert ".g.ckpt" in left and ".g.lock" in left and any(e.startswith(".g.tmp-") for e in left), left
    resumed = subprocess.run([LMMS_SGM, *args, "--resume"], capture_output=True, check=False, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(os.listdir(runs)) == ["g"]
    assert sorted(os.listdir(runs / "g")) == ["glasses.safetensors", "manifest.json"]


def test_a_killed_tune_leaves_a_staging_folder_the_next_tune_removes(tiny_dir, toy_jsonl, tmp_path):
    """The real command: ``lmms-sgm tune`` SIGKILLed while it works, then run again to the end."""
    from lmms_sgm.tiny import write_toy_validation

    val = write_toy_validation(tmp_path / "val", 2)
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps([{"name": "paper", "data": "toy"}]))
    runs = tmp_path / "runs"
    runs.mkdir()
    args = [LMMS_SGM, "tune", "--model", str(tiny_dir), "--data", f"toy={toy_jsonl}", "--val", str(val), "--grid",
            str(grid), "--samples", "2", "--out", str(runs / "t"), "--no-progress"]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: any(e.startswith(".t.tmp-") for e in os.listdir(runs)), first)
        first.kill()
        first.wait()
    finally:
        first.kill()
    assert first.returncode == -signal.SIGKILL
    assert any(e.startswith(".t.tmp-") for e in os.listdir(runs))
    again = subprocess.run(args, capture_output=True, check=False, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert sorted(os.listdir(runs)) == ["t"] and {"table.md", "table.json"} <= set(os.listdir(runs / "t"))
