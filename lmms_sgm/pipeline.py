"""One call from a model and labelled pairs to saved glasses (what `lmms-sgm profile` and `lmms-sgm steer` run)."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from lmms_sgm.data import load_pairs
from lmms_sgm.expertise import expertise, nontoxic_mean
from lmms_sgm.interventions.base import staged_output
from lmms_sgm.interventions.sgm import SafetyGlasses
from lmms_sgm.interventions.steering import SteeringGlasses, decision_positions, generation_marker
from lmms_sgm.models import unwrap
from lmms_sgm.options import ExecutionOptions, ProfileOptions, SelectionOptions, SteeringOptions
from lmms_sgm.profiling import profile
from lmms_sgm.sites import layer_output_site


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


def build_steering_glasses(
    model,
    processor,
    data,
    gate_data=None,
    options: SteeringOptions = SteeringOptions(),
    *,
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> SteeringGlasses:
    """Gated-steering glasses (what `lmms-sgm steer` runs; docs/steering.md).

    ``data``: answer pairs (toxic vs non-toxic answers) for the steer vector; ``gate_data``:
    input-contrast pairs (harmful vs benign contexts, label 1 = harmful) for the gate, needed
    unless ``options.gated`` is false. Both go through the profiling loop at decoder-layer
    outputs. Saved to ``out`` as ``build_glasses`` saves (checked first, written whole or not at all).
    """
    pairs = load_pairs(data)
    pairs.require_both_classes()
    pairs.require_text_field(options.text_field)
    gate_pairs = None
    if gate_data is not None:
        gate_pairs = load_pairs(gate_data)
        gate_pairs.require_both_classes()
        gate_pairs.require_text_field("question+response")
    elif options.gated:
        raise ValueError("gated steering needs gate data (input-contrast pairs: gate_data / --gate-data); "
                         "or options.gated=False for the ungated variant")
    hf = unwrap(model)
    steer_site = layer_output_site(hf, options.layer)
    gate_site = None
    if gate_pairs is not None:
        gate_site = layer_output_site(hf, steer_site.layer if options.gate_layer is None else options.gate_layer)
        if gate_site.layer > steer_site.layer:
            raise ValueError(f"gate_layer {gate_site.layer} comes after the steered layer {steer_site.layer}: the gate "
                             "must be decided before the steer is written (choose gate_layer <= layer)")
    marker = generation_marker(processor)
    sources = [Path(p.source) for p in (pairs, gate_pairs) if p is not None and Path(p.source).exists()]
    staged = staged_output(out, overwrite=overwrite, protect=sources) if out is not None else contextlib.nullcontext()
    with staged as tmp:
        answers = _profiled(model, processor, pairs, options.answer_profile(), steer_site, progress)
        gate = None
        if gate_pairs is not None:
            gate_options = options.gate_profile()
            gate = _profiled(model, processor, gate_pairs, gate_options, gate_site, progress)
            _check_marker(processor, gate_pairs, marker)
        data_info = {"answers": {"digest": pairs.digest(), **pairs.counts()},
                     "gate": None if gate_pairs is None else {"digest": gate_pairs.digest(), **gate_pairs.counts()}}
        glasses = SteeringGlasses.from_profiles(
            model, options, steer_site=steer_site, answers=answers, answer_labels=pairs.labels, gate_site=gate_site,
            gate=gate, gate_labels=None if gate_pairs is None else gate_pairs.labels, marker=marker, data=data_info)
        if tmp is not None:
            glasses.write_files(tmp)
    return glasses


def _profiled(model, processor, pairs, profile_options: ProfileOptions, site, progress: bool):
    """``[examples, hidden]`` pooled outputs of one decoder layer (one run of the profiling loop)."""
    _, store = profile(model, processor, pairs, profile_options, progress=progress, sites=[site])
    try:
        return store[site.name].copy()
    finally:
        store.close()


def _check_marker(processor, pairs, marker) -> None:
    """The decision position found at inference (the marker) is where the gate was profiled
    (the end of the generation prompt), on every gate pair: otherwise the gate reads elsewhere."""
    from lmms_sgm.data import encode_batch
    from lmms_sgm.profiling import prompt_lengths

    for start in range(0, len(pairs), 64):
        batch = [pairs[i] for i in range(start, min(start + 64, len(pairs)))]
        enc = encode_batch(processor, batch, "question+response")
        first = enc["attention_mask"].int().argmax(1)
        want = first + prompt_lengths(processor, batch, enc) - 1
        got = decision_positions(enc["input_ids"], enc["attention_mask"], marker, enc["input_ids"].shape[1], len(batch))
        if not torch.equal(got, want):
            raise ValueError(f"the chat template's generation prompt (token ids {marker}) does not locate the decision "
                             "position of the gate pairs; gated steering needs a chat template with a generation prompt")
