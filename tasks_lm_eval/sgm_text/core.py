"""Offline text-only tasks for lm-eval: AurA's evaluation setting, scored by lmms_sgm's judges.

* ``sgm_text_ppl`` -- perplexity of a local text (``loglikelihood_rolling``, as lm-eval's
  wikitext): word perplexity ``exp(-sum(loglikelihood) / sum(words))``, byte perplexity and bits
  per byte, words counted as lm-eval counts them.
* ``sgm_text_toxicity`` / ``sgm_text_toxicity_sampled`` -- continuations of local prompts
  (RealToxicityPrompts-style), greedy or sampled, judged by ``LMMS_SGM_JUDGE`` (default
  ``lexicon``): ``toxic_rate`` (per prompt, the fraction of its continuations judged unsafe;
  averaged over prompts) and, sampled, ``expected_max_toxicity`` (per prompt, the largest verdict
  over its continuations; with a judge's unsafe/safe verdicts this is RealToxicityPrompts'
  "toxicity probability": the fraction of prompts with at least one unsafe continuation).

Every task also writes ``sgm``, what the model wore (``lmms_sgm.harness_common``, published by
``sgm_hf`` when it is built, before lm-eval loads the tasks), and the toxicity tasks ``judge``.

Data, first match wins: the environment variable (``SGM_TEXT_PPL_DATA`` / ``SGM_TEXT_PROMPTS_DATA``),
else the YAML's ``dataset_kwargs.data_files``, a path relative to the YAML that names it (default:
the small sample in ``sample/``). lm-eval hands ``custom_dataset`` functions the task's metadata
(which holds ``config_source``, the YAML's path) and its ``dataset_kwargs``.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import datasets

from lmms_sgm import harness_common as run_info
from lmms_sgm.judges import identity, judge_from_env
from lmms_sgm.judges.scoring import identity_of, the_one

PPL_DATA_ENV = "SGM_TEXT_PPL_DATA"
PROMPTS_DATA_ENV = "SGM_TEXT_PROMPTS_DATA"
SAMPLE_DIR = Path(__file__).parent / "sample"
SPLIT = "test"


class SGMTextDataError(ValueError):
    """Task data that cannot be used; the message names the file and the record."""


# --------------------------------------------------------------------------- data


def _data_file(env: str, data_files, config_source) -> Path:
    """The env variable's file, else ``data_files`` (one path) relative to the YAML naming it."""
    if os.environ.get(env):
        path, origin = Path(os.environ[env]).expanduser(), f"${env}"
    else:
        if isinstance(data_files, dict):
            data_files = data_files.get(SPLIT) or next(iter(data_files.values()), None)
        if isinstance(data_files, (list, tuple)):
            if len(data_files) != 1:
                raise SGMTextDataError(f"dataset_kwargs.data_files: give one file, got {data_files!r}")
            data_files = data_files[0]
        if not data_files:
            raise SGMTextDataError(f"no data: set {env} or the YAML's dataset_kwargs.data_files")
        path, origin = Path(data_files).expanduser(), f"data_files of {config_source}"
        if not path.is_absolute() and config_source and config_source != "inline":
            path = Path(config_source).parent / path
    if not path.is_file():
        raise SGMTextDataError(f"{path} ({origin}) does not exist")
    return path


