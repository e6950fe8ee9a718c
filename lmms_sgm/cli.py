"""The ``lmms-sgm`` command line. Flags are generated from the option dataclasses.

Errors: a problem with the user's input (data, files, options, model loading, glasses) is one line
``lmms-sgm <command>: error: ...`` and exit 2; any other exception is one line too, with exit 1
and a hint; Ctrl-C is ``lmms-sgm <command>: interrupted`` and exit 130. ``--debug`` (anywhere on
the line) or ``LMMS_SGM_DEBUG=1`` shows the traceback instead. Commands that write a directory
write it whole or not at all.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import sys
import warnings
from pathlib import Path

from lmms_sgm.options import (
    ExecutionOptions,
    LoadOptions,
    ProfileOptions,
    RemoteOptions,
    RuleOptions,
    SamplingOptions,
    SelectionOptions,
    SteeringOptions,
    add_arguments,
    from_namespace,
)

DEBUG_ENV = "LMMS_SGM_DEBUG"
# The sampling flags of self-label (and of tune's --self-label-*), with the defaults they always had.
SELF_LABEL_SAMPLING = ("samples", "max_new_tokens", "temperature", "batch_size", "seed")
SELF_LABEL_DEFAULTS = {"samples": 4, "max_new_tokens": 32, "temperature": 1.0, "batch_size": 8, "seed": 0}


def _profile(args) -> int:
    from lmms_sgm import distributed, models, remote
    from lmms_sgm.data import load_pairs
    from lmms_sgm.interventions.base import check_target
    from lmms_sgm.pipeline import build_glasses

    profile_options = from_namespace(ProfileOptions, args)
    selection = from_namespace(SelectionOptions, args)
    load = from_namespace(LoadOptions, args)
    execution = from_namespace(ExecutionOptions, args)
    # Under torchrun / accelerate launch every process runs this; process 0 alone checks and writes
    # the output and prints, and an error in any process stops all of them (lmms_sgm/distributed.py).
    group = distributed.from_env()
    show = not args.no_progress and group.is_main
    held = contextlib.ExitStack()
    try:
        with group.together():
            pairs = load_pairs(args.data)  # validate the data, images included, before loading a model
            pairs.require_both_classes()
            pairs.require_text_field(profile_options.text_field)
            out = Path(args.out)
            if group.is_main:
                _check_writable(out)  # first: the output lock makes the folder
                # One run at a time on an output (and its checkpoint): a second fails now, naming the first.
                held.enter_context(_output_lock(out))
                check_target(out, args.overwrite, protect=[pairs.source])  # before loading the model
            _check_layers(args.model, profile_options.layers)
            device = group.device(load.device)
        with group.together(), _loading_bars(show):
            if execution.is_remote:
                model, processor = remote.load(args.model, execution, device=device, dtype=load.dtype)
            else:
                model, processor = models.load(args.model, device=device, dtype=load.dtype)
        glasses = build_glasses(model, processor, pairs, profile_options, selection, out=out, overwrite=args.overwrite,
                                progress=show, execution=execution, group=group)
    finally:
        held.close()
        group.close()
    if glasses is not None:
        print(f"wrote {out}: {glasses.counts()['experts']} experts of {glasses.counts()['neurons']} neurons")
    return 0


def _steer(args) -> int:
    from lmms_sgm import models
    from lmms_sgm.data import load_pairs
    from lmms_sgm.interventions.base import check_target
    from lmms_sgm.pipeline import build_steering_glasses

    options = from_namespace(SteeringOptions, args)
    load = from_namespace(LoadOptions, args)
    pairs = load_pairs(args.data)  # validate both datasets, images included, before loading a model
    pairs.require_both_classes()
    pairs.require_text_field(options.text_field)
    gate = None
    if args.gate_data:
        gate = load_pairs(args.gate_data)
        gate.require_both_classes()
        gate.require_text_field("question+response")
    elif options.gated:
        raise ValueError("--gate-data is required (input-contrast pairs: label 1 = harmful context); "
                         "or --gated false for the ungated variant")
    out = Path(args.out)
    _check_writable(out)  # first: the output lock makes the folder
    with _output_lock(out):  # a second run on this output fails now, not after loading the model
        check_target(out, args.overwrite, protect=[p.source for p in (pairs, gate) if p is not None])
        _check_layer_indices(args.model, layer=options.layer, gate_layer=options.gate_layer)
        with _loading_bars(not args.no_progress):
            model, processor = models.load(args.model, device=load.device, dtype=load.dtype)
        glasses = build_steering_glasses(model, processor, pairs, gate, options, out=out, overwrite=args.overwrite,
                                         progress=not args.no_progress)
    g = glasses.manifest["gate"]
    gate_line = (f"gate layer {glasses.gate_site.layer}, projection AUROC {g['auroc']:.4f}, {g['misclassified']} of "
                 f"{g['examples']} gate pairs on the wrong side, {g['overlap']} in the class overlap") if g else "no gate"
    print(f"wrote {out}: steer layer {glasses.steer_site.layer} (|steer| {glasses.manifest['steer']['norm']:.4g}, "
          f"c {options.c:g}), {gate_line}")
    return 0


def _check_writable(out: Path) -> None:
    """Glasses can be written at ``out``, checked before the model loads (the staging folder beside
    it is made only after): its nearest existing ancestor is a folder this process may write in."""
    here = Path(os.path.abspath(out)).parent
    while not here.exists():
        here = here.parent
    if not here.is_dir():
        raise NotADirectoryError(f"--out {out}: {here} is a file, not a directory; choose another output path")
    if not os.access(here, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out}: no permission to write in {here}; choose another output path")


def _local_num_layers(model: str) -> int | None:
    """The decoder depth in a local model's config.json (None for a Hub id or an unreadable config:
    the loader names what is wrong with it)."""
    config = Path(model) / "config.json"
    if not config.is_file():
        return None
    try:
        doc = json.loads(config.read_text(encoding="utf-8"))
        return int((doc.get("text_config") or doc)["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_layers(model: str, layers: str) -> None:
    """``--layers`` against a local model's config.json before its weights load (a Hub model is
    checked once loaded, as are post-fusion layers): a typo then fails in a second, not after the load."""
    from lmms_sgm.options import parse_layers

    n = None if str(layers).strip() == "all" else _local_num_layers(model)
    if n is not None:
        parse_layers(layers, n)


def _check_layer_indices(model: str, **layers) -> None:
    """steer's ``--layer`` / ``--gate-layer`` (negative: from the end) against a local model's depth."""
    n = _local_num_layers(model)
    for flag, value in layers.items():
        if n is not None and value is not None and not -n <= value < n:
            raise ValueError(f"--{flag.replace('_', '-')} {value}: the model has {n} decoder layers "
                             f"(0 to {n - 1}, or -1 to -{n} from the end)")


@contextlib.contextmanager
def _loading_bars(show: bool):
    """transformers' "Loading weights" bar, silenced by --no-progress like ours."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    if not show:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on and not show:
            hf_logging.enable_progress_bar()


