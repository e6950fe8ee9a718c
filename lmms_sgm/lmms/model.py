"""``sgm``: an lmms-eval "simple" model that runs a multimodal LLM wearing safety glasses.

    lmms-eval --model sgm --tasks ... --batch_size 4 \\
        --model_args pretrained=Qwen/Qwen2-VL-2B-Instruct,glasses=glasses/qwen2vl,strength=1.0,mode=hooks

Any supported family (``lmms_sgm.archs``: LLaVA-1.5/-NeXT/-OneVision, Qwen2-VL, Qwen2.5-VL,
Idefics3/SmolVLM, Gemma 3, Mllama); ``sgm_llava`` is the same model under its first name. Prompts
are the model's own chat template and image handling, through ``lmms_sgm.prompting``: several
images per request, none, images at the task's ``<image 1>`` / ``<image>`` placeholders, and
videos where the processor has a video processor (a clear error otherwise).

``--model_args`` are the fields of :class:`lmms_sgm.options.ModelArgs` (parsed by ``from_strings``,
nothing else), plus ``profile_<field>`` / ``select_<field>`` for :class:`ProfileOptions` /
:class:`SelectionOptions`. Glasses come from ``glasses=DIR``, or are built from
``profile_data=PAIRS`` on first use and cached (``$LMMS_SGM_CACHE``, default
``~/.cache/lmms_sgm/glasses``); ``sgm=off`` runs the vanilla model through the same code.
``select_*`` with ``glasses=DIR`` re-selects the experts of those glasses (no re-profiling).

In ``nnsight`` mode every forward pass and every generation goes through the nnsight wrapper
(``handle.model``), since calling the HF module directly would bypass the edit.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import numbers
import os
from pathlib import Path

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger
from tqdm import tqdm

from lmms_sgm import harness_common as run_info  # shared with sgm_hf and the tasks
from lmms_sgm import models, prompting
from lmms_sgm.archs import adapter_for
from lmms_sgm.defenses import Request, Stack
from lmms_sgm.options import (
    ApplyOptions,
    ExecutionOptions,
    ModelArgs,
    ProfileOptions,
    RemoteOptions,
    SelectionOptions,
    from_strings,
    to_dict,
)
from lmms_sgm.version import __version__

MODEL_NAME = "sgm"  # also registered as sgm_llava (lmms_sgm/lmms/registration.py)
PROFILE_PREFIX = "profile_"
SELECT_PREFIX = "select_"
CACHE_ENV = "LMMS_SGM_CACHE"
DEFAULT_MAX_NEW_TOKENS = 1024  # lmms-eval's llava_hf default when a task sets none
# Keys of a task's generation_kwargs this model acts on; "until" is handled separately.
GEN_KEYS = ("max_new_tokens", "temperature", "do_sample", "top_p", "top_k", "num_beams")
# Keys lmms-eval tasks commonly carry that mean nothing to a HF LLaVA: ignored silently.
IGNORED_GEN_KEYS = {"until", "image_aspect_ratio", "image_sizes", "use_cache"}


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lmms_sgm" / "glasses")


# ---------------------------------------------------------------- model_args


def parse_model_args(kwargs: dict) -> tuple[ModelArgs, ProfileOptions | None, SelectionOptions | None]:
    """lmms-eval kwargs -> (ModelArgs, ProfileOptions or None, SelectionOptions or None).

    lmms-eval's ``simple_parse_args_string`` has already turned "true"/"4"/"0.5" into Python
    values; they are turned back into strings so that ``from_strings`` is the only parser.
    """
    model_fields = [f.name for f in dataclasses.fields(ModelArgs)]
    profile_fields = [PROFILE_PREFIX + f.name for f in dataclasses.fields(ProfileOptions)]
    select_fields = [SELECT_PREFIX + f.name for f in dataclasses.fields(SelectionOptions)]
    known = model_fields + profile_fields + select_fields
    values = {k: run_info.as_string(v) for k, v in kwargs.items()}
    unknown = sorted(k for k in values if k not in known)
    if unknown:
        raise ValueError(
            f"{MODEL_NAME}: unknown model_args {', '.join(unknown)}; known: {', '.join(known)} "
            "(see lmms_sgm/options.py: ModelArgs, ProfileOptions as profile_*, SelectionOptions as select_*)"
        )
    model_values = {k: v for k, v in values.items() if k in model_fields}
    if "mode" not in model_values and RemoteOptions(remote=model_values.get("remote", "off")).is_remote:
        model_values["mode"] = "nnsight"  # the one mode that runs remotely (others are refused)
    args = from_strings(ModelArgs, model_values)
    prof = {k[len(PROFILE_PREFIX):]: v for k, v in values.items() if k in profile_fields}
    sel = {k[len(SELECT_PREFIX):]: v for k, v in values.items() if k in select_fields}
    if prof and not args.profile_data:
        raise ValueError(
            f"{MODEL_NAME}: {', '.join(PROFILE_PREFIX + k for k in prof)} only apply when glasses are built "
            "from profile_data=PAIRS; add profile_data or drop them"
        )
    if sel and not args.glasses and not args.profile_data:
        raise ValueError(
            f"{MODEL_NAME}: {', '.join(SELECT_PREFIX + k for k in sel)} select experts of glasses; add glasses=DIR "
            "(to re-select its experts) or profile_data=PAIRS, or drop them"
        )
    if args.sgm and not args.glasses and not args.profile_data:
        raise ValueError(
            f"{MODEL_NAME} needs glasses: pass glasses=DIR (made by `lmms-sgm profile`), or profile_data=PAIRS "
            "to build them on first use, or sgm=off for the vanilla model"
        )
    profile = from_strings(ProfileOptions, prof) if args.profile_data else None
    selection = from_strings(SelectionOptions, sel) if (sel or args.profile_data) else None
    return args, profile, selection


# ---------------------------------------------------------------- loglikelihood results


def install_loglikelihood_passthrough() -> None:
    """Keep ``(loss, is_greedy)`` results intact in lmms-eval 0.7.3.

    lmms-eval 0.7.3's evaluator passes every model result through
    ``lmms_eval.api.instance.unwrap_generation_output``, which turns anything that is not a string,
    a ``GenerationResult`` or a ``(str, meta)`` pair into ``str(output)``. Loglikelihood results
    become ``"(0.69, False)"`` and every multiple-choice task then fails in ``process_results``
    (``zip(*results)`` over strings). This wraps the name the evaluator calls so that a pair of
    (real number, bool) -- a loglikelihood result, which no generation output looks like -- passes
    through unchanged; everything else goes to the original function. Idempotent.
    """
    from lmms_eval import evaluator

    current = evaluator.unwrap_generation_output
    if getattr(current, "_lmms_sgm_passthrough", False):
        return

    def unwrap_generation_output(output):
        if is_loglikelihood_result(output):
            return tuple(output), None
        return current(output)

    unwrap_generation_output._lmms_sgm_passthrough = True
    unwrap_generation_output.__wrapped__ = current
    evaluator.unwrap_generation_output = unwrap_generation_output


def is_loglikelihood_result(output) -> bool:
    import numpy as np

    return (
        isinstance(output, (tuple, list))
        and len(output) == 2
        and isinstance(output[0], numbers.Real)
        and not isinstance(output[0], (bool, np.bool_))
        and isinstance(output[1], (bool, np.bool_))
    )


# ---------------------------------------------------------------- the model


class SGM(lmms):
    """A multimodal model of any supported family wearing safety glasses (or not, with
    ``sgm=off``), for lmms-eval."""

    is_simple = True

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> SGM:
        """lmms-eval passes ``--batch_size`` (default 1) beside ``--model_args``; its base class then
        fails with a bare TypeError when model_args holds ``batch_size`` too. Here model_args wins
        over the CLI default, and two different explicit values are an error that says so."""
        from lmms_eval import utils

        args = utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        if "batch_size" in args and "batch_size" in extra:
            cli = extra.pop("batch_size")
            if str(cli) not in ("1", str(args["batch_size"])):
                raise ValueError(f"batch_size given twice: {args['batch_size']!r} in --model_args and {cli!r} by "
                                 "--batch_size; keep one")
        both = sorted(set(args) & set(extra))
        if both:
            raise ValueError(f"{', '.join(both)} given both in --model_args and as a command-line option; keep one")
        return cls(**args, **extra)

    def __init__(self, **kwargs) -> None:
        super().__init__()
        # lmms-eval's CLI adds batch_size (always), device and max_batch_size (when given).
        max_batch_size = kwargs.pop("max_batch_size", None)
        if str(kwargs.get("batch_size", "1")).startswith("auto"):
            raise ValueError(
                f"{MODEL_NAME} has no automatic batch size (got batch_size={kwargs['batch_size']!r}); "
                "pass a number: --batch_size 4"
            )
        if max_batch_size is not None:
            logger.info(f"{MODEL_NAME}: max_batch_size={max_batch_size} ignored (it only applies to batch_size=auto)")
        self.args, self.profile_options, self.selection = parse_model_args(kwargs)
        install_loglikelihood_passthrough()

        args = self.args
        device = self._join_processes(args.device)
        if args.is_remote:  # the weights stay on the NDIF server (or, remote=local, are loaded here)
            from lmms_sgm import remote

            self._remote_model, self.processor = remote.load(args.pretrained, args, device=device, dtype=args.dtype)
            self._model = models.unwrap(self._remote_model)
        else:
            self._model, self.processor = models.load(args.pretrained, device=device, dtype=args.dtype)
        self._adapter = adapter_for(self._model)
        self.tokenizer = self.processor.tokenizer
        # Batched generation needs left padding (loglikelihood pads on the right, per call).
        self.tokenizer.padding_side = "left"
        if getattr(self.processor, "chat_template", None) is None:
            raise ValueError(f"the processor of {args.pretrained} has no chat template; {MODEL_NAME} formats every prompt with it")
        self.batch_size = args.batch_size
        self._device = torch.device("cpu" if args.is_remote or device == "auto" else device)

        self._handle = None
        self._warned: set = set()
        self.glasses = None
        self.defenses = Stack.from_spec(args.defenses, args.defense_args)
        info = {"sgm": args.sgm, "pretrained": args.pretrained, "strength": args.strength, "mode": args.mode}
        if self.defenses:
            info["defenses"] = self.defenses.identity()
        if args.is_remote:
            info["remote"] = "local" if args.remote == "local" else "ndif"  # which server is not a result
        if args.sgm:
            from lmms_sgm.interventions.wearing import wear

            glasses, source = self._get_glasses()
            self.glasses = glasses
            target = self._remote_model if args.is_remote else self._model
            self._handle = wear(target, glasses, args.mode, args.strength, processor=self.processor,
                                remote=args if args.is_remote else None)
            info.update(glasses=source, glasses_digest=glasses.digest(), **glasses.identity())
            self._runner = self._handle.model
        elif args.is_remote:
            from lmms_sgm.remote import RemoteGlasses

            self._handle = RemoteGlasses(None, self._remote_model, ApplyOptions(args.strength, args.mode), args)
            self._runner = self._remote_model
        elif args.mode == "nnsight":
            from lmms_sgm.interventions.wearing import as_generator

            self._runner = as_generator(self._model, self.processor)  # same path, no edit
        else:
            self._runner = self._model
        self.sgm_info = info
        run_info.publish(info)  # our tasks write it into results.json as the `sgm` metric
        logger.info(f"{MODEL_NAME}: " + json.dumps(info, sort_keys=True))

    def _join_processes(self, device: str) -> str:
        """Under ``accelerate launch`` / ``torchrun`` (lmms-eval's multi-process evaluation) each
        process serves its share of the requests, as lmms-eval's own models do: the rank and the
        number of processes come from accelerate, and ``device=cuda`` means this process's GPU."""
        from accelerate import Accelerator

        self.accelerator = Accelerator()
        self._rank = self.accelerator.process_index
        self._world_size = self.accelerator.num_processes
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and self._world_size != launched:
            raise RuntimeError(
                f"launched as {launched} processes, but accelerate joined {self._world_size}: on CPU set "
                "ACCELERATE_USE_CPU=1 (and launch with `accelerate launch --multi_gpu --num_processes N` or torchrun: "
                "`accelerate launch --cpu` starts one process)")
        if self._world_size > 1:
            if device == "cuda":
                return f"cuda:{self.accelerator.local_process_index}"
            if device.startswith("cuda:") or device == "auto":
                raise ValueError(f"device={device} under {self._world_size} processes: each process takes its own GPU; "
                                 "give device=cuda, or run one process with device=auto to spread one model over GPUs")
        return device

    # ------------------------------------------------------------ glasses

    def _get_glasses(self):
        from lmms_sgm.interventions.base import load_glasses
        from lmms_sgm.interventions.errors import GlassesMismatch

        args = self.args
        if args.profile_data:
            glasses, source = self._cached_glasses()
        else:
            path = Path(args.glasses).expanduser()
            if not path.is_dir():
                raise FileNotFoundError(
                    f"glasses={args.glasses}: no such directory; build glasses with "
                    f"`lmms-sgm profile --model {args.pretrained} --data PAIRS --out DIR`, or pass profile_data=PAIRS"
                )
            glasses, source = load_glasses(path), str(path)
            if self.selection is not None and not glasses.has_experts:
                raise ValueError(f"select_* options re-select SGM experts; glasses={args.glasses} are {glasses.kind} "
                                 "glasses, which have none: drop the select_* options")
            if self.selection is not None:
                glasses = glasses.reselect(self.selection)
                source += f" (reselected: {json.dumps(to_dict(self.selection), sort_keys=True)})"
        try:
            glasses.check(self._model)
        except GlassesMismatch as e:
            raise GlassesMismatch(
                f"glasses {source} do not fit {args.pretrained}: {e}; or pass profile_data=PAIRS to build glasses for this model"
            ) from None
        return glasses, source

    def _cached_glasses(self):
        """Glasses built from ``profile_data``, cached by fingerprint, data digest and options."""
        from lmms_sgm.data import load_pairs
        from lmms_sgm.interventions.base import FORMAT_VERSION, load_glasses

        pairs = load_pairs(self.args.profile_data)
        key_material = {
            "fingerprint": models.fingerprint(self._model),
            "data": pairs.digest(),
            "profile_options": to_dict(self.profile_options),
            "selection_options": to_dict(self.selection),
            "format_version": FORMAT_VERSION,
            "lmms_sgm_version": __version__,
        }
        key = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode()).hexdigest()[:32]
        path = cache_dir() / key
        if self._world_size > 1:  # process 0 finds or builds them; the others then read the cache
            if self._rank == 0:
                result = self._cached_glasses_at(path, pairs)
            self.accelerator.wait_for_everyone()
            if self._rank != 0:
                self.cache_hit = True
                return load_glasses(path), str(path)
            return result
        return self._cached_glasses_at(path, pairs)

    def _cached_glasses_at(self, path: Path, pairs):
        from lmms_sgm import pipeline
        from lmms_sgm.interventions.base import load_glasses
        from lmms_sgm.interventions.errors import GlassesError

        damaged = None
        try:
            glasses = load_glasses(path)
            self.cache_hit = True
            logger.info(f"{MODEL_NAME}: glasses for {self.args.profile_data} found in the cache: {path}")
            return glasses, str(path)
        except FileNotFoundError:
            pass
        except GlassesError as e:  # a damaged entry is rebuilt and replaced
            damaged = e
            logger.warning(f"{MODEL_NAME}: the cached glasses are damaged and will be rebuilt: {e}")
        self.cache_hit = False
        logger.info(f"{MODEL_NAME}: building glasses from {self.args.profile_data} (cached at {path})")
        model = self._remote_model if self.args.is_remote else self._model
        execution = ExecutionOptions(remote=self.args.remote, remote_retries=self.args.remote_retries,
                                     remote_max_mb=self.args.remote_max_mb, checkpoint_dir="off")
        glasses = pipeline.build_glasses(model, self.processor, pairs, self.profile_options, self.selection,
                                         execution=execution)
        try:
            glasses.save(path, overwrite=damaged is not None)
        except FileExistsError as e:
            try:  # most likely another process built the same glasses meanwhile
                glasses = load_glasses(path)
            except (FileNotFoundError, GlassesError):
                logger.warning(f"{MODEL_NAME}: glasses not cached ({e}); using the ones just built")
        return glasses, str(path)

    # ------------------------------------------------------------ lmms-eval plumbing

    @property
    def model(self):
        return self._model

    @property
    def device(self):
        return self._device

    def clean(self):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        super().clean()

    def _doc(self, task, split, doc_id):
        return self.task_dict[task][split][doc_id]

    def _visuals(self, doc_to_visual, task, split, doc_id) -> list:
        """What the task's ``doc_to_visual`` gives (images, image or video paths), as a flat list."""
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self._doc(task, split, doc_id))
        if visuals is None:
            return []
        if not isinstance(visuals, (list, tuple)):
            visuals = [visuals]
        return [v for item in visuals for v in (item if isinstance(item, (list, tuple)) else [item])]

    def _prompt(self, context: str, visuals: list, system: str | None = None) -> prompting.Prompt:
        """One user turn in the model's chat template: the visuals at the task's placeholders
        (``<image 1>``, ``<image>``) or before the text; ready for the answer (lmms_sgm.prompting)."""
        try:
            return prompting.request_prompt(self.processor, context, visuals, system)
        except TypeError as e:
            raise TypeError(f"{MODEL_NAME}: {e}") from None

    def _request_prompt(self, context: str, visuals: list) -> tuple[Request, prompting.Prompt]:
        """The request after every defense's ``prepare`` (e.g. a system turn), and its prompt."""
        req = self.defenses.prepare(Request(context, tuple(visuals)))
        return req, self._prompt(req.text, list(req.visuals), req.system)

    def _batch_key(self, prompt: prompting.Prompt) -> int:
        """Requests of one key may share a batch: any, but for a family whose rows see how many
        images their batch-mates hold (Mllama, ``ArchAdapter.batch_by_image_count``) only those
        with one number of images."""
        return len(prompt.images) if self._adapter.batch_by_image_count else 0

    def _encode(self, texts: list[str], images: list[list], videos: list[list], padding_side: str):
        """A padded batch; ``images[i]`` / ``videos[i]`` are row i's, in the order of its items."""
        enc = prompting.encode(self.processor, texts, images, videos, padding_side=padding_side)
        return prompting.to_model(enc, self._model)

    def _forward_logits(self, enc) -> torch.Tensor:
        if self.args.mode == "nnsight":
            runner = self._runner
            with _edited_modules_ran(self._handle, enc), runner.trace(**enc):
                logits = runner.output.logits.save()
            return logits
        return self._runner(**enc).logits

    def _generate(self, enc, gen: dict) -> torch.Tensor:
        if self.args.is_remote:
            return self._handle.generate(enc, **gen)
        if self.args.mode == "nnsight":
            runner = self._runner
            with _edited_modules_ran(self._handle, enc), runner.generate(**enc, **gen) as tracer:
                out = tracer.result.save()
            return out
        return self._runner.generate(**enc, **gen)

    # ------------------------------------------------------------ requests

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(loss, is_greedy) per request: loss is the mean negative log-likelihood of the
        continuation's tokens given the image(s) and the context, under the chat template (lower
        is better; lmms-eval's multiple choice takes the argmin), as lmms-eval's llava_hf does."""
        items = []
        for req in requests:
            args = req.args
            if len(args) == 2:  # lmms-eval's unconditional requests (acc_mutual_info): no doc, no image
                context, target = args
                visuals = []
            else:
                context, target, doc_to_visual, doc_id, task, split = args
                if not isinstance(target, str):  # plain loglikelihood tasks pass doc_to_target
                    target = target(self._doc(task, split, doc_id))
                visuals = self._visuals(doc_to_visual, task, split, doc_id)
            items.append((self._request_prompt(context, visuals)[1], str(target)))

        keys = [self._batch_key(prompt) for prompt, _ in items]
        order = sorted(range(len(items)), key=lambda i: (keys[i], -len(items[i][0].text + items[i][1])))
        results: list = [None] * len(items)
        pbar = tqdm(total=len(items), disable=self.rank != 0, desc=f"{MODEL_NAME} loglikelihood")
        for batch in batched(order, keys, self.batch_size):
            for i, res in zip(batch, self._loglikelihood_batch([items[i] for i in batch])):
                results[i] = res
            pbar.update(len(batch))
        pbar.close()
        return results

    @torch.inference_mode()
    def _loglikelihood_batch(self, items):
        texts = [prompt.text + target for prompt, target in items]
        images, videos = [p.images for p, _ in items], [p.videos for p, _ in items]
        # Right padding: every sequence keeps the positions it has alone (for any family, without
        # position_ids), and causal attention keeps the pads out of it. Losses equal the request's
        # own bit for bit with eager attention; sdpa's CPU kernel changes the low bits (~1e-7) of a
        # row's last positions with the padded length (tests/test_lmms_model.py).
        enc = self._encode(texts, images, videos, "right")
        if self.args.is_remote:
            # Scored on the server: only each next token's log-probability and argmax flag travel back.
            token_logprobs, token_greedy = self._handle.token_scores(enc)
        else:
            logits = self._forward_logits(enc).float()
        out = []
        for row, (prompt, target) in enumerate(items):
            n_context = self._encode([prompt.text], [prompt.images], [prompt.videos], "right")["input_ids"].shape[1]
            length = int(enc["attention_mask"][row].sum())
            tokens = enc["input_ids"][row, n_context:length]
            if tokens.numel() == 0:
                raise ValueError(f"empty continuation {target!r}: nothing to score after the context")
            if self.args.is_remote:
                logprobs = token_logprobs[row, n_context - 1 : length - 1]
                greedy = bool(token_greedy[row, n_context - 1 : length - 1].all())
            else:
                step_logits = logits[row, n_context - 1 : length - 1]
                logprobs = torch.log_softmax(step_logits, dim=-1).gather(-1, tokens[:, None])[:, 0]
                greedy = bool((step_logits.argmax(-1) == tokens).all())
            out.append((float(-logprobs.mean()), greedy))
        return out

    def generate_until(self, requests: list[Instance]) -> list[str]:
        items, asked = [], []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            visuals = self._visuals(doc_to_visual, task, split, doc_id)
            gen, until = self._generation_settings(gen_kwargs or {})
            request, prompt = self._request_prompt(context, visuals)
            group = (json.dumps(gen, sort_keys=True, default=str), self._batch_key(prompt))
            items.append((prompt, gen, until, group))
            asked.append(request)

        # Batches hold requests of one group (same generation settings), longest first; the
        # results go back in request order, each cut at its own stop strings (lmms-eval hands the
        # requests of all tasks at once: two tasks may share settings but not stop strings).
        order = sorted(range(len(items)), key=lambda i: (items[i][3], -len(items[i][0].text)))
        results: list = [None] * len(items)
        pbar = tqdm(total=len(items), disable=self.rank != 0, desc=f"{MODEL_NAME} generate_until")
        for batch in batched(order, [item[3] for item in items], self.batch_size):
            prompts = [items[i][0] for i in batch]
            for i, text in zip(batch, self._generate_batch(prompts, items[batch[0]][1])):
                results[i] = truncate(text, items[i][2])
            pbar.update(len(batch))
        pbar.close()
        if self.defenses.reviews:
            results = self._review(asked, results)
        return results

    def _review(self, asked: list[Request], answers: list[str]) -> list[str]:
        """Every defense's review of the answers (self-check, output filter); what they did is
        added to the run's ``sgm`` record."""
        answers, by = self.defenses.review(_DefenseGenerator(self), asked, answers)
        self.sgm_info["defense_stats"] = self.defenses.stats()
        run_info.publish(self.sgm_info)
        replaced = sum(b is not None for b in by)
        logger.info(f"{MODEL_NAME}: defenses replaced {replaced} of {len(by)} answers: {json.dumps(self.defenses.stats())}")
        return answers

    @torch.inference_mode()
    def _generate_batch(self, prompts: list[prompting.Prompt], gen) -> list[str]:
        enc = self._encode([p.text for p in prompts], [p.images for p in prompts], [p.videos for p in prompts], "left")
        out = self._generate(enc, gen)
        new_tokens = out[:, enc["input_ids"].shape[1] :]
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

    def _generation_settings(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        gen_kwargs = dict(gen_kwargs)
        until = gen_kwargs.pop("until", None)
        if until is None:
            until = []
        elif isinstance(until, str):
            until = [until]
        elif not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
            raise ValueError(f"gen_kwargs['until'] must be a string or a list of strings, got {until!r}")
        ignored = tuple(sorted(set(gen_kwargs) - set(GEN_KEYS) - IGNORED_GEN_KEYS))
        if ignored and ignored not in self._warned:
            self._warned.add(ignored)
            logger.warning(f"{MODEL_NAME}: generation kwargs {list(ignored)} are not used")
        temperature = gen_kwargs.get("temperature")
        do_sample = gen_kwargs.get("do_sample")
        temperature = (1.0 if do_sample else 0.0) if temperature is None else float(temperature)
        do_sample = temperature > 0 if do_sample is None else bool(do_sample)
        if temperature == 0:
            do_sample = False  # temperature 0 means greedy
        tok = self.tokenizer
        gen = {
            "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
            "do_sample": do_sample,
            "num_beams": int(gen_kwargs.get("num_beams") or 1),
            "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        }
        if do_sample:
            gen["temperature"] = temperature
            if gen_kwargs.get("top_p") is not None:
                gen["top_p"] = float(gen_kwargs["top_p"])
            if gen_kwargs.get("top_k") is not None:
                gen["top_k"] = int(gen_kwargs["top_k"])  # 0: no top-k cut (HF's default is 50)
        return gen, [u for u in until if u]

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(
            f"{MODEL_NAME} does not implement generate_until_multi_round; use single-round "
            "(generate_until or multiple_choice) tasks"
        )


SGMLlava = SGM  # the first name (sgm_llava), kept for code that imports it


class _DefenseGenerator:
    """What a defense's review may ask: greedy answers of the same model, wearing the same glasses,
    through the same prompts and batching as the task's requests (lmms_sgm.defenses.Generator)."""

    def __init__(self, model: SGM):
        self.model = model

    def generate(self, requests, max_new_tokens: int) -> list[str]:
        m = self.model
        prompts = [m._prompt(r.text, list(r.visuals), r.system) for r in requests]
        gen, _ = m._generation_settings({"max_new_tokens": max_new_tokens, "temperature": 0})
        keys = [m._batch_key(p) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: (keys[i], -len(prompts[i].text)))
        out: list = [None] * len(prompts)
        for batch in batched(order, keys, m.batch_size):
            for i, text in zip(batch, m._generate_batch([prompts[i] for i in batch], gen)):
                out[i] = text
        return out


@contextlib.contextmanager
def _edited_modules_ran(handle, enc):
    """An nnsight edit needs every module it edits to run. Mllama skips its cross-attention layers
    for a batch without images (in hooks and fold modes they are then simply not changed): say so."""
    from nnsight.intervention.interleaver import OutOfOrderError

    try:
        yield
    except OutOfOrderError as e:
        if handle is None or "pixel_values" in enc:
            raise
        raise ValueError(f"{MODEL_NAME}: mode=nnsight cannot run this batch: it holds no image, so the model skipped "
                         f"layers the glasses edit (Mllama's cross-attention layers; nnsight: {e}). Use mode=hooks or "
                         "mode=fold, which leave a skipped layer alone, for tasks with text-only requests") from None


def batched(order: list[int], keys: list, size: int) -> list[list[int]]:
    """``order`` cut into runs of at most ``size`` requests that share one key."""
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < size and keys[batches[-1][0]] == keys[i]:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def truncate(text: str, until: list[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string."""
    cut = len(text)
    for stop in until:
        at = text.find(stop)
        if at != -1:
            cut = min(cut, at)
    return text[:cut]
