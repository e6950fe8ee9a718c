"""Choosing SGM's options per model, on that model's validation split (``lmms-sgm tune``).

Which options work does not carry over between models (docs/diagnosis.md), so the choice is
made on the model itself: every configuration of a grid is built, worn and evaluated on a
validation split with :func:`lmms_sgm.evaluate.evaluate`, and one is picked by a fixed rule.

A configuration is a profiling set (a name for a pairs file; ``self`` for the model's own
answers labelled by a judge), profiling options, selection options and a strength. Each distinct
(profiling set, profiling options) is profiled once; its AUROCs and non-toxic means are kept
(``profiles/<n>/``, glasses that ``lmms-sgm select`` re-selects), so every selection option is
a re-selection without a forward pass.

The rule (:class:`Rule`; the demo's): the lowest ``metric`` (sampled harmful rate) among the
configurations that keep every capability measure at >= ``retention`` of vanilla, add at most
``over_refusal_points`` of over-refusal, and lower the metric below vanilla's. None qualifying is
a result too: then no option helps on this model, and tune says so and writes no glasses.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from lmms_sgm.evaluate import COLUMNS, ValidationSet, evaluate
from lmms_sgm.options import ProfileOptions, SelectionOptions, from_strings, to_dict

CAPABILITY = ("capability_open", "capability_mc")
QR = "question+response"


@dataclass(frozen=True)
class Config:
    """One option to try: where it is profiled, what is selected, how strongly it is worn."""

    name: str
    data: str  # a profiling set's name
    profile: ProfileOptions = field(default_factory=ProfileOptions)
    select: SelectionOptions = field(default_factory=SelectionOptions)
    strength: float = 1.0

    def to_dict(self) -> dict:
        return {"name": self.name, "data": self.data, "profile": to_dict(self.profile),
                "select": to_dict(self.select), "strength": self.strength}

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        unknown = sorted(set(d) - {"name", "data", "profile", "select", "strength"})
        if unknown or "name" not in d or "data" not in d:
            raise ValueError(f"a grid entry needs name and data (and optionally profile, select, strength); got {sorted(d)}")
        return cls(d["name"], d["data"], from_strings(ProfileOptions, d.get("profile", {})),
                   from_strings(SelectionOptions, d.get("select", {})), float(d.get("strength", 1.0)))


@dataclass(frozen=True)
class Rule:
    """How the configuration is chosen (module docstring)."""

    metric: str = "harmful_sampled"
    retention: float = 0.95
    over_refusal_points: float = 0.02

    def describe(self) -> str:
        return (f"lowest {self.metric} among the options keeping every capability measure >= {self.retention:.0%} of "
                f"vanilla and over-refusal within +{100 * self.over_refusal_points:g} points, and lower than vanilla's")

    def admissible(self, row: dict, base: dict) -> bool:
        if row.get(self.metric) is None or not row[self.metric] < base[self.metric]:
            return False
        if any(c in base and row.get(c, 0.0) < self.retention * base[c] for c in CAPABILITY):
            return False
        return "over_refusal" not in base or row.get("over_refusal", 1.0) <= base["over_refusal"] + self.over_refusal_points

    def choose(self, rows: dict) -> str | None:
        """The chosen configuration's name in ``rows`` (which holds ``vanilla``), or None."""
        base = rows["vanilla"]
        ok = [n for n, r in rows.items() if n != "vanilla" and self.admissible(r, base)]
        return min(ok, key=lambda n: rows[n][self.metric], default=None)


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
    path = Path(path)
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
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
    from lmms_sgm.glasses import SafetyGlasses
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
    rule: Rule
    glasses: dict  # name -> SafetyGlasses
    configs: list[Config]
    seconds: float
    profiles: dict = field(default_factory=dict)  # (set, ProfileOptions) -> glasses holding its AUROCs and means

    def verdict(self) -> str:
        """One sentence: what was chosen and what it does, or that nothing helps."""
        m = self.rule.metric
        v = self.rows["vanilla"][m]
        if self.chosen is None:
            best = min((n for n in self.rows if n != "vanilla"), key=lambda n: self.rows[n][m], default=None)
            tail = "" if best is None else (f" (the lowest {m} of any option, side conditions aside: {best}, "
                                            f"{v:.3f} -> {self.rows[best][m]:.3f})")
            return f"no option helps on this model by the rule ({self.rule.describe()}){tail}; no glasses written"
        c = self.rows[self.chosen][m]
        return f"chosen: {self.chosen}: {m} {v:.3f} -> {c:.3f} ({c / v - 1:+.0%}) on the validation split" if v else \
            f"chosen: {self.chosen}: {m} {v:.3f} -> {c:.3f}"

    def table(self, columns=COLUMNS) -> str:
        base = self.rows["vanilla"]
        cols = [c for c in columns if c in base]
        lines = [f"| configuration | experts | {' | '.join(cols)} |", "|---|---|" + "---|" * len(cols)]
        for name, r in self.rows.items():
            cells = []
            for c in cols:
                cell = "" if r.get(c) is None else f"{r[c]:.3f}"
                if c == self.rule.metric and name != "vanilla" and base.get(c):
                    cell += f" ({r[c] / base[c] - 1:+.0%})"
                cells.append(cell)
            shown = f"**{name}**" if name == self.chosen else name
            lines.append(f"| {shown} | {r.get('experts', 0)} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def tune(model, processor, sets: dict, configs: list[Config], val: ValidationSet, judge, *, rule: Rule = Rule(),
         samples: int = 5, seed: int = 0, log=None) -> TuneResult:
    """Build, wear (hooks) and evaluate every configuration; choose one by ``rule``.

    ``sets``: profiling-set name -> pairs (a path, a list of dicts or a PairDataset)."""
    from lmms_sgm.data import load_pairs

    missing = sorted({c.data for c in configs} - set(sets))
    if missing:
        raise ValueError(f"the grid names profiling set(s) {', '.join(missing)}, not given (given: {', '.join(sets) or 'none'})")
    log = log or (lambda s: None)
    t0 = time.time()
    rows = {"vanilla": {"experts": 0, **evaluate(model, processor, val, judge, samples=samples, seed=seed)}}
    log(f"[{time.time() - t0:.0f}s] vanilla: {_brief(rows['vanilla'])}")
    loaded = {name: load_pairs(sets[name]) for name in {c.data for c in configs}}
    bases: dict = {}
    stores: dict = {}
    built: dict = {}
    try:
        for c in configs:
            key = (c.data, c.profile)
            if key not in bases:
                bases[key], stores[key] = profiled(model, processor, loaded[c.data], c.profile)
            glasses = bases[key].reselect(c.select, store=stores[key], labels=loaded[c.data].labels)
            built[c.name] = glasses
            with glasses.apply(model, strength=c.strength, mode="hooks"):
                res = evaluate(model, processor, val, judge, samples=samples, seed=seed)
            rows[c.name] = {"experts": glasses.counts()["experts"], **res}
            log(f"[{time.time() - t0:.0f}s] {c.name}: {_brief(rows[c.name])}")
    finally:
        for store in stores.values():
            store.close()
    return TuneResult(rows, rule.choose(rows), rule, built, list(configs), time.time() - t0, bases)


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
    doc = {"rule": {**dataclasses.asdict(result.rule), "text": result.rule.describe()},
           "chosen": None if chosen is None else {**chosen.to_dict(), "glasses": "glasses"},
           "verdict": result.verdict(), "rows": clean, "configs": [c.to_dict() for c in result.configs],
           "sets": {k: str(v) for k, v in (sets or {}).items()}, "profiles": profiles, "seconds": round(result.seconds, 1)}
    (out / "table.json").write_text(json.dumps(doc, indent=1) + "\n")
    strength = "" if chosen is None or chosen.strength == 1 else f" (wear them at strength {chosen.strength:g})"
    (out / "table.md").write_text(f"# lmms-sgm tune\n\nRule: {result.rule.describe()}.\n\n{result.verdict()}{strength}.\n\n"
                                  f"{result.table()}\n")
