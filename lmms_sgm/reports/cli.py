"""``lmms-sgm report`` and ``lmms-sgm sweep``: argument parsing and file writing.

    lmms-sgm report runs/vanilla runs/sgm [--names vanilla,sgm] [--out DIR] [--json FILE] [--overwrite]
    lmms-sgm sweep --pretrained M --glasses G [G ...] --strengths 0,0.25,0.5,0.75,1 --tasks T --out DIR

``lmms_sgm.cli`` registers both through :func:`register`, so the command line's own module only
names them.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from lmms_sgm.options import RuleOptions, add_arguments, from_namespace
from lmms_sgm.reports import render, stats
from lmms_sgm.reports.report import build
from lmms_sgm.reports.results import load_run

FILES = ("report.html", "report.md", "report.json")


def write(report: dict, out: str | Path, title: str = "Capability-retention report", extra_html: str = "") -> dict[str, Path]:
    """``out/report.html``, ``report.md`` and ``report.json``; returns their paths. Each file is
    written whole or not at all (rendered first, then :func:`~lmms_sgm.staging.atomic_write`), so a
    full disk leaves the earlier file or none, never a truncated one. Replaces earlier report files:
    the ``report`` command refuses them first unless ``--overwrite`` (:func:`earlier_reports`)."""
    from lmms_sgm.redaction import redact
    from lmms_sgm.staging import atomic_write

    report = redact(report)  # model args and answers come from runs that may quote a key
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in FILES}
    texts = {"report.html": render.to_html(report, title, extra_html), "report.md": render.to_markdown(report, title),
             "report.json": json.dumps(report, indent=1, default=str) + "\n"}
    for name in FILES:
        atomic_write(paths[name], texts[name])
    return paths


def earlier_reports(out: str | Path | None, json_out: str | Path | None) -> list[Path]:
    """The report files a run would replace: ``FILES`` in ``out``, and ``json_out``."""
    found = [Path(out) / name for name in FILES if os.path.lexists(Path(out) / name)] if out else []
    if json_out and os.path.lexists(json_out):
        found.append(Path(json_out))
    return found


def main(paths: list[str], names: list[str] | None = None, out: str | None = None, json_out: str | None = None,
         resamples: int = stats.RESAMPLES, seed: int = stats.SEED, rule: RuleOptions | None = None, overwrite: bool = False) -> str:
    """Build the report of ``paths`` (the first is the baseline), write it to ``out`` (a folder)
    and/or ``json_out`` (report.json alone), and return the summary table to print. Earlier report
    files there are refused (before any work) unless ``overwrite``; other files in ``out`` are never touched."""
    names = names or [Path(p).name for p in paths]
    if len(names) != len(paths):
        raise ValueError(f"{len(names)} names for {len(paths)} runs")
    if len(set(names)) != len(names):
        raise ValueError(f"run names must differ: {names} (give --names)")
    if out and Path(out).suffix in (".md", ".json", ".html"):
        raise ValueError(f"--out names a folder for report.html, report.md and report.json, not a file: {out}")
    if out and Path(out).exists() and not Path(out).is_dir():
        raise FileExistsError(f"--out {out} is a file; give a folder for report.html, report.md and report.json")
    earlier = earlier_reports(out, json_out)
    if earlier and not overwrite:
        raise FileExistsError(f"{', '.join(str(p) for p in earlier)} exist(s) from an earlier report; pass --overwrite to "
                              "replace them, or give another --out / --json (nothing was written)")
    report = build({n: load_run(p) for n, p in zip(names, paths)}, resamples=resamples, seed=seed, rule=rule or RuleOptions())
    text = render.summary_markdown(report)
    if out:
        written = write(report, out)
        text += "\nwritten: " + ", ".join(str(p) for p in written.values()) + "\n"
    if json_out:
        from lmms_sgm.redaction import redact
        from lmms_sgm.staging import atomic_write

        atomic_write(json_out, json.dumps(redact(report), indent=1, default=str) + "\n")
    return text


def add_rule_arguments(p: argparse.ArgumentParser) -> None:
    """The operating point's rule: tune's flags (:class:`~lmms_sgm.options.RuleOptions`, less
    ``fluency_ratio``, which a report does not read); the names of before kept one release."""
    add_arguments(p, RuleOptions, only=("metric", "retention", "over_refusal_points"), help={
        "metric": "the harmful rate the trade-off plots and the rule minimises, task:metric[:filter] "
                  "(None: mm_toxic_qa_sampled:harmful_rate:samples, else mm_toxic_qa:harmful_rate)",
        "retention": "operating point rule: every capability metric keeps at least this fraction of the baseline",
        "over_refusal_points": "operating point rule: at most this many percentage points of added over-refusal"})
    for old, dest in (("--harm-metric", "metric"), ("--min-retention", "retention"),
                      ("--max-over-refusal-points", "over_refusal_points")):  # deprecated spellings
        p.add_argument(old, dest=dest, default=None, help=argparse.SUPPRESS)
    p.add_argument("--resamples", type=int, default=stats.RESAMPLES, help="bootstrap resamples (over prompts)")
    p.add_argument("--bootstrap-seed", type=int, default=stats.SEED, help="seed of the bootstrap and of the permutation test")


def rule_of(args) -> RuleOptions:
    return from_namespace(RuleOptions, args)


def _report(args) -> int:
    names = [n.strip() for n in args.names.split(",")] if args.names else None
    print(main(args.runs, names=names, out=args.out, json_out=args.json, resamples=args.resamples,
               seed=args.bootstrap_seed, rule=rule_of(args), overwrite=args.overwrite), end="")
    return 0


def _sweep(args) -> int:
    from lmms_sgm.reports.sweep import run

    return run(args)


def register(sub, parents=()) -> None:
    """Add ``report`` and ``sweep`` to the ``lmms-sgm`` subcommands."""
    p = sub.add_parser("report", parents=list(parents), help="capability-retention report of evaluation runs (the first is the baseline): "
                                      "intervals, paired differences, examples, trade-off; HTML, Markdown, JSON")
    p.add_argument("runs", nargs="+", help="lmms-eval or lm-eval --output_path folders, or their results JSON files")
    p.add_argument("--names", default=None, help="comma-separated run names (default: folder names)")
    p.add_argument("--out", default=None, help="folder for report.html, report.md and report.json")
    p.add_argument("--json", default=None, help="also write report.json to this file")
    p.add_argument("--overwrite", action="store_true",
                   help="replace report files an earlier report wrote in --out (report.html/.md/.json) and --json; "
                        "without it they are refused. Other files in --out are never touched")
    add_rule_arguments(p)
    p.set_defaults(func=_report)

    from lmms_sgm.reports.sweep import add_arguments

    p = sub.add_parser("sweep", parents=list(parents), help="one lmms-eval run per glasses and strength, resumable, and the trade-off report")
    add_arguments(p)
    add_rule_arguments(p)
    p.set_defaults(func=_sweep)
