"""Interventions: kinds of glasses, their edits as data, and the one way to wear them.

* :mod:`~lmms_sgm.interventions.base`: the ``Glasses`` base (files, integrity, fingerprint) and
  :func:`load_glasses`;
* :mod:`~lmms_sgm.interventions.edits`: an edit (site, where, ``fn(value, state)``, optional
  affine) and a kind's ``Edits``;
* :mod:`~lmms_sgm.interventions.wearing`: :func:`wear` (hooks, nnsight, fold, remote; THE refusal;
  the module is not named ``wear``, which would shadow the function once imported);
* :mod:`~lmms_sgm.interventions.registry`: kinds found through the ``sgm_glasses_kinds`` hook;
* kinds: :mod:`~lmms_sgm.interventions.sgm` (SGM, gated SGM), :mod:`~lmms_sgm.interventions.steering`
  (gated and ungated steering).

Adding a kind: a module with a ``Glasses`` subclass (its tensors, digest, options, ``modes`` and
``edits``) and a ``@hookimpl sgm_glasses_kinds`` under the ``lmms_sgm`` entry point
(docs/extending.md).
"""
from __future__ import annotations

_EXPORTS = {
    "Glasses": "base", "load_glasses": "base", "GlassesError": "errors", "GlassesMismatch": "errors",
    "UnverifiedGlassesWarning": "errors", "Edit": "edits", "Edits": "edits", "wear": "wearing",
    "GlassesHandle": "wearing", "kinds": "registry", "kind_class": "registry", "SafetyGlasses": "sgm",
    "SteeringGlasses": "steering",
}


def __getattr__(name):
    # Kinds load on first use, so that `import lmms_sgm.interventions` stays light.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"lmms_sgm.interventions.{_EXPORTS[name]}"), name)
    raise AttributeError(name)


__all__ = [  # a literal (tools read it statically); tests check it is sorted(_EXPORTS)
    "Edit", "Edits", "Glasses", "GlassesError", "GlassesHandle", "GlassesMismatch", "SafetyGlasses",
    "SteeringGlasses", "UnverifiedGlassesWarning", "kind_class", "kinds", "load_glasses", "wear",
]
