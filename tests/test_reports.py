"""lmms_sgm.reports: reading lmms-eval results files and comparing runs, against hand-computed values."""
from __future__ import annotations

import json
import math
import os
import time

import pytest

from lmms_sgm import reports
from lmms_sgm.cli import main as cli
from lmms_sgm.reports import Row

LEXICON = {"name": "lexicon", "version": "1", "config": {"lexicon": {"source": "builtin", "terms": 20}}}


def _run(harm: float, harm_sampled: float, acc: float, over_refusal: float, cats: dict, n: int = 8,
         limit: float | None = None, judge: dict = LEXICON, tasks: tuple | None = None) -> dict:
    """A results.json as lmms-eval 0.7.3 writes it (only the keys the report reads, plus noise)."""
    results = {
        "mm_toxic_qa": {"alias": "mm_toxic_qa", "harmful_rate,none": harm, "harmful_rate_stderr,none": "N/A",
                        "harmful_rate_stderr_clt,none": 0.01, "judge,none": judge},
        "mm_toxic_qa_sampled": {"harmful_rate,samples": harm_sampled, "judge,samples": judge},
        "mm_toxic_qa_benign": {"over_refusal_rate,none": over_refusal, "harmful_rate_by_category,none": cats,
                               "judge,none": judge},
        "mmbench_local_mc": {"acc,none": acc, "acc_stderr,none": 0.02},
    }
    hib = {"mm_toxic_qa": {"harmful_rate": False, "judge": None}, "mm_toxic_qa_sampled": {"harmful_rate": False},
           "mm_toxic_qa_benign": {"over_refusal_rate": False, "harmful_rate_by_category": False},
           "mmbench_local_mc": {"acc": True}}
    keep = tasks or tuple(results)
    return {"results": {t: results[t] for t in keep}, "higher_is_better": {t: hib[t] for t in keep},
            "n-samples": {t: {"original": 200, "effective": n} for t in keep},
            "config": {"model": "sgm_llava", "limit": limit}}


def _write(root, run, name="20260101_000000_results.json", model_dir="sgm-demo-llava"):
    path = root / model_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run))
    return path


ROWS = [Row("harm", "mm_toxic_qa", "harmful_rate"),
        Row("harm sampled", "mm_toxic_qa_sampled", "harmful_rate", "samples"),
        Row("clean opinion", "mm_toxic_qa_benign", "harmful_rate_by_category", category="opinion"),
        Row("over-refusal", "mm_toxic_qa_benign", "over_refusal_rate", how="points"),
        Row("mc", "mmbench_local_mc", "acc", how="higher"),
        Row("absent", "mmbench", "acc", how="higher")]


def test_compare_values_changes_and_counts():
    vanilla = _run(0.5, 0.4, 0.8, 0.01, {"opinion": 0.0, "colour": 0.0})
    sgm = _run(0.05, 0.1, 0.76, 0.03, {"opinion": 0.02})
    table = reports.compare({"vanilla": vanilla, "sgm": sgm}, ROWS)
    assert table["baseline"] == "vanilla" and table["runs"] == ["vanilla", "sgm"] and table["warnings"] == []
    got = {r["label"]: (r["values"], r["changes"], r["n"]) for r in table["rows"]}
    assert got["harm"][0] == {"vanilla": 0.5, "sgm": 0.05} and got["harm"][2] == {"vanilla": 8, "sgm": 8}
    assert got["harm"][1]["sgm"] == pytest.approx(-0.9)
    assert got["harm sampled"][1]["sgm"] == pytest.approx(-0.75)
    assert got["clean opinion"][0] == {"vanilla": 0.0, "sgm": 0.02} and got["clean opinion"][1]["sgm"] is None
    assert got["clean opinion"][2] == {"vanilla": None, "sgm": None}  # per category: only from logged samples
    assert got["over-refusal"][1]["sgm"] == pytest.approx(2.0)
    assert got["mc"][1]["sgm"] == pytest.approx(0.95)
    assert got["absent"][0] == {"vanilla": None, "sgm": None} and got["absent"][2] == {"vanilla": None, "sgm": None}
    md = reports.to_markdown(table)
    lines = md.splitlines()
    assert "| metric | vanilla | sgm | sgm vs vanilla |" in lines
    assert "| harm | 0.500 (n=8) | 0.050 (n=8) | -90% (-45.0 pt), n=8 vs 8 |" in lines
    assert "| clean opinion | 0.000 (n=?) | 0.020 (n=?) | +2.0 pt (baseline 0), n=? vs ? |" in lines
    assert "| over-refusal | 0.010 (n=8) | 0.030 (n=8) | +2.0 pt, n=8 vs 8 |" in lines
    assert "| mc | 0.800 (n=8) | 0.760 (n=8) | 95.0% kept, n=8 vs 8 |" in lines
    assert "| absent | n/a | n/a | n/a |" in lines
    assert "Warning" not in md and "Results files" not in md  # runs given as dicts: no file to name


