"""SGM glasses (kind ``sgm``), gated or not: per-neuron factors, and optionally a gate.

Each selected neuron becomes ``f * out`` (towards zero) or ``f * out + (1 - f) * mu`` (towards
its non-toxic mean mu), with ``f = 1 - s + s * alpha`` (method.md s.6). Ungated, that is a
per-unit affine: foldable into the weights. Gated (``gate=evidence``, lmms_sgm/gate.py), it acts
only at the positions whose evidence crosses the site's threshold: hooks, nnsight.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from lmms_sgm.expertise import select
from lmms_sgm.interventions.base import FORMAT_VERSION, MANIFEST, REQUIRED_FIELDS, SGM_KIND, Glasses
from lmms_sgm.interventions.edits import INPUT, OUTPUT, Edit, Edits, SiteTransform
from lmms_sgm.interventions.errors import GlassesError
from lmms_sgm.models import fingerprint
from lmms_sgm.options import ProfileOptions, SelectionOptions, from_strings, to_dict
from lmms_sgm.sites import Site
from lmms_sgm.version import __version__


@dataclass(repr=False)
class SafetyGlasses(Glasses):
    """SGM glasses (kind ``sgm``): every profiled neuron's AUROC and factor alpha."""

    kind: ClassVar[str] = SGM_KIND
    format_version: ClassVar[int] = FORMAT_VERSION
    has_experts: ClassVar[bool] = True
    required_fields: ClassVar[tuple[str, ...]] = REQUIRED_FIELDS
    sites: list[Site]
    auroc: dict[str, torch.Tensor]
    alpha: dict[str, torch.Tensor]
    manifest: dict
    mean_nontoxic: dict[str, torch.Tensor] | None = None
    # Input-conditional glasses (lmms_sgm/gate.py): site -> (v, c, t); None when not gated.
    gate: dict | None = None
    # What loading found out about the files (inspect prints it); None when not loaded from disk.
    integrity: str | None = field(default=None, compare=False)

    def __repr__(self) -> str:
        c = self.counts()
        return (f"SafetyGlasses({len(self.sites)} sites, {c['experts']} experts of {c['neurons']} neurons, "
                f"rule={self.manifest['selection_options'].get('rule')}, digest={self.digest()[:12]})")

    # ------------------------------------------------------------ building

    @classmethod
    def from_expertise(cls, sites, aurocs, selection: SelectionOptions, *, model, profile_options, data_digest,
                       data_counts, mean_nontoxic=None, store=None, labels=None):
        """``store`` / ``labels``: the pooled responses and their labels, needed by ``gate=evidence``."""
        alpha = select(aurocs, selection)
        manifest = {
            "format_version": FORMAT_VERSION,
            "lmms_sgm_version": __version__,
            "fingerprint": fingerprint(model),
            "sites": [s.to_dict() for s in sites],
            "profile_options": to_dict(profile_options),
            "selection_options": _selection_dict(selection),
            "data": {"digest": data_digest, **data_counts},
        }
        glasses = cls(list(sites), dict(aurocs), alpha, manifest, mean_nontoxic)
        glasses._fit_gate(store, labels)
        glasses._check_towards()
        glasses.manifest["counts"] = glasses.counts()
        return glasses

    def _fit_gate(self, store, labels) -> None:
        if self.selection.gate == "off":
            self.gate = None
            return
        if store is None or self.mean_nontoxic is None:
            raise ValueError("gate=evidence chooses its thresholds on the pooled responses of the profiling pairs: "
                             "profile with it (lmms-sgm profile --gate evidence), it cannot be added by re-selection")
        from lmms_sgm import gate

        self.gate = gate.fit(store, self.sites, self.auroc, self.alpha, self.mean_nontoxic, labels)

    def _check_towards(self) -> None:
        if self.selection.towards == "nontoxic_mean" and self.mean_nontoxic is None:
            raise ValueError("towards=nontoxic_mean needs the non-toxic means, which these glasses lack; re-profile them")
        if (self.selection.gate != "off") != (self.gate is not None):
            raise ValueError(f"gate={self.selection.gate} but the glasses {'lack' if self.gate is None else 'hold'} a gate")

    def reselect(self, selection: SelectionOptions, *, store=None, labels=None) -> SafetyGlasses:
        """The same expertise with another selection rule: no re-profiling needed (a gate needs the
        pooled responses, ``store`` and ``labels``)."""
        manifest = json.loads(json.dumps(self.manifest))
        manifest["selection_options"] = _selection_dict(selection)
        glasses = SafetyGlasses(self.sites, self.auroc, select(self.auroc, selection), manifest, self.mean_nontoxic)
        glasses._fit_gate(store, labels)
        glasses._check_towards()
        glasses.manifest["counts"] = glasses.counts()
        return glasses

    @property
    def selection(self) -> SelectionOptions:
        return from_strings(SelectionOptions, self.manifest["selection_options"])

    @property
    def profile_options(self) -> ProfileOptions:
        """The options the glasses were profiled with (to rebuild or extend them)."""
        return from_strings(ProfileOptions, self.manifest["profile_options"])

    def counts(self) -> dict:
        experts_per_layer: dict[int, int] = {}
        for s in self.sites:
            experts_per_layer[s.layer] = experts_per_layer.get(s.layer, 0) + int((self.alpha[s.name] != 1).sum())
        return {
            "neurons": sum(s.width for s in self.sites),
            "experts": sum(experts_per_layer.values()),
            "experts_per_layer": {str(k): v for k, v in sorted(experts_per_layer.items())},
        }

    def digest(self) -> str:
        """sha256 over the alphas and the selection: identifies what applying these glasses does."""
        h = hashlib.sha256(json.dumps(self.manifest["fingerprint"], sort_keys=True).encode())
        towards = self.selection.towards
        if towards != "zero":  # kept out of the hash otherwise, so older digests stay valid
            h.update(towards.encode())
        for s in self.sites:  # float32, as stored: the digest of saved and reloaded glasses is the same
            h.update(s.name.encode())
            h.update(self.alpha[s.name].to(torch.float32).numpy().tobytes())
            if towards == "nontoxic_mean":
                h.update(self.mean_nontoxic[s.name].to(torch.float32).numpy().tobytes())
            if self.gate is not None and s.name in self.gate:
                v, c, t = self.gate[s.name]
                h.update(b"gate" + v.to(torch.float32).numpy().tobytes()
                         + torch.tensor([c, t], dtype=torch.float64).numpy().tobytes())
        return h.hexdigest()

    # ------------------------------------------------------------ persistence

    def tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for s in self.sites:
            tensors[f"{s.name}.auroc"] = self.auroc[s.name].to(torch.float64).contiguous()
            tensors[f"{s.name}.alpha"] = self.alpha[s.name].to(torch.float32).contiguous()
            if self.mean_nontoxic is not None:
                tensors[f"{s.name}.mean_nontoxic"] = self.mean_nontoxic[s.name].to(torch.float32).contiguous()
            if self.gate is not None and s.name in self.gate:
                v, c, t = self.gate[s.name]
                tensors[f"{s.name}.gate_weight"] = v.to(torch.float32).contiguous()
                tensors[f"{s.name}.gate_offset_threshold"] = torch.tensor([c, t], dtype=torch.float64)
        return tensors

    def _verify(self, manifest: dict, tensors_path: Path) -> None:
        # Holds for every format; for format 1 it is the only check that the alphas are intact.
        if self.digest() != manifest["digest"] or self.counts() != manifest["counts"]:
            raise GlassesError(
                f"{tensors_path}: the alphas do not match the digest and expert counts recorded in {MANIFEST} "
                f"({self.counts()['experts']} experts, manifest: {dict(manifest['counts']).get('experts')}); the files "
                "are damaged or were edited: re-create the glasses"
            )

    @classmethod
    def _from_files(cls, manifest: dict, tensors: dict, tensors_path: Path) -> SafetyGlasses:
        sites = [Site(**s) for s in manifest["sites"]]
        for s in sites:
            for kind, dtype in (("auroc", torch.float64), ("alpha", torch.float32), ("mean_nontoxic", torch.float32)):
                t = tensors.get(f"{s.name}.{kind}")
                if t is None and kind == "mean_nontoxic":
                    continue
                if t is None or t.dtype != dtype or tuple(t.shape) != (s.width,):
                    got = "missing" if t is None else f"{t.dtype} {tuple(t.shape)}"
                    raise GlassesError(f"{tensors_path}: tensor {s.name}.{kind} is {got}, expected {dtype} ({s.width},)")
        means = None
        if all(f"{s.name}.mean_nontoxic" in tensors for s in sites):
            means = {s.name: tensors[f"{s.name}.mean_nontoxic"] for s in sites}
        gate = {}
        for s in sites:
            v, ct = tensors.get(f"{s.name}.gate_weight"), tensors.get(f"{s.name}.gate_offset_threshold")
            if v is None and ct is None:
                continue
            if v is None or ct is None or v.dtype != torch.float32 or tuple(v.shape) != (s.width,) or tuple(ct.shape) != (2,):
                raise GlassesError(f"{tensors_path}: the gate tensors of {s.name} are incomplete or malformed")
            gate[s.name] = (v, float(ct[0]), float(ct[1]))
        glasses = cls(
            sites,
            {s.name: tensors[f"{s.name}.auroc"] for s in sites},
            {s.name: tensors[f"{s.name}.alpha"] for s in sites},
            manifest,
            means,
            gate or ({} if manifest["selection_options"].get("gate", "off") != "off" else None),
        )
        glasses._check_towards()
        return glasses

    # ------------------------------------------------------------ use

    # ------------------------------------------------------------ wearing (lmms_sgm.interventions.wearing)

    VARIANTS: ClassVar[dict[str, dict]] = {
        "SGM": {"modes": ("hooks", "nnsight", "fold", "remote")},
        "gated SGM": {"modes": ("hooks", "nnsight", "remote"), "refusals": {
            "fold": "fold cannot express a gate: a weight change acts on every position alike, and these glasses act "
                    "only where their evidence crosses a threshold"}},
    }

    @property
    def label(self) -> str:
        return "gated SGM" if self.gate is not None else "SGM"

    def edits(self, strength: float, *, device=None, dtype=None) -> Edits:
        """One edit per changed site: ``scale * x + shift`` per neuron (foldable), or the same only
        where the site's evidence crosses its threshold (gated: not foldable). The constants stay
        float32 (cast to the value's dtype when applied)."""
        gates = self.gate or {}
        out = []
        transforms = self.transforms(strength)
        for s in self.sites:
            if s.name not in transforms:
                continue
            f, b = transforms[s.name]
            f, b = f.to(device), None if b is None else b.to(device)
            g = gates.get(s.name)
            if g is not None:
                g = (g[0].to(device), g[1], g[2])
            out.append(Edit(site=s, where=OUTPUT if s.kind == "output" else INPUT, fn=SiteTransform(f, b, g),
                            affine=None if g is not None else (f, b), width=s.width))
        return Edits(out)

    def describe(self) -> str:
        return f"{self.counts()['experts']} experts, digest {self.digest()[:12]}"

    def identity(self) -> dict:
        out = {"data_digest": self.manifest["data"]["digest"], "selection": self.manifest["selection_options"],
               "experts": self.counts()["experts"]}
        if self.manifest["profile_options"].get("text_only"):
            out["text_only"] = True  # profiled without images (the AurA-style baseline): said only when so
        return out

    def factors(self, strength: float) -> dict[str, torch.Tensor]:
        """Effective per-neuron factors ``1 - s + s * alpha`` of the sites that change anything."""
        out = {}
        for s in self.sites:
            f = (1 - strength) + strength * self.alpha[s.name].to(torch.float64)
            if bool((f != 1).any()):
                out[s.name] = f.to(torch.float32)
        return out

    def transforms(self, strength: float) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """``{site: (scale, shift)}``: each neuron becomes ``scale * out + shift``.

        Blending ``(1 - s) * out + s * (mu + alpha * (out - mu))`` gives scale ``f = 1 - s + s * alpha``
        and shift ``(1 - f) * mu``; towards zero (mu = 0) there is no shift (None).
        """
        towards_mean = self.selection.towards == "nontoxic_mean"
        out = {}
        for name, f in self.factors(strength).items():
            shift = None
            if towards_mean:
                shift = ((1 - f.to(torch.float64)) * self.mean_nontoxic[name].to(torch.float64)).to(torch.float32)
            out[name] = (f, shift)
        return out

    def summary(self) -> str:
        lines = [f"integrity: {self.integrity or 'not saved'}"]
        lines.append(f"fingerprint: {json.dumps(self.manifest['fingerprint'], sort_keys=True)}")
        lines.append(f"data: {json.dumps(self.manifest['data'], sort_keys=True)}")
        lines.append(f"profile options: {json.dumps(self.manifest['profile_options'], sort_keys=True)}")
        lines.append(f"selection options: {json.dumps(self.manifest['selection_options'], sort_keys=True)}")
        counts = self.counts()
        lines.append(f"experts: {counts['experts']} of {counts['neurons']} neurons")
        lines.append(f"{'layer':>5} {'module':<13} {'neurons':>8} {'experts':>8} "
                     f"{'auroc min':>9} {'median':>7} {'max':>6} {'alpha min':>9}")
        for s in self.sites:
            a = self.auroc[s.name]
            al = self.alpha[s.name]
            lines.append(
                f"{s.layer:>5} {s.module:<13} {s.width:>8} {int((al != 1).sum()):>8} "
                f"{a.min().item():>9.3f} {a.median().item():>7.3f} {a.max().item():>6.3f} {al.min().item():>9.3f}"
            )
        allv = torch.cat([self.auroc[s.name] for s in self.sites])
        hist = torch.histc(allv.float(), bins=10, min=0, max=1).long().tolist()
        lines.append("AUROC histogram (0.0-1.0, 10 bins): " + " ".join(str(h) for h in hist))
        return "\n".join(lines)



def _selection_dict(selection: SelectionOptions) -> dict:
    """The manifest's selection options; ``gate`` only when on, so that ungated glasses keep the
    bytes (and digests) they had before gates existed."""
    d = to_dict(selection)
    if d.get("gate") == "off":
        del d["gate"]
    return d

