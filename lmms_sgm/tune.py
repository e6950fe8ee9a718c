"""Choosing SGM's options per model, on that model's validation split (``lmms-sgm tune``).

Which options work does not carry over between models (docs/diagnosis.md), so the choice is
made on the model itself: every configuration of a grid is built, worn and evaluated on a
validation split with :func:`lmms_sgm.evaluate.evaluate`, and one is picked by a fixed rule.

A configuration is a profiling set (a name for a pairs file; ``self`` for the model's own
answers labelled by a judge), profiling options, selection options and a strength. Each distinct
(profiling set, profiling options) is profiled once; its AUROCs and non-toxic means are kept
(``profiles/<n>/``, glasses that ``lmms-sgm select`` re-selects), so every selection option is
a re-selection without a forward pass.

The rule (:class:`~lmms_sgm.options.RuleOptions`, the one of reports and the demo; :func:`choose`):
the lowest ``metric`` (sampled harmful rate) among the configurations that keep every capability
measure at >= ``retention`` of vanilla, add at most ``over_refusal_points`` percentage points of
over-refusal, and lower the metric below vanilla's. None qualifying is
a result too: then no option helps on this model, and tune says so and writes no glasses.
"""
from __future__ import annotations

import contextlib
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from lmms_sgm.evaluate import COLUMNS, ValidationSet, answer_perplexity, evaluate
from lmms_sgm.options import (
    ProfileOptions,
    RuleOptions,
    SelectionOptions,
    SteeringOptions,
    from_strings,
    rule_to_dict,
    to_dict,
)

CAPABILITY = ("capability_open", "capability_mc")
QR = "question+response"
# Fluency of the safe answers to the harmful prompts (those the judge does not flag): their
# perplexity under the unmodified model (lmms_sgm.evaluate.answer_perplexity), vanilla's own safe
# answers being the reference. Capability is measured on benign inputs, where a gate is closed:
# only this column sees an intervention that removes toxic words by breaking the language (word
# salad is "safe" to a toxicity judge).
FLUENCY = "harmful_safe_ppl"
KINDS = ("sgm", "steering", "glasses")


