"""``sgm_hf``: lm-eval's ``HFLM`` running a model that wears safety glasses (or not: ``sgm=off``).

    lm-eval-sgm --model sgm_hf --model_args pretrained=DIR,glasses=GLASSES,strength=1.0 \\
        --tasks sgm_text_ppl,sgm_text_toxicity --device cpu --output_path runs/sgm

Everything that turns requests into forward passes (batching, rolling windows, stop strings,
padding) is HFLM's own: this class loads the model with :func:`lmms_sgm.models.load` -- the
loader the glasses were profiled with, so the fingerprint check sees the same model -- hands it
to HFLM as a pre-built module, then puts the glasses on it (:func:`lmms_sgm.interventions.wearing.wear`,
hooks or fold, any kind of glasses: every forward pass HFLM makes, prompt and generated tokens
alike, goes through their edits).

Two kinds of model:

* a text-only causal LM (a ``text_only`` architecture adapter; AurA's setting), wearing glasses
  profiled on that model from text-only records;
* a multimodal model (LLaVA family) run on text alone: its whole module is loaded and fed token
  ids without pixel values, so the glasses profiled on it apply at their own module paths,
  unchanged (``model.language_model.layers...``), and its fingerprint check holds.

``--model_args`` are the fields of :class:`lmms_sgm.options.EvalModelArgs` (parsed by
``from_strings``; ``profile_data`` is sgm_llava's only) plus the HFLM options that still act on a
model handed over already loaded (:data:`HFLM_OPTIONS`, passed on as they are). Anything else is
an error naming the known keys: HFLM would otherwise drop loading options silently.
"""
from __future__ import annotations

import dataclasses
import json
import logging

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from lmms_sgm import harness_common as run_info  # shared with sgm and the tasks
from lmms_sgm import models
from lmms_sgm.options import EvalModelArgs, from_strings

MODEL_NAME = "sgm_hf"
# HFLM.__init__ options that act on a pre-built model. Its loading options (revision, peft, delta,
# parallelize, trust_remote_code, gguf_file, quantization...) do not: HFLM ignores them then.
HFLM_OPTIONS = ("max_length", "add_bos_token", "prefix_token_id", "truncation", "logits_cache", "softmax_dtype",
                "mixed_precision_dtype", "max_batch_size", "think_end_token", "enable_thinking", "chat_template_args")

log = logging.getLogger(__name__)


def parse_model_args(kwargs: dict) -> tuple[EvalModelArgs, dict]:
    """``--model_args`` (and Python keyword arguments) -> (our options, HFLM's options).

    lm-eval's parser has already turned "true"/"4"/"0.5" into Python values; they go back to
    strings so that ``from_strings`` is the only parser of our options."""
    ours = [f.name for f in dataclasses.fields(EvalModelArgs)]
    unknown = sorted(k for k in kwargs if k not in ours and k not in HFLM_OPTIONS)
    if unknown:
        raise ValueError(
            f"{MODEL_NAME}: unknown model_args {', '.join(unknown)}; known: {', '.join(ours)} "
            f"(lmms_sgm.options.EvalModelArgs) and HFLM's {', '.join(HFLM_OPTIONS)}"
            + ("; profile_data is sgm_llava's: build glasses first with `lmms-sgm profile`" if "profile_data" in unknown else "")
        )
    args = from_strings(EvalModelArgs, {k: run_info.as_string(v) for k, v in kwargs.items() if k in ours})
    if args.mode == "nnsight":
        raise ValueError(f"{MODEL_NAME}: mode=nnsight is not supported (HFLM calls the HF module itself, which "
                         "bypasses an nnsight edit); use mode=hooks or mode=fold, which give the same logits")
    if args.sgm and not args.glasses:
        raise ValueError(f"{MODEL_NAME} needs glasses: pass glasses=DIR (made by `lmms-sgm profile`), or sgm=off "
                         "for the vanilla model")
    return args, {k: v for k, v in kwargs.items() if k in HFLM_OPTIONS}


def _usable(device: str) -> bool:
    kind = torch.device(device).type
    return kind == "cpu" or (kind == "cuda" and torch.cuda.is_available()) or (
        kind == "mps" and torch.backends.mps.is_available())


