"""Your own collection, in our schemas: a JSONL, JSON (a list) or CSV file with an image folder.

One row per image-text record; image paths are relative to the file (or absolute). A row is

- a profiling pair when it has ``text`` and ``label`` (1 toxic, 0 non-toxic; docs/data.md), and
- an evaluation prompt when it has ``harmful`` (1 harmful, 0 benign; the MM-TOXIC-QA schema of
  docs/tasks.md) and a ``question``;

either or both. Optional: ``question``, ``category`` (default: the ``category=`` parameter, else
``uncategorized``), ``id`` (default: the line number), ``key_phrase``, ``answer``, and a
ready-made attack: ``adv_image`` + ``adv_question`` (used as the prompt's adversarial variant
instead of a drawn one). Other fields are ignored.

Source kinds ``jsonl`` and ``csv`` are the same reader; the file's suffix decides the format
(``.jsonl``, ``.json``, ``.csv``). Rows are read one at a time.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from lmms_sgm.datasets.records import BENIGN, HARMFUL, DatasetError, ImageInput, SourceRecord, text_or_none

LICENCE = "yours: give it with licence=..."
URL = ""
PARAMS = {
    "category": "category of rows without one (default uncategorized)",
    "licence": "the licence to state in the dataset card",
}
FLAGS = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "false": 0, "true": 1}


def rows(path: Path) -> Iterator[tuple[str, dict]]:
    """``(where, row)`` for each row of a JSONL / JSON / CSV file, streamed (JSON: one list)."""
    from lmms_sgm import textfiles

    with textfiles.raising(DatasetError):
        yield from _rows(path)


def _rows(path: Path) -> Iterator[tuple[str, dict]]:
    from lmms_sgm import textfiles

    if not path.exists():
        raise DatasetError(f"{path} is not a file")
    textfiles.require_regular(path, "records file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for n, row in textfiles.jsonl(path, "records file"):
            yield f"{path}:{n}", row
    elif suffix == ".json":
        data = textfiles.read_json(path, "records file")
        data = data.get("data") if isinstance(data, dict) else data
        if not isinstance(data, list):
            raise DatasetError(f"{path}: expected a list of records (or {{\"data\": [...]}})")
        for i, row in enumerate(data):
            yield f"{path}: record {i}", row
    elif suffix == ".csv":
        for n, row in textfiles.csv_rows(path, "records file"):
            yield f"{path}:{n}", {k: (v if v != "" else None) for k, v in row.items()}
    else:
        raise DatasetError(f"{path}: use a .jsonl, .json or .csv file")


def _flag(row: dict, key: str, where: str) -> int | None:
    value = row.get(key)
    if value is None:
        return None
    flag = FLAGS.get(str(value).strip().lower())
    if flag is None:
        meaning = "1 (toxic) or 0 (non-toxic)" if key == "label" else "1 (harmful) or 0 (benign)"
        raise DatasetError(f"{where}: {key!r} must be {meaning}, got {value!r}")
    return flag


def _image(value, base: Path, where: str, key: str) -> ImageInput:
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{where}: {key!r} must be an image path, got {value!r}")
    path = Path(value.strip()).expanduser()
    return ImageInput(path=path if path.is_absolute() else base / path, where=where)


def read(path: Path, params: dict[str, str]) -> Iterator[SourceRecord]:
    default_category = params.get("category", "uncategorized")
    seen: dict[str, str] = {}
    for where, row in rows(path):
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: expected an object, got {type(row).__name__}")
        rid = text_or_none(row.get("id")) or where.rsplit(":", 1)[-1].strip().replace("record ", "")
        if rid in seen:
            raise DatasetError(f"{where}: id {rid!r} already used at {seen[rid]}")
        seen[rid] = where
        if row.get("image") is None:
            raise DatasetError(f"{where}: lacks 'image'")
        text, label, harmful = text_or_none(row.get("text")), _flag(row, "label", where), _flag(row, "harmful", where)
        question = text_or_none(row.get("question"))
        if (text is None) != (label is None):
            raise DatasetError(f"{where}: a profiling pair needs both 'text' and 'label'")
        if harmful is not None and question is None:
            raise DatasetError(f"{where}: an evaluation prompt ('harmful' given) needs a 'question'")
        if text is None and harmful is None:
            raise DatasetError(f"{where}: has neither 'text' + 'label' (a profiling pair) nor 'harmful' (an evaluation prompt)")
        adv_image, adv_question = row.get("adv_image"), text_or_none(row.get("adv_question"))
        if (adv_image is None) != (adv_question is None) or (adv_image is not None and harmful != 1):
            raise DatasetError(f"{where}: 'adv_image' and 'adv_question' go together, on harmful prompts only")
        yield SourceRecord(
            id=rid,
            image=_image(row["image"], path.parent, where, "image"),
            category=text_or_none(row.get("category")) or default_category,
            where=where,
            question=question,
            pairs=((text, label),) if text is not None else (),
            prompt=None if harmful is None else (HARMFUL if harmful else BENIGN),
            key_phrase=text_or_none(row.get("key_phrase")),
            answer=text_or_none(row.get("answer")),
            attack_image=_image(adv_image, path.parent, where, "adv_image") if adv_image is not None else None,
            attack_question=adv_question,
            attack="prerendered" if adv_image is not None else None,
        )
