"""The safety-glasses artifact: everything needed to apply SGM to one model.

A glasses directory holds exactly two files:

* ``glasses.safetensors`` -- for every profiled site, ``<site>.auroc`` (float64, each neuron's
  expertise), ``<site>.alpha`` (float32, its factor; 1 for non-experts) and
  ``<site>.mean_nontoxic`` (float32, its mean pooled response on the non-toxic pairs, the target
  of ``towards=nontoxic_mean``);
* ``manifest.json`` -- format version, the model fingerprint, the sites, every profiling and
  selection option, the profiling data's digest and counts, the intervention ``digest``, and the
  files' integrity: ``tensors_sha256`` / ``tensors_bytes`` of ``glasses.safetensors`` and a
  ``content_digest`` over the whole manifest (that field left out), so any change to either file
  is detected on load.

Loading reads only JSON and safetensors: nothing is ever unpickled. Identical glasses are written
as identical bytes. Writing goes through a sibling temporary directory that replaces the target
in one rename, and only ever replaces a directory that holds glasses and nothing else.
Applying glasses to a model whose fingerprint differs is refused.

Glasses come in kinds (manifest field ``kind``, format 3 on): ``sgm`` (the above, per-neuron
factors; no ``kind`` field, written as format 2) and ``gated_steering``
(:class:`lmms_sgm.steering.SteeringGlasses`). Every kind shares this module's files, integrity
checks, fingerprint check and staged writes; :meth:`Glasses.load` (also reached as
``SafetyGlasses.load``) returns whichever kind a directory holds.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as dump_tensors

from lmms_sgm.version import __version__
from lmms_sgm.expertise import select
from lmms_sgm.models import fingerprint
from lmms_sgm.options import (
    ApplyOptions,
    ProfileOptions,
    SelectionOptions,
    from_strings,
    to_dict,
)
from lmms_sgm.sites import Site
from lmms_sgm.staging import real_path, staged_directory

# SGM glasses are written in format 2; format 3 adds the ``kind`` field, and glasses of another
# kind than sgm are written in it (so a reader that predates kinds refuses them by their version).
# Each kind is written in the lowest format that holds it: SGM glasses stay readable by earlier
# versions, and their bytes do not change.
FORMAT_VERSION = 2
KIND_FORMAT_VERSION = 3
# Format 1 (no content digest) is still read, with a warning: only its alphas can be checked.
READABLE_VERSIONS = (1, 2, 3)
SGM_KIND = "sgm"
STEERING_KIND = "gated_steering"
KINDS = (SGM_KIND, STEERING_KIND)
TENSORS = "glasses.safetensors"
MANIFEST = "manifest.json"
GLASSES_FILES = (MANIFEST, TENSORS)
# Manifest fields that describe the files rather than the glasses; rewritten on every save.
INTEGRITY_FIELDS = ("tensors_sha256", "tensors_bytes", "content_digest")
REQUIRED_FIELDS = ("format_version", "fingerprint", "sites", "profile_options", "selection_options",
                   "data", "counts", "digest")
# One metadata entry only: safetensors writes metadata from a hash map, so two or more entries
# come out in a random order and identical glasses would differ in their header bytes.
TENSORS_METADATA = {"format": "lmms_sgm.glasses"}


class GlassesError(ValueError):
    """Glasses files that are damaged, edited or unreadable; the message names the file."""


class UnverifiedGlassesWarning(UserWarning):
    """Glasses written in format 1, which carry no content digest to verify their files with."""


class GlassesMismatch(ValueError):
    """Glasses profiled on another model than the one they are applied to."""


class Glasses:
    """What every kind of glasses shares: the files, their verification, the fingerprint check.

    A kind (a subclass) says which tensors it stores (:meth:`tensors`), how it reads them back
    (:meth:`_from_files`), what its intervention identity is (:meth:`digest`, checked on load by
    :meth:`_verify`) and how it is worn (:meth:`apply`).
    """

    kind: ClassVar[str]
    required_fields: ClassVar[tuple[str, ...]]  # manifest fields besides the integrity ones
    manifest: dict
    integrity: str | None

    # ------------------------------------------------------------ persistence

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the glasses to ``path``; ``overwrite`` replaces glasses there, and nothing else.

        Atomic: a failure or an interruption leaves the previous contents of ``path`` (or no
        ``path``) and no temporary files.
        """
        with staged_output(path, overwrite=overwrite) as tmp:
            self.write_files(tmp)
        return Path(path)

    def write_files(self, directory: Path) -> None:
        """Write the two glasses files into an existing, empty ``directory`` (same inputs, same bytes)."""
        blob = dump_tensors(self.tensors(), metadata=TENSORS_METADATA)
        manifest = {k: v for k, v in self.manifest.items() if k not in INTEGRITY_FIELDS}
        if self.kind == SGM_KIND:
            manifest.pop("kind", None)
            version = FORMAT_VERSION
        else:
            manifest["kind"] = self.kind
            version = KIND_FORMAT_VERSION
        manifest.update(format_version=version, digest=self.digest(),
                        tensors_sha256=hashlib.sha256(blob).hexdigest(), tensors_bytes=len(blob))
        manifest["content_digest"] = content_digest(manifest)
        _write_file(directory / TENSORS, blob)
        _write_file(directory / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())

    @classmethod
    def load(cls, path: str | Path) -> Glasses:
        """Read and verify glasses of any kind: any damaged, truncated or edited file is a
        :class:`GlassesError` naming it (format 1 glasses, which carry no content digest, load with
        a warning). ``SafetyGlasses.load`` is this same loader; another kind's class refuses
        glasses of a different kind."""
        path = Path(path)
        tensors_path = path / TENSORS
        if path.is_dir() and not tensors_path.exists():
            raise FileNotFoundError(f"{path} is not a glasses directory ({tensors_path} is missing; needs {MANIFEST} "
                                    f"and {TENSORS}); build glasses with `lmms-sgm profile`")
        manifest = read_manifest(path)
        kind_cls = glasses_class(manifest.get("kind", SGM_KIND))
        if cls not in (Glasses, SafetyGlasses) and not issubclass(kind_cls, cls):
            raise GlassesError(f"{path / MANIFEST}: these are {kind_cls.kind} glasses, not {cls.kind}; load them with "
                               "SafetyGlasses.load")
        version = manifest["format_version"]
        _require_regular(tensors_path)  # a FIFO or /dev/zero would hang the read
        size = tensors_path.stat().st_size
        if version >= 2 and size != manifest["tensors_bytes"]:  # refused before a huge file is read
            raise GlassesError(f"{tensors_path}: {size} bytes, but {MANIFEST} records {manifest['tensors_bytes']} "
                               "(truncated or damaged); re-create the glasses")
        blob = tensors_path.read_bytes()
        if version >= 2:
            _verify_content(path, manifest, blob)
            integrity = f"ok (content digest {manifest['content_digest'][:16]})"
        else:
            integrity = (f"not verifiable: format {version} files carry no content digest (the alphas match the "
                         f"recorded digest); re-save them in format {FORMAT_VERSION}: {_resave_command(path, manifest)}")
        try:
            tensors = load_tensors(blob)
        except (SafetensorError, ValueError) as e:
            raise GlassesError(f"{tensors_path}: not a readable safetensors file ({e}); re-create the glasses") from None
        manifest = {k: v for k, v in manifest.items() if k not in INTEGRITY_FIELDS}
        try:
            glasses = kind_cls._from_files(manifest, tensors, tensors_path)
        except GlassesError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise GlassesError(f"{path / MANIFEST}: not a valid glasses manifest ({type(e).__name__}: {e})") from None
        glasses._verify(manifest, tensors_path)
        glasses.integrity = integrity
        if version < 2:
            warnings.warn(f"{path}: glasses integrity {integrity}", UnverifiedGlassesWarning, stacklevel=2)
        return glasses

    @classmethod
    def _from_files(cls, manifest: dict, tensors: dict, tensors_path: Path) -> Glasses:
        raise NotImplementedError

    def _verify(self, manifest: dict, tensors_path: Path) -> None:
        """Check what was read against the recorded intervention ``digest`` (for every format)."""
        if self.digest() != manifest["digest"]:
            raise GlassesError(f"{tensors_path}: the tensors do not match the digest recorded in {MANIFEST}; the files "
                               "are damaged or were edited: re-create the glasses")

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors written to ``glasses.safetensors``."""
        raise NotImplementedError

    def digest(self) -> str:
        """sha256 identifying what applying these glasses does."""
        raise NotImplementedError

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
        """Wear the glasses: returns a handle (also a context manager) with ``.remove()``."""
        raise NotImplementedError

    def identity(self) -> dict:
        """What the glasses do, in a few JSON fields (the lmms-eval wrapper records it in results)."""
        raise NotImplementedError

    def summary(self) -> str:
        raise NotImplementedError


@dataclass(repr=False)
class SafetyGlasses(Glasses):
    """SGM glasses (kind ``sgm``): every profiled neuron's AUROC and factor alpha."""

    kind: ClassVar[str] = SGM_KIND
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

    def apply(self, model, strength: float = 1.0, mode: str = "hooks", **kwargs):
        """Wear the glasses: returns a handle (also a context manager) with ``.remove()``.

        ``strength`` s blends ``out = (1 - s) * out + s * alpha * out``. ``mode`` is ``hooks``,
        ``nnsight`` (call ``handle.model``, an nnsight wrapper) or ``fold``. ``remote=`` ("ndif", a
        server URL or "local"; nnsight mode only) returns a :class:`lmms_sgm.remote.RemoteGlasses`
        whose ``generate`` / ``token_scores`` run on the server, the glasses applied inside each trace.
        """
        from lmms_sgm.intervention import apply

        options = ApplyOptions(strength=strength, mode=mode)
        return apply(self, model, options, **kwargs)

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


