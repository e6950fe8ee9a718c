"""Every package folder is declared in pyproject.toml (the list is explicit, see the comment there)."""
from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_declared():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(config["packages"])
    found = set()
    for top, name in (("lmms_sgm", "lmms_sgm"), ("tasks", "lmms_sgm_tasks")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top)
            found.add(".".join([name, *rel.parts]))
    assert found == declared


def test_tasks_package_is_the_repo_tasks_folder():
    import lmms_sgm_tasks

    assert Path(lmms_sgm_tasks.__file__).parent.resolve() == (ROOT / "tasks").resolve()