def test_three_runs_each_against_the_baseline():
    """Every run is compared with the first, not with the run before it: the middle run differs
    from the baseline, so a change against the previous run would read otherwise
    (best: -75% against paper, -80% against vanilla)."""
    runs = {"vanilla": _run(0.5, 0.4, 0.8, 0.01, {}), "paper": _run(0.4, 0.4, 0.6, 0.05, {}),
            "best": _run(0.1, 0.1, 0.4, 0.02, {})}
    table = reports.compare(runs, ROWS[:1] + ROWS[3:5])
    base = runs["vanilla"]["results"]
    for row in table["rows"]:
        b = base[row["task"]][f"{row['metric']},{row['filter']}"]
        for name in ("paper", "best"):
            v = runs[name]["results"][row["task"]][f"{row['metric']},{row['filter']}"]
            want = {"lower": (v - b) / b, "higher": v / b, "points": 100 * (v - b)}[row["how"]]
            assert row["changes"][name] == pytest.approx(want), (row["label"], name)
    assert table["rows"][0]["changes"] == {"paper": pytest.approx(-0.2), "best": pytest.approx(-0.8)}
    lines = reports.to_markdown(table).splitlines()
    assert "| metric | vanilla | paper | best | paper vs vanilla | best vs vanilla |" in lines
    assert "| harm | 0.500 (n=8) | 0.400 (n=8) | 0.100 (n=8) | -20% (-10.0 pt), n=8 vs 8 | -80% (-40.0 pt), n=8 vs 8 |" in lines
    assert "| over-refusal | 0.010 (n=8) | 0.050 (n=8) | 0.020 (n=8) | +4.0 pt, n=8 vs 8 | +1.0 pt, n=8 vs 8 |" in lines
    assert "| mc | 0.800 (n=8) | 0.600 (n=8) | 0.400 (n=8) | 75.0% kept, n=8 vs 8 | 50.0% kept, n=8 vs 8 |" in lines


def test_report_cli_compares_three_runs_each_with_the_baseline(tmp_path):
    """`lmms-sgm report` on three folders: every delta, relative change, retention and the
    operating point are against the first run (recomputed here from the values the runs hold)."""
    values = {"vanilla": (0.5, 0.4, 0.8), "paper": (0.4, 0.3, 0.6), "best": (0.1, 0.05, 0.78)}
    for name, (harm, sampled, acc) in values.items():
        _write(tmp_path / name, _run(harm, sampled, acc, 0.0, {}))
    js = tmp_path / "r.json"
    assert cli(["report", *(str(tmp_path / n) for n in values), "--json", str(js)]) == 0
    report = json.loads(js.read_text())
    assert report["baseline"] == "vanilla"
    metric = {("mm_toxic_qa", "harmful_rate"): 0, ("mm_toxic_qa_sampled", "harmful_rate"): 1, ("mmbench_local_mc", "acc"): 2}
    checked = 0
    for row in report["metrics"]:
        i = metric.get((row["task"], row["metric"]))
        if i is None or row["run"] == "vanilla":
            continue
        b, v = values["vanilla"][i], values[row["run"]][i]
        assert row["value"] == pytest.approx(v) and row["delta"] == pytest.approx(v - b), row
        assert row["relative_change"] == pytest.approx((v - b) / b), row
        if i == 2:
            assert row["retention"] == pytest.approx(v / b), row
        checked += 1
    assert checked == 6
    points = {p["run"]: p for p in report["tradeoff"]["points"]}
    assert points["best"]["retention"] == pytest.approx(0.78 / 0.8)  # 0.78 / 0.6 against paper
    assert points["paper"]["retention"] == pytest.approx(0.6 / 0.8)
    assert report["tradeoff"]["operating_point"] == "best"


def test_tasks_of_any_run_are_kept_and_missing_ones_said():
    base = _run(0.5, 0.4, 0.8, 0.0, {}, tasks=("mm_toxic_qa",))
    other = _run(0.25, 0.4, 0.7, 0.0, {}, tasks=("mm_toxic_qa", "mmbench_local_mc"))
    table = reports.compare({"vanilla": base, "sgm": other})
    rows = {(r["task"], r["metric"]): r for r in table["rows"]}
    assert rows[("mmbench_local_mc", "acc")]["values"] == {"vanilla": None, "sgm": 0.7}
    assert table["warnings"] == ["mmbench_local_mc: missing from vanilla"]
    assert "| mmbench_local_mc acc | n/a | 0.700 (n=8) | n/a |" in reports.to_markdown(table)


def test_warnings_on_different_limits_judges_and_prompt_counts():
    refusal = {**LEXICON, "name": "refusal"}
    runs = {"vanilla": _run(0.5, 0.4, 0.8, 0.0, {}, n=200),
            "smoke": _run(0.0, 0.4, 0.8, 0.0, {}, n=5, limit=5.0, judge=refusal, tasks=("mm_toxic_qa",))}
    w = reports.compare(runs, ROWS[:1])["warnings"]
    assert w[0] == "runs differ in --limit (vanilla: none, smoke: 5)"
    assert w[1].startswith("mm_toxic_qa: scored by different judges (vanilla: lexicon v1 ") and "smoke: refusal v1 " in w[1]
    assert w[2] == "mm_toxic_qa: different numbers of prompts (vanilla: 200, smoke: 5)"
    assert len(w) == 3
    md = reports.to_markdown(reports.compare(runs, ROWS[:1]))
    assert "**Warning:** runs differ in --limit (vanilla: none, smoke: 5)" in md
    assert "| harm | 0.500 (n=200) | 0.000 (n=5) | -100% (-50.0 pt), n=5 vs 200 |" in md


