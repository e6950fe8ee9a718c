"""Reading the user's text files (JSON, JSONL, CSV/TSV) with errors that say where.

Every reader of user data goes through here, so that a file which is not UTF-8, not valid JSON or
CSV, or not a regular file at all (a directory, a FIFO, ``/dev/zero``) is one ``ValueError``
naming the file, and the line where there is one: the CLI prints it as one line with exit 2.
JSONL is read line by line from bytes, so a huge file is streamed and a bad byte names its line.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from _csv import _QuotingType  # typeshed's csv.QUOTE_* literals (stubs only)


class TextFileError(ValueError):
    """A user file that cannot be read as the text it should be; the message names it (and the line)."""


@contextlib.contextmanager
def raising(error: type[ValueError]):
    """Inside the block, a :class:`TextFileError` becomes ``error`` (same message): a module's
    callers catch its own error class (``DataError``, ``DatasetError``, ``JudgeError``)."""
    try:
        yield
    except TextFileError as e:
        raise error(str(e)) from None


def kind(path: str | Path) -> str | None:
    """What ``path`` is when it is not a regular file ("a directory", "a FIFO", ...), else None.
    Missing paths raise FileNotFoundError (with the path), as ``open`` would."""
    mode = os.stat(path).st_mode
    if stat.S_ISREG(mode):
        return None
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def require_regular(path: str | Path, what: str = "file") -> Path:
    """``path``, refused unless it is a regular file (reading a FIFO or ``/dev/zero`` would hang)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(2, f"{what} not found", str(path))
    found = kind(path)
    if found is not None:
        raise TextFileError(f"{path} is {found}, not a regular file: give the {what}")
    return path


def not_utf8(path, line: int, error: UnicodeDecodeError) -> str:
    """The message for a line that is not UTF-8 (also used by ``dataset check`` to list it)."""
    bad = error.object[error.start:error.start + 1]
    return f"{path}:{line}: not UTF-8 text (byte 0x{bad.hex()} at column {error.start + 1}); save the file as UTF-8"


def _decode(raw: bytes, path, first_line: int = 1) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw.count(b"\n", 0, e.start)
        start = raw.rfind(b"\n", 0, e.start) + 1
        e2 = UnicodeDecodeError("utf-8", raw[start:], e.start - start, e.end - start, e.reason)
        raise TextFileError(not_utf8(path, line, e2)) from None


def read_text(path: str | Path, what: str = "file") -> str:
    """The whole file as UTF-8 text (a leading byte-order mark dropped)."""
    path = require_regular(path, what)
    text = _decode(path.read_bytes(), path)
    return text[1:] if text.startswith("\ufeff") else text


def read_json(path: str | Path, what: str = "JSON file"):
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TextFileError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None


def lines(path: str | Path, what: str = "file") -> Iterator[tuple[int, str | UnicodeDecodeError]]:
    """``(line number, text)`` per line, streamed; a line that is not UTF-8 comes as its
    ``UnicodeDecodeError`` in place of its text (offsets within the line), for callers that list
    problems (``dataset check``, with :func:`not_utf8`)."""
    path = require_regular(path, what)
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, e


def parse_json_line(path, n: int, line: str, *, objects: bool = True):
    """One JSONL line's value; ``objects``: it must be a JSON object (a record)."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise TextFileError(f"{path}:{n}: not valid JSON ({e.msg}, column {e.colno})") from None
    if objects and not isinstance(value, dict):
        raise TextFileError(f"{path}:{n}: expected a JSON object (a record), got {type(value).__name__}")
    return value


def jsonl(path: str | Path, what: str = "JSONL file", *, objects: bool = True) -> Iterator[tuple[int, object]]:
    """``(line number, value)`` for each non-blank line of a JSONL file, streamed."""
    for n, line in lines(path, what):
        if isinstance(line, UnicodeDecodeError):
            raise TextFileError(not_utf8(path, n, line)) from None
        if line.strip():
            yield n, parse_json_line(path, n, line, objects=objects)


def read_jsonl(path: str | Path, what: str = "JSONL file", *, objects: bool = True) -> list:
    return [value for _, value in jsonl(path, what, objects=objects)]


def csv_rows(path: str | Path, what: str = "CSV file", *, delimiter: str = ",",
             quoting: _QuotingType = csv.QUOTE_MINIMAL) -> Iterator[tuple[int, dict]]:
    """``(line number, row)`` per row under the header; a row with more fields than the header,
    or a CSV syntax error, names its line."""
    text = read_text(path, what)
    # MMBench's base64 images exceed the csv module's default 128 KiB field limit (a global).
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    try:
        for row in reader:
            if None in row:
                header = len(reader.fieldnames or ())  # read with the first row
                raise TextFileError(f"{path}:{reader.line_num}: {header + len(row[None])} fields, "
                                    f"the header has {header}")
            yield reader.line_num, row
    except csv.Error as e:
        raise TextFileError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
