"""What every kind of glasses shares: the two files, their integrity, the fingerprint check.

A glasses directory holds exactly two files:

* ``glasses.safetensors`` -- the kind's tensors (SGM: for every profiled site ``<site>.auroc``,
  ``<site>.alpha`` and ``<site>.mean_nontoxic``; lmms_sgm/interventions/sgm.py);
* ``manifest.json`` -- format version, the model fingerprint, the sites, the kind's options and
  data digests, the intervention ``digest``, and the files' integrity: ``tensors_sha256`` /
  ``tensors_bytes`` of ``glasses.safetensors`` and a ``content_digest`` over the whole manifest
  (that field left out), so any change to either file is detected on load.

Loading reads only JSON and safetensors: nothing is ever unpickled. Identical glasses are written
as identical bytes. Writing goes through a sibling temporary directory that replaces the target
in one rename, and only ever replaces a directory that holds glasses and nothing else.
Applying glasses to a model whose fingerprint differs is refused.

Glasses come in kinds (manifest field ``kind``, format 3 on; absent: ``sgm``, format 2), found
through the kind registry (lmms_sgm/interventions/registry.py). :func:`load_glasses` returns
whichever kind a directory holds. A kind returns its edits as data (:meth:`Glasses.edits`) and
declares the modes it can be worn in (:attr:`Glasses.modes`); lmms_sgm/interventions/wearing.py
installs them.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as dump_tensors

from lmms_sgm.interventions.errors import GlassesError, GlassesMismatch, UnverifiedGlassesWarning
from lmms_sgm.interventions.registry import kind_class
from lmms_sgm.models import fingerprint
from lmms_sgm.staging import real_path, some_names, staged_directory
from lmms_sgm.version import __version__

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
TENSORS = "glasses.safetensors"
MANIFEST = "manifest.json"
GLASSES_FILES = (MANIFEST, TENSORS)
# Manifest fields that describe the files rather than the glasses; rewritten on every save.
INTEGRITY_FIELDS = ("tensors_sha256", "tensors_bytes", "content_digest")
# SGM's manifest fields (lmms_sgm/interventions/sgm.py).
REQUIRED_FIELDS = ("format_version", "fingerprint", "sites", "profile_options", "selection_options",
                   "data", "counts", "digest")
# One metadata entry only: safetensors writes metadata from a hash map, so two or more entries
# come out in a random order and identical glasses would differ in their header bytes.
TENSORS_METADATA = {"format": "lmms_sgm.glasses"}


class Glasses:
    """What every kind of glasses shares: the files, their verification, the fingerprint check.

    A kind (a subclass) says which tensors it stores (:meth:`tensors`), how it reads them back
    (:meth:`_from_files`), what its intervention identity is (:meth:`digest`, checked on load by
    :meth:`_verify`), what wearing it does (:meth:`edits`, plain data) and in which modes
    (:attr:`modes`, :meth:`refusal`). It installs nothing itself.
    """

    kind: ClassVar[str]
    # Written in the lowest format that holds the kind: format 2 has no ``kind`` field (SGM's).
    format_version: ClassVar[int] = KIND_FORMAT_VERSION
    # Capabilities callers ask for instead of testing a class: per-neuron experts (select,
    # re-selection, expert counts).
    has_experts: ClassVar[bool] = False
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
        version = self.format_version
        if version < KIND_FORMAT_VERSION:
            manifest.pop("kind", None)
        else:
            manifest["kind"] = self.kind
        manifest.update(format_version=version, digest=self.digest(),
                        tensors_sha256=hashlib.sha256(blob).hexdigest(), tensors_bytes=len(blob))
        manifest["content_digest"] = content_digest(manifest)
        _write_file(directory / TENSORS, blob)
        _write_file(directory / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())

    @classmethod
    def load(cls, path: str | Path) -> Glasses:
        """Read and verify glasses of any kind: any damaged, truncated or edited file is a
        :class:`GlassesError` naming it (format 1 glasses, which carry no content digest, load with
        a warning). ``Glasses.load`` is :func:`load_glasses`; a kind's class refuses glasses of
        another kind, except ``SafetyGlasses.load``, which loads any kind (deprecated for other
        kinds than SGM: use :func:`load_glasses`)."""
        path = Path(path)
        tensors_path = path / TENSORS
        if path.is_dir() and not tensors_path.exists():
            raise FileNotFoundError(f"{path} is not a glasses directory ({tensors_path} is missing; needs {MANIFEST} "
                                    f"and {TENSORS}); build glasses with `lmms-sgm profile`")
        manifest = read_manifest(path)
        kind_cls = kind_class(manifest.get("kind", SGM_KIND))
        if cls is not Glasses and not issubclass(kind_cls, cls):
            if cls.kind != SGM_KIND:
                raise GlassesError(f"{path / MANIFEST}: these are {kind_cls.kind} glasses, not {cls.kind}; load them "
                                   "with lmms_sgm.load_glasses")
            warnings.warn(f"SafetyGlasses.load of {kind_cls.kind} glasses is deprecated: use lmms_sgm.load_glasses, "
                          "which loads every kind", DeprecationWarning, stacklevel=2)
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

    # What each variant of the kind (its ``label``: "SGM", "gated SGM") can be worn in, and why
    # not in the other modes (lmms_sgm.interventions.wearing.MODES): the one declaration that
    # wear()'s refusal and the docs' mode table (wear.mode_table) read.
    VARIANTS: ClassVar[dict[str, dict]] = {}

    @property
    def label(self) -> str:
        """The variant these glasses are (a key of VARIANTS), named in messages."""
        return next(iter(self.VARIANTS))

    @property
    def modes(self) -> tuple[str, ...]:
        return tuple(self.VARIANTS[self.label]["modes"])

    def refusal(self, mode: str) -> str:
        """Why these glasses cannot be worn in ``mode`` (one of the modes they do not declare)."""
        return self.VARIANTS[self.label].get("refusals", {}).get(
            mode, f"{self.label} glasses declare the modes {', '.join(self.modes)} only")

    def edits(self, strength: float, *, device=None, dtype=None):
        """What wearing the glasses at ``strength`` does, as data: an
        :class:`lmms_sgm.interventions.edits.Edits`, its tensors on ``device`` (the model's; a
        remote model's are sent from the CPU) and, where the kind computes in the model's dtype,
        in ``dtype``."""
        raise NotImplementedError

    def describe(self) -> str:
        """A few words naming the glasses in a report row (diagnose)."""
        return f"{self.label}, digest {self.digest()[:12]}"

    def apply(self, model, strength: float = 1.0, mode: str = "hooks", *, processor=None, remote=None):
        """Wear the glasses (:func:`lmms_sgm.interventions.wearing.wear`): a handle (also a context
        manager) with ``.remove()``."""
        from lmms_sgm.interventions.wearing import wear

        return wear(model, self, mode, strength, processor=processor, remote=remote)

    def identity(self) -> dict:
        """What the glasses do, in a few JSON fields (the lmms-eval wrapper records it in results)."""
        raise NotImplementedError

    def summary(self) -> str:
        raise NotImplementedError


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
    required = kind_class(manifest.get("kind", SGM_KIND)).required_fields
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
        shown = some_names(others)
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


def load_glasses(path: str | Path) -> Glasses:
    """Read and verify the glasses at ``path``, whatever their kind (the manifest's ``kind``,
    dispatched through the kind registry)."""
    return Glasses.load(path)
