"""A built dataset's file digests (``manifest.json``'s ``digests.files``): :mod:`~lmms_sgm.datasets.build`
writes them and :mod:`~lmms_sgm.datasets.check` compares them, so the one hash lives here, below both."""
from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB chunks (a file of any size in constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
