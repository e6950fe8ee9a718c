"""Clamp glasses (kind ``clamp``): selected units of one linear module's output held at a value.

At strength s a selected unit becomes ``(1 - s) * out + s * value``: a per-unit affine (scale
``1 - s``, shift ``s * value``), so the kind declares every mode, fold included.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import ClassVar

import torch

from lmms_sgm.interventions.base import Glasses
from lmms_sgm.interventions.edits import OUTPUT, Edit, Edits, SiteTransform
from lmms_sgm.interventions.errors import GlassesError
from lmms_sgm.models import fingerprint
from lmms_sgm.plugins import hookimpl
from lmms_sgm.sites import Site


class ClampGlasses(Glasses):
    kind: ClassVar[str] = "clamp"
    required_fields: ClassVar[tuple[str, ...]] = ("format_version", "kind", "fingerprint", "site", "value", "digest")
    VARIANTS: ClassVar[dict] = {"clamp": {"modes": ("hooks", "nnsight", "fold", "remote")}}

    def __init__(self, site: Site, units: torch.Tensor, manifest: dict):
        self.site, self.units, self.manifest, self.integrity = site, units.to(torch.int64), manifest, None

    @classmethod
    def create(cls, model, site: Site, units, value: float) -> ClampGlasses:
        manifest = {"format_version": 3, "kind": cls.kind, "fingerprint": fingerprint(model), "site": site.to_dict(),
                    "value": float(value)}
        return cls(site, torch.as_tensor(units), manifest)

    @property
    def value(self) -> float:
        return float(self.manifest["value"])

    def tensors(self):
        return {"units": self.units.contiguous()}

    def digest(self) -> str:
        h = hashlib.sha256(json.dumps([self.manifest["fingerprint"], self.manifest["site"], self.value],
                                      sort_keys=True).encode())
        h.update(self.units.numpy().tobytes())
        return h.hexdigest()

    @classmethod
    def _from_files(cls, manifest: dict, tensors: dict, tensors_path: Path) -> ClampGlasses:
        units = tensors.get("units")
        if units is None or units.dtype != torch.int64:
            raise GlassesError(f"{tensors_path}: tensor units is missing or not int64")
        return cls(Site(**manifest["site"]), units, manifest)

    def edits(self, strength: float, *, device=None, dtype=None) -> Edits:
        if strength == 0:
            return Edits([], check_sites=[self.site])
        scale = torch.ones(self.site.width)
        shift = torch.zeros(self.site.width)
        scale[self.units] = 1 - strength
        shift[self.units] = strength * self.value
        scale, shift = scale.to(device), shift.to(device)
        return Edits([Edit(self.site, OUTPUT, SiteTransform(scale, shift), affine=(scale, shift), width=self.site.width)])

    def identity(self) -> dict:
        return {"kind": self.kind, "site": self.site.name, "units": len(self.units), "value": self.value}

    def summary(self) -> str:
        return (f"integrity: {self.integrity or 'not saved'}\nkind: clamp: {len(self.units)} units of {self.site.name} "
                f"held at {self.value:g}")


@hookimpl
def sgm_glasses_kinds():
    return {ClampGlasses.kind: ClampGlasses}
