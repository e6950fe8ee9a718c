"""The ``lmms-sgm`` command line. Flags are generated from the option dataclasses."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmms_sgm.options import (
    LoadOptions,
    ProfileOptions,
    SelectionOptions,
    add_arguments,
    from_namespace,
)


def _profile(args) -> int:
    from lmms_sgm import models
    from lmms_sgm.data import load_pairs
    from lmms_sgm.glasses import refuse_existing
    from lmms_sgm.pipeline import build_glasses

    profile_options = from_namespace(ProfileOptions, args)
    selection = from_namespace(SelectionOptions, args)
    load = from_namespace(LoadOptions, args)
    pairs = load_pairs(args.data)  # validate the data before loading a model
    pairs.require_both_classes()
    out = Path(args.out)
    refuse_existing(out, args.overwrite)  # before loading the model
    model, processor = models.load(args.model, device=load.device, dtype=load.dtype)
    glasses = build_glasses(model, processor, pairs, profile_options, selection, out=out,
                            overwrite=args.overwrite, progress=not args.no_progress)
    print(f"wrote {out}: {glasses.counts()['experts']} experts of {glasses.counts()['neurons']} neurons")
    return 0


def _inspect(args) -> int:
    from lmms_sgm.glasses import SafetyGlasses

    print(SafetyGlasses.load(args.glasses).summary())
    return 0


def _select(args) -> int:
    from lmms_sgm.glasses import SafetyGlasses

    glasses = SafetyGlasses.load(args.glasses).reselect(from_namespace(SelectionOptions, args))
    glasses.save(args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}: {glasses.counts()['experts']} experts of {glasses.counts()['neurons']} neurons")
    return 0


def _self_label(args) -> int:
    from lmms_sgm import models
    from lmms_sgm.judges import get_judge
    from lmms_sgm.selflabel import label_generations, read_prompts, write_pairs

    judge = get_judge(args.judge)
    prompts = [r for path in args.prompts for r in read_prompts(path)]
    load = from_namespace(LoadOptions, args)
    model, processor = models.load(args.model, device=load.device, dtype=load.dtype)
    pairs = label_generations(model, processor, prompts, judge, samples=args.samples,
                              max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              batch_size=args.batch_size, seed=args.seed)
    path = write_pairs(pairs, args.out, judge=judge)
    c = pairs.counts()
    print(f"wrote {path}: {c['examples']} answers, {c['toxic']} judged toxic by {judge.name}, {c['non_toxic']} not")
    return 0


def _tiny(args) -> int:
    from lmms_sgm.tiny import build_tiny_llava, write_toy_pairs

    out = Path(args.out)
    build_tiny_llava(out / "model")
    data = write_toy_pairs(out / "data", n=args.pairs)
    print(f"tiny LLaVA: {out / 'model'}\ntoy pairs:  {data}")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmms-sgm", description="SGM safety glasses for multimodal LLMs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("profile", help="profile a model on labelled pairs and write glasses")
    p.add_argument("--model", required=True, help="Hub id or local directory (loaded with from_pretrained)")
    p.add_argument("--data", required=True, help="labelled pairs: JSONL/CSV/Parquet file or a directory holding one (docs/data.md)")
    p.add_argument("--out", required=True, help="glasses directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing glasses directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_arguments(p, ProfileOptions)
    add_arguments(p, SelectionOptions)
    add_arguments(p, LoadOptions)
    p.set_defaults(func=_profile)

    p = sub.add_parser("inspect", help="experts per layer, AUROC distribution, fingerprint and options of glasses")
    p.add_argument("glasses")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("select", help="re-select experts of existing glasses with other selection options")
    p.add_argument("glasses")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    add_arguments(p, SelectionOptions)
    p.set_defaults(func=_select)

    p = sub.add_parser("self-label", help="label the model's own sampled answers with a judge, as profiling pairs")
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True, nargs="+", help="MM-TOXIC-QA JSONL files (image, question, category)")
    p.add_argument("--judge", default="lexicon")
    p.add_argument("--samples", type=int, default=4, help="answers sampled per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (then use --samples 1)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="directory for pairs.jsonl, images/ and judge.json")
    add_arguments(p, LoadOptions)
    p.set_defaults(func=_self_label)

    p = sub.add_parser("tiny", help="build a tiny random LLaVA and toy pairs (offline) for trying things out")
    p.add_argument("out")
    p.add_argument("--pairs", type=int, default=32)
    p.set_defaults(func=_tiny)

    p = sub.add_parser("train-demo", help="train the demo LLaVA on the synthetic shapes world (CPU, minutes)")
    _demo_train_arguments(p)
    p.set_defaults(func=_train_demo)

    p = sub.add_parser("demo", help="the main job: lmms-eval on the bundled demo model, vanilla vs paper-default SGM vs the best glasses")
    from lmms_sgm.demo.run import add_arguments as _demo_arguments

    _demo_arguments(p)
    p.set_defaults(func=_demo)

    from lmms_sgm.reports.cli import register as _register_reports

    _register_reports(sub)  # report, sweep

    p = sub.add_parser("quickstart", help="the end-to-end walk-through on a tiny model: build, profile, inspect, apply")
    p.add_argument("--workdir", default="runs/quickstart")
    p.set_defaults(func=_quickstart)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, ChildProcessError) as e:
        print(f"lmms-sgm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
