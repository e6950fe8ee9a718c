"""One call from a model and labelled pairs to saved glasses (what `lmms-sgm profile` runs)."""
from __future__ import annotations

from pathlib import Path

from lmms_sgm.data import load_pairs
from lmms_sgm.expertise import expertise, nontoxic_mean
from lmms_sgm.glasses import SafetyGlasses, refuse_existing
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

    Saved atomically to ``out`` when given; every input is validated before any model work.
    """
    pairs = load_pairs(data)
    pairs.require_both_classes()
    if out is not None:
        refuse_existing(out, overwrite)  # before the (long) profiling, not only at save
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
    if out is not None:
        glasses.save(out, overwrite=overwrite)
    return glasses
