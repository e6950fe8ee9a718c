"""What the model of the current lmms-eval run is, for the tasks to act on and write into results.

lmms-eval 0.7.3 records only the literal ``--model_args`` string in results.json, never what the
model resolved (the glasses digest, a cached profile_data build). ``sgm`` (alias ``sgm_llava``; lmms-eval) and
``sgm_hf`` (lm-eval, ``lmms_sgm/lm_eval``) publish that here when they are constructed, and our
tasks of either harness report it as their ``sgm`` metric.

lmms-eval builds the model before the tasks load their data (``simple_evaluate``: model, then
``get_task_dict``), so the tasks can also ask :func:`demo_data` whether the model is the bundled
demo model, whose words the generic task samples do not use: they then default to the demo's
own test split. Imports nothing from lmms-eval.
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
    from lmms_sgm.demo import DATA_DIR, MODEL_DIR, SHORT_NAME

    pretrained = (_current or {}).get("pretrained")
    if not pretrained:
        return None
    if pretrained == SHORT_NAME:
        return DATA_DIR
    try:
        same = Path(pretrained).expanduser().resolve() == MODEL_DIR.resolve()
    except (OSError, ValueError):
        same = False
    return DATA_DIR if same else None
