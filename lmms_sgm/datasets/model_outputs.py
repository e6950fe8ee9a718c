"""Profiling pairs from a model's own answers, labelled by a judge (how the demo's best profiling
set was made, lmms_sgm/selflabel.py, generalised to any lmms-eval run).

Input: the samples file(s) an lmms-eval run of an MM-TOXIC-QA task wrote with ``--log_samples``
(``<output_path>/<model>/<date>_samples_<task>.jsonl``; a directory is searched for every
``*_samples_mm_toxic_qa*.jsonl``), plus ``data=DIR``, the ``MM_TOXIC_QA_DIR`` that run read:
lmms-eval logs each doc without its image, so the image is found by joining the logged doc's
``id`` to that directory's ``harmful.jsonl`` / ``benign.jsonl`` / ``adv.jsonl`` (for an attack the
task drew itself, ``attack: typo``, the same drawing is redone from the harmful record). The logged
question must equal the record's, so a wrong ``data=`` fails loudly.

Every answer in ``filtered_resps`` (several per prompt for the ``*_sampled`` tasks) becomes one
pair: ``text`` = the answer, ``question`` = the question the model saw, ``label`` = 1 when the
judge (``judge=NAME``, default ``lexicon``; ``judge.KEY=VALUE`` passes arguments, e.g.
``judge.lexicon=words.txt``) calls it unsafe given the original question, else 0. Empty answers
are skipped. Samples files are read line by line; the samples file reader does not import lmms_eval.
"""
from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

from lmms_sgm.datasets.records import DatasetError, ImageInput, SourceRecord, text_or_none

LICENCE = "the prompts' dataset's licence, and the terms of the model that wrote the answers"
URL = ""
PARAMS = {
    "data": "the MM_TOXIC_QA_DIR the lmms-eval run read (required)",
    "judge": "the judge that labels each answer (default lexicon)",
    "judge.<arg>": "an argument for the judge, e.g. judge.lexicon=/path/words.txt",
}
SPLIT_FILES = {"harmful": "harmful.jsonl", "benign": "benign.jsonl", "adv": "adv.jsonl"}


def judge_of(params: dict[str, str]):
    from lmms_sgm.judges import get_judge

    kwargs = {k.split(".", 1)[1]: v for k, v in params.items() if k.startswith("judge.")}
    return get_judge(params.get("judge", "lexicon"), **kwargs)


def describe(path: Path, params: dict[str, str]) -> dict:
    """What the manifest records about this source beyond its parameters: the judge's identity."""
    from lmms_sgm.judges import identity

    return {"judge": identity(judge_of(params))}


def samples_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    found = sorted(path.rglob("*_samples_mm_toxic_qa*.jsonl"))
    if not found:
        raise DatasetError(f"model-outputs: no *_samples_mm_toxic_qa*.jsonl under {path} (run lmms-eval with --log_samples)")
    return found


def _task_records(data: Path, split: str) -> tuple[list[dict], dict[str, dict]]:
    path = data / SPLIT_FILES[split]
    if not path.is_file():
        return [], {}
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                row = dict(row, _where=f"{path}:{n}")
                row.setdefault("id", None)
                if row["id"] is None:
                    row["id"] = f"{split}_{len(records)}"  # the tasks' default id
                row["id"] = str(row["id"])
                records.append(row)
    return records, {r["id"]: r for r in records}


def _responses(value) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [r for v in value for r in _responses(v)]
    return [] if value is None else [str(value)]


def read(path: Path, params: dict[str, str]) -> Iterator[SourceRecord]:
    if not params.get("data"):
        raise DatasetError("model-outputs: give data=DIR, the MM_TOXIC_QA_DIR the lmms-eval run read (its images)")
    data = Path(params["data"]).expanduser()
    if not data.is_dir():
        raise DatasetError(f"model-outputs: data={data} is not a directory")
    judge = judge_of(params)
    tables = {split: _task_records(data, split) for split in SPLIT_FILES}
    for samples in samples_files(path):
        task = samples.stem.split("_samples_", 1)[-1]
        with open(samples, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{samples}:{n}"
                try:
                    sample = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{where}: not valid JSON ({e.msg})") from None
                record = _record(sample, where, task, data, tables, judge)
                if record is not None:
                    yield record


def _record(sample, where: str, task: str, data: Path, tables, judge) -> SourceRecord | None:
    if not isinstance(sample, dict) or "doc_id" not in sample or "filtered_resps" not in sample:
        raise DatasetError(f"{where}: not an lmms-eval sample (needs 'doc_id' and 'filtered_resps')")
    doc = sample.get("doc") or {}
    attack = doc.get("attack")
    split = "adv" if attack == "prerendered" else "benign" if str(doc.get("harmful")) == "0" else "harmful"
    if not doc:  # an lmms-eval that logs no doc: the task name says the split, the doc_id the line
        split = "adv" if "_adv" in task else "benign" if "_benign" in task else "harmful"
    records, by_id = tables[split]
    key = doc.get("id")
    row = by_id.get(str(key)) if key is not None else (records[sample["doc_id"]] if sample["doc_id"] < len(records) else None)
    if row is None:
        raise DatasetError(f"{where}: doc {key if key is not None else sample['doc_id']!r} is not in {data / SPLIT_FILES[split]}: is data= the MM_TOXIC_QA_DIR of this run?")
    seen_question = text_or_none(doc.get("question")) or text_or_none(row.get("question"))
    original = text_or_none(doc.get("original_question")) or seen_question
    if text_or_none(row.get("question")) != (original if attack == "typo" else seen_question):
        raise DatasetError(f"{where}: doc {row['id']!r} asks {seen_question!r} but {row['_where']} asks {row.get('question')!r}: is data= the MM_TOXIC_QA_DIR of this run?")
    image = row.get("image")
    if not isinstance(image, str):
        raise DatasetError(f"{row['_where']}: 'image' must be a path")
    image_path = Path(image) if Path(image).is_absolute() else data / image
    image_input = ImageInput(path=image_path, where=row["_where"])
    if attack == "typo":  # drawn by the task at load time: draw it again, identically
        from lmms_sgm.datasets.images import decode, read_bytes
        from lmms_sgm.datasets.render import render_attack

        base = decode(read_bytes(image_input), f"{row['_where']}: image {image_path}")
        drawn, _ = render_attack("sd_typo", base, text_or_none(row["question"]), text_or_none(row.get("key_phrase")))
        buf = io.BytesIO()
        drawn.save(buf, format="PNG")
        image_input = ImageInput(data=buf.getvalue(), where=f"{where} (attack drawn from {row['_where']})")
    pairs = []
    for response in _responses(sample["filtered_resps"]):
        response = response.strip()
        if response:
            pairs.append((response, int(bool(judge.judge(original, response).unsafe))))
    if not pairs:
        return None
    return SourceRecord(
        id=f"{task}/{row['id']}",
        image=image_input,
        category=text_or_none(doc.get("category")) or text_or_none(row.get("category")) or "uncategorized",
        where=where,
        question=seen_question,
        pairs=tuple(pairs),
        original_question=original if original != seen_question else None,
        extra={"task": task},
    )
