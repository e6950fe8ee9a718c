"""Running lmms-eval as a subprocess, as a user would: the demo and the sweep build their runs here.

Each run gets its folder, its exact command with its environment (shell-quoted, first line of
its log and ``command.sh``, so it can be pasted to rerun it), and fails loudly: a non-zero exit
raises with the log's last lines. No lmms-eval import: the run is a separate process.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from lmms_sgm.redaction import redact
from lmms_sgm.reports.results import find_results

DATA_ENV = ("MM_TOXIC_QA_DIR", "MMBENCH_LOCAL_TSV")


def lmms_eval_command(model_args: str, tasks: list[str] | tuple[str, ...], output_path: Path, batch_size: int,
                      limit: int | None = None, log_samples: bool = True, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """``python -m lmms_eval --model sgm_llava ...`` for one run."""
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "sgm_llava", "--model_args", model_args,
           "--tasks", ",".join(tasks), "--batch_size", str(batch_size), "--output_path", str(output_path)]
    cmd += ["--log_samples"] if log_samples else []
    cmd += ["--limit", str(limit)] if limit else []
    return cmd + list(extra)


def run_env(data_dir: Path | None = None, split: str | None = None) -> dict[str, str]:
    """The environment variables a run sets or reads: the bundled demo data of ``split`` (when
    given, from ``data_dir``; else the caller's ``MM_TOXIC_QA_DIR`` / ``MMBENCH_LOCAL_TSV``), the
    judge (and any other ``LMMS_SGM_*`` setting of the caller), offline Hub, sleeping OpenMP threads."""
    env: dict[str, str] = {}
    if split is not None:
        env["MM_TOXIC_QA_DIR"] = str(data_dir / "mm_toxic_qa" / split)
        env["MMBENCH_LOCAL_TSV"] = str(data_dir / "mmbench" / f"{split}.tsv")
    else:
        env.update({k: os.environ[k] for k in DATA_ENV if os.environ.get(k)})
    env.update({
        "LMMS_SGM_JUDGE": os.environ.get("LMMS_SGM_JUDGE", "lexicon"),
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),  # everything is local: never wait on the Hub
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),  # spinning idle threads slow small CPUs
    })
    env.update({k: v for k, v in os.environ.items() if k.startswith("LMMS_SGM_") and k not in env})
    return env


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the parent dies (``prctl(PR_SET_PDEATHSIG)``)."""
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def shell_command(env: dict[str, str], cmd: list[str]) -> str:
    """``VAR=value ... cmd args``, quoted for a POSIX shell: paste it to rerun the exact run."""
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(cmd)])


def run(name: str, cmd: list[str], env: dict[str, str], folder: Path, what: str, prefix: str = "[demo]",
        quiet: bool = False, die_with_parent: bool = False) -> Path:
    """Run ``cmd`` with ``env`` added to this process's environment; its log and ``command.sh`` go
    to ``folder``; returns the results file this run wrote. ``die_with_parent``: the child is
    killed when this process dies (Linux), so a killed sweep leaves no run writing behind it."""
    # What is written and printed: a variable named like a key (LMMS_SGM_*_TOKEN, say) or a
    # registered secret reads [redacted]; the child still gets the real values.
    command = redact(shell_command(env, cmd))
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "lmms_eval.log"
    (folder / "command.sh").write_text(
        f"#!/usr/bin/env bash\n# {what}: the exact lmms-eval run (writes another results file into {folder})\n{command}\n",
        encoding="utf-8")
    if not quiet:
        print(f"{prefix} {name}: {command}\n{prefix} {name}: log {log}", flush=True)
    t0 = time.time()
    with open(log, "w", encoding="utf-8") as f:
        f.write(command + "\n")
        f.flush()
        proc = subprocess.run(cmd, env={**os.environ, **env}, stdout=f, stderr=subprocess.STDOUT, check=False,
                              preexec_fn=_die_with_parent if die_with_parent and sys.platform == "linux" else None)
    if proc.returncode != 0:
        tail = redact("".join(log.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-30:]))
        raise ChildProcessError(f"lmms-eval failed for {name} (exit {proc.returncode}); last lines of {log}:\n{tail}")
    if not quiet:
        print(f"{prefix} {name}: done in {time.time() - t0:.0f} s", flush=True)
    return find_results(folder, newer_than=t0 - 1)
