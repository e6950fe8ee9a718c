"""lmms_sgm.interventions.registry and the one loader: kinds through the pluggy hook, load_glasses,
and the deprecated import paths (one release) that still work with a DeprecationWarning."""
from __future__ import annotations

import importlib

import pytest
import torch

import lmms_sgm
from lmms_sgm.demo import BEST, GLASSES_DIR, STEERING
from lmms_sgm.interventions import GlassesError, load_glasses
from lmms_sgm.interventions.registry import kind_class, kinds
from lmms_sgm.interventions.sgm import SafetyGlasses
from lmms_sgm.interventions.steering import SteeringGlasses


def test_the_built_in_kinds_come_through_the_hook():
    from lmms_sgm.interventions import builtin
    from lmms_sgm.plugins import plugin_manager

    assert plugin_manager().is_registered(builtin)
    assert kinds() == {"sgm": SafetyGlasses, "gated_steering": SteeringGlasses}
    assert kind_class("sgm") is SafetyGlasses and kind_class("gated_steering") is SteeringGlasses
    with pytest.raises(GlassesError, match="unknown glasses kind 'clamp'"):
        kind_class("clamp")


def test_load_glasses_returns_each_bundled_kind():
    """The bundled demo glasses load through the one loader with the digests they were saved with."""
    import json

    for name, cls in ((BEST, SafetyGlasses), (STEERING, SteeringGlasses)):
        g = load_glasses(GLASSES_DIR / name)
        assert type(g) is cls
        assert g.digest() == json.loads((GLASSES_DIR / name / "manifest.json").read_text())["digest"]
    wearing = importlib.import_module("lmms_sgm.interventions.wearing")
    from lmms_sgm.interventions import wear  # after its module was imported: still the function

    assert lmms_sgm.load_glasses is load_glasses and lmms_sgm.wear is wear is wearing.wear


def test_a_kind_s_capabilities_replace_class_tests():
    assert SafetyGlasses.has_experts and not SteeringGlasses.has_experts


@pytest.mark.parametrize("module, name, new", [
    ("lmms_sgm.glasses", "SafetyGlasses", SafetyGlasses),
    ("lmms_sgm.glasses", "Glasses", "lmms_sgm.interventions.base:Glasses"),
    ("lmms_sgm.glasses", "glasses_class", "lmms_sgm.interventions.registry:kind_class"),
    ("lmms_sgm.intervention", "GlassesHandle", "lmms_sgm.interventions.wearing:GlassesHandle"),
    ("lmms_sgm.intervention", "affine", "lmms_sgm.interventions.edits:affine"),
    ("lmms_sgm.steering", "SteeringGlasses", SteeringGlasses),
    ("lmms_sgm.steering", "decision_positions", "lmms_sgm.interventions.steering:decision_positions"),
])
def test_old_import_paths_warn_and_give_the_new_objects(module, name, new):
    if isinstance(new, str):
        mod, attr = new.split(":")
        new = getattr(importlib.import_module(mod), attr)
    old = importlib.import_module(module)
    with pytest.warns(DeprecationWarning, match=rf"{module}\.{name} is deprecated: use lmms_sgm\.interventions"):
        assert getattr(old, name) is new
    with pytest.raises(AttributeError):
        old.no_such_name  # noqa: B018


def test_old_apply_functions_warn_and_wear(load_model):
    """intervention.apply and steering.apply_steering delegate to wear() (same handle, same edit)."""
    from lmms_sgm import intervention, steering
    from lmms_sgm.options import ApplyOptions

    model, _ = load_model()
    g = load_glasses(GLASSES_DIR / BEST)
    calls = []

    def fake_wear(*a, **kw):
        calls.append((a, kw))
        return "handle"

    import lmms_sgm.interventions.wearing as wear_module

    real = wear_module.wear
    wear_module.wear = fake_wear
    try:
        with pytest.warns(DeprecationWarning, match=r"lmms_sgm\.intervention\.apply is deprecated"):
            assert intervention.apply(g, model, ApplyOptions(strength=0.5, mode="fold"), processor="p") == "handle"
        with pytest.warns(DeprecationWarning, match=r"lmms_sgm\.steering\.apply_steering is deprecated"):
            assert steering.apply_steering(g, model, ApplyOptions(strength=0.25, mode="hooks")) == "handle"
    finally:
        wear_module.wear = real
    assert calls == [((model, g, "fold", 0.5), {"processor": "p", "remote": None}),
                     ((model, g, "hooks", 0.25), {"processor": None})]


def test_safety_glasses_load_of_another_kind_still_works_with_a_warning():
    with pytest.warns(DeprecationWarning, match="SafetyGlasses.load of gated_steering glasses is deprecated"):
        g = SafetyGlasses.load(GLASSES_DIR / STEERING)
    assert isinstance(g, SteeringGlasses) and torch.equal(g.steer, load_glasses(GLASSES_DIR / STEERING).steer)
