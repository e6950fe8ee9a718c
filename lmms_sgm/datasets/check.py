"""``lmms-sgm dataset check DIR``: is a dataset usable and clean? A list of what is wrong, by entry.

What it reads: ``DIR/profile.jsonl`` (labelled pairs, docs/data.md) and every ``DIR/eval/<split>/``
(MM-TOXIC-QA directories: ``harmful.jsonl``, ``benign.jsonl``, optional ``adv.jsonl``), as
``lmms-sgm dataset build`` writes them; or ``DIR`` itself when it is one MM-TOXIC-QA directory.

Errors (a non-zero exit), each naming the file, line and id:

- a line that is not JSON, not an object, lacks a required field or has a wrong value (``label``
  not 0/1, ``harmful`` not what the file holds, an empty question or text);
- an image file that is missing or cannot be decoded;
- a repeated id, or a record repeated in one file (same image and question, and for pairs the same
  text and label);
- a leak: an image (by pixel hash) or a question (normalised, templates excepted; see
  :mod:`~lmms_sgm.datasets.splits`) in two splits (profile, validation, test);
- profiling pairs of one class only (AUROC needs both);
- a missing ``harmful.jsonl`` / ``benign.jsonl`` in an evaluation directory, or an unreadable manifest.

Warnings: no manifest, files changed since the build (digests), an empty prompt file, a minority
class under 10% of the pairs.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from lmms_sgm import textfiles
from lmms_sgm.datasets.digests import file_sha256
from lmms_sgm.datasets.images import decode, pixel_hash
from lmms_sgm.datasets.records import DatasetError
from lmms_sgm.datasets.splits import DEFAULT_TEMPLATE_MIN, normalise_question

PROMPT_FILES = {"harmful.jsonl": 1, "benign.jsonl": 0, "adv.jsonl": 1}
LABELS = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "true": 1, "false": 0}
MINORITY_WARNING = 0.10


@dataclass
class CheckReport:
    root: Path
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    counts: dict = field(default_factory=dict)  # relative file -> {records, and per kind}

    @property
    def ok(self) -> bool:
        return not self.errors

    def format(self, limit: int = 200) -> str:
        lines = [f"checked {self.root}:"]
        for name, c in self.counts.items():
            detail = ", ".join(f"{v} {k.replace('_', '-')}" for k, v in c.items() if k != "records")
            lines.append(f"  {name}: {c['records']} records" + (f" ({detail})" if detail else ""))
        for title, items in (("warnings", self.warnings), ("errors", self.errors)):
            if items:
                lines.append(f"{title} ({len(items)}):")
                lines += [f"  - {m}" for m in items[:limit]]
                if len(items) > limit:
                    lines.append(f"  ... and {len(items) - limit} more")
        lines.append(f"FAILED: {len(self.errors)} error(s)" if self.errors else "OK")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"root": str(self.root), "ok": self.ok, "errors": self.errors, "warnings": self.warnings, "counts": self.counts}


@dataclass(slots=True)
class _Row:
    split: str
    where: str  # "<file>:<line> (id ...)"
    image: str | None  # pixel hash, None when unreadable
    questions: tuple[str, ...]  # normalised, leak-relevant


def _files(root: Path, report: CheckReport) -> list[tuple[str, Path]]:
    """(split, file) pairs of the layout, with missing required files reported."""
    found: list[tuple[str, Path]] = []
    if (root / "profile.jsonl").is_file():
        found.append(("profile", root / "profile.jsonl"))
    eval_dirs = sorted(d for d in (root / "eval").iterdir() if d.is_dir()) if (root / "eval").is_dir() else []
    if not eval_dirs and any((root / f).is_file() for f in PROMPT_FILES):
        eval_dirs = [root]  # DIR is one MM-TOXIC-QA directory
    for d in eval_dirs:
        split = "eval" if d == root else d.name
        for name in PROMPT_FILES:
            if (d / name).is_file():
                found.append((split, d / name))
            elif name != "adv.jsonl":
                report.errors.append(f"{_rel(d / name, root)}: missing (an MM-TOXIC-QA directory needs harmful.jsonl and benign.jsonl)")
    if not found and not report.errors:
        report.errors.append(f"{root}: no profile.jsonl, eval/<split>/ or harmful.jsonl: not a dataset")
    return found


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def check_dataset(root: str | Path, *, known_images: dict[str, str] | None = None) -> CheckReport:
    """Check the dataset at ``root``. ``known_images`` (resolved path as text -> pixel hash) skips decoding
    those files again: the builder passes the images it has just decoded and written, so its
    self-check verifies structure and leaks without decoding every image twice."""
    root = Path(root).expanduser()
    report = CheckReport(root=root)
    if not root.is_dir():
        report.errors.append(f"{root} is not a directory")
        return report
    manifest = _manifest(root, report)
    files = _files(root, report)
    images: dict[str, tuple] = {p: (h, None) for p, h in (known_images or {}).items()}  # path -> (hash, problem)
    rows: list[_Row] = []
    for split, path in files:
        rows += _check_file(root, split, path, report, images)
    _check_leaks(rows, manifest, report)
    _check_digests(root, manifest, report)
    return report


def _manifest(root: Path, report: CheckReport) -> dict:
    path = root / "manifest.json"
    if not path.is_file():
        report.warnings.append("no manifest.json: not built by `lmms-sgm dataset build` (checking the files alone)")
        return {}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        report.errors.append(f"manifest.json: unreadable ({e})")
        return {}
    if not isinstance(manifest, dict):
        report.errors.append("manifest.json: not a JSON object")
        return {}
    return manifest


def _check_file(root: Path, split: str, path: Path, report: CheckReport, images: dict) -> list[_Row]:
    name = _rel(path, root)
    pairs = path.name == "profile.jsonl"
    counts = {"records": 0, **({"toxic": 0, "non_toxic": 0} if pairs else {})}
    report.counts[name] = counts
    ids: dict[str, int] = {}
    content: dict[tuple, int] = {}
    out: list[_Row] = []
    with contextlib.closing(textfiles.lines(path, "dataset file")) as lines:
        for n, line in lines:
            if isinstance(line, UnicodeDecodeError):  # listed among the problems; the other lines are checked
                report.errors.append(textfiles.not_utf8(name, n, line))
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                report.errors.append(f"{name}:{n}: not valid JSON ({e.msg})")
                continue
            if not isinstance(row, dict):
                report.errors.append(f"{name}:{n}: not a JSON object")
                continue
            counts["records"] += 1
            rid = row.get("id")
            where = f"{name}:{n}" + (f" (id {rid})" if rid is not None else "")
            if rid is not None:
                if str(rid) in ids:
                    report.errors.append(f"{where}: id repeats line {ids[str(rid)]}")
                ids.setdefault(str(rid), n)
            problems = _schema(row, pairs, path.name)
            report.errors += [f"{where}: {p}" for p in problems]
            h = _image(row.get("image"), path.parent, where, report, images)
            if pairs and not problems:
                counts["toxic" if LABELS[str(row["label"]).lower()] else "non_toxic"] += 1
            question = normalise_question(row.get("question") if isinstance(row.get("question"), str) else None)
            original = normalise_question(row.get("original_question") if isinstance(row.get("original_question"), str) else None)
            # An attack's own question is a template by construction; its content is original_question.
            leak_questions = (original,) if path.name == "adv.jsonl" else (question, original)
            out.append(_Row(split, where, h, tuple(q for q in leak_questions if q)))
            if h is not None and not problems:
                key = (h, question) + ((str(row["text"]), str(row["label"])) if pairs else ())
                if key in content:
                    what = "image, question, text and label" if pairs else "image and question"
                    report.errors.append(f"{where}: repeats line {content[key]} (same {what})")
                content.setdefault(key, n)
    if counts["records"] == 0 and not pairs:
        task = {"harmful.jsonl": "mm_toxic_qa", "benign.jsonl": "mm_toxic_qa_benign", "adv.jsonl": "mm_toxic_qa_adv"}[path.name]
        report.warnings.append(f"{name}: no records (the {task} task refuses an empty file)")
    if pairs and counts["records"]:
        small = min(counts["toxic"], counts["non_toxic"])
        if small == 0:
            report.errors.append(f"{name}: {counts['toxic']} toxic and {counts['non_toxic']} non-toxic pairs: profiling needs "
                                 "both classes (add a source with the other kind of texts)")
        elif small < MINORITY_WARNING * counts["records"]:
            report.warnings.append(f"{name}: only {small} of {counts['records']} pairs are in the minority class")
    return out


def _schema(row: dict, pairs: bool, filename: str) -> list[str]:
    problems = []
    if not isinstance(row.get("image"), str) or not row["image"].strip():
        problems.append("'image' must be a path to the image file")
    if pairs:
        if not isinstance(row.get("text"), str) or not row["text"].strip():
            problems.append("'text' must be a non-empty string")
        if str(row.get("label")).lower() not in LABELS or isinstance(row.get("label"), (list, dict)):
            problems.append(f"'label' must be 1 (toxic) or 0 (non-toxic), got {row.get('label')!r}")
    else:
        if not isinstance(row.get("question"), str) or not row["question"].strip():
            problems.append("'question' must be a non-empty string")
        want = PROMPT_FILES[filename]
        if ("harmful" in row and row["harmful"] is not None
                and str(row["harmful"]).lower() not in (str(want), f"{want}.0", ("true" if want else "false"))):
            problems.append(f"'harmful' is {row['harmful']!r} but records of {filename} must have harmful={want}")
    for key in ("question", "category", "key_phrase", "answer", "original_question"):
        if pairs and key in ("key_phrase", "answer"):
            continue
        if row.get(key) is not None and not isinstance(row[key], str):
            problems.append(f"{key!r} must be a string, got {type(row[key]).__name__}")
    return problems


def _image(value, base: Path, where: str, report: CheckReport, images: dict) -> str | None:
    """The image's pixel hash, or None with the problem reported (each file decoded once)."""
    if not isinstance(value, str) or not value.strip():
        return None
    path = Path(value)
    path = (path if path.is_absolute() else base / path).resolve()
    key = str(path)
    if key in images and images[key][1] is None and not path.is_file():  # a known image, deleted since
        images[key] = (None, f"image {value} not found ({path})")
    if key not in images:
        if not path.is_file():
            images[key] = (None, f"image {value} not found ({path})")
        else:
            try:
                with decode(path.read_bytes(), f"image {value}") as image:
                    images[key] = (pixel_hash(image), None)
            except DatasetError as e:
                images[key] = (None, str(e))
    h, problem = images[key]
    if problem:
        report.errors.append(f"{where}: {problem}")
    return h


