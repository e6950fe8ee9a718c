"""Secrets never reach a file, a log line or a message: one function removes them from anything.

A secret is any value this process was handed to authenticate with: the variables named like keys
or tokens in the environment (``OPENAI_API_KEY``, ``NDIF_API_KEY``, ``HF_TOKEN``, ...), and the
values a component registered with :func:`register_secret` (a key read from a config file, say).
Servers may echo a request, Authorization header included, in a normal reply, so whatever is
stored from a reply (judge caches, rescored samples, error details) goes through :func:`redact`.
"""
from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable

REDACTED = "[redacted]"
# Environment variables whose values are credentials (matched on the name, case-insensitively).
_SECRET_NAME = re.compile(r"(API_?KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.IGNORECASE)
# Shorter values are too likely to occur in ordinary text ("1", "yes") to be replaced safely.
MIN_SECRET_CHARS = 6

_registered: set[str] = set()
_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Treat ``value`` as a secret from now on (ignored when empty or shorter than MIN_SECRET_CHARS)."""
    if value and len(value) >= MIN_SECRET_CHARS:
        with _lock:
            _registered.add(value)


def known_secrets(extra: Iterable[str | None] = ()) -> list[str]:
    """The secrets to remove, longest first (so a key containing another is replaced whole)."""
    found = {v for name, v in os.environ.items() if _SECRET_NAME.search(name) and v}
    with _lock:
        found |= _registered
    found |= {v for v in extra if v}
    return sorted((v for v in found if len(v) >= MIN_SECRET_CHARS), key=lambda v: (-len(v), v))


def redact(obj, extra: Iterable[str | None] = ()):
    """``obj`` with every known secret replaced by ``[redacted]``, in strings at any depth.

    Strings, bytes, and the contents of dicts (keys too), lists and tuples are rewritten; other
    values are returned as they are. ``extra`` adds secrets for this call only.
    """
    secrets = known_secrets(extra)
    if not secrets:
        return obj
    return _walk(obj, secrets)


def _walk(obj, secrets: list[str]):
    if isinstance(obj, str):
        for s in secrets:
            if s in obj:
                obj = obj.replace(s, REDACTED)
        return obj
    if isinstance(obj, bytes):
        for s in secrets:
            b = s.encode()
            if b in obj:
                obj = obj.replace(b, REDACTED.encode())
        return obj
    if isinstance(obj, dict):
        return {_walk(k, secrets): _walk(v, secrets) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_walk(v, secrets) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_walk(v, secrets) for v in obj)
    return obj
