"""Gated steering glasses: a direction and a condition instead of per-neuron constants.

Built from the same kind of profiling data as SGM (docs/steering.md):

* the **steer** vector: the mean output of one decoder layer (the residual stream after it) over
  the answer positions of toxic answers, minus that of non-toxic answers (``profile.jsonl``-like
  answer pairs, ``question+response``, response positions);
* the **gate**: the unit direction from the benign to the harmful class mean of a decoder layer's
  output at the *decision position* (the last prompt token, where the model starts its answer) on
  input-contrast pairs (harmful vs benign contexts), and a threshold on the projection onto it.

Worn, a sequence whose projection at the decision position passes the threshold is *gated on* at
its prefill (the forward pass that sees its prompt), and ``s * c * steer`` is subtracted from the
steered layer's output at its positions (all of them, or from the decision position on) and at
every token it generates; a gated-off sequence is computed exactly as without glasses.

The kind's edits (lmms_sgm/interventions/edits.py): ``begin_forward`` finds each row's decision
position and whether the pass is a prefill; an edit on the gate layer's output reads the gate, one
on the steered layer's output writes the steer. Modes: ``hooks`` and ``nnsight``; ``fold`` is
refused: the gate is decided per sequence at run time, it is not a weight.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from lmms_sgm.expertise import auroc
from lmms_sgm.interventions.base import STEERING_KIND, Glasses
from lmms_sgm.interventions.edits import LAYER_OUTPUT, Edit, Edits
from lmms_sgm.interventions.errors import GlassesError
from lmms_sgm.models import fingerprint
from lmms_sgm.options import SteeringOptions, from_strings, to_dict
from lmms_sgm.sites import Site
from lmms_sgm.version import __version__

STEER = "steer"
GATE = "gate_direction"
# The gate data's projections and labels: not used when applying, kept to report the gate's
# separation at any threshold (inspect, with_options).
PROJECTIONS = "gate_projections"
LABELS = "gate_labels"


@dataclass(repr=False)
class SteeringGlasses(Glasses):
    """Gated-steering glasses (kind ``gated_steering``): a steer vector, a gate direction and threshold.

    ``manifest`` holds the layers (``sites``), the options, the gate's class statistics on its
    profiling data and the decision marker (the token ids of the chat template's generation
    prompt, which locate the decision position in any input).
    """

    kind: ClassVar[str] = STEERING_KIND
    required_fields: ClassVar[tuple[str, ...]] = ("format_version", "kind", "fingerprint", "sites", "steering_options",
                                                  "data", "steer", "gate", "decision_marker", "digest")
    steer: torch.Tensor  # [hidden] float32
    gate_direction: torch.Tensor | None  # [hidden] float32, unit norm; None when built without gate data
    manifest: dict
    gate_projections: torch.Tensor | None = None  # [gate examples] float64
    gate_labels: torch.Tensor | None = None  # [gate examples] uint8, 1 = harmful
    integrity: str | None = field(default=None, compare=False)

    def __repr__(self) -> str:
        o = self.options
        gate = f"gate layer {self.gate_site.layer} AUROC {self.manifest['gate']['auroc']:.3f}" if o.gated else "ungated"
        return (f"SteeringGlasses(layer {self.steer_site.layer}, c={o.c:g}, |steer|={self.manifest['steer']['norm']:.3g}, "
                f"{gate}, from {o.steer_from}, digest={self.digest()[:12]})")

    # ------------------------------------------------------------ what they hold

    @property
    def options(self) -> SteeringOptions:
        return from_strings(SteeringOptions, self.manifest["steering_options"])

    @property
    def steer_site(self) -> Site:
        return Site(**self.manifest["sites"]["steer"])

    @property
    def gate_site(self) -> Site | None:
        site = self.manifest["sites"].get("gate")
        return None if site is None else Site(**site)

    @property
    def threshold(self) -> float | None:
        """The gate threshold on the projection (absolute units), or None without gate data."""
        return self.manifest["gate"].get("threshold")

    @property
    def decision_marker(self) -> list[int]:
        return list(self.manifest["decision_marker"])

    # ------------------------------------------------------------ building

    @classmethod
    def from_profiles(cls, model, options: SteeringOptions, *, steer_site: Site, answers: np.ndarray,
                      answer_labels, gate_site: Site | None, gate: np.ndarray | None, gate_labels, marker: list[int],
                      data: dict) -> SteeringGlasses:
        """Glasses from profiled layer outputs: ``answers`` ``[examples, hidden]`` pooled over the
        answer positions, ``gate`` ``[examples, hidden]`` at the decision position."""
        if options.gated and gate is None:
            raise ValueError("gated steering needs gate data (input-contrast pairs); pass gated=False for the ungated variant")
        y = torch.as_tensor(np.asarray(answer_labels), dtype=torch.bool)
        x = torch.from_numpy(np.asarray(answers, dtype=np.float32)).double()
        steer = (x[y].mean(0) - x[~y].mean(0)).float()
        manifest = {
            "format_version": 3,
            "kind": STEERING_KIND,
            "lmms_sgm_version": __version__,
            "fingerprint": fingerprint(model),
            "sites": {"steer": steer_site.to_dict(), "gate": None if gate_site is None else gate_site.to_dict()},
            "steering_options": to_dict(options),
            "data": data,
            "steer": {"layer": steer_site.layer, "norm": float(steer.double().norm())},
            "decision_marker": [int(t) for t in marker],
        }
        direction = projections = labels = None
        manifest["gate"] = {}
        if gate is not None:
            direction, projections, labels = gate_direction(gate, gate_labels)
            manifest["gate"] = {"layer": gate_site.layer}
        glasses = cls(steer, direction, manifest, projections, labels)
        return glasses.with_options()  # the threshold and the gate's statistics at it

    def with_options(self, **changes) -> SteeringGlasses:
        """The same vectors with other apply-time options (``c``, ``gate_threshold``, ``steer_from``,
        ``gated``); anything that changes what is profiled needs new glasses."""
        fixed = sorted(set(changes) - set(SteeringOptions.APPLY_FIELDS))
        if fixed:
            raise ValueError(f"{', '.join(fixed)} change what is profiled: build new glasses (`lmms-sgm steer`); "
                             f"with_options changes {', '.join(SteeringOptions.APPLY_FIELDS)}")
        options = replace(self.options, **changes)
        if options.gated and self.gate_direction is None:
            raise ValueError("these glasses were built without gate data: only the ungated variant (gated=False) exists")
        manifest = json.loads(json.dumps(self.manifest))
        manifest["steering_options"] = to_dict(options)
        if self.gate_direction is not None:
            manifest["gate"] = {"layer": manifest["gate"]["layer"],
                                **gate_statistics(self.gate_projections, self.gate_labels, options.gate_threshold)}
        return SteeringGlasses(self.steer, self.gate_direction, manifest, self.gate_projections, self.gate_labels)

    # ------------------------------------------------------------ identity and files

    def apply_plan(self) -> dict:
        """Everything applying depends on besides the vectors (in the digest)."""
        o = self.options
        gate = self.gate_site
        return {"layer": self.steer_site.layer, "gated": o.gated, "gate_layer": gate.layer if o.gated else None,
                "threshold": self.threshold if o.gated else None, "c": o.c, "steer_from": o.steer_from,
                "decision_marker": self.decision_marker}

    def digest(self) -> str:
        """sha256 over the fingerprint, the kind, the apply plan and the vectors it uses."""
        h = hashlib.sha256(json.dumps(self.manifest["fingerprint"], sort_keys=True).encode())
        h.update(self.kind.encode())
        h.update(json.dumps(self.apply_plan(), sort_keys=True).encode())
        h.update(self.steer.numpy().tobytes())
        if self.options.gated:
            h.update(self.gate_direction.numpy().tobytes())
        return h.hexdigest()

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {STEER: self.steer.to(torch.float32).contiguous()}
        if self.gate_direction is not None:
            out[GATE] = self.gate_direction.to(torch.float32).contiguous()
            out[PROJECTIONS] = self.gate_projections.to(torch.float64).contiguous()
            out[LABELS] = self.gate_labels.to(torch.uint8).contiguous()
        return out

    @classmethod
    def _from_files(cls, manifest: dict, tensors: dict, tensors_path: Path) -> SteeringGlasses:
        width = manifest["sites"]["steer"]["width"]
        expected = {STEER: (torch.float32, (width,))}
        if manifest["sites"].get("gate") is not None:
            n = manifest["gate"]["examples"]
            expected.update({GATE: (torch.float32, (width,)), PROJECTIONS: (torch.float64, (n,)), LABELS: (torch.uint8, (n,))})
        for name, (dtype, shape) in expected.items():
            t = tensors.get(name)
            if t is None or t.dtype != dtype or tuple(t.shape) != shape:
                got = "missing" if t is None else f"{t.dtype} {tuple(t.shape)}"
                raise GlassesError(f"{tensors_path}: tensor {name} is {got}, expected {dtype} {shape}")
        glasses = cls(tensors[STEER], tensors.get(GATE), manifest, tensors.get(PROJECTIONS), tensors.get(LABELS))
        glasses.options  # noqa: B018 -- the options must parse
        return glasses

    def _verify(self, manifest: dict, tensors_path: Path) -> None:
        super()._verify(manifest, tensors_path)
        if self.gate_direction is not None:
            again = gate_statistics(self.gate_projections, self.gate_labels, self.options.gate_threshold)
            if not _same_statistics(manifest["gate"], again, float(self.gate_projections.abs().max())):
                raise GlassesError(f"{tensors_path}: the gate projections do not give the statistics recorded in "
                                   f"{tensors_path.parent.name}/manifest.json; re-create the glasses")

    # ------------------------------------------------------------ use

    VARIANTS: ClassVar[dict[str, dict]] = {
        "gated-steering": {"modes": ("hooks", "nnsight", "remote"), "refusals": {
            "fold": "the gate is decided per sequence from its own prompt at run time, and a decision is not a weight"}},
        "steering": {"modes": ("hooks", "nnsight", "remote"), "refusals": {
            "fold": "the steer is subtracted from a decoder layer's output, which is no single linear module's weights"}},
    }

    @property
    def label(self) -> str:
        return "gated-steering" if self.options.gated else "steering"

    def edits(self, strength: float, *, device=None, dtype=None) -> Edits:
        """``s * c * steer`` subtracted in gated-on sequences (``strength`` s in [0, 1]); at strength 0
        nothing (the vanilla model)."""
        sites = [site for site in (self.steer_site, self.gate_site) if site is not None]
        if strength == 0:
            return Edits([], check_sites=sites)
        plan = Plan(self, strength, device=device, dtype=dtype)
        edits = []
        if plan.gated and not plan.same_layer:
            edits.append(Edit(self.gate_site, LAYER_OUTPUT, GateEdit(plan)))
        edits.append(Edit(self.steer_site, LAYER_OUTPUT, SteerEdit(plan)))
        return Edits(edits, begin_forward=BeginForward(plan), check_sites=sites)

    def describe(self) -> str:
        o = self.options
        return f"{self.label} at layer {self.steer_site.layer}, c={o.c:g}, digest {self.digest()[:12]}"

    def identity(self) -> dict:
        o = self.options
        data = self.manifest["data"]
        return {"kind": self.kind, "data_digest": data["answers"]["digest"],
                "gate_data_digest": (data.get("gate") or {}).get("digest"), "layer": self.steer_site.layer, "c": o.c, "gated": o.gated,
                "gate_layer": self.gate_site.layer if o.gated else None, "threshold": self.threshold if o.gated else None,
                "steer_from": o.steer_from}

    def summary(self) -> str:
        o = self.options
        m = self.manifest
        lines = [f"integrity: {self.integrity or 'not saved'}", f"kind: {self.kind} (docs/steering.md)",
                 f"fingerprint: {json.dumps(m['fingerprint'], sort_keys=True)}",
                 f"data: {json.dumps(m['data'], sort_keys=True)}",
                 f"steering options: {json.dumps(m['steering_options'], sort_keys=True)}",
                 f"steer: output of decoder layer {self.steer_site.layer} ({self.steer_site.name}), |steer| = "
                 f"{m['steer']['norm']:.4g}, c = {o.c:g}: c * strength * steer subtracted at "
                 + ("every position of a gated-on sequence" if o.steer_from == "prompt"
                    else "the decision position and every later position of a gated-on sequence")
                 + ", generated tokens included"]
        g = m["gate"]
        if g:
            overlap = (f"class ranges do not overlap (margin {g['margin']:.4g})" if g["overlap"] == 0
                       else f"class ranges overlap: {g['overlap']} examples between {g['harmful_min']:.4g} and {g['benign_max']:.4g}")
            lines.append(f"gate{'' if o.gated else ' (profiled, not used: ungated)'}: output of decoder layer "
                         f"{self.gate_site.layer} at the decision position, projected on a unit direction; threshold "
                         f"{g['threshold']:.4g} ({o.gate_threshold:g} of the way from the benign mean {g['benign_mean']:.4g} "
                         f"to the harmful mean {g['harmful_mean']:.4g})")
            lines.append(f"gate on its profiling data ({g['harmful']} harmful, {g['benign']} benign): projection AUROC "
                         f"{g['auroc']:.4f}; {g['misclassified']} on the wrong side of the threshold "
                         f"({g['harmful_below']} harmful below, {g['benign_above']} benign above); {overlap}")
        else:
            lines.append("gate: none (built without gate data; ungated)")
        lines.append(f"decision marker: token ids {self.decision_marker} (the generation prompt; the decision position is "
                     "its last token, or the last token of the input without it)")
        return "\n".join(lines)


# ---------------------------------------------------------------- gate statistics


def gate_direction(x: np.ndarray, labels) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The unit direction from the benign to the harmful class mean of ``x`` ``[examples, hidden]``,
    each example's projection onto it (float64) and the labels (uint8, 1 = harmful)."""
    y = torch.as_tensor(np.asarray(labels), dtype=torch.bool)
    xs = torch.from_numpy(np.asarray(x, dtype=np.float32)).double()
    diff = xs[y].mean(0) - xs[~y].mean(0)
    norm = float(diff.norm())
    if norm == 0:
        raise ValueError("the gate data's two classes have the same mean at the gate layer: no gate direction")
    direction = (diff / norm).float()
    return direction, xs @ direction.double(), y.to(torch.uint8)


