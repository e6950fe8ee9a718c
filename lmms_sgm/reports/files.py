"""The report's files and the ``report`` command's work without its argument parsing.

:func:`write` renders a report to ``report.html``, ``report.md`` and ``report.json``, each written
whole; :func:`main` builds the report of runs, refuses earlier report files unless told to replace
them, and writes it. ``lmms-sgm report`` (:mod:`~lmms_sgm.reports.cli`) and ``lmms-sgm sweep``
(:mod:`~lmms_sgm.reports.sweep`) both write through here, so neither imports the other.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from lmms_sgm.options import RuleOptions
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
