"""Labelled image-text pairs: the schema, loaders, and chat formatting (method.md section 1).

Schema, one record per pair:

=========  ========  ===========================================================
field      required  meaning
=========  ========  ===========================================================
image      yes       path relative to the data file (or absolute), image bytes,
                     a ``{"bytes": ..., "path": ...}`` dict, or a PIL image
text       yes       the text paired with the image (usually a model response)
label      yes       1 toxic, 0 non-toxic
question   no        the prompt the text answers (needed by text_field=question*)
category   no        a safety category, kept for per-category reports
=========  ========  ===========================================================

Files: JSONL, CSV or Parquet; a directory holding exactly one such file; or a ``datasets``
Dataset. Every record is checked before any model work starts, so a bad record fails fast and
nothing partial is written.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from lmms_sgm import prompting

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class DataError(ValueError):
    """A profiling dataset that cannot be used; the message says which record and why."""


@dataclass(frozen=True)
class Pair:
    image: Any  # Path | bytes | PIL.Image.Image
    text: str
    label: int
    question: str | None = None
    category: str | None = None

    def load_image(self) -> Image.Image:
        img = self.image
        if isinstance(img, Image.Image):
            return img.convert("RGB")
        try:
            if isinstance(img, (bytes, bytearray)):
                return Image.open(io.BytesIO(img)).convert("RGB")
            with Image.open(img) as f:
                return f.convert("RGB")
        except Exception as e:  # noqa: BLE001 -- the file changed after validation
            raise DataError(f"{_image_name(img)} is not a readable image ({e})") from None

    def image_digest(self) -> bytes:
        img = self.image
        if isinstance(img, Image.Image):
            return hashlib.sha256(img.tobytes()).digest()
        if isinstance(img, (bytes, bytearray)):
            return hashlib.sha256(img).digest()
        return hashlib.sha256(Path(img).read_bytes()).digest()


class PairDataset(Sequence[Pair]):
    """A validated, immutable list of :class:`Pair` with its provenance and digest."""

    def __init__(self, pairs: Iterable[Pair], source: str = "<memory>"):
        self.pairs = list(pairs)
        self.source = source
        self._digest: str | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i):
        return self.pairs[i]

    @property
    def labels(self) -> list[int]:
        return [p.label for p in self.pairs]

    def counts(self) -> dict:
        n_toxic = sum(self.labels)
        return {"examples": len(self), "toxic": n_toxic, "non_toxic": len(self) - n_toxic}

    def digest(self) -> str:
        """sha256 over every record's fields and image bytes: identifies the profiling data."""
        if self._digest is None:
            self._digest = digest_pairs(self.pairs)
        return self._digest

    def require_text_field(self, text_field: str) -> None:
        """Every record can be formatted for ``text_field`` (checked before any model work)."""
        for i, p in enumerate(self.pairs):
            if text_field != "response" and not p.question:
                raise DataError(f"{self.source}: record {i}: text_field={text_field!r} needs a 'question' in every record")

    def require_both_classes(self) -> None:
        c = self.counts()
        if c["examples"] == 0:
            raise DataError(f"{self.source}: the dataset is empty")
        if c["toxic"] == 0 or c["non_toxic"] == 0:
            raise DataError(
                f"{self.source}: AUROC needs both classes, got {c['toxic']} toxic and "
                f"{c['non_toxic']} non-toxic examples"
            )


