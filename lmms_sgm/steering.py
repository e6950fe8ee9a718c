"""Deprecated (kept for one release): steering glasses are :mod:`lmms_sgm.interventions.steering`.

``apply_steering(glasses, model, ApplyOptions(...), processor=)`` still works, with a
DeprecationWarning, and every other name this module had is found in the new module.
"""
from __future__ import annotations

import warnings


def apply_steering(glasses, model, options, *, processor=None):
    """Deprecated: ``lmms_sgm.interventions.wearing.wear(model, glasses, mode, strength, ...)``."""
    from lmms_sgm.interventions.wearing import wear

    warnings.warn("lmms_sgm.steering.apply_steering is deprecated: use lmms_sgm.wear(model, glasses, mode, strength)",
                  DeprecationWarning, stacklevel=2)
    return wear(model, glasses, options.mode, options.strength, processor=processor)


def __getattr__(name):
    from lmms_sgm.interventions import steering

    if hasattr(steering, name) and not name.startswith("__"):
        warnings.warn(f"lmms_sgm.steering.{name} is deprecated: use lmms_sgm.interventions.steering.{name}",
                      DeprecationWarning, stacklevel=2)
        return getattr(steering, name)
    raise AttributeError(f"module 'lmms_sgm.steering' has no attribute {name!r}")