@dataclass(frozen=True)
class Config:
    """One option to try: where it is profiled, what is selected, how strongly it is worn.

    ``kind="steering"``: gated-steering glasses (docs/steering.md) instead of SGM's: ``data`` names
    the steer's answer pairs, ``gate_data`` the gate's input-contrast pairs (None with
    ``steer.gated=False``), ``steer`` the options; ``profile`` and ``select`` are unused.
    ``kind="glasses"``: glasses already built, of any kind (a plugin's too), read from the
    directory ``glasses`` by :func:`lmms_sgm.load_glasses`; ``data`` is unused (``""``)."""

    name: str
    data: str  # a profiling set's name
    profile: ProfileOptions = field(default_factory=ProfileOptions)
    select: SelectionOptions = field(default_factory=SelectionOptions)
    strength: float = 1.0
    kind: str = "sgm"
    gate_data: str | None = None
    steer: SteeringOptions | None = None
    glasses: str | None = None  # kind "glasses": their directory

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"configuration {self.name!r}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if (self.kind == "glasses") != (self.glasses is not None):
            raise ValueError(f"configuration {self.name!r}: glasses=DIR belongs to kind 'glasses', which needs it")
        if self.kind == "steering":
            if self.steer is None:
                object.__setattr__(self, "steer", SteeringOptions())
            if self.steer.gated and self.gate_data is None:
                raise ValueError(f"configuration {self.name!r}: gated steering needs gate_data (a profiling set of "
                                 "input-contrast pairs), or steer.gated=false")
        elif self.gate_data is not None or self.steer is not None:
            raise ValueError(f"configuration {self.name!r}: gate_data and steer belong to kind 'steering'")

    def sets(self) -> set[str]:
        """The profiling sets this configuration reads."""
        if self.kind == "glasses":
            return set()
        return {self.data} | ({self.gate_data} if self.gate_data else set())

    def to_dict(self) -> dict:
        if self.kind == "glasses":
            return {"name": self.name, "kind": "glasses", "glasses": self.glasses, "strength": self.strength}
        if self.kind == "steering":
            return {"name": self.name, "kind": "steering", "data": self.data, "gate_data": self.gate_data,
                    "steer": to_dict(self.steer), "strength": self.strength}
        return {"name": self.name, "data": self.data, "profile": to_dict(self.profile),
                "select": to_dict(self.select), "strength": self.strength}

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        kind = d.get("kind", "sgm")
        if kind == "glasses":
            unknown = sorted(set(d) - {"name", "kind", "glasses", "strength"})
            if unknown or "name" not in d or "glasses" not in d:
                raise ValueError(f"a grid entry of kind glasses needs name and glasses (and optionally strength); got "
                                 f"{sorted(d)}")
            return cls(d["name"], "", strength=float(d.get("strength", 1.0)), kind="glasses", glasses=str(d["glasses"]))
        allowed = {"name", "data", "strength", "kind"} | ({"gate_data", "steer"} if kind == "steering" else
                                                          {"profile", "select"})
        unknown = sorted(set(d) - allowed)
        if unknown or "name" not in d or "data" not in d:
            raise ValueError(f"a grid entry needs name and data (and optionally profile, select, strength; with "
                             f"kind=steering: gate_data, steer); got {sorted(d)}")
        if kind == "steering":
            return cls(d["name"], d["data"], strength=float(d.get("strength", 1.0)), kind="steering",
                       gate_data=d.get("gate_data"), steer=from_strings(SteeringOptions, d.get("steer", {})))
        return cls(d["name"], d["data"], from_strings(ProfileOptions, d.get("profile", {})),
                   from_strings(SelectionOptions, d.get("select", {})), float(d.get("strength", 1.0)), kind=kind)


DEFAULT_METRIC = "harmful_sampled"


def metric_of(rule: RuleOptions) -> str:
    """The measure ``rule`` minimises in tune's rows (its ``metric``, else the sampled harmful rate)."""
    return rule.metric or DEFAULT_METRIC


def describe(rule: RuleOptions) -> str:
    fluency = ("" if not rule.fluency_ratio else
               f", the perplexity of its safe answers to the harmful prompts under the unmodified model within "
               f"{rule.fluency_ratio:g}x that of vanilla's safe answers")
    return (f"lowest {metric_of(rule)} among the options keeping every capability measure >= {rule.retention:.0%} of "
            f"vanilla and over-refusal within +{rule.over_refusal_points:g} points{fluency}, and lower than "
            "vanilla's")


def admissible(rule: RuleOptions, row: dict, base: dict) -> bool:
    m = metric_of(rule)
    if row.get(m) is None or not row[m] < base[m]:
        return False
    if any(c in base and row.get(c, 0.0) < rule.retention * base[c] for c in CAPABILITY):
        return False
    if rule.fluency_ratio and base.get(FLUENCY) is not None and \
            not row.get(FLUENCY, float("inf")) <= rule.fluency_ratio * base[FLUENCY]:
        return False
    # over_refusal is a rate (a fraction); the allowance is in points
    return "over_refusal" not in base or row.get("over_refusal", 1.0) <= base["over_refusal"] + rule.over_refusal_fraction


def choose(rule: RuleOptions, rows: dict) -> str | None:
    """The chosen configuration's name in ``rows`` (which holds ``vanilla``), or None."""
    base = rows["vanilla"]
    ok = [n for n, r in rows.items() if n != "vanilla" and admissible(rule, r, base)]
    return min(ok, key=lambda n: rows[n][metric_of(rule)], default=None)