def _inspect(args) -> int:
    from lmms_sgm.interventions.base import load_glasses

    print(load_glasses(args.glasses).summary())
    return 0


def _select(args) -> int:
    from lmms_sgm.interventions.base import check_target, load_glasses

    selection = from_namespace(SelectionOptions, args)
    check_target(args.out, args.overwrite)
    glasses = load_glasses(args.glasses)
    if not glasses.has_experts:
        raise ValueError(f"{args.glasses} holds {glasses.kind} glasses, which have no experts to select; "
                         "build other ones with `lmms-sgm steer`")
    glasses = glasses.reselect(selection)
    glasses.save(args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}: {glasses.counts()['experts']} experts of {glasses.counts()['neurons']} neurons")
    return 0


def _output_lock(out: Path):
    """The lock on ``out`` (``.NAME.lock`` beside it; :func:`lmms_sgm.staging.output_lock`), taken
    before a model loads; the staged write below takes it again (re-entrant)."""
    from lmms_sgm.staging import output_lock

    return output_lock(out)


def _new_directory(out: Path):
    """For commands without --overwrite: ``out`` must be new (or empty); written whole or not at all."""
    from lmms_sgm.staging import new_output

    return new_output(out)


def _self_label(args) -> int:
    from lmms_sgm import models
    from lmms_sgm.selflabel import label_generations, read_prompts, write_pairs

    sampling = from_namespace(SamplingOptions, args)  # the flags first, then the files
    judge = _judge(args)
    prompts = [r for path in args.prompts for r in read_prompts(path)]
    load = from_namespace(LoadOptions, args)
    out = Path(args.out)
    with _new_directory(out) as tmp:  # checked before the model loads
        model, processor = models.load(args.model, device=load.device, dtype=load.dtype)
        pairs = label_generations(model, processor, prompts, judge, samples=sampling.samples,
                                  max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                                  batch_size=sampling.batch_size, seed=sampling.seed)
        name = write_pairs(pairs, tmp, judge=judge).name
    c = pairs.counts()
    print(f"wrote {out / name}: {c['examples']} answers, {c['toxic']} judged toxic by {judge.name}, {c['non_toxic']} not")
    return 0


