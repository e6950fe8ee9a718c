"""Remote execution on NDIF: the same nnsight traces, run by a server that holds the model.

Profiling and the ``nnsight`` apply mode are written as nnsight traces so that they can travel.
This module is the thin layer that sends them: profiling's one trace per batch gets
``remote=...`` (lmms_sgm/profiling.py); wearing glasses remotely applies them *inside* each
generate or forward trace, on every step, since a persistent ``edit`` does not survive being
serialised in nnsight 0.8.1 (:class:`RemoteGlasses`).

Where the traces go (``RemoteOptions.remote``):

* ``ndif``: the server nnsight is configured with (``NDIF_HOST`` or ``API.HOST`` in
  ``~/.config/nnsight/config.yaml``), with its API key (``NDIF_API_KEY`` or ``API.APIKEY``);
* ``http(s)://HOST:PORT``: that server, same key;
* ``local``: nnsight's in-process emulation: the trace is serialised and deserialised (with
  the non-installed modules hidden, as on a server) and run on a model loaded here.

For ``ndif`` and a URL the model is named by its Hub id (``llava-hf/llava-1.5-7b-hf``), as NDIF
deploys models: only its config and processor are read here (from the Hub, or offline from the
local Hugging Face cache) to build it on the meta device and to encode inputs; the weights stay
on the server. A local directory cannot be sent and is refused.

What travels: the encoded inputs, the trace's code (lmms_sgm's functions by value, since the
server does not have this package), the edits of the worn glasses (their functions and constants:
SGM's factors, a steering vector and gate); what comes back: only what
the trace saved (pooled responses, generated ids, per-token log-probabilities), so the response
store and the AUROC stay here. Profiling batches are cut so that a request and a result stay under
``remote_max_mb``. A transport failure (unreachable, timeout, HTTP 5xx) is retried
``remote_retries`` times; a refused key or a job that failed on the server is not.

The API key is read by nnsight from its configuration and sent in a header; this module never
prints, logs or stores it; it registers it with :mod:`lmms_sgm.redaction` when it reads it, and
removes it (with every other known secret) from any error message it passes on.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from pathlib import Path

import torch

from lmms_sgm.interventions.edits import INPUT, OUTPUT, hidden, with_hidden
from lmms_sgm.options import ApplyOptions, RemoteOptions, remote_mode_refusal
from lmms_sgm.redaction import redact, register_secret

TASK = "image-text-to-text"
# What nnsight reads the host and key from, named in messages (never the key's value).
KEY_SOURCES = "NDIF_API_KEY (or API.APIKEY in ~/.config/nnsight/config.yaml)"
HOST_SOURCES = "NDIF_HOST (or API.HOST in ~/.config/nnsight/config.yaml)"


class RemoteError(ConnectionError):
    """A remote trace that could not run; the message says why (and never holds the API key)."""


class RemoteAuthError(RemoteError):
    """The server refused the API key (or none was configured)."""


class RemoteJobError(RemoteError):
    """The server accepted the trace and it failed there."""


# ---------------------------------------------------------------- configuration


def api_key() -> str:
    """The configured key, registered as a secret as it is read: from then on
    :func:`lmms_sgm.redaction.redact` removes it from anything written or shown (it may come
    from nnsight's config file, whose name no environment scan would catch)."""
    from nnsight.schema.config import CONFIG

    key = CONFIG.API.APIKEY or ""
    register_secret(key)
    return key


def host(options: RemoteOptions) -> str:
    """The server a trace goes to ("in-process emulation" for ``local``)."""
    from nnsight.schema.config import CONFIG

    if options.remote == "local":
        return "in-process emulation"
    return CONFIG.API.HOST if options.remote == "ndif" else options.remote


def trace_target(options: RemoteOptions):
    """What nnsight's ``remote=`` takes: True (the configured host), a URL, or "local"."""
    return True if options.remote == "ndif" else options.remote


# ---------------------------------------------------------------- the model


def load(pretrained: str, options: RemoteOptions, *, device: str = "cpu", dtype: str = "auto"):
    """``(nn_model, processor)``: an nnsight ``TransformersModel`` whose traces run where
    ``options.remote`` says.

    ``local`` loads the model here (any local directory or Hub id, as :func:`models.load`);
    ``ndif`` and a URL need a Hub id and build the model on the meta device from its config.
    """
    from nnsight.modeling.transformers import TransformersModel

    from lmms_sgm import models
    from lmms_sgm.archs import adapter_for
    from lmms_sgm.bundled import DEMO_MODEL

    if options.remote == "local":
        hf, processor = models.load(pretrained, device=device, dtype=dtype)
        return wrap(hf, processor), processor
    _, local = models._locate(pretrained) if pretrained != DEMO_MODEL else (pretrained, True)
    if local:
        raise ValueError(
            f"remote execution names the model by its Hub id, and the server loads its own copy; {pretrained} is a "
            "local directory: give the Hub id it was downloaded from (e.g. llava-hf/llava-1.5-7b-hf), or remote=local "
            "to run the remote code path on a model loaded here"
        )
    if device not in ("cpu", "auto") or dtype != "auto":
        warnings.warn(f"device={device} and dtype={dtype} do not apply to a remote model: the server runs its own deployment",
                      stacklevel=2)
    processor = _processor(pretrained)
    nn_model = TransformersModel(pretrained, task=TASK, processor=processor, tokenizer=processor.tokenizer)
    adapter_for(nn_model._module)  # an unsupported architecture fails here, before anything is sent
    return nn_model, processor


def wrap(hf_model, processor):
    """An nnsight ``TransformersModel`` around a loaded model (kept if it already is one)."""
    from nnsight.intervention.envoy import Envoy
    from nnsight.modeling.transformers import TransformersModel

    if isinstance(hf_model, Envoy):
        if not hasattr(hf_model, "to_model_key"):
            raise ValueError("remote execution needs an nnsight TransformersModel (a plain NNsight wrapper has no "
                             "remote identity): pass the Hugging Face model itself, with its processor")
        return hf_model
    if processor is None:
        raise ValueError("remote execution of a Hugging Face model needs its processor: pass processor=...")
    return TransformersModel(hf_model, task=TASK, processor=processor, tokenizer=processor.tokenizer)


def _processor(repo_id: str):
    """The processor of a Hub model, from the Hub or, when it cannot be reached, its local cache."""
    import huggingface_hub

    from lmms_sgm import models
    from lmms_sgm.processors import load_processor

    # Offline mode keeps huggingface_hub off the network (hub_unreachable asks nothing then): the
    # same hint applies, with the setting as the reason.
    offline = huggingface_hub.is_offline_mode()
    unreachable = "HF_HUB_OFFLINE is set" if offline else models.hub_unreachable()
    try:
        return load_processor(repo_id, local_files_only=bool(unreachable))
    except OSError as e:
        if unreachable:
            raise OSError(f"model {repo_id}: its processor is not in the Hugging Face cache and the Hub cannot be "
                          f"reached ({unreachable}); a remote model still needs its config and processor here, to "
                          "encode inputs: download them once (they are small; the weights are not needed)") from e
        raise


def _canonical_id(repo_id: str) -> str:
    """The Hub's spelling of ``repo_id`` (what NDIF deploys under), or ``repo_id`` as given when the
    Hub cannot be asked (offline: a server such as a private deployment knows the id as given)."""
    import huggingface_hub
    from huggingface_hub import HfApi

    if huggingface_hub.is_offline_mode():
        return repo_id
    try:
        return HfApi().model_info(repo_id, timeout=10).id
    except Exception:  # noqa: BLE001 -- unreachable, unknown, gated: the id as given
        return repo_id


# ---------------------------------------------------------------- sending traces


class Session:
    """Remote traces for one run: ``with Session(nn_model, options) as remote: remote.call(fn, ...)``.

    On entry: nnsight's own per-job status display is turned off (our progress bar counts
    batches instead); lmms_sgm is registered to travel by value (the server does not have it;
    an editable install is found by nnsight itself, a normal one is not); and the model's Hub id
    is settled once, so that nnsight does not ask the Hub for every trace.
    """

    def __init__(self, nn_model, options: RemoteOptions):
        self.nn_model = nn_model
        self.options = options
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Session:
        import nnsight
        from nnsight.schema.config import CONFIG

        previous = CONFIG.APP.REMOTE_LOGGING
        CONFIG.APP.REMOTE_LOGGING = False
        self._stack.callback(setattr, CONFIG.APP, "REMOTE_LOGGING", previous)
        nnsight.register("lmms_sgm")
        api_key()  # registered before anything can be written or shown
        if self.options.remote != "local":
            import nnsight.modeling.huggingface as nn_hf

            repo_id = self.nn_model.repo_id
            if repo_id is None or Path(str(repo_id)).expanduser().exists():
                raise ValueError(f"a model loaded from the local directory {repo_id} cannot run remotely: the server "
                                 "loads the model by its Hub id; build it with lmms_sgm.remote.load(HUB_ID, ...), or "
                                 "use remote=local")
            nn_hf._ID_CACHE.setdefault(repo_id, _canonical_id(repo_id))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    @property
    def trace_kwargs(self) -> dict:
        return {"remote": trace_target(self.options)}

    def call(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` (which runs one remote trace), retried after transport failures;
        every failure becomes a :class:`RemoteError` that says what to do."""
        where = host(self.options)
        tries = self.options.remote_retries + 1
        for attempt in range(1, tries + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # sorted below; anything not remote is re-raised as is
                kind, detail = classify(e)
                if kind is None:
                    raise
                if kind == "auth":
                    missing = "no API key is configured" if not api_key() else "the API key was refused"
                    raise RemoteAuthError(f"NDIF server {where}: {missing} ({detail}); set {KEY_SOURCES} "
                                          "to a valid key") from None
                if kind == "job":
                    raise RemoteJobError(f"the trace failed on the NDIF server {where}: {detail}") from None
                if attempt == tries:
                    what = "cannot reach the NDIF server" if kind == "unreachable" else "no answer from the NDIF server"
                    raise RemoteError(f"{what} {where} after {tries} tries ({detail}); check {HOST_SOURCES} or the "
                                      "remote URL, the network, and the service status") from None
                wait = 2.0 ** attempt
                warnings.warn(f"remote trace failed ({detail}); retry {attempt} of {tries - 1} in {wait:.0f} s", stacklevel=1)
                _sleep(wait)
        raise AssertionError("unreachable")


def _sleep(seconds: float) -> None:  # a module attribute, so that tests need not wait
    time.sleep(seconds)


def classify(error: BaseException) -> tuple[str | None, str]:
    """``(kind, one-line detail)`` of an exception raised by a remote trace: kind is "auth" (key
    refused), "job" (failed on the server), "unreachable" / "transient" (worth a retry), or None
    (not a transport problem: a bug or an input error, raised as it is)."""
    from nnsight.intervention.backends.remote import RemoteError as NnsightRemoteError

    try:
        import httpx
        import websocket
    except ImportError:  # the remote extras of nnsight are missing: nothing can be remote
        return None, ""
    api_key()  # registers the key, wherever nnsight read it from
    detail = redact(" ".join(f"{type(error).__name__}: {error}".split()))
    cause = error.__cause__
    if isinstance(error, NnsightRemoteError):
        if isinstance(cause, httpx.HTTPStatusError):
            status = cause.response.status_code
            if status in (401, 403) or (status == 400 and "api key" in detail.lower()):
                return "auth", detail  # NDIF answers a malformed key with 400
            return ("transient" if status >= 500 or status == 429 else "job"), detail
        if isinstance(cause, httpx.TransportError):
            return "unreachable", detail
        return "job", detail  # an ERROR status: the job itself failed
    if isinstance(error, websocket.WebSocketBadStatusException):
        status = getattr(error, "status_code", 0)
        detail = redact(f"{type(error).__name__}: HTTP {status}")  # its message can carry the response headers
        if status in (401, 403):
            return "auth", detail
        return ("transient" if status >= 500 or status == 429 else "job"), detail
    if isinstance(error, (websocket.WebSocketException, ConnectionError, TimeoutError, httpx.TransportError)):
        return "unreachable", detail
    if isinstance(error, OSError) and error.errno is not None:  # DNS, no route, reset
        return "unreachable", detail
    return None, detail


# ---------------------------------------------------------------- profiling batches


def fit_batch_size(batch_size: int, result_bytes: int, request_bytes: int, options: RemoteOptions) -> int:
    """The largest batch size up to ``batch_size`` whose request and result (per-example bytes)
    stay under ``remote_max_mb``; at least 1 (with a warning when one example is already over)."""
    limit = options.remote_max_mb * 2**20
    per_example = max(result_bytes, request_bytes, 1)
    fits = int(limit // per_example)
    if fits < 1:
        warnings.warn(f"one example's remote {'result' if result_bytes >= request_bytes else 'request'} is "
                      f"{per_example / 2**20:.3g} MB, over remote_max_mb={options.remote_max_mb:g}: sending one at a time",
                      stacklevel=1)
    return max(1, min(batch_size, fits))


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


# ---------------------------------------------------------------- wearing glasses remotely


def apply_edits(nn_model, worn, state: dict) -> None:
    """Inside a trace, at one forward pass: the worn glasses' edits (their ``begin_forward`` first),
    in forward order, as the nnsight mode's persistent edit applies them. It runs on the server,
    shipped by value with what it uses: no import may run inside it (the server has no lmms_sgm)."""
    points, begin = worn
    if begin is not None:
        args, kwargs = nn_model.inputs
        begin(state, args, kwargs)
    for envoy, where, fn in points:
        if where == INPUT:
            new = fn(envoy.input, state)
            if new is not None:
                envoy.input = new
        elif where == OUTPUT:
            new = fn(envoy.output, state)
            if new is not None:
                envoy.output = new
        else:
            out = envoy.output
            new = fn(hidden(out), state)
            if new is not None:
                envoy.output = with_hidden(out, new)


class RemoteGlasses:
    """Glasses worn by a remote (or remotely emulated) model: nothing changes here; every trace
    this handle runs applies the glasses' edits inside itself, on the prompt pass and every
    generated token (any kind whose ``modes`` include ``remote``: :func:`lmms_sgm.interventions.wearing.wear`
    refuses the others). Generate with :meth:`generate`, score with :meth:`token_scores` or :meth:`logits`.
    """

    def __init__(self, glasses, nn_model, options: ApplyOptions, remote: RemoteOptions):
        from lmms_sgm.archs import get_module
        from lmms_sgm.models import unwrap

        self.glasses = glasses
        self.options = options
        self.remote = remote
        self.model = nn_model
        self.active = True
        # The edits travel with every request, their constants on the CPU (SGM's factors: float32,
        # one per neuron of each changed site).
        edits = None
        if glasses is not None:
            dtype = next(unwrap(nn_model).parameters()).dtype
            edits = glasses.edits(options.strength, device="cpu", dtype=dtype)
        points = [] if edits is None else [(get_module(nn_model, e.path), e.where, e.fn) for e in edits.edits]
        self._worn = (points, None if edits is None else edits.begin_forward)

    def remove(self) -> None:
        self.active = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def __repr__(self):
        return f"<RemoteGlasses remote={self.remote.remote} strength={self.options.strength} {'active' if self.active else 'removed'}>"

    def _points_if_active(self):
        return self._worn if self.active else ([], None)

    def generate(self, inputs: dict, **gen) -> torch.Tensor:
        """Token ids (prompt and continuation) of ``generate(**inputs, **gen)`` wearing the glasses."""
        points = self._points_if_active()
        with Session(self.model, self.remote) as session:
            return session.call(_generate, self.model, points, dict(inputs), gen, session.trace_kwargs)

    def token_scores(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per position t of every row: the log-probability of token t+1 and whether it is the argmax
        (``[batch, seq-1]`` each), computed on the server so that only these travel back."""
        points = self._points_if_active()
        with Session(self.model, self.remote) as session:
            return session.call(_token_scores, self.model, points, dict(inputs), session.trace_kwargs)

    def logits(self, inputs: dict) -> torch.Tensor:
        """The full logits of one forward pass (``[batch, seq, vocab]``: large for a real vocabulary)."""
        points = self._points_if_active()
        with Session(self.model, self.remote) as session:
            return session.call(_logits, self.model, points, dict(inputs), session.trace_kwargs)


def _generate(nn_model, worn, inputs, gen, trace_kwargs):
    if not worn[0]:  # an open step loop with an empty body never ends (nnsight 0.8.1)
        with nn_model.generate(**inputs, **gen, **trace_kwargs) as tracer:
            ids = tracer.result.save()
        return ids
    with warnings.catch_warnings():
        # The step loop is open-ended (the length is unknown); nnsight warns that the step after
        # the last was "never reached": expected. The result is read in a second invoke, since
        # statements after an open loop do not run.
        warnings.filterwarnings("ignore", message=r".*was never reached.*", category=UserWarning)
        with nn_model.generate(**gen, **trace_kwargs) as tracer:
            with tracer.invoke(**inputs):
                state = {}
                for _ in tracer.iter[:]:
                    apply_edits(nn_model, worn, state)
            with tracer.invoke():
                ids = tracer.result.save()
    return ids


def _token_scores(nn_model, worn, inputs, trace_kwargs):
    targets = inputs["input_ids"][:, 1:]
    with nn_model.trace(**inputs, **trace_kwargs):
        apply_edits(nn_model, worn, {})
        logits = nn_model.output.logits[:, :-1].float()
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1).save()
        greedy = (logits.argmax(-1) == targets).save()
    return logprobs, greedy


def _logits(nn_model, worn, inputs, trace_kwargs):
    with nn_model.trace(**inputs, **trace_kwargs):
        apply_edits(nn_model, worn, {})
        logits = nn_model.output.logits.save()
    return logits


def wear(glasses, model, options: ApplyOptions, remote: RemoteOptions, *, processor=None) -> RemoteGlasses:
    """Wear ``glasses`` on ``model`` remotely (:func:`lmms_sgm.interventions.wearing.wear` with ``remote=``,
    which has checked that the glasses declare the ``remote`` mode)."""
    if options.mode != "nnsight":
        raise ValueError(remote_mode_refusal(options.mode))
    nn_model = wrap(model, processor)
    if glasses is not None:
        glasses.check(nn_model)
    return RemoteGlasses(glasses, nn_model, options, remote)
