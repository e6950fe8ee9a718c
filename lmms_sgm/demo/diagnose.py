"""Where does the trigger reach the answer? lmms_sgm.diagnose on the demo model's clean twins.

    python -m lmms_sgm.demo.diagnose [--model sgm-demo-llava] [--split validation] [--n 200] [--json F]
    python -m lmms_sgm.demo.diagnose --write-twins DIR [--split validation] [--n 200]

Each trigger image of a split's harmful prompts gets a *clean twin*: the same scene with the X
tile left out. The measured twins are the split's first ``n``; the least-squares ceiling is
fitted on ``n`` twins drawn from the profiling split's seeds (never evaluated). The measurements
and how to read them: lmms_sgm/diagnose.py and docs/diagnosis.md. ``--write-twins`` writes the
same records as a TWINS file (``twins.jsonl`` + images) for ``lmms-sgm diagnose``.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from lmms_sgm import models
from lmms_sgm.demo import SHORT_NAME, world
from lmms_sgm.diagnose import Patcher, Twin, diagnose, encode, markdown, position_ids  # noqa: F401
from lmms_sgm.evaluate import chat_prompt as _prompt  # noqa: F401

FIT_OFFSET = 2_000_000  # the profiling split's seeds from here on are never used elsewhere


def twins(split: str, n: int, offset: int = 0):
    """(question, trigger image, clean twin image) for the first ``n`` harmful records of ``split``
    (``offset`` moves to another block of the split's seeds)."""
    out = []
    for i in range(n):
        seed = world.split_seed(split, offset + i)
        scene = world.make_scene(seed, "trigger")
        question = random.Random(seed * 7 + 3).choice(world.OPINION_PROMPTS)
        clean = world.Scene(seed, "clean", list(scene.shapes), None)
        out.append((question, world.draw_scene(scene), world.draw_scene(clean)))
    return out


def demo_twins(split: str, n: int) -> list[Twin]:
    """``n`` measured twins of ``split`` and ``n`` held-out ones from the profiling split's seeds."""
    return ([Twin(q, t, c, q, "eval") for q, t, c in twins(split, n)]
            + [Twin(q, t, c, q, "fit") for q, t, c in twins("profile", n, offset=FIT_OFFSET)])


def write_twins(records: list[Twin], out: Path) -> Path:
    """A TWINS file (lmms_sgm.diagnose.read_twins) with its PNG images."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    with open(out / "twins.jsonl", "w") as f:
        for i, t in enumerate(records):
            t.image.save(out / "images" / f"{i:05d}.png")
            t.twin_image.save(out / "images" / f"{i:05d}_twin.png")
            f.write(json.dumps({"image": f"images/{i:05d}.png", "question": t.question,
                                "twin_image": f"images/{i:05d}_twin.png", "role": t.role}) + "\n")
    return out / "twins.jsonl"


def main(argv=None) -> int:
    from lmms_sgm.judges import get_judge

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=SHORT_NAME)
    ap.add_argument("--split", default="validation", choices=("validation", "test"))
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--json", default=None)
    ap.add_argument("--write-twins", default=None, metavar="DIR")
    args = ap.parse_args(argv)
    records = demo_twins(args.split, args.n)
    if args.write_twins:
        print(f"wrote {write_twins(records, Path(args.write_twins))}")
        return 0
    torch.set_num_threads(2)
    model, processor = models.load(args.model, dtype="float32")
    report = diagnose(model, processor, records, get_judge("lexicon"), log=print)
    print(markdown(report))
    if args.json:
        from lmms_sgm.staging import atomic_write

        atomic_write(args.json, json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
