"""The built-in glasses kinds, registered through the ``lmms_sgm`` entry point like any plugin's."""
from __future__ import annotations

from lmms_sgm.plugins import hookimpl


@hookimpl
def sgm_glasses_kinds():
    from lmms_sgm.interventions.sgm import SafetyGlasses
    from lmms_sgm.interventions.steering import SteeringGlasses

    return {SafetyGlasses.kind: SafetyGlasses, SteeringGlasses.kind: SteeringGlasses}
