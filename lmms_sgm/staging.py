"""Outputs written whole or not at all, by one run at a time, and never at the cost of a user's file.

Every command that writes a directory (glasses, ``tune``, ``tiny``, ``self-label``, ``quickstart``,
``train-demo``, ``dataset build``) writes it into a hidden sibling first and renames it into place
at the end, so a failure or Ctrl-C leaves the previous contents (or nothing) and no temporary
files. What may be replaced is the caller's decision (``check``), and so is what of the replaced
directory is removed (``discard``): nothing the user did not write is ever deleted. A command's
output carries a marker listing the files it wrote (:func:`command_output`), and ``--overwrite``
removes those alone.

Single files (reports, ``text-pairs``, ``--json``) go through :func:`atomic_write`: a temporary
file beside the target, flushed to disk, renamed over it; a full disk leaves the old file or none.

A run holds a lock beside its output (:func:`output_lock`, ``.NAME.lock``, an ``flock`` naming its
pid and host), so a second run on the same output fails at once; a killed run's lock is free and
taken over. Staging siblings carry their owner's pid and host in their name, and the next run on
that output removes those whose owner is dead (:func:`remove_stale_siblings`).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
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
    tmp = None
    try:
        with output_lock(real):  # released before the parents this created are removed
            check()  # again, now that no other run can change it
            remove_stale_siblings(real)
            tmp = _new_sibling(real, "tmp")
            yield tmp
            with interrupts_deferred():
                check()  # the target may have changed during the work
                _swap_in(tmp, real, discard)
    except BaseException:
        with interrupts_deferred():
            if tmp is not None:
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


def _owner_tag() -> str:
    """``PID-HOST``: who made a staging sibling, so that a later run can tell a dead run's from a live one's."""
    return f"{os.getpid()}-{_host()}"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "localhost"


def _sibling_name(path: Path, kind: str) -> str:
    return f".{path.name}.{kind}-{secrets.token_hex(4)}-{_owner_tag()}"


def _new_sibling(path: Path, kind: str) -> Path:
    """A new hidden directory beside ``path`` (same file system, so renames are atomic), umask applied.
    Its name ends in its owner's pid and host (see :func:`remove_stale_siblings`)."""
    while True:
        candidate = path.parent / _sibling_name(path, kind)
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue


_STAGING_KINDS = ("tmp", "old")


def remove_stale_siblings(path: str | Path) -> list[Path]:
    """Remove the staging siblings of ``path`` (``.NAME.tmp-*``, ``.NAME.old-*``) left by a run that
    was killed: only those whose name records a pid that is dead on this host. A live run's, another
    host's, or one without an owner in its name is left alone. Returns what was removed."""
    path = real_path(path)
    removed: list[Path] = []
    try:
        entries = os.listdir(path.parent)
    except OSError:
        return removed
    for kind in _STAGING_KINDS:
        pattern = re.compile(re.escape(f".{path.name}.{kind}-") + r"[0-9a-f]{8}-(\d+)-(.+)$")
        for entry in entries:
            m = pattern.match(entry)
            if not m or m.group(2) != _host() or _alive(int(m.group(1))):
                continue
            stale = path.parent / entry
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    stale.unlink()
            removed.append(stale)
    return removed


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid < 2**31
    return True


def _swap_in(tmp: Path, path: Path, discard: Callable[[Path], None]) -> None:
    """Put ``tmp`` at ``path``: a rename, or an exchange with what is there, which ``discard`` then removes."""
    if not path.exists() or not any(path.iterdir()):
        os.replace(tmp, path)  # rename(2) replaces an empty directory
        return
    if _exchange(tmp, path):
        discard(tmp)
        return
    old = path.parent / _sibling_name(path, "old")
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


class OutputLocked(FileExistsError):
    """Another live run holds the lock on this output."""


_held: dict[Path, int] = {}  # lock files this process holds -> nesting depth
_held_guard = threading.Lock()


def lock_path(path: str | Path) -> Path:
    """``.NAME.lock`` beside the output ``NAME``: outside it, so that it survives the output's swap."""
    real = real_path(path)
    return real.parent / f".{real.name}.lock"