def test_category_counts_come_from_the_logged_samples(tmp_path):
    path = _write(tmp_path, _run(0.5, 0.4, 0.8, 0.0, {"opinion": 0.5, "colour": 0.0}))
    cats = ["opinion", "colour", "opinion", "colour", "colour"]
    path.with_name("20260101_000000_samples_mm_toxic_qa_benign.jsonl").write_text("".join(
        json.dumps({"doc_id": i, "harmful_rate_by_category": {"value": 0.0, "category": c}}) + "\n" for i, c in enumerate(cats)))
    run = reports.load_run(tmp_path)
    assert run["source_file"] == str(path)
    assert reports.count(run, ROWS[2]) == 2
    assert reports.count(run, ROWS[0]) == 8


def test_find_results_refuses_an_ambiguous_folder(tmp_path):
    smoke = _write(tmp_path, _run(0.5, 0.4, 0.8, 0.0, {}, n=5, limit=5.0), "20260101_000000_results.json")
    assert reports.find_results(tmp_path) == smoke
    full = _write(tmp_path, _run(0.3, 0.4, 0.8, 0.0, {}), "20260102_000000_results.json")
    with pytest.raises(ValueError, match="holds 2 lmms-eval results files") as e:
        reports.find_results(tmp_path)
    assert str(smoke) in str(e.value) and str(full) in str(e.value)
    assert reports.find_results(smoke) == smoke  # naming the file is how to choose
    past = time.time() - 100
    os.utime(smoke, (past, past))
    assert reports.find_results(tmp_path, newer_than=time.time() - 50) == full  # the demo: only this run's file
    with pytest.raises(FileNotFoundError, match="from this run"):
        reports.find_results(tmp_path, newer_than=time.time() + 10)
    with pytest.raises(FileNotFoundError, match="no such"):
        reports.find_results(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no lmms-eval"):
        reports.find_results(tmp_path / "empty")


def test_default_rows_follow_higher_is_better():
    rows = reports.default_rows(_run(0.5, 0.4, 0.8, 0.0, {}))
    assert {(r.task, r.metric, r.filter, r.how) for r in rows} == {
        ("mm_toxic_qa", "harmful_rate", "none", "lower"), ("mm_toxic_qa_sampled", "harmful_rate", "samples", "lower"),
        ("mm_toxic_qa_benign", "over_refusal_rate", "none", "lower"), ("mmbench_local_mc", "acc", "none", "higher")}


def test_report_cli(tmp_path, capsys):
    """Without logged samples: intervals from lmms-eval's standard errors (normal, unpaired), said in
    a warning; the folder gets report.html/.md/.json; the table is printed."""
    v = _write(tmp_path / "vanilla", _run(0.5, 0.4, 0.8, 0.0, {}))
    s = _write(tmp_path / "sgm", _run(0.25, 0.2, 0.8, 0.0, {}))
    out, js = tmp_path / "report", tmp_path / "r.json"
    assert cli(["report", str(tmp_path / "vanilla"), str(tmp_path / "sgm"), "--out", str(out), "--json", str(js)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json", "report.md"]
    assert printed.split("\nwritten:")[0] in (out / "report.md").read_text()
    assert f"- vanilla: `{v}`" in printed and f"- sgm: `{s}`" in printed
    assert "**Warning:** vanilla: no logged samples for mm_toxic_qa, mm_toxic_qa_sampled" in printed
    se = math.sqrt(2) * 0.01  # both runs' harmful_rate_stderr_clt
    p = math.erfc(0.25 / se / math.sqrt(2))
    assert (f"| harmful rate, plain prompts | 0.500 [0.480, 0.520] (n=8) | 0.250 [0.230, 0.270] (n=8) | "
            f"-0.250 [-0.278, -0.222] (-50%), p={p:.2g} |") in printed
    # retention by the delta method: 1.0 +- 1.96 * sqrt(2) * 0.02 / 0.8
    assert "| mmbench_local_mc acc | 0.800 [0.761, 0.839] (n=8) | 0.800 [0.761, 0.839] (n=8) | +0.000 [-0.055, +0.055], " \
           "100.0% kept [93.1%, 106.9%], p=1, within noise |" in printed
    assert "| harmful rate, plain prompts, sampled | 0.400 (n=8) | 0.200 (n=8) | -0.200 (-50%) |" in printed  # no stderr: no interval
    report = json.loads(js.read_text())
    assert report == json.loads((out / "report.json").read_text())
    assert report["baseline"] == "vanilla" and [r["label"] for r in report["runs"]] == ["vanilla", "sgm"]
    assert [r["path"] for r in report["runs"]] == [str(v), str(s)]
    row = next(r for r in report["metrics"] if r["run"] == "sgm" and r["task"] == "mm_toxic_qa" and r["metric"] == "harmful_rate")
    assert row["method"] == "stderr" and row["delta"] == pytest.approx(-0.25) and row["p_value"] == pytest.approx(p)
    assert cli(["report", str(tmp_path / "vanilla"), str(tmp_path / "sgm"), "--names", "a"]) == 2
    assert "1 names for 2 runs" in capsys.readouterr().err
    assert cli(["report", str(tmp_path / "vanilla"), str(tmp_path / "sgm"), "--out", str(tmp_path / "r.md")]) == 2
    assert "--out names a folder" in capsys.readouterr().err
    # A second run into the same folder: refused with the list, until a file is named.
    _write(tmp_path / "sgm", _run(0.0, 0.2, 0.8, 0.0, {}, n=5, limit=5.0), "20260103_000000_results.json")
    assert cli(["report", str(tmp_path / "vanilla"), str(tmp_path / "sgm")]) == 2
    assert "holds 2 lmms-eval results files" in capsys.readouterr().err
    assert cli(["report", str(tmp_path / "vanilla"), str(tmp_path / "sgm" / "sgm-demo-llava" / "20260103_000000_results.json"),
                "--names", "vanilla,smoke"]) == 0
    printed = capsys.readouterr().out
    assert "**Warning:** runs differ in --limit (vanilla: none, smoke: 5)" in printed
    assert "| harmful rate, plain prompts | 0.500 [0.480, 0.520] (n=8) | 0.000 [-0.020, 0.020] (n=5) |" in printed


def test_bad_row_kind():
    with pytest.raises(ValueError, match=r"Row\.how"):
        Row("x", "t", "m", how="up")


def test_change_by_kind_against_hand_values():
    """Bases other than 0.01 (where a relative change and points coincide: 1 / 0.01 = 100)."""
    from lmms_sgm.reports.table import change

    assert change(0.05, 0.02, "points") == pytest.approx(3.0)
    assert change(0.05, 0.02, "lower") == pytest.approx(1.5)
    assert change(0.05, 0.02, "higher") == pytest.approx(2.5)
    assert change(0.05, 0.0, "points") == pytest.approx(5.0)
    for how in ("lower", "higher"):
        assert change(0.05, 0.0, how) is None
    for how in ("lower", "higher", "points"):
        assert change(None, 0.02, how) is None and change(0.05, None, how) is None


def test_the_whole_markdown_table():
    """Every line of a two-run table with its results files, a warning, a zero baseline (points
    instead of a relative change) and a missing value: the format written out by hand."""
    vanilla = {**_run(0.0, 0.4, 0.8, 0.0, {}, limit=4.0), "source_file": "/runs/v/results.json"}
    sgm = {**_run(0.5, 0.1, 0.6, 0.25, {}), "source_file": "/runs/s/results.json"}
    rows = [Row("harm", "mm_toxic_qa", "harmful_rate"), Row("over", "mm_toxic_qa_benign", "over_refusal_rate", how="points"),
            Row("mc", "mmbench_local_mc", "acc", how="higher"), Row("absent", "mmbench", "acc", how="higher")]
    table = reports.compare({"vanilla": vanilla, "sgm": sgm}, rows)
    assert table["sources"] == {"vanilla": "/runs/v/results.json", "sgm": "/runs/s/results.json"}
    assert reports.to_markdown(table) == "\n".join([
        "Results files:",
        "- vanilla: `/runs/v/results.json`",
        "- sgm: `/runs/s/results.json`",
        "",
        "**Warning:** runs differ in --limit (vanilla: 4, sgm: none)  ",
        "",
        "n: prompts behind each number.",
        "",
        "| metric | vanilla | sgm | sgm vs vanilla |",
        "|---|---|---|---|",
        "| harm | 0.000 (n=8) | 0.500 (n=8) | +50.0 pt (baseline 0), n=8 vs 8 |",
        "| over | 0.000 (n=8) | 0.250 (n=8) | +25.0 pt, n=8 vs 8 |",
        "| mc | 0.800 (n=8) | 0.600 (n=8) | 75.0% kept, n=8 vs 8 |",
        "| absent | n/a | n/a | n/a |",
    ]) + "\n"


def test_default_rows_keep_scored_scalar_metrics_only():
    run = {"results": {"a_task": {"alias": "a", "x,none": 0.1},
                       "b_task": {"unscored,none": 0.3, "acc,none": 0.5, "acc_stderr,none": 0.1, "flag,none": True,
                                  "ppl,samples": 3.0, "cats,none": {"c": 0.1}}},
           "higher_is_better": {"b_task": {"unscored": None, "acc": True, "acc_stderr": True, "flag": True, "ppl": False,
                                           "cats": False}}}
    assert reports.default_rows(run) == [Row("b_task acc", "b_task", "acc", "none", "higher"),
                                         Row("b_task ppl [samples]", "b_task", "ppl", "samples", "lower")]
    assert reports.default_rows({}) == [] and reports.default_rows({"results": {"t": {"acc,none": 1.0}}}) == []
    row = Row("acc", "b_task", "acc")
    assert reports.table.count(run, row) is None  # no n-samples recorded
    assert reports.table.count({**run, "n-samples": {"b_task": {"effective": "?"}}}, row) is None
    assert reports.table.count({**run, "n-samples": {"other": {"effective": 3}}}, row) is None
    assert reports.table.count({**run, "n-samples": {"b_task": {"effective": 3.0}}}, row) == 3


def test_report_reads_nested_categories_and_skips_group_rows_in_the_samples_warning():
    """A metric whose value nests dicts (mmbench's category / l2-category) gets one row per leaf,
    named by its path; a group's row (lmms-eval's group_subtasks, lm-eval's groups) has no samples
    of its own and is not listed as lacking them."""
    from lmms_sgm.reports import build

    def run(acc_a, acc_b):
        r = _run(0.5, 0.4, 0.8, 0.0, {}, tasks=("mm_toxic_qa", "mmbench_local_mc"))
        r["results"]["mmbench_local"] = {"accuracy_by_category,none": {"category": {"a": acc_a}, "l2-category": {"b": acc_b}}}
        r["results"]["mm_toxic_qa_all"] = {"harmful_rate,none": 0.5}
        r["results"]["lm_group"] = {"acc,none": 0.7}
        r["higher_is_better"].update(mmbench_local={"accuracy_by_category": True}, mm_toxic_qa_all={"harmful_rate": False},
                                     lm_group={"acc": True})
        r["group_subtasks"] = {"mm_toxic_qa_all": ["mm_toxic_qa"]}
        r["groups"] = {"lm_group": {}}
        return r

    report = build({"vanilla": run(0.5, 0.25), "sgm": run(0.4, 0.25)}, resamples=200)
    rows = {(r["category"], r["run"]): r for r in report["metrics"] if r["task"] == "mmbench_local"}
    assert set(rows) == {(c, n) for c in ("category/a", "l2-category/b") for n in ("vanilla", "sgm")}
    assert rows[("category/a", "sgm")]["value"] == 0.4 and rows[("category/a", "sgm")]["delta"] == pytest.approx(-0.1)
    assert rows[("l2-category/b", "vanilla")]["value"] == 0.25
    lacking = [w for w in report["warnings"] if "no logged samples for" in w]
    assert len(lacking) == 2 and all("mm_toxic_qa_all" not in w and "lm_group" not in w for w in lacking)
    assert all("mm_toxic_qa" in w and "mmbench_local" in w for w in lacking)


def test_values_that_are_no_numbers_read_as_missing():
    from lmms_sgm.reports.table import to_markdown, value

    run = {"results": {"t": {"m,none": "N/A", "b,none": True, "c,none": {"x": 0.5, "y": "?"}, "s,none": 0.25}}}
    assert value(run, Row("m", "t", "m")) is None and value(run, Row("b", "t", "b")) is None
    assert value(run, Row("c", "t", "c", category="x")) == 0.5 and value(run, Row("c", "t", "c", category="y")) is None
    assert value(run, Row("s", "t", "s", category="x")) is None  # a scalar has no categories
    assert value({}, Row("s", "t", "s")) is None
    # a table built by hand, without sources, warnings or counts
    table = {"runs": ["a", "b"], "baseline": "a", "rows": [{"label": "s", "how": "lower", "values": {"a": 0.5, "b": 0.25},
                                                            "changes": {"b": -0.5}}]}
    assert to_markdown(table).splitlines()[-1] == "| s | 0.500 (n=?) | 0.250 (n=?) | -50% (-25.0 pt), n=? vs ? |"


def test_per_doc_reads_every_logged_value_form_sorted_by_doc_id():
    """Numbers, booleans, our dicts (score / value / nll, category) and lm-eval's [ll, weight] pairs."""
    from lmms_sgm.reports import results as rs
    samples = [{"doc_id": 6, "m": True}, {"doc_id": 0, "m": 0.25}, {"doc_id": 1, "m": {"nll": 2.0, "category": "x"}},
               {"doc_id": 3, "m": {"category": "x"}},  # no value for this doc (e.g. no reference answer): left out
               {"doc_id": 4, "m": [-3.0, 2]}, {"doc_id": 5}, {"doc_id": 2, "m": {"value": 0.5, "category": "y"}},
               {"doc_id": 7, "m": {"score": 0, "category": "x"}}]
    d = rs.per_doc(samples, "m", "none")
    assert d.ids == [0, 1, 2, 4, 6, 7] and d.categories == [None, "x", "y", None, None, "x"]
    assert d.a.tolist() == [0.25, 2.0, 0.5, -3.0, 1.0, 0.0] and d.w.tolist() == [1.0, 1.0, 1.0, 2.0, 1.0, 1.0]
    x = d.subset("x")
    assert x.ids == [1, 7] and x.a.tolist() == [2.0, 0.0] and x.w.tolist() == [1.0, 1.0] and x.categories == ["x", "x"]
    assert x.value("mean") == 1.0 and d.value("mean") == pytest.approx(0.75 / 7)  # sum a / sum w by hand


@pytest.mark.parametrize("bad", [math.nan, math.inf, "0.5", {"score": "high", "category": "x"},
                                 {"value": None, "category": "x"}, {"nll": "?", "category": "x"},
                                 {"score": True, "category": "x"}, {"other": 1.0}, [1.0, 2.0, 3.0], [True, 1.0],
                                 ["a", 1.0], [], None])
def test_per_doc_refuses_values_that_are_not_numbers(bad):
    from lmms_sgm.reports import results as rs
    assert rs.per_doc([{"doc_id": 0, "m": 0.5}, {"doc_id": 1, "m": bad}], "m", "none") == "per-sample values of m are not numbers"


def test_per_doc_value_is_none_without_documents_or_weight():
    import numpy as np

    from lmms_sgm.reports import results as rs
    assert rs.PerDoc([], np.array([]), np.array([]), []).value("mean") is None
    assert rs.PerDoc([0, 1], np.array([0.0, 0.0]), np.array([0.0, 0.0]), [None, None]).value("mean") is None
    assert rs.per_doc([{"doc_id": 0, "m": {"category": "x"}}], "m", "none") == "no per-sample values of m logged"


def test_merge_keeps_both_harnesses_and_refuses_overlapping_tasks():
    from lmms_sgm.reports import results as rs

    lmms = {
        "results": {"a": {"x,none": 1}},
        "configs": {"a": {}},
        "config": {"limit": None, "model": "m"},
        "source_file": "/r/1_results.json",
    }
    lm = {"results": {"b": {"y,none": 2}}, "configs": {"b": {}}, "config": {"limit": 5, "model": "hf"}, "source_file": "/r/results_1.json"}
    run = rs.merge(lmms, lm)
    assert run["results"] == {"a": {"x,none": 1}, "b": {"y,none": 2}} and run["config"] == lmms["config"]
    assert run["lm_eval_config"] == {"limit": 5, "model": "hf"}  # the text-only leg's own settings are kept
    assert run["task_sources"] == {"a": "/r/1_results.json", "b": "/r/results_1.json"}
    assert "lm_eval_config" in rs.merge(lmms, {k: v for k, v in lm.items() if k != "config"})
    assert rs.merge(lmms, {k: v for k, v in lm.items() if k != "config"})["lm_eval_config"] == {}
    with pytest.raises(ValueError, match="both hold a: pass them as two runs"):
        rs.merge(lmms, {**lm, "results": {"a": {}, "b": {}}})


def test_decoding_warning_spells_each_setting_of_each_run():
    """Unset where a run lacks the setting, JSON for non-strings (booleans, numbers, lists), strings as they are."""
    a, b = _run(0.5, 0.4, 0.8, 0.0, {}, tasks=("mm_toxic_qa",)), _run(0.5, 0.4, 0.8, 0.0, {}, tasks=("mm_toxic_qa",))
    a["configs"] = {"mm_toxic_qa": {"generation_kwargs": {"do_sample": False, "stop": "USER:", "max_new_tokens": 8, "until": ["x"]}}}
    b["configs"] = {"mm_toxic_qa": {"output_type": "generate_until",
                                    "generation_kwargs": {"do_sample": True, "stop": "ASSISTANT:", "max_new_tokens": 8, "top_p": 0.9,
                                                          "until": ["x", "y"]}}}
    w = reports.compare({"vanilla": a, "sgm": b}, ROWS[:1])["warnings"]
    assert w == [('mm_toxic_qa: runs differ in decoding settings (vanilla: do_sample=false, stop=USER:, top_p=unset, until=["x"]; '
                  'sgm: do_sample=true, stop=ASSISTANT:, top_p=0.9, until=["x", "y"])')]


def test_default_rows_split_the_key_at_its_first_comma():
    """``<metric>,<filter>``: a filter name may itself hold a comma; the metric is what precedes the first."""
    run = {"results": {"t": {"acc,take,first": 0.5}}, "higher_is_better": {"t": {"acc": True}}}
    assert reports.default_rows(run) == [Row("t acc [take,first]", "t", "acc", "take,first", "higher")]


def test_an_infinite_value_is_written_as_python_formats_it():
    """A perplexity may overflow to inf (JSON ``Infinity``): the table shows ``inf``, as format(x, '.3f') does."""
    table = reports.compare({"vanilla": {"results": {"t": {"ppl,none": math.inf}}}}, [Row("ppl", "t", "ppl")])
    assert f"| ppl | {format(math.inf, '.3f')} (n=?) |" in reports.to_markdown(table)


def test_per_doc_orders_numeric_ids_before_string_ids_each_sorted():
    from lmms_sgm.reports import results as rs
    samples = [{"doc_id": d, "m": float(i)} for i, d in enumerate(["b", 10, "a", 2, "c", 0])]
    assert rs.per_doc(samples, "m", "none").ids == [0, 2, 10, "a", "b", "c"]


def test_per_doc_says_why_lines_cannot_be_joined():
    from lmms_sgm.reports import results as rs
    assert rs.per_doc([{"doc_id": 0, "m": 1.0}, {"m": 0.0}], "m", "none") == "sample lines carry no doc_id"
    dup = [{"doc_id": 0, "m": 1.0}, {"doc_id": 3, "m": 1.0}, {"doc_id": 3, "m": 0.0}]
    assert rs.per_doc(dup, "m", "none") == "doc 3 is logged more than once (several filters without a filter key)"
    assert rs.per_doc(None, "m", "none") == "samples not logged"
    # with a filter key, the other filter's lines are not duplicates
    assert rs.per_doc([{**x, "filter": f} for x, f in zip(dup[1:], ("none", "strict"))], "m", "none").ids == [3]


def test_estimator_finds_the_transform_that_reproduces_the_aggregate():
    import numpy as np

    from lmms_sgm.reports import results as rs
    one = rs.PerDoc([0, 1], np.array([1.0, 2.0]), np.array([1.0, 1.0]), [None, None])
    assert rs.estimator(one, 1.5) == "mean" and rs.estimator(one, math.exp(1.5)) == "exp_mean"
    assert rs.estimator(one, math.exp(-1.5)) == "exp_neg_mean" and rs.estimator(one, 1.4) is None
    # weighted [loglikelihood, bytes] pairs: bits per byte = -sum ll / sum w / ln 2, by hand
    ll = rs.PerDoc([0, 1], np.array([-3.0, -5.0]), np.array([2.0, 4.0]), [None, None])
    assert rs.estimator(ll, 8 / 6 / math.log(2)) == "bits" and rs.estimator(ll, math.exp(8 / 6)) == "exp_neg_mean"
    assert rs.estimator(ll, -8 / 6) == "mean" and rs.estimator(ll, math.exp(-8 / 6)) is None  # exp_mean is not tried


def _digest_run(root, name, prompts, keys=("alias", "acc,flex", "acc_stderr,flex"), filt="flex", targets=None, question="same"):
    """A run whose task ``t`` has logged lm-eval-style lines (prompt in ``arguments``) under one filter."""
    d = root / name
    d.mkdir()
    lines = [{"doc_id": i, "filter": filt, "target": (targets or ["A"] * len(prompts))[i], "doc": {"question": question},
              "arguments": {"gen_args_0": {"arg_0": p, "arg_1": " A"}}} for i, p in enumerate(prompts)]
    (d / "samples_t_2026.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return {"results": {"t": dict.fromkeys(keys, 0.5)}, "configs": {"t": {}}, "source_file": str(d / "results_2026.json")}


def test_data_digest_tells_prompts_and_targets_apart_under_the_first_filter(tmp_path):
    digest = reports.results.data_digest
    a = digest(_digest_run(tmp_path, "a", ["p0", "p1"]), "t")
    assert a.startswith("samples:") and len(a) == len("samples:") + 16
    assert digest(_digest_run(tmp_path, "same", ["p0", "p1"], question="other"), "t") == a  # doc fields are not the prompt
    assert digest(_digest_run(tmp_path, "b", ["p0", "p2"]), "t") != a
    assert digest(_digest_run(tmp_path, "c", ["p0", "p1"], targets=["A", "B"]), "t") != a
    # the first metric key's filter, skipping keys without one and stderr keys, whatever their order
    odd = ("alias", "acc_stderr,strict", "acc,flex")
    assert digest(_digest_run(tmp_path, "d", ["p0", "p1"], odd), "t") != digest(_digest_run(tmp_path, "e", ["p0", "p2"], odd), "t")
    comma = ("acc,take,first",)  # a filter name holding a comma
    assert (digest(_digest_run(tmp_path, "f", ["p0"], comma, filt="take,first"), "t")
            != digest(_digest_run(tmp_path, "g", ["p1"], comma, filt="take,first"), "t"))
    bare = _digest_run(tmp_path, "bare", ["p0"], filt="none")  # the task not (or no longer) in the results: filter "none"
    assert digest({**bare, "results": {}}, "t") == digest({k: v for k, v in bare.items() if k != "results"}, "t")
    assert digest({**bare, "results": {}}, "t") != digest({**_digest_run(tmp_path, "bare2", ["p1"], filt="none"), "results": {}}, "t")
    plain = ("acc",)  # no filter recorded: lmms-eval's default "none"
    assert (digest(_digest_run(tmp_path, "h", ["p0"], plain, filt="none"), "t")
            != digest(_digest_run(tmp_path, "i", ["p1"], plain, filt="none"), "t"))


def test_prompt_of_each_logged_form():
    p = reports.results.prompt_of
    assert p({"input": "lmms", "arguments": {"a": {"arg_0": "no"}}}) == "lmms"
    assert p({"arguments": {"gen_args_0": {"arg_0": "lm dict", "arg_1": "x"}}, "doc": {"question": "q"}}) == "lm dict"
    assert p({"arguments": {"gen_args_0": {"arg_1": "x"}}}) == ""
    assert p({"arguments": [["lm list", "x"]]}) == "lm list" and p({"arguments": ["flat"]}) == "flat"
    assert p({"doc": {"question": "q"}}) == "q" and p({"doc": "text"}) == "" and p({}) == "" and p({"doc": {"page": "t"}}) == ""
    assert p({"arguments": [], "doc": {"question": "q"}}) == "q" and p({"arguments": "text", "doc": {"question": "q"}}) == "q"
    assert p({"arguments": {}, "doc": {"question": "q"}}) == ""  # logged arguments rule, even empty (rolling log-likelihood)


def test_estimator_skips_an_overflowing_transform_silently_and_keeps_its_tolerance_bound():
    import warnings

    import numpy as np

    from lmms_sgm.reports import results as rs
    big = rs.PerDoc([0], np.array([1000.0]), np.array([1.0]), [None])  # exp(1000) overflows
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rs.estimator(big, 5.0) is None
    tiny = rs.PerDoc([0], np.array([1e-9]), np.array([1.0]), [None])
    assert rs.estimator(tiny, 0.0) == "mean"  # |v - reported| = 1e-9 + 1e-6 * 0: on the bound, accepted
    assert rs.estimator(tiny, -1e-9) is None


def test_responses_prefer_the_filtered_ones_and_flatten():
    r = reports.results.responses
    assert r({"filtered_resps": [["a", None], "b"], "resps": [["raw"]]}) == ["a", "b"]
    assert r({"resps": [["raw", ["x", 2]]]}) == ["raw", "x", "2"] and r({}) == []


def test_judge_label_names_version_and_config_digest():
    import hashlib
    j = {"name": "llamaguard", "version": "3", "config": {"b": 1, "a": [2]}}
    digest = hashlib.sha256(json.dumps({"a": [2], "b": 1}, sort_keys=True).encode()).hexdigest()[:8]
    assert reports.comparable.judge_label(j) == f"llamaguard v3 {digest}"
    assert reports.comparable.judge_label(None) == "none recorded"


def test_mismatch_warnings_spelled_in_full_for_several_runs():
    import hashlib

    def judge(name):
        return {"name": name, "version": "1", "config": {"k": name}}

    def label(name):
        return f"{name} v1 " + hashlib.sha256(json.dumps({"k": name}).encode()).hexdigest()[:8]

    def run(j, path, n):
        return {"results": {"t": {"acc,none": 0.5, "judge,none": judge(j)}},
                "configs": {"t": {"output_type": "multiple_choice", "dataset_path": path}}, "n-samples": {"t": {"effective": n}}}

    runs = {"a": run("j1", "x", 5), "b": run("j2", "y", 5), "c": {"results": {}}, "d": {}}
    w = reports.comparable.mismatches(runs, ["absent", "t"])
    assert w[:2] == ["t: missing from c, d", f"t: scored by different judges (a: {label('j1')}, b: {label('j2')})"]
    assert w[2].startswith("t: runs were evaluated on different data (the task's dataset settings differ: a: config:")
    assert ", b: config:" in w[2] and w[2].endswith(")") and len(w) == 3
    # a third run with another prompt count: the count says the data differ, no second warning about the data
    runs = {"a": run("j1", "x", 5), "b": run("j1", "y", 5), "c": run("j1", "x", 6)}
    assert reports.comparable.mismatches(runs, ["t"]) == ["t: different numbers of prompts (a: 5, b: 5, c: 6)"]


def test_limit_warning_spells_counts_fractions_and_other_values():
    runs = {n: {"results": {}, "config": {"limit": v}} for n, v in
            (("a", None), ("b", 5), ("c", 0.5), ("d", 1000000), ("e", "10%"))}
    assert reports.comparable.mismatches(runs, []) == [
        f"runs differ in --limit (a: none, b: 5, c: 0.5, d: {format(1000000, 'g')}, e: 10%)"]


def test_models_warning_reads_pretrained_from_model_args_else_the_sgm_record():
    def run(model_args=None, sgm=None):
        r = {"results": {"t": {"acc,none": 0.5}}, "config": {}}
        if model_args is not None:
            r["config"]["model_args"] = model_args
        if sgm is not None:
            r["results"]["t"]["sgm,none"] = sgm
        return r
    runs = {"a": run("pretrained=/ckpt/step=1000, sgm=off"), "b": run(sgm={"sgm": True, "pretrained": "other"}),
            "c": run("dtype=bf16", sgm={"sgm": False}), "d": run()}
    assert reports.comparable.mismatches(runs, []) == [
        "runs are of different models (a: /ckpt/step=1000, b: other, c: None, d: None)"]
    same = {"a": run(" pretrained = m ,x=1"), "b": run(sgm={"sgm": True, "pretrained": "m"}), "c": run()}
    assert reports.comparable.mismatches(same, []) == []  # unknown models do not count as different
    spaced = {"a": run(" pretrained = m ,x=1"), "b": run("pretrained=n")}
    assert reports.comparable.mismatches(spaced, []) == ["runs are of different models (a: m, b: n)"]
