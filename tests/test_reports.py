"""lmms_sgm.reports: reading lmms-eval results files and comparing runs, against hand-computed values."""
from __future__ import annotations

import json
import os
import time

import pytest

from lmms_sgm import reports
from lmms_sgm.cli import main as cli
from lmms_sgm.reports import Row


def _run(harm: float, harm_sampled: float, acc: float, over_refusal: float, cats: dict) -> dict:
    """A results.json as lmms-eval 0.7.3 writes it (only the keys the report reads, plus noise)."""
    return {
        "results": {
            "mm_toxic_qa": {"alias": "mm_toxic_qa", "harmful_rate,none": harm, "harmful_rate_stderr,none": "N/A",
                            "harmful_rate_stderr_clt,none": 0.01, "judge,none": {"name": "lexicon"}},
            "mm_toxic_qa_sampled": {"harmful_rate,samples": harm_sampled},
            "mm_toxic_qa_benign": {"over_refusal_rate,none": over_refusal, "harmful_rate_by_category,none": cats},
            "mmbench_local_mc": {"acc,none": acc, "acc_stderr,none": 0.02},
        },
        "higher_is_better": {"mm_toxic_qa": {"harmful_rate": False, "judge": None},
                             "mm_toxic_qa_sampled": {"harmful_rate": False},
                             "mm_toxic_qa_benign": {"over_refusal_rate": False, "harmful_rate_by_category": False},
                             "mmbench_local_mc": {"acc": True}},
    }


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


def test_compare_values_and_changes():
    vanilla = _run(0.5, 0.4, 0.8, 0.01, {"opinion": 0.0, "colour": 0.0})
    sgm = _run(0.05, 0.1, 0.76, 0.03, {"opinion": 0.02})
    table = reports.compare({"vanilla": vanilla, "sgm": sgm}, ROWS)
    assert table["baseline"] == "vanilla" and table["runs"] == ["vanilla", "sgm"]
    got = {r["label"]: (r["values"], r["changes"]) for r in table["rows"]}
    assert got["harm"][0] == {"vanilla": 0.5, "sgm": 0.05}
    assert got["harm"][1]["sgm"] == pytest.approx(-0.9)
    assert got["harm sampled"][1]["sgm"] == pytest.approx(-0.75)
    assert got["clean opinion"][0] == {"vanilla": 0.0, "sgm": 0.02} and got["clean opinion"][1]["sgm"] is None
    assert got["over-refusal"][1]["sgm"] == pytest.approx(2.0)
    assert got["mc"][1]["sgm"] == pytest.approx(0.95)
    assert got["absent"][0] == {"vanilla": None, "sgm": None}
    md = reports.to_markdown(table)
    lines = md.splitlines()
    assert lines[0] == "| metric | vanilla | sgm | sgm vs vanilla |"
    assert "| harm | 0.500 | 0.050 | -90% (-45.0 pt) |" in lines
    assert "| clean opinion | 0.000 | 0.020 | +2.0 pt (baseline 0) |" in lines
    assert "| over-refusal | 0.010 | 0.030 | +2.0 pt |" in lines
    assert "| mc | 0.800 | 0.760 | 95.0% kept |" in lines
    assert "| absent | n/a | n/a | n/a |" in lines


def test_default_rows_follow_higher_is_better():
    rows = reports.default_rows(_run(0.5, 0.4, 0.8, 0.0, {}))
    assert {(r.task, r.metric, r.filter, r.how) for r in rows} == {
        ("mm_toxic_qa", "harmful_rate", "none", "lower"), ("mm_toxic_qa_sampled", "harmful_rate", "samples", "lower"),
        ("mm_toxic_qa_benign", "over_refusal_rate", "none", "lower"), ("mmbench_local_mc", "acc", "none", "higher")}


def test_find_results_picks_the_newest_and_filters_by_time(tmp_path):
    old = _write(tmp_path, _run(0.5, 0.4, 0.8, 0.0, {}), "20260101_000000_results.json")
    past = time.time() - 100
    os.utime(old, (past, past))
    new = _write(tmp_path, _run(0.3, 0.4, 0.8, 0.0, {}), "20260102_000000_results.json")
    assert reports.find_results(tmp_path) == new
    assert reports.find_results(old) == old
    with pytest.raises(FileNotFoundError, match="from this run"):
        reports.find_results(tmp_path, newer_than=time.time() + 10)
    with pytest.raises(FileNotFoundError, match="no such"):
        reports.find_results(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no lmms-eval"):
        reports.find_results(tmp_path / "empty")


def test_report_cli(tmp_path, capsys):
    _write(tmp_path / "vanilla", _run(0.5, 0.4, 0.8, 0.0, {}))
    _write(tmp_path / "sgm", _run(0.25, 0.2, 0.8, 0.0, {}))
    out, js = tmp_path / "r.md", tmp_path / "r.json"
    assert cli(["report", str(tmp_path / "vanilla"), str(tmp_path / "sgm"), "--out", str(out), "--json", str(js)]) == 0
    printed = capsys.readouterr().out
    assert printed == out.read_text()
    assert "| mm_toxic_qa harmful_rate | 0.500 | 0.250 | -50% (-25.0 pt) |" in printed
    assert "| mmbench_local_mc acc | 0.800 | 0.800 | 100.0% kept |" in printed
    assert json.loads(js.read_text())["runs"] == ["vanilla", "sgm"]
    assert cli(["report", str(tmp_path / "vanilla"), str(tmp_path / "sgm"), "--names", "a"]) == 2
    assert "1 names for 2 runs" in capsys.readouterr().err


def test_bad_row_kind():
    with pytest.raises(ValueError, match="Row.how"):
        Row("x", "t", "m", how="up")
