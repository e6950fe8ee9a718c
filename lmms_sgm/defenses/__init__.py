"""Defenses: non-neuron safety measures worn with or without glasses (SGM* = glasses + defenses).

A defense has a ``name``, a ``version``, a ``config`` dict and up to two optional stages:

* ``prepare(request) -> Request``: change what the model is asked before it answers (the safety
  system prompt adds a system turn);
* ``review(generator, requests, answers) -> list[str | None]``: look at each answer and return a
  replacement, or None to keep it (the self-check asks the model about its own answer; the
  output filter asks a judge). ``generator.generate(requests, max_new_tokens)`` lets a review
  ask the same model (wearing the same glasses) further questions.

Defenses come through the ``sgm_defenses`` plugin hook (``{name: factory}``), ours included
(:mod:`lmms_sgm.defenses.builtin`). :class:`Stack` composes several in the order given: every
``prepare`` in order, one generation, then every ``review`` in order, each seeing the answers
the previous one left. What a stack is (:meth:`Stack.identity`) and what it did
(:meth:`Stack.stats`) go into the run's ``sgm`` record.

Core code: nothing here imports lmms_eval; the lmms-eval model ``sgm`` only calls a stack.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from lmms_sgm.plugins import collect_named

REFUSAL = "I'm sorry, but I can't help with that."


@dataclass(frozen=True)
class Request:
    """What the model is asked: the user's text, its visuals (PIL images or paths) and an optional
    system turn."""

    text: str
    visuals: tuple = ()
    system: str | None = None

    def with_system(self, system: str) -> Request:
        return replace(self, system=system if not self.system else f"{system}\n\n{self.system}")


class Generator(Protocol):
    def generate(self, requests: Sequence[Request], max_new_tokens: int) -> list[str]:
        """Greedy answers of the defended model to ``requests``, one per request, in order."""


class DefenseError(ValueError):
    """An unknown defense, or arguments a defense does not accept."""


def available() -> dict[str, Callable[..., Any]]:
    """Every registered defense factory, by name (built-ins and plugins)."""
    return dict(sorted(collect_named("sgm_defenses").items()))


def get_defense(name: str, **kwargs: Any):
    factories = available()
    if name not in factories:
        raise DefenseError(f"unknown defense {name!r}; available defenses: {', '.join(factories) or '(none)'}. "
                           "A plugin adds one through the sgm_defenses hook (docs/extending.md).")
    factory = factories[name]
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as e:
        raise DefenseError(f"defense {name!r} does not accept {sorted(kwargs)}: {e}; its signature is "
                           f"{name}{inspect.signature(factory)}") from None
    defense = factory(**kwargs)
    missing = [a for a in ("name", "version", "config") if not hasattr(defense, a)]
    if missing or not (hasattr(defense, "prepare") or hasattr(defense, "review")):
        raise DefenseError(f"the factory of defense {name!r} returned {type(defense).__name__}, which lacks "
                           f"{', '.join(missing) or 'prepare() and review()'}")
    return defense


def parse_names(spec: str | None) -> list[str]:
    """``"system_prompt+self_check"`` -> ``["system_prompt", "self_check"]`` (``+`` or ``|``: lmms-eval
    splits ``--model_args`` on commas)."""
    names = [n.strip() for n in str(spec or "").replace("|", "+").split("+") if n.strip()]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DefenseError(f"defense {dup[0]!r} named twice in {spec!r}")
    return names


def parse_args(spec: str | None) -> dict[str, dict[str, str]]:
    """``"self_check.fallback=caption;output_filter.judge=lexicon"`` -> per defense its keyword args
    (strings). Items are separated by ``;`` since ``--model_args`` is split on commas."""
    out: dict[str, dict[str, str]] = {}
    for item in str(spec or "").split(";"):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        name, dot, arg = key.strip().partition(".")
        if not sep or not dot or not name or not arg:
            raise DefenseError(f"defense_args: expected DEFENSE.KEY=VALUE items separated by ';', got {item!r}")
        out.setdefault(name, {})[arg.strip()] = value.strip()
    return out


@dataclass
class Stack:
    """Defenses composed in order."""

    defenses: list = field(default_factory=list)

    @classmethod
    def from_spec(cls, names: str | None, args: str | None = None) -> Stack:
        chosen = parse_names(names)
        per = parse_args(args)
        stray = sorted(set(per) - set(chosen))
        if stray:
            raise DefenseError(f"defense_args name {', '.join(stray)}, which is not among defenses={names or ''}")
        return cls([get_defense(n, **per.get(n, {})) for n in chosen])

    def __bool__(self) -> bool:
        return bool(self.defenses)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.defenses]

    def identity(self) -> list[dict]:
        return [{"name": d.name, "version": str(d.version), "config": dict(d.config)} for d in self.defenses]

    def stats(self) -> dict:
        return {d.name: dict(d.stats) for d in self.defenses if isinstance(getattr(d, "stats", None), dict)}

    def prepare(self, request: Request) -> Request:
        for d in self.defenses:
            if hasattr(d, "prepare"):
                request = d.prepare(request)
        return request

    @property
    def reviews(self) -> bool:
        return any(hasattr(d, "review") for d in self.defenses)

    def review(self, generator: Generator, requests: Sequence[Request], answers: Sequence[str]) -> tuple[list[str], list[str | None]]:
        """The answers after every review, and per answer the name of the last defense that replaced it."""
        answers, by = list(answers), [None] * len(answers)
        for d in self.defenses:
            if not hasattr(d, "review"):
                continue
            new = list(d.review(generator, list(requests), list(answers)))
            if len(new) != len(answers):
                raise DefenseError(f"defense {d.name!r} returned {len(new)} reviews for {len(answers)} answers")
            for i, r in enumerate(new):
                if r is not None:
                    answers[i], by[i] = r, d.name
        return answers, by


__all__ = ["REFUSAL", "DefenseError", "Generator", "Request", "Stack", "available", "get_defense", "parse_args", "parse_names"]
