"""Wearing glasses: scale each expert neuron by its factor on every forward pass (method.md s.6).

Three modes give the same logits (tests hold them to 1e-5 at every generated step):

* ``hooks``: PyTorch forward (pre-)hooks; works with any caller of the HF module.
* ``nnsight``: a persistent nnsight edit over every generation step, the declarative form that
  also runs remotely; generate through ``handle.model`` (an nnsight wrapper).
* ``fold``: factors multiplied into the weight rows (outputs) or columns (intermediate inputs)
  in place, zero overhead; the touched rows are saved and restored exactly on ``remove()``.

Each selected neuron becomes ``f * out`` (towards zero) or ``f * out + (1 - f) * mu`` (towards
its non-toxic mean mu), with ``f = 1 - s + s * alpha``.

A model wears one pair of glasses at a time.
"""
from __future__ import annotations

import warnings
import weakref

import torch

from lmms_sgm.archs import get_module
from lmms_sgm.models import unwrap
from lmms_sgm.options import ApplyOptions

_WEARING: "weakref.WeakKeyDictionary[torch.nn.Module, GlassesHandle]" = weakref.WeakKeyDictionary()


class GlassesHandle:
    """An applied pair of glasses. ``with glasses.apply(model): ...`` or ``handle.remove()``."""

    def __init__(self, glasses, hf_model, options: ApplyOptions, model, undo):
        self.glasses = glasses
        self.options = options
        self.model = model  # what to call: the HF model, or the nnsight wrapper in nnsight mode
        self._hf = hf_model
        self._undo = undo
        self.active = True

    def remove(self) -> None:
        if self.active:
            for fn in reversed(self._undo):
                fn()
            self._undo = []
            self.active = False
            _WEARING.pop(self._hf, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def __repr__(self):
        state = "active" if self.active else "removed"
        return f"<GlassesHandle mode={self.options.mode} strength={self.options.strength} {state}>"


def site_module(hf, site) -> torch.nn.Module:
    """The module of ``hf`` a glasses site names; a path that leads nowhere (or not to a module) is
    refused in one line naming it and the model. The fingerprint check cannot catch it: a manifest
    edited with its digests recomputed may name any path."""
    from lmms_sgm.glasses import GlassesMismatch

    try:
        module = get_module(hf, site.module_path)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        module = None
    if not isinstance(module, torch.nn.Module):
        model = getattr(getattr(hf, "config", None), "_name_or_path", "") or "?"
        raise GlassesMismatch(f"the glasses name module_path {site.module_path!r} (site {site.name!r}), which is not a "
                              f"module of the model ({type(hf).__name__} {model}); the manifest was edited or belongs "
                              "to another model: re-create the glasses")
    return module


def apply(glasses, model, options: ApplyOptions, *, processor=None, remote=None) -> GlassesHandle:
    if remote is not None:  # a RemoteOptions, or its `remote` value ("ndif", a URL, "local", "off")
        from lmms_sgm.options import RemoteOptions

        remote = remote if isinstance(remote, RemoteOptions) else RemoteOptions(remote=remote)
        if remote.is_remote:  # nothing changes here: each remote trace applies the glasses itself
            from lmms_sgm.remote import wear

            return wear(glasses, model, options, remote, processor=processor)
    hf = unwrap(model)
    glasses.check(hf)
    if hf in _WEARING and _WEARING[hf].active:
        raise RuntimeError("this model already wears glasses; remove() them before applying others")
    transforms = glasses.transforms(options.strength)
    sites = [s for s in glasses.sites if s.name in transforms]
    for s in sites:
        width = _width(site_module(hf, s), s.kind)
        if width != s.width:
            raise ValueError(f"{s.module_path} has {width} units but the glasses hold {s.width}")
    param = next(hf.parameters())
    transforms = {k: (f.to(param.device), None if b is None else b.to(param.device)) for k, (f, b) in transforms.items()}
    gates = {k: (v.to(param.device), c, t) for k, (v, c, t) in (getattr(glasses, "gate", None) or {}).items()}
    if gates and options.mode == "fold":
        raise ValueError("fold cannot express a gate: a weight change acts on every position alike, and these glasses act "
                         "only where their evidence crosses a threshold; use mode=hooks or mode=nnsight")
    if options.mode == "hooks":
        handle = GlassesHandle(glasses, hf, options, model, _hooks(hf, sites, transforms, gates))
    elif options.mode == "fold":
        handle = GlassesHandle(glasses, hf, options, model, _fold(hf, sites, transforms))
    else:
        nn_model = as_generator(model, processor)
        # No site to change (strength 0, no experts): no edit, since an open step loop with an
        # empty body never ends (nnsight 0.8.1) and generation would hang.
        undo = _nnsight_edit(nn_model, sites, transforms, gates) if sites else []
        handle = GlassesHandle(glasses, hf, options, nn_model, undo)
    _WEARING[hf] = handle
    return handle


def _width(linear, kind: str) -> int:
    return linear.out_features if kind == "output" else linear.in_features


def affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
    """``x * scale (+ shift)``: the one formula every mode applies (shift: towards a mean)."""
    out = x * scale.to(x.dtype)
    return out if shift is None else out + shift.to(x.dtype)


def transform(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None, gate=None) -> torch.Tensor:
    """:func:`affine`, or with a gate ``(v, c, t)`` only at the positions whose evidence exceeds t
    (lmms_sgm/gate.py); elsewhere ``x`` unchanged."""
    if gate is None:
        return affine(x, scale, shift)
    from lmms_sgm.gate import gated

    return gated(x, affine(x, scale, shift), *gate)


def _hooks(hf, sites, transforms, gates=None) -> list:
    handles = []
    gates = gates or {}
    for s in sites:
        module = get_module(hf, s.module_path)
        f, b = transforms[s.name]
        g = gates.get(s.name)
        if s.kind == "output":
            handles.append(module.register_forward_hook(lambda m, args, out, f=f, b=b, g=g: transform(out, f, b, g)))
        else:
            handles.append(module.register_forward_pre_hook(
                lambda m, args, f=f, b=b, g=g: (transform(args[0], f, b, g), *args[1:])))
    return [h.remove for h in handles]


@torch.no_grad()
def _fold(hf, sites, transforms) -> list:
    """Output unit j is row j of the weight (and bias j); input unit j is column j, and a shift
    of input j moves the output by column j times the shift. A bias is added when a shift needs
    one (Llama's MLP has none) and removed again on undo."""
    undo = []
    for s in sites:
        linear = get_module(hf, s.module_path)
        f, b = transforms[s.name]
        idx = (f != 1).nonzero().flatten()
        w = linear.weight
        saved = {"bias": None if linear.bias is None else linear.bias.detach().clone(), "created": False}
        if b is not None and linear.bias is None:
            linear.bias = torch.nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), requires_grad=False)
            saved["created"] = True
        scale = f[idx].to(w.dtype)
        if s.kind == "output":
            saved["weight"] = w[idx].clone()
            w[idx] *= scale[:, None]
            if linear.bias is not None:
                linear.bias[idx] *= scale
                if b is not None:
                    linear.bias[idx] += b[idx].to(w.dtype)
        else:
            saved["weight"] = w[:, idx].clone()
            if b is not None:
                linear.bias += saved["weight"] @ b[idx].to(w.dtype)
            w[:, idx] *= scale[None, :]
        undo.append(lambda linear=linear, idx=idx, saved=saved, kind=s.kind: _restore(linear, idx, saved, kind))
    return undo