def digest_pairs(pairs: Iterable[Pair]) -> str:
    """:meth:`PairDataset.digest` of ``pairs``, which may be a generator (one pair in memory)."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p.text, p.label, p.question, p.category]).encode())
        h.update(p.image_digest())
    return h.hexdigest()


def load_pairs(source, *, split: str | None = None) -> PairDataset:
    """Load and validate pairs from a file, a directory, a list of dicts or a ``datasets`` object."""
    if isinstance(source, PairDataset):
        return source
    if isinstance(source, (str, Path)):
        path = _data_file(Path(source))
        return _from_rows(_read_rows(path), base=path.parent, source=str(path))
    if hasattr(source, "keys") and split is not None:  # DatasetDict
        source = source[split]
    if hasattr(source, "column_names") or isinstance(source, list):
        return _from_rows(list(source), base=Path.cwd(), source=f"<{type(source).__name__}>")
    raise DataError(f"cannot read pairs from {type(source).__name__}; give a path, a list of dicts or a datasets.Dataset")


def _data_file(path: Path) -> Path:
    if not path.exists():
        raise DataError(f"profiling data {path} does not exist")
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix in DATA_SUFFIXES)
        if len(found) != 1:
            raise DataError(
                f"{path} is a directory: expected exactly one data file ({', '.join(DATA_SUFFIXES)}), "
                f"found {[p.name for p in found]}"
            )
        return found[0]
    if path.suffix not in DATA_SUFFIXES:
        raise DataError(f"{path}: unsupported data file type; use one of {', '.join(DATA_SUFFIXES)}")
    return path


def _read_rows(path: Path) -> list[dict]:
    if path.suffix in (".jsonl", ".json"):
        text = path.read_text()
        if path.suffix == ".json":
            rows = json.loads(text)
            return rows["data"] if isinstance(rows, dict) else rows
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        return rows
    import pandas as pd

    frame = pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
    frame = frame.astype(object).where(frame.notna(), None)
    return frame.to_dict(orient="records")


def _from_rows(rows: list[dict], *, base: Path, source: str) -> PairDataset:
    pairs = _parse_rows(rows, base=base, source=source)
    _check_images(pairs, source)
    return PairDataset(pairs, source=source)


def _parse_rows(rows: list[dict], *, base: Path, source: str) -> list[Pair]:
    pairs = []
    for i, row in enumerate(rows):
        where = f"{source}: record {i}"
        missing = [k for k in ("image", "text", "label") if row.get(k) is None]
        if missing:
            raise DataError(f"{where} lacks required field(s) {missing}")
        try:
            label = int(row["label"])
        except (TypeError, ValueError):
            label = -1
        if label not in (0, 1) or str(row["label"]).strip() not in ("0", "1", "0.0", "1.0", "True", "False"):
            raise DataError(f"{where}: label must be 1 (toxic) or 0 (non-toxic), got {row['label']!r}")
        pairs.append(
            Pair(
                image=_resolve_image(row["image"], base, where),
                text=str(row["text"]),
                label=label,
                question=None if row.get("question") is None else str(row["question"]),
                category=None if row.get("category") is None else str(row["category"]),
            )
        )
    return pairs


def _resolve_image(value, base: Path, where: str):
    if isinstance(value, dict):  # datasets' Image feature, undecoded
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, (bytes, bytearray, Image.Image)):
        return value
    path = Path(str(value))
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise DataError(f"{where}: image {path} not found")
    return path


def _image_name(image) -> str:
    return f"image {image}" if isinstance(image, (str, Path)) else f"the {type(image).__name__} image"


def image_problem(image) -> str | None:
    """Why ``image`` (a path or bytes) cannot be used, or None: opened, ``verify()``-ed (checksums
    where the format has them) and fully decoded, as profiling will decode it."""
    if isinstance(image, Image.Image):
        return None
    try:
        raw = bytes(image) if isinstance(image, (bytes, bytearray)) else Path(image).read_bytes()
        with Image.open(io.BytesIO(raw)) as im:
            im.verify()
        with Image.open(io.BytesIO(raw)) as im:  # verify() leaves the image unusable: open it again
            im.load()
    except Image.UnidentifiedImageError:
        return "not an image format PIL can read"
    except Exception as e:  # noqa: BLE001 -- PIL raises OSError, SyntaxError, EOFError, struct.error...
        return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return None


def _check_images(pairs: list[Pair], source: str) -> None:
    """Every image opens and decodes, checked before any model loads: ~0.1 ms per 32 px PNG and
    ~1.2 ms per 336 px JPEG on an idle core (docs/data.md). Threads, one per core up to 8: PIL
    decodes without holding the GIL."""
    from concurrent.futures import ThreadPoolExecutor


    if not pairs:
        return
    pool = ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)))
    try:
        with strict_decoding():
            problems = pool.map(image_problem, [p.image for p in pairs])
            for i, (pair, problem) in enumerate(zip(pairs, problems)):
                if problem is not None:
                    raise DataError(f"{source}: record {i}: {_image_name(pair.image)} is not a readable image ({problem})")
    finally:
        pool.shutdown(cancel_futures=True)  # the first bad record (or Ctrl-C) stops the rest


@contextlib.contextmanager
def strict_decoding():
    """Truncated image files are refused inside the block. lmms-eval sets PIL's
    ``LOAD_TRUNCATED_IMAGES`` for the whole process on import (lmms_eval/api/task.py): such files
    would then decode silently, padded with grey."""
    from PIL import ImageFile

    lenient, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient


# ---------------------------------------------------------------- chat formatting

def messages_for(pair: Pair, text_field: str) -> list[dict]:
    """One user turn (image + text); with question+response the response is the assistant turn."""
    if text_field != "response" and not pair.question:
        raise DataError(f"text_field={text_field!r} needs a 'question' in every record")
    user_text = pair.text if text_field == "response" else pair.question
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user_text}]}]
    if text_field == "question+response":
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": pair.text}]})
    return msgs


def format_prompt(processor, pair: Pair, text_field: str) -> str:
    return prompting.render(processor, messages_for(pair, text_field), add_generation_prompt=False)


def prompt_prefix(processor, pair: Pair) -> str:
    """The question+response prompt up to where the response starts (the generation prompt)."""
    return prompting.render(processor, messages_for(pair, "question+response")[:1], add_generation_prompt=True)


def encode_batch(processor, pairs: Sequence[Pair], text_field: str, *, padding_side: str = "right"):
    """Processor-encode a padded batch (one image per pair), for any family
    (:func:`lmms_sgm.prompting.encode`: right padding by default, no second BOS)."""
    texts = [format_prompt(processor, p, text_field) for p in pairs]
    return prompting.encode(processor, texts, [[p.load_image()] for p in pairs], padding_side=padding_side)