def _judge(args):
    """The judge named by --judge, built with --judge-args (``k=v,k=v``; also ``--judge NAME:k=v``)."""
    from lmms_sgm.judges import get_judge
    from lmms_sgm.judges.rejudge import parse_judge

    name, kwargs = parse_judge(args.judge, args.judge_args)
    return get_judge(name, **kwargs)


def _named_sets(values) -> dict[str, str]:
    """``NAME=PATH`` (or a bare PATH, named by its file stem) -> {name: path}."""
    sets: dict[str, str] = {}
    for v in values or ():
        name, sep, path = v.partition("=")
        name, path = (name, path) if sep else (Path(v).stem, v)
        if not name or not path:
            raise ValueError(f"--data {v!r}: use NAME=PATH")
        if name in sets or name == "self":
            raise ValueError(f"--data {v!r}: the profiling set name {name!r} is taken ('self' is the self-labelled set)")
        sets[name] = path
    return sets


def _tune(args) -> int:
    from lmms_sgm import models, tune
    from lmms_sgm.data import load_pairs
    from lmms_sgm.evaluate import ValidationSet

    load = from_namespace(LoadOptions, args)
    rule = from_namespace(RuleOptions, args)
    if 0 < rule.over_refusal_points < 0.1:  # the flag took a fraction before this release (0.02 = 2 points)
        print(f"lmms-sgm tune: note: --over-refusal-points {rule.over_refusal_points:g} is in percentage points "
              f"(+{rule.over_refusal_points:g} of 100); for 2 points give 2, not 0.02", file=sys.stderr)
    sampling = from_namespace(SamplingOptions, args)
    self_sampling = from_namespace(SamplingOptions, args, prefix="self_label_")
    sets = _named_sets(args.data)
    if not sets and not args.self_label:
        raise ValueError("nothing to profile: give --data NAME=PAIRS and/or --self-label PROMPTS")
    for path in sets.values():  # validate the data before loading a model
        load_pairs(path).require_both_classes()
    if args.self_label:
        from lmms_sgm.selflabel import read_prompts

        for path in args.self_label:  # read again once the model is loaded: checked here first
            read_prompts(path)
    judge = _judge(args)
    val = ValidationSet.load(args.val, args.val_mc, limit=args.val_limit)
    if args.grid:
        grid = tune.read_grid(args.grid)
    else:
        names = [*sets, *(["self"] if args.self_label else [])]
        grid = tune.default_grid(names, with_questions={n: n == "self" or all(p.question for p in load_pairs(sets[n]))
                                                        for n in names})
    missing = sorted(set().union(*(c.sets() for c in grid)) - set(sets) - ({"self"} if args.self_label else set()))
    if missing:  # before the model loads
        raise ValueError(f"the grid names profiling set(s) {', '.join(missing)}, not given (given: "
                         f"{', '.join([*sets, *(['self'] if args.self_label else [])]) or 'none'})")
    out = Path(args.out)
    log = (lambda s: None) if args.no_progress else (lambda s: print(s, file=sys.stderr, flush=True))
    with _new_directory(out) as tmp:
        model, processor = models.load(args.model, device=load.device, dtype=load.dtype)
        if args.self_label:
            sets["self"] = str(tune.self_label_set(model, processor, args.self_label, judge, tmp / "self_labelled",
                                                   samples=self_sampling.samples, batch_size=self_sampling.batch_size,
                                                   seed=sampling.seed))
        result = tune.tune(model, processor, sets, grid, val, judge, rule=rule, samples=sampling.samples, seed=sampling.seed,
                           log=log)
        tune.write(result, tmp, sets={k: (out / Path(v).relative_to(tmp) if Path(v).is_relative_to(tmp) else v)
                                      for k, v in sets.items()})
    print(result.table())
    print(f"{result.verdict()}\nwrote {out}: table.md, table.json" + (", glasses/ (the chosen glasses)" if result.chosen else ""))
    return 0


