"""Make a failed lmms-eval run exit non-zero (lmms-eval 0.7.3 exits 0).

lmms-eval 0.7.3's ``cli_evaluate`` catches every exception of an evaluation, prints it, logs
``Error during evaluation: ...`` at ERROR and returns, so ``lmms-eval`` and ``python -m lmms_eval``
exit 0 (only ``--verbosity DEBUG`` re-raises). Our entry point is loaded while
``lmms_eval.__main__`` is still being imported, so ``cli_evaluate`` cannot be wrapped; an atexit
handler cannot change the status (``sys.exit`` there is ignored, ``os._exit`` skips the other
handlers); ``sys.exit(main())`` in the console script has already looked ``sys.exit`` up.

What is left, and used here: every ERROR record logged by the CLI module ``lmms_eval.__main__``
marks a run that failed (in 0.7.3 three sites, all fatal: the catch-all above, "Tasks were not
found", "Need to specify task to evaluate."; ``tests/test_lmms_cli.py`` pins that list). A loguru
sink installed after the CLI has reset its logger (from our ``TaskManager.initialize_tasks``
wrapper, see ``registration.py``) raises ``SystemExit(1)`` on such a record. ``SystemExit`` is not
an ``Exception``: it leaves lmms-eval's ``except Exception`` block and ends the process normally
(atexit handlers, flushed output) with status 1, after lmms-eval's own sinks printed the error.
Limits (docs/footguns.md): the remaining entries of a multi-entry ``--config`` do not run; the
sink is installed for every lmms-eval run of this environment, whatever the model.
"""
from __future__ import annotations

import contextlib
import sys

CLI_MODULE = "lmms_eval.__main__"
ERROR_LEVEL = 40  # loguru's ERROR
STATUS = 1

_sink_id: int | None = None


def is_run_failure(record) -> bool:
    """A loguru record that means the lmms-eval run failed: ERROR or worse from the CLI module."""
    return record["level"].no >= ERROR_LEVEL and record["name"] == CLI_MODULE


def _exit_on_failure(message) -> None:
    print(f"lmms_sgm: lmms-eval reported a failed run (the ERROR above); exiting with status {STATUS}, "
          "not lmms-eval's 0 (lmms_sgm docs/footguns.md)", file=sys.stderr, flush=True)
    raise SystemExit(STATUS)


def install() -> None:
    """Add the sink (again): the CLI removes every loguru sink once, before its first TaskManager.

    Idempotent: a previous sink of ours, if the logger still holds it, is replaced."""
    global _sink_id
    from loguru import logger

    if _sink_id is not None:
        with contextlib.suppress(ValueError):  # already removed by the CLI's logger reset
            logger.remove(_sink_id)
    _sink_id = logger.add(_exit_on_failure, level=ERROR_LEVEL, filter=is_run_failure, format="{message}", catch=False)
