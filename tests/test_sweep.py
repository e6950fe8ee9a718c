"""lmms-sgm sweep's plan, settings and resume logic, with lmms-eval replaced by a stand-in that writes
results folders (the real CLI, and a SIGKILL mid-sweep, are in test_report_e2e.py)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import ClassVar

import pytest

from lmms_sgm.cli import main as cli
from lmms_sgm.demo import BEST, GLASSES_DIR
from lmms_sgm.reports import runner, sweep
from test_report_build import lmms_run

PAPER = str(GLASSES_DIR / "paper_default")
OTHER = str(GLASSES_DIR / BEST)


def test_plan_vanilla_first_strength_zero_is_vanilla_several_glasses():
    points = sweep.plan([PAPER, OTHER, "/x/paper_default"], [0.0, 0.5, 1.0])
    assert [(p.name, p.folder, p.strength) for p in points] == [
        ("vanilla", "vanilla", 0.0),
        ("paper_default s=0.5", "paper_default_s0.5", 0.5), ("paper_default s=1", "paper_default_s1", 1.0),
        (f"{BEST} s=0.5", f"{BEST}_s0.5", 0.5), (f"{BEST} s=1", f"{BEST}_s1", 1.0),
        ("paper_default_2 s=0.5", "paper_default_2_s0.5", 0.5), ("paper_default_2 s=1", "paper_default_2_s1", 1.0)]
    assert points[0].glasses is None and points[1].glasses == PAPER


@pytest.mark.parametrize("text", ["", "0,2", "a,b", "-0.1"])
def test_bad_strengths(text):
    with pytest.raises(ValueError, match="--strengths"):
        sweep.parse_strengths(text)


def test_strengths_are_sorted_and_unique():
    assert sweep.parse_strengths("1,0.5,0,0.5") == [0.0, 0.5, 1.0]


class FakeLmmsEval:
    """Stands in for runner.run: writes a results folder whose harmful rate falls with the strength,
    and can fail at a chosen point (an interrupted sweep)."""

    def __init__(self, fail_at: str | None = None):
        self.calls, self.fail_at = [], fail_at

    def __call__(self, name, cmd, env, folder, what, prefix="", quiet=False, die_with_parent=False):
        self.calls.append((name, cmd))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "lmms_eval.log").write_text("started\n")
        if name == self.fail_at:
            raise KeyboardInterrupt  # killed half-way: a log, no results, no point.json
        model_args = cmd[cmd.index("--model_args") + 1]
        strength = 0.0 if "sgm=off" in model_args else float(model_args.split("strength=")[1].split(",")[0])
        harm = {0.0: [1, 1, 1, 1, 0, 0, 0, 0], 0.5: [1, 1, 1, 1, 1, 0, 0, 0]}.get(strength, [1, 0, 0, 0, 0, 0, 0, 0])
        acc = [1] * 10 if strength < 1 else [1] * 9 + [0]
        return lmms_run(folder, harm=harm, sampled=[[h] * 5 for h in harm], acc=acc, helpful=[1, 1], over=[0, 0],
                        cats=["insult"] * 8, model_args=cmd[cmd.index("--model_args") + 1])


def sweep_args(out: Path, *extra) -> list[str]:
    return ["sweep", "--pretrained", "sgm-demo-llava", "--glasses", PAPER, "--strengths", "0,0.5,1", "--tasks",
            "mm_toxic_qa,mmbench_local_mc", "--out", str(out), "--no-progress", *extra]


def test_an_interrupted_sweep_reruns_only_what_did_not_finish(tmp_path, monkeypatch, capsys):
    fake = FakeLmmsEval(fail_at="paper_default s=0.5")
    monkeypatch.setattr(runner, "run", fake)
    assert cli(sweep_args(tmp_path)) == 130  # Ctrl-C: the CLI's one line and exit 130
    assert "interrupted" in capsys.readouterr().err
    assert (tmp_path / "vanilla" / "point.json").is_file() and not (tmp_path / "paper_default_s0.5" / "point.json").exists()
    assert not (tmp_path / "sweep.lock").exists()  # released on the way out
    first = (tmp_path / "vanilla" / "point.json").read_text()
    fake = FakeLmmsEval()
    monkeypatch.setattr(runner, "run", fake)
    assert cli(sweep_args(tmp_path)) == 0
    assert [c[0] for c in fake.calls] == ["paper_default s=0.5", "paper_default s=1"]
    assert (tmp_path / "vanilla" / "point.json").read_text() == first
    err = capsys.readouterr().err
    assert "[sweep] vanilla: finished before, kept" in err and "paper_default s=0.5: removed the interrupted run's folder" in err
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["label"] for r in report["runs"]] == ["vanilla", "paper_default s=0.5", "paper_default s=1"]
    # s=0.5 is worse than vanilla (dominated, and no lower harm); s=1 cuts the harm but keeps 90% of the accuracy
    t = report["tradeoff"]
    assert [p["pareto"] for p in t["points"]] == [True, False, True] and t["operating_point"] is None
    assert cli(sweep_args(tmp_path, "--min-retention", "0.9")) == 0  # another rule: only the report changes
    assert fake.calls[2:] == [] and json.loads((tmp_path / "report.json").read_text())["tradeoff"]["operating_point"] == "paper_default s=1"
    cmd = json.loads((tmp_path / "paper_default_s1" / "point.json").read_text())["command"]
    assert cmd[cmd.index("--model_args") + 1] == f"pretrained=sgm-demo-llava,glasses={PAPER},strength=1,mode=hooks"
    assert "--log_samples" in cmd and cmd[cmd.index("--seed") + 1] == "0"


def test_other_settings_in_the_same_folder_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "run", FakeLmmsEval())
    assert cli(sweep_args(tmp_path)) == 0
    capsys.readouterr()
    assert cli(sweep_args(tmp_path, "--limit", "3")) == 2
    err = capsys.readouterr().err
    assert "holds a sweep with other settings (limit: None then, 3 now)" in err


def test_a_running_sweep_is_not_joined(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "run", FakeLmmsEval())
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "sweep.lock").write_text(str(os.getppid()))  # a live process that is not this one
    assert cli(sweep_args(tmp_path)) == 2
    assert f"a sweep (pid {os.getppid()}) is writing {tmp_path}" in capsys.readouterr().err
    (tmp_path / "sweep.lock").write_text("999999999")  # a stale lock (no such process) is taken over
    assert cli(sweep_args(tmp_path)) == 0


def test_missing_glasses_are_a_clear_error(tmp_path, capsys):
    assert cli(["sweep", "--pretrained", "m", "--glasses", str(tmp_path / "nope"), "--tasks", "mm_toxic_qa",
                "--out", str(tmp_path / "o")]) == 2
    assert "--glasses: no glasses at" in capsys.readouterr().err


class MethodsLmmsEval:
    """Stands in for runner.run for method points: each method's harm and accuracy by its model args."""

    OUTCOMES: ClassVar[dict] = {  # a key found in the model args -> (harmful per prompt, accuracy per question)
        "sgm=off,defenses=self_check": ([1, 0, 0, 0, 0, 0, 0, 0], [1] * 10),  # least harm, full accuracy
        "select_rule=det0": ([0, 0, 0, 0, 0, 0, 0, 0], [1] * 6 + [0] * 4),  # no harm, but 60% retention
        "glasses=/x/ungated_steering": ([1, 1, 1, 0, 0, 0, 0, 0], [1] * 10),  # lmms-sgm steer --gated false
        "sgm=off": ([1, 1, 1, 1, 0, 0, 0, 0], [1] * 10),  # vanilla
    }

    def __init__(self):
        self.calls = []

    def __call__(self, name, cmd, env, folder, what, prefix="", quiet=False, die_with_parent=False):
        margs = cmd[cmd.index("--model_args") + 1]
        self.calls.append((name, margs))
        harm, acc = next(v for k, v in self.OUTCOMES.items() if k in margs)
        return lmms_run(folder, harm=harm, sampled=[[h] * 5 for h in harm], acc=acc, helpful=[1, 1], over=[0, 0],
                        cats=["insult"] * 8, model_args=margs)


