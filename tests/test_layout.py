"""The package layout, drawn from the imports: no import cycle, and the core never imports a harness,
the demo or a command line.

The graph is built statically with ``ast`` from every ``import`` and ``from ... import`` in every
module of ``lmms_sgm``, at any depth: a function-local import that closes a cycle is still a cycle
for the reader (who follows it) and for the layout (the two modules cannot be understood, tested or
moved apart), it only hides the cycle from the interpreter.

``if TYPE_CHECKING:`` imports are edges too. They are the usual way to hide a cycle from the
interpreter, not to remove it: the module still depends on the other's names (its types), a reader
still climbs to it, and the type checker resolves it. Counting them keeps ``TYPE_CHECKING`` from
being an escape hatch for either rule.

What is not an edge: a module named only at run time (``importlib.import_module`` of a computed
name, an entry point). That is how plugins are found: the plugin manager knows no plugin by name.

An edge goes to the module named, not to the packages above it (``from lmms_sgm.reports.table
import x`` runs ``lmms_sgm/reports/__init__.py`` too): a package ``__init__`` is a facade that
re-exports its modules, and counting it would make every facade a cycle with its own modules. The
core rule still covers what the interpreter runs: every package above a core module is itself core
(``test_every_package_above_a_core_module_is_core``), so its ``__init__`` is held to the rule.
"""
from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

import lmms_sgm

PACKAGE = "lmms_sgm"
ROOT = Path(lmms_sgm.__file__).resolve().parent


# -- the graph ----------------------------------------------------------------------------------------


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Every module of the package under ``root``, by dotted name (a package by its ``__init__``)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join((package, *parts))] = path
    return names


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def imports_of(name: str, modules: dict[str, Path]) -> set[str]:
    """The dotted names a module imports, at any depth: ours resolved to the module they name
    (a ``from pkg import name`` where ``name`` is a submodule is an import of the submodule), others
    as written."""
    tree = ast.parse(modules[name].read_text(encoding="utf-8"), filename=str(modules[name]))
    here = name if _is_package(name, modules) else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = here.split(".")
                base_parts = parts[: len(parts) - (node.level - 1)]
                if len(base_parts) < 1 or node.level - 1 > len(parts):
                    raise ValueError(f"{modules[name]}:{node.lineno}: a relative import climbs above the package")
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            if base == "__future__":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in modules else base)
    return out


def import_graph(root: Path, package: str) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """``(internal, external)``: for each module, the package's modules it imports (the nearest
    enclosing module of a dotted name that is not one itself) and the other names it imports."""
    modules = module_names(root, package)
    internal: dict[str, set[str]] = {}
    external: dict[str, set[str]] = {}
    for name in modules:
        internal[name], external[name] = set(), set()
        for target in imports_of(name, modules):
            if target == package or target.startswith(package + "."):
                while target not in modules:  # `import pkg.mod.Class`-like names: the module holding it
                    target = target.rpartition(".")[0]
                internal[name].add(target)
            else:
                external[name].add(target)
    return internal, external


