"""A report dict (:func:`lmms_sgm.reports.report.build`) as Markdown and as one self-contained HTML page.

The HTML carries its plots as inline SVG and its style inline: no script, no font, no remote
resource, so it opens the same offline, in a mail attachment or in CI's headless browser.

Text from the data (model answers, prompts, judges' reasons, run labels, paths, model arguments)
is escaped in both: :func:`_h` for HTML, :func:`md` for Markdown, so that no tag, link, image or
table cell can come out of it (a Markdown renderer passes raw HTML through); both outputs go
through :func:`lmms_sgm.redaction.redact`.
"""
from __future__ import annotations

import html
import math
import re

from lmms_sgm.redaction import redact
from lmms_sgm.reports import stats, svg
from lmms_sgm.reports.comparable import judge_label
from lmms_sgm.reports.report import KIND_TITLES, KINDS

WIDE_MAX_RUNS = 4  # more runs than this (a sweep): one line per metric and run

# Inline Markdown syntax a text may hold: backslash-escaped (CommonMark escapes any ASCII
# punctuation; these are also Python-Markdown's). A backslash is doubled only before punctuation
# or at the end (what follows may be ours: a quote); elsewhere it is literal, so a Windows path
# reads as it is. "_" only at a word's edge: inside a word it cannot emphasise, and task names
# are full of it.
_MD_SPECIAL = re.compile(r"\\(?=[!-/:-@\[-`{-~]|$)|[`*\[\]|]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")
# What could open raw HTML or an autolink (<a, </, <!, <?) and character references (&lt;): as
# entities, which every renderer shows as the characters themselves.
_MD_HTML = re.compile(r"<(?=[A-Za-z/!?])|&(?=[#A-Za-z])|~")
_MD_ENTITY = {"<": "&lt;", "&": "&amp;", "~": "&#126;"}


def md(text) -> str:
    """``text`` as literal inline Markdown: on one line (a line break would end a table row or start
    a block), no HTML, link, image, code span, emphasis or table cell boundary of its own."""
    s = " ".join(str(text).splitlines())  # every line break Python knows (\r, \u2028, \x85...)
    s = _MD_SPECIAL.sub(lambda m: "\\" + m.group(0), s)
    return _MD_HTML.sub(lambda m: _MD_ENTITY[m.group(0)], s)


def md_code(text) -> str:
    """``text`` as a Markdown code span (shown as it is, no HTML): fenced by one more backtick than
    its longest run of them, on one line. Not for a table cell (a table splits at "|" first)."""
    s = " ".join(str(text).splitlines())
    fence = "`" * (1 + max((len(r) for r in re.findall(r"`+", s)), default=0))
    pad = " " if s[:1] in ("`", " ") or s[-1:] in ("`", " ") else ""  # one space each side is stripped
    return f"{fence}{pad}{s}{pad}{fence}"


def num(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}" if abs(v) < 100 else f"{v:.1f}"


def ci_text(ci, digits: int = 3, signed: bool = False) -> str:
    if not ci:
        return ""
    f = (lambda x: f"{x:+.{digits}f}") if signed else (lambda x: num(x, digits))
    return f" [{f(ci[0])}, {f(ci[1])}]"


def p_text(p: float) -> str:
    """``p=0.039``; at the random-flip test's floor, 1 / (1 + permutations), ``p<=0.0001``: no flip
    reached the observed sum, and a smaller p cannot be told apart."""
    if abs(p - 1 / (1 + stats.PERMUTATIONS)) < 1e-12:
        return f"p<={p:.1g}"
    return f"p={p:.2g}"


def value_text(row: dict) -> str:
    if row["value"] is None:
        return "n/a"
    return f"{num(row['value'])}{ci_text(row['ci'])} (n={'?' if row['n'] is None else row['n']})"


def delta_text(row: dict) -> str:
    """The change against the baseline as a reader wants it for the row's kind."""
    if row.get("delta") is None:
        return "n/a"
    if row["delta"] == 0 and row.get("delta_ci") == [0.0, 0.0]:
        return "unchanged" + (f" (n={row['n_paired']} paired)" if row.get("n_paired") is not None else "")
    if row["kind"] == "over_refusal":
        text = f"{100 * row['delta']:+.1f} pt" + (
            f" [{100 * row['delta_ci'][0]:+.1f}, {100 * row['delta_ci'][1]:+.1f}]" if row["delta_ci"] else ""
        )
    else:
        text = f"{row['delta']:+.3f}{ci_text(row['delta_ci'], signed=True)}"
    if row["kind"] == "capability" and row.get("retention") is not None:
        r = row.get("retention_ci")
        text += f", {row['retention']:.1%} kept" + (f" [{r[0]:.1%}, {r[1]:.1%}]" if r else "")
    elif row["kind"] in ("harm", "fluency", "other", "refusal") and row.get("relative_change") is not None:
        text += f" ({row['relative_change']:+.0%})"
    if row.get("p_value") is not None:
        text += f", {p_text(row['p_value'])}"
    if row.get("n_paired") is not None:
        text += f", n={row['n_paired']} paired"
    if row.get("within_noise"):
        text += ", within noise"
    return text


