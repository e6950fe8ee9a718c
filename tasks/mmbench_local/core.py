"""MMBench from a local TSV in MMBench's own format, scored by lmms-eval's own MMBench helpers.

The rows come from ``$MMBENCH_LOCAL_TSV``; unset, from the demo's test TSV when the run's model is
the bundled demo model, else from ``sample.tsv`` beside this file (a tiny fixture written by
``make_sample.py``), each with a warning. The YAML's ``dataset_path: csv`` only gives lmms-eval
something to load; :func:`process_docs` replaces it with the TSV read here, with every column kept
as text (pandas would turn option texts such as ``2`` into numbers).

TSV columns (MMBench dev/test files): ``index, question, hint, A, B, C, D[, E], answer, category,
image, source, l2-category, comment, split``. ``image`` is a base64 PNG/JPEG, or, in circular-
evaluation copies, the index of the row holding the image (a string of at most 64 characters).
Required: index, question, A, B, answer, image.

Prompting and option-letter extraction are lmms-eval's (``lmms_eval.tasks.mmbench.en_utils`` and
``MMBench_Evaluator.eval_result(..., eval_method="static")``, the no-API path of
``mmbench_en_dev_static``), including circular evaluation: a question counts as right only when
all its copies (index + k * 1e6) are. The YAMLs reach these functions through ``utils.py`` (see
there why).
"""
from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

import datasets
import pandas as pd
from lmms_eval.tasks.mmbench import en_utils
from lmms_sgm_tasks.mm_toxic_qa.core import DEMO_SPLIT, warn_once

from lmms_sgm import harness_common as run_info

TSV_ENV = "MMBENCH_LOCAL_TSV"
SAMPLE_TSV = Path(__file__).resolve().parent / "sample.tsv"
OPTIONS = "ABCDE"
REQUIRED = ("index", "question", "A", "B", "answer", "image")
HOW_TO_GET_DATA = (
    f"Set {TSV_ENV} to an MMBench TSV (e.g. MMBench_DEV_EN.tsv from the MMBench / VLMEvalKit "
    f"downloads; columns {', '.join(REQUIRED)}, hint, C, D, category, l2-category), or unset it for the "
    "default: the demo's test TSV with the demo model, else the tiny sample shipped with lmms_sgm (lmms_sgm docs/tasks.md)."
)

FEATURES_BASE = {
    "index": datasets.Value("int64"),
    "question": datasets.Value("string"),
    "hint": datasets.Value("string"),
    "answer": datasets.Value("string"),
    "category": datasets.Value("string"),
    "L2-category": datasets.Value("string"),
    "source": datasets.Value("string"),
    "split": datasets.Value("string"),
    "image": datasets.Image(),
}


class MMBenchLocalError(ValueError):
    """A missing or malformed MMBench TSV; the message says how to get a valid one."""


def tsv_path() -> Path:
    """``$MMBENCH_LOCAL_TSV``; unset, the demo's test TSV when the run's model is the bundled demo
    model, else the shipped sample (each with a warning: neither is MMBench)."""
    value = os.environ.get(TSV_ENV, "").strip()
    if value:
        return Path(value).expanduser()
    demo = run_info.demo_data()
    if demo is not None:
        path = demo / "mmbench" / f"{DEMO_SPLIT}.tsv"
        warn_once(f"{TSV_ENV} is unset and the model is the bundled demo model: mmbench_local uses the demo's "
                  f"{DEMO_SPLIT} split, {path}. Set {TSV_ENV} to evaluate another TSV.")
        return path
    warn_once(f"{TSV_ENV} is unset: mmbench_local runs on the {SAMPLE_TSV.name} shipped with lmms_sgm "
              f"({SAMPLE_TSV}), a format check: its accuracy measures nothing. Set {TSV_ENV} to an MMBench TSV "
              "(lmms_sgm docs/tasks.md).")
    return SAMPLE_TSV