def strongly_connected(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Tarjan's strongly connected components that are cycles (more than one module, or a module
    importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def a_cycle(graph: dict[str, set[str]], component: frozenset[str]) -> list[str]:
    """One shortest cycle through the component's first module (sorted), to print: ``a -> b -> a``."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for succ in sorted(graph[node] & component):
                if succ == start:
                    return [*paths[node], start]
                if succ not in paths:
                    paths[succ] = [*paths[node], succ]
                    nxt.append(succ)
        frontier = nxt
    raise AssertionError(f"{sorted(component)} is not a cycle")


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, list[str]]:
    """Every module ``start`` imports directly or through others, each with one import chain to it."""
    chains = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for succ in sorted(graph.get(node, ())):
                if succ not in chains:
                    chains[succ] = [*chains[node], succ]
                    nxt.append(succ)
        frontier = nxt
    return chains


# -- what the core is -----------------------------------------------------------------------------------

# Not core: the two harness adapters (the only modules that import lmms_eval / lm_eval), the demo (its
# world, training and run) and the command lines. Everything else is core: the pipeline (data,
# prompting, processors, sites, profiling, expertise, options, glasses and the interventions), the
# model families (archs, models, tiny models), plugins, judges, defenses, dataset building, execution
# (checkpoint, staging, distributed, remote), the reports (sweep and runner start lmms-eval as a
# subprocess, importing nothing of it) and the apps (tune, evaluate, diagnose, selflabel, quickstart:
# in process, through the pipeline). A new module is core unless it is added here, so the rule holds
# for it by default.
NOT_CORE_PACKAGES = (
    "lmms_sgm.lmms",  # the lmms-eval adapter (model sgm / sgm_llava, tasks registration)
    "lmms_sgm.lm_eval",  # the lm-eval adapter (model sgm_hf, the lm-eval-sgm launcher)
    "lmms_sgm.demo",  # the bundled demo: model, data, glasses, its run and training
)
NOT_CORE_MODULES = (
    "lmms_sgm.cli",  # lmms-sgm
    "lmms_sgm.datasets.cli",  # lmms-sgm dataset
    "lmms_sgm.reports.cli",  # lmms-sgm report
)
# Harness modules outside this package a core module must not import (nor through another module): the
# two harnesses and our task packages for them (tasks/, tasks_lm_eval/), which import the harnesses.
FORBIDDEN_EXTERNAL = ("lmms_eval", "lm_eval", "lmms_sgm_tasks", "lmms_sgm_lm_eval_tasks")


def is_core(name: str) -> bool:
    if name in NOT_CORE_MODULES:
        return False
    return not any(name == pkg or name.startswith(pkg + ".") for pkg in NOT_CORE_PACKAGES)


def core_violations(
    internal: dict[str, set[str]], external: dict[str, set[str]], core=is_core, forbidden=FORBIDDEN_EXTERNAL
) -> list[str]:
    """One line per core module that reaches a non-core module or a forbidden external one, with the
    chain of imports that gets there."""
    lines = []
    for name in sorted(internal):
        if not core(name):
            continue
        chains = reachable(internal, name)
        bad = [m for m in chains if not core(m)]
        if bad:
            first = min(bad, key=lambda m: (len(chains[m]), m))
            lines.append(f"{name} imports non-core {first}: {' -> '.join(chains[first])}")
            continue  # the chain through the first non-core module says enough
        for via, chain in sorted(chains.items(), key=lambda kv: (len(kv[1]), kv[0])):
            hit = sorted(x for x in external[via] if any(x == f or x.startswith(f + ".") for f in forbidden))
            if hit:
                lines.append(f"{name} imports {hit[0]}: {' -> '.join(chain)} -> {hit[0]}")
                break
    return lines


# -- the rules, on this package -------------------------------------------------------------------------

# Import cycles being removed in parallel (issue 23: one intervention abstraction), each the strongly
# connected component exactly as it is now. Each must still exist as it is, so this cannot go stale:
# when that work lands, delete its entry (or, if it only shrank, write what is left).
# None left: the interventions package removed the last one (glasses, steering, intervention and
# remote). A cycle that must stay for a while is listed here with why; the test fails once it is gone.
KNOWN_CYCLES: set[frozenset[str]] = set()


@pytest.fixture(scope="module")
def graph():
    return import_graph(ROOT, PACKAGE)


def test_no_import_cycles_but_the_known_ones(graph):
    internal, _ = graph
    cycles = strongly_connected(internal)
    still_known = [c for c in cycles if c in KNOWN_CYCLES]
    gone = [sorted(c) for c in KNOWN_CYCLES if c not in cycles]
    assert not gone, f"known import cycles no longer exist: delete them from KNOWN_CYCLES: {gone}"
    new = [c for c in cycles if c not in KNOWN_CYCLES]
    assert not new, "import cycles in lmms_sgm:\n" + "\n".join(
        f"  {sorted(c)}: {' -> '.join(a_cycle(internal, c))}" for c in new
    )
    assert len(still_known) == len(KNOWN_CYCLES)


def test_the_version_module_is_pyprojects_version():
    """``lmms_sgm.version`` holds the version below every module that records it (no facade cycle)."""
    import tomllib

    from lmms_sgm.version import __version__

    pyproject = tomllib.loads((ROOT.parent / "pyproject.toml").read_text(encoding="utf-8"))
    assert __version__ == pyproject["project"]["version"] == lmms_sgm.__version__


def test_the_core_imports_no_harness_demo_or_cli(graph):
    internal, external = graph
    assert any(is_core(m) for m in internal) and any(not is_core(m) for m in internal)
    lines = core_violations(internal, external)
    assert not lines, "core modules import a harness, the demo or a CLI:\n  " + "\n  ".join(lines)


def test_every_package_above_a_core_module_is_core(graph):
    """Importing a core module runs the ``__init__`` of every package above it."""
    internal, _ = graph
    for name in internal:
        if is_core(name):
            parts = name.split(".")
            for i in range(1, len(parts)):
                assert is_core(".".join(parts[:i])), f"{name} is core but its package {'.'.join(parts[:i])} is not"


def test_the_harness_adapters_are_where_lmms_eval_and_lm_eval_are_imported(graph):
    """The graph sees the imports it must forbid: the adapters do import the harnesses."""
    _, external = graph
    assert any(x.startswith("lmms_eval") for x in external["lmms_sgm.lmms.model"])
    assert any(x.startswith("lm_eval") for x in external["lmms_sgm.lm_eval.model"])


# -- the graph functions, on synthetic packages -----------------------------------------------------------


def _write_package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return root


def test_the_graph_resolves_every_import_form(tmp_path):
    root = _write_package(
        tmp_path,
        {
            "__init__.py": "from pkg.a import f\n",
            "a.py": "import os\nfrom . import b\nfrom .sub import c as cc\n",
            "b.py": "def g():\n    from pkg.sub.c import h\n    import pkg.sub\n",
            "sub/__init__.py": "from .. import a\nfrom .c import *\n",
            "sub/c.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..b import g\n"
                "import lm_eval.api\nimport pkg.a.f\n"
            ),
        },
    )
    internal, external = import_graph(root, "pkg")
    assert internal == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.b", "pkg.sub.c"},
        "pkg.b": {"pkg.sub.c", "pkg.sub"},  # function-local imports count
        "pkg.sub": {"pkg.a", "pkg.sub.c"},  # relative imports resolved from the package itself
        "pkg.sub.c": {"pkg.b", "pkg.a"},  # TYPE_CHECKING counts; `pkg.a.f` is the module pkg.a
    }
    assert external["pkg.a"] == {"os"}
    assert external["pkg.sub.c"] == {"typing", "lm_eval.api"}


def test_tarjan_finds_each_cycle_and_nothing_else():
    graph = {
        "a": {"b"}, "b": {"c"}, "c": {"a", "d"},  # a -> b -> c -> a
        "d": {"e"}, "e": {"d"},  # d <-> e, reached from the first cycle but not part of it
        "f": {"f"},  # a module importing itself
        "g": {"a", "h"}, "h": set(),  # acyclic
    }
    assert sorted(map(sorted, strongly_connected(graph))) == [["a", "b", "c"], ["d", "e"], ["f"]]
    assert a_cycle(graph, frozenset("abc")) == ["a", "b", "c", "a"]
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_a_local_import_closing_a_cycle_is_found(tmp_path):
    root = _write_package(
        tmp_path,
        {
            "__init__.py": "",
            "x.py": "from pkg import y\n",
            "y.py": "def late():\n    from pkg.x import thing\n",
            "z.py": "from pkg import x\n",
        },
    )
    internal, _ = import_graph(root, "pkg")
    assert strongly_connected(internal) == [frozenset({"pkg.x", "pkg.y"})]


def test_a_core_module_reaching_a_harness_through_another_module_is_caught(tmp_path):
    root = _write_package(
        tmp_path,
        {
            "__init__.py": "",
            "core.py": "from pkg import helper\n",
            "helper.py": "def f():\n    import lmms_eval.api.registry\n",
            "clean.py": "import torch\n",
            "app.py": "from pkg import cli\n",
            "cli.py": "import lm_eval\n",
            "user.py": "from pkg import app\n",
        },
    )
    internal, external = import_graph(root, "pkg")
    core = lambda m: m not in ("pkg.cli", "pkg.app")  # noqa: E731
    assert core_violations(internal, external, core=core) == [
        "pkg.core imports lmms_eval.api.registry: pkg.core -> pkg.helper -> lmms_eval.api.registry",
        "pkg.helper imports lmms_eval.api.registry: pkg.helper -> lmms_eval.api.registry",
        "pkg.user imports non-core pkg.app: pkg.user -> pkg.app",
    ]


def test_the_rules_fail_on_a_copy_of_this_package_with_a_planted_cycle_and_harness_import(tmp_path):
    """The real package, copied, with one throwaway module that closes a cycle and imports lmms_eval."""
    import shutil

    copy = tmp_path / PACKAGE
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__", "*.safetensors", "*.png", "*.jsonl"))
    (copy / "throwaway.py").write_text("import lmms_eval\nfrom lmms_sgm import options\n", encoding="utf-8")
    opts = copy / "options.py"
    opts.write_text(opts.read_text(encoding="utf-8") + "\ndef _late():\n    from lmms_sgm import throwaway\n")
    internal, external = import_graph(copy, PACKAGE)
    planted = [c for c in strongly_connected(internal) if "lmms_sgm.throwaway" in c]
    assert planted == [frozenset({"lmms_sgm.options", "lmms_sgm.throwaway"})]
    lines = core_violations(internal, external)
    assert "lmms_sgm.throwaway imports lmms_eval: lmms_sgm.throwaway -> lmms_eval" in lines
    assert "lmms_sgm.options imports lmms_eval: lmms_sgm.options -> lmms_sgm.throwaway -> lmms_eval" in lines
