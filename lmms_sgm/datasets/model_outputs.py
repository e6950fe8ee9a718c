"""Profiling pairs from a model's own answers, labelled by a judge (how the demo's best profiling
set was made, lmms_sgm/selflabel.py, generalised to any lmms-eval run).

Input: the samples file(s) an lmms-eval run of an MM-TOXIC-QA task wrote with ``--log_samples``
(``<output_path>/<model>/<date>_samples_<task>.jsonl``; a directory is searched for every
``*_samples_mm_toxic_qa*.jsonl``), plus ``data=DIR``, the ``MM_TOXIC_QA_DIR`` that run read:
lmms-eval 0.7.3 saves each sample without its doc (``doc_id``, ``input``, ``filtered_resps``, ...), so
the task named in the file name picks the file of that directory (``mm_toxic_qa[_sampled]`` ->
``harmful.jsonl``, ``mm_toxic_qa_benign[_sampled]`` -> ``benign.jsonl``, ``mm_toxic_qa_adv[_sampled]``
-> ``adv.jsonl``) and ``doc_id`` its record (the tasks keep file order; ``--limit`` takes the first).
Without an ``adv.jsonl`` the adv task drew its attack from ``harmful.jsonl`` at load time; the same
drawing is redone here. A sample that does carry its ``doc`` is joined by the doc's ``id``. The
logged prompt (``input``) must contain the record's question, so a wrong ``data=`` fails loudly.

Every answer in ``filtered_resps`` (several per prompt for the ``*_sampled`` tasks) becomes one
pair: ``text`` = the answer, ``question`` = the question the model saw, ``label`` = 1 when the
judge (``judge=NAME``, default ``lexicon``; ``judge.KEY=VALUE`` passes arguments, e.g.
``judge.lexicon=words.txt``) calls it unsafe given the record's (original) question, else 0. Empty answers
are skipped. Samples files are read line by line; the samples file reader does not import lmms_eval.
"""
from __future__ import annotations

import io
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
    from lmms_sgm import textfiles

    records = []
    with textfiles.raising(DatasetError):
        rows = list(textfiles.jsonl(path, "task records file"))
    for n, row in rows:
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
    from lmms_sgm import textfiles

    judge = judge_of(params)
    tables = {split: _task_records(data, split) for split in SPLIT_FILES}
    for samples in samples_files(path):
        task = samples.stem.split("_samples_", 1)[-1]
        with textfiles.raising(DatasetError):
            for n, sample in textfiles.jsonl(samples, "samples file"):
                record = _record(sample, f"{samples}:{n}", task, data, tables, judge)
                if record is not None:
                    yield record


TASK_SPLITS = {"mm_toxic_qa": "harmful", "mm_toxic_qa_benign": "benign", "mm_toxic_qa_adv": "adv"}


def _record(sample, where: str, task: str, data: Path, tables, judge) -> SourceRecord | None:
    if not isinstance(sample, dict) or not isinstance(sample.get("doc_id"), int) or "filtered_resps" not in sample:
        raise DatasetError(f"{where}: not an lmms-eval sample (needs an integer 'doc_id' and 'filtered_resps')")
    doc = sample.get("doc") or {}  # lmms-eval 0.7.3 drops it when saving; other versions keep it
    if doc:
        split = "adv" if doc.get("attack") else "benign" if str(doc.get("harmful")) == "0" else "harmful"
        drawn = doc.get("attack") == "typo"
    else:
        split = TASK_SPLITS.get(task.removesuffix("_sampled"))
        if split is None:
            raise DatasetError(f"{where}: {task!r} is not an MM-TOXIC-QA task (its samples file name ends in _samples_<task>.jsonl)")
        drawn = split == "adv" and not tables["adv"][0]  # no adv.jsonl: the task drew the attack itself
    records, by_id = tables["harmful" if drawn else split]
    name = data / SPLIT_FILES["harmful" if drawn else split]
    if doc.get("id") is not None:
        row = by_id.get(str(doc["id"]))
    else:
        row = records[sample["doc_id"]] if sample["doc_id"] < len(records) else None
    if row is None:
        key = doc.get("id", sample["doc_id"])
        raise DatasetError(f"{where}: doc {key!r} is not in {name}: is data= the MM_TOXIC_QA_DIR of this run?")
    question = text_or_none(row.get("question"))
    key_phrase = text_or_none(row.get("key_phrase"))
    if drawn:
        from lmms_sgm.datasets.render import typographic_prompt

        shown = typographic_prompt(question or "", key_phrase)[1]
    else:
        shown = question
    logged = text_or_none(doc.get("question")) or text_or_none(sample.get("input")) or ""
    if not shown or shown not in logged:  # "input" is the prompt: the question within any pre/post prompt
        raise DatasetError(f"{where}: doc {sample['doc_id']} asked {logged!r} but {row['_where']} holds {shown!r}: "
                           "is data= the MM_TOXIC_QA_DIR of this run?")
    image = row.get("image")
    if not isinstance(image, str):
        raise DatasetError(f"{row['_where']}: 'image' must be a path")
    image_path = Path(image) if Path(image).is_absolute() else data / image
    image_input = ImageInput(path=image_path, where=row["_where"])
    if drawn:  # drawn by the task at load time: draw it again, identically
        from lmms_sgm.datasets.images import decode, read_bytes
        from lmms_sgm.datasets.render import render_attack

        base = decode(read_bytes(image_input), f"{row['_where']}: image {image_path}")
        attack, _ = render_attack("sd_typo", base.convert("RGB"), question, key_phrase)
        buf = io.BytesIO()
        attack.save(buf, format="PNG")
        image_input = ImageInput(data=buf.getvalue(), where=f"{where} (attack drawn from {row['_where']})")
    original = text_or_none(row.get("original_question")) or question
    pairs = []
    for response in _responses(sample["filtered_resps"]):
        response = response.strip()
        if response:
            verdict = judge.judge(original, response)
            if not getattr(verdict, "failed", False):  # the judge could not decide: no label rather than a wrong one
                pairs.append((response, int(bool(verdict.unsafe))))
    if not pairs:
        return None
    return SourceRecord(
        id=f"{task}/{row['id']}",
        image=image_input,
        category=text_or_none(row.get("category")) or "uncategorized",
        where=where,
        question=shown,
        pairs=tuple(pairs),
        original_question=original if original != shown else None,
        extra={"task": task},
    )
