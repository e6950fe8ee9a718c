"""A kind of glasses from a separate package (tests/kind_plugin: clamp selected units of one module
to a value), pip-installed into the venv from a copy (no network: --no-index --no-deps
--no-build-isolation), is found through its ``lmms_sgm`` entry point without any edit of this
repository: load_glasses, wear in every mode it declares, lmms-eval's ``sgm`` (in-process) and
lm-eval's ``sgm_hf`` (a fresh process) and a ``tune`` grid entry (kind ``glasses``), each against
plain hooks applying the clamp. Uninstalled
at the end."""
from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
import torch

from lmms_sgm import models
from lmms_sgm.interventions import GlassesError, load_glasses, wear
from lmms_sgm.interventions.registry import kinds
from lmms_sgm.options import ProfileOptions
from lmms_sgm.plugins import plugin_manager
from lmms_sgm.sites import resolve_sites

DIST = "lmms-sgm-clamp-kind"
PIP = [sys.executable, "-m", "pip"]
PACKAGE = Path(__file__).parent / "kind_plugin"
UNITS, VALUE, STRENGTH = [1, 4, 6], 2.5, 0.75


def installed() -> bool:
    try:
        distribution(DIST)
        return True
    except PackageNotFoundError:
        return False


SAVED: list[Path] = []  # the clamp glasses written while the package was installed