def read_tsv(path: str | Path) -> datasets.Dataset:
    """An MMBench TSV as docs with the fields lmms-eval's MMBench helpers read."""
    path = Path(path)
    if not path.is_file():
        raise MMBenchLocalError(f"MMBench TSV {path} does not exist. {HOW_TO_GET_DATA}")
    try:
        frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except Exception as e:  # noqa: BLE001 - any parse failure gets the same advice
        raise MMBenchLocalError(f"{path}: not a readable TSV ({e}). {HOW_TO_GET_DATA}") from None
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise MMBenchLocalError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}. {HOW_TO_GET_DATA}")
    if frame.empty:
        raise MMBenchLocalError(f"{path}: no rows. {HOW_TO_GET_DATA}")
    options = [c for c in OPTIONS if c in frame.columns]
    l2 = next((c for c in ("l2-category", "L2-category") if c in frame.columns), None)
    images = dict(zip(frame["index"].str.strip(), frame["image"].str.strip()))

    cols: dict[str, list] = {k: [] for k in [*FEATURES_BASE, *options]}
    for n, row in enumerate(frame.to_dict(orient="records")):
        where = f"{path}: row {n} (index {row['index']!r})"
        try:
            index = int(row["index"])
        except ValueError:
            raise MMBenchLocalError(f"{where}: index is not an integer") from None
        present = [c for c in options if row[c].strip()]
        answer = row["answer"].strip()
        if answer not in present:
            raise MMBenchLocalError(f"{where}: answer {answer!r} is not one of its options {present}")
        cols["index"].append(index)
        cols["question"].append(row["question"])
        cols["hint"].append(row.get("hint", "").strip() or None)
        cols["answer"].append(answer)
        cols["category"].append(row.get("category", "").strip() or "uncategorized")
        cols["L2-category"].append((row.get(l2, "") if l2 else "").strip() or "uncategorized")
        cols["source"].append(row.get("source", "").strip() or "local")
        cols["split"].append(row.get("split", "").strip() or "dev")
        cols["image"].append({"bytes": _image_bytes(row["image"].strip(), images, where), "path": None})
        for c in options:
            cols[c].append(row[c] if row[c].strip() else None)
    features = datasets.Features({**FEATURES_BASE, **{c: datasets.Value("string") for c in options}})
    return datasets.Dataset.from_dict(cols, features=features)


def _image_bytes(value: str, images: dict[str, str], where: str) -> bytes:
    if len(value) <= 64:  # a circular copy points at the row that holds the image
        target = images.get(value)
        if target is None or len(target) <= 64:
            raise MMBenchLocalError(f"{where}: image {value!r} is neither base64 data nor the index of a row with an image")
        value = target
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise MMBenchLocalError(f"{where}: image is not valid base64") from None


def process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """Ignore the bootstrap rows; read ``$MMBENCH_LOCAL_TSV`` (default ``sample.tsv``)."""
    return read_tsv(tsv_path())


# --------------------------------------------------------------------------- generate_until


def process_results(doc: dict, results: list[str]) -> dict:
    """lmms-eval's per-sample MMBench record (index, answer, prediction, options, categories)."""
    record = en_utils.mmbench_process_results(doc, results)["gpt_eval_score"]
    return {"accuracy": record, "accuracy_by_category": record}


def _evaluate(items: list[dict]):
    return en_utils.mmbench_evaluator.eval_result(items, eval_method="static")


def aggregate_accuracy(items: list[dict]) -> float:
    """Circular accuracy in [0, 1] (lmms-eval's mmbench_en_dev_static reports the same x 100)."""
    overall, _, _ = _evaluate(items)
    return float(overall)


def aggregate_accuracy_by_category(items: list[dict]) -> dict:
    _, category, l2_category = _evaluate(items)
    return {"category": {k: float(v) for k, v in category.items()}, "l2-category": {k: float(v) for k, v in l2_category.items()}}


# --------------------------------------------------------------------------- multiple_choice


def _present(doc: dict) -> list[str]:
    return [c for c in OPTIONS if doc.get(c) is not None and str(doc[c]).strip() and str(doc[c]) != "nan"]


def doc_to_text_mc(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question (after its hint) without the lettered options: each option text is scored."""
    kw = lmms_eval_specific_kwargs or {}
    hint = doc.get("hint")
    body = f"{hint}\n{doc['question']}" if hint and hint != "nan" else doc["question"]
    return f"{kw.get('pre_prompt', '')}{body}{kw.get('post_prompt', '')}"


def doc_to_choice(doc: dict) -> list[str]:
    return [str(doc[c]) for c in _present(doc)]


def doc_to_target_mc(doc: dict) -> int:
    return _present(doc).index(doc["answer"])
