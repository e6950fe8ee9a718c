"""Deprecated (kept for one release): wearing glasses is :func:`lmms_sgm.interventions.wearing.wear`.

``apply(glasses, model, ApplyOptions(...), processor=, remote=)`` still works, with a
DeprecationWarning, and every other name this module had is found in
:mod:`lmms_sgm.interventions.wearing` (or :mod:`~lmms_sgm.interventions.edits`).
"""
from __future__ import annotations

import warnings


def apply(glasses, model, options, *, processor=None, remote=None):
    """Deprecated: ``lmms_sgm.interventions.wearing.wear(model, glasses, mode, strength, ...)``."""
    from lmms_sgm.interventions.wearing import wear

    warnings.warn("lmms_sgm.intervention.apply is deprecated: use lmms_sgm.wear(model, glasses, mode, strength)",
                  DeprecationWarning, stacklevel=2)
    return wear(model, glasses, options.mode, options.strength, processor=processor, remote=remote)


def __getattr__(name):
    from lmms_sgm.interventions import edits, wearing

    for mod in (wearing, edits):
        if hasattr(mod, name) and not name.startswith("__"):
            warnings.warn(f"lmms_sgm.intervention.{name} is deprecated: use {mod.__name__}.{name}",
                          DeprecationWarning, stacklevel=2)
            return getattr(mod, name)
    raise AttributeError(f"module 'lmms_sgm.intervention' has no attribute {name!r}")
