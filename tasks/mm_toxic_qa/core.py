"""MM-TOXIC-QA for lmms-eval: data loading, typographic attack, prompts, judging, aggregation.

The YAMLs reach these functions through ``utils.py`` (see there why). Nothing here imports
lmms_eval: the loaders and the typographic attack work from a notebook too
(``read_split(dir, "harmful")``, ``typographic_dataset(docs)``).

Where the data comes from (docs/tasks.md):

1. ``MM_TOXIC_QA_DIR`` set: ``$MM_TOXIC_QA_DIR/harmful.jsonl`` / ``benign.jsonl``, image paths
   relative to that directory. The rows the YAML made lmms-eval load are ignored.
2. Unset, and the model is the bundled demo model (``sgm_llava`` with ``pretrained=sgm-demo-llava``
   or its directory, :func:`lmms_sgm.harness_common.demo_data`): the demo's test split, with a
   warning. The generic sample's words are unknown to that model: its rates there mean nothing.
3. Otherwise the rows lmms-eval loaded from the YAML's ``dataset_path``: by default the sample in
   ``sample/`` (``dataset_path: json``; a warning says it is no benchmark), or a Hub dataset with
   an image column and splits ``harmful`` / ``benign`` in a YAML of your own. Relative image paths
   are resolved against ``sample/``.

The judge is chosen by ``LMMS_SGM_JUDGE`` / ``LMMS_SGM_JUDGE_ARGS`` (:mod:`lmms_sgm.judges`) and is
built while the data loads, so a bad judge setting fails before any generation.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
from pathlib import Path

import datasets
from PIL import Image

from lmms_sgm import harness_common as run_info
from lmms_sgm.datasets.render import typographic_image, typographic_prompt
from lmms_sgm.judges import JudgeItem, identity, judge_from_env, judge_many, scoring
from lmms_sgm.judges.scoring import UNCATEGORIZED, aggregate_by_category, aggregate_judge, aggregate_rate  # noqa: F401 (utils.py)

try:  # lmms-eval's logger: its warnings show in the run's output
    from loguru import logger
except ImportError:  # pragma: no cover - loguru comes with lmms-eval
    import logging

    logger = logging.getLogger(__name__)

DATA_DIR_ENV = "MM_TOXIC_QA_DIR"
SAMPLE_DIR = Path(__file__).resolve().parent / "sample"  # the default dataset (make_sample.py)
DEMO_SPLIT = "test"  # the demo model's default data: lmms_sgm/demo/data/mm_toxic_qa/test
SPLIT_FILES = {"harmful": "harmful.jsonl", "benign": "benign.jsonl", "adv": "adv.jsonl"}
HARMFUL_SPLITS = ("harmful", "adv")  # adv: harmful prompts whose attack images are already rendered

HOW_TO_GET_DATA = (
    f"Set {DATA_DIR_ENV} to a directory holding harmful.jsonl and benign.jsonl in the MM-TOXIC-QA "
    "schema (lmms_sgm docs/tasks.md, which also shows how to convert MM-SafetyBench-style data), "
    f"or unset {DATA_DIR_ENV} for the default: the demo's test split with the demo model, else the "
    "small format sample shipped with lmms_sgm (rebuilt by `python tasks/mm_toxic_qa/make_sample.py [DIR]`)."
)

FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "image": datasets.Image(),
        "question": datasets.Value("string"),
        "category": datasets.Value("string"),
        "harmful": datasets.Value("int64"),
        "key_phrase": datasets.Value("string"),
        "answer": datasets.Value("string"),
    }
)
ADV_INPUT_FEATURES = datasets.Features({**FEATURES, "original_question": datasets.Value("string")})  # adv.jsonl
ADV_FEATURES = datasets.Features({**ADV_INPUT_FEATURES, "attack": datasets.Value("string")})


class MMToxicQAError(ValueError):
    """A missing or invalid MM-TOXIC-QA dataset; the message says how to get a valid one."""


# --------------------------------------------------------------------------- data


def data_dir() -> Path | None:
    """The directory named by ``MM_TOXIC_QA_DIR``; unset, the demo's test split when the run's model
    is the bundled demo model (with a warning); else None (the YAML's dataset)."""
    value = os.environ.get(DATA_DIR_ENV, "").strip()
    if value:
        return Path(value).expanduser()
    demo = run_info.demo_data()
    if demo is None:
        return None
    path = demo / "mm_toxic_qa" / DEMO_SPLIT
    warn_once(f"{DATA_DIR_ENV} is unset and the model is the bundled demo model: the MM-TOXIC-QA tasks use the "
              f"demo's {DEMO_SPLIT} split, {path} (the generic sample's words are unknown to that model). "
              f"Set {DATA_DIR_ENV} to evaluate other data, e.g. {demo / 'mm_toxic_qa' / 'validation'}.")
    return path


_warned: set[str] = set()


def warn_once(message: str) -> None:
    """A warning in the run's log, once per process (every task loads the same data)."""
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def is_shipped_sample(docs: datasets.Dataset, split: str) -> bool:
    """Whether ``docs`` are the records of the sample in ``sample/`` (the YAMLs' default dataset)."""
    try:
        lines = (SAMPLE_DIR / SPLIT_FILES[split]).read_text(encoding="utf-8").splitlines()
        questions = [json.loads(line)["question"].strip() for line in lines if line.strip()]
    except (OSError, ValueError, KeyError):
        return False
    return list(docs["question"]) == questions


def read_split(root: str | Path, split: str) -> datasets.Dataset:
    """Load and validate ``<root>/harmful.jsonl`` or ``<root>/benign.jsonl`` as a Dataset."""
    root = Path(root)
    if split not in SPLIT_FILES:
        raise MMToxicQAError(f"unknown MM-TOXIC-QA split {split!r}; use one of {sorted(SPLIT_FILES)}")
    if not root.is_dir():
        raise MMToxicQAError(f"MM-TOXIC-QA directory {root} does not exist. {HOW_TO_GET_DATA}")
    path = root / SPLIT_FILES[split]
    if not path.is_file():
        raise MMToxicQAError(f"MM-TOXIC-QA file {path} does not exist. {HOW_TO_GET_DATA}")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise MMToxicQAError(f"{path}:{n}: not valid JSON ({e.msg}). {HOW_TO_GET_DATA}") from None
    return _to_dataset(rows, split=split, base=root, source=str(path))


def rows_to_docs(
    dataset: datasets.Dataset, split: str, base: str | Path = SAMPLE_DIR, source: str = "the YAML's dataset"
) -> datasets.Dataset:
    """Validate rows lmms-eval loaded (a json file, a Hub dataset) and give them our columns."""
    if "image" in dataset.column_names and isinstance(dataset.features["image"], datasets.Image):
        dataset = dataset.cast_column("image", datasets.Image(decode=False))  # no decoding at load
    return _to_dataset(list(dataset), split=split, base=Path(base), source=source)


def _to_dataset(rows: list[dict], *, split: str, base: Path, source: str) -> datasets.Dataset:
    if not rows:
        raise MMToxicQAError(f"{source}: no records. {HOW_TO_GET_DATA}")
    want_harmful = int(split in HARMFUL_SPLITS)
    features = ADV_INPUT_FEATURES if split == "adv" else FEATURES
    cols: dict[str, list] = {k: [] for k in features}
    for i, row in enumerate(rows):
        where = f"{source}: record {i}"
        if not isinstance(row, dict):
            raise MMToxicQAError(f"{where} is not an object. {HOW_TO_GET_DATA}")
        question = row.get("question")
        if not isinstance(question, str) or not question.strip():
            raise MMToxicQAError(f"{where} lacks a 'question' string. {HOW_TO_GET_DATA}")
        if row.get("image") is None:
            raise MMToxicQAError(f"{where} lacks an 'image'. {HOW_TO_GET_DATA}")
        harmful = row.get("harmful")
        flag = _FLAGS.get(str(harmful).strip().lower(), -1) if harmful is not None else want_harmful
        if flag != want_harmful:
            raise MMToxicQAError(f"{where}: 'harmful' is {harmful!r} but records of the {split} split must have harmful={want_harmful}")
        cols["id"].append(str(row.get("id") if row.get("id") is not None else f"{split}_{i}"))
        cols["image"].append(_image_value(row["image"], base, where))
        cols["question"].append(question.strip())
        cols["category"].append(_opt_str(row.get("category")) or UNCATEGORIZED)
        cols["harmful"].append(want_harmful)
        cols["key_phrase"].append(_opt_str(row.get("key_phrase")))
        cols["answer"].append(_opt_str(row.get("answer")))
        if split == "adv":  # the question before the attack rewrote it: what the judge is given
            cols["original_question"].append(_opt_str(row.get("original_question")) or question.strip())
    return datasets.Dataset.from_dict(cols, features=features)


_FLAGS = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "false": 0, "true": 1}