@dataclass(frozen=True)
class _DeprecatedRule(RuleOptions):
    """What :func:`Rule` returns: a RuleOptions (points) with the methods the old class had."""

    def describe(self) -> str:
        return describe(self)

    def admissible(self, row: dict, base: dict) -> bool:
        return admissible(self, row, base)

    def choose(self, rows: dict) -> str | None:
        return choose(self, rows)


def Rule(metric: str = DEFAULT_METRIC, retention: float = 0.95, over_refusal_points: float = 0.02,
         fluency_ratio: float = 2.0) -> RuleOptions:
    """Deprecated (one release): :class:`~lmms_sgm.options.RuleOptions` with :func:`choose`.
    Here ``over_refusal_points`` is still the old fraction (0.02 = 2 points), converted."""
    warnings.warn("lmms_sgm.tune.Rule is deprecated: use lmms_sgm.options.RuleOptions (over_refusal_points in "
                  "percentage points: 2.0, not 0.02) and lmms_sgm.tune.choose(rule, rows)", DeprecationWarning, stacklevel=2)
    return _DeprecatedRule(metric, retention, 100 * over_refusal_points, fluency_ratio)


def default_grid(sets: dict[str, object], *, with_questions: dict[str, bool] | None = None) -> list[Config]:
    """A small grid: the paper's default and the options that helped somewhere (docs/diagnosis.md),
    for every profiling set; at the response positions too where the pairs carry questions."""
    selections = {
        "suppress (paper)": SelectionOptions(),
        "precursor threshold 0.3": SelectionOptions(threshold=0.3),
        "amplify anti-toxic": SelectionOptions(direction="amplify"),
        "towards non-toxic mean": SelectionOptions(towards="nontoxic_mean"),
    }
    grid = []
    for name in sets:
        profiles = {"response text": ProfileOptions()}
        if (with_questions or {}).get(name, False):
            profiles["q+r, response positions"] = ProfileOptions(text_field=QR, positions="response")
        for pname, po in profiles.items():
            for sname, so in selections.items():
                grid.append(Config(f"{name}, {pname}, {sname}", name, po, so))
    return grid


def read_grid(path) -> list[Config]:
    """A JSON list of ``{"name", "data", "profile": {...}, "select": {...}, "strength"}``."""
    from lmms_sgm import textfiles

    path = Path(path)
    entries = textfiles.read_json(path, "--grid file")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: a grid is a non-empty JSON list of configurations")
    grid = [Config.from_dict(e) for e in entries]
    names = [c.name for c in grid]
    if len(set(names)) != len(names) or "vanilla" in names:
        raise ValueError(f"{path}: configuration names must be unique and not 'vanilla'")
    return grid


def self_label_set(model, processor, prompts, judge, out: Path, *, samples: int = 4, batch_size: int = 8,
                   seed: int = 0, max_new_tokens: int = 32, progress: bool = False) -> Path:
    """The model's own sampled answers to ``prompts`` (MM-TOXIC-QA JSONL files), labelled by
    ``judge``, written to ``out`` (kept: a second run reuses them)."""
    from lmms_sgm.selflabel import label_generations, read_prompts, write_pairs

    if (out / "pairs.jsonl").is_file():
        return out / "pairs.jsonl"
    records = [r for p in ([prompts] if isinstance(prompts, (str, Path)) else prompts) for r in read_prompts(p)]
    pairs = label_generations(model, processor, records, judge, samples=samples, batch_size=batch_size, seed=seed,
                              max_new_tokens=max_new_tokens, progress=progress)
    return write_pairs(pairs, out, judge=judge)


def profiled(model, processor, pairs, options: ProfileOptions, *, progress: bool = False):
    """Profile once: ``(glasses with the default selection, pooled-response store)``.

    The store stays open: a gated selection (``gate=evidence``) chooses its thresholds on it;
    the caller closes it."""
    from lmms_sgm.expertise import expertise, nontoxic_mean
    from lmms_sgm.interventions.sgm import SafetyGlasses
    from lmms_sgm.profiling import profile

    sites, store = profile(model, processor, pairs, options, progress=progress)
    aurocs = expertise(store, sites, pairs.labels, progress=False)
    means = nontoxic_mean(store, sites, pairs.labels)
    glasses = SafetyGlasses.from_expertise(sites, aurocs, SelectionOptions(), model=model, profile_options=options,
                                           data_digest=pairs.digest(), data_counts=pairs.counts(), mean_nontoxic=means)
    return glasses, store


