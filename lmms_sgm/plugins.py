"""Extension points: pluggy hook specifications and entry-point discovery.

A third party adds an architecture adapter, a judge or a defense by shipping a module that
implements one of the hooks below and naming it under the ``lmms_sgm`` entry-point group::

    [project.entry-points.lmms_sgm]
    my_plugin = "my_package.sgm_plugin"

Our own built-ins are registered the same way, so there is one discovery path.
"""
from __future__ import annotations

import functools

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


@functools.lru_cache(maxsize=None)
def plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(Specs)
    pm.load_setuptools_entrypoints(PROJECT)
    # A source tree that was never pip-installed has no entry points; the built-ins must still work.
    from lmms_sgm.archs import builtin_modules
    from lmms_sgm.defenses import builtin as builtin_defenses
    from lmms_sgm.interventions import builtin as builtin_kinds
    from lmms_sgm.judges import builtin as builtin_judges
    from lmms_sgm.judges import classifiers, ensemble, guards, llm

    for module in (*builtin_modules(), builtin_judges, classifiers, guards, llm, ensemble, builtin_defenses,
                   builtin_kinds):
        if not pm.is_registered(module):
            pm.register(module)
    return pm


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