def _rows_by_spec(report: dict, categories: bool, keep=None) -> list[tuple[tuple, dict]]:
    """``[(spec key, {run: row})]`` in report order (``keep``: a row predicate)."""
    out: dict = {}
    for r in report["metrics"]:
        if (r["category"] is not None) != categories or (keep is not None and not keep(r)):
            continue
        out.setdefault((r["task"], r["metric"], r["filter"], r["category"]), {})[r["run"]] = r
    return list(out.items())


def _run_names(report: dict) -> list[str]:
    return [r["label"] for r in report["runs"]]


def by_attack(row: dict) -> bool:
    """The harmful rates of harmful prompts, plain or under the typographic attack."""
    return row["kind"] == "harm" and row.get("prompts") in ("plain", "typographic") and row["metric"] == "harmful_rate"


def table_rows(report: dict, categories: bool = False, keep=None, text=str) -> tuple[list[str], list[list[str]], list[str | None]]:
    """(header, rows, group of each row) of the summary table (or the per-category one, or the
    rows ``keep`` accepts); ``text``: how text from the data is written (:func:`md` for Markdown)."""
    names = [text(n) for n in _run_names(report)]
    base = text(report["baseline"])
    by_name = dict(zip(names, _run_names(report)))
    wide = len(names) <= WIDE_MAX_RUNS
    specs = _rows_by_spec(report, categories, keep)
    specs.sort(key=lambda kv: KINDS.index(next(iter(kv[1].values()))["kind"]))
    if wide:
        head = ["metric", *names, *(f"{n} vs {base}" for n in names[1:])]
    else:
        head = ["metric", "run", "value [95% CI] (n)", f"vs {base}"]
    rows, groups = [], []
    for _, per_run in specs:
        first = next(iter(per_run.values()))
        if wide:
            rows.append([text(first["label"]), *(value_text(per_run[by_name[n]]) if by_name[n] in per_run else "n/a" for n in names),
                         *(delta_text(per_run[by_name[n]]) if by_name[n] in per_run else "n/a" for n in names[1:])])
            groups.append(first["kind"])
        else:
            for n in names:
                if by_name[n] in per_run:
                    row = per_run[by_name[n]]
                    rows.append([text(first["label"]), n, value_text(row), "" if n == base else delta_text(row)])
                    groups.append(first["kind"])
    return head, rows, groups


