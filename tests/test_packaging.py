"""Every package folder is declared in pyproject.toml (the list is explicit, see the comment there)."""
from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_declared():
    """Code and data folders alike: setuptools warns about (and may drop) any folder of package
    data it is not told of, so the explicit list must name every folder, no more, no less."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(config["packages"])
    found = set()
    for top, name in (("lmms_sgm", "lmms_sgm"), ("tasks", "lmms_sgm_tasks"), ("tasks_lm_eval", "lmms_sgm_lm_eval_tasks")):
        for folder in [ROOT / top, *(ROOT / top).rglob("*")]:
            rel = folder.relative_to(ROOT / top)
            if folder.is_dir() and not any(p == "__pycache__" or p.startswith(".") or p.endswith(".egg-info") for p in rel.parts):
                found.add(".".join([name, *rel.parts]))
    assert found == declared, f"missing: {sorted(found - declared)}, stale: {sorted(declared - found)}"


def test_install_builds_without_packaging_warnings(tmp_path):
    """Building the wheel warns about no folder (each warning used to print ~40 lines at set-up)."""
    import shutil
    import subprocess
    import sys

    # Built from a copy: an in-tree build leaves build/ and an egg-info that shadows the installed
    # metadata (docs/footguns.md).
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info", "__pycache__"))
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(src)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "is absent from the `packages` configuration" not in res.stdout + res.stderr
    import zipfile

    names = zipfile.ZipFile(next(tmp_path.glob("lmms_sgm-*.whl"))).namelist()
    for needed in ("lmms_sgm/demo/model/model.safetensors", "lmms_sgm/demo/data/profile.jsonl",
                   "lmms_sgm/demo/glasses/paper_default/manifest.json", "lmms_sgm_tasks/mm_toxic_qa/sample/harmful.jsonl",
                   "lmms_sgm_tasks/mm_toxic_qa/mm_toxic_qa.yaml", "lmms_sgm_lm_eval_tasks/sgm_text/sgm_text_ppl.yaml",
                   "lmms_sgm_lm_eval_tasks/sgm_text/sample/text.txt", "lmms_sgm_lm_eval_tasks/sgm_text/sample/prompts.jsonl"):
        assert needed in names, needed


def test_tasks_package_is_the_repo_tasks_folder():
    import lmms_sgm_lm_eval_tasks
    import lmms_sgm_tasks

    assert Path(lmms_sgm_tasks.__file__).parent.resolve() == (ROOT / "tasks").resolve()
    assert Path(lmms_sgm_lm_eval_tasks.__file__).parent.resolve() == (ROOT / "tasks_lm_eval").resolve()


def test_core_does_not_import_lmms_eval_or_lm_eval():
    """The core (everything but the harness adapters lmms_sgm.lmms and lmms_sgm.lm_eval) works from
    a notebook without lmms-eval or lm-eval; each adapter imports only its own harness."""
    import subprocess
    import sys

    def modules(keep) -> list[str]:
        return sorted(
            ".".join(("lmms_sgm", *p.relative_to(ROOT / "lmms_sgm").with_suffix("").parts)).removesuffix(".__init__")
            for p in (ROOT / "lmms_sgm").rglob("*.py") if keep(p.relative_to(ROOT / "lmms_sgm").parts[0])
        )

    core = modules(lambda top: top not in ("lmms", "lm_eval"))
    assert "lmms_sgm.intervention" in core and "lmms_sgm.judges.builtin" in core
    # (modules to import, harness packages they must not import)
    cases = [(core, ("lmms_eval", "lm_eval")), (modules(lambda top: top == "lm_eval"), ("lmms_eval",))]
    assert "lmms_sgm.lm_eval.model" in cases[1][0]
    for mods, banned in cases:
        code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in mods)
        code += "from lmms_sgm import plugins; plugins.collect('sgm_arch_adapters'); plugins.collect_named('sgm_judges')\n"
        code += f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {banned!r})\nassert not bad, bad[:5]\n"
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
        assert res.returncode == 0, res.stderr[-2000:]