def _opt_str(value) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _image_value(value, base: Path, where: str) -> dict:
    """A value for a ``datasets.Image`` column: ``{"bytes": ...}`` or ``{"path": <absolute>}``."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return {"bytes": value["bytes"], "path": None}
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value), "path": None}
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.convert("RGB").save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": None}
    if not isinstance(value, str) or not value:
        raise MMToxicQAError(f"{where}: 'image' must be a path, image bytes or a datasets Image, got {type(value).__name__}")
    path = Path(value)
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise MMToxicQAError(f"{where}: image {path} not found (relative paths are resolved against {base}). {HOW_TO_GET_DATA}")
    return {"path": str(path), "bytes": None}


def _docs(dataset: datasets.Dataset, split: str) -> datasets.Dataset:
    judge_from_env()  # fail at load time, not after generation, on a bad LMMS_SGM_JUDGE(_ARGS)
    root = data_dir()
    if root is not None:
        return read_split(root, split)
    docs = rows_to_docs(dataset, split)
    if is_shipped_sample(docs, split):
        warn_once(f"{DATA_DIR_ENV} is unset: the MM-TOXIC-QA tasks run on the small sample shipped with lmms_sgm "
                  f"({SAMPLE_DIR}), a format check: its rates measure nothing. Set {DATA_DIR_ENV} to a directory with "
                  "harmful.jsonl and benign.jsonl (lmms_sgm docs/tasks.md).")
    return docs


def process_harmful(dataset: datasets.Dataset) -> datasets.Dataset:
    return _docs(dataset, "harmful")


def process_benign(dataset: datasets.Dataset) -> datasets.Dataset:
    return _docs(dataset, "benign")


def process_fluency(dataset: datasets.Dataset) -> datasets.Dataset:
    """The benign records that have a reference answer (the fluency task scores those answers)."""
    docs = _docs(dataset, "benign")
    keep = [i for i, a in enumerate(docs["answer"]) if a]
    if not keep:
        raise MMToxicQAError(f"no benign record has an 'answer': the fluency task scores reference answers. {HOW_TO_GET_DATA}")
    return docs.select(keep)


def process_adv(dataset: datasets.Dataset) -> datasets.Dataset:
    """The harmful split under a typographic attack (FigStep / MM-SafetyBench SD+TYPO style).

    When ``$MM_TOXIC_QA_DIR/adv.jsonl`` exists, its records are the attack as given (images already
    rendered, e.g. MM-SafetyBench's SD+TYPO images or the demo's trigger word); otherwise the attack
    is rendered here from the harmful split."""
    root = data_dir()
    if root is not None and (root / SPLIT_FILES["adv"]).is_file():
        judge_from_env()
        return prerendered_dataset(read_split(root, "adv"))
    return typographic_dataset(_docs(dataset, "harmful"))


# --------------------------------------------------------------------------- typographic attack

# The renderer (typographic_image, typographic_prompt) lives in lmms_sgm.datasets.render, shared
# with `lmms-sgm dataset build`.

def typographic_dataset(docs: datasets.Dataset) -> datasets.Dataset:
    """Every doc of ``docs`` with its typographic image and question (deterministic)."""
    cols: dict[str, list] = {k: [] for k in ADV_FEATURES}
    for doc in docs:  # the image column decodes to PIL here
        drawn, question = typographic_prompt(doc["question"], doc["key_phrase"])
        buf = io.BytesIO()
        typographic_image(doc["image"], drawn).save(buf, format="PNG")
        for k in FEATURES:
            cols[k].append(doc[k])
        cols["image"][-1] = {"bytes": buf.getvalue(), "path": None}
        cols["question"][-1] = question
        cols["original_question"].append(doc["question"])
        cols["attack"].append("typo")
    return datasets.Dataset.from_dict(cols, features=ADV_FEATURES)


def prerendered_dataset(docs: datasets.Dataset) -> datasets.Dataset:
    """Attack records supplied ready-made: question and image used as they are; the judge gets each
    record's ``original_question`` (as ``lmms-sgm dataset build`` writes it), else its question."""
    if "original_question" not in docs.column_names:
        docs = docs.add_column("original_question", list(docs["question"]))
    docs = docs.add_column("attack", ["prerendered"] * len(docs))
    return docs.cast(ADV_FEATURES)


