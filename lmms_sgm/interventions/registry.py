"""The kinds of glasses: found through the ``sgm_glasses_kinds`` pluggy hook, as architectures are.

A kind is a :class:`lmms_sgm.interventions.base.Glasses` subclass named by its ``kind`` (the
manifest field). The built-in kinds (``sgm``, ``gated_steering``) are registered through the same
entry point a third party uses (lmms_sgm/interventions/builtin.py)::

    [project.entry-points.lmms_sgm]
    my_kind = "my_package.my_kind"      # a module with a @hookimpl sgm_glasses_kinds()

This module imports no kind: the hook imports them when they are first asked for, so that
``import lmms_sgm`` stays light.
"""
from __future__ import annotations

from lmms_sgm.interventions.errors import GlassesError
from lmms_sgm.plugins import collect_named

HOOK = "sgm_glasses_kinds"


def kinds() -> dict[str, type]:
    """``{kind: class}`` of every installed kind."""
    return collect_named(HOOK)


def kind_class(kind) -> type:
    """The class of a glasses kind (the manifest's ``kind``; absent: sgm)."""
    from lmms_sgm.version import __version__

    known = kinds()
    if kind not in known:
        raise GlassesError(f"unknown glasses kind {kind!r} (lmms_sgm {__version__} knows {', '.join(sorted(known))}; a "
                           "kind from a plugin needs that plugin installed); re-create the glasses with this version")
    return known[kind]