@pytest.fixture
def clamp_package(tmp_path):
    assert not installed(), f"{DIST} is already installed: a previous run did not clean up"
    src = tmp_path / "pkg"
    shutil.copytree(PACKAGE, src)  # pip builds in the source folder: not in this repository's
    proc = subprocess.run([*PIP, "install", "-q", "--no-index", "--no-deps", "--no-build-isolation", str(src)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    importlib.invalidate_caches()
    plugin_manager.cache_clear()  # entry points are read once per process: read them again
    try:
        yield src
    finally:
        subprocess.run([*PIP, "uninstall", "-y", "-q", DIST], capture_output=True, timeout=300, check=False)
        importlib.invalidate_caches()
        plugin_manager.cache_clear()
        sys.modules.pop("sgm_clamp_kind.kind", None)
        sys.modules.pop("sgm_clamp_kind", None)
    assert not installed()


def test_a_kind_from_another_package_everywhere(clamp_package, tiny_dir, tmp_path):
    """One install for every use: the Python API in each mode, lmms-eval, lm-eval."""
    from sgm_clamp_kind.kind import ClampGlasses

    model, _ = models.load(str(tiny_dir))
    site = next(s for s in resolve_sites(model, ProfileOptions()) if s.kind == "output")
    clamp_dir = ClampGlasses.create(model, site, UNITS, VALUE).save(tmp_path / "glasses")
    SAVED.append(clamp_dir)
    check_python_api(clamp_dir, tiny_dir)
    check_lmms_eval(clamp_dir, tiny_dir)
    check_lm_eval(clamp_dir, tiny_dir, tmp_path)
    check_tune(clamp_dir, tiny_dir, tmp_path)


def test_the_kind_is_gone_after_uninstalling():
    # Runs after the test above (file order): the venv is left as it was, and the glasses it wrote
    # are refused by their kind's name.
    assert not installed() and "clamp" not in kinds()
    with pytest.raises(GlassesError, match=r"unknown glasses kind 'clamp'.*a kind from a plugin needs that plugin installed"):
        load_glasses(SAVED[0])


class Clamp:
    """Plain hooks: the units of the saved site become ``(1 - s) * out + s * value``."""

    def __init__(self, model, path, strength):
        import json

        manifest = json.loads((path / "manifest.json").read_text())
        self.module = model.get_submodule(manifest["site"]["module_path"])
        self.value, self.s = manifest["value"], strength

    def _hook(self, module, args, out):
        out = out.clone()
        out[..., UNITS] = (1 - self.s) * out[..., UNITS] + self.s * self.value
        return out

    def __enter__(self):
        self.handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def check_python_api(clamp_dir, tiny_dir):
    from sgm_clamp_kind.kind import ClampGlasses

    assert kinds()["clamp"] is ClampGlasses
    glasses = load_glasses(clamp_dir)
    assert type(glasses) is ClampGlasses and glasses.modes == ("hooks", "nnsight", "fold", "remote")
    model, processor = models.load(str(tiny_dir))
    enc = processor.tokenizer(["what is this ?", "a longer question about the picture ?"], return_tensors="pt",
                              padding=True)
    with torch.no_grad():
        vanilla = model(**enc).logits
        with Clamp(model, clamp_dir, STRENGTH):
            want = model(**enc).logits
        assert not torch.allclose(want, vanilla, atol=1e-3)
        for mode in ("hooks", "fold"):
            with wear(model, glasses, mode, STRENGTH) as handle:
                torch.testing.assert_close(handle.model(**enc).logits, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(**enc).logits, vanilla, atol=0, rtol=0)  # fold restored exactly


def check_lmms_eval(clamp_dir, tiny_dir):
    from lmms_eval.api.instance import Instance

    from lmms_sgm import tiny
    from lmms_sgm.lmms.model import SGM

    image = tiny.random_image(7)
    task = {"toy": {"test": [{"image": image}] * 2}}
    reqs = [Instance("generate_until", (q, {"max_new_tokens": 5}, lambda d: [d["image"]], i, "toy", "test"), idx=0,
                     metadata={"task": "toy", "doc_id": i, "repeats": 1}) for i, q in enumerate(["what is this ?", "how many ?"])]

    def make(extra):
        lm = SGM.create_from_arg_string(f"pretrained={tiny_dir}{extra}", {"batch_size": "2"})
        lm.task_dict = task
        return lm

    lm = make(f",glasses={clamp_dir},strength={STRENGTH}")
    got = lm.generate_until(reqs)
    assert lm.sgm_info["glasses_digest"] == load_glasses(clamp_dir).digest() and lm.sgm_info["kind"] == "clamp"
    vanilla = make(",sgm=off")
    plain = vanilla.generate_until(reqs)
    with Clamp(vanilla._model, clamp_dir, STRENGTH):
        want = vanilla.generate_until(reqs)
    assert got == want and got != plain


def check_lm_eval(clamp_dir, tiny_dir, tmp_path):
    from lmms_sgm_lm_eval_tasks.sgm_text.core import read_texts

    from test_lm_eval import TASKS_DIR, perplexities, results_of, run_lm_eval

    out = tmp_path / "out"
    proc = run_lm_eval(f"pretrained={tiny_dir},glasses={clamp_dir},strength={STRENGTH},max_length=32", out,
                       {"LMMS_SGM_JUDGE": "lexicon"}, "sgm_text_ppl", limit=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, results, _ = results_of(out)
    got = results["results"]["sgm_text_ppl"]
    assert got["sgm,none"]["glasses_kind"] == "clamp" and got["sgm,none"]["units"] == len(UNITS)
    texts = [d["text"] for d in read_texts(TASKS_DIR / "sample" / "text.txt")[:2]]
    model, processor = models.load(str(tiny_dir))
    with Clamp(model, clamp_dir, STRENGTH):
        want = perplexities(model, processor.tokenizer, texts, 32)
    for metric, value in want.items():
        assert got[f"{metric},none"] == pytest.approx(value, rel=1e-5), metric


def check_tune(clamp_dir, tiny_dir, tmp_path):
    from lmms_sgm import tiny, tune
    from lmms_sgm.evaluate import ValidationSet
    from lmms_sgm.judges import get_judge

    entry = {"name": "clamp", "kind": "glasses", "glasses": str(clamp_dir), "strength": STRENGTH}
    config = tune.Config.from_dict(entry)
    assert config.to_dict() == entry and config.sets() == set()
    model, processor = models.load(str(tiny_dir))
    val = ValidationSet.load(tiny.write_toy_validation(tmp_path / "val", 2))
    judge = get_judge("lexicon")
    result = tune.tune(model, processor, {}, [config], val, judge, samples=1)
    want = tune._measured(model, processor, val, judge, 1, 0, Clamp(model, clamp_dir, STRENGTH))
    assert result.rows["clamp"] == {"experts": 0, **want}
    assert result.glasses["clamp"].digest() == load_glasses(clamp_dir).digest()
