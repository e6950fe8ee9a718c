"""``lmms-sgm report`` and ``lmms-sgm sweep``: argument parsing (the work: :mod:`~lmms_sgm.reports.files`
and :mod:`~lmms_sgm.reports.sweep`).

    lmms-sgm report runs/vanilla runs/sgm [--names vanilla,sgm] [--out DIR] [--json FILE] [--overwrite]
    lmms-sgm sweep --pretrained M --glasses G [G ...] --strengths 0,0.25,0.5,0.75,1 --tasks T --out DIR

``lmms_sgm.cli`` registers both through :func:`register`, so the command line's own module only
names them.
"""
from __future__ import annotations

import argparse

from lmms_sgm.options import RuleOptions, add_arguments, from_namespace
from lmms_sgm.reports import stats
from lmms_sgm.reports.files import FILES, earlier_reports, main, write  # noqa: F401 (their old home)


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

    p = sub.add_parser("sweep", parents=list(parents),
                       help="one lmms-eval run per glasses and strength, resumable, and the trade-off report")
    add_arguments(p)
    add_rule_arguments(p)
    p.set_defaults(func=_sweep)
