"""Outputs written whole or not at all.

Every command that writes a directory (glasses, ``tiny``, ``self-label``, ``quickstart``,
``train-demo``) writes it into a hidden sibling first and renames it into place at the end, so a
failure or Ctrl-C leaves the previous contents (or nothing) and no temporary files. What may be
replaced is the caller's decision (``check``), and so is what of the replaced directory is removed
(``discard``): nothing the user did not write is ever deleted.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path


@contextlib.contextmanager
def staged_directory(path: str | Path, *, check: Callable[[], None], discard: Callable[[Path], None]):
    """Yield an empty sibling directory to write into; on success it replaces ``path``.

    ``check()`` raises when ``path`` may not be written; it runs on entry (before any long work)
    and again at the swap. ``discard(old)`` removes a replaced directory (moved aside first). Any
    exception, KeyboardInterrupt included, removes the temporary directory and the parents this
    created, and leaves ``path`` as it was. An existing directory is exchanged in one rename where
    the system allows it, so an interruption at any point leaves the old or the new contents.
    """
    check()
    real = real_path(path)
    created = _make_parents(real.parent)
    tmp = _new_sibling(real, "tmp")
    try:
        yield tmp
        with interrupts_deferred():
            check()  # the target may have changed during the work
            _swap_in(tmp, real, discard)
    except BaseException:
        with interrupts_deferred():
            shutil.rmtree(tmp, ignore_errors=True)
            for d in created:  # deepest first; stop at one that is no longer empty
                try:
                    d.rmdir()
                except OSError:
                    break
        raise


def real_path(path: str | Path) -> Path:
    """``path`` made absolute (``.`` and ``g/`` have no usable name and parent) with a symlink at
    its end resolved, so that the rename replaces the directory it names."""
    path = Path(os.path.abspath(path))
    return path.resolve() if path.is_symlink() else path


def _make_parents(parent: Path) -> list[Path]:
    missing = []
    p = parent
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    parent.mkdir(parents=True, exist_ok=True)
    return missing


def _new_sibling(path: Path, kind: str) -> Path:
    """A new hidden directory beside ``path`` (same file system, so renames are atomic), umask applied."""
    while True:
        candidate = path.parent / f".{path.name}.{kind}-{secrets.token_hex(4)}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue


def _swap_in(tmp: Path, path: Path, discard: Callable[[Path], None]) -> None:
    """Put ``tmp`` at ``path``: a rename, or an exchange with what is there, which ``discard`` then removes."""
    if not path.exists() or not any(path.iterdir()):
        os.replace(tmp, path)  # rename(2) replaces an empty directory
        return
    if _exchange(tmp, path):
        discard(tmp)
        return
    old = path.parent / f".{path.name}.old-{secrets.token_hex(4)}"
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    discard(old)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def interrupts_deferred():
    """Hold Ctrl-C (SIGINT) until the block is done, so a swap or a clean-up is never cut in half."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(signal.SIGINT, None)
            elif previous == signal.SIG_DFL:
                raise KeyboardInterrupt


MARKER = ".lmms_sgm_output"


def command_output(path: str | Path, command: str):
    """A staged directory for a command's output that a later run of the same command may replace.

    ``path`` must be new, empty, or an earlier output of ``command`` (it carries a marker file
    naming the command); anything else is refused, so a mistyped ``--out`` never deletes a user's
    folder. Used by ``quickstart`` and ``train-demo``, whose outputs are rebuilt whole.
    """
    path = Path(path)

    def check() -> None:
        real = real_path(path)
        if not real.exists():
            return
        if not real.is_dir():
            raise FileExistsError(f"{path} is a file; give a directory for the {command} output")
        if any(real.iterdir()) and _marker(real) != command:
            raise FileExistsError(f"{path} exists, is not empty and is not an earlier `lmms-sgm {command}` output; "
                                  "give a new directory (nothing was deleted)")

    @contextlib.contextmanager
    def staged():
        with staged_directory(path, check=check, discard=lambda old: shutil.rmtree(old)) as tmp:
            yield tmp
            (tmp / MARKER).write_text(command + "\n")

    return staged()


def _marker(directory: Path) -> str | None:
    try:
        return (directory / MARKER).read_text().strip()
    except OSError:
        return None


def new_output(path: str | Path):
    """A staged directory for an output that must be new (or an empty folder): written whole or not at all."""
    path = Path(path)

    def check() -> None:
        real = real_path(path)
        if real.exists() and (not real.is_dir() or any(real.iterdir())):
            what = "is not empty" if real.is_dir() else "is a file"
            raise FileExistsError(f"{path} exists and {what}; give a new directory")

    def discard(old: Path) -> None:  # only an empty directory is ever replaced
        old.rmdir()

    return staged_directory(path, check=check, discard=discard)