@contextlib.contextmanager
def output_lock(path: str | Path, *, lock_file: str | Path | None = None, what: str = "another run"):
    """Hold the lock on the output ``path`` for the block, or fail at once (:class:`OutputLocked`,
    one line naming the pid and host of the run that holds it).

    The lock file (``lock_file``, default :func:`lock_path`) is held with ``flock``, which the
    system releases when its process dies however it dies, so a killed run's lock is taken over;
    it names its holder (JSON: pid, host). A lock file naming a live pid of this host that is not
    held with ``flock`` (written by hand or by an older version) is respected too. Re-entrant within
    one process: a command may take the lock early (before loading a model) and the staged write
    below it takes it again. Missing parent folders are created, and removed on release if empty.
    """
    lock = Path(os.path.abspath(lock_file)) if lock_file is not None else lock_path(path)
    with _held_guard:
        if lock in _held:
            _held[lock] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield lock
        finally:
            with _held_guard:
                _held[lock] -= 1
        return
    created = _make_parents(lock.parent)
    fd = None
    try:
        fd = _acquire(lock, path, what)
        with _held_guard:
            _held[lock] = 1
        try:
            yield lock
        finally:
            with interrupts_deferred():
                with _held_guard:
                    _held.pop(lock, None)
                with contextlib.suppress(OSError):
                    lock.unlink()  # while still holding it: a run waiting on this file retries on the new one
                os.close(fd)
                fd = None
    finally:
        if fd is not None:
            os.close(fd)
        for d in created:
            try:
                d.rmdir()
            except OSError:
                break


def _acquire(lock: Path, path, what: str) -> int:
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            flocked = True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    flocked = False  # a file system without flock (ENOLCK): the pid in the file alone
                else:
                    raise OutputLocked(f"{what} ({_holder(_read_lock(lock))}) is writing {path}; wait for it to end or "
                                       f"stop it (lock {lock})") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder removed it as we opened it: take the new one
                os.close(fd)
                continue
            holder = _read_lock(lock)
            if holder and not holder.get("flock") and holder.get("host", _host()) == _host() \
                    and holder.get("pid") not in (None, os.getpid()) and _alive(holder["pid"]):
                raise OutputLocked(f"{what} ({_holder(holder)}) is writing {path}; wait for it to end or stop it "
                                   f"(lock {lock}; delete it if that process is not an lmms-sgm run)")
            try:
                os.ftruncate(fd, 0)
                os.write(fd, (json.dumps({"pid": os.getpid(), "host": _host(), "flock": flocked}) + "\n").encode())
            except OSError as e:  # a full disk: say which file
                raise OSError(e.errno, e.strerror or str(e), str(lock)) from None
            return fd
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise


def _read_lock(lock: Path) -> dict | None:
    """The holder a lock file names: our JSON, or a bare pid (``sweep.lock`` of earlier versions)."""
    try:
        text = lock.read_text().strip()
    except OSError:
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    if isinstance(doc, int):
        return {"pid": doc}
    return doc if isinstance(doc, dict) and isinstance(doc.get("pid"), int) else None


def _holder(holder: dict | None) -> str:
    if not holder:
        return "pid unknown"
    host = holder.get("host")
    return f"pid {holder['pid']}" + (f" on {host}" if host and host != _host() else "")


def atomic_write(path: str | Path, data: str | bytes, *, encoding: str = "utf-8", exclusive: bool = False) -> Path:
    """Write ``data`` to the file ``path`` whole or not at all.

    A temporary file beside ``path`` (same folder, so the rename is atomic; its name carries this
    process's pid, so a killed run's is removed by the next write) is written, flushed to disk and
    renamed over ``path``. Any failure (a full disk: ``ENOSPC``) removes it and leaves ``path`` as
    it was, and the error names ``path``. ``exclusive``: ``path`` must not exist (``FileExistsError``);
    checked at the rename itself, so two writers cannot both win.
    """
    path = Path(path)
    real = real_path(path)
    if isinstance(data, str):
        data = data.encode(encoding)
    remove_stale_siblings(real)
    if exclusive and os.path.lexists(real):
        raise FileExistsError(errno.EEXIST, "exists; give a new file or remove it", str(path))
    tmp = real.parent / _sibling_name(real, "tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            os.link(tmp, real)  # fails if ``path`` appeared meanwhile; nothing is replaced
            os.unlink(tmp)
        else:
            os.replace(tmp, real)
        _fsync_dir(real.parent)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename != str(path):
            if isinstance(e, FileExistsError):
                raise FileExistsError(errno.EEXIST, "exists; give a new file or remove it", str(path)) from None
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise
    return path


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort: not every system can open a folder)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


MARKER = ".lmms_sgm_output"


