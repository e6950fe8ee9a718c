"""lmms_sgm.interventions.wearing: the one refusal, one pair per model, fold only of affine edits.
(Every kind x every mode against references: tests/test_interventions_matrix.py.)"""
from __future__ import annotations

import pytest
import torch

from lmms_sgm.demo import BEST, GLASSES_DIR, STEERING
from lmms_sgm.interventions import load_glasses
from lmms_sgm.interventions.edits import OUTPUT, Edit, Edits
from lmms_sgm.interventions.wearing import _WEARING, refusal, wear


def test_the_package_exports_exactly_its_lazy_names():
    """``__all__`` is a literal (static tools read it) beside the lazy-import table: they must agree."""
    import lmms_sgm.interventions as package

    assert package.__all__ == sorted(package._EXPORTS)
    assert all(getattr(package, name).__name__ == name for name in package.__all__)


def test_the_refusal_names_the_mode_the_kind_and_the_reason():
    steering = load_glasses(GLASSES_DIR / STEERING)
    assert refusal(steering, "hooks") is None and refusal(steering, "remote") is None
    assert refusal(steering, "fold") == ("mode='fold' cannot wear gated-steering glasses: the gate is decided per sequence "
                                         "from its own prompt at run time, and a decision is not a weight; use "
                                         "mode='hooks' or mode='nnsight'")
    assert refusal(steering, "graft") == "mode='graft' is not a way to wear glasses: one of hooks, nnsight, fold, remote"


def test_wear_refuses_before_touching_the_model_and_one_pair_at_a_time():
    from lmms_sgm import models
    from lmms_sgm.demo import SHORT_NAME

    model, _ = models.load(SHORT_NAME)
    steering, sgm = load_glasses(GLASSES_DIR / STEERING), load_glasses(GLASSES_DIR / BEST)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^mode='fold' cannot wear gated-steering glasses"):
        wear(model, steering, "fold")
    assert model not in _WEARING and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with wear(model, sgm, "fold", 0.5) as handle:
        assert _WEARING[model] is handle
        with pytest.raises(RuntimeError, match="already wears glasses"):
            wear(model, steering)
    assert not handle.active and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_fold_refuses_edits_that_are_not_affine(monkeypatch):
    """A kind that declared fold but returned a non-affine edit is refused, not folded wrongly."""
    from lmms_sgm import models
    from lmms_sgm.demo import SHORT_NAME

    model, _ = models.load(SHORT_NAME)
    sgm = load_glasses(GLASSES_DIR / BEST)
    real = sgm.edits(1.0)
    monkeypatch.setattr(type(sgm), "edits", lambda self, s, **kw: Edits([Edit(real.edits[0].site, OUTPUT, lambda x, st: x)]))
    with pytest.raises(ValueError, match="mode='fold' cannot wear SGM glasses: an edit is not a per-unit affine"):
        wear(model, sgm, "fold")