def gate_statistics(projections: torch.Tensor, labels: torch.Tensor, gate_threshold: float) -> dict:
    """The threshold ``gate_threshold`` of the way from the benign to the harmful mean projection,
    and how the gate data falls around it: class means and ranges, the projection's AUROC, the
    examples on the wrong side, and the overlap of the class ranges (examples inside it)."""
    p = projections.double()
    y = labels.bool()
    h, b = p[y], p[~y]
    stats = {"examples": len(p), "harmful": len(h), "benign": len(b),
             "harmful_mean": float(h.mean()), "benign_mean": float(b.mean()),
             "harmful_min": float(h.min()), "harmful_max": float(h.max()),
             "benign_min": float(b.min()), "benign_max": float(b.max()),
             "auroc": float(auroc(p.numpy()[:, None], y.int().numpy())[0])}
    threshold = stats["benign_mean"] + gate_threshold * (stats["harmful_mean"] - stats["benign_mean"])
    stats["threshold"] = threshold
    stats["harmful_below"] = int((h <= threshold).sum())
    stats["benign_above"] = int((b > threshold).sum())
    stats["misclassified"] = stats["harmful_below"] + stats["benign_above"]
    stats["margin"] = stats["harmful_min"] - stats["benign_max"]
    stats["overlap"] = 0 if stats["margin"] > 0 else int(((p >= stats["harmful_min"]) & (p <= stats["benign_max"])).sum())
    return stats


