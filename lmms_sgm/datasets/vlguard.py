"""VLGuard (Zong et al., ICML 2024; huggingface.co/datasets/ys-zong/VLGuard): safe and unsafe
images with instructions; benign prompts (over-refusal) and harmful prompts.

Layout, as the Hub repository ships it once its archives are unzipped in place::

    ROOT/train.json   ROOT/train/<image path>     (train.zip -> train/)
    ROOT/test.json    ROOT/test/<image path>      (test.zip  -> test/)

(``ROOT/data/`` holding them, as in the GitHub repository, works too; an image not found under
``<split>/`` is looked for directly under ROOT.) Each JSON file is a list of
``{"id", "image", "safe", "instr-resp", ["harmful_category", "harmful_subcategory"]}``:

- a safe image has two instructions: ``{"safe_instruction", "response"}`` (a helpful answer) and
  ``{"unsafe_instruction", "response"}`` (a refusal);
- an unsafe image has one: ``{"instruction", "response"}`` (a refusal).

Records, as VLGuard's own evaluation subsets:

- safe image + safe instruction -> a benign prompt, category ``safe_safes`` (over-refusal);
- safe image + unsafe instruction -> a harmful prompt, category ``safe_unsafes``;
- unsafe image + instruction -> a harmful prompt, category = its ``harmful_category``.

Every VLGuard response is safe, so profiling pairs are non-toxic (label 0): ``pairs=helpful``
(default) keeps the helpful answers about safe images (safe descriptions of images, the non-toxic
side the precursor used), ``pairs=all`` adds the refusals, ``pairs=none`` none.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from lmms_sgm.datasets.records import BENIGN, HARMFUL, DatasetError, ImageInput, SourceRecord, text_or_none

LICENCE = "MIT (dataset card); the images come from other datasets, each under its own terms"
URL = "https://huggingface.co/datasets/ys-zong/VLGuard"
PARAMS = {
    "split": "the source's files to read: train, test or all (default)",
    "pairs": "non-toxic profiling pairs from: helpful answers (default), all responses, or none",
}


def read(root: Path, params: dict[str, str]) -> Iterator[SourceRecord]:
    split = params.get("split", "all")
    if split not in ("train", "test", "all"):
        raise DatasetError(f"vlguard: split must be train, test or all, got {split!r}")
    pairs = params.get("pairs", "helpful")
    if pairs not in ("helpful", "all", "none"):
        raise DatasetError(f"vlguard: pairs must be helpful, all or none, got {pairs!r}")
    base = root if any((root / f"{s}.json").is_file() for s in ("train", "test")) else root / "data"
    names = ("train", "test") if split == "all" else (split,)
    metas = [base / f"{s}.json" for s in names if (base / f"{s}.json").is_file()]
    if not metas or (split != "all" and len(metas) != len(names)):
        raise DatasetError(f"vlguard: no {' or '.join(n + '.json' for n in names)} in {root} or {root / 'data'}")
    for meta in metas:
        try:
            entries = json.loads(meta.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{meta}: not valid JSON ({e})") from None
        if not isinstance(entries, list):
            raise DatasetError(f"{meta}: expected a list of entries, got {type(entries).__name__}")
        for i, entry in enumerate(entries):
            yield from _records(meta, base, i, entry, pairs)


def _image(meta: Path, base: Path, rel: str, where: str) -> ImageInput:
    in_split = base / meta.stem / rel
    return ImageInput(path=in_split if in_split.is_file() or not (base / rel).is_file() else base / rel, where=where)


def _records(meta: Path, base: Path, i: int, entry, pairs: str) -> Iterator[SourceRecord]:
    where = f"{meta}: entry {i}"
    if not isinstance(entry, dict):
        raise DatasetError(f"{where}: expected an object, got {type(entry).__name__}")
    where = f"{meta}: entry {i} (id {entry.get('id')!r})"
    missing = [k for k in ("id", "image", "safe", "instr-resp") if entry.get(k) is None]
    if missing:
        raise DatasetError(f"{where}: lacks {', '.join(repr(k) for k in missing)}")
    turns = entry["instr-resp"]
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise DatasetError(f"{where}: 'instr-resp' must be a list of objects")
    if not isinstance(entry["safe"], bool):
        raise DatasetError(f"{where}: 'safe' must be true or false, got {entry['safe']!r}")
    image = _image(meta, base, str(entry["image"]), where)
    rid = f"{meta.stem}/{entry['id']}"
    extra = {"source_split": meta.stem}

    def turn(key: str) -> tuple[str, str | None]:
        found = [t for t in turns if text_or_none(t.get(key))]
        if len(found) != 1:
            raise DatasetError(f"{where}: expected one {key!r} in 'instr-resp', found {len(found)}")
        return text_or_none(found[0][key]), text_or_none(found[0].get("response"))

    if entry["safe"]:
        question, answer = turn("safe_instruction")
        yield SourceRecord(id=f"{rid}/safe", image=image, category="safe_safes", where=where, question=question,
                           prompt=BENIGN, pairs=((answer, 0),) if answer and pairs != "none" else (), extra=extra)
        question, refusal = turn("unsafe_instruction")
        yield SourceRecord(id=f"{rid}/unsafe", image=image, category="safe_unsafes", where=where, question=question,
                           prompt=HARMFUL, pairs=((refusal, 0),) if refusal and pairs == "all" else (), extra=extra)
    else:
        question, refusal = turn("instruction")
        sub = text_or_none(entry.get("harmful_subcategory"))
        yield SourceRecord(id=rid, image=image, category=text_or_none(entry.get("harmful_category")) or "unsafes",
                           where=where, question=question, prompt=HARMFUL,
                           pairs=((refusal, 0),) if refusal and pairs == "all" else (),
                           extra={**extra, **({"subcategory": sub} if sub else {})})
