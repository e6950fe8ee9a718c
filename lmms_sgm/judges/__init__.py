"""Judges: call a model's response to a prompt safe or unsafe (method.md section 7).

A judge is anything with a ``name``, a ``version``, a ``config`` dict and a
``judge(prompt, response) -> JudgeResult`` method. Judges are contributed through the
``sgm_judges`` plugin hook (``{name: factory}``), our two built-ins included
(``lmms_sgm/judges/builtin.py``: ``refusal`` and ``lexicon``), so a third party adds one without
editing this package::

    from lmms_sgm.judges import get_judge
    judge = get_judge("lexicon", lexicon="my_words.txt")
    judge.judge("Describe the image.", "You stupid idiot.")  # JudgeResult(unsafe=True, ...)

The harmful rate depends heavily on the judge, so every result must name the judge that produced
it: :func:`identity` is what the lmms-eval tasks write into results.json.

The judge of an lmms-eval run is chosen by environment variables (lmms-eval 0.7.3 has no
command-line option that reaches a task's scoring functions): ``LMMS_SGM_JUDGE`` (default
``lexicon``) and ``LMMS_SGM_JUDGE_ARGS`` (``key=value,key=value``, given to the factory as
strings), read by :func:`judge_from_env`.

This package is core code: it does not import lmms_eval.
"""
from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

from lmms_sgm.plugins import collect_named

DEFAULT_JUDGE = "lexicon"
JUDGE_ENV = "LMMS_SGM_JUDGE"
JUDGE_ARGS_ENV = "LMMS_SGM_JUDGE_ARGS"


@dataclass(frozen=True)
class JudgeResult:
    """One verdict.

    ``unsafe``: the response is harmful (what the harmful rate counts). ``refusal``: the response
    declines the request (what the refusal and over-refusal rates count). ``score``: a
    judge-specific number behind the verdict (e.g. lexicon hits, a classifier probability), or
    None. ``reason``: a short human-readable explanation (what matched).
    """

    unsafe: bool
    refusal: bool
    score: float | None = None
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@runtime_checkable
class Judge(Protocol):
    """What a judge plugin's factory must return."""

    name: str
    version: str

    @property
    def config(self) -> dict:
        """The settings that change verdicts (e.g. a lexicon file and its digest); JSON-able."""

    def judge(self, prompt: str, response: str) -> JudgeResult: ...


class JudgeError(ValueError):
    """An unknown judge, or arguments a judge does not accept."""


def available() -> dict[str, Callable[..., Judge]]:
    """Every registered judge factory, by name (built-ins and plugins)."""
    return dict(sorted(collect_named("sgm_judges").items()))


def get_judge(name: str, **kwargs: Any) -> Judge:
    """Build the judge registered as ``name`` with ``kwargs``."""
    factories = available()
    if name not in factories:
        raise JudgeError(
            f"unknown judge {name!r}; available judges: {', '.join(factories) or '(none)'}. "
            "A plugin adds one through the sgm_judges hook (docs/extending.md)."
        )
    factory = factories[name]
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as e:
        raise JudgeError(f"judge {name!r} does not accept {sorted(kwargs)}: {e}; its signature is {name}{inspect.signature(factory)}") from None
    judge = factory(**kwargs)
    if not isinstance(judge, Judge):
        raise JudgeError(f"the factory of judge {name!r} returned {type(judge).__name__}, which lacks name/version/config/judge()")
    return judge


def parse_judge_args(text: str | None) -> dict[str, str]:
    """``"a=1,b=/x/y.txt"`` -> ``{"a": "1", "b": "/x/y.txt"}`` (the format of LMMS_SGM_JUDGE_ARGS)."""
    out: dict[str, str] = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise JudgeError(f"{JUDGE_ARGS_ENV}: expected key=value items separated by commas, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def judge_from_env(environ: dict | None = None) -> Judge:
    """The judge named by ``LMMS_SGM_JUDGE`` (default ``lexicon``) with ``LMMS_SGM_JUDGE_ARGS``.

    Built once per distinct setting and cached, so scoring thousands of responses builds it once.
    """
    env = os.environ if environ is None else environ
    return _cached_judge(env.get(JUDGE_ENV, "").strip() or DEFAULT_JUDGE, env.get(JUDGE_ARGS_ENV, "").strip())


@functools.lru_cache(maxsize=16)
def _cached_judge(name: str, args: str) -> Judge:
    return get_judge(name, **parse_judge_args(args))


def identity(judge: Judge) -> dict:
    """``{"name", "version", "config"}``: what results must carry to say which judge produced them."""
    return {"name": judge.name, "version": str(judge.version), "config": dict(judge.config)}


__all__ = [
    "DEFAULT_JUDGE",
    "JUDGE_ARGS_ENV",
    "JUDGE_ENV",
    "Judge",
    "JudgeError",
    "JudgeResult",
    "available",
    "get_judge",
    "identity",
    "judge_from_env",
    "parse_judge_args",
]
