"""The dataset card (``card.md``): what a built dataset holds, where it comes from, how to use it.

Rendered from the manifest alone, deterministically (no dates), so the same build gives the same
card. Its YAML header is a Hugging Face dataset card header; ``export`` adds the ``configs`` the
Hub needs to load the parquet files (:mod:`lmms_sgm.datasets.hub`).
"""
from __future__ import annotations

import json

CONTENT_WARNING = (
    "> **Content warning.** This dataset holds harmful, offensive and disturbing images and texts "
    "(requests for illegal or dangerous activities, hate speech, sexual content, self-harm, and "
    "toxic answers to them). It exists to measure and reduce such outputs of multimodal models. "
    "Do not use it to train a model to produce them, and do not show it to people who have not "
    "agreed to see it."
)

NONCOMMERCIAL = ("cc-by-nc-4.0", "CC BY-NC 4.0")


def hub_licence(manifest: dict) -> str:
    """The ``license:`` of the Hub header: the restrictive one if any source has it."""
    licences = [s.get("licence", "") for s in manifest.get("sources", [])]
    if any(NONCOMMERCIAL[1] in lic for lic in licences):
        return NONCOMMERCIAL[0]
    return "other"


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "n>1M"


def header(manifest: dict, configs: list[dict] | None = None) -> str:
    counts = manifest.get("counts", {})
    total = sum(c.get("pairs", 0) + c.get("harmful", 0) + c.get("benign", 0) + c.get("adv", 0) for c in counts.values())
    lines = ["---", f"license: {hub_licence(manifest)}", "language:", "- en", "pretty_name: MM-TOXIC-QA (built with lmms-sgm)",
             "task_categories:", "- visual-question-answering", "tags:", "- safety", "- toxicity", "- multimodal",
             "- red-teaming", "- not-for-all-audiences", "size_categories:", f"- {_size_category(total)}"]
    if configs:
        lines.append("configs:")
        for c in configs:
            lines.append(f"- config_name: {c['name']}")
            lines.append("  data_files:")
            for split, path in c["data_files"].items():
                lines += [f"  - split: {split}", f"    path: {path}"]
    lines.append("---")
    return "\n".join(lines)


