"""Resumable profiling: every batch's pooled responses on disk as they arrive.

A checkpoint is a directory (by default ``.NAME.ckpt`` beside the output ``NAME``) holding

* ``checkpoint.json``: what the responses belong to (the *key*): everything that changes the
  numbers, i.e. the model fingerprint (config), a digest of its weights (or, for a remote model,
  its Hub id) and their dtype, the attention implementation profiled with, a digest of the
  processor (tokenizer, chat template, image processor), the data digest and size, every
  profiling option, the sites, a digest of the batch plan and the versions of the code that
  computes them; a run that resumes must have the same key, field for field, or it is refused;
* ``batch-NNNNNN.safetensors``, one per finished batch: ``rows`` (int64, the examples' indices)
  and one float32 ``[rows, width]`` tensor per site. Each is written under a temporary name and
  renamed, so a file is whole or absent whatever kills the process (a file damaged otherwise, by
  a power loss, is found on resume and its batch done again).

A resumed run reads the finished batches back into the response store and traces only the
others: no example is lost or counted twice, and since a batch's responses do not depend on
when or where it ran, the glasses equal an uninterrupted run's. The checkpoint is deleted once
the glasses are written. Only process 0 of a distributed run reads and writes it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmms_sgm.version import __version__

KEY_FILE = "checkpoint.json"
FORMAT = 1
_BATCH = re.compile(r"^batch-(\d{6})\.safetensors$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (another run's, or an existing one without ``resume``)."""


def default_dir(out: str | Path) -> Path:
    """``.NAME.ckpt`` beside the output directory ``NAME`` (hidden, same file system)."""
    out = Path(os.path.abspath(out))
    return out.parent / f".{out.name}.ckpt"


def make_key(*, fingerprint: dict, weights: str, dtype: str, attention: dict, processor: str, data_digest: str,
             examples: int, profile_options: dict, sites: list, batches: list[list[int]]) -> dict:
    """The key of a run: ``weights`` is :func:`lmms_sgm.models.weights_digest` (or ``hub:ID`` for a
    remote model), ``attention`` the implementation(s) the forward runs with, ``processor``
    :func:`processor_digest`. Padding side is not in it: no batch is padded (profiling.length_batches)."""
    plan = hashlib.sha256(json.dumps(batches, separators=(",", ":")).encode()).hexdigest()
    return {
        "format": FORMAT,
        "lmms_sgm_version": __version__,
        "software": _software(),
        "fingerprint": fingerprint,
        "weights": weights,
        "dtype": dtype,
        "attention": attention,
        "processor": processor,
        "data": {"digest": data_digest, "examples": examples},
        "profile_options": profile_options,
        "sites": [[s.name, s.width] for s in sites],
        "batches": {"count": len(batches), "digest": plan},
    }


def _software() -> dict:
    """The versions of what computes the responses (a model's forward may change between releases)."""
    import nnsight
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "nnsight": nnsight.__version__}


