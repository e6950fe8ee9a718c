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


def test_core_does_not_import_lmms_eval():
    """The core (everything but lmms_sgm.lmms) works from a notebook without lmms-eval."""
    import subprocess
    import sys

    core = sorted(
        ".".join(("lmms_sgm", *p.relative_to(ROOT / "lmms_sgm").with_suffix("").parts)).removesuffix(".__init__")
        for p in (ROOT / "lmms_sgm").rglob("*.py")
        if "lmms" not in p.relative_to(ROOT / "lmms_sgm").parts[:1]
    )
    assert "lmms_sgm.intervention" in core and "lmms_sgm.judges.builtin" in core
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in core)
    code += "from lmms_sgm import plugins; plugins.collect('sgm_arch_adapters'); plugins.collect_named('sgm_judges')\n"
    code += "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'lmms_eval')\nassert not bad, bad\n"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