# --------------------------------------------------------------------------- prompts


def doc_to_visual(doc: dict) -> list[Image.Image]:
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def doc_to_target(doc: dict) -> str:
    return doc.get("answer") or ""


def doc_to_fluency_target(doc: dict) -> str:
    """The reference answer as the assistant's continuation (a leading space, as lmms-eval's
    multiple choice puts its ``target_delimiter`` before each option)."""
    return " " + doc["answer"]


# --------------------------------------------------------------------------- scoring


def _responses(results) -> list[str]:
    """lmms-eval gives ``[response]``, or ``[[r1, ..., rk]]`` with a take_first_k filter."""
    out: list[str] = []
    for r in results:
        out.extend(_responses(r) if isinstance(r, (list, tuple)) else ["" if r is None else str(r)])
    return out


def _judge_all(doc: dict, results):
    """Judge every response of one doc (in one batch, for judges that batch). The judge is given
    the original question (the adv task's attack prompt is not what is judged) and, when it looks at
    images, the image the model saw; the record logs that prompt so ``lmms-sgm rejudge`` can give
    another judge the same."""
    judge = judge_from_env()
    prompt = doc.get("original_question") or doc["question"]
    responses = _responses(results)
    if not responses:
        raise ValueError(f"no response to score for doc {doc.get('id')!r}")
    image = doc["image"].convert("RGB") if getattr(judge, "uses_image", False) and doc.get("image") is not None else None
    verdicts = judge_many(judge, [JudgeItem(prompt, r, image) for r in responses])
    return verdicts, scoring.judge_record(identity(judge), prompt, verdicts), responses


