"""The flags of ``lmms-sgm train-demo`` (kept apart from train.py so that building the CLI parser
does not import torch)."""
from __future__ import annotations

import argparse

from lmms_sgm.demo import world


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The training flags (shared by ``lmms-sgm train-demo`` and ``python -m lmms_sgm.demo.train``)."""
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", type=float, default=10.0, help="training wall time budget")
    ap.add_argument("--seed", type=int, default=0, help="also selects the block of training seeds")
    ap.add_argument("--init", default=None, help="continue (stage 2 only) from this saved demo model")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak stage-2 learning rate")
    ap.add_argument("--capability-weight", type=float, default=1.0,
                    help="draw capability examples this many times as often as opinion ones in stage 2")
    ap.add_argument("--category-weights", type=_category_weights, default={},
                    help="per-category stage-2 draw weights overriding --capability-weight, e.g. shape=4,colour=3 "
                         "(categories: opinion, " + ", ".join(world.CAPABILITY_KINDS) + ")")


def _category_weights(text: str) -> dict:
    weights = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        try:
            weights[key] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad item {item!r}; expected CATEGORY=WEIGHT") from None
        if key not in ("opinion", *world.CAPABILITY_KINDS):
            raise argparse.ArgumentTypeError(f"unknown category {key!r}")
    return weights
