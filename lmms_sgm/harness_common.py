"""What both harness adapters share, importing neither harness: ``sgm`` (lmms-eval,
``lmms_sgm/lmms``) and ``sgm_hf`` (lm-eval, ``lmms_sgm/lm_eval``), and the tasks of either.

**The current run's SGM identity.** lmms-eval 0.7.3 records only the literal ``--model_args``
string in results.json, never what the model resolved (the glasses digest, a cached profile_data
build). Both models :func:`publish` that here when they are constructed, and our tasks of either
harness report it (:func:`current`) as their ``sgm`` metric. lmms-eval builds the model before the
tasks load their data (``simple_evaluate``: model, then ``get_task_dict``), so the tasks can also ask
:func:`demo_data` whether the model is the bundled demo model, whose words the generic task samples
do not use: they then default to the demo's own test split.

**Model arguments back to strings** (:func:`as_string`): both harnesses' parsers turn "true"/"4"/"0.5"
into Python values; they go back to strings so that ``lmms_sgm.options.from_strings`` is the only
parser of our options.
"""
from __future__ import annotations

from pathlib import Path

_current: dict | None = None


def publish(info: dict) -> None:
    global _current
    _current = dict(info)


def current() -> dict:
    """The current run's SGM identity (what the tasks write into results.json, so secrets redacted:
    a model argument may carry a key or a URL with credentials), or a marker when the model is none
    of ours."""
    from lmms_sgm.redaction import redact

    return redact(dict(_current)) if _current is not None else {"model": "not sgm, sgm_llava or sgm_hf: no SGM identity"}


def demo_data() -> Path | None:
    """The bundled demo's data folder when the current model is the demo model (by its short name
    or its directory), else None."""
    from lmms_sgm.bundled import DEMO_DATA_DIR, is_demo_model

    pretrained = (_current or {}).get("pretrained")
    return DEMO_DATA_DIR if pretrained and is_demo_model(str(pretrained)) else None


def as_string(value) -> str:
    """A model argument as the string ``from_strings`` parses: booleans as ``true``/``false``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