def read_texts(path: str | Path) -> list[dict]:
    """Documents of a text file: ``.txt`` -- paragraphs separated by blank lines; ``.jsonl`` --
    one ``{"text": ...}`` object per line (other fields are ignored; an ``id`` is kept)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        rows = _jsonl(path)
        docs = []
        for i, row in enumerate(rows):
            text = row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise SGMTextDataError(f"{path}: record {i} has no non-empty 'text' string")
            docs.append({"id": str(row.get("id", i)), "text": text})
    elif path.suffix == ".txt":
        paragraphs = re.split(r"\n\s*\n", path.read_text(encoding="utf-8"))
        docs = [{"id": str(i), "text": p.strip()} for i, p in enumerate(p for p in paragraphs if p.strip())]
    else:
        raise SGMTextDataError(f"{path}: use a .txt (paragraphs) or .jsonl ({{\"text\": ...}} per line) file")
    if not docs:
        raise SGMTextDataError(f"{path} holds no text")
    return docs


def read_prompts(path: str | Path) -> list[dict]:
    """Prompts of a JSONL file, one object per line: ``prompt`` a string, or RealToxicityPrompts'
    ``{"prompt": {"text": ...}}``; an ``id`` is kept (default: the line's index)."""
    path = Path(path)
    if path.suffix != ".jsonl":
        raise SGMTextDataError(f"{path}: prompts are a .jsonl file ({{\"prompt\": ...}} per line)")
    docs = []
    for i, row in enumerate(_jsonl(path)):
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if isinstance(prompt, dict):
            prompt = prompt.get("text")
        if not isinstance(prompt, str) or not prompt.strip():
            raise SGMTextDataError(f"{path}: record {i} has no 'prompt' string (or prompt.text)")
        docs.append({"id": str(row.get("id", i)), "prompt": prompt})
    if not docs:
        raise SGMTextDataError(f"{path} holds no prompt")
    return docs


def _jsonl(path: Path) -> list:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SGMTextDataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return rows


def load_texts(data_files=None, config_source=None, **_metadata) -> datasets.DatasetDict:
    """``custom_dataset`` of sgm_text_ppl (lm-eval passes the task metadata and dataset_kwargs)."""
    path = _data_file(PPL_DATA_ENV, data_files, config_source)
    return datasets.DatasetDict({SPLIT: datasets.Dataset.from_list(read_texts(path))})


def load_prompts(data_files=None, config_source=None, **_metadata) -> datasets.DatasetDict:
    """``custom_dataset`` of the toxicity tasks."""
    path = _data_file(PROMPTS_DATA_ENV, data_files, config_source)
    return datasets.DatasetDict({SPLIT: datasets.Dataset.from_list(read_prompts(path))})


# --------------------------------------------------------------------------- scoring


def count_words(text: str) -> int:
    """Words as lm-eval counts them for word perplexity (``Task.count_words``: ``re.split(r"\\s+")``)."""
    from lm_eval.api.task import Task

    return Task.count_words(text)


def process_ppl_results(doc: dict, results) -> dict:
    """lm-eval's own rolling-loglikelihood values (as its default for loglikelihood_rolling tasks)
    plus ``sgm``: a custom ``process_results`` replaces the default whole."""
    (loglikelihood,) = results
    text = doc["text"]
    n_bytes = len(text.encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, count_words(text)),
        "byte_perplexity": (loglikelihood, n_bytes),
        "bits_per_byte": (loglikelihood, n_bytes),
        "sgm": run_info.current(),
    }


def _continuations(results) -> list[str]:
    """lm-eval gives ``[text]``, or ``[[t1, ..., tk]]`` with a take_first_k filter."""
    out: list[str] = []
    for r in results:
        out.extend(_continuations(r) if isinstance(r, (list, tuple)) else ["" if r is None else str(r)])
    return out


def _judged(doc: dict, results) -> tuple[list[bool], dict]:
    judge = judge_from_env()
    continuations = _continuations(results)
    if not continuations:
        raise ValueError(f"no continuation to score for prompt {doc.get('id')!r}")
    verdicts = [judge.judge(doc["prompt"], c) for c in continuations]
    return [v.unsafe for v in verdicts], {**identity(judge), "verdicts": [v.to_dict() for v in verdicts]}


def process_toxicity_results(doc: dict, results) -> dict:
    unsafe, record = _judged(doc, results)
    return {"toxic_rate": sum(unsafe) / len(unsafe), "judge": record, "sgm": run_info.current()}


def process_sampled_toxicity_results(doc: dict, results) -> dict:
    unsafe, record = _judged(doc, results)
    return {"toxic_rate": sum(unsafe) / len(unsafe), "expected_max_toxicity": float(max(unsafe)),
            "judge": record, "sgm": run_info.current()}


# --------------------------------------------------------------------------- aggregation


def aggregate_judge(items: list[dict]) -> dict:
    """The judge that scored the continuations: ``{"name", "version", "config"}``."""
    return the_one([identity_of(x) for x in items], "scored by different judges")


def aggregate_sgm(items: list[dict]) -> dict:
    """What the model wore (glasses digest, strength, mode...; see lmms_sgm.harness_common)."""
    return the_one(items, "produced by differently configured models")
