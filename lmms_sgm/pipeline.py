"""One call from a model and labelled pairs to saved glasses (what `lmms-sgm profile` runs)."""
from __future__ import annotations

import contextlib
from pathlib import Path

from lmms_sgm.data import load_pairs
from lmms_sgm.expertise import expertise, nontoxic_mean
from lmms_sgm.glasses import SafetyGlasses, staged_output
from lmms_sgm.options import ProfileOptions, SelectionOptions
from lmms_sgm.profiling import profile


def build_glasses(
    model,
    processor,
    data,
    profile_options: ProfileOptions = ProfileOptions(),
    selection: SelectionOptions = SelectionOptions(),
    *,
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> SafetyGlasses:
    """Profile ``model`` on ``data`` (a path, a list of dicts or a datasets.Dataset) and select experts.

    Saved to ``out`` when given, through a temporary sibling directory created before profiling
    starts: the output is checked before any model work, and a failure or Ctrl-C at any point
    leaves ``out`` as it was. ``overwrite`` replaces glasses only (see ``SafetyGlasses.save``).
    """
    pairs = load_pairs(data)
    pairs.require_both_classes()
    protect = [pairs.source] if Path(pairs.source).exists() else []
    staged = staged_output(out, overwrite=overwrite, protect=protect) if out is not None else contextlib.nullcontext()
    with staged as tmp:
        sites, store = profile(model, processor, pairs, profile_options, progress=progress)
        try:
            aurocs = expertise(store, sites, pairs.labels, progress=progress)
            means = nontoxic_mean(store, sites, pairs.labels)
        finally:
            store.close()
        glasses = SafetyGlasses.from_expertise(
            sites, aurocs, selection, model=model, profile_options=profile_options,
            data_digest=pairs.digest(), data_counts=pairs.counts(), mean_nontoxic=means,
        )
        if tmp is not None:
            glasses.write_files(tmp)
    return glasses
