"""One call from a model and labelled pairs to saved glasses (what `lmms-sgm profile` runs)."""
from __future__ import annotations

import contextlib
from pathlib import Path

from lmms_sgm.data import load_pairs
from lmms_sgm.expertise import expertise, nontoxic_mean
from lmms_sgm.glasses import SafetyGlasses, staged_output
from lmms_sgm.options import ExecutionOptions, ProfileOptions, SelectionOptions
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
    execution: ExecutionOptions = ExecutionOptions(),
    group=None,
) -> SafetyGlasses | None:
    """Profile ``model`` on ``data`` (a path, a list of dicts or a datasets.Dataset) and select experts.

    Saved to ``out`` when given, through a temporary sibling directory created before profiling
    starts: the output is checked before any model work, and a failure or Ctrl-C at any point
    leaves ``out`` as it was. ``overwrite`` replaces glasses only (see ``SafetyGlasses.save``).

    ``execution`` says where the traces run (``remote``) and where progress is checkpointed:
    by default beside ``out`` (``.NAME.ckpt``), deleted once the glasses are written; with
    ``resume=True`` a run continues from it. Under several processes (``group``, from
    :func:`lmms_sgm.distributed.from_env`) every process calls this; process 0 computes, writes
    and returns the glasses, the others return None.
    """
    from lmms_sgm.checkpoint import Checkpoint, default_dir
    from lmms_sgm.distributed import Group

    group = group or Group()
    pairs = load_pairs(data)
    pairs.require_both_classes()
    checkpoint = None
    if execution.checkpoint_dir != "off" and (out is not None or execution.checkpoint_dir != "auto"):
        where = default_dir(out) if execution.checkpoint_dir == "auto" else Path(execution.checkpoint_dir)
        checkpoint = Checkpoint(where, resume=execution.resume)
    elif execution.resume:
        raise ValueError("resume needs a checkpoint: give out= (it is kept beside it) or checkpoint_dir=DIR")
    protect = [pairs.source] if Path(pairs.source).exists() else []
    writing = out is not None and group.is_main
    staged = staged_output(out, overwrite=overwrite, protect=protect) if writing else contextlib.nullcontext()
    with staged as tmp:
        try:
            sites, store = profile(model, processor, pairs, profile_options, progress=progress, execution=execution,
                                   checkpoint=checkpoint, group=group)
        except BaseException as e:
            if checkpoint is not None and group.is_main:
                done = checkpoint.batches_done()
                if done == 0:
                    checkpoint.remove()  # nothing to resume from: leave no trace
                elif isinstance(e, KeyboardInterrupt):  # the CLI prints this note after "interrupted"
                    e.add_note(f"{done} finished batch(es) kept in {checkpoint.directory}: the same command with "
                               f"--resume continues from there")
            raise
        if store is None:  # not process 0: its share is with process 0
            return None
        try:
            aurocs = expertise(store, sites, pairs.labels, progress=progress)
            means = nontoxic_mean(store, sites, pairs.labels)
            glasses = SafetyGlasses.from_expertise(
                sites, aurocs, selection, model=model, profile_options=profile_options,
                data_digest=pairs.digest(), data_counts=pairs.counts(), mean_nontoxic=means,
                store=store, labels=pairs.labels,
            )
        finally:
            store.close()
        if tmp is not None:
            glasses.write_files(tmp)
    if checkpoint is not None:  # the glasses are in place (or, without out, returned): progress is no longer needed
        checkpoint.remove()
    return glasses
