"""MM-SafetyBench (Liu et al., ECCV 2024; github.com/isXinLiu/MM-SafetyBench): harmful prompts.

Layout, as the repository and its image archive ship it::

    ROOT/data/processed_questions/<scenario>.json      {"0": {"Question", "Key Phrase", "Phrase Type",
                                                        "Rephrased Question", "Rephrased Question(SD)", ...}, ...}
    ROOT/data/imgs/<scenario>/{SD,SD_TYPO,TYPO}/<id>.jpg
      or ROOT/MM-SafetyBench(imgs)/<scenario>/...       (the archive's own top folder, unzipped in ROOT)

(``processed_questions/`` and ``imgs/`` directly under ROOT work too; ``images=DIR`` names the
image folder explicitly.) ``<scenario>`` is e.g. ``01-Illegal_Activitiy`` (sic), the category.

Each question becomes one harmful evaluation prompt with the benchmark's own pairing: the SD image
with "Rephrased Question(SD)". Its adversarial variant is the benchmark's SD_TYPO image with
"Rephrased Question" (``adv=TYPO`` takes the TYPO image instead, ``adv=none`` none). The original
"Question" is kept as ``original_question`` (the rephrased questions are templates; leakage is
checked on the original). MM-SafetyBench has no responses, so it gives no profiling pairs.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from lmms_sgm.datasets.records import HARMFUL, DatasetError, ImageInput, SourceRecord, text_or_none

LICENCE = "not restated here: read the terms in the MM-SafetyBench repository before use"
URL = "https://github.com/isXinLiu/MM-SafetyBench"
PARAMS = {
    "adv": "attack images to use: SD_TYPO (default), TYPO or none",
    "images": "the image folder (holding <scenario>/SD/...), when it is not found by itself",
    "scenarios": "only these scenarios, joined by '+' (e.g. 01-Illegal_Activitiy+02-HateSpeech)",
}
IMAGE_FOLDERS = ("data/imgs", "imgs", "MM-SafetyBench(imgs)", "data/MM-SafetyBench(imgs)")
QUESTION_FOLDERS = ("data/processed_questions", "processed_questions")
ADV_KINDS = ("SD_TYPO", "TYPO")


def _find(root: Path, candidates, what: str, given: str | None = None) -> Path:
    if given:
        path = Path(given).expanduser()
        path = path if path.is_absolute() else root / path
        if not path.is_dir():
            raise DatasetError(f"mm-safetybench: {what} {path} is not a directory")
        return path
    for c in candidates:
        if (root / c).is_dir():
            return root / c
    raise DatasetError(f"mm-safetybench: no {what} under {root} (looked for {', '.join(candidates)})")


def read(root: Path, params: dict[str, str]) -> Iterator[SourceRecord]:
    adv = params.get("adv", "SD_TYPO")
    if adv.upper() not in ADV_KINDS and adv.lower() != "none":
        raise DatasetError(f"mm-safetybench: adv must be SD_TYPO, TYPO or none, got {adv!r}")
    adv = None if adv.lower() == "none" else adv.upper()
    qdir = _find(root, QUESTION_FOLDERS, "question folder")
    imgs = _find(root, IMAGE_FOLDERS, "image folder", params.get("images"))
    files = sorted(qdir.glob("*.json"))
    wanted = set(filter(None, params.get("scenarios", "").split("+")))
    if wanted:
        unknown = wanted - {f.stem for f in files}
        if unknown:
            raise DatasetError(f"mm-safetybench: no {', '.join(sorted(unknown))}.json in {qdir}")
        files = [f for f in files if f.stem in wanted]
    if not files:
        raise DatasetError(f"mm-safetybench: no <scenario>.json files in {qdir}")
    for qfile in files:
        scenario = qfile.stem
        try:
            entries = json.loads(qfile.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{qfile}: not valid JSON ({e})") from None
        if not isinstance(entries, dict):
            raise DatasetError(f"{qfile}: expected an object keyed by question id, got {type(entries).__name__}")
        for qid in sorted(entries, key=lambda k: (0, int(k)) if str(k).isdigit() else (1, str(k))):
            yield _record(qfile, scenario, str(qid), entries[qid], imgs, adv)


def _record(qfile: Path, scenario: str, qid: str, entry, imgs: Path, adv: str | None) -> SourceRecord:
    where = f"{qfile}: entry {qid!r}"
    if not isinstance(entry, dict):
        raise DatasetError(f"{where}: expected an object, got {type(entry).__name__}")
    needed = ["Question", "Rephrased Question(SD)"] + (["Rephrased Question"] if adv else [])
    missing = [k for k in needed if not text_or_none(entry.get(k))]
    if missing:
        raise DatasetError(f"{where}: lacks {', '.join(repr(k) for k in missing)}")
    folder = imgs / scenario
    attack = ImageInput(path=folder / adv / f"{qid}.jpg", where=where) if adv else None
    return SourceRecord(
        id=f"{scenario}/{qid}",
        image=ImageInput(path=folder / "SD" / f"{qid}.jpg", where=where),
        category=scenario,
        where=where,
        question=text_or_none(entry["Rephrased Question(SD)"]),
        prompt=HARMFUL,
        key_phrase=text_or_none(entry.get("Key Phrase")),
        original_question=text_or_none(entry["Question"]),
        attack_image=attack,
        attack_question=text_or_none(entry.get("Rephrased Question")) if adv else None,
        attack=f"mm-safetybench:{adv}" if adv else None,
        extra={k: v for k, v in (("phrase_type", text_or_none(entry.get("Phrase Type"))),) if v},
    )
