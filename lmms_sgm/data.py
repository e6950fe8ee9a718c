"""Labelled image-text pairs: the schema, loaders, and chat formatting (method.md section 1).

Schema, one record per pair:

=========  ========  ===========================================================
field      required  meaning
=========  ========  ===========================================================
image      yes [*]_  path relative to the data file (or absolute), image bytes,
                     a ``{"bytes": ..., "path": ...}`` dict, or a PIL image
text       yes       the text paired with the image (usually a model response)
label      yes       1 toxic, 0 non-toxic
question   no        the prompt the text answers (needed by text_field=question*)
category   no        a safety category, kept for per-category reports
=========  ========  ===========================================================

.. [*] Records without an image are text-only records: profiling takes them for a text-only
   model (a causal LM, AurA's setting), fed as plain text, and for an MLLM only when text-only
   profiling is asked for (``ProfileOptions.text_only``), fed through its chat template with no
   image. A dataset mixes neither kind (:meth:`PairDataset.require_images`).

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
    image: Any  # Path | bytes | PIL.Image.Image, or None for a text-only record
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
        if img is None:
            return b""  # text-only: the digest covers the other fields alone
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

    def require_images(self, needed: bool, why: str) -> None:
        """Every record has an image (``needed``) or none has; ``why`` says who asks, for the message.

        Profiling checks it before its first forward pass; a mixed dataset is refused when loaded.
        The two kinds are fed differently, and a silently dropped image would change what the
        glasses measure.
        """
        for i, p in enumerate(self.pairs):
            if needed and p.image is None:
                raise DataError(f"{self.source}: record {i} has no image, but {why}")
            if not needed and p.image is not None:
                raise DataError(f"{self.source}: record {i} has an image, but {why}")

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


def write_text_only(source, out: str | Path) -> Path:
    """The records of ``source`` without their images, as JSONL at ``out``: the data of the
    AurA-style baseline (the same pairs profiled on their text alone, ``text_only=true``).
    Written on purpose rather than dropped by profiling, which refuses images it would ignore."""
    pairs = load_pairs(source)
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; give a new file")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [{k: v for k, v in (("text", p.text), ("label", p.label), ("question", p.question), ("category", p.category))
             if v is not None} for p in pairs]
    from lmms_sgm.staging import atomic_write

    # Whole or not at all: a full disk leaves no (0-byte) file that a rerun would call existing.
    return atomic_write(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), exclusive=True)


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
    """The file's records; a file that is not UTF-8, not valid JSON/CSV or not a regular file is
    refused naming it (and the line: lmms_sgm/textfiles.py)."""
    from lmms_sgm import textfiles

    with textfiles.raising(DataError):
        return _read_file(path)


def _read_file(path: Path) -> list[dict]:
    from lmms_sgm import textfiles

    if path.suffix == ".json":
        rows = textfiles.read_json(path, "profiling data")
        rows = rows.get("data") if isinstance(rows, dict) else rows
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise DataError(f"{path}: expected a list of records (or {{\"data\": [...]}})")
        return rows
    if path.suffix == ".jsonl":
        return textfiles.read_jsonl(path, "profiling data")
    import pandas as pd

    textfiles.require_regular(path, "profiling data")
    try:
        if path.suffix == ".csv":  # decoded here, so that a bad byte names its line
            frame = pd.read_csv(io.StringIO(textfiles.read_text(path, "profiling data")))
        else:
            frame = pd.read_parquet(path)
    except textfiles.TextFileError:
        raise
    except Exception as e:  # noqa: BLE001 -- pandas / pyarrow raise many kinds; the file is what is wrong
        kind = "CSV" if path.suffix == ".csv" else "Parquet"
        raise DataError(f"{path}: not a readable {kind} file ({' '.join(str(e).split()) or type(e).__name__})") from None
    frame = frame.astype(object).where(frame.notna(), None)
    return frame.to_dict(orient="records")


def _from_rows(rows: list[dict], *, base: Path, source: str) -> PairDataset:
    pairs = _parse_rows(rows, base=base, source=source)
    _check_one_kind(pairs, source)
    _check_images(pairs, source)
    return PairDataset(pairs, source=source)


def _parse_rows(rows: list[dict], *, base: Path, source: str) -> list[Pair]:
    pairs = []
    for i, row in enumerate(rows):
        where = f"{source}: record {i}"
        missing = [k for k in ("text", "label") if row.get(k) is None]
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
                image=None if row.get("image") is None else _resolve_image(row["image"], base, where),
                text=str(row["text"]),
                label=label,
                question=None if row.get("question") is None else str(row["question"]),
                category=None if row.get("category") is None else str(row["category"]),
            )
        )
    return pairs


def _check_one_kind(pairs: list[Pair], source: str) -> None:
    """Image-text pairs or text-only records, not both: a missing image in an image dataset is a
    mistake to report, not a text-only record to profile differently."""
    for i, p in enumerate(pairs):
        if (p.image is None) != (pairs[0].image is None):
            has = ("has no image", "has one") if p.image is None else ("has an image", "has none")
            raise DataError(f"{source}: record {i} {has[0]} but record 0 {has[1]}: a dataset holds image-text "
                            "pairs or text-only records (no 'image' field), not both")


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


    with_image = [(i, p) for i, p in enumerate(pairs) if p.image is not None]  # text-only records have none
    if not with_image:
        return
    pool = ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)))
    try:
        with strict_decoding():
            problems = pool.map(image_problem, [p.image for _, p in with_image])
            for (i, pair), problem in zip(with_image, problems):
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
    """One user turn (image + text; text alone for a text-only record); with question+response
    the response is the assistant turn."""
    if text_field != "response" and not pair.question:
        raise DataError(f"text_field={text_field!r} needs a 'question' in every record")
    user_text = pair.text if text_field == "response" else pair.question
    image = [] if pair.image is None else [{"type": "image"}]
    msgs = [{"role": "user", "content": [*image, {"type": "text", "text": user_text}]}]
    if text_field == "question+response":
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": pair.text}]})
    return msgs


def plain_text(processor) -> bool:
    """Whether ``processor`` is a bare tokenizer, i.e. that of a text-only model: its records are
    fed as plain text, with no chat template, as AurA profiles a causal LM (and as lm-eval feeds
    text to it). A multimodal processor formats every record with the model's chat template."""
    from transformers import ProcessorMixin

    return not isinstance(processor, ProcessorMixin)


