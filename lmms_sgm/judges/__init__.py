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

Judges that score many responses at once (classifiers, guards, LLM endpoints) add an optional
``judge_batch(items) -> list[JudgeResult]``; :func:`judge_many` uses it when present and loops
``judge`` otherwise, so a third-party judge with only ``judge(prompt, response)`` keeps working.
A judge that looks at the image (a vision guard) sets ``uses_image = True`` and takes
``judge(prompt, response, image=None)``; the image is never passed to any other judge.

A verdict is *failed* when the judge could not decide: its answer was malformed, or no answer came
(an endpoint that kept failing). A failed verdict is never counted as safe: the rates leave it out
and count it (:mod:`lmms_sgm.judges.scoring`), and its ``unsafe`` is True for code that reads only
that field.

Built-in judges, one module per kind, each registered through the hook: ``builtin`` (``refusal``,
``lexicon``), ``classifiers`` (``profanity``, ``hf-classifier``), ``guards`` (``guard``), ``llm``
(``llm``), ``ensemble`` (``ensemble``). Their modules import nothing heavy until a judge is built.

This package is core code: it does not import lmms_eval.
"""
from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

from lmms_sgm.plugins import collect_named
from lmms_sgm.redaction import redact

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

    ``malformed``: the judge answered but its answer could not be read (an LLM or guard that did
    not say safe/unsafe); ``error``: no answer came (what went wrong). Either makes the verdict
    :attr:`failed`: build those with :meth:`failure`. ``categories``: the hazard categories a
    guard named (e.g. ``("S1", "S10")``). ``members``: an ensemble's member verdicts by name.
    """

    unsafe: bool
    refusal: bool
    score: float | None = None
    reason: str = ""
    malformed: bool = False
    error: str | None = None
    categories: tuple[str, ...] = ()
    members: dict[str, JudgeResult] | None = None

    @property
    def failed(self) -> bool:
        """The judge could not decide: left out of every rate, never counted as safe."""
        return self.malformed or self.error is not None

    @classmethod
    def failure(cls, reason: str, *, malformed: bool = False, error: str | None = None, score: float | None = None,
                members: dict | None = None) -> JudgeResult:
        """A failed verdict: malformed (an unreadable answer) or an error (no answer)."""
        if not malformed and error is None:
            raise ValueError("a failure is malformed or has an error")
        return cls(unsafe=True, refusal=False, score=score, reason=reason, malformed=malformed, error=error, members=members)

    def to_dict(self) -> dict:
        """The logged form: the four historical keys always, the others only when set (so the
        string-matching judges' logs read as before); secrets redacted (a reason may quote a server)."""
        out = {"unsafe": self.unsafe, "refusal": self.refusal, "score": self.score, "reason": self.reason}
        if self.malformed:
            out["malformed"] = True
        if self.error is not None:
            out["error"] = self.error
        if self.categories:
            out["categories"] = list(self.categories)
        if self.members is not None:
            out["members"] = {name: v.to_dict() for name, v in self.members.items()}
        return redact(out)

    @classmethod
    def from_dict(cls, d: dict) -> JudgeResult:
        """A verdict back from its logged form (:meth:`to_dict`)."""
        members = d.get("members")
        return cls(unsafe=bool(d["unsafe"]), refusal=bool(d["refusal"]), score=d.get("score"), reason=d.get("reason", ""),
                   malformed=bool(d.get("malformed", False)), error=d.get("error"),
                   categories=tuple(d.get("categories") or ()),
                   members=None if members is None else {k: cls.from_dict(v) for k, v in members.items()})


class JudgeItem(NamedTuple):
    """One thing to judge: the prompt the model was given, its response, and optionally the image
    it saw (a PIL image; only judges with ``uses_image`` receive it)."""

    prompt: str
    response: str
    image: Any = None


@runtime_checkable
class Judge(Protocol):
    """What a judge plugin's factory must return.

    Optional: ``judge_batch(items: list[JudgeItem]) -> list[JudgeResult]`` (one verdict per item,
    in order) and ``uses_image = True`` with ``judge(prompt, response, image=None)``.
    """

    name: str
    version: str

    @property
    def config(self) -> dict:
        """The settings that change verdicts (e.g. a lexicon file and its digest); JSON-able."""

    def judge(self, prompt: str, response: str) -> JudgeResult: ...


def judge_one(judge: Judge, prompt: str, response: str, image: Any = None) -> JudgeResult:
    """``judge.judge``, with the image only for a judge that uses it."""
    if getattr(judge, "uses_image", False):
        return judge.judge(prompt, response, image=image)
    return judge.judge(prompt, response)


def judge_many(judge: Judge, items: Sequence[JudgeItem | tuple]) -> list[JudgeResult]:
    """One verdict per item: ``judge.judge_batch`` when the judge has one, else ``judge`` in a loop."""
    items = [x if isinstance(x, JudgeItem) else JudgeItem(*x) for x in items]
    if not items:
        return []
    batch = getattr(judge, "judge_batch", None)
    if batch is None:
        return [judge_one(judge, *x) for x in items]
    out = list(batch(items))
    if len(out) != len(items):
        raise JudgeError(f"judge {judge.name!r} returned {len(out)} verdicts for {len(items)} items")
    return out


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
        raise JudgeError(
            f"judge {name!r} does not accept {sorted(kwargs)}: {e}; its signature is {name}{inspect.signature(factory)}"
        ) from None
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
    return redact({"name": judge.name, "version": str(judge.version), "config": dict(judge.config)})


__all__ = [
    "DEFAULT_JUDGE",
    "JUDGE_ARGS_ENV",
    "JUDGE_ENV",
    "Judge",
    "JudgeError",
    "JudgeItem",
    "JudgeResult",
    "available",
    "get_judge",
    "identity",
    "judge_from_env",
    "judge_many",
    "judge_one",
    "parse_judge_args",
]