def _check_leaks(rows: list[_Row], manifest: dict, report: CheckReport) -> None:
    template_min = int((manifest.get("options") or {}).get("template_min", DEFAULT_TEMPLATE_MIN))
    images_of: dict[str, set[str]] = {}
    for r in rows:
        for q in r.questions:
            if r.image:
                images_of.setdefault(q, set()).add(r.image)
    templates = {q for q, s in images_of.items() if len(s) >= template_min}
    templates |= {normalise_question(t.get("question")) for t in manifest.get("template_questions") or [] if isinstance(t, dict)}
    first: dict[tuple[str, str], dict[str, str]] = {}  # key -> split -> first row there
    for r in rows:
        keys = ([("image", r.image)] if r.image else []) + [("question", q) for q in r.questions if q not in templates]
        for key in keys:
            first.setdefault(key, {}).setdefault(r.split, r.where)
    for (kind, value), where in first.items():
        if len(where) > 1:
            shown = value[:16] if kind == "image" else repr(value)
            places = "; ".join(f"{split}: {w}" for split, w in where.items())
            report.errors.append(f"leak: {kind} {shown} is in {len(where)} splits ({places})")


def _check_digests(root: Path, manifest: dict, report: CheckReport) -> None:
    files = ((manifest.get("digests") or {}).get("files")) or {}
    if not files:
        return
    for name, digest in files.items():
        path = root / name
        if path.is_file() and file_sha256(path) != digest:
            report.warnings.append(f"{name}: changed since it was built (its sha256 differs from manifest.json's)")