def glasses_class(kind) -> type[Glasses]:
    """The class of a glasses kind (the manifest's ``kind``; absent: sgm)."""
    if kind == SGM_KIND:
        return SafetyGlasses
    if kind == STEERING_KIND:
        from lmms_sgm.steering import SteeringGlasses

        return SteeringGlasses
    raise GlassesError(f"unknown glasses kind {kind!r} (lmms_sgm {__version__} knows {', '.join(KINDS)}); "
                       "re-create the glasses with this version")
def _selection_dict(selection: SelectionOptions) -> dict:
    """The manifest's selection options; ``gate`` only when on, so that ungated glasses keep the
    bytes (and digests) they had before gates existed."""
    d = to_dict(selection)
    if d.get("gate") == "off":
        del d["gate"]
    return d


# ---------------------------------------------------------------- integrity


def content_digest(manifest: dict) -> str:
    """sha256 of the canonical JSON of ``manifest`` without its ``content_digest``.

    The manifest records the sha256 of the tensors file, so this one value covers both files.
    It guards against damage and hand edits, not against someone who rewrites both files.
    """
    body = {k: v for k, v in manifest.items() if k != "content_digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()


def read_manifest(path: str | Path) -> dict:
    """The parsed manifest of the glasses directory ``path``; a clear error naming the file otherwise."""
    from lmms_sgm.textfiles import kind

    path = Path(path)
    file = path / MANIFEST
    if not file.exists():
        what = ("it does not exist" if not path.exists() else
                f"it is {kind(path) or 'a file'}" if not path.is_dir() else f"{file} is missing")
        raise FileNotFoundError(f"{path} is not a glasses directory ({what}; needs {MANIFEST} and {TENSORS}); "
                                "build glasses with `lmms-sgm profile`")
    _require_regular(file)
    if file.stat().st_size > MAX_MANIFEST_BYTES:
        raise GlassesError(f"{file}: {file.stat().st_size} bytes, not a glasses manifest (at most "
                           f"{MAX_MANIFEST_BYTES >> 20} MiB); re-create the glasses")
    try:
        manifest = json.loads(file.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        reason = f"{e.msg} at line {e.lineno}, column {e.colno}" if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        raise GlassesError(f"{file}: not valid JSON ({reason}); the file is damaged: re-create the glasses") from None
    if not isinstance(manifest, dict):
        raise GlassesError(f"{file}: not a glasses manifest (a JSON object expected, got {type(manifest).__name__})")
    if "format_version" not in manifest:
        raise GlassesError(f"{file}: not a glasses manifest (lacks format_version)")
    version = manifest["format_version"]
    if version not in READABLE_VERSIONS:
        raise GlassesError(f"{file}: glasses format {version!r} is not supported (lmms_sgm {__version__} reads formats "
                           f"{', '.join(map(str, READABLE_VERSIONS))}); re-create the glasses with this version")
    if version >= KIND_FORMAT_VERSION and "kind" not in manifest:
        raise GlassesError(f"{file}: not a glasses manifest (format {version} lacks kind)")
    required = glasses_class(manifest.get("kind", SGM_KIND)).required_fields
    missing = [k for k in required if k not in manifest]
    if missing:
        raise GlassesError(f"{file}: not a glasses manifest (lacks {', '.join(missing)})")
    missing = [k for k in INTEGRITY_FIELDS if k not in manifest]
    if version >= 2 and missing:
        raise GlassesError(f"{file}: the manifest lacks {', '.join(missing)}: it was edited; re-create the glasses")
    return manifest


MAX_MANIFEST_BYTES = 64 << 20  # a manifest holds options and sites (KiBs): a larger file is not one


def _require_regular(file: Path) -> None:
    """A glasses file that exists but is a directory, a FIFO or a device (``/dev/zero``) is named as such."""
    from lmms_sgm.textfiles import kind

    found = kind(file)
    if found is not None:
        raise GlassesError(f"{file} is {found}, not a regular file: not glasses; re-create the glasses")


def _verify_content(path: Path, manifest: dict, blob: bytes) -> None:
    if manifest["content_digest"] != content_digest(manifest):
        raise GlassesError(f"{path / MANIFEST}: content digest mismatch: the manifest was edited or damaged after it was "
                           "written; re-create the glasses (`lmms-sgm select` writes other selection options)")
    if len(blob) != manifest["tensors_bytes"]:
        raise GlassesError(f"{path / TENSORS}: {len(blob)} bytes, but {MANIFEST} records {manifest['tensors_bytes']} "
                           "(truncated or damaged); re-create the glasses")
    if hashlib.sha256(blob).hexdigest() != manifest["tensors_sha256"]:
        raise GlassesError(f"{path / TENSORS}: content does not match the sha256 recorded in {MANIFEST} (damaged or "
                           "replaced after it was written); re-create the glasses")


def _resave_command(path: Path, manifest: dict) -> str:
    """The `lmms-sgm select` line that re-saves ``path`` unchanged in the current format."""
    options = sorted(manifest["selection_options"].items())
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in options if v is not None)
    return f"`lmms-sgm select {path} --out NEW_DIR {flags}`"


# ---------------------------------------------------------------- writing


def _write_file(path: Path, data: bytes) -> None:
    """A new file with the user's umask, on disk before its directory is renamed into place."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def check_target(path: str | Path, overwrite: bool = False, protect=()) -> None:
    """Refuse an output path glasses may not be written to (callers check early, before long work).

    Writable: a path that does not exist, an empty directory, or, with ``overwrite``, a directory
    holding glasses (a readable manifest) and nothing else. ``protect``: paths (the profiling
    data) that the output must neither be nor contain.
    """
    real = real_path(path)
    path = Path(path)
    if not real.exists():
        return
    if not real.is_dir():
        raise FileExistsError(f"{path} is a file, not a glasses directory; choose another output path")
    for p in protect:
        p = real_path(p)
        if p == real or real in p.parents:
            raise FileExistsError(f"{path} holds the profiling data {p}; refusing to write glasses there: choose another output path")
    entries = sorted(os.listdir(real))
    if not entries:
        return
    if not overwrite:
        raise FileExistsError(f"{path} exists and is not empty (pass overwrite=True / --overwrite to replace glasses there)")
    try:
        read_manifest(real)
    except (FileNotFoundError, GlassesError) as e:
        raise FileExistsError(f"{path} is not a glasses directory ({e}); --overwrite only replaces glasses: "
                              "choose another output path") from None
    others = [e for e in entries if e not in GLASSES_FILES]
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise FileExistsError(f"{path} holds glasses and other files ({shown}); --overwrite only replaces a directory "
                              "holding nothing but glasses: move them or choose another output path")


def staged_output(path: str | Path, *, overwrite: bool = False, protect=()):
    """Yield an empty sibling directory to write glasses into; on success it replaces ``path``
    (see :func:`lmms_sgm.staging.staged_directory`). Only a directory holding glasses and nothing
    else is ever replaced, and only its two files are removed."""
    return staged_directory(path, check=lambda: check_target(path, overwrite, protect), discard=_discard_glasses)


def _discard_glasses(directory: Path) -> None:
    """Remove replaced glasses: only their two files, so anything else that appeared there stays."""
    try:
        for name in GLASSES_FILES:
            (directory / name).unlink(missing_ok=True)
        directory.rmdir()
    except OSError as e:
        warnings.warn(f"the replaced glasses were moved to {directory} and not removed ({e}); delete it by hand", stacklevel=3)