def _diagnose(args) -> int:
    from lmms_sgm import diagnose, models
    from lmms_sgm.interventions.base import load_glasses

    load = from_namespace(LoadOptions, args)
    sampling = from_namespace(SamplingOptions, args)
    twins = diagnose.read_twins(args.data)  # validated before the model loads
    if args.limit:
        measured, held_out = diagnose.split_twins(twins)
        twins = measured[:args.limit] + held_out[:args.limit]
    execution = from_namespace(RemoteOptions, args)
    backend = args.backend or ("nnsight" if execution.remote != "off" else "hooks")
    if backend == "hooks" and execution.remote != "off":
        raise ValueError(f"--remote {execution.remote} runs nnsight traces: use --backend nnsight (or leave it out)")
    glasses = load_glasses(args.glasses) if args.glasses else None
    judge = _judge(args)
    out = Path(args.out)
    log = (lambda s: None) if args.no_progress else (lambda s: print(s, file=sys.stderr, flush=True))
    with _new_directory(out) as tmp:
        if execution.remote != "off":
            from lmms_sgm import remote

            model, processor = remote.load(args.model, execution, device=load.device, dtype=load.dtype)
        else:
            model, processor = models.load(args.model, device=load.device, dtype=load.dtype)
        if glasses is not None:
            glasses.check(model)
        report = diagnose.diagnose(model, processor, twins, judge, glasses=glasses, samples=sampling.samples, seed=sampling.seed,
                                   per_layer=not args.no_per_layer, attention=not args.no_attention, log=log,
                                   backend=backend, remote=execution)
        diagnose.write_report(report, tmp)
    print(diagnose.markdown(report))
    print(f"wrote {out}: diagnosis.json, diagnosis.md, diagnosis.html")
    return 0


def _text_pairs(args) -> int:
    from lmms_sgm.data import load_pairs, write_text_only

    out = write_text_only(args.data, args.out)
    print(f"wrote {out}: {len(load_pairs(out))} records without images (profile them with --text-only for the "
          "AurA-style baseline)")
    return 0


def _tiny(args) -> int:
    from lmms_sgm import tiny_families
    from lmms_sgm.tiny import write_toy_pairs

    if args.family not in tiny_families.FAMILIES:
        raise ValueError(f"unknown family {args.family!r}; choose from {', '.join(tiny_families.FAMILIES)}")
    out = Path(args.out)
    with _new_directory(out) as tmp:
        tiny_families.build(args.family, tmp / "model")
        name = write_toy_pairs(tmp / "data", n=args.pairs).name
    print(f"tiny {args.family}: {out / 'model'}\ntoy pairs:  {out / 'data' / name}")
    return 0