@register_model(MODEL_NAME)
class SGMHFLM(HFLM):
    """HFLM over a model loaded by lmms_sgm, wearing glasses (``glasses=DIR``) or not (``sgm=off``)."""

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> SGMHFLM:
        """lm-eval's CLI passes ``batch_size`` (default 1), ``device`` (default ``cuda:0``) and
        ``max_batch_size`` beside ``--model_args``; its base class then fails with a bare
        TypeError when model_args holds one of them too. Here model_args wins; two different
        batch sizes (the CLI's not its default 1) are an error that says so; the CLI's device is
        taken only when usable (HFLM falls back to the CPU the same way)."""
        args = dict(arg_dict)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        cli_batch = extra.pop("batch_size", None)
        if cli_batch is not None:
            if "batch_size" in args and str(cli_batch) not in ("1", str(args["batch_size"])):
                raise ValueError(f"batch_size given twice: {args['batch_size']!r} in --model_args and {cli_batch!r} by "
                                 "--batch_size; keep one")
            args.setdefault("batch_size", cli_batch)
        cli_device = extra.pop("device", None)
        if cli_device is not None and "device" not in args:
            if _usable(str(cli_device)):
                args["device"] = cli_device
            else:
                log.info(f"{MODEL_NAME}: device {cli_device} is not available here; using cpu")
        for k, v in extra.items():
            args.setdefault(k, v)
        return cls(**args)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> SGMHFLM:
        from lm_eval import utils

        return cls.create_from_arg_obj(utils.simple_parse_args_string(arg_string), additional_config)

    def __init__(self, **kwargs) -> None:
        if str(kwargs.get("batch_size", "1")).startswith("auto"):
            raise ValueError(f"{MODEL_NAME} has no automatic batch size (got batch_size={kwargs['batch_size']!r}); "
                             "pass a number: --batch_size 8")
        args, hflm_options = parse_model_args(kwargs)
        model, processor = models.load(args.pretrained, device=args.device, dtype=args.dtype)
        text_only = models.is_text_only(model)
        tokenizer = processor if text_only else processor.tokenizer
        # backend=causal: a multimodal config is in neither of HFLM's model-type tables.
        super().__init__(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=args.batch_size,
                         **hflm_options)
        self.pretrained = args.pretrained  # a name for lm-eval's model info (HFLM kept the module)
        self.args = args
        self.glasses = None
        self._handle = None
        info = {"model": MODEL_NAME, "kind": "causal_lm" if text_only else "mllm_text_only", "sgm": args.sgm,
                "pretrained": args.pretrained, "strength": args.strength, "mode": args.mode, "device": args.device}
        if args.sgm:
            from lmms_sgm.interventions.base import load_glasses
            from lmms_sgm.interventions.errors import GlassesMismatch
            from lmms_sgm.interventions.wearing import wear

            glasses = load_glasses(args.glasses)
            try:
                self._handle = wear(self._model, glasses, args.mode, args.strength)
            except GlassesMismatch as e:
                raise GlassesMismatch(f"glasses {args.glasses} do not fit {args.pretrained}: {e}") from None
            self.glasses = glasses
            # What the glasses do is the kind's to say (identity(): SGM's data digest, selection
            # and expert count; a steering layer and gate...). Its "kind" would shadow the model's.
            identity = dict(glasses.identity())
            text_only_profile = bool(identity.pop("text_only", False)) or text_only
            if "kind" in identity:
                identity["glasses_kind"] = identity.pop("kind")
            info.update(glasses=str(args.glasses), glasses_digest=glasses.digest(), **identity,
                        text_only_profile=text_only_profile)
        self.sgm_info = info
        run_info.publish(info)  # our tasks write it into results.json as the `sgm` metric
        log.info(f"{MODEL_NAME}: " + json.dumps(info, sort_keys=True))

    def get_model_info(self) -> dict:
        """HFLM's model info plus what the model wore: lm-eval writes it into results.json's
        ``config``, so that every task's results, ours or not, say it."""
        return {**super().get_model_info(), "sgm": self.sgm_info}
