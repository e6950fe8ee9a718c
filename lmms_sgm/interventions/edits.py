"""What wearing glasses does, as plain data: edits that lmms_sgm/interventions/wearing.py installs.

An :class:`Edit` names a site (a module path), where on it the value is taken and replaced
(``input``: the module's first positional input; ``output``: its output; ``layer_output``: a
decoder layer's hidden states, the first element when the layer returns a tuple), and
``fn(value, state) -> value`` (``None``: the value stays as it is, the edit only looked).
``affine=(scale, shift)`` says the edit is a per-unit ``value * scale (+ shift)`` on a linear
module: the only kind of edit that ``fold`` can write into the weights.

``state`` is one dict per worn pair of glasses; :attr:`Edits.begin_forward`, when set, is called
with the model's own ``(args, kwargs)`` at the start of every forward pass (each generation step),
before any edit (gated steering finds its decision positions there). The hooks installer sets
``state["armed"] = False`` after the model's forward pass, so that an edit can tell that it runs
outside one.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lmms_sgm.gate import gated

INPUT, OUTPUT, LAYER_OUTPUT = "input", "output", "layer_output"
WHERE = (INPUT, OUTPUT, LAYER_OUTPUT)


@dataclass(frozen=True)
class Edit:
    site: Any  # a lmms_sgm.sites.Site (its module_path and name)
    where: str  # INPUT, OUTPUT or LAYER_OUTPUT
    fn: Callable[[torch.Tensor, dict], torch.Tensor | None]
    affine: tuple[torch.Tensor, torch.Tensor | None] | None = None  # (scale, shift) per unit: foldable
    width: int | None = None  # units the glasses hold at the site (checked against the module)

    def __post_init__(self):
        if self.where not in WHERE:
            raise ValueError(f"edit where={self.where!r}: one of {', '.join(WHERE)}")

    @property
    def path(self) -> str:
        return self.site.module_path


@dataclass
class Edits:
    """A kind's edits for one strength, in forward order, and what they need per forward pass."""

    edits: list[Edit] = field(default_factory=list)
    begin_forward: Callable[[dict, tuple, dict], None] | None = None
    check_sites: list = field(default_factory=list)  # sites that must exist even when nothing is edited

    @property
    def foldable(self) -> bool:
        return all(e.affine is not None for e in self.edits)


def affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
    """``x * scale (+ shift)``: the one formula every mode applies (shift: towards a mean)."""
    out = x * scale.to(x.dtype)
    return out if shift is None else out + shift.to(x.dtype)


def transform(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None, gate=None) -> torch.Tensor:
    """:func:`affine`, or with a gate ``(v, c, t)`` only at the positions whose evidence exceeds t
    (lmms_sgm/gate.py); elsewhere ``x`` unchanged."""
    if gate is None:
        return affine(x, scale, shift)
    return gated(x, affine(x, scale, shift), *gate)


class SiteTransform:
    """An SGM site's edit function: :func:`transform` with the site's constants (a class rather than a
    lambda so that it travels by value in a remote trace and reads well in a traceback)."""

    def __init__(self, scale, shift, gate=None):
        self.scale, self.shift, self.gate = scale, shift, gate

    def __call__(self, x, state=None):
        return transform(x, self.scale, self.shift, self.gate)


def hidden(output):
    """A decoder layer's hidden states: its output, or the output's first element."""
    return output[0] if isinstance(output, tuple) else output


def with_hidden(output, new):
    return (new, *output[1:]) if isinstance(output, tuple) else new
