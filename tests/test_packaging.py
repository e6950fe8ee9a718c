"""Every package folder is declared in pyproject.toml (the list is explicit, see the comment there)."""
from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_declared():
    """Code and data folders alike: setuptools warns about (and may drop) any folder of package
    data it is not told of, so the explicit list must name every folder, no more, no less."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(config["packages"])
    found = set()
    for top, name in (("lmms_sgm", "lmms_sgm"), ("tasks", "lmms_sgm_tasks")):
        for folder in [ROOT / top, *(ROOT / top).rglob("*")]:
            rel = folder.relative_to(ROOT / top)
            if folder.is_dir() and not any(p == "__pycache__" or p.startswith(".") or p.endswith(".egg-info") for p in rel.parts):
                found.add(".".join([name, *rel.parts]))
    assert found == declared, f"missing: {sorted(found - declared)}, stale: {sorted(declared - found)}"


def test_install_builds_without_packaging_warnings(tmp_path):
    """Building the wheel warns about no folder (each warning used to print ~40 lines at set-up)."""
    import subprocess
    import sys

    import shutil

    # Built from a copy: an in-tree build leaves build/ and an egg-info that shadows the installed
    # metadata (docs/footguns.md).
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info", "__pycache__"))
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(src)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "is absent from the `packages` configuration" not in res.stdout + res.stderr
    import zipfile

    names = zipfile.ZipFile(next(tmp_path.glob("lmms_sgm-*.whl"))).namelist()
    for needed in ("lmms_sgm/demo/model/model.safetensors", "lmms_sgm/demo/data/profile.jsonl",
                   "lmms_sgm/demo/glasses/paper_default/manifest.json", "lmms_sgm_tasks/mm_toxic_qa/sample/harmful.jsonl",
                   "lmms_sgm_tasks/mm_toxic_qa/mm_toxic_qa.yaml"):
        assert needed in names, needed


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