@torch.no_grad()
def _restore(linear, idx, saved, kind) -> None:
    if kind == "output":
        linear.weight[idx] = saved["weight"]
    else:
        linear.weight[:, idx] = saved["weight"]
    if saved["created"]:
        linear.bias = None
    elif saved["bias"] is not None:
        linear.bias.copy_(saved["bias"])


def as_generator(model, processor=None):
    """An nnsight ``TransformersModel`` around ``model`` (kept if it already is one); for a
    text-only model, ``processor`` is its tokenizer."""
    from nnsight.intervention.envoy import Envoy
    from nnsight.modeling.transformers import TransformersModel

    from lmms_sgm.models import is_text_only

    if isinstance(model, Envoy):
        return model
    if processor is None:
        raise ValueError("mode='nnsight' on a plain HF model needs its processor (a text-only model: its tokenizer): "
                         "apply(model, mode='nnsight', processor=processor)")
    if is_text_only(model):
        return TransformersModel(model, tokenizer=processor)
    return TransformersModel(model, task="image-text-to-text", processor=processor, tokenizer=processor.tokenizer)


def _nnsight_edit(nn_model, sites, transforms, gates=None) -> list:
    # The step loop is open-ended on purpose (generation length is unknown), and nnsight warns
    # on every call that the step after the last was "never reached". That is expected here.
    warnings.filterwarnings("ignore", message=r".*was never reached.*", category=UserWarning)
    before = list(getattr(nn_model, "_edits", []))
    with nn_model.edit(inplace=True) as tracer:
        for _ in tracer.iter[:]:  # every step: the prompt pass and each generated token
            for s in sites:
                envoy = get_module(nn_model, s.module_path)
                f, b = transforms[s.name]
                g = (gates or {}).get(s.name)
                if s.kind == "output":
                    envoy.output = transform(envoy.output, f, b, g)
                else:
                    envoy.input = transform(envoy.input, f, b, g)

    def undo():
        # Keep edits the caller made before ours; clear_edits() alone would drop them too.
        nn_model.clear_edits()
        if before:
            nn_model._edits = before

    return [undo]
