"""The registry of source kinds, and ``KIND:PATH[,key=value...]`` source specifications.

Built-in kinds: ``mm-safetybench``, ``beavertails-v``, ``vlguard``, ``jsonl`` / ``csv`` (our own
schema) and ``model-outputs``. A third party adds a kind through the ``sgm_dataset_sources``
plugin hook (docs/extending.md), returning ``{kind: Source(...)}``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lmms_sgm.datasets import beavertails_v, mm_safetybench, model_outputs, ours, vlguard
from lmms_sgm.datasets.records import DatasetError, SourceRecord


@dataclass(frozen=True)
class Source:
    """A source kind: how to read it and what the dataset card says about it."""

    kind: str
    read: Callable[[Path, dict], Iterator[SourceRecord]]
    params: dict[str, str]  # accepted key -> help; "prefix.<arg>" accepts any "prefix.x"
    licence: str
    url: str
    summary: str
    describe: Callable[[Path, dict], dict] | None = None  # extra manifest facts (e.g. the judge)


BUILTIN: dict[str, Source] = {
    s.kind: s
    for s in (
        Source("mm-safetybench", mm_safetybench.read, mm_safetybench.PARAMS, mm_safetybench.LICENCE, mm_safetybench.URL,
               "harmful prompts (SD image + rephrased question), SD_TYPO attack images; no profiling pairs"),
        Source("beavertails-v", beavertails_v.read, beavertails_v.PARAMS, beavertails_v.LICENCE, beavertails_v.URL,
               "toxic and non-toxic responses about harmful images (profiling pairs), harmful prompts"),
        Source("vlguard", vlguard.read, vlguard.PARAMS, vlguard.LICENCE, vlguard.URL,
               "benign prompts on safe images (over-refusal), harmful prompts, non-toxic answers"),
        Source("jsonl", ours.read, ours.PARAMS, ours.LICENCE, ours.URL,
               "your own records: profiling pairs (text, label) and/or prompts (harmful, question)"),
        Source("csv", ours.read, ours.PARAMS, ours.LICENCE, ours.URL,
               "your own records, as CSV"),
        Source("model-outputs", model_outputs.read, model_outputs.PARAMS, model_outputs.LICENCE, model_outputs.URL,
               "profiling pairs from a model's answers in an lmms-eval samples file, labelled by a judge",
               describe=model_outputs.describe),
    )
}


def available() -> dict[str, Source]:
    """Built-in kinds and those of plugins (``sgm_dataset_sources``)."""
    from lmms_sgm.plugins import collect_named

    kinds = dict(BUILTIN)
    for kind, source in collect_named("sgm_dataset_sources").items():
        if kind in kinds and kinds[kind] is not source:
            raise DatasetError(f"a plugin registers the dataset source kind {kind!r}, which is built in")
        kinds[kind] = source
    return kinds


@dataclass(frozen=True)
class SourceSpec:
    kind: str
    path: Path
    params: dict[str, str] = field(default_factory=dict)
    text: str = ""  # as given

    @property
    def source(self) -> Source:
        return BUILTIN[self.kind] if self.kind in BUILTIN else available()[self.kind]


def parse_source(text: str) -> SourceSpec:
    """``"beavertails-v:/data/bt,split=train"`` -> SourceSpec; every part is checked here."""
    kind, sep, rest = text.partition(":")
    kind = kind.strip()
    # Plugins are looked up only for a kind that is not built in: loading them imports every
    # plugin module (the architecture adapters import torch, seconds of start-up).
    kinds = BUILTIN if kind in BUILTIN else available()
    if not sep or kind not in kinds:
        raise DatasetError(f"--source {text!r}: expected KIND:PATH[,key=value...] with KIND one of {', '.join(kinds)}")
    path_text, *items = rest.split(",")
    if not path_text.strip():
        raise DatasetError(f"--source {text!r}: no PATH after {kind}:")
    source = kinds[kind]
    params: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip()
        prefixes = [p[: -len("<arg>")] for p in source.params if p.endswith("<arg>")]
        if not eq or not key or (key not in source.params and not any(key.startswith(p) and len(key) > len(p) for p in prefixes)):
            raise DatasetError(f"--source {text!r}: {item!r} is not a parameter of {kind} (accepted: {', '.join(source.params) or 'none'})")
        if key in params:
            raise DatasetError(f"--source {text!r}: {key} given twice")
        params[key] = value.strip()
    path = Path(path_text.strip()).expanduser()
    if not path.exists():
        raise DatasetError(f"--source {text!r}: {path} does not exist")
    return SourceSpec(kind=kind, path=path, params=params, text=text)
