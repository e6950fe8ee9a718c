"""Helpers shared by the judges that run a local model: argument parsing and checkpoint fingerprints.

Judge arguments arrive as strings (``LMMS_SGM_JUDGE_ARGS``, ``--judge-args``); these turn them
into checked values with errors that name the judge and the argument.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from lmms_sgm.judges import JudgeError

WHOLE_FILE_BYTES = 16 << 20  # files up to this size are hashed whole; larger ones by size, head and tail
EDGE_BYTES = 1 << 20


def number(judge: str, key: str, value, *, lo: float | None = None, hi: float | None = None, integer: bool = False):
    try:
        x = int(value) if integer else float(value)
    except (TypeError, ValueError):
        raise JudgeError(f"judge {judge!r}: {key}={value!r} is not {'an integer' if integer else 'a number'}") from None
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        raise JudgeError(f"judge {judge!r}: {key}={value!r} must be in [{lo}, {hi}]")
    return x


def flag(judge: str, key: str, value) -> bool | None:
    """``true/false/1/0/yes/no``, or ``auto`` -> None."""
    text = str(value).strip().lower()
    if text == "auto":
        return None
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise JudgeError(f"judge {judge!r}: {key}={value!r} must be true, false or auto")


def plus_list(value) -> list[str]:
    """``"a+b"`` -> ``["a", "b"]`` (``+`` separates items: ``,`` already separates the arguments)."""
    return [x.strip() for x in str(value).split("+") if x.strip()]


def checkpoint_dir(judge: str, path) -> Path:
    if path is None or not str(path).strip():
        raise JudgeError(f"judge {judge!r} needs path=DIR, a local checkpoint directory")
    p = Path(str(path)).expanduser()
    if not p.is_dir():
        raise JudgeError(f"judge {judge!r}: path={path} is not a directory (give a local checkpoint saved with save_pretrained)")
    return p.resolve()


def checkpoint_digest(path: Path) -> str:
    """A fingerprint of a checkpoint directory (every file's name and content; files over 16 MiB by
    size, first and last MiB, so a multi-GB checkpoint is fingerprinted in milliseconds): another
    checkpoint at the same path is another judge setting."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts):
        size = f.stat().st_size
        h.update(f"{f.relative_to(path).as_posix()}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= WHOLE_FILE_BYTES:
                h.update(fh.read())
            else:
                h.update(fh.read(EDGE_BYTES))
                fh.seek(size - EDGE_BYTES)
                h.update(fh.read(EDGE_BYTES))
    return h.hexdigest()[:16]


def batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]
