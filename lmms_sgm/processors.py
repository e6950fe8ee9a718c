"""Loading a model's processor, image-only when its video processor cannot be built.

transformers 5.24 builds every part a processor declares. Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision
and SmolVLM declare a video processor, whose classes all require torchvision; without it
``AutoProcessor.from_pretrained`` raises ``ImportError: ...VideoProcessor requires the Torchvision
library`` even for images. The registry's only torchvision wheels are CUDA builds that fail to
import beside CPU torch (docs/footguns.md), so CPU users and our CI have none.

:func:`load_processor` then builds the same processor class without its video processor (image
processor, tokenizer, chat template and the processor's own settings, all read from the
checkpoint as ``from_pretrained`` reads them), with a one-time warning. Images and text work as
before; a video given to it is an error that says why (:func:`require_video`).
"""
from __future__ import annotations

import functools
import inspect
import warnings


class ImageOnlyProcessorWarning(UserWarning):
    """A processor was loaded without its video processor (torchvision is not installed)."""


class VideoUnsupported(ValueError):
    """A video was given to a model or processor that cannot take one here."""


@functools.cache
def image_only_class(cls):
    """``cls`` (a ProcessorMixin subclass with a ``video_processor``) without the video processor.

    transformers reads a processor's parts from its ``__init__`` signature, so a subclass whose
    ``__init__`` does not name ``video_processor`` loads and saves only the image processor and
    the tokenizer (and the processor's own settings); the parent's own ``__init__`` runs with
    ``video_processor=None``. The class keeps its parent's name, so a saved copy still names the
    real processor class."""

    # transformers reads the parts to load and the settings to save from the signature, and the
    # settings it passes on load from the code object: write a real function with the parent's
    # parameters minus video_processor.
    params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name not in ("self", "video_processor")]
    plain = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    var_kw = next((p.name for p in params if p.kind is p.VAR_KEYWORD), None)
    defaults = {p.name: p.default for p in plain if p.default is not p.empty}
    head = ", ".join(["self"] + [f"{p.name}=_defaults[{p.name!r}]" if p.name in defaults else p.name for p in plain]
                     + ([f"**{var_kw}"] if var_kw else []))
    call = ", ".join(["self", "video_processor=None"] + [f"{p.name}={p.name}" for p in plain] + ([f"**{var_kw}"] if var_kw else []))
    namespace = {"_defaults": defaults, "_parent": cls.__init__}
    exec(f"def __init__({head}):\n    _parent({call})\n", namespace)  # names from a signature, not input
    __init__ = namespace["__init__"]
    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__,
                                       "__doc__": cls.__doc__, "image_only": True})


def _torchvision_missing(error: BaseException) -> bool:
    return isinstance(error, ImportError) and "torchvision" in str(error).lower()


def processor_class(source: str, **kwargs):
    """The processor class transformers maps the checkpoint's ``model_type`` to (what AutoProcessor builds)."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    model_type = AutoConfig.from_pretrained(source, **kwargs).model_type
    name = PROCESSOR_MAPPING_NAMES.get(model_type)
    if name is None:
        raise ValueError(f"no processor class is known for model_type={model_type!r}")
    return getattr(transformers, name)


_warned: set[str] = set()


def load_processor(source: str, **kwargs):
    """``AutoProcessor.from_pretrained(source)``, or the processor without its video processor when
    that one needs torchvision (see the module docstring); warns once per processor class."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(source, **kwargs)
    except ImportError as e:
        if not _torchvision_missing(e):
            raise
        reason = str(e).strip().splitlines()[0].split(". ")[0]  # "...VideoProcessor requires the Torchvision library ..."
    cls = processor_class(source, **kwargs)
    if "video_processor" not in cls.get_attributes():
        raise ImportError(f"{cls.__name__} of {source} needs torchvision ({reason}), and it has no video processor to leave out")
    processor = image_only_class(cls).from_pretrained(source, **kwargs)
    if cls.__name__ not in _warned:
        _warned.add(cls.__name__)
        message = (f"{cls.__name__} loaded image-only: its video processor needs torchvision, which is not installed "
                   f"({reason}). Images and text work; videos are refused. Install a torchvision build that matches "
                   "your torch to process videos.")
        warnings.warn(message, ImageOnlyProcessorWarning, stacklevel=2)
        try:
            from loguru import logger

            logger.warning(f"lmms_sgm: {message}")
        except ImportError:  # loguru comes with lmms-eval; the warning alone is enough elsewhere
            pass
    return processor


def require_video(processor, what: str = "this request") -> None:
    """Refuse a video when ``processor`` cannot process one, saying why."""
    if getattr(processor, "video_processor", None) is not None:
        return
    name = type(processor).__name__
    if "video_processor" in type(processor).get_attributes() or getattr(type(processor), "image_only", False):
        why = f"{name} was loaded without its video processor (it needs torchvision, which is not installed)"
    else:
        why = f"{name} has no video processor: this model family takes images only"
    raise VideoUnsupported(f"{what} holds a video, but {why}; give image frames instead, or use another model")
