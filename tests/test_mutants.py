"""The fast mutation check: each bug of tests/mutants.py, applied to a copy of the sources, makes
its targeted tests fail (docs/testing.md). One copy per session; each mutant is written into it,
its tests run in a fresh interpreter whose working directory is the copy (so ``lmms_sgm`` and
``lmms_sgm_tasks`` import from there, ahead of the editable install), then the file is restored.

About 5 minutes on two cores; ``-m "not mutation"`` leaves it out while iterating.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mutants import MUTANTS

REPO = Path(__file__).resolve().parents[1]
COPIED = ("lmms_sgm", "tasks", "tasks_lm_eval", "tests", "pyproject.toml")
# The installed package names of the two folders whose import name is not their folder's name.
ALIASES = {"lmms_sgm_tasks": "tasks", "lmms_sgm_lm_eval_tasks": "tasks_lm_eval"}

pytestmark = pytest.mark.mutation


@pytest.fixture(scope="module")
def copy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mutants")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in COPIED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=ignore)
        else:
            shutil.copy2(src, root / name)
    for alias, folder in ALIASES.items():
        (root / alias).symlink_to(folder, target_is_directory=True)
    return root


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "LMMS_SGM_JUDGE", "MM_TOXIC_QA"))}
    env.update(PYTHONDONTWRITEBYTECODE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def test_the_copy_is_what_the_tests_there_import(copy):
    """Otherwise a mutant would be 'caught' or 'missed' by tests of the unmutated install."""
    code = ("import lmms_sgm.interventions.sgm, lmms_sgm_tasks.mm_toxic_qa.core as c, lmms_sgm.lmms.model as m;"
            "print(lmms_sgm.interventions.sgm.__file__); print(c.__file__); print(m.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=copy, env=_env(), capture_output=True, text=True, check=True)
    files = [Path(line) for line in out.stdout.split()]
    assert len(files) == 3 and all(str(f).startswith(str(copy)) for f in files), out.stdout


def test_mutant_names_are_unique_and_their_tests_exist():
    assert len({m.name for m in MUTANTS}) == len(MUTANTS)
    for m in MUTANTS:
        for node in m.tests:
            path, _, name = node.partition("::")
            assert re.search(rf"^def {re.escape(name)}\(", (REPO / path).read_text(), re.MULTILINE), node


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_mutant_is_killed(mutant, copy):
    target = copy / mutant.path
    source = target.read_text()
    assert source.count(mutant.original) == 1, f"{mutant.path}: the mutant's snippet must occur exactly once"
    target.write_text(source.replace(mutant.original, mutant.mutated))
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--no-header",
                               "-o", "addopts=", *mutant.tests],
                              cwd=copy, env=_env(), capture_output=True, text=True, timeout=900, check=False)
    finally:
        target.write_text(source)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    # Killed: a test failed on an assertion; an error (collection, fixture) would prove nothing.
    assert proc.returncode == 1 and " failed" in summary and " error" not in summary, \
        f"{mutant.name} survived ({mutant.why}):\n{summary}\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}"
