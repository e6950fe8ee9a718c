"""A built dataset as a Hugging Face ``datasets`` dataset: parquet files + card, ready to upload.

``export(DIR, OUT)`` writes::

    OUT/README.md                                the card, with the `configs` the Hub loader reads
    OUT/data/profile/train-00000.parquet ...     config "profile", split "train": the pairs
    OUT/data/validation/{harmful,benign,adv}-00000.parquet ...   config "validation"
    OUT/data/test/{harmful,benign,adv}-00000.parquet ...         config "test"

Images are embedded (the ``datasets`` Image feature: a struct of ``bytes`` and ``path``), so the
upload is self-contained: ``hf upload ORG/NAME OUT --repo-type dataset``. Then
``datasets.load_dataset("ORG/NAME", "test")`` gives the splits ``harmful`` / ``benign`` / ``adv``
that the MM-TOXIC-QA tasks read through a YAML naming ``dataset_path: ORG/NAME`` and
``dataset_name: test`` (docs/dataset.md), and ``load_dataset("ORG/NAME", "profile", split="train")``
is accepted by ``lmms_sgm.load_pairs`` and ``build_glasses``. Rows are written in small batches.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from lmms_sgm.datasets.records import DatasetError

ROWS_PER_FILE = 1000
ROWS_PER_GROUP = 100  # images per parquet row group, as `datasets` writes image data


def _features(kind: str):
    import datasets

    s = datasets.Value("string")
    if kind == "profile":
        return datasets.Features({"id": s, "image": datasets.Image(), "text": s, "label": datasets.Value("int64"),
                                  "question": s, "category": s, "source": s})
    return datasets.Features({"id": s, "image": datasets.Image(), "question": s, "category": s,
                              "harmful": datasets.Value("int64"), "key_phrase": s, "answer": s,
                              "original_question": s, "source": s})


def _write_parquet(src: Path, dest_dir: Path, stem: str, kind: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    features = _features(kind)
    schema = features.arrow_schema  # carries the "huggingface" metadata: `datasets` sees an Image feature
    names = list(features)
    dest_dir.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    writer, rows, batch = None, 0, []

    def flush():
        nonlocal batch
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema), row_group_size=ROWS_PER_GROUP)
            batch = []

    def open_next():
        nonlocal writer
        path = dest_dir / f"{stem}-{len(written):05d}.parquet"
        written.append(path.name)
        writer = pq.ParquetWriter(path, schema)

    open_next()
    with open(src, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            if rows and rows % ROWS_PER_FILE == 0:
                flush()
                writer.close()
                open_next()
            image = Path(row["image"])
            image = image if image.is_absolute() else src.parent / image
            value = {k: row.get(k) for k in names}
            value["image"] = {"bytes": image.read_bytes(), "path": image.name}
            for k in names:
                if k not in ("image", "label", "harmful") and value[k] is not None:
                    value[k] = str(value[k])
            batch.append(value)
            rows += 1
            if len(batch) >= ROWS_PER_GROUP:
                flush()
    flush()
    writer.close()
    return written


def export(root: str | Path, out: str | Path) -> Path:
    """Write the Hub layout of the built dataset ``root`` into the new directory ``out``."""
    from lmms_sgm.datasets.build import MANIFEST, is_built_dataset
    from lmms_sgm.datasets.card import render_card
    from lmms_sgm.datasets.check import check_dataset

    root, out = Path(root), Path(out)
    if not is_built_dataset(root):
        raise DatasetError(f"{root} is not a dataset built by `lmms-sgm dataset build` (no {MANIFEST})")
    if out.exists() and any(out.iterdir()):
        raise DatasetError(f"{out} exists and is not empty; choose a new directory")
    report = check_dataset(root)
    if report.errors:
        raise DatasetError(
            f"{root} fails `lmms-sgm dataset check` ({len(report.errors)} errors, first: {report.errors[0]}); fix it before sharing it"
        )
    manifest = json.loads((root / MANIFEST).read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        configs = []
        if (root / "profile.jsonl").is_file() and manifest["counts"]["profile"]["pairs"]:
            _write_parquet(root / "profile.jsonl", tmp / "data" / "profile", "train", "profile")
            configs.append({"name": "profile", "data_files": {"train": "data/profile/train-*.parquet"}})
        for split_dir in sorted((root / "eval").iterdir()) if (root / "eval").is_dir() else []:
            data_files = {}
            for kind in ("harmful", "benign", "adv"):
                if (split_dir / f"{kind}.jsonl").is_file():
                    _write_parquet(split_dir / f"{kind}.jsonl", tmp / "data" / split_dir.name, kind, "prompts")
                    data_files[kind] = f"data/{split_dir.name}/{kind}-*.parquet"
            configs.append({"name": split_dir.name, "data_files": data_files})
        (tmp / "README.md").write_text(render_card(manifest, configs=configs), encoding="utf-8")
        shutil.copyfile(root / MANIFEST, tmp / MANIFEST)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
