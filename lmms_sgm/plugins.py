"""Extension points: pluggy hook specifications and entry-point discovery.

A third party adds an architecture adapter, a judge or a defense by shipping a module that
implements one of the hooks below and naming it under the ``lmms_sgm`` entry-point group::

    [project.entry-points.lmms_sgm]
    my_plugin = "my_package.sgm_plugin"

Our own built-ins are registered the same way and only that way, so there is one discovery path (a
source tree that was never pip-installed has none: :func:`plugin_manager` says so).
"""
from __future__ import annotations

import functools
import re

import pluggy

PROJECT = "lmms_sgm"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class Specs:
    @hookspec
    def sgm_arch_adapters(self):
        """Return a list of :class:`lmms_sgm.archs.ArchAdapter` this plugin supports."""

    @hookspec
    def sgm_judges(self):
        """Return a dict ``{name: factory}``; ``factory(**kwargs)`` builds a judge."""

    @hookspec
    def sgm_defenses(self):
        """Return a dict ``{name: factory}`` of non-neuron defenses (prompting, filtering)."""

    @hookspec
    def sgm_glasses_kinds(self):
        """Return a dict ``{kind: class}`` of glasses kinds (:class:`lmms_sgm.interventions.base.Glasses`
        subclasses; ``kind`` is the manifest field); lmms_sgm/interventions/registry.py."""

    @hookspec
    def sgm_dataset_sources(self):
        """Return a dict ``{kind: lmms_sgm.datasets.sources.Source}`` for ``lmms-sgm dataset build``."""


@functools.cache
def plugin_manager() -> pluggy.PluginManager:
    """The plugin manager, with every module named under the ``lmms_sgm`` entry points registered:
    ours and third parties' alike. This module names no plugin (a list of built-ins here would import
    every plugin module from the module they all import: a cycle)."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(Specs)
    pm.load_setuptools_entrypoints(PROJECT)
    if not any(_normalized(dist.project_name) == _normalized(PROJECT) for _, dist in pm.list_plugin_distinfo()):
        raise RuntimeError(
            f"{PROJECT} is not installed: its own model families, judges and defenses are registered through its "
            "entry points (pyproject.toml, [project.entry-points.lmms_sgm]), which only an installed package has; "
            "run `bash scripts/setup.sh` or `pip install -e .` in the repository"
        )
    return pm


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # a distribution's name as pip compares it (PEP 503)


def collect(hook_name: str) -> list:
    """Flatten a list-returning hook's results over all plugins."""
    out = []
    for result in getattr(plugin_manager().hook, hook_name)():
        out.extend(result)
    return out


def collect_named(hook_name: str) -> dict:
    """Merge a dict-returning hook's results; a later plugin cannot silently shadow a name."""
    merged: dict = {}
    for result in getattr(plugin_manager().hook, hook_name)():
        for name, factory in result.items():
            if name in merged and merged[name] is not factory:
                raise ValueError(f"two plugins register the {hook_name} entry {name!r}")
            merged[name] = factory
    return merged
