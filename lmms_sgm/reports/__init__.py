"""Reports on evaluation runs: "how much safer, at what cost?", with intervals a reviewer can check.

Reads only results files (lmms-eval and lm-eval output folders, their logged samples); imports no
model code and no harness, so runs made elsewhere report the same way. The pieces:

- :mod:`~lmms_sgm.reports.results`: finding and reading results files and logged samples;
- :mod:`~lmms_sgm.reports.stats`: bootstrap over prompts, paired bootstrap, sign-flip test;
- :mod:`~lmms_sgm.reports.report`: the report dict (``report.json``): metrics with intervals,
  paired differences, retention, examples, the harm/capability trade-off;
- :mod:`~lmms_sgm.reports.render` and :mod:`~lmms_sgm.reports.svg`: Markdown and self-contained HTML;
- :mod:`~lmms_sgm.reports.table`: the short point-value table (the demo's comparison.md);
- :mod:`~lmms_sgm.reports.sweep`: ``lmms-sgm sweep``, one lmms-eval run per strength, resumable;
- :mod:`~lmms_sgm.reports.runner`: lmms-eval subprocesses (shared with the demo);
- :mod:`~lmms_sgm.reports.files`: writing report.html/.md/.json, and the ``report`` command's work;
- :mod:`~lmms_sgm.reports.cli`: the ``report`` and ``sweep`` subcommands' arguments.
"""
from lmms_sgm.reports.comparable import mismatches
from lmms_sgm.reports.files import main, write
from lmms_sgm.reports.report import Rule, build
from lmms_sgm.reports.results import find_results, load_run, logged_samples
from lmms_sgm.reports.table import (
           Row,
           change,
           compare,
           count,
           default_rows,
           to_markdown,
           value,
)

__all__ = ["Row", "Rule", "build", "change", "compare", "count", "default_rows", "find_results", "load_run",
           "logged_samples", "main", "mismatches", "to_markdown", "value", "write"]
