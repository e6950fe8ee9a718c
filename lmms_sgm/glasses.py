"""Deprecated (kept for one release): the glasses now live in :mod:`lmms_sgm.interventions`.

``from lmms_sgm.glasses import SafetyGlasses`` (and every other name this module had) still
works, with a DeprecationWarning; load glasses of any kind with :func:`lmms_sgm.load_glasses`.
"""
from __future__ import annotations

import warnings

_MODULES = ("sgm", "base", "errors", "registry")
_RENAMED = {"glasses_class": ("registry", "kind_class")}


def __getattr__(name):
    import importlib

    if name.startswith("__"):
        raise AttributeError(name)
    module, attr = _RENAMED.get(name, (None, name))
    for m in (module,) if module else _MODULES:
        mod = importlib.import_module(f"lmms_sgm.interventions.{m}")
        if hasattr(mod, attr):
            warnings.warn(f"lmms_sgm.glasses.{name} is deprecated: use lmms_sgm.interventions.{m}.{attr} "
                          "(lmms_sgm.load_glasses loads every kind)", DeprecationWarning, stacklevel=2)
            return getattr(mod, attr)
    raise AttributeError(f"module 'lmms_sgm.glasses' has no attribute {name!r}")
