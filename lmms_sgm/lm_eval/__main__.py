"""``lm-eval-sgm`` (or ``python -m lmms_sgm.lm_eval``): lm-eval's own command line, with the
``sgm_hf`` model registered and lmms_sgm's text tasks (``tasks_lm_eval/``) on the task search path.

    lm-eval-sgm --model sgm_hf --model_args pretrained=DIR,glasses=GLASSES \\
        --tasks sgm_text_ppl,sgm_text_toxicity --device cpu --output_path runs/sgm --log_samples

Why a launcher: lm-eval 0.4.13 resolves ``--model NAME`` only from its own table
(``lm_eval/models/__init__.py``) and from ``@register_model`` classes imported before the run; it
loads no entry points for models (lm_eval/api/registry.py) and ``--include_path`` only adds task
folders, whose Python files are imported after the model is built. So plain ``lm-eval --model
sgm_hf`` cannot work; this is lm-eval's own ``cli_evaluate`` after one import (every argument,
subcommand -- ``run``, ``ls``, ``validate`` -- and exit status is lm-eval's).
"""
from __future__ import annotations

import sys
from pathlib import Path


def tasks_dir() -> Path:
    """The folder holding our lm-eval task YAMLs (the repo's top-level tasks_lm_eval/)."""
    import lmms_sgm_lm_eval_tasks

    return Path(lmms_sgm_lm_eval_tasks.__file__).parent


def add_tasks_to_search_path() -> None:
    """Every TaskManager of this process also indexes our tasks. lm-eval's CLI takes a single
    ``--include_path``; a user's path is kept, ours appended (idempotent)."""
    from lm_eval.tasks import TaskManager

    if getattr(TaskManager.__init__, "_lmms_sgm", False):
        return
    original = TaskManager.__init__
    ours = str(tasks_dir())

    def __init__(self, verbosity=None, include_path=None, *args, **kwargs):
        paths = list(include_path) if isinstance(include_path, (list, tuple)) else [include_path] if include_path else []
        if ours not in map(str, paths):
            paths.append(ours)
        original(self, verbosity, paths, *args, **kwargs)

    __init__._lmms_sgm = True
    TaskManager.__init__ = __init__


def main(argv: list[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    import lmms_sgm.lm_eval.model  # noqa: F401 -- registers sgm_hf

    add_tasks_to_search_path()
    sys.argv = ["lm-eval-sgm", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