def command_output(path: str | Path, command: str, *, what: str | None = None):
    """A staged directory for a command's output that a later run of the same command may replace.

    ``path`` must be new, empty, or an earlier output of ``command`` holding nothing but what that
    run wrote: its marker (:data:`MARKER`) names the command and lists its files, and those alone
    are removed when it is replaced. A mistyped ``--out`` (a folder without the marker) and a
    folder where the user added a file are refused, naming what is there; nothing is deleted.
    Used by ``quickstart``, ``train-demo`` and ``dataset build``. ``what``: how errors name the
    output (default: the path).
    """
    path = Path(path)
    shown = what or str(path)

    def check() -> None:
        check_command_output(real_path(path), command, shown)

    @contextlib.contextmanager
    def staged():
        with staged_directory(path, check=check, discard=lambda old: discard_listed(old, command)) as tmp:
            yield tmp
            write_marker(tmp, command)

    return staged()


def check_command_output(real: Path, command: str, shown: str) -> None:
    """Raise ``FileExistsError`` unless ``real`` is absent, empty, or ``command``'s output and nothing else."""
    if not real.exists():
        return
    if not real.is_dir():
        raise FileExistsError(f"{shown} is a file; give a directory for the {command} output")
    if not any(real.iterdir()):
        return
    marker = read_marker(real)
    if marker is None or marker.get("command") != command:
        raise FileExistsError(f"{shown} exists, is not empty and is not an earlier `lmms-sgm {command}` output; "
                              "give a new directory (nothing was deleted)")
    if marker.get("files") is None:
        raise FileExistsError(f"{shown} is an earlier `lmms-sgm {command}` output whose marker lists no files (an older "
                              "version wrote it): delete it yourself or give a new directory (nothing was deleted)")
    others = unlisted_files(real, marker["files"])
    if others:
        listed = some_names(others)
        raise FileExistsError(f"{shown} holds files that `lmms-sgm {command}` did not write ({listed}); it only "
                              "replaces its own output: move them or give a new directory (nothing was deleted)")


def output_files(directory: Path) -> list[str]:
    """Every file under ``directory`` (relative, ``/``-separated, sorted), the marker excepted."""
    found = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        rel = Path(root).relative_to(directory)
        for name in files:
            p = (rel / name).as_posix()
            if p != MARKER:
                found.append(p)
    return sorted(found)


def unlisted_files(directory: Path, listed) -> list[str]:
    """What is in ``directory`` and not in ``listed`` (the marker aside): a user's files."""
    listed = set(listed)
    return [f for f in output_files(directory) if f not in listed]


def some_names(names: list[str], most: int = 5) -> str:
    """The first ``most`` names, then how many more: for a refusal that lists a user's files."""
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def write_marker(directory: Path, command: str, files: list[str] | None = None) -> None:
    """Mark ``directory`` as ``command``'s output, listing the files it holds (all of them by default)."""
    doc = {"command": command, "files": output_files(directory) if files is None else sorted(files)}
    atomic_write(directory / MARKER, json.dumps(doc, indent=1) + "\n")


def read_marker(directory: Path) -> dict | None:
    """``{"command", "files"}`` of an output's marker; ``files`` is None for an older marker (the command alone)."""
    try:
        text = (directory / MARKER).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return {"command": text, "files": None} if text and "\n" not in text else None
    if not isinstance(doc, dict) or not isinstance(doc.get("command"), str):
        return None
    files = doc.get("files")
    ok = isinstance(files, list) and all(isinstance(f, str) and f and not f.startswith("/") and ".." not in f.split("/")
                                         for f in files)
    return {"command": doc["command"], "files": files if ok else None}


def discard_listed(directory: Path, command: str) -> None:
    """Remove a replaced output: the files its marker lists, the marker, then the folders left empty.
    Anything else (a file that appeared after the check) is left there, with a warning."""
    marker = read_marker(directory) or {}
    for f in marker.get("files") or ():
        with contextlib.suppress(FileNotFoundError):
            (directory / f).unlink()
    with contextlib.suppress(FileNotFoundError):
        (directory / MARKER).unlink()
    for root, _dirs, _files in sorted(os.walk(directory, topdown=False), key=lambda t: -len(t[0])):
        with contextlib.suppress(OSError):
            os.rmdir(root)
    if directory.exists():
        import warnings

        warnings.warn(f"the replaced {command} output was moved to {directory} and holds files it did not write; "
                      "they were kept there", stacklevel=3)


def _marker(directory: Path) -> str | None:
    marker = read_marker(directory)
    return marker["command"] if marker else None


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