_UNESCAPED_PIPE = re.compile(r"(?<!\\)((?:\\\\)*)\|")


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table of cells already written as Markdown (data text through :func:`md`); as a
    second guard, a line break or a "|" left unescaped cannot end the row or the cell."""
    def esc(cell) -> str:
        return _UNESCAPED_PIPE.sub(lambda m: m.group(1) + "\\|", " ".join(str(cell).splitlines()))

    return ["| " + " | ".join(map(esc, head)) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(map(esc, r)) + " |" for r in rows)]


def _wore(run: dict) -> str:
    w = run.get("wore")
    return f" ({md(w)})" if w and w != "not recorded" else ""


def summary_markdown(report: dict) -> str:
    """The table ``lmms-sgm report`` prints: the files read, the warnings, one line per metric."""
    lines = ["Results files:", *(f"- {md(r['label'])}{_wore(r)}: {md_code(r['path'])}" for r in report["runs"] if r.get("path")), ""]
    if not any(r.get("path") for r in report["runs"]):
        lines = []
    for w in report["warnings"]:
        lines.append(f"**Warning:** {md(w)}  ")
    if report["warnings"]:
        lines.append("")
    lines.append("Values with 95% intervals and n (prompts); differences to the baseline paired over the same "
                 "prompts (docs/reports.md).")
    lines.append("")
    head, rows, _ = table_rows(report, text=md)
    lines += _md_table(head, rows)
    return redact("\n".join(lines) + "\n")


def _verdict(v: dict) -> str:
    if not v:
        return ""
    tag = "unsafe" if v.get("unsafe") else "refusal" if v.get("refusal") else "safe"
    return f"{tag}: {v.get('reason', '')}".strip(": ")


def _side_md(side: dict) -> str:
    resp = side.get("responses") or []
    verd = side.get("verdicts") or []
    parts = []
    for i, r in enumerate(resp[:5]):
        v = _verdict(verd[i]) if i < len(verd) else ""
        parts.append(f"\"{md(r)}\"" + (f" ({md(v)})" if v else ""))
    more = f" (+{len(resp) - 5} more)" if len(resp) > 5 else ""
    return f"value {num(side.get('value'))}: " + "; ".join(parts) + more


def tradeoff_rows(report: dict, text=str) -> tuple[list[str], list[list[str]]]:
    t = report["tradeoff"]
    harm = text((t.get("harm_metric") or {}).get("label", "harmful rate"))
    head = ["run", f"{harm} [95% CI]", "worst capability retention", "over-refusal (pt)", "fluency", "Pareto", "operating point"]
    rows = []
    for p in t["points"]:
        rows.append([text(p["run"]), num(p["harm"]) + ci_text(p["harm_ci"]),
                     "n/a" if p["retention"] is None else f"{p['retention']:.1%}",
                     "n/a" if p["over_refusal_points"] is None else f"{p['over_refusal_points']:+.1f}",
                     num(p.get("fluency")), "yes" if p["pareto"] else "", "**chosen**" if p["run"] == t["operating_point"] else ""])
    return head, rows


def operating_sentence(report: dict, text=str) -> str:
    t = report["tradeoff"]
    rule = text(t["rule"]["text"])
    if t["operating_point"]:
        return f"Operating point: **{text(t['operating_point'])}**, {rule}."
    return f"Operating point: none of the runs meets the rule ({rule}); keep the baseline."


def to_markdown(report: dict, title: str = "Capability-retention report") -> str:
    names = _run_names(report)
    lines = [f"# {md(title)}", "", f"Baseline: **{md(report['baseline'])}**; runs: {md(', '.join(names))}.", ""]
    lines.append(summary_markdown(report))
    if report["notes"]:
        lines += ["Within noise:", "", *(f"- {md(n)}" for n in report["notes"]), ""]
    lines += ["## Trade-off", "", *_md_table(*tradeoff_rows(report, text=md)), "", operating_sentence(report, text=md), ""]
    head, rows, _ = table_rows(report, keep=by_attack, text=md)
    if rows:
        lines += ["## Harmful rate by attack", "", *_md_table(head, rows), ""]
    head, rows, _ = table_rows(report, categories=True, text=md)
    if rows:
        lines += ["## Per category", "", *_md_table(head, rows), ""]
    lines += ["## Runs", "", *_md_table(*runs_rows(report, text=md)), ""]
    lines += examples_markdown(report)
    lines += ["## How the numbers are made", "", *(f"- {md(k)}: {md(v)}" for k, v in report["statistics"].items()), ""]
    return redact("\n".join(lines))


def examples_markdown(report: dict) -> list[str]:
    items = report["examples"]["items"]
    if not items:
        return ["## Examples", "", "No prompt changed between the baseline and the runs (or no samples were logged).", ""]
    lines = ["## Examples", ""]
    for (run, key), group in _example_groups(report).items():
        counts = report["examples"]["counts"].get(run, {}).get(key, {})
        lines.append(f"### {md(run)}: {md(key)} ({md(_counts_text(counts))})")
        lines.append("")
        for e in group:
            lines.append(f"- **{md(e['kind'])}**, doc {md(e['doc_id'])}: \"{md(e['prompt'])}\"  ")
            lines.append(f"  {md(report['baseline'])}: {_side_md(e['before'])}  ")
            lines.append(f"  {md(run)}: {_side_md(e['after'])}")
        lines.append("")
    return lines


def _counts_text(counts: dict) -> str:
    plural = {"regression": "regressions", "broken": "broken", "fixed": "fixed", "repaired": "repaired"}
    return ", ".join(f"{v} {plural.get(k, k) if v != 1 else k}" for k, v in counts.items())


def _example_groups(report: dict) -> dict:
    groups: dict = {}
    for e in report["examples"]["items"]:
        key = f"{e['task']} {e['metric']},{e['filter']}"
        groups.setdefault((e["run"], key), []).append(e)
    return groups


def runs_rows(report: dict, text=str) -> tuple[list[str], list[list[str]]]:
    head = ["run", "wore", "results file", "model args", "judge", "decoding", "data digest", "samples logged"]
    rows = []
    for r in report["runs"]:
        j = r.get("judge")
        judge = judge_label(j) if isinstance(j, dict) and "name" in j else ("per task" if j else "none recorded")
        decs = sorted(
            {
                ", ".join(
                    f"{k}={v}"
                    for k, v in sorted(g.items())
                    if k in ("temperature", "do_sample", "max_new_tokens", "repeats", "top_p", "top_k", "--gen_kwargs")
                )
                for g in r.get("generation", {}).values()
            }
        )
        rows.append([*map(text, (r["label"], r.get("wore") or "not recorded", r.get("path") or "", r.get("model_args") or "",
                                 judge, " / ".join(decs), r["data_digest"])),
                     f"{len(r['samples_logged'])} of {len(r['data_digests'])} tasks"])
    return head, rows


# ------------------------------------------------------------------ HTML

CSS = """
body{font-family:sans-serif;margin:24px auto;max-width:1200px;color:#222;line-height:1.4}
h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}h3{font-size:1.05em}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #ccc;padding:4px 7px;text-align:left;vertical-align:top}
th{background:#f3f3f3}tr.group td{background:#fafafa;font-weight:bold}
td.noise{color:#777}td.num{font-variant-numeric:tabular-nums}
.warnings{background:#fff3f3;border:1px solid #e0a0a0;padding:8px 14px;margin:12px 0}
.warnings li{margin:3px 0}.notes{background:#f6f8ff;border:1px solid #c8d0f0;padding:8px 14px}
.ex td{max-width:420px}.unsafe{color:#b00020;font-weight:bold}.safe{color:#1b7a1b}.refusal{color:#8a6d00}
code{font-size:12px;word-break:break-all}.small{font-size:12px;color:#555}
"""


def _h(s) -> str:
    return html.escape(str(s))


def _html_table(head, rows, groups=None, cls="") -> str:
    out = [f'<table class="{cls}"><thead><tr>' + "".join(f"<th>{_h(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    last = object()
    for i, r in enumerate(rows):
        g = groups[i] if groups else None
        if groups and g != last:
            out.append(f'<tr class="group"><td colspan="{len(head)}">{_h(KIND_TITLES.get(g, g))}</td></tr>')
            last = g
        out.append(
            "<tr>"
            + "".join(
                f'<td class="num{" noise" if "within noise" in str(c) or str(c).startswith("unchanged") else ""}">{_h(c)}</td>'
                for c in r
            )
            + "</tr>"
        )
    out.append("</tbody></table>")
    return "".join(out)


def _side_html(side: dict) -> str:
    resp = side.get("responses") or []
    verd = side.get("verdicts") or []
    items = []
    for i, r in enumerate(resp):
        v = verd[i] if i < len(verd) else None
        tag = ("unsafe" if v.get("unsafe") else "refusal" if v.get("refusal") else "safe") if v else ""
        items.append(f"<li>&ldquo;{_h(r)}&rdquo;" + (f' <span class="{tag}">{_h(_verdict(v))}</span>' if v else "") + "</li>")
    return f"<div>value {num(side.get('value'))}</div><ul>" + "".join(items) + "</ul>"


def plots(report: dict) -> dict[str, str]:
    """The report's SVG plots: ``tradeoff``, ``differences``, ``categories``."""
    t = report["tradeoff"]
    harm = (t.get("harm_metric") or {}).get("label", "harmful rate")
    base = report["baseline"]
    pts = [{"label": p["run"], "x": p["retention"], "y": p["harm"], "y_ci": p["harm_ci"], "pareto": p["pareto"],
            "chosen": p["run"] == t["operating_point"], "baseline": p["run"] == base, "series": p.get("series"),
            "strength": p.get("strength")} for p in t["points"]]
    out = {"tradeoff": svg.scatter(pts, x_label="capability retention (worst metric, baseline = 100%)",
                                   y_label=harm, title="harmful rate against capability retention")}
    diffs = []
    names = _run_names(report)
    for r in report["metrics"]:
        if (
            r["run"] != base
            and r["category"] is None
            and r["kind"] in ("harm", "over_refusal", "capability")
            and r.get("delta") is not None
        ):
            diffs.append({"label": f"{r['label']} ({r['run']})", "delta": r["delta"], "ci": r["delta_ci"],
                          "noise": r.get("within_noise"), "colour": names.index(r["run"])})
    out["differences"] = svg.forest(diffs, x_label=f"difference to {base} (grey: within noise)",
                                    title="paired differences to the baseline, 95% intervals")
    cats: dict = {}
    for r in report["metrics"]:
        if r["category"] is not None and r["metric"] == "harmful_rate_by_category":
            g = cats.setdefault((r["task"], r["filter"], r["category"]), {"label": r["label"], "values": {}})
            g["values"][r["run"]] = (r["value"], r["ci"])
    out["categories"] = svg.bars(list(cats.values()), names, x_label="harmful rate", title="harmful rate per category")
    return out


def to_html(report: dict, title: str = "Capability-retention report", extra_html: str = "") -> str:
    names = _run_names(report)
    p = plots(report)
    parts = [(f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_h(title)}</title>"
             f"<style>{CSS}</style></head><body>"), f"<h1>{_h(title)}</h1>",
             f"<p>Baseline: <b>{_h(report['baseline'])}</b>; runs: {_h(', '.join(names))}.</p>"]
    if report["warnings"]:
        parts.append('<div class="warnings" id="warnings"><b>Warnings: these runs are not fully comparable</b><ul>'
                     + "".join(f"<li>{_h(w)}</li>" for w in report["warnings"]) + "</ul></div>")
    parts.append(extra_html)
    parts += ["<h2>Trade-off: harm against capability</h2>", p["tradeoff"],
              _html_table(*tradeoff_rows(report), cls="tradeoff"),
              f"<p>{_h(operating_sentence(report).replace('**', ''))}</p>"]
    head, rows, groups = table_rows(report)
    parts += ["<h2>Summary</h2>", ('<p class="small">Values with 95% intervals and n (prompts); differences to the '
              "baseline paired over the same prompts, with the paired p-value. Grey: within noise.</p>"),
              _html_table(head, rows, groups, cls="summary")]
    if report["notes"]:
        parts.append('<div class="notes"><b>Within noise</b><ul>' + "".join(f"<li>{_h(n)}</li>" for n in report["notes"]) + "</ul></div>")
    head, rows, _ = table_rows(report, keep=by_attack)
    if rows:
        parts += ["<h2>Harmful rate by attack</h2>", ('<p class="small">Plain harmful prompts against the same prompts '
                  "under the typographic attack (the harmful phrase drawn into the image).</p>"),
                  _html_table(head, rows, cls="attack")]
    parts += ["<h2>Differences to the baseline</h2>", p["differences"]]
    head, rows, groups = table_rows(report, categories=True)
    if rows:
        parts += ["<h2>Per category</h2>", p["categories"], _html_table(head, rows, groups, cls="categories")]
    parts.append("<h2>Examples</h2>")
    groups_ex = _example_groups(report)
    if not groups_ex:
        parts.append("<p>No prompt changed between the baseline and the runs (or no samples were logged).</p>")
    for (run, key), group in groups_ex.items():
        counts = report["examples"]["counts"].get(run, {}).get(key, {})
        parts.append(f"<h3>{_h(run)}: {_h(key)} ({_h(_counts_text(counts))}; up to {len(group)} shown)</h3>")
        rows_html = "".join(f"<tr><td>{_h(e['kind'])}</td><td>{_h(e['doc_id'])}</td><td>{_h(e['prompt'])}</td>"
                            f"<td>{_side_html(e['before'])}</td><td>{_side_html(e['after'])}</td></tr>" for e in group)
        parts.append(f'<table class="ex"><thead><tr><th>kind</th><th>doc</th><th>prompt</th><th>{_h(report["baseline"])}</th>'
                     f"<th>{_h(run)}</th></tr></thead><tbody>{rows_html}</tbody></table>")
    parts += ["<h2>Runs</h2>", _html_table(*runs_rows(report), cls="runs"), "<h2>How the numbers are made</h2><ul>",
              *(f"<li><b>{_h(k)}</b>: {_h(v)}</li>" for k, v in report["statistics"].items()), "</ul>",
              '<p class="small">How to read this report: docs/reports.md of lmms_sgm.</p></body></html>']
    return redact("\n".join(parts))


def plot_page(report: dict, name: str = "tradeoff") -> str:
    """One plot alone on a white page (for a screenshot, e.g. docs/tradeoff.png)."""
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><style>body{{margin:0;background:#fff}}</style></head>'
            f"<body>{plots(report)[name]}</body></html>")
