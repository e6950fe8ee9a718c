"""Wearing glasses: ONE function installs any kind's edits (lmms_sgm/interventions/edits.py).

Modes (a kind declares which it supports, :attr:`Glasses.modes`; :func:`wear` refuses the others
in one place, :func:`refusal`):

* ``hooks``: PyTorch forward (pre-)hooks; works with any caller of the HF module.
* ``nnsight``: a persistent nnsight edit over every generation step, the declarative form;
  generate through ``handle.model`` (an nnsight wrapper).
* ``fold``: affine edits multiplied into the weight rows (outputs) or columns (intermediate
  inputs) in place, zero overhead; the touched rows are saved and restored exactly on ``remove()``.
* ``remote`` (``remote=`` "ndif", a URL or "local", with mode ``nnsight``): the edits applied
  inside each remote trace (lmms_sgm/remote.py), since a persistent edit does not travel.

The first three give the same logits (tests hold them to 1e-5 at every generated step). A model
wears one pair of glasses at a time.
"""
from __future__ import annotations

import warnings
import weakref

import torch

from lmms_sgm.archs import get_module
from lmms_sgm.interventions.edits import INPUT, LAYER_OUTPUT, OUTPUT, affine, hidden, transform, with_hidden  # noqa: F401
from lmms_sgm.interventions.errors import GlassesMismatch
from lmms_sgm.models import unwrap
from lmms_sgm.options import ApplyOptions

MODES = ("hooks", "nnsight", "fold", "remote")
_WEARING: weakref.WeakKeyDictionary[torch.nn.Module, GlassesHandle] = weakref.WeakKeyDictionary()


class GlassesHandle:
    """An applied pair of glasses. ``with glasses.apply(model): ...`` or ``handle.remove()``."""

    def __init__(self, glasses, hf_model, options: ApplyOptions, model, undo):
        self.glasses = glasses
        self.options = options
        self.model = model  # what to call: the HF model, or the nnsight wrapper in nnsight mode
        self._hf = hf_model
        self._undo = undo
        self.active = True
        self.state: dict = {}  # the per-forward state of the edits (hooks mode: e.g. a steering gate's decisions)

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


def refusal(glasses, mode: str) -> str | None:
    """THE refusal of a mode: None when ``glasses`` declare ``mode``, else the one line saying why."""
    if mode not in MODES:
        return f"mode={mode!r} is not a way to wear glasses: one of {', '.join(MODES)}"
    if mode in glasses.modes:
        return None
    return (f"mode={mode!r} cannot wear {glasses.label} glasses: {glasses.refusal(mode)}; use "
            + " or ".join(f"mode={m!r}" for m in glasses.modes if m != "remote")
            + ("" if "remote" in glasses.modes else " on a local model"))


def wear(model, glasses, mode: str = "hooks", strength: float = 1.0, *, processor=None, remote=None):
    """Put ``glasses`` on ``model``: a handle (also a context manager) with ``.remove()``.

    Checks the fingerprint, refuses a mode the glasses do not declare, refuses a second pair on
    one model, asks the kind for its edits at ``strength`` and installs them in ``mode``.
    ``remote`` ("ndif", a server URL, "local", or a :class:`RemoteOptions`; with mode nnsight)
    returns a :class:`lmms_sgm.remote.RemoteGlasses` whose traces run on the server, the edits
    applied inside each.
    """
    options = ApplyOptions(strength=strength, mode=mode)
    if remote is not None:  # a RemoteOptions, or its `remote` value ("ndif", a URL, "local", "off")
        from lmms_sgm.options import RemoteOptions

        remote = remote if isinstance(remote, RemoteOptions) else RemoteOptions(remote=remote)
        if remote.is_remote:  # nothing changes here: each remote trace applies the edits itself
            why = refusal(glasses, "remote")
            if why:
                raise ValueError(why.replace("mode='remote'", f"remote={remote.remote}"))
            from lmms_sgm import remote as remote_module

            return remote_module.wear(glasses, model, options, remote, processor=processor)
    why = refusal(glasses, mode)
    if why:
        raise ValueError(why)
    hf = unwrap(model)
    glasses.check(hf)
    if hf in _WEARING and _WEARING[hf].active:
        raise RuntimeError("this model already wears glasses; remove() them before applying others")
    param = next(hf.parameters())
    edits = glasses.edits(strength, device=param.device, dtype=param.dtype)
    for e in edits.edits:
        module = site_module(hf, e.site)
        if e.width is not None and e.where != LAYER_OUTPUT:
            width = _width(module, e.where)
            if width != e.width:
                raise ValueError(f"{e.path} has {width} units but the glasses hold {e.width}")
    for site in edits.check_sites:
        site_module(hf, site)  # the layers exist (the fingerprint says so; this names a bad path)
    state: dict = {}
    if mode == "hooks":
        handle = GlassesHandle(glasses, hf, options, model, _hooks(hf, edits, state))
    elif mode == "fold":
        if not edits.foldable:  # a kind that declares fold returns affine edits only
            raise ValueError(f"mode='fold' cannot wear {glasses.label} glasses: an edit is not a per-unit affine")
        handle = GlassesHandle(glasses, hf, options, model, _fold(hf, edits))
    else:
        nn_model = as_generator(model, processor)
        # Nothing to change (strength 0, no experts): no edit, since an open step loop with an
        # empty body never ends (nnsight 0.8.1) and generation would hang.
        undo = _nnsight_edit(nn_model, edits) if edits.edits else []
        handle = GlassesHandle(glasses, hf, options, nn_model, undo)
    handle.state = state
    _WEARING[hf] = handle
    return handle


