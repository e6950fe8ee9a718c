"""Entry point for lmms-eval's ``lmms_eval.models`` group.

lmms-eval loads every entry point inside one try/except that only logs a warning, so this module
stays light: it imports no model code, only lmms-eval's manifest type. Loaded for every lmms-eval
run of this environment, it also adds our tasks to the search path and makes a failed run exit
non-zero (``exit_status.py``), whatever the model.
"""
from __future__ import annotations

from pathlib import Path

from lmms_sgm.lmms import exit_status


def tasks_dir() -> Path:
    """The folder holding our lmms-eval task YAMLs (the repo's top-level tasks/)."""
    import lmms_sgm_tasks

    return Path(lmms_sgm_tasks.__file__).parent


def manifests():
    from lmms_eval.models.registry_v2 import ModelManifest

    _add_tasks_to_search_path()
    # One model for every supported family; sgm_llava, its first name, stays an alias.
    return [ModelManifest(model_id="sgm", simple_class_path="lmms_sgm.lmms.model.SGM", aliases=("sgm_llava",))]


def _add_tasks_to_search_path() -> None:
    """lmms-eval has no task entry point; model entry points load before the CLI builds its
    TaskManager, so extend TaskManager's include path from here (``--include_path`` still works).

    The CLI builds its TaskManager first thing in each evaluation, after it has reset its logger:
    the place to install the exit-status sink too."""
    from lmms_eval.tasks import TaskManager

    if getattr(TaskManager.initialize_tasks, "_lmms_sgm", False):
        return
    original = TaskManager.initialize_tasks
    ours = str(tasks_dir())

    def initialize_tasks(self, include_path=None, include_defaults=True):
        paths = [include_path] if isinstance(include_path, str) else list(include_path or [])
        if ours not in paths:
            paths.append(ours)
        exit_status.install()
        return original(self, include_path=paths, include_defaults=include_defaults)

    initialize_tasks._lmms_sgm = True
    TaskManager.initialize_tasks = initialize_tasks
