"""``lmms-sgm dataset {build,check,export,sources}``: the argparse side of :mod:`lmms_sgm.datasets`.

Errors in the sources or options raise :class:`~lmms_sgm.datasets.records.DatasetError` (a
ValueError), which ``lmms-sgm`` prints as one line with exit status 2; ``check`` prints its own
list of problems and exits 1 when there is any.
"""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path


def _build(args) -> int:
    from lmms_sgm.datasets.build import build_dataset

    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    parts = [f"--source {shlex.quote(x)}" for x in args.source] + [
        f"--seed {args.seed}", f"--split {args.split}", f"--adv {args.adv}", f"--template-min {args.template_min}"]
    command = "lmms-sgm dataset build " + " ".join(parts) + f" --out {shlex.quote(str(args.out))}"
    manifest = build_dataset(args.source, args.out, seed=args.seed, split=args.split, adv=args.adv,
                             template_min=args.template_min, overwrite=args.overwrite,
                             skip_bad_images=args.skip_bad_images, command=command, log=log)
    c = manifest["counts"]
    print(f"wrote {args.out}: profile {c['profile']['pairs']} pairs ({c['profile']['toxic']} toxic, "
          f"{c['profile']['non_toxic']} non-toxic)" + "".join(
              f"; {s} {c[s]['harmful']} harmful, {c[s]['benign']} benign, {c[s]['adv']} adv" for s in ("validation", "test") if s in c))
    print(
        f"use: lmms-sgm profile --data {Path(args.out) / 'profile.jsonl'} ...;  "
        f"MM_TOXIC_QA_DIR={Path(args.out) / 'eval' / 'test'} lmms-eval ..."
    )
    return 0


def _check(args) -> int:
    from lmms_sgm.datasets.check import check_dataset

    report = check_dataset(args.dir)
    if args.json:
        from lmms_sgm.staging import atomic_write

        atomic_write(args.json, json.dumps(report.to_dict(), indent=2) + "\n")  # whole or not at all
    print(report.format(), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1


def _export(args) -> int:
    from lmms_sgm.datasets.hub import export

    out = export(args.dir, args.out)
    print(f"wrote {out}; upload with: hf upload ORG/NAME {out} --repo-type dataset")
    return 0


def _sources(args) -> int:
    from lmms_sgm.datasets.sources import available

    for kind, s in available().items():
        print(f"{kind}: {s.summary}\n  licence: {s.licence}" + (f"\n  from: {s.url}" if s.url else ""))
        for key, text in s.params.items():
            print(f"  ,{key}=...  {text}")
    return 0


def add_parser(sub, parents=()) -> None:
    """Add ``dataset`` and its sub-commands to the ``lmms-sgm`` sub-parsers ``sub`` (``parents``:
    the options every command takes, e.g. ``--debug``)."""
    parents = list(parents)
    from lmms_sgm.datasets.build import ADV_STYLES
    from lmms_sgm.datasets.splits import DEFAULT_TEMPLATE_MIN

    p = sub.add_parser(
        "dataset",
        parents=parents,
        help="build, check and export MM-TOXIC-QA-style datasets from public sources (docs/dataset.md)",
    )
    dsub = p.add_subparsers(dest="dataset_command", required=True)

    b = dsub.add_parser("build", parents=parents, help="turn sources into profile.jsonl + eval/{validation,test}/ + card + manifest",
                        description="Sources: KIND:PATH[,key=value...]; kinds and their parameters: `lmms-sgm dataset sources`.")
    b.add_argument("--source", action="append", required=True, metavar="KIND:PATH[,k=v...]",
                   help="a source (repeatable): mm-safetybench, beavertails-v, vlguard, jsonl, csv, model-outputs")
    b.add_argument("--out", required=True, help="the dataset directory to create (must not exist or be empty)")
    b.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    b.add_argument("--split", default="0.6,0.2,0.2", metavar="P,V,T", help="shares of profile, validation, test (default 0.6,0.2,0.2)")
    b.add_argument("--adv", default="sd_typo", choices=ADV_STYLES, help="attack drawn for sources without their own (default sd_typo)")
    b.add_argument(
        "--template-min",
        type=int,
        default=DEFAULT_TEMPLATE_MIN,
        help=f"a question asked about this many distinct images is a template, not a grouping key (default {DEFAULT_TEMPLATE_MIN})",
    )
    b.add_argument("--overwrite", action="store_true", help="replace --out if it holds a dataset built by this command")
    b.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="skip records whose image is missing or corrupt (listed in the manifest) instead of failing",
    )
    b.add_argument("--quiet", action="store_true", help="no progress lines")
    b.set_defaults(func=_build)

    c = dsub.add_parser(
        "check",
        parents=parents,
        help="schema, images, duplicates, label balance, cross-split leakage; exit 1 on any error",
    )
    c.add_argument("dir")
    c.add_argument("--json", default=None, help="also write the report as JSON here")
    c.set_defaults(func=_check)

    e = dsub.add_parser("export", parents=parents, help="write a built dataset as parquet + card for the Hugging Face Hub")
    e.add_argument("dir")
    e.add_argument("--out", required=True)
    e.set_defaults(func=_export)

    s = dsub.add_parser("sources", parents=parents, help="list the source kinds, their layouts' parameters and licences")
    s.set_defaults(func=_sources)