# Recomputed on another machine, a float64 mean (and what follows from it) can round otherwise in
# its last bits (the reduction's order follows the CPU's vector width). 1e-9 of the projections'
# scale bounds the worst-case rounding of a float64 mean of up to ~9 million examples (n * 2^-53),
# and is far below any edit that changes what the gate decides.
STATISTICS_TOLERANCE = 1e-9


def _same_statistics(recorded: dict, again: dict, scale: float) -> bool:
    """Counts equal, float statistics within STATISTICS_TOLERANCE of ``scale`` (docs/testing.md)."""
    for k, v in again.items():
        r = recorded.get(k)
        if isinstance(v, int) or not isinstance(r, (int, float)) or isinstance(r, bool):
            if r != v:
                return False
        elif not math.isclose(r, v, rel_tol=0, abs_tol=STATISTICS_TOLERANCE * max(scale, 1.0)):
            return False
    return True


# ---------------------------------------------------------------- the decision position


def generation_marker(processor) -> list[int]:
    """Token ids the chat template appends for the assistant's answer (``add_generation_prompt``):
    the tokens of a prompt with it that a prompt without it lacks."""
    tok = getattr(processor, "tokenizer", processor)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    with_prompt = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    without = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    a = tok(with_prompt, add_special_tokens=False)["input_ids"]
    b = tok(without, add_special_tokens=False)["input_ids"]
    common = 0
    while common < min(len(a), len(b)) and a[common] == b[common]:
        common += 1
    return [int(t) for t in a[common:]]