def test_methods_are_points_compared_at_matched_retention(tmp_path, monkeypatch, capsys):
    fake = MethodsLmmsEval()
    monkeypatch.setattr(runner, "run", fake)
    points = ["--point", f"det0_k50=glasses={PAPER},select_rule=det0,select_top_k=50",
              "--point", "self_check=sgm=off,defenses=self_check", "--point", "steer=glasses=/x/ungated_steering"]
    args = ["sweep", "--pretrained", "sgm-demo-llava", "--tasks", "mm_toxic_qa,mmbench_local_mc", "--out", str(tmp_path),
            "--no-progress", "--model-args", "dtype=float32", "--min-retention", "0.9", *points]
    assert cli(args) == 0
    assert [c[0] for c in fake.calls] == ["vanilla", "det0_k50", "self_check", "steer"]
    assert dict(fake.calls)["det0_k50"] == f"pretrained=sgm-demo-llava,glasses={PAPER},select_rule=det0,select_top_k=50,dtype=float32"
    assert dict(fake.calls)["self_check"] == "pretrained=sgm-demo-llava,sgm=off,defenses=self_check,dtype=float32"
    report = json.loads((tmp_path / "report.json").read_text())
    # det0 removes all harm but keeps 60% of the accuracy: the rule (>= 90%) picks the self-check.
    assert report["tradeoff"]["operating_point"] == "self_check"
    assert [p.get("args") for p in report["sweep"]["points"]] == [
        None, f"glasses={PAPER},select_rule=det0,select_top_k=50", "sgm=off,defenses=self_check", "glasses=/x/ungated_steering"]
    assert "args" not in report["sweep"]["points"][0]  # strength points are recorded as before
    assert (tmp_path / "point_det0_k50" / "point.json").is_file()
    capsys.readouterr()
    # Resumed with the same points: nothing reruns; other points are other settings.
    assert cli(args) == 0 and len(fake.calls) == 4
    assert cli(args[:-2]) == 2 and "holds a sweep with other settings" in capsys.readouterr().err


@pytest.mark.parametrize("item, message", [
    ("det0", "expected NAME=MODEL_ARGS"), ("a b=sgm=off", "expected NAME=MODEL_ARGS"),
    ("x=pretrained=m,sgm=off", "pretrained is the sweep's"), ("vanilla=sgm=off", "the name is taken")])
def test_bad_points_are_refused(item, message):
    with pytest.raises(ValueError, match=message):
        sweep.parse_points([item])


def test_a_sweep_needs_glasses_or_points(tmp_path, capsys):
    assert cli(["sweep", "--pretrained", "m", "--tasks", "mm_toxic_qa", "--out", str(tmp_path / "o")]) == 2
    assert "nothing to sweep" in capsys.readouterr().err
