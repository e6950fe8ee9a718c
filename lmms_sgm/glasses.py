"""The safety-glasses artifact: everything needed to apply SGM to one model.

A glasses directory holds

* ``glasses.safetensors`` -- for every profiled site, ``<site>.auroc`` (float64, each neuron's
  expertise), ``<site>.alpha`` (float32, its factor; 1 for non-experts) and
  ``<site>.mean_nontoxic`` (float32, its mean pooled response on the non-toxic pairs, the target
  of ``towards=nontoxic_mean``);
* ``manifest.json`` -- format version, the model fingerprint, the sites, every profiling and
  selection option, the profiling data's digest and counts.

Loading reads only JSON and safetensors: nothing is ever unpickled. Applying glasses to a model
whose fingerprint differs is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmms_sgm import __version__
from lmms_sgm.expertise import select
from lmms_sgm.models import fingerprint
from lmms_sgm.options import ApplyOptions, ProfileOptions, SelectionOptions, from_strings, to_dict
from lmms_sgm.sites import Site

FORMAT_VERSION = 1
TENSORS = "glasses.safetensors"
MANIFEST = "manifest.json"


def refuse_existing(path: str | Path, overwrite: bool) -> None:
    """Refuse to write glasses over a non-empty directory unless asked to (checked early by callers)."""
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty (pass overwrite=True / --overwrite)")


class GlassesMismatch(ValueError):
    """Glasses profiled on another model than the one they are applied to."""


@dataclass
class SafetyGlasses:
    sites: list[Site]
    auroc: dict[str, torch.Tensor]
    alpha: dict[str, torch.Tensor]
    manifest: dict
    mean_nontoxic: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------ building

    @classmethod
    def from_expertise(cls, sites, aurocs, selection: SelectionOptions, *, model, profile_options, data_digest,
                       data_counts, mean_nontoxic=None):
        alpha = select(aurocs, selection)
        manifest = {
            "format_version": FORMAT_VERSION,
            "lmms_sgm_version": __version__,
            "fingerprint": fingerprint(model),
            "sites": [s.to_dict() for s in sites],
            "profile_options": to_dict(profile_options),
            "selection_options": to_dict(selection),
            "data": {"digest": data_digest, **data_counts},
        }
        glasses = cls(list(sites), dict(aurocs), alpha, manifest, mean_nontoxic)
        glasses._check_towards()
        glasses.manifest["counts"] = glasses.counts()
        return glasses

    def _check_towards(self) -> None:
        if self.selection.towards == "nontoxic_mean" and self.mean_nontoxic is None:
            raise ValueError("towards=nontoxic_mean needs the non-toxic means, which these glasses lack; re-profile them")

    def reselect(self, selection: SelectionOptions) -> "SafetyGlasses":
        """The same expertise with another selection rule: no re-profiling needed."""
        manifest = json.loads(json.dumps(self.manifest))
        manifest["selection_options"] = to_dict(selection)
        glasses = SafetyGlasses(self.sites, self.auroc, select(self.auroc, selection), manifest, self.mean_nontoxic)
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
        for s in self.sites:
            h.update(s.name.encode())
            h.update(self.alpha[s.name].numpy().tobytes())
            if towards == "nontoxic_mean":
                h.update(self.mean_nontoxic[s.name].numpy().tobytes())
        return h.hexdigest()

    # ------------------------------------------------------------ persistence

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write atomically: a failure leaves no partial directory behind."""
        path = Path(path)
        refuse_existing(path, overwrite)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            tensors = {}
            for s in self.sites:
                tensors[f"{s.name}.auroc"] = self.auroc[s.name].to(torch.float64).contiguous()
                tensors[f"{s.name}.alpha"] = self.alpha[s.name].to(torch.float32).contiguous()
                if self.mean_nontoxic is not None:
                    tensors[f"{s.name}.mean_nontoxic"] = self.mean_nontoxic[s.name].to(torch.float32).contiguous()
            save_file(tensors, str(tmp / TENSORS), metadata={"format": "lmms_sgm.glasses", "format_version": str(FORMAT_VERSION)})
            manifest = dict(self.manifest, digest=self.digest())
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SafetyGlasses":
        path = Path(path)
        if not (path / MANIFEST).is_file() or not (path / TENSORS).is_file():
            raise FileNotFoundError(f"{path} is not a glasses directory (needs {MANIFEST} and {TENSORS}); build one with `lmms-sgm profile`")
        manifest = json.loads((path / MANIFEST).read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: glasses format {manifest.get('format_version')} is not supported (expected {FORMAT_VERSION})")
        tensors = load_file(str(path / TENSORS))
        sites = [Site(**s) for s in manifest["sites"]]
        missing = [s.name for s in sites if f"{s.name}.auroc" not in tensors or f"{s.name}.alpha" not in tensors]
        if missing:
            raise ValueError(f"{path}: tensors missing for sites {missing[:3]}")
        means = None
        if all(f"{s.name}.mean_nontoxic" in tensors for s in sites):
            means = {s.name: tensors[f"{s.name}.mean_nontoxic"] for s in sites}
        glasses = cls(
            sites,
            {s.name: tensors[f"{s.name}.auroc"] for s in sites},
            {s.name: tensors[f"{s.name}.alpha"] for s in sites},
            manifest,
            means,
        )
        glasses._check_towards()
        return glasses

    # ------------------------------------------------------------ use

    def check(self, model) -> None:
        """Refuse a model whose fingerprint differs from the one profiled."""
        expected = self.manifest["fingerprint"]
        actual = fingerprint(model)
        diff = {k: (expected.get(k), actual.get(k)) for k in expected if expected.get(k) != actual.get(k)}
        if diff:
            lines = ", ".join(f"{k}: glasses {a!r} vs model {b!r}" for k, (a, b) in diff.items())
            raise GlassesMismatch(f"these glasses were profiled on another model ({lines}); profile this model with `lmms-sgm profile`")

    def apply(self, model, strength: float = 1.0, mode: str = "hooks", **kwargs):
        """Wear the glasses: returns a handle (also a context manager) with ``.remove()``.

        ``strength`` s blends ``out = (1 - s) * out + s * alpha * out``. ``mode`` is ``hooks``,
        ``nnsight`` (call ``handle.model``, an nnsight wrapper) or ``fold``.
        """
        from lmms_sgm.intervention import apply

        options = ApplyOptions(strength=strength, mode=mode)
        return apply(self, model, options, **kwargs)

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
        lines = [f"fingerprint: {json.dumps(self.manifest['fingerprint'], sort_keys=True)}"]
        lines.append(f"data: {json.dumps(self.manifest['data'], sort_keys=True)}")
        lines.append(f"profile options: {json.dumps(self.manifest['profile_options'], sort_keys=True)}")
        lines.append(f"selection options: {json.dumps(self.manifest['selection_options'], sort_keys=True)}")
        counts = self.counts()
        lines.append(f"experts: {counts['experts']} of {counts['neurons']} neurons")
        lines.append(f"{'layer':>5} {'module':<13} {'neurons':>8} {'experts':>8} {'auroc min':>9} {'median':>7} {'max':>6} {'alpha min':>9}")
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