def decision_positions(input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, marker: list[int],
                       length: int, batch: int, device=None) -> torch.Tensor:
    """Per row, the decision position: the last token of the last occurrence of ``marker`` among
    the non-padding tokens; without one, the last non-padding token.

    In a generated prompt that is its last token; in a prompt + continuation scored in one pass
    (log-likelihood) it is where the continuation starts being predicted, as in generation.
    """
    if attention_mask is None:
        mask = torch.ones(batch, length, dtype=torch.bool, device=device)
    else:
        mask = attention_mask.bool()
    idx = torch.arange(length, device=mask.device).expand(batch, length)
    last = torch.where(mask, idx, -1).amax(1)
    k = len(marker)
    if input_ids is not None and k and length >= k:
        pattern = torch.tensor(marker, device=input_ids.device)
        hit = (input_ids.unfold(1, k, 1) == pattern).all(-1) & mask.unfold(1, k, 1).all(-1)
        ends = torch.where(hit, idx[:, k - 1:], -1).amax(1)
        last = torch.where(ends >= 0, ends, last)
    return last


# ---------------------------------------------------------------- applying


class Plan:
    """What one pair of steering glasses does to one model, ready on its device and dtype."""

    def __init__(self, glasses: SteeringGlasses, strength: float, *, device=None, dtype=None):
        o = glasses.options
        self.gated = o.gated
        self.from_decision = o.steer_from == "decision"
        self.steer_path = glasses.steer_site.module_path
        self.gate_path = glasses.gate_site.module_path if o.gated else None
        self.same_layer = self.gate_path == self.steer_path
        self.marker = glasses.decision_marker
        # Subtracted in the model's dtype; the scale in float64 first, so s * c * steer rounds once.
        self.vector = (glasses.steer.double() * (strength * o.c)).to(device, dtype or torch.float32)
        self.direction = None if glasses.gate_direction is None else glasses.gate_direction.to(device, torch.float32)
        self.threshold = glasses.threshold