def _train_demo(args) -> int:
    from lmms_sgm.demo.train import run

    out = run(args)
    print(f"trained demo LLaVA: {out}")
    return 0


def _quickstart(args) -> int:
    from lmms_sgm.quickstart import run

    return run(Path(args.workdir))


def _demo(args) -> int:
    from lmms_sgm.demo.run import run

    return run(args)


def _demo_train_arguments(p: argparse.ArgumentParser) -> None:
    from lmms_sgm.demo.train_args import add_arguments

    add_arguments(p)


def _judge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--judge", default="lexicon", help="judge name (docs/judges.md), or NAME:k=v,k=v")
    p.add_argument("--judge-args", default=None, metavar="k=v,...",
                   help="the judge's arguments, e.g. --judge lexicon --judge-args lexicon=/data/words.txt")


def _glasses_output(p) -> None:
    """The flags of a command that writes glasses: where, whether to replace, progress bars."""
    p.add_argument("--out", required=True, help="glasses directory to write")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the glasses in OUT (a directory holding glasses and nothing else; anything else is refused)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmms-sgm", description="SGM safety glasses for multimodal LLMs")
    debug_help = f"show the traceback of an error (or set {DEBUG_ENV}=1)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    # Accepted after the subcommand too; SUPPRESS keeps a subcommand from resetting it to False.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("profile", parents=[common], help="profile a model on labelled pairs and write glasses")
    p.add_argument("--model", required=True, help="Hub id or local directory (loaded with from_pretrained)")
    p.add_argument("--data", required=True, help="labelled pairs: JSONL/CSV/Parquet file or a directory holding one (docs/data.md)")
    _glasses_output(p)
    add_arguments(p, ProfileOptions)
    add_arguments(p, SelectionOptions)
    add_arguments(p, LoadOptions)
    add_arguments(p, ExecutionOptions)
    p.set_defaults(func=_profile)

    p = sub.add_parser("steer", parents=[common],
                       help="build gated-steering glasses: a steer vector from answer pairs, a gate from input-contrast pairs")
    p.add_argument("--model", required=True, help="Hub id or local directory (loaded with from_pretrained)")
    p.add_argument("--data", required=True, help="answer pairs (toxic vs non-toxic answers, docs/data.md): the steer vector")
    p.add_argument("--gate-data", default=None,
                   help="input-contrast pairs (label 1 = a harmful context, 0 = a benign one; needs 'question'): the gate")
    _glasses_output(p)
    add_arguments(p, SteeringOptions)
    add_arguments(p, LoadOptions)
    p.set_defaults(func=_steer)

    p = sub.add_parser("inspect", parents=[common], help="what glasses hold: experts per layer and AUROCs (SGM), or layer, "
                                                          "norms, threshold and gate separation (steering)")
    p.add_argument("glasses")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("select", parents=[common], help="re-select experts of existing glasses with other selection options")
    p.add_argument("glasses")
    p.add_argument("--out", required=True, help="glasses directory to write")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the glasses in OUT (a directory holding glasses and nothing else; anything else is refused)")
    add_arguments(p, SelectionOptions)
    p.set_defaults(func=_select)

    p = sub.add_parser("self-label", parents=[common], help="label the model's own sampled answers with a judge, as profiling pairs")
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True, nargs="+", help="MM-TOXIC-QA JSONL files (image, question, category)")
    _judge_arguments(p)
    add_arguments(p, SamplingOptions, only=SELF_LABEL_SAMPLING, defaults=SELF_LABEL_DEFAULTS)
    p.add_argument("--out", required=True, help="new directory for pairs.jsonl, images/ and judge.json")
    add_arguments(p, LoadOptions)
    p.set_defaults(func=_self_label)

    p = sub.add_parser("tune", parents=[common], help="choose SGM's options for a model on its validation split (docs/diagnosis.md)")
    p.add_argument("--model", required=True)
    p.add_argument("--data", action="append", metavar="NAME=PAIRS", help="a profiling set (labelled pairs, docs/data.md); repeatable")
    p.add_argument("--self-label", nargs="+", metavar="PROMPTS", default=None,
                   help="MM-TOXIC-QA JSONL prompts: the model's own sampled answers, judged by --judge, become profiling set 'self'")
    add_arguments(p, SamplingOptions, "self_label_", only=("samples", "batch_size"), defaults=SELF_LABEL_DEFAULTS)
    _judge_arguments(p)
    p.add_argument("--val", required=True, metavar="DIR",
                   help="validation split: harmful.jsonl, benign.jsonl (, adv.jsonl) (docs/tasks.md)")
    p.add_argument("--val-mc", default=None, metavar="TSV",
                   help="MMBench-format TSV for multiple-choice capability (default: DIR/mmbench.tsv if any)")
    p.add_argument("--val-limit", type=int, default=None, help="first N records of each validation file (smoke tests)")
    p.add_argument("--grid", default=None, metavar="JSON",
                   help="configurations to try: a JSON list of {name, data, profile: {...}, select: {...}, strength}, or "
                        "{name, kind: steering, data, gate_data, steer: {...}, strength} (default: a small SGM grid)")
    add_arguments(p, SamplingOptions, only=("samples", "seed"), defaults={"samples": 5, "seed": 0},
                  help={"samples": "sampled answers per harmful prompt"})
    p.add_argument("--out", required=True, help="new directory: table.md, table.json, glasses/, profiles/")
    p.add_argument("--no-progress", action="store_true")
    add_arguments(p, RuleOptions)
    add_arguments(p, LoadOptions)
    p.set_defaults(func=_tune)

    p = sub.add_parser("diagnose", parents=[common],
                       help="how much can neuron-level glasses do on this model? clean-twin patching and the constant ceiling")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, metavar="TWINS", help="twins JSONL (or a directory holding twins.jsonl; docs/diagnosis.md)")
    p.add_argument("--glasses", default=None, help="glasses to assess against the ceiling")
    _judge_arguments(p)
    add_arguments(p, SamplingOptions, only=("samples", "seed"), defaults={"samples": 5, "seed": 0},
                  help={"samples": "sampled answers per harmful input"})
    p.add_argument("--limit", type=int, default=None, help="at most N measured and N held-out twins")
    p.add_argument("--no-per-layer", action="store_true", help="patch all layers at once only (fewer runs on a deep model)")
    p.add_argument("--no-attention", action="store_true", help="patch MLP outputs only")
    p.add_argument("--backend", choices=("hooks", "nnsight"), default=None,
                   help="forward hooks on the local model (default) or nnsight traces (the default with --remote)")
    p.add_argument("--out", required=True, help="new directory: diagnosis.json, diagnosis.md, diagnosis.html")
    p.add_argument("--no-progress", action="store_true")
    add_arguments(p, LoadOptions)
    add_arguments(p, RemoteOptions)
    p.set_defaults(func=_diagnose)

    p = sub.add_parser("text-pairs", parents=[common],
                       help="the pairs' records without their images (JSONL): data of the AurA-style text-only baseline")
    p.add_argument("data", help="labelled pairs: JSONL/CSV/Parquet file or a directory holding one")
    p.add_argument("out", help="new JSONL file")
    p.set_defaults(func=_text_pairs)

    p = sub.add_parser("tiny", parents=[common],
                       help="build a tiny random model (any family) and toy pairs (offline) for trying things out")
    p.add_argument("out", help="new directory for model/ and data/")
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--family", default="llava", help="model family: llava, llava_next, llava_onevision, qwen2_vl, "
                   "qwen2_5_vl, idefics3, gemma3 or mllama (default: llava)")
    p.set_defaults(func=_tiny)

    p = sub.add_parser("train-demo", parents=[common], help="train the demo LLaVA on the synthetic shapes world (CPU, minutes)")
    _demo_train_arguments(p)
    p.set_defaults(func=_train_demo)

    p = sub.add_parser("demo", parents=[common],
                       help="the main job: lmms-eval on the bundled demo model, vanilla vs paper-default SGM vs the best glasses")
    from lmms_sgm.demo.run import add_arguments as _demo_arguments

    _demo_arguments(p)
    p.set_defaults(func=_demo)

    from lmms_sgm.reports.cli import register as _register_reports

    _register_reports(sub, parents=[common])  # report, sweep

    from lmms_sgm.judges.rejudge import register as _register_rejudge

    _register_rejudge(sub, parents=[common])  # rejudge

    from lmms_sgm.datasets.cli import add_parser as _dataset_parser

    _dataset_parser(sub, parents=[common])  # lmms-sgm dataset build / check / export / sources

    p = sub.add_parser("quickstart", parents=[common], help="the end-to-end walk-through on a tiny model: build, profile, inspect, apply")
    p.add_argument("--workdir", default="runs/quickstart")
    p.set_defaults(func=_quickstart)
    return parser


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that say what is wrong with the user's input (exit 2): our own ValueError subclasses
    (data, options, glasses, mismatch), files (OSError: missing, existing, unreadable, HF loading)
    and unreadable safetensors."""
    from safetensors import SafetensorError

    return ValueError, OSError, SafetensorError


def _peer_failed() -> tuple[type[BaseException], ...]:
    from lmms_sgm.distributed import PeerFailed

    return (PeerFailed,)


def _launched_rank() -> int:
    """This process's rank in a multi-process launch (0 when alone)."""
    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    except ValueError:
        return 0


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a full disk or quota: the file is one being written


