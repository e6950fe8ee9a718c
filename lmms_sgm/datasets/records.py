"""What every source reader yields: one record of a public source, in source-neutral terms.

A reader (one module per source) turns its source's own layout into :class:`SourceRecord` s, one
at a time, and names the file and entry of anything it cannot read (:class:`DatasetError`). A
record may carry labelled texts for profiling (``pairs``), be an evaluation prompt (``prompt``),
or both; which of them is written depends on the split its group lands in (profile gets the
pairs, validation and test the prompts), see :mod:`lmms_sgm.datasets.splits`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from lmms_sgm.data import DataError

HARMFUL, BENIGN = "harmful", "benign"


class DatasetError(DataError):
    """A source or built dataset that cannot be used; the message names the file and entry."""


@dataclass(frozen=True)
class ImageInput:
    """An image as a source gives it: a file, or encoded bytes (a parquet Image column)."""

    path: Path | None = None
    data: bytes | None = None
    where: str = ""  # "<file>: <entry>", for error messages

    def describe(self) -> str:
        return str(self.path) if self.path is not None else "image bytes"


@dataclass
class SourceRecord:
    id: str  # unique within its source, e.g. "01-Illegal_Activitiy/0"
    image: ImageInput
    category: str
    where: str  # "<file>: <entry>", for error messages
    question: str | None = None  # the text shown with the image
    pairs: tuple[tuple[str, int], ...] = ()  # (text, label): 1 toxic, 0 non-toxic, for profiling
    prompt: str | None = None  # HARMFUL or BENIGN: an evaluation prompt
    key_phrase: str | None = None  # the harmful phrase (MM-SafetyBench), drawn by attacks
    answer: str | None = None  # benign prompts: a short reference answer (helpfulness)
    original_question: str | None = None  # the content question when `question` is a template
    attack_image: ImageInput | None = None  # the source's own adversarial image, if it has one
    attack_question: str | None = None  # the question asked with attack_image
    attack: str | None = None  # name of that attack, e.g. "mm-safetybench:SD_TYPO"
    extra: dict = field(default_factory=dict)  # source fields kept in the output, JSON-able

    def __post_init__(self):
        if self.prompt not in (None, HARMFUL, BENIGN):
            raise ValueError(f"prompt must be {HARMFUL!r}, {BENIGN!r} or None, got {self.prompt!r}")
        if not self.pairs and self.prompt is None:
            raise DatasetError(f"{self.where}: gives neither a labelled text nor an evaluation prompt")


def text_or_none(value) -> str | None:
    """A stripped string, or None for None / empty / NaN (pandas and CSV give those)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text or None
