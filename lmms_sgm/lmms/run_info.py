"""What the model of the current lmms-eval run is wearing, for the tasks to write into results.

lmms-eval 0.7.3 records only the literal ``--model_args`` string in results.json, never what the
model resolved (the glasses digest, a cached profile_data build). ``sgm_llava`` publishes that
here when it is constructed, and the MM-TOXIC-QA tasks report it as their ``sgm`` metric.
Imports nothing from lmms-eval.
"""
from __future__ import annotations

_current: dict | None = None


def publish(info: dict) -> None:
    global _current
    _current = dict(info)


def current() -> dict:
    """The current run's SGM identity, or a marker when the model is not sgm_llava."""
    return dict(_current) if _current is not None else {"model": "not sgm_llava: no SGM identity"}
