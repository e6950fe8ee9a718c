"""lmms_sgm.interventions.edits: an edit is plain data, and only per-unit affines are foldable."""
from __future__ import annotations

import pytest
import torch

from lmms_sgm.interventions.edits import INPUT, LAYER_OUTPUT, OUTPUT, Edit, Edits, SiteTransform, hidden, with_hidden
from lmms_sgm.sites import Site

SITE = Site("model.layers.0.mlp.down_proj.input", "model.layers.0.mlp.down_proj", "input", 0, "intermediate", 3)


def test_where_is_one_of_three():
    with pytest.raises(ValueError, match="edit where='residual': one of input, output, layer_output"):
        Edit(SITE, "residual", lambda x, state: x)
    assert Edit(SITE, INPUT, lambda x, state: x).path == SITE.module_path


def test_only_affine_edits_are_foldable():
    scale = torch.tensor([0.5, 1.0, 2.0])
    affine = Edit(SITE, OUTPUT, SiteTransform(scale, None), affine=(scale, None))
    observer = Edit(SITE, LAYER_OUTPUT, lambda h, state: None)
    assert Edits([affine]).foldable and not Edits([affine, observer]).foldable and Edits([]).foldable


def test_site_transform_is_the_formula_and_the_gate_leaves_other_positions_bitwise():
    x = torch.tensor([[[1.0, -2.0, 3.0], [0.25, 0.5, -0.75]]])
    scale, shift = torch.tensor([0.5, 1.0, 2.0]), torch.tensor([0.1, 0.0, -0.3])
    want = torch.tensor([[[0.6, -2.0, 5.7], [0.225, 0.5, -1.8]]])
    torch.testing.assert_close(SiteTransform(scale, shift)(x, {}), want, atol=1e-6, rtol=0)
    v = torch.tensor([1.0, 0.0, 0.0])  # evidence: the first unit minus 0.5
    got = SiteTransform(scale, shift, (v, 0.5, 0.0))(x, {})
    torch.testing.assert_close(got[0, 0], want[0, 0], atol=1e-6, rtol=0)  # evidence 0.5 > 0
    assert torch.equal(got[0, 1], x[0, 1])  # evidence -0.25: unchanged


def test_hidden_states_of_a_layer_output_tuple():
    h, extra = torch.ones(1, 2, 3), object()
    assert hidden((h, extra)) is h and hidden(h) is h
    new = torch.zeros(1, 2, 3)
    out = with_hidden((h, extra), new)
    assert out[0] is new and out[1] is extra and with_hidden(h, new) is new
