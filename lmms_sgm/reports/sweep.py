"""``lmms-sgm sweep``: the harm/capability trade-off across glasses strengths, one lmms-eval run per point.

    lmms-sgm sweep --pretrained M --glasses G [G ...] --strengths 0,0.25,0.5,0.75,1 --tasks T --out DIR \
        [--point NAME=MODEL_ARGS ...] [--limit N] [--split validation] [--batch-size 8] [--seed 0]

Points: the vanilla model (``sgm=off``; strength 0 leaves every neuron as it is, so it is this
point, run once for all glasses), every glasses x non-zero strength, and every ``--point
NAME=MODEL_ARGS``: a method given by its own ``sgm`` model args (a baseline such as
``det0_k50=glasses=G,select_rule=det0,select_top_k=50``, ungated steering glasses, a defense
``self_check=sgm=off,defenses=self_check``, SGM* ``glasses=G,defenses=system_prompt+self_check``),
so that methods are compared at matched capability retention by the same rule (docs/defenses.md). Each point is the real
``lmms-eval`` CLI in a subprocess (:mod:`~lmms_sgm.reports.runner`), in ``DIR/<point>/`` with
its log and ``command.sh``, samples logged. Then ``DIR/report.{html,md,json}``: the report of
every point against vanilla, the trade-off curve (harmful rate against capability retention,
Pareto points marked) and the operating point chosen by the rule (:class:`~lmms_sgm.options.RuleOptions`).

Resuming: ``DIR/sweep.json`` records the sweep's settings; a point is finished when its
``point.json`` exists (written atomically after lmms-eval succeeded, naming its results file).
Running the same command again skips finished points and reruns an interrupted one from scratch
(its folder, which only this sweep writes, is emptied first). Other settings in the same ``DIR``
are refused, and so is a second sweep while one runs there (``DIR/sweep.lock``, an ``flock`` naming its
pid: :func:`lmms_sgm.staging.output_lock`; a killed sweep's is taken over).
An lmms-eval child dies with the sweep (Linux ``PR_SET_PDEATHSIG``): a killed sweep leaves no run
writing behind it. The report is built from the points' results files alone, so an interrupted
and resumed sweep ends with the same report as an uninterrupted one.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lmms_sgm.options import RuleOptions, from_namespace
from lmms_sgm.reports import runner
from lmms_sgm.reports.files import write
from lmms_sgm.reports.report import build
from lmms_sgm.reports.results import load_run

# Settings that do not change what a point measures (so a resume may differ in them).
VOLATILE_ENV = ("OMP_WAIT_POLICY", "HF_HUB_OFFLINE")


@dataclass(frozen=True)
class Point:
    name: str  # label in the report
    folder: str  # DIR/<folder>
    glasses: str | None  # None: vanilla, or a method point
    strength: float
    args: str | None = None  # a method point: its own model args (beside pretrained)


def parse_strengths(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--strengths must be comma-separated numbers in [0, 1], got {text!r}") from None
    bad = [v for v in values if not 0 <= v <= 1]
    if not values or bad:
        raise ValueError(f"--strengths must be comma-separated numbers in [0, 1], got {text!r}")
    return sorted(set(values))


def point_dict(point: Point) -> dict:
    """A point as recorded (point.json, report.json): ``args`` only for a method point, so a sweep of
    strengths alone is recorded as before method points existed."""
    return {k: v for k, v in asdict(point).items() if k != "args" or v is not None}


def parse_points(items: list[str] | None) -> list[tuple[str, str]]:
    """``--point NAME=MODEL_ARGS`` items -> (name, model args)."""
    out: list[tuple[str, str]] = []
    for item in items or []:
        name, sep, args = item.partition("=")
        name = name.strip()
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name) or not args.strip():
            raise ValueError(f"--point {item!r}: expected NAME=MODEL_ARGS, NAME of letters, digits and _ . + -, "
                             "e.g. det0_k50=glasses=G,select_rule=det0,select_top_k=50")
        if "pretrained=" in args:
            raise ValueError(f"--point {name}: pretrained is the sweep's --pretrained; leave it out of the point")
        if name == "vanilla" or name in (n for n, _ in out):
            raise ValueError(f"--point {name}: the name is taken")
        out.append((name, args.strip()))
    return out


def plan(glasses: list[str], strengths: list[float], methods: list[tuple[str, str]] = ()) -> list[Point]:
    """Vanilla first (the baseline; strength 0), then each glasses' non-zero strengths in order,
    then the method points."""
    names: list[str] = []  # a method's name has no space and its folder is point_NAME: no clash
    for g in glasses:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(g).name) or "glasses"
        name, k = base, 1
        while name in names or name == "vanilla":
            k += 1
            name = f"{base}_{k}"
        names.append(name)
    points = [Point("vanilla", "vanilla", None, 0.0)]
    for name, g in zip(names, glasses):
        points += [Point(f"{name} s={s:g}", f"{name}_s{s:g}", g, s) for s in strengths if s > 0]
    points += [Point(name, f"point_{name}", None, 1.0, args) for name, args in methods]
    return points


def settings(args, glasses: list[str], strengths: list[float], env: dict[str, str]) -> dict:
    return {"pretrained": args.pretrained, "glasses": glasses, "strengths": strengths,
            **({"points": args.point} if args.point else {}), "tasks": args.tasks.split(","),
            "limit": args.limit, "split": args.split, "batch_size": args.batch_size, "seed": args.seed, "mode": args.mode,
            "gen_kwargs": args.gen_kwargs, "model_args": args.model_args,
            "env": {k: v for k, v in env.items() if k not in VOLATILE_ENV}}


def model_args(args, point: Point) -> str:
    parts = [f"pretrained={args.pretrained}"]
    if point.args:
        parts.append(point.args)
    else:
        parts += ["sgm=off"] if point.glasses is None else [f"glasses={point.glasses}", f"strength={point.strength:g}", f"mode={args.mode}"]
    return ",".join(parts + ([args.model_args] if args.model_args else []))


def command(args, point: Point, out: Path) -> list[str]:
    extra = ["--seed", str(args.seed)] + (["--gen_kwargs", args.gen_kwargs] if args.gen_kwargs else [])
    return runner.lmms_eval_command(model_args(args, point), args.tasks.split(","), out / point.folder,
                                    args.batch_size, args.limit, extra=extra)


def finished(out: Path, point: Point) -> Path | None:
    """The results file of a finished point (None: not finished)."""
    marker = out / point.folder / "point.json"
    if not marker.is_file():
        return None
    try:
        results = out / point.folder / json.loads(marker.read_text(encoding="utf-8"))["results"]
    except (ValueError, KeyError, OSError):
        return None
    return results if results.is_file() else None


def _mark(out: Path, point: Point, results: Path, cmd: list[str], seconds: float) -> None:
    marker = out / point.folder / "point.json"
    tmp = marker.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**point_dict(point), "results": str(results.relative_to(out / point.folder)),
                               "command": cmd, "seconds": round(seconds, 1)}, indent=1), encoding="utf-8")
    os.replace(tmp, marker)  # atomic: a point is finished or not, never half


def _lock(out: Path):
    """``DIR/sweep.lock``, held for the sweep (:func:`lmms_sgm.staging.output_lock`: a killed sweep's is taken over)."""
    from lmms_sgm.staging import output_lock

    return output_lock(out, lock_file=out / "sweep.lock", what="a sweep")


def _check_settings(out: Path, want: dict) -> None:
    path = out / "sweep.json"
    if path.is_file():
        have = json.loads(path.read_text(encoding="utf-8"))
        if have != want:
            diff = [f"{k}: {have.get(k)!r} then, {want.get(k)!r} now" for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]
            raise ValueError(f"{out} holds a sweep with other settings ({'; '.join(diff)}); rerun it with the same "
                             "settings to resume, or use another --out")
    else:
        from lmms_sgm.staging import atomic_write

        atomic_write(path, json.dumps(want, indent=1))


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from lmms_sgm.bundled import DEMO_DATA_DIR

    glasses = [str(Path(g).resolve()) for item in args.glasses or [] for g in item.split(",") if g.strip()]
    methods = parse_points(args.point)
    if not glasses and not methods:
        raise ValueError("nothing to sweep: give --glasses and/or --point NAME=MODEL_ARGS")
    missing = [g for g in glasses if not (Path(g) / "manifest.json").is_file()]
    if missing:
        raise FileNotFoundError(f"--glasses: no glasses at {', '.join(missing)} (a folder written by lmms-sgm profile)")
    strengths = parse_strengths(args.strengths)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = runner.run_env(DEMO_DATA_DIR, args.split) if args.split else runner.run_env()
    want = settings(args, glasses, strengths, env)
    held = contextlib.ExitStack()
    held.enter_context(_lock(out))
    try:
        _check_settings(out, want)
        points = plan(glasses, strengths, methods)
        done = {p: finished(out, p) for p in points}
        bar = tqdm(total=len(points), initial=sum(1 for v in done.values() if v), desc="sweep", unit="run",
                   file=sys.stderr, disable=args.no_progress, dynamic_ncols=True)
        for p in points:
            if done[p]:
                bar.write(f"[sweep] {p.name}: finished before, kept ({done[p]})", file=sys.stderr)
                continue
            if (out / p.folder).exists():  # an interrupted run: start it again from nothing
                shutil.rmtree(out / p.folder)
                bar.write(f"[sweep] {p.name}: removed the interrupted run's folder", file=sys.stderr)
            bar.set_postfix_str(p.name)
            cmd = command(args, p, out)
            t0 = time.time()
            results = runner.run(p.name, cmd, env, out / p.folder, f"lmms-sgm sweep point {p.name}", prefix="[sweep]",
                                 quiet=True, die_with_parent=True)
            _mark(out, p, results, cmd, time.time() - t0)
            done[p] = results
            bar.write(f"[sweep] {p.name}: done in {time.time() - t0:.0f} s ({out / p.folder / 'lmms_eval.log'})", file=sys.stderr)
            bar.update(1)
        bar.close()
        runs = {p.name: load_run(done[p]) for p in points}
        report = build(runs, rule=from_namespace(RuleOptions, args),
                       resamples=args.resamples, seed=args.bootstrap_seed,
                       groups={p.name: (Path(p.glasses).name if p.glasses else (p.name if p.args else None), p.strength)
                               for p in points})
        report["sweep"] = {"settings": want, "points": [point_dict(p) for p in points]}
        paths = write(report, out, title="Strength sweep: harm against capability", extra_html=_sweep_html(want, points))
    finally:
        held.close()
    from lmms_sgm.reports import render

    print(render.summary_markdown(report))
    print(render.operating_sentence(report).replace("**", ""))
    print("[sweep] written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def _sweep_html(want: dict, points: list[Point]) -> str:
    import html

    rows = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(json.dumps(v) if not isinstance(v, str) else v)}</li>"
                   for k, v in want.items() if k != "env")
    return (f"<h2>Sweep</h2><ul>{rows}</ul><p>{len(points)} points: "
            + html.escape(", ".join(p.name for p in points)) + ". Strength 0 is the vanilla point (sgm=off).</p>")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pretrained", required=True, help="model (Hub id, local directory, or sgm-demo-llava)")
    p.add_argument("--glasses", nargs="+", default=[], help="glasses folder(s), space- or comma-separated, each run at "
                   "every --strengths")
    p.add_argument("--point", action="append", default=None, metavar="NAME=MODEL_ARGS",
                   help="one more point, a method given by its sgm model args (repeatable), e.g. "
                        "det0_k50=glasses=G,select_rule=det0,select_top_k=50 or sgm_star=glasses=G,defenses=system_prompt")
    p.add_argument("--strengths", default="0,0.25,0.5,0.75,1", help="comma-separated strengths in [0, 1] (0: vanilla)")
    p.add_argument("--tasks", required=True, help="comma-separated lmms-eval tasks, e.g. "
                   "mm_toxic_qa_sampled,mm_toxic_qa_benign,mm_toxic_qa_fluency,mmbench_local_mc")
    p.add_argument("--out", required=True, help="sweep folder: one subfolder per point, report.{html,md,json}; "
                   "rerun the same command to resume")
    p.add_argument("--limit", type=int, default=None, help="first N prompts of each task only (a smoke test)")
    p.add_argument("--split", default=None, choices=("validation", "test"),
                   help="the bundled demo data of this split (MM_TOXIC_QA_DIR, MMBENCH_LOCAL_TSV); "
                        "without it the environment's data settings apply")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="lmms-eval --seed (sampled tasks)")
    p.add_argument("--mode", default="hooks", choices=("hooks", "fold", "nnsight"), help="how the glasses are worn")
    p.add_argument("--gen-kwargs", default=None, help="lmms-eval --gen_kwargs for every point")
    p.add_argument("--model-args", default=None, help="more sgm_llava --model_args for every point, e.g. dtype=float32")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