def _file_in_use(e: OSError) -> str | None:
    """The file an OSError happened on, when it does not say: a write that fails with ENOSPC
    (``f.write``, ``Path.write_text``, a flush at ``close``) raises ``[Errno 28] No space left on
    device`` with no filename. The innermost frame holding a file object (one open for writing,
    for a write error) names it; an outer frame's file being read is not the one."""
    import io
    import traceback

    writing = e.errno in WRITE_ERRNOS
    frames = [frame for frame, _ in traceback.walk_tb(e.__traceback__)]
    for frame in reversed(frames):
        for value in frame.f_locals.values():
            if not isinstance(value, io.IOBase):
                continue
            name, mode = getattr(value, "name", None), str(getattr(value, "mode", "") or "")
            if isinstance(name, str) and (not writing or any(c in mode for c in "wax+")):
                return name
    return None


def _error_line(e: BaseException) -> str:
    """One line; an OSError without its file gets the file it happened on (disk full on a write)."""
    if isinstance(e, OSError) and e.errno is not None and (e.errno in WRITE_ERRNOS or not e.filename):
        name = e.filename or _file_in_use(e)
        if name:
            return f"{_one_line(e.strerror or e)}: {name}" + (" (free some space and run again)" if e.errno == errno.ENOSPC else "")
    return _one_line(e)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")
    prog = f"lmms-sgm {args.command}"
    rank = _launched_rank()
    if rank:  # a process other than the first of a torchrun / accelerate launch: its errors say which
        prog += f" [process {rank}]"
    if debug:
        return args.func(args)
    with warnings.catch_warnings():
        # One line per warning too (the default adds the source line that raised it).
        warnings.showwarning = lambda message, category, *a, **k: print(
            f"{prog}: warning: {_one_line(message)}", file=sys.stderr)
        try:
            return args.func(args)
        except KeyboardInterrupt as e:
            notes = "; ".join(getattr(e, "__notes__", ()))
            print(f"{prog}: interrupted" + (f" ({notes})" if notes else ""), file=sys.stderr)
            return 130
        except _peer_failed() as e:  # another process failed: process 0 says so, once
            if not rank:
                print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
            return 1
        except _expected_errors() as e:
            print(f"{prog}: error: {_error_line(e)}", file=sys.stderr)
            return 2
        except Exception as e:  # noqa: BLE001 -- any other failure is still one line (exit 1)
            print(f"{prog}: error: {type(e).__name__}: {_one_line(e)} (unexpected: run with --debug for the traceback)",
                  file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
