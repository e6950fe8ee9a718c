"""Shared fixtures: one tiny LLaVA checkpoint and one toy pair dataset per test session.

Everything is built offline: ``build_tiny_llava`` saves a random-init LLaVA with
``save_pretrained`` and ``lmms_sgm.models.load`` reads it back through ``from_pretrained``,
exactly as a Hub checkpoint is read.
"""
from __future__ import annotations

import faulthandler
import sys
import warnings

import pytest
import torch

from lmms_sgm import data, models, tiny

N_PAIRS = 20  # 10 toxic, 10 non-toxic (write_toy_pairs alternates labels)

warnings.filterwarnings("ignore", message=r".*requires torchvision.*")

# The models here are tiny: one intra-op thread is as fast, and it does not spin-wait (and slow
# down tenfold) when the machine's two cores are shared with another job.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny LLaVA (2-layer CLIP tower, 2-layer Llama, hidden 32, intermediate 64) on disk."""
    return tiny.build_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture(scope="session")
def model_and_processor(tiny_dir):
    """The tiny model loaded once. Tests that change a model load their own (``load_model``)."""
    model, processor = models.load(str(tiny_dir))
    return model, processor


@pytest.fixture(scope="session")
def load_model(tiny_dir):
    """A factory for fresh, private copies of the tiny model (loading takes ~0.1 s)."""

    def _load():
        return models.load(str(tiny_dir))

    return _load


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A tiny text-only Llama causal LM (2 layers, hidden 32, intermediate 64) on disk."""
    return tiny.build_tiny_causal_lm(tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture(scope="session")
def toy_texts(tmp_path_factory):
    """Path to toy labelled texts without images (AurA's text-only profiling data)."""
    return tiny.write_toy_texts(tmp_path_factory.mktemp("toy_texts"), N_PAIRS)


@pytest.fixture(scope="session")
def toy_jsonl(tmp_path_factory):
    """Path to the toy JSONL (images in images/ beside it)."""
    return tiny.write_toy_pairs(tmp_path_factory.mktemp("toy_pairs"), N_PAIRS)


@pytest.fixture(scope="session")
def toy_pairs(toy_jsonl):
    return data.load_pairs(toy_jsonl)


TEST_TIMEOUT_S = 180


@pytest.fixture(autouse=True)
def _watchdog():
    """A hung test (e.g. an nnsight step loop that never ends) kills the run with a traceback
    instead of hanging CI forever."""
    faulthandler.dump_traceback_later(TEST_TIMEOUT_S, exit=True, file=sys.stderr)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(autouse=True)
def _shared_model_untouched(request):
    """Fail any test that leaves the shared session model changed (weights, hooks)."""
    if "model_and_processor" not in request.fixturenames:
        yield
        return
    model, _ = request.getfixturevalue("model_and_processor")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    yield
    after = model.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert not changed, f"test changed the shared model's weights: {changed[:3]}"
    assert not _foreign_hooks(model), f"test left hooks on the shared model: {_foreign_hooks(model)[:3]}"


def _foreign_hooks(model) -> list[str]:
    """Modules carrying forward (pre-)hooks other than transformers' own output-capturing ones,
    which transformers installs on the vision tower at the first forward pass."""
    out = []
    for name, module in model.named_modules():
        for hook in [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]:
            if not getattr(hook, "__module__", "").startswith("transformers."):
                out.append(f"{name}: {getattr(hook, '__qualname__', hook)}")
    return out


# ---------------------------------------------------------------- one tiny checkpoint per family

# The families beside LLaVA-1.5 (tests/test_families*.py); LLaVA-1.5 is tiny_dir above.
FAMILIES = ("llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics3", "gemma3", "mllama")


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    """``family_dir(name)``: that family's tiny checkpoint (lmms_sgm.tiny_families), built once
    per session, saved like a Hub checkpoint."""
    from lmms_sgm import tiny_families

    built: dict = {}

    def get(family: str):
        if family not in built:
            built[family] = tiny_families.build(family, tmp_path_factory.mktemp(f"tiny_{family}"))
        return built[family]

    return get