def _table(head: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return out


def render_card(manifest: dict, configs: list[dict] | None = None) -> str:
    o = manifest.get("options", {})
    counts = manifest.get("counts", {})
    sources = manifest.get("sources", [])
    profile = counts.get("profile", {})
    evals = [s for s in ("validation", "test") if s in counts]
    lines = [header(manifest, configs), "", "# MM-TOXIC-QA (built with lmms-sgm)", "", CONTENT_WARNING, ""]
    lines += [
        ("Toxic and non-toxic image-text pairs for profiling the toxic-expert neurons of a multimodal model "
        "(SGM, arXiv 2512.15052), and harmful and benign image+question prompts for measuring its harmful "
        "rate, its robustness to typographic attacks and its over-refusal, in the layout `lmms_sgm` reads. "
        "The paper's own MM-TOXIC-QA is not public; this is a stand-in built from the sources below by "
        f"`lmms-sgm dataset build` ({manifest.get('created_by', 'lmms_sgm')})."),
        "",
        "## Files",
        "",
        (f"- `profile.jsonl` + `images/`: {profile.get('pairs', 0)} labelled pairs ({profile.get('toxic', 0)} toxic, "
        f"{profile.get('non_toxic', 0)} non-toxic); fields `id, image, text, label, question, category, source`."),
    ]
    for s in evals:
        c = counts[s]
        lines.append(
            f"- `eval/{s}/` (an `MM_TOXIC_QA_DIR`): {c.get('harmful', 0)} harmful, {c.get('benign', 0)} benign "
            f"and {c.get('adv', 0)} adversarial prompts; fields `id, image, question, category, harmful, key_phrase, answer, source`."
        )
    lines += ["- `manifest.json`: sources, options, counts, groups, digests; `card.md`: this card.", ""]

    lines += ["## Sources and licences", ""]
    lines += _table(["source", "read from", "records read", "kept", "licence", "where it comes from"],
                    [[s["label"], f"`{s['spec']}`", s.get("records_read", ""), s.get("records_kept", ""), s["licence"], s["url"] or "local"]
                     for s in sources])
    judges = [s for s in sources if s.get("judge")]
    for s in judges:
        lines += ["", f"`{s['label']}` answers were labelled by the judge `{json.dumps(s['judge'], sort_keys=True)}`."]
    lines += ["", ("The dataset inherits every source's terms: the most restrictive one governs the whole. "
              "BeaverTails-V is CC BY-NC 4.0 (non-commercial use only, with attribution); respect the terms of the "
              "images' own origins too. Cite the sources' papers when you publish results."), ""]

    lines += ["## Composition", "", "### profile", ""]
    lines += _table(["category", "toxic (1)", "non-toxic (0)"],
                    [[cat, v.get("toxic", 0), v.get("non_toxic", 0)] for cat, v in sorted(profile.get("by_category", {}).items())]
                    + [["**all**", profile.get("toxic", 0), profile.get("non_toxic", 0)]])
    for s in evals:
        c = counts[s]
        lines += ["", f"### {s}", ""]
        lines += _table(
            ["category", "harmful", "benign", "adversarial"],
            [
                [cat, v.get("harmful", 0), v.get("benign", 0), v.get("adv", 0)]
                for cat, v in sorted(c.get("by_category", {}).items())
            ]
            + [["**all**", c.get("harmful", 0), c.get("benign", 0), c.get("adv", 0)]],
        )

    split = o.get("split", {})
    groups = manifest.get("groups", {})
    lines += ["", "## Splits", "",
              (f"Shares asked: profile {split.get('profile', 0):.2f}, validation {split.get('validation', 0):.2f}, "
              f"test {split.get('test', 0):.2f}; seed {o.get('seed')}. Records sharing an image (same pixels) or a "
              "question (normalised: case, punctuation, articles and spacing ignored) are one group, and a group "
              "goes to one split: no image and no question is in two splits (`lmms-sgm dataset check` verifies it). "
              f"A question asked about {o.get('template_min')} or more distinct images is a template, not content, and "
              "links nothing. Groups are stratified by category and placed so that each category is split in the "
              "asked shares as far as group sizes allow; a group goes only where it has something to give (labelled "
              "texts to profile, prompts to validation and test)."),
              "",
              (f"{groups.get('count', 0)} groups ({groups.get('singletons', 0)} of one record). "
              f"Dropped: {manifest.get('dropped', {}).get('duplicate_records', 0)} duplicate records, "
              f"{manifest.get('dropped', {}).get('unused_records', 0)} records with nothing for their group's split, "
              f"{manifest.get('dropped', {}).get('bad_images', 0)} records with unreadable images.")]
    if groups.get("largest"):
        lines += ["", "Largest groups:", ""]
        lines += [f"- {g['records']} records in {g['split']} ({', '.join(g['ids'][:3])}, ...), held by {'; '.join(g['shared_keys']) or '-'}"
                  for g in groups["largest"]]
    if groups.get("oversized"):
        lines += ["", "**Groups larger than their category's share of a split** (they skew that category's split):", ""]
        lines += [f"- {g['records']} of {g['stratum_records']} records ({', '.join(g['ids'][:3])}, ...)" for g in groups["oversized"]]
    templates = manifest.get("template_questions", [])
    if templates:
        lines += ["", "Template questions (not used for grouping):", ""]
        lines += [f"- \"{t['question']}\" ({t['images']} images)" for t in templates[:20]]
        if len(templates) > 20:
            lines.append(f"- ... and {len(templates) - 20} more (manifest.json)")

    adv = o.get("adv")
    lines += [
        "",
        "## Adversarial variants",
        "",
        "Each harmful evaluation prompt has an attack in `adv.jsonl` (the `mm_toxic_qa_adv` task uses them as given). "
        "A source's own attack images are used where it has them (MM-SafetyBench: its SD_TYPO image with its "
        '"Rephrased Question"); the others are drawn offline with Pillow\'s bundled font, style '
        + (f"`{adv}`" if adv != "none" else "none (`--adv none`: no adv.jsonl; the task then draws its own)")
        + " (`sd_typo`: the image with the key phrase or question in a panel below, MM-SafetyBench SD+TYPO; "
        "`typo`: the text panel alone; `figstep`: the request as the title of an empty numbered list, FigStep).",
        "",
        "## Intended use",
        "",
        "- Profiling a multimodal model's toxic-expert neurons: `lmms-sgm profile --data profile.jsonl ...`.",
        (
            "- Choosing options on `eval/validation`, and reporting the harmful rate, the typographic-attack harmful "
            "rate and over-refusal on `eval/test` only, with a named judge "
            "(`MM_TOXIC_QA_DIR=eval/test lmms-eval --tasks mm_toxic_qa_all ...`)."
        ),
        "- Safety research under the sources' licences.",
        "",
        "## Out-of-scope use",
        "",
        "- Training or tuning a model to produce harmful content; publishing harmful generations without need.",
        "- Commercial use where a source's licence forbids it (BeaverTails-V: CC BY-NC 4.0).",
        "- Claims about real-world harm rates: the prompts are red-teaming prompts, not a sample of real use.",
        "",
        "## Limitations",
        "",
        (
            "- Labels are the sources' own (BeaverTails-V's annotators' safety flags) or a judge's (model outputs): "
            "they carry their biases; a harmful rate depends on the judge that scores it."
        ),
        "- Categories follow each source's taxonomy; they are not harmonised across sources.",
        (
            "- Leakage is checked by exact pixels and normalised text: a near-identical photo (cropped, re-compressed) "
            "or a paraphrased question is not detected."
        ),
        "",
        "## How it was built",
        "",
        "```bash",
        manifest.get("command")
        or "lmms-sgm dataset build "
        + " ".join(f"--source '{s['spec']}'" for s in sources)
        + f" --seed {o.get('seed')} --adv {adv} --out DIR",
        "```",
        "",
        (
            f"Dataset digest `{manifest.get('digests', {}).get('dataset', '')}`; profiling data digest "
            f"`{manifest.get('digests', {}).get('profile_data')}` (equal to the `data_digest` of glasses profiled on "
            "`profile.jsonl`). Per-file digests and per-source content digests are in `manifest.json`."
        ),
        "",
    ]
    return "\n".join(lines)
