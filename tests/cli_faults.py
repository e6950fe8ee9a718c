"""``lmms-sgm`` with faults injected from the environment, for tests that need a slow or failing run.

Run as ``python tests/cli_faults.py profile ...`` (also under ``torchrun --no-python python ...``):

* ``FAULT_BATCH_DELAY_S``: sleep this long after each checkpointed batch (a run slow enough to be
  killed mid-way);
* ``FAULT_RANK`` + ``FAULT_AT_BATCH``: the process of that rank raises on its Nth traced batch
  (1-based), as a failing forward pass would;
* ``FAULT_COUNT_DIR``: each process writes how many batches it traced to ``traced-RANK`` there
  when it ends (to see who did the work).

The faults are patched in here, so the package itself carries no test hooks.
"""
from __future__ import annotations

import os
import sys
import time


def install() -> None:
    from lmms_sgm import checkpoint, profiling

    delay = float(os.environ.get("FAULT_BATCH_DELAY_S", "0"))
    if delay:
        save = checkpoint.Checkpoint.save

        def slow_save(self, *args, **kwargs):
            save(self, *args, **kwargs)
            time.sleep(delay)

        checkpoint.Checkpoint.save = slow_save
    me = os.environ.get("RANK", "0")
    fail = os.environ.get("FAULT_RANK") == me
    at = int(os.environ.get("FAULT_AT_BATCH", "1"))
    count_dir = os.environ.get("FAULT_COUNT_DIR")
    trace = profiling._trace_batch
    calls = [0]

    def traced(*args, **kwargs):
        calls[0] += 1
        if fail and calls[0] == at:
            raise RuntimeError(f"injected fault in batch call {at} of process {me}")
        return trace(*args, **kwargs)

    profiling._trace_batch = traced
    if count_dir:
        import atexit
        from pathlib import Path

        atexit.register(lambda: (Path(count_dir) / f"traced-{me}").write_text(str(calls[0])))


if __name__ == "__main__":
    install()
    from lmms_sgm.cli import main

    sys.exit(main(sys.argv[1:]))