def _plain(pair: Pair, text_field: str) -> str:
    if text_field == "response":
        return pair.text
    if not pair.question:
        raise DataError(f"text_field={text_field!r} needs a 'question' in every record")
    return pair.question if text_field == "question" else f"{pair.question} {pair.text}"


def format_prompt(processor, pair: Pair, text_field: str) -> str:
    if plain_text(processor):
        return _plain(pair, text_field)
    return prompting.render(processor, messages_for(pair, text_field), add_generation_prompt=False)


def prompt_prefix(processor, pair: Pair) -> str:
    """The question+response prompt up to where the response starts (the generation prompt; for
    plain text, the question)."""
    if plain_text(processor):
        return _plain(pair, "question")
    return prompting.render(processor, messages_for(pair, "question+response")[:1], add_generation_prompt=True)


def encode_batch(processor, pairs: Sequence[Pair], text_field: str, *, padding_side: str = "right"):
    """Processor-encode a padded batch (one image per pair, none for text-only records), for any
    family (:func:`lmms_sgm.prompting.encode`: right padding by default, no second BOS)."""
    return encode_texts(processor, [format_prompt(processor, p, text_field) for p in pairs], pairs, padding_side=padding_side)


def encode_texts(processor, texts: Sequence[str], pairs: Sequence[Pair], *, padding_side: str = "right"):
    """Encode ``texts`` (one per pair) with the pairs' images, if they have any."""
    if plain_text(processor):
        return processor(list(texts), return_tensors="pt", padding=True, padding_side=padding_side)
    images = [[p.load_image()] if p.image is not None else [] for p in pairs]
    return prompting.encode(processor, texts, images, padding_side=padding_side)