@dataclass
class TuneResult:
    rows: dict  # name -> measures ("vanilla" first)
    chosen: str | None
    rule: RuleOptions
    glasses: dict  # name -> SafetyGlasses
    configs: list[Config]
    seconds: float
    profiles: dict = field(default_factory=dict)  # (set, ProfileOptions) -> glasses holding its AUROCs and means

    def verdict(self) -> str:
        """One sentence: what was chosen and what it does, or that nothing helps."""
        m = metric_of(self.rule)
        v = self.rows["vanilla"][m]
        if self.chosen is None:
            best = min((n for n in self.rows if n != "vanilla"), key=lambda n: self.rows[n][m], default=None)
            tail = "" if best is None else (f" (the lowest {m} of any option, side conditions aside: {best}, "
                                            f"{v:.3f} -> {self.rows[best][m]:.3f})")
            return f"no option helps on this model by the rule ({describe(self.rule)}){tail}; no glasses written"
        c = self.rows[self.chosen][m]
        return f"chosen: {self.chosen}: {m} {v:.3f} -> {c:.3f} ({c / v - 1:+.0%}) on the validation split" if v else \
            f"chosen: {self.chosen}: {m} {v:.3f} -> {c:.3f}"

    def table(self, columns=(*COLUMNS, FLUENCY)) -> str:
        base = self.rows["vanilla"]
        cols = [c for c in columns if c in base]
        lines = [f"| configuration | experts | {' | '.join(cols)} |", "|---|---|" + "---|" * len(cols)]
        for name, r in self.rows.items():
            cells = []
            for c in cols:
                cell = "" if r.get(c) is None else f"{r[c]:.3f}"
                if c == metric_of(self.rule) and name != "vanilla" and base.get(c):
                    cell += f" ({r[c] / base[c] - 1:+.0%})"
                cells.append(cell)
            shown = f"**{name}**" if name == self.chosen else name
            lines.append(f"| {shown} | {r.get('experts', 0)} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def tune(model, processor, sets: dict, configs: list[Config], val: ValidationSet, judge, *, rule: RuleOptions = RuleOptions(),
         samples: int = 5, seed: int = 0, log=None) -> TuneResult:
    """Build, wear (hooks) and evaluate every configuration; choose one by ``rule``.

    ``sets``: profiling-set name -> pairs (a path, a list of dicts or a PairDataset)."""
    from lmms_sgm.data import load_pairs

    missing = sorted(set().union(*(c.sets() for c in configs)) - set(sets))
    if missing:
        raise ValueError(f"the grid names profiling set(s) {', '.join(missing)}, not given (given: {', '.join(sets) or 'none'})")
    log = log or (lambda s: None)
    t0 = time.time()
    rows = {"vanilla": {"experts": 0, **_measured(model, processor, val, judge, samples, seed, contextlib.nullcontext())}}
    log(f"[{time.time() - t0:.0f}s] vanilla: {_brief(rows['vanilla'])}")
    loaded = {name: load_pairs(sets[name]) for name in set().union(*(c.sets() for c in configs))}
    bases: dict = {}
    stores: dict = {}
    steering: dict = {}
    built: dict = {}
    try:
        for c in configs:
            if c.kind == "steering":
                glasses = _steering(model, processor, c, loaded, steering)
                experts = 0
            elif c.kind == "glasses":
                from lmms_sgm.interventions.base import load_glasses

                glasses = load_glasses(c.glasses)
                experts = glasses.counts()["experts"] if glasses.has_experts else 0
            else:
                key = (c.data, c.profile)
                if key not in bases:
                    bases[key], stores[key] = profiled(model, processor, loaded[c.data], c.profile)
                glasses = bases[key].reselect(c.select, store=stores[key], labels=loaded[c.data].labels)
                experts = glasses.counts()["experts"]
            built[c.name] = glasses
            worn = glasses.apply(model, strength=c.strength, mode="hooks")
            rows[c.name] = {"experts": experts, **_measured(model, processor, val, judge, samples, seed, worn)}
            log(f"[{time.time() - t0:.0f}s] {c.name}: {_brief(rows[c.name])}")
    finally:
        for store in stores.values():
            store.close()
    return TuneResult(rows, choose(rule, rows), rule, built, list(configs), time.time() - t0, bases)