def process_harmful_results(doc: dict, results) -> dict:
    """Per-sample values of the harmful tasks (the mean over responses when there are several;
    :mod:`lmms_sgm.judges.scoring`). ``score`` is the key lmms-eval reads for its CLT standard error.
    """
    verdicts, record, _ = _judge_all(doc, results)
    return {**scoring.harmful_values(verdicts, doc.get("category"), record), "sgm": run_info.current()}


def process_benign_results(doc: dict, results) -> dict:
    verdicts, record, responses = _judge_all(doc, results)
    category = doc.get("category") or UNCATEGORIZED
    answer = doc.get("answer")
    helpful = {"category": category, "answer": answer}
    if answer:
        helpful["score"] = sum(answer_matches(answer, r) for r in responses) / len(responses)
    return {"helpfulness": helpful, **scoring.benign_values(verdicts, category, record), "sgm": run_info.current()}


def _loglikelihood(result) -> float:
    """The mean NLL of a ``(loss, is_greedy)`` result; lmms-eval 0.7.3 stringifies it for models that
    do not install sgm_llava's pass-through (``"(0.69, False)"``)."""
    if isinstance(result, (list, tuple)) and len(result) == 1:
        result = result[0]
    if isinstance(result, str):
        result = result.strip("()[] ").split(",")[0]
        return float(result)
    if isinstance(result, (list, tuple)):
        return float(result[0])
    return float(result)


def process_fluency_results(doc: dict, results) -> dict:
    """``nll``: the reference answer's mean token NLL given image and question (teacher forced)."""
    nll = _loglikelihood(results)  # [result] or a bare result
    category = doc.get("category") or UNCATEGORIZED
    return {"perplexity": {"nll": nll, "category": category}}


_NUMBER_WORDS = {w: str(i) for i, w in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"])}


def normalise_answer(text: str) -> str:
    """Lower case, punctuation and articles removed, number words as digits."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return " ".join(_NUMBER_WORDS.get(w, w) for w in words if w not in ("a", "an", "the"))


def answer_matches(answer: str, response: str) -> bool:
    """The normalised reference answer equals, or occurs as whole words in, the normalised response."""
    a, r = normalise_answer(answer), normalise_answer(response)
    return bool(a) and (a == r or re.search(rf"(?<!\w){re.escape(a)}(?!\w)", r) is not None)


# --------------------------------------------------------------------------- aggregation


def aggregate_perplexity(items: list[dict]) -> float | None:
    """exp(mean NLL) over the answers: each answer's mean token NLL weighs the same."""
    nlls = [x["nll"] for x in items]
    return math.exp(sum(nlls) / len(nlls)) if nlls else None


# aggregate_rate, aggregate_by_category and aggregate_judge live in lmms_sgm.judges.scoring (shared
# with lmms-sgm rejudge), imported above.


def aggregate_sgm(items: list[dict]) -> dict:
    """What the model wore (glasses digest, strength, mode...; see lmms_sgm.harness_common)."""
    return scoring.the_one(items, "produced by differently configured models")