def processor_digest(processor) -> str:
    """sha256 of what the processor turns a pair into tokens and pixels with: its tokenizer (the
    whole fast-tokenizer JSON: vocabulary, normalisation, added and special tokens), the chat
    templates, and the processor's own settings (image processor, image token counts)."""
    tok = getattr(processor, "tokenizer", processor)
    backend = getattr(tok, "backend_tokenizer", None)
    parts = {
        "tokenizer": backend.to_str() if backend is not None else sorted(tok.get_vocab().items()),
        "special": {k: str(getattr(tok, k, None)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")},
        "chat_template": [getattr(processor, "chat_template", None), getattr(tok, "chat_template", None)],
        "processor": processor.to_dict() if processor is not tok and hasattr(processor, "to_dict") else None,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


_WHAT = {"fingerprint": "model config", "weights": "model weights", "dtype": "model dtype",
         "attention": "attention implementation", "processor": "processor (tokenizer, chat template or image "
         "processor)", "data": "data", "profile_options": "profiling options", "sites": "sites (layers / modules)",
         "batches": "batches (batch size or remote_max_mb)", "software": "software versions",
         "lmms_sgm_version": "lmms_sgm version", "format": "checkpoint format"}


class Checkpoint:
    """The checkpoint of one profiling run; see the module docstring for the format."""

    def __init__(self, directory: str | Path, *, resume: bool = False):
        self.directory = Path(directory)
        self.resume = resume
        self.key: dict | None = None

    def open(self, key: dict) -> None:
        """Start a checkpoint for ``key``, or (``resume``) check that the one there is for ``key``.

        Refused: an existing checkpoint without ``resume`` (it would be lost), one with another
        key (its responses belong to another run), a directory that holds anything else.
        """
        self.key = key
        d = self.directory
        if d.exists() and not d.is_dir():
            raise CheckpointError(f"checkpoint {d} is a file; remove it or give another checkpoint directory")
        entries = sorted(os.listdir(d)) if d.is_dir() else []
        if entries:
            if KEY_FILE not in entries:
                raise CheckpointError(f"{d} is not empty and holds no {KEY_FILE}: not a profiling checkpoint; give "
                                      "another checkpoint directory")
            others = [e for e in entries if e != KEY_FILE and not _BATCH.match(e) and not e.endswith(".tmp")]
            if others:
                raise CheckpointError(f"checkpoint {d} holds other files ({', '.join(others[:3])}); refusing to use it")
            done = sum(1 for e in entries if _BATCH.match(e))
            try:
                theirs = json.loads((d / KEY_FILE).read_text())
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{d / KEY_FILE}: unreadable ({e}); delete {d} to start over") from None
            if not self.resume:
                raise CheckpointError(
                    f"{d} holds the checkpoint of an interrupted run ({done} of {theirs.get('batches', {}).get('count', '?')} "
                    "batches done): pass --resume (resume=True) to continue it, or delete it to start over")
            differ = [k for k in sorted(set(key) | set(theirs)) if key.get(k) != theirs.get(k)]
            if differ:
                details = "; ".join(_difference(k, theirs.get(k), key.get(k)) for k in differ)
                raise CheckpointError(
                    f"cannot resume from {d}: it belongs to another run ({details}); resume with the same data, model and "
                    f"profiling options, or delete {d} to start over")
            return
        if self.resume:
            warnings.warn(f"nothing to resume in {d}: starting from the first batch", stacklevel=1)
        d.mkdir(parents=True, exist_ok=True)
        _write_atomic(d / KEY_FILE, (json.dumps(key, indent=1, sort_keys=True) + "\n").encode())

    def restore(self, store, batches: list[list[int]], sites) -> set[int]:
        """Read the finished batches into ``store``; their indices. A file that cannot be read, or
        whose rows or shapes are not its batch's, is deleted (with a warning) and done again."""
        done = set()
        for entry in sorted(os.listdir(self.directory)):
            path = self.directory / entry
            if entry.endswith(".tmp"):  # cut short while being written
                path.unlink(missing_ok=True)
                continue
            match = _BATCH.match(entry)
            if not match:
                continue
            index = int(match.group(1))
            try:
                tensors = load_file(path)
                rows = tensors["rows"].tolist()
                if index >= len(batches) or rows != batches[index]:
                    raise ValueError(f"rows {rows[:4]}... are not those of batch {index}")
                pooled = {s.name: tensors[s.name] for s in sites}
                for s in sites:
                    if tuple(pooled[s.name].shape) != (len(rows), s.width) or pooled[s.name].dtype != torch.float32:
                        raise ValueError(f"{s.name} is {pooled[s.name].dtype} {tuple(pooled[s.name].shape)}")
            except (SafetensorError, OSError, KeyError, ValueError) as e:
                warnings.warn(f"checkpoint file {path} is damaged ({type(e).__name__}: {e}); its batch is done again",
                              stacklevel=1)
                path.unlink(missing_ok=True)
                continue
            store.write(rows, pooled)
            done.add(index)
        return done

    def save(self, index: int, rows: list[int], pooled: dict[str, torch.Tensor]) -> None:
        tensors = {"rows": torch.tensor(rows, dtype=torch.int64)}
        tensors.update({name: value.to(torch.float32).contiguous() for name, value in pooled.items()})
        path = self.directory / f"batch-{index:06d}.safetensors"
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, tmp, metadata={"format": "lmms_sgm.checkpoint"})
        os.replace(tmp, path)

    def remove(self) -> None:
        """Delete the checkpoint (its own files only, then the directory if that leaves it empty)."""
        d = self.directory
        if not d.is_dir():
            return
        for entry in os.listdir(d):
            if entry == KEY_FILE or _BATCH.match(entry) or entry.endswith(".tmp"):
                (d / entry).unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty: other files are the user's
            d.rmdir()

    def batches_done(self) -> int:
        return sum(1 for e in os.listdir(self.directory) if _BATCH.match(e)) if self.directory.is_dir() else 0


def _difference(field: str, theirs, ours) -> str:
    what = _WHAT.get(field, field)
    if isinstance(theirs, dict) and isinstance(ours, dict):
        keys = [k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
        parts = ", ".join(f"{k} {_short(theirs.get(k))} -> {_short(ours.get(k))}" for k in keys[:4])
        return f"{what} differ: {parts}"
    return f"{what} differ: {_short(theirs)} -> {_short(ours)}"


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 24 else text[:12] + "..."


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # the key is on disk before its name is
    os.replace(tmp, path)


def stored_bytes(sites, examples: int) -> int:
    """Disk a full checkpoint takes: every pooled response as float32."""
    return int(np.int64(examples) * sum(s.width for s in sites) * 4)

