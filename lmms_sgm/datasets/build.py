"""``lmms-sgm dataset build``: public sources -> one checked, documented, leakage-free dataset.

Output (``OUT``)::

    profile.jsonl            labelled pairs for `lmms-sgm profile --data OUT/profile.jsonl` (docs/data.md)
    images/                  their images
    eval/validation/         an MM_TOXIC_QA_DIR: harmful.jsonl, benign.jsonl, adv.jsonl, images/
    eval/test/               an MM_TOXIC_QA_DIR (report results on this one)
    manifest.json            sources, options, counts, groups, digests
    card.md                  the dataset card
    .lmms_sgm_output         the marker: every file the build wrote (what --overwrite may remove)

Three passes, streaming images: (1) read every source record, validate and hash its images into a
staging folder, keep only ids, hashes and normalised questions in memory; (2) split
(:mod:`~lmms_sgm.datasets.splits`); (3) write each record where its split wants it, moving its
images into that split's folder and drawing attack variants. The result is written into a
temporary sibling of OUT, checked with :func:`~lmms_sgm.datasets.check.check_dataset`, and renamed
into place: a failed build leaves OUT as it was. OUT's marker (``.lmms_sgm_output``) lists every
file the build wrote; ``--overwrite`` replaces a build holding those files alone and refuses one
where the user added a file (naming it), so nothing of the user's is deleted. One build at a time
writes OUT (a lock beside it, ``.OUT.lock``).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

from lmms_sgm.datasets.digests import file_sha256
from lmms_sgm.datasets.images import ImageStore, place, relative_name
from lmms_sgm.datasets.records import BENIGN, HARMFUL, DatasetError
from lmms_sgm.datasets.render import STYLES, render_attack
from lmms_sgm.datasets.sources import SourceSpec, parse_source
from lmms_sgm.datasets.splits import (
    DEFAULT_FRACTIONS,
    DEFAULT_TEMPLATE_MIN,
    EVAL_SPLITS,
    SPLITS,
    UNUSED,
    Item,
    assign,
    normalise_question,
    parse_fractions,
)

FORMAT = "lmms-sgm-dataset"
MARKER_NAME = ".lmms_sgm_output"  # lmms_sgm.staging.MARKER
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CARD = "card.md"
PROFILE = "profile.jsonl"
ADV_STYLES = STYLES + ("none",)
GIANT_GROUP_SHARE = 0.5  # a group holding more than half of the records cannot be split
GIANT_GROUP_MIN_RECORDS = 20  # ... unless the build is tiny


def is_built_dataset(path: Path) -> bool:
    try:
        return json.loads((Path(path) / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def refuse_existing(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty OUT, unless ``overwrite`` and OUT is a dataset this command built."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DatasetError(f"--out {out} exists and is not a directory")
    if not any(out.iterdir()):
        return
    if overwrite and is_built_dataset(out):
        from lmms_sgm.staging import read_marker, some_names, unlisted_files

        marker = read_marker(out)
        if marker is None or marker.get("command") != "dataset build" or marker.get("files") is None:
            raise DatasetError(f"--out {out} is a dataset whose files are not listed (no {MARKER_NAME} marker: an older "
                               "version built it, or it was copied without it); --overwrite only removes files a build "
                               "listed: delete it yourself or choose another --out (nothing was deleted)")
        others = unlisted_files(out, marker["files"])
        if others:
            shown = some_names(others)
            raise DatasetError(f"--out {out} holds files the build did not write ({shown}); --overwrite only replaces "
                               "a dataset holding nothing else: move them or choose another --out (nothing was deleted)")
        return
    if overwrite:
        raise DatasetError(f"--out {out} is not a dataset built by `lmms-sgm dataset build` (no {MANIFEST} of format "
                           f"{FORMAT!r}); --overwrite only replaces those. Choose another --out")
    raise DatasetError(f"--out {out} exists and is not empty; choose a new directory, "
                       "or --overwrite to replace a dataset built by this command")


def build_dataset(sources: Iterable[str | SourceSpec], out: str | Path, *, seed: int = 0, split=DEFAULT_FRACTIONS,
                  adv: str = "sd_typo", template_min: int = DEFAULT_TEMPLATE_MIN, overwrite: bool = False,
                  skip_bad_images: bool = False, command: str | None = None,
                  log: Callable[[str], None] | None = None) -> dict:
    """Build a dataset into ``out`` from ``sources`` (``KIND:PATH[,key=value...]``); returns the manifest."""
    out = Path(out).expanduser()
    log = log or (lambda msg: None)
    fractions = parse_fractions(split)
    if adv not in ADV_STYLES:
        raise DatasetError(f"--adv must be one of {', '.join(ADV_STYLES)}, got {adv!r}")
    if template_min < 2:
        raise DatasetError(f"--template-min must be at least 2, got {template_min}")
    refuse_existing(out, overwrite)
    specs = [s if isinstance(s, SourceSpec) else parse_source(s) for s in sources]
    if not specs:
        raise DatasetError("no --source given")
    from lmms_sgm.staging import discard_listed, staged_directory, write_marker

    # Written into a hidden sibling (named by this process, removed by the next build if this one is
    # killed) and swapped in whole; refuse_existing runs again under the lock and at the swap.
    with staged_directory(out, check=lambda: refuse_existing(out, overwrite),
                          discard=lambda old: discard_listed(old, "dataset build")) as tmp:
        options = {"seed": seed, "split": dict(zip(SPLITS, fractions)), "adv": adv, "template_min": template_min,
                   "skip_bad_images": skip_bad_images}
        builder = _Builder(tmp, specs, options, log)
        manifest = builder.run()
        manifest["command"] = command
        _write_json(tmp / MANIFEST, manifest)
        from lmms_sgm.datasets.card import render_card
        from lmms_sgm.datasets.check import check_dataset

        (tmp / CARD).write_text(render_card(manifest), encoding="utf-8")
        # The images were decoded and hashed while reading: not decoded again (`dataset check` does).
        report = check_dataset(tmp, known_images=builder.placed_paths)
        if report.errors:  # the splitter or writer is wrong: never hand out such a dataset
            raise DatasetError("the built dataset fails its own check (a bug; please report it):\n  " + "\n  ".join(report.errors[:20]))
        write_marker(tmp, "dataset build")
    return manifest


def _write_json(path: Path, doc) -> None:
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


class _Builder:
    def __init__(self, root: Path, specs: list[SourceSpec], options: dict, log):
        self.root, self.specs, self.options, self.log = root, specs, options, log
        self.staging = root / ".staging"
        self.store = ImageStore(self.staging / "images")
        self.items: list[Item] = []
        self.sources: list[dict] = []
        self.skipped: list[str] = []
        self.duplicates = 0
        self.pair_labels: Counter = Counter()  # label -> profiling pairs read, for the one-class check

    def run(self) -> dict:
        started = time.perf_counter()
        self._read_sources()
        if not self.items:
            raise DatasetError("the sources gave no records")
        self._refuse_one_class()
        o = self.options
        plan = assign(self.items, tuple(o["split"].values()), o["seed"], o["template_min"])
        self._refuse_giant_group(plan)
        counts = self._write(plan)
        self._refuse_one_class(counts["profile"])
        shutil.rmtree(self.staging)
        files = {p.relative_to(self.root).as_posix(): file_sha256(p) for p in sorted(self.root.rglob("*.jsonl"))}
        image_digest = hashlib.sha256("".join(sorted(self.images_written)).encode()).hexdigest()
        profile_digest = _profile_digest(self.root / PROFILE) if counts["profile"]["pairs"] else None
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created_by": f"lmms_sgm {_version()}",
            "options": o,
            "sources": self.sources,
            "counts": counts,
            "groups": plan.group_summary(self.items),
            "template_questions": [{"question": q, "images": n} for q, n in plan.templates.items()],
            "dropped": {"duplicate_records": self.duplicates, "unused_records": self.unused,
                        "bad_images": len(self.skipped), "bad_image_messages": self.skipped[:100]},
            "digests": {
                "files": files,
                "images": image_digest,
                "dataset": hashlib.sha256(json.dumps([files, image_digest], sort_keys=True).encode()).hexdigest(),
                "profile_data": profile_digest,
            },
            "build_seconds": round(time.perf_counter() - started, 2),
        }

    # ------------------------------------------------------------------ pass 1: read

    def _read_sources(self) -> None:
        labels = Counter()
        seen_ids: set[str] = set()
        seen_content: set[bytes] = set()
        with open(self.staging / "records.jsonl", "w", encoding="utf-8") as staged:
            for spec in self.specs:
                labels[spec.kind] += 1
                label = spec.kind if labels[spec.kind] == 1 else f"{spec.kind}#{labels[spec.kind]}"
                src = spec.source
                entry = {"kind": spec.kind, "label": label, "path": str(spec.path.resolve()), "params": spec.params,
                         "spec": spec.text or f"{spec.kind}:{spec.path}", "licence": spec.params.get("licence") or src.licence,
                         "url": src.url, "summary": src.summary, **(src.describe(spec.path, spec.params) if src.describe else {})}
                content = hashlib.sha256()
                n_read = n_kept = 0
                self.log(f"reading {entry['spec']}")
                for rec in src.read(spec.path, spec.params):
                    n_read += 1
                    try:
                        image = self.store.add(rec.image)
                        attack = self.store.add(rec.attack_image) if rec.attack_image is not None else None
                    except DatasetError as e:
                        if not self.options["skip_bad_images"]:
                            raise
                        self.skipped.append(str(e))
                        continue
                    rid = f"{label}/{rec.id}"
                    if rid in seen_ids:
                        raise DatasetError(f"{rec.where}: record id {rec.id!r} is used twice in {label}")
                    seen_ids.add(rid)
                    pairs = list(dict.fromkeys(rec.pairs))  # a text repeated on one record adds nothing
                    question, original = normalise_question(rec.question), normalise_question(rec.original_question)
                    key = json.dumps([image.hash, question, original, rec.prompt, pairs, rec.category]).encode()
                    digest = hashlib.sha256(key).digest()
                    if digest in seen_content:
                        self.duplicates += 1
                        continue
                    seen_content.add(digest)
                    self.pair_labels.update(y for _, y in pairs)
                    row = {"id": rid, "source": label, "category": rec.category, "image": image.hash,
                           "question": rec.question, "original_question": rec.original_question, "pairs": pairs,
                           "prompt": rec.prompt, "key_phrase": rec.key_phrase, "answer": rec.answer,
                           "attack_image": attack.hash if attack else None, "attack_question": rec.attack_question,
                           "attack": rec.attack, "extra": rec.extra}
                    line = json.dumps(row, ensure_ascii=False)
                    content.update(line.encode())
                    staged.write(line + "\n")
                    self.items.append(Item(id=rid, category=rec.category,
                                           images=(image.hash,) + ((attack.hash,) if attack else ()),
                                           questions=tuple(q for q in (question, original) if q),
                                           can_profile=bool(pairs), can_eval=rec.prompt is not None))
                    n_kept += 1
                entry.update(records_read=n_read, records_kept=n_kept, content_sha256=content.hexdigest())
                self.sources.append(entry)
                self.log(f"  {n_read} records, {n_kept} kept, {len(self.store)} distinct images so far")

    def _refuse_one_class(self, profile: dict | None = None) -> None:
        """Profiling pairs of one class only are the user's data, not a bug: AUROC needs both.
        Checked on the pairs read (before any splitting or writing), then on the profile split."""
        toxic, non_toxic = (self.pair_labels[1], self.pair_labels[0]) if profile is None else \
            (profile["toxic"], profile["non_toxic"])
        if not toxic + non_toxic or (toxic and non_toxic):
            return
        missing = "non-toxic (label 0)" if toxic else "toxic (label 1)"
        sources = ", ".join(s["spec"] for s in self.sources)
        if profile is None:
            raise DatasetError(f"the sources ({sources}) give {toxic} toxic and {non_toxic} non-toxic profiling pairs: "
                               f"profiling (AUROC) needs both classes; add a source with {missing} texts")
        raise DatasetError(f"the profile split got {toxic} toxic and {non_toxic} non-toxic pairs (the sources have both "
                           f"classes, but too few {missing} pairs for the split); add {missing} pairs, or raise the "
                           "profile share of --split")

    def _refuse_giant_group(self, plan) -> None:
        n = len(self.items)
        biggest = max(plan.groups, key=len)
        if n >= GIANT_GROUP_MIN_RECORDS and len(biggest) > GIANT_GROUP_SHARE * n:
            info = plan.group_summary(self.items, top=1)["largest"][0]
            raise DatasetError(
                f"{len(biggest)} of the {n} records share images or questions and form one group, which no split can "
                f"take without leaking (ids {', '.join(info['ids'])}, ...; held together by {'; '.join(info['shared_keys'])}). "
                f"A placeholder image or a generic question repeated across records does this: remove it, or lower "
                f"--template-min (now {self.options['template_min']}) so that a question asked about that many images "
                "counts as a template")

    # ------------------------------------------------------------------ pass 3: write

    def _write(self, plan) -> dict:
        adv = self.options["adv"]
        fractions = self.options["split"]
        handles: dict[Path, object] = {}
        placed: dict[tuple[str, str], str] = {}  # (split, hash) -> relative name; strings: ~14k of them at 10k records
        self.images_written: set[str] = set()
        self.placed_paths: dict[str, str] = {}  # resolved path -> pixel hash, for the self-check
        resolved: dict[str, Path] = {}
        self.unused = 0
        counts = {"profile": {"pairs": 0, "toxic": 0, "non_toxic": 0, "images": 0, "by_category": {}, "by_source": {}}}
        eval_splits = [s for s in EVAL_SPLITS if fractions[s] > 0 or s in plan.split_of]
        any_prompts = any(it.can_eval for it in self.items)
        for s in eval_splits:
            counts[s] = {"harmful": 0, "benign": 0, "adv": 0, "images": 0, "by_category": {}, "by_source": {}}

        def out(path: Path):
            if path not in handles:
                path.parent.mkdir(parents=True, exist_ok=True)
                handles[path] = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed after the loop
            return handles[path]

        def put(folder: Path, split: str, h: str) -> str:
            key = (split, h)
            if key not in placed:
                stored = self.store.get(h)
                place(self.store.path(stored), folder / relative_name(stored))
                placed[key] = relative_name(stored)
                base = resolved.setdefault(split, folder.resolve())
                self.placed_paths[str(base / relative_name(stored))] = h
                self.images_written.add(h)
                counts[split]["images"] += 1
            return placed[key]

        out(self.root / PROFILE)  # always there, possibly empty
        if any_prompts:
            for s in eval_splits:
                for kind in (HARMFUL, BENIGN) + (("adv",) if adv != "none" else ()):
                    out(self.root / "eval" / s / f"{kind}.jsonl")
        with open(self.staging / "records.jsonl", encoding="utf-8") as staged:
            for k, line in enumerate(staged):
                r = json.loads(line)
                split = plan.split_of[k]
                if split == UNUSED:
                    self.unused += 1
                    continue
                c = counts[split]
                extra = {"source": r["source"], **r["extra"]}
                if split == "profile":
                    if not r["pairs"]:
                        self.unused += 1
                        continue
                    image = put(self.root, split, r["image"])
                    for j, (text, label) in enumerate(r["pairs"]):
                        rid = r["id"] if len(r["pairs"]) == 1 else f"{r['id']}#{j}"
                        out(self.root / PROFILE).write(json.dumps(
                            {"id": rid, "image": image, "text": text, "label": label, "question": r["question"],
                             "category": r["category"], **_given(original_question=r["original_question"]), **extra},
                            ensure_ascii=False) + "\n")
                        kind = "toxic" if label else "non_toxic"
                        c["pairs"] += 1
                        c[kind] += 1
                        _bump(c["by_category"], r["category"], kind)
                        _bump(c["by_source"], r["source"], kind)
                    continue
                if r["prompt"] is None:
                    self.unused += 1
                    continue
                folder = self.root / "eval" / split
                harmful = r["prompt"] == HARMFUL
                record = {"id": r["id"], "image": put(folder, split, r["image"]), "question": r["question"],
                          "category": r["category"], "harmful": int(harmful), "key_phrase": r["key_phrase"],
                          "answer": r["answer"], **_given(original_question=r["original_question"]), **extra}
                out(folder / f"{r['prompt']}.jsonl").write(json.dumps(record, ensure_ascii=False) + "\n")
                c[r["prompt"]] += 1
                _bump(c["by_category"], r["category"], r["prompt"])
                _bump(c["by_source"], r["source"], r["prompt"])
                if harmful and adv != "none":
                    if r["attack_image"]:
                        image, question, attack = put(folder, split, r["attack_image"]), r["attack_question"], r["attack"]
                    else:
                        with open(folder / record["image"], "rb") as f:
                            from PIL import Image

                            base = Image.open(f).convert("RGB")
                        drawn, question = render_attack(adv, base, r["question"], r["key_phrase"])
                        stored = self.store.add_rendered(drawn, photo=adv == "sd_typo")
                        image, attack = put(folder, split, stored.hash), adv
                    out(folder / "adv.jsonl").write(json.dumps(
                        {**record, "id": f"{r['id']}#adv", "image": image, "question": question,
                         "original_question": r["original_question"] or r["question"], "attack": attack},
                        ensure_ascii=False) + "\n")
                    c["adv"] += 1
                    _bump(c["by_category"], r["category"], "adv")
        for handle in handles.values():
            handle.close()
        return counts


def _profile_digest(path: Path) -> str:
    """The ``data_digest`` glasses profiled on ``path`` will carry, read one line at a time."""
    from lmms_sgm.data import Pair, digest_pairs

    def pairs():
        with open(path, encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                yield Pair(image=path.parent / r["image"], text=r["text"], label=r["label"], question=r.get("question"),
                           category=r.get("category"))

    return digest_pairs(pairs())


def _given(**fields) -> dict:
    return {k: v for k, v in fields.items() if v is not None}


def _bump(table: dict, key: str, kind: str) -> None:
    row = table.setdefault(key, {})
    row[kind] = row.get(kind, 0) + 1


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("lmms_sgm")
    except Exception:  # noqa: BLE001 # pragma: no cover - a source tree never installed
        return "unknown"
