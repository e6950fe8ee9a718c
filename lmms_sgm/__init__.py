"""lmms_sgm: SGM ("Safety Glasses for MLLMs") neuron-level detoxification, with lmms-eval integration.

The pipeline, one module per step: data -> profiling -> expertise -> glasses -> wearing them
(lmms_sgm/interventions/: every kind of glasses, :func:`load_glasses`, :func:`wear`).
"""
from lmms_sgm.options import ApplyOptions, ProfileOptions, SelectionOptions, SteeringOptions  # noqa: F401
from lmms_sgm.version import __version__  # noqa: F401


def __getattr__(name):
    # Heavy modules load on first use, so `import lmms_sgm` (and its entry points) stays light.
    if name in ("SafetyGlasses", "SteeringGlasses", "GlassesMismatch", "GlassesError", "Glasses", "load_glasses",
                "wear", "Edit", "Edits", "kinds"):
        from lmms_sgm import interventions

        return getattr(interventions, name)
    if name in ("build_glasses", "build_steering_glasses"):
        from lmms_sgm import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
