"""Every option, defined once.

The dataclasses here are the single source of truth for the Python API, the ``lmms-sgm`` CLI
(flags are generated from the fields) and lmms-eval's ``--model_args`` (parsed from strings by
:func:`from_strings`). Each field's ``metadata`` carries its help text and allowed values.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field


def opt(default, help: str, choices: tuple | None = None, const=None):
    """A field with its help text; ``const`` is what its CLI flag means when given without a value."""
    meta = {"help": help, "choices": choices, "const": const}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


NEURON_MODULES = ("gate_proj", "up_proj", "down_proj", "intermediate")


@dataclass(frozen=True)
class ProfileOptions:
    """What is observed, where, and how it is pooled (method.md sections 1-3)."""

    modules: tuple[str, ...] = opt(
        ("gate_proj", "up_proj", "down_proj"),
        "neurons to profile: outputs of gate_proj/up_proj/down_proj, and/or 'intermediate' "
        "(the MLP activation act(gate(x))*up(x), i.e. the input of down_proj)",
        NEURON_MODULES,
    )
    layers: str = opt("all", "decoder layers: 'all' (every post-fusion layer), a range '4-20' (inclusive) or a list '0,3,7'")
    pooling: str = opt("mean", "pooling of a neuron's activation over positions", ("mean", "max"))
    positions: str = opt(
        "all",
        "positions pooled over (padding never counts): all non-padding, text tokens only "
        "(image tokens excluded), tokens after the last image token, the response tokens "
        "(the assistant turn; needs text_field=question+response), or the decision position "
        "(the last prompt token before the response; the last token otherwise)",
        ("all", "text", "after_image", "response", "decision"),
    )
    text_field: str = opt(
        "response",
        "text of each pair fed with its image: the response, the question, or the question as "
        "the user turn and the response as the assistant turn",
        ("response", "question", "question+response"),
    )
    batch_size: int = opt(8, "at most this many examples per forward pass (a batch holds examples of one token "
                              "length, so no row is padded and results do not depend on the batch size)")
    attention: str = opt(
        "eager",
        "attention kernel while profiling: eager (identical prefixes give identical activations, so exact "
        "ties between examples stay ties; memory grows with length^2) or the model's own (e.g. sdpa: less "
        "memory on long inputs, but on CPU a position's low bits depend on the sequence length)",
        ("eager", "model"),
    )
    text_only: bool = opt(
        False,
        "profile an MLLM on records without images (its language model alone, each text through the "
        "chat template with no image); a text-only model (causal LM) is always profiled on text alone",
    )

    def __post_init__(self):
        _check_choices(self)
        if not self.modules:
            raise ValueError("ProfileOptions.modules is empty: name at least one of " + ", ".join(NEURON_MODULES))
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        parse_layers(self.layers, None)  # syntax check now; range check once the model is known
        if self.positions == "response" and self.text_field != "question+response":
            raise ValueError("positions='response' needs text_field='question+response' (the response as the assistant turn)")


@dataclass(frozen=True)
class SelectionOptions:
    """Which neurons are experts and what factor alpha each gets (method.md section 5)."""

    rule: str = opt(
        "sgm",
        "sgm: experts are AUROC > threshold, alpha = 1 - 2*(AUROC - 0.5); det0: top-k experts "
        "set to 0; damp: top-k experts multiplied by damp_factor",
        ("sgm", "det0", "damp"),
    )
    threshold: float = opt(0.5, "AUROC above which a neuron is an expert (sgm rule); the precursor used 0.3")
    direction: str = opt(
        "suppress",
        "sgm rule: suppress toxic experts (AUROC > threshold), amplify anti-toxic ones "
        "(AUROC < 1 - threshold, alpha > 1), or both",
        ("suppress", "amplify", "both"),
    )
    top_k: int | None = opt(
        None,
        "keep only the k most extreme selected neurons over all sites (highest AUROC; lowest for "
        "amplify; farthest from 0.5 for both); required by det0/damp",
    )
    damp_factor: float = opt(0.5, "factor applied to the top-k experts by the damp rule")
    towards: str = opt(
        "zero",
        "what a scaled neuron is pulled towards: zero (out * alpha, the paper) or nontoxic_mean "
        "(mu + alpha * (out - mu), mu = the neuron's mean pooled response on non-toxic pairs)",
        ("zero", "nontoxic_mean"),
    )
    gate: str = opt(
        "off",
        "input-conditional glasses (beyond the paper): off, or evidence: a site's transform acts only at positions "
        "where its experts' AUROC-weighted evidence exceeds a threshold chosen on the profiling pairs "
        "(needs profiling; hooks and nnsight modes only)",
        ("off", "evidence"),
    )

    def __post_init__(self):
        _check_choices(self)
        if self.rule in ("det0", "damp") and not self.top_k:
            raise ValueError(f"rule={self.rule!r} needs top_k (the number of experts to change)")
        if self.rule in ("det0", "damp") and self.direction != "suppress":
            raise ValueError(f"rule={self.rule!r} only suppresses; direction={self.direction!r} needs rule=sgm")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold is an AUROC in [0, 1], got {self.threshold}")


def same_as(cls, name: str, default=dataclasses.MISSING):
    """The option ``cls.name`` (its help and choices) with another default: one option, one text."""
    f = cls.__dataclass_fields__[name]
    return opt(f.default if default is dataclasses.MISSING else default, f.metadata["help"], f.metadata["choices"])


STEER_FROM = ("prompt", "decision")


@dataclass(frozen=True)
class SteeringOptions:
    """Gated steering glasses (docs/steering.md): a steer vector subtracted from one decoder
    layer's output in the sequences a gate lets through. Built by ``lmms-sgm steer``."""

    layer: int = opt(-1, "decoder layer whose output (the residual stream after it) is steered; negative counts "
                         "from the end (-1: the last layer)")
    gate_layer: int | None = opt(
        None, "decoder layer whose output at the decision position gates a sequence (default: the steered layer; "
              "it may not come after it, since the gate is decided before the steer is written)")
    c: float = opt(1.0, "steering coefficient: c * steer is subtracted (1: the toxic answers' mean moves onto the "
                        "non-toxic one); at apply time strength s in [0, 1] makes it s * c")
    gate_threshold: float = opt(
        0.5, "where the gate opens on the gate projection, as a fraction of the way from the benign (0) to the "
             "harmful (1) class mean on the gate data: 0.5 is the midpoint, lower lets more sequences through")
    steer_from: str = opt(
        "prompt", "positions steered in a gated-on sequence: every position, the prompt included (prompt), or the "
                  "decision position (the last prompt token) and every later one (decision); generated tokens always",
        STEER_FROM)
    gated: bool = opt(True, "false: steer every sequence, no gate (the ungated variant, for comparison)")
    text_field: str = same_as(ProfileOptions, "text_field", "question+response")
    positions: str = same_as(ProfileOptions, "positions", "response")
    batch_size: int = same_as(ProfileOptions, "batch_size")
    attention: str = same_as(ProfileOptions, "attention")

    # Fields that only change how the glasses act, not what was profiled (re-set without re-profiling).
    APPLY_FIELDS: typing.ClassVar[tuple[str, ...]] = ("c", "gate_threshold", "steer_from", "gated")

    def __post_init__(self):
        _check_choices(self)
        for name in ("c", "gate_threshold"):  # 3 and 3.0 are one option value (and one glasses digest)
            object.__setattr__(self, name, float(getattr(self, name)))
        if not (self.c >= 0 and self.c != float("inf")):
            raise ValueError(f"c must be a finite number >= 0, got {self.c}")
        if self.gate_threshold != self.gate_threshold or abs(self.gate_threshold) == float("inf"):
            raise ValueError(f"gate_threshold must be a finite number, got {self.gate_threshold}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.positions == "response" and self.text_field != "question+response":
            raise ValueError("positions='response' needs text_field='question+response' (the response as the assistant turn)")

    def answer_profile(self) -> ProfileOptions:
        """How the answer pairs are profiled for the steer vector."""
        return ProfileOptions(text_field=self.text_field, positions=self.positions, pooling="mean",
                              batch_size=self.batch_size, attention=self.attention)

    def gate_profile(self) -> ProfileOptions:
        """How the gate pairs are profiled: the decision position, where the gate is read at inference
        (the last token of the generation prompt; the pair's text after it does not reach it)."""
        return ProfileOptions(text_field="question+response", positions="decision", pooling="mean",
                              batch_size=self.batch_size, attention=self.attention)


OVER_REFUSAL_UNIT = "percentage points"


@dataclass(frozen=True)
class RuleOptions:
    """How an operating point is chosen among measured options: the lowest ``metric`` among those
    within the side conditions, and lower than the baseline's (vanilla's).

    One rule for ``lmms-sgm tune`` (docs/diagnosis.md), ``lmms-sgm report`` / ``sweep``'s operating
    point (docs/reports.md) and the demo. Over-refusal is in percentage points, the unit reports
    show (``+2.0 pt``): 2.0 allows 10% -> 12%. Files written before this rule was one stored it as
    a fraction (tune's ``table.json``: 0.02); :func:`rule_from_dict` reads both.
    """

    metric: str | None = opt(
        None, "what the rule minimises: for tune a measure of lmms_sgm.evaluate (None: harmful_sampled); for "
              "report/sweep a results metric task:metric[:filter] (None: mm_toxic_qa_sampled:harmful_rate:samples, "
              "else mm_toxic_qa:harmful_rate)")
    retention: float = opt(0.95, "every capability measure kept at least at this fraction of the baseline's (vanilla's)")
    over_refusal_points: float = opt(2.0, "over-refusal allowed above the baseline's, in percentage points (2 = from "
                                          "10% to at most 12%)")
    fluency_ratio: float = opt(2.0, "tune: fluency (perplexity of the safe answers to the harmful prompts under the "
                                    "unmodified model) allowed, as a multiple of vanilla's; 0: no fluency condition")

    def __post_init__(self):
        for name in ("retention", "over_refusal_points", "fluency_ratio"):  # 2 and 2.0 are one rule
            object.__setattr__(self, name, float(getattr(self, name)))
        if not 0 < self.retention <= 1:
            raise ValueError(f"retention={self.retention}: a fraction in (0, 1]")
        if self.over_refusal_points < 0 or self.fluency_ratio < 0:
            raise ValueError("over_refusal_points and fluency_ratio are >= 0 (fluency_ratio 0: no fluency condition)")

    @property
    def over_refusal_fraction(self) -> float:
        """The over-refusal allowance as a rate difference (for measures that are fractions)."""
        return self.over_refusal_points / 100


def rule_from_dict(d: dict) -> RuleOptions:
    """The rule a results file recorded: today's ``RuleOptions`` fields, tune's ``table.json`` of
    before (``over_refusal_points`` a fraction, no ``over_refusal_unit``) or a report's ``tradeoff.rule``
    of before (``min_retention``, ``max_over_refusal_points``, ``harm``). ``text`` is ignored."""
    d = {k: v for k, v in d.items() if k != "text"}
    if "max_over_refusal_points" in d or "min_retention" in d:  # report.json of before: points already
        d = {"retention": d.get("min_retention", 0.95), "over_refusal_points": d.get("max_over_refusal_points", 2.0),
             "metric": d.get("harm")}
    elif d.pop("over_refusal_unit", None) != OVER_REFUSAL_UNIT and "over_refusal_points" in d:
        d["over_refusal_points"] = 100 * float(d["over_refusal_points"])  # tune's table.json of before: a fraction
    return from_strings(RuleOptions, d)


def rule_to_dict(rule: RuleOptions) -> dict:
    """What results files record of a rule (read back by :func:`rule_from_dict`)."""
    return {**to_dict(rule), "over_refusal_unit": OVER_REFUSAL_UNIT}


@dataclass(frozen=True)
class SamplingOptions:
    """How answers are sampled (``lmms-sgm self-label``, ``tune``, ``diagnose``, the demo's evaluator).

    A command takes the fields it uses with :func:`add_arguments` (``only=``), with its own defaults
    where they differ (``defaults=``): the flags and their defaults are those of before."""

    samples: int = opt(5, "answers sampled per prompt")
    temperature: float = opt(1.0, "0 = greedy (then use --samples 1)")
    max_new_tokens: int = opt(32, "longest answer, in new tokens")
    batch_size: int = opt(8, "prompts per generate call")
    seed: int = opt(0, "seed of the random generator (torch.manual_seed) before the first answer")

    def __post_init__(self):
        object.__setattr__(self, "temperature", float(self.temperature))
        for name in ("samples", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


@dataclass(frozen=True)
class LoadOptions:
    """Where and in which precision the model runs."""

    device: str = opt("cpu", "torch device, e.g. cpu, cuda, cuda:1 (under torchrun / accelerate launch: cuda, each "
                             "process its own GPU), or auto: one model spread over every visible GPU (device_map=auto)")
    dtype: str = opt("auto", "weights dtype", ("auto", "float32", "float16", "bfloat16"))

    def __post_init__(self):
        _check_choices(self)


APPLY_MODES = ("hooks", "nnsight", "fold")


@dataclass(frozen=True)
class ApplyOptions:
    """How glasses are worn at inference (method.md section 6)."""

    strength: float = opt(1.0, "s in [0, 1]: out = (1 - s) * out + s * alpha * out (gated steering glasses: s * c * steer "
                               "is subtracted); 0 is the vanilla model")
    mode: str = opt(
        "hooks",
        "hooks: PyTorch forward hooks; nnsight: a persistent nnsight edit (call the returned "
        "handle.model); fold: factors multiplied into the weights (zero overhead)",
        APPLY_MODES,
    )

    def __post_init__(self):
        _check_choices(self)
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {self.strength}")


REMOTE_OFF = ("off", "false", "no", "0", "none", "")
REMOTE_ON = ("ndif", "true", "yes", "on", "1")


@dataclass(frozen=True)
class RemoteOptions:
    """Where the nnsight traces run: in this process, or on an NDIF server (lmms_sgm/remote.py).

    None of it changes what is computed, so none of it enters the glasses' manifest. The server
    and its API key are configured the way nnsight is (``NDIF_HOST`` / ``NDIF_API_KEY``, or
    ``~/.config/nnsight/config.yaml``); the key is never an option, so it never reaches a
    command line, a log or a results file.
    """

    remote: str = opt(
        "off",
        "run the nnsight traces remotely: off; ndif (the server nnsight is configured with: NDIF_HOST or "
        "~/.config/nnsight/config.yaml, API key from NDIF_API_KEY or that file); a server URL http(s)://HOST:PORT; "
        "or local (nnsight's in-process emulation of the remote path, for checking code before sending it). "
        "The model is then a Hub id, never loaded here",
        const="ndif",
    )
    remote_retries: int = opt(3, "retries of a remote trace after a transport failure (unreachable, timeout, HTTP 5xx), "
                                 "waiting 2, 4, 8... s")
    remote_max_mb: float = opt(64.0, "largest request or result of one remote trace in MiB (2**20 bytes; our default, "
                                     "not a published NDIF limit): profiling batches are cut to fit")

    def __post_init__(self):
        value = str(self.remote).strip()
        if value.lower() in REMOTE_OFF:
            value = "off"
        elif value.lower() in REMOTE_ON:
            value = "ndif"
        elif value.lower() == "local":
            value = "local"
        elif not value.startswith(("http://", "https://")):
            raise ValueError(f"remote={self.remote!r}: use off, ndif, local or a server URL http(s)://HOST:PORT")
        object.__setattr__(self, "remote", value)
        if self.remote_retries < 0:
            raise ValueError(f"remote_retries must be >= 0, got {self.remote_retries}")
        if self.remote_max_mb <= 0:
            raise ValueError(f"remote_max_mb must be > 0, got {self.remote_max_mb}")

    @property
    def is_remote(self) -> bool:
        return self.remote != "off"


@dataclass(frozen=True)
class ExecutionOptions(RemoteOptions):
    """How profiling runs: where its traces run, and how an interrupted run is resumed.

    Several processes (``torchrun`` / ``accelerate launch``) are not an option: the launcher's
    environment says so (lmms_sgm/distributed.py). None of this enters the glasses' manifest:
    glasses profiled in one process, several, remotely or resumed are the same glasses.
    """

    checkpoint_dir: str = opt(
        "auto",
        "where each batch's pooled responses are kept until the glasses are written, so that an interrupted "
        "run can resume: auto (a hidden sibling of the output directory, .NAME.ckpt), off, or a directory",
    )
    resume: bool = opt(False, "continue an interrupted run from its checkpoint (the same data, model and profiling "
                              "options; anything else is refused)")

    def __post_init__(self):
        RemoteOptions.__post_init__(self)
        if not str(self.checkpoint_dir).strip():
            raise ValueError("checkpoint_dir is empty: use auto, off or a directory")
        if self.resume and self.checkpoint_dir == "off":
            raise ValueError("resume needs a checkpoint: checkpoint_dir=off keeps none")


def parse_layers(spec: str, num_layers: int | None) -> list[int] | None:
    """'all' | 'a-b' | 'a,b,c' -> sorted layer indices (None for 'all' when num_layers unknown)."""
    spec = str(spec).strip()
    if spec == "all":
        return None if num_layers is None else list(range(num_layers))
    out: set[int] = set()
    try:
        for part in spec.replace(" ", "").split(","):
            if "-" in part:
                lo, hi = part.split("-")
                out.update(range(int(lo), int(hi) + 1))
            else:
                out.add(int(part))
    except ValueError:
        raise ValueError(f"bad layers spec {spec!r}: use 'all', '4-20' or '0,3,7'") from None
    if not out:
        raise ValueError(f"layers spec {spec!r} selects no layer")
    if num_layers is not None:
        bad = sorted(i for i in out if not 0 <= i < num_layers)
        if bad:
            raise ValueError(f"layers {bad} do not exist: the model has {num_layers} decoder layers (0-{num_layers - 1})")
    return sorted(out)


def _check_choices(obj) -> None:
    for f in dataclasses.fields(obj):
        choices = f.metadata.get("choices")
        if not choices:
            continue
        value = getattr(obj, f.name)
        values = value if isinstance(value, tuple) else (value,)
        bad = [v for v in values if v not in choices]
        if bad:
            raise ValueError(f"unknown {f.name} {bad[0]!r}; choose from {', '.join(choices)}")


# ---------------------------------------------------------------- string and CLI conversion

def _convert(tp, raw: str, name: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:  # Optional[X], X | None
        if raw.lower() in ("none", "null", ""):
            return None
        tp = next(a for a in args if a is not type(None))
        return _convert(tp, raw, name)
    if origin is tuple:
        return tuple(p for p in raw.replace("+", ",").split(",") if p) if raw else ()
    if tp is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name} expects true/false, got {raw!r}")
    try:
        return tp(raw)
    except ValueError:
        raise ValueError(f"{name} expects {tp.__name__}, got {raw!r}") from None


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def from_strings(cls, values: dict[str, str], *, strict: bool = True):
    """Build ``cls`` from string values (``--model_args``, CLI). Unknown keys are an error."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown and strict:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for {cls.__name__}; known: {', '.join(sorted(names))}")
    # Lists come back from JSON (to_dict writes tuples as lists): frozen options hold tuples.
    kwargs = {k: (_convert(hints[k], v, k) if isinstance(v, str) else tuple(v) if isinstance(v, list) else v)
              for k, v in values.items() if k in names}
    return cls(**kwargs)


def add_arguments(parser: argparse.ArgumentParser, cls, prefix: str = "", *, only: tuple[str, ...] | None = None,
                  defaults: dict | None = None, help: dict | None = None) -> None:
    """Add one ``--flag`` per field of ``cls`` (``only``: these fields). Defaults are left to the
    dataclass (the flag's value is None when not given), except those in ``defaults``: a command's
    own default, which the namespace then holds. ``help``: a command's own wording of a field."""
    group = parser.add_argument_group(cls.__name__)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted((set(only or ()) | set(defaults or {}) | set(help or {})) - set(fields))
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {', '.join(unknown)}")
    for f in (fields[n] for n in only) if only else fields.values():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if defaults and f.name in defaults:
            default = defaults[f.name]
        shown = ",".join(default) if isinstance(default, tuple) else default
        # A boolean, or a field with a ``const``, may be given as a bare flag (--resume, --remote).
        const = "true" if f.type in (bool, "bool") else f.metadata.get("const")
        bare = {} if const is None else {"nargs": "?", "const": const}
        group.add_argument(
            f"--{prefix}{f.name}".replace("_", "-"),
            dest=f"{prefix}{f.name}",
            default=defaults[f.name] if defaults and f.name in defaults else None,
            metavar=f.name.upper(),
            **bare,
            help=f"{(help or {}).get(f.name, f.metadata.get('help', ''))}"
            + (f" [{'|'.join(f.metadata['choices'])}]" if f.metadata.get("choices") else "")
            + f" (default: {shown})",
        )


def from_namespace(cls, ns: argparse.Namespace, prefix: str = ""):
    """``cls`` from the flags :func:`add_arguments` added (a field without a flag keeps its default)."""
    values = {f.name: getattr(ns, prefix + f.name, None) for f in dataclasses.fields(cls)}
    return from_strings(cls, {k: v for k, v in values.items() if v is not None})


def to_dict(obj) -> dict:
    d = dataclasses.asdict(obj)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@dataclass(frozen=True)
class EvalModelArgs(ApplyOptions, LoadOptions):
    """The ``--model_args`` every evaluation-harness wrapper takes: a model, the glasses it wears,
    and how (lmms-eval's ``sgm`` / ``sgm_llava``: :class:`ModelArgs`; lm-eval's ``sgm_hf``: these alone)."""

    pretrained: str = opt("", "Hub id or local directory of the model (loaded with from_pretrained)")
    glasses: str | None = opt(None, "glasses directory to wear")
    sgm: bool = opt(True, "on/off: off runs the vanilla model through the same wrapper and code path")
    batch_size: int = opt(1, "requests per forward pass / generate call")

    def __post_init__(self):
        ApplyOptions.__post_init__(self)
        LoadOptions.__post_init__(self)
        if not self.pretrained:
            raise ValueError("pretrained is required: a Hub id or a local model directory")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class ModelArgs(RemoteOptions, EvalModelArgs):
    """lmms-eval ``--model_args`` of ``sgm`` (alias ``sgm_llava``): :class:`EvalModelArgs`, remote execution, and
    building glasses on first use.

    With ``remote``, generation and scoring run on the NDIF server in nnsight mode (the default
    then); ``mode=hooks`` / ``mode=fold`` change the local module and are refused.

    Profiling and selection options for ``profile_data`` are given with a prefix:
    ``profile_pooling=max``, ``select_threshold=0.3`` (fields of ProfileOptions / SelectionOptions).
    """

    profile_data: str | None = opt(
        None, "labelled pairs to build glasses from on first use (cached by model fingerprint, data digest and options)"
    )
    defenses: str = opt(
        "", "defenses worn with (or, sgm=off, without) the glasses, composed in order with '+': system_prompt, "
            "self_check, output_filter, or a plugin's (docs/defenses.md); glasses plus defenses is SGM*")
    defense_args: str = opt(
        "", "per-defense arguments, DEFENSE.KEY=VALUE items separated by ';', e.g. "
            "self_check.fallback=caption;output_filter.judge=lexicon")

    def __post_init__(self):
        RemoteOptions.__post_init__(self)
        EvalModelArgs.__post_init__(self)
        if self.is_remote and self.mode != "nnsight":
            raise ValueError(remote_mode_refusal(self.mode))
        if self.glasses and self.profile_data:
            raise ValueError("give either glasses (a directory) or profile_data (to build them), not both")


def remote_mode_refusal(mode: str) -> str:
    what = "forward hooks on the local module" if mode == "hooks" else "factors folded into the local weights"
    return (f"mode={mode} cannot run remotely: it works through {what}, which an NDIF server never sees; "
            "remote execution applies the glasses inside the nnsight trace: use mode=nnsight (the default with remote)")