def begin_forward(state: dict, plan: Plan, args, kwargs) -> None:
    """At the start of a forward pass of the model: is it a prefill (an empty or no KV cache), and
    where are its rows' decision positions. A later step keeps the gates its prefill decided."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    mask = kwargs.get("attention_mask")
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    shape = ids.shape if ids is not None else embeds.shape[:2]
    batch, length = int(shape[0]), int(shape[1])
    prefill = cache is None or not hasattr(cache, "get_seq_length") or cache.get_seq_length() == 0
    if prefill:
        state.clear()
        state.update(prefill=True, batch=batch, gate=None, decision=decision_positions(
            ids, None if mask is None else mask[:, -length:], plan.marker, length, batch,
            device=(ids if ids is not None else embeds).device))
        if not plan.gated:
            state["gate"] = torch.ones(batch, dtype=torch.bool, device=state["decision"].device)
    else:
        if state.get("gate") is None or state.get("batch") != batch:
            raise RuntimeError(
                "gated steering: a decoding step without the prefill that decides its gates (a cache was passed in, "
                f"or the batch changed from {state.get('batch')} to {batch} rows); start generation from the prompt")
        state["prefill"] = False
    state["armed"] = True


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output, hidden):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def note_gate(state: dict, plan: Plan, output) -> None:
    """At the gate layer of a prefill: gate each row on its projection at its decision position."""
    if not state.get("prefill") or not plan.gated:
        return
    h = _hidden(output)
    rows = torch.arange(h.shape[0], device=h.device)
    at = h[rows, state["decision"].to(h.device)].float()
    state["gate"] = (at @ plan.direction) > plan.threshold


def steer_output(state: dict, plan: Plan, output):
    """The steered layer's output: ``- s * c * steer`` where gated on (bitwise unchanged elsewhere)."""
    gate = state["gate"]
    if not bool(gate.any()):
        return output
    h = _hidden(output)
    on = gate.to(h.device)[:, None].expand(h.shape[0], h.shape[1])
    if state["prefill"] and plan.from_decision:
        pos = torch.arange(h.shape[1], device=h.device)
        on = on & (pos[None, :] >= state["decision"].to(h.device)[:, None])
    return _with_hidden(output, torch.where(on[..., None], h - plan.vector, h))


class BeginForward:
    """The edits' ``begin_forward``: :func:`begin_forward` with the plan."""

    def __init__(self, plan: Plan):
        self.plan = plan

    def __call__(self, state, args, kwargs):
        begin_forward(state, self.plan, args, kwargs)


def _check_armed(state: dict) -> None:
    if not state.get("armed"):
        raise RuntimeError("gated steering: the steered layer ran outside a forward pass of the model the glasses "
                           "were applied to (call that model, not one of its submodules)")


class GateEdit:
    """At the gate layer (when it is not the steered one): note each row's gate; nothing changes."""

    def __init__(self, plan: Plan):
        self.plan = plan

    def __call__(self, h, state):
        _check_armed(state)
        note_gate(state, self.plan, h)
        return None


class SteerEdit:
    """At the steered layer: note the gate there too when it is the same layer, then steer."""

    def __init__(self, plan: Plan):
        self.plan = plan

    def __call__(self, h, state):
        _check_armed(state)
        if self.plan.same_layer:
            note_gate(state, self.plan, h)
        new = steer_output(state, self.plan, h)
        return None if new is h else new
