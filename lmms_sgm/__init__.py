"""lmms_sgm: SGM ("Safety Glasses for MLLMs") neuron-level detoxification, with lmms-eval integration.

The pipeline, one module per step: data -> profiling -> expertise -> glasses -> intervention.
"""
from lmms_sgm.options import ApplyOptions, ProfileOptions, SelectionOptions, SteeringOptions  # noqa: F401
from lmms_sgm.version import __version__  # noqa: F401


def __getattr__(name):
    # Heavy modules load on first use, so `import lmms_sgm` (and its entry points) stays light.
    if name in ("SafetyGlasses", "GlassesMismatch", "Glasses"):
        from lmms_sgm import glasses

        return getattr(glasses, name)
    if name == "SteeringGlasses":
        from lmms_sgm import steering

        return steering.SteeringGlasses
    if name in ("build_glasses", "build_steering_glasses"):
        from lmms_sgm import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