def _measured(model, processor, val: ValidationSet, judge, samples: int, seed: int, worn) -> dict:
    """:func:`evaluate` with the glasses ``worn`` (a context manager), then the fluency of the
    sampled answers to the harmful prompts that the judge called safe, under the model without them."""
    with worn:
        res = evaluate(model, processor, val, judge, samples=samples, seed=seed)
    safe = res.pop("_harmful_safe_answers")
    res[FLUENCY] = answer_perplexity(model, processor, [r["_image"] for r in val.harmful],
                                     [r["question"] for r in val.harmful], safe)
    return res


def _steering(model, processor, c: Config, loaded: dict, built: dict):
    """Gated-steering glasses for ``c``: profiled once per (data, gate data, what is profiled);
    the options that only change how they are worn (c, threshold, ...) reuse that profiling."""
    from lmms_sgm.pipeline import build_steering_glasses

    so = c.steer
    key = (c.data, c.gate_data, so.layer, so.gate_layer, so.text_field, so.positions, so.batch_size, so.attention)
    if key not in built:
        built[key] = build_steering_glasses(model, processor, loaded[c.data], c.gate_data and loaded[c.gate_data], so,
                                            progress=False)
    return built[key].with_options(**{f: getattr(so, f) for f in SteeringOptions.APPLY_FIELDS})


def _brief(row: dict) -> str:
    return ", ".join(f"{c} {row[c]:.3f}" for c in COLUMNS if row.get(c) is not None)


def write(result: TuneResult, out: Path, *, sets: dict | None = None) -> None:
    """``table.md``, ``table.json``, ``profiles/<n>/`` (re-selectable glasses of each profiling) and,
    when an option was chosen, ``glasses/`` (the chosen glasses) into the directory ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    profiles = []
    for i, ((data, po), base) in enumerate(result.profiles.items()):
        base.save(out / "profiles" / f"{i:02d}")
        profiles.append({"dir": f"profiles/{i:02d}", "data": data, "profile": to_dict(po)})
    chosen = result.configs[[c.name for c in result.configs].index(result.chosen)] if result.chosen else None
    if chosen is not None:
        result.glasses[result.chosen].save(out / "glasses")
    clean = {n: {k: v for k, v in r.items() if not k.startswith("examples")} for n, r in result.rows.items()}
    doc = {"rule": {**rule_to_dict(result.rule), "text": describe(result.rule)},
           "chosen": None if chosen is None else {**chosen.to_dict(), "glasses": "glasses"},
           "verdict": result.verdict(), "rows": clean, "configs": [c.to_dict() for c in result.configs],
           "sets": {k: str(v) for k, v in (sets or {}).items()}, "profiles": profiles, "seconds": round(result.seconds, 1)}
    (out / "table.json").write_text(json.dumps(doc, indent=1) + "\n")
    strength = "" if chosen is None or chosen.strength == 1 else f" (wear them at strength {chosen.strength:g})"
    (out / "table.md").write_text(f"# lmms-sgm tune\n\nRule: {describe(result.rule)}.\n\n{result.verdict()}{strength}.\n\n"
                                  f"{result.table()}\n")
