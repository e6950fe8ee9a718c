"""BeaverTails-V (PKU-Alignment; huggingface.co/datasets/PKU-Alignment/BeaverTails-V): labelled
responses about harmful images, and harmful prompts. Licence CC BY-NC 4.0.

Layout, as the Hub repository holds it (``hf download PKU-Alignment/BeaverTails-V --repo-type
dataset --local-dir ROOT``)::

    ROOT/data/<category>/train.parquet          (or train-00000-of-00002.parquet ... shards)
    ROOT/data/<category>/evaluation.parquet

Columns: ``question``, ``image`` (the ``datasets`` Image feature: a struct of ``bytes`` and
``path``), ``category``, ``image_severity`` and either ``response_1``, ``response_2``,
``is_response_1_safe``, ``is_response_2_safe`` (one release) or ``response``, ``is_response_safe``
(the other); the safety flags are ``"yes"`` / ``"no"``.

Each row gives its responses as profiling pairs (unsafe -> toxic 1, safe -> non-toxic 0; empty
responses are skipped) and its question as a harmful evaluation prompt (the questions are
red-teaming questions about an image of a harm category); the row's category is the category.
Parquet files are read in small batches, so no more than a batch of images is in memory.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from lmms_sgm.datasets.records import HARMFUL, DatasetError, ImageInput, SourceRecord, text_or_none

LICENCE = "CC BY-NC 4.0 (non-commercial use, attribution)"
URL = "https://huggingface.co/datasets/PKU-Alignment/BeaverTails-V"
PARAMS = {
    "split": "the source's files to read: train, evaluation or all (default)",
    "categories": "only these category folders, joined by '+'",
}
PAIRED = (("response_1", "is_response_1_safe"), ("response_2", "is_response_2_safe"))
SINGLE = (("response", "is_response_safe"),)
SAFE_FLAGS = {"yes": 0, "no": 1, "true": 0, "false": 1}
BATCH_ROWS = 16


def read(root: Path, params: dict[str, str]) -> Iterator[SourceRecord]:
    split = params.get("split", "all")
    if split not in ("train", "evaluation", "all"):
        raise DatasetError(f"beavertails-v: split must be train, evaluation or all, got {split!r}")
    data = root / "data" if (root / "data").is_dir() else root
    names = ("train", "evaluation") if split == "all" else (split,)
    files = sorted({f for name in names for pattern in (f"*/{name}.parquet", f"*/{name}-*.parquet") for f in data.glob(pattern)})
    wanted = set(filter(None, params.get("categories", "").split("+")))
    if wanted:
        files = [f for f in files if f.parent.name in wanted]
    if not files:
        raise DatasetError(f"beavertails-v: no data/<category>/{{{','.join(names)}}}.parquet under {root}")
    for path in files:
        yield from _read_file(path)


def _read_file(path: Path) -> Iterator[SourceRecord]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a broken file
        raise DatasetError(f"{path}: not a readable parquet file ({e})") from None
    columns = set(pf.schema_arrow.names)
    if {"question", "image"} - columns:
        raise DatasetError(f"{path}: lacks column(s) {sorted({'question', 'image'} - columns)} (has {sorted(columns)})")
    if all(r in columns and s in columns for r, s in PAIRED):
        responses = PAIRED
    elif all(r in columns and s in columns for r, s in SINGLE):
        responses = SINGLE
    else:
        raise DatasetError(
            f"{path}: needs response_1/2 + is_response_1/2_safe or response + is_response_safe columns (has {sorted(columns)})"
        )
    wanted = ["question", "image"] + [c for rs in responses for c in rs] + [c for c in ("category", "image_severity") if c in columns]
    folder, source_split = path.parent.name, path.stem.split("-")[0]
    row = 0
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=wanted):
        for values in batch.to_pylist():
            yield _record(path, folder, source_split, row, values, responses)
            row += 1


def _record(path: Path, folder: str, source_split: str, row: int, values: dict, responses) -> SourceRecord:
    where = f"{path}: row {row}"
    question = text_or_none(values.get("question"))
    if question is None:
        raise DatasetError(f"{where}: empty 'question'")
    image = values.get("image")
    if isinstance(image, dict) and image.get("bytes"):
        image_input = ImageInput(data=image["bytes"], where=where)
    elif isinstance(image, dict) and image.get("path"):
        image_input = ImageInput(path=path.parent / image["path"], where=where)
    else:
        raise DatasetError(f"{where}: 'image' holds no image bytes")
    pairs = []
    for text_col, flag_col in responses:
        text, flag = text_or_none(values.get(text_col)), values.get(flag_col)
        label = SAFE_FLAGS.get(str(flag).strip().lower()) if flag is not None else None
        if label is None:
            raise DatasetError(f"{where}: {flag_col!r} must be 'yes' or 'no', got {flag!r}")
        if text is not None:
            pairs.append((text, label))
    extra = {"source_split": source_split}
    if values.get("image_severity") is not None:
        extra["image_severity"] = int(values["image_severity"])
    return SourceRecord(
        id=f"{path.parent.name}/{path.stem}/{row}",  # shards of a split: one id space each
        image=image_input,
        category=text_or_none(values.get("category")) or folder,
        where=where,
        question=question,
        pairs=tuple(pairs),
        prompt=HARMFUL,
        extra=extra,
    )