def _width(linear, kind: str) -> int:
    return linear.out_features if kind == "output" else linear.in_features


def _hooks(hf, edits, state: dict) -> list:
    handles = []
    if edits.begin_forward is not None:
        begin = edits.begin_forward

        def pre(module, args, kwargs):
            begin(state, args, kwargs)

        def post(module, args, kwargs, output):
            state["armed"] = False

        handles += [hf.register_forward_pre_hook(pre, with_kwargs=True),
                    hf.register_forward_hook(post, with_kwargs=True, always_call=True)]
    for e in edits.edits:
        module = get_module(hf, e.path)
        if e.where == INPUT:
            handles.append(module.register_forward_pre_hook(lambda m, args, fn=e.fn: _pre(fn, args, state)))
        elif e.where == OUTPUT:
            handles.append(module.register_forward_hook(lambda m, args, out, fn=e.fn: fn(out, state)))
        else:
            handles.append(module.register_forward_hook(lambda m, args, out, fn=e.fn: _layer(fn, out, state)))
    return [h.remove for h in handles]


def _pre(fn, args, state):
    new = fn(args[0], state)
    return None if new is None else (new, *args[1:])


def _layer(fn, output, state):
    new = fn(hidden(output), state)
    return None if new is None else with_hidden(output, new)


@torch.no_grad()
def _fold(hf, edits) -> list:
    """Output unit j is row j of the weight (and bias j); input unit j is column j, and a shift
    of input j moves the output by column j times the shift. A bias is added when a shift needs
    one (Llama's MLP has none) and removed again on undo."""
    undo = []
    for e in edits.edits:
        linear = get_module(hf, e.path)
        f, b = e.affine
        idx = (f != 1).nonzero().flatten()
        w = linear.weight
        saved = {"bias": None if linear.bias is None else linear.bias.detach().clone(), "created": False}
        if b is not None and linear.bias is None:
            linear.bias = torch.nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), requires_grad=False)
            saved["created"] = True
        scale = f[idx].to(w.dtype)
        if e.where == OUTPUT:
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
        undo.append(lambda linear=linear, idx=idx, saved=saved, kind=e.where: _restore(linear, idx, saved, kind))
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


def _nnsight_edit(nn_model, edits) -> list:
    # The step loop is open-ended on purpose (generation length is unknown), and nnsight warns
    # on every call that the step after the last was "never reached". That is expected here.
    warnings.filterwarnings("ignore", message=r".*was never reached.*", category=UserWarning)
    before = list(getattr(nn_model, "_edits", []))
    begin = edits.begin_forward
    with nn_model.edit(inplace=True) as tracer:
        state = {}
        for _ in tracer.iter[:]:  # every step: the prompt pass and each generated token
            if begin is not None:
                args, kwargs = nn_model.inputs
                begin(state, args, kwargs)
            for e in edits.edits:  # in forward order, as nnsight requires
                envoy = get_module(nn_model, e.path)
                if e.where == INPUT:
                    new = e.fn(envoy.input, state)
                    if new is not None:
                        envoy.input = new
                elif e.where == OUTPUT:
                    new = e.fn(envoy.output, state)
                    if new is not None:
                        envoy.output = new
                else:
                    out = envoy.output
                    new = e.fn(hidden(out), state)
                    if new is not None:
                        envoy.output = with_hidden(out, new)

    def undo():
        # Keep edits the caller made before ours; clear_edits() alone would drop them too.
        nn_model.clear_edits()
        if before:
            nn_model._edits = before

    return [undo]


# ---------------------------------------------------------------- the table of kinds x modes


def mode_table() -> str:
    """The Markdown table of every installed kind's variants x every mode: "yes", or the reason
    wear() gives when it refuses (docs/interventions.md holds it; a test checks it is current)."""
    from lmms_sgm.interventions.registry import kinds

    lines = ["| glasses (kind) | " + " | ".join(MODES) + " |", "|---|" + "---|" * len(MODES)]
    for kind, cls in sorted(kinds().items()):
        for label, declared in cls.VARIANTS.items():
            cells = ["yes" if m in declared["modes"] else
                     "no: " + declared.get("refusals", {}).get(m, f"{label} glasses declare the modes "
                                                                  f"{', '.join(declared['modes'])} only")
                     for m in MODES]
            lines.append(f"| {label} (`{kind}`) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m lmms_sgm.interventions.wearing --table
    import sys

    if sys.argv[1:] != ["--table"]:
        sys.exit("usage: python -m lmms_sgm.interventions.wearing --table")
    print(mode_table())
