"""Resumable profiling (lmms_sgm/checkpoint.py), in process: an interrupted run resumes to the
glasses an uninterrupted run writes; a checkpoint of another run is refused.

The reference is a plain build without any checkpoint. Interruptions are injected by making the
N-th traced batch raise, as a crash there would; a real SIGKILL of the CLI is in
tests/test_distributed.py.
"""
from __future__ import annotations

import json

import pytest
import torch

from lmms_sgm import models, profiling
from lmms_sgm.checkpoint import KEY_FILE, Checkpoint, CheckpointError, default_dir
from lmms_sgm.options import ExecutionOptions, ProfileOptions, SelectionOptions
from lmms_sgm.pipeline import build_glasses
from lmms_sgm.tiny import build_tiny_llava, write_toy_pairs

OPTIONS = ProfileOptions(batch_size=2, pooling="max")


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def reference(model_and_processor, toy_jsonl, tmp_path_factory):
    model, processor = model_and_processor
    out = tmp_path_factory.mktemp("ref") / "glasses"
    build_glasses(model, processor, toy_jsonl, OPTIONS, SelectionOptions(), out=out, progress=False,
                  execution=ExecutionOptions(checkpoint_dir="off"))
    return out


def count_traces(monkeypatch, fail_at: int | None = None) -> list[int]:
    """Count traced batches; raise on the ``fail_at``-th (a crash mid-run)."""
    calls = [0]
    trace = profiling._trace_batch

    def traced(*args, **kwargs):
        calls[0] += 1
        if calls[0] == fail_at:
            raise Interrupted(f"batch call {fail_at}")
        return trace(*args, **kwargs)

    monkeypatch.setattr(profiling, "_trace_batch", traced)
    return calls


def batches_of(directory) -> list[str]:
    return sorted(p.name for p in directory.glob("batch-*.safetensors"))


def same_files(a, b) -> bool:
    return all((a / name).read_bytes() == (b / name).read_bytes() for name in ("manifest.json", "glasses.safetensors"))


def interrupt(model_and_processor, data, out, monkeypatch, fail_at=4, options=OPTIONS):
    model, processor = model_and_processor
    count_traces(monkeypatch, fail_at)
    with pytest.raises(Interrupted):
        build_glasses(model, processor, data, options, SelectionOptions(), out=out, progress=False)
    monkeypatch.undo()
    return default_dir(out)


def test_an_interrupted_run_resumes_to_the_same_glasses_tracing_only_what_is_missing(
        model_and_processor, toy_jsonl, reference, tmp_path, monkeypatch):
    model, processor = model_and_processor
    out = tmp_path / "glasses"
    ckpt = interrupt(model_and_processor, toy_jsonl, out, monkeypatch, fail_at=4)
    assert not out.exists()  # the output is written whole or not at all
    done = batches_of(ckpt)
    assert len(done) == 3 and (ckpt / KEY_FILE).is_file()
    total = json.loads((ckpt / KEY_FILE).read_text())["batches"]["count"]

    calls = count_traces(monkeypatch)
    build_glasses(model, processor, toy_jsonl, OPTIONS, SelectionOptions(), out=out, progress=False,
                  execution=ExecutionOptions(resume=True))
    assert calls[0] == total - len(done)  # nothing traced twice, nothing skipped
    assert same_files(out, reference)
    assert not ckpt.exists()  # deleted once the glasses are written


def test_without_resume_an_existing_checkpoint_is_refused_and_kept(model_and_processor, toy_jsonl, tmp_path, monkeypatch):
    model, processor = model_and_processor
    out = tmp_path / "glasses"
    ckpt = interrupt(model_and_processor, toy_jsonl, out, monkeypatch)
    before = batches_of(ckpt)
    with pytest.raises(CheckpointError, match=r"interrupted run \(3 of \d+ batches done\): pass --resume"):
        build_glasses(model, processor, toy_jsonl, OPTIONS, SelectionOptions(), out=out, progress=False)
    assert batches_of(ckpt) == before


@pytest.fixture(scope="module")
def other_seed_dir(tmp_path_factory):
    """The tiny LLaVA of the shared fixture's config (same shapes, same fingerprint), other weights."""
    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava_seed1"), seed=1)


@pytest.mark.parametrize("change, message", [
    ("data", "data differ: digest"),
    ("options", "profiling options differ: pooling"),
    ("batch_size", "profiling options differ: batch_size"),
    ("model", "model config differ: config_digest"),
    ("weights", r"model weights differ: [0-9a-f]{12}\.\.\. -> [0-9a-f]{12}\.\.\."),
    ("one_weight", "model weights differ"),
    ("float64", "model dtype differ: torch.float32 -> torch.float64"),
    ("bfloat16", "model dtype differ: torch.float32 -> torch.bfloat16"),
    ("chat_template", r"processor \(tokenizer, chat template or image processor\) differ"),
    ("image_processor", r"processor \(tokenizer, chat template or image processor\) differ"),
    ("software", "software versions differ: transformers 5"),
])
def test_resume_with_other_data_model_or_options_is_refused(change, message, model_and_processor, load_model, toy_jsonl,
                                                             other_seed_dir, tmp_path, monkeypatch):
    out = tmp_path / "glasses"
    ckpt = interrupt(model_and_processor, toy_jsonl, out, monkeypatch)
    model, processor = model_and_processor
    data, options = toy_jsonl, OPTIONS
    if change == "data":
        data = write_toy_pairs(tmp_path / "other_data", n=20, seed=1)
    elif change == "options":
        options = ProfileOptions(batch_size=2, pooling="mean")
    elif change == "batch_size":
        options = ProfileOptions(batch_size=4, pooling="max")
    elif change == "model":
        model, processor = load_model()
        model.config.text_config.rms_norm_eps = 1e-5  # another config, same shapes
    elif change == "weights":  # same config, another seed: the fingerprint alone cannot tell them apart
        model, processor = models.load(str(other_seed_dir))
        assert models.fingerprint(model) == models.fingerprint(model_and_processor[0])
    elif change == "one_weight":  # one value of one late tensor (e.g. glasses baked into the weights)
        model, processor = load_model()
        with torch.no_grad():
            model.model.language_model.layers[-1].mlp.down_proj.weight[5, 7] += 0.25
    elif change in ("float64", "bfloat16"):  # the checkpoint's batches were computed in float32
        model, processor = load_model()
        model.to(getattr(torch, change))
    elif change == "chat_template":  # other token ids for the same records, same config and weights
        model, processor = load_model()
        processor.chat_template = processor.chat_template.replace("USER: ", "USER: USER: ")
    elif change == "image_processor":  # other pixels for the same images
        model, processor = load_model()
        processor.image_processor.image_mean = [0.5, 0.5, 0.5]
    else:  # another transformers: its forward may compute other numbers
        import transformers
        monkeypatch.setattr(transformers, "__version__", "5.0.0.dev-other")
    with pytest.raises(CheckpointError, match=message):
        build_glasses(model, processor, data, options, SelectionOptions(), out=out, progress=False,
                      execution=ExecutionOptions(resume=True))
    assert len(batches_of(ckpt)) == 3 and not out.exists()


def test_a_damaged_or_half_written_batch_is_done_again(model_and_processor, toy_jsonl, reference, tmp_path, monkeypatch):
    model, processor = model_and_processor
    out = tmp_path / "glasses"
    ckpt = interrupt(model_and_processor, toy_jsonl, out, monkeypatch)
    total = json.loads((ckpt / KEY_FILE).read_text())["batches"]["count"]
    first = ckpt / batches_of(ckpt)[0]
    first.write_bytes(first.read_bytes()[:100])  # truncated (e.g. a power loss)
    (ckpt / "batch-000099.safetensors.tmp").write_bytes(b"cut short")
    calls = count_traces(monkeypatch)
    with pytest.warns(UserWarning, match="is damaged"):
        build_glasses(model, processor, toy_jsonl, OPTIONS, SelectionOptions(), out=out, progress=False,
                      execution=ExecutionOptions(resume=True))
    assert calls[0] == total - 2  # the two good batches were kept, the damaged one done again
    assert same_files(out, reference) and not ckpt.exists()


def test_resume_without_a_checkpoint_starts_from_the_beginning(model_and_processor, toy_jsonl, reference, tmp_path):
    model, processor = model_and_processor
    out = tmp_path / "glasses"
    with pytest.warns(UserWarning, match="nothing to resume"):
        build_glasses(model, processor, toy_jsonl, OPTIONS, SelectionOptions(), out=out, progress=False,
                      execution=ExecutionOptions(resume=True))
    assert same_files(out, reference) and not default_dir(out).exists()


def test_checkpoint_off_writes_nothing_beside_the_output_and_an_explicit_directory_is_used(
        model_and_processor, toy_jsonl, tmp_path, monkeypatch):
    model, processor = model_and_processor
    build_glasses(model, processor, toy_jsonl, OPTIONS, SelectionOptions(), out=tmp_path / "a", progress=False,
                  execution=ExecutionOptions(checkpoint_dir="off"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    count_traces(monkeypatch, fail_at=2)
    with pytest.raises(Interrupted):
        build_glasses(model, processor, toy_jsonl, OPTIONS, SelectionOptions(), out=tmp_path / "b", progress=False,
                      execution=ExecutionOptions(checkpoint_dir=str(tmp_path / "ckpt")))
    assert len(batches_of(tmp_path / "ckpt")) == 1 and not default_dir(tmp_path / "b").exists()


def test_a_run_that_fails_before_any_batch_leaves_no_checkpoint(model_and_processor, toy_jsonl, tmp_path, monkeypatch):
    out = tmp_path / "glasses"
    ckpt = interrupt(model_and_processor, toy_jsonl, out, monkeypatch, fail_at=1)
    assert not ckpt.exists()


def test_a_directory_that_is_not_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not a profiling checkpoint"):
        Checkpoint(tmp_path, resume=True).open({"format": 1})
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_checkpoint_files_hold_rows_and_responses_without_pickle(tmp_path):
    from safetensors.torch import load_file

    from lmms_sgm.sites import Site

    site = Site("s", "s", "output", 0, "up_proj", 3)
    ckpt = Checkpoint(tmp_path / "c")
    ckpt.open({"format": 1})
    ckpt.save(0, [4, 7], {"s": torch.arange(6, dtype=torch.float32).view(2, 3)})
    tensors = load_file(tmp_path / "c" / "batch-000000.safetensors")
    assert tensors["rows"].tolist() == [4, 7] and tensors["s"].shape == (2, 3)
    assert not list((tmp_path / "c").glob("*.tmp"))

    class Store:
        def __init__(self):
            self.written = []

        def write(self, rows, pooled):
            self.written.append((rows, pooled["s"].tolist()))

    store = Store()
    assert ckpt.restore(store, [[4, 7]], [site]) == {0}
    assert store.written == [([4, 7], [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])]
    with pytest.warns(UserWarning, match="not those of batch 0"):  # a file of another plan is not trusted
        assert Checkpoint(tmp_path / "c").restore(Store(), [[4, 8]], [site]) == set()


def test_cli_resume_with_a_model_of_the_same_config_and_other_weights_is_refused(
        tiny_dir, other_seed_dir, toy_jsonl, reference, tmp_path, monkeypatch, capsys):
    """Ctrl-C with one model, --resume with another of the same config (another seed): one line naming
    the weights, exit 2, the checkpoint kept as it was; the same model then resumes to the glasses of
    an uninterrupted run. Without the weights in the key the two models' batches were mixed."""
    from lmms_sgm.cli import main

    out = tmp_path / "glasses"

    def args(model, *extra):
        return ["profile", "--model", str(model), "--data", str(toy_jsonl), "--out", str(out), "--no-progress",
                "--batch-size", "2", "--pooling", "max", *extra]

    calls = [0]
    trace = profiling._trace_batch

    def ctrl_c_at_the_fourth(*a, **k):
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt
        return trace(*a, **k)

    monkeypatch.setattr(profiling, "_trace_batch", ctrl_c_at_the_fourth)
    assert main(args(tiny_dir)) == 130
    monkeypatch.undo()
    ckpt = default_dir(out)
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    assert len(batches_of(ckpt)) == 3
    capsys.readouterr()

    assert main(args(other_seed_dir, "--resume")) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmms-sgm profile: error: cannot resume from "), err
    assert "model weights differ" in lines[0] and "model config" not in lines[0], err  # the weights alone differ
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before and not out.exists()

    assert main(args(tiny_dir, "--resume")) == 0
    assert same_files(out, reference) and not ckpt.exists()


def test_the_weight_digest_reads_every_byte_of_every_tensor(load_model, monkeypatch):
    """weights_digest (the checkpoint key's weights): equal for two loads of one model, whatever the
    slice it reads tensors in; changed by one value anywhere (here in the last slice of a tensor that
    spans many), by another dtype; refused on the meta device, where there are no weights."""
    a, _ = load_model()
    b, _ = load_model()
    digest = models.weights_digest(a)
    assert models.weights_digest(b) == digest and len(digest) == 64
    monkeypatch.setattr(models, "_SLICE", 1000)  # every tensor of 2,048+ values (8 KiB) spans several slices
    assert models.weights_digest(a, workers=1) == digest
    weight = b.model.language_model.layers[0].mlp.up_proj.weight  # [64, 32] float32: 8,192 bytes, 9 slices
    with torch.no_grad():
        weight[-1, -1] = torch.nextafter(weight[-1, -1], torch.tensor(2.0))  # one bit of the last byte slice
    assert models.weights_digest(b) != digest
    with torch.no_grad():
        weight[-1, -1] = a.model.language_model.layers[0].mlp.up_proj.weight[-1, -1]
    assert models.weights_digest(b) == digest
    assert models.weights_digest(b.to(torch.float64)) != digest
    with torch.device("meta"):
        meta = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="meta device"):
        models.weights_digest(meta)


def test_a_remote_models_weights_are_named_by_its_hub_id(model_and_processor):
    """A model served remotely is here on the meta device (no weights to digest): the key names it
    by the Hub id the server deploys; a model loaded here (remote=local, or local runs) by its digest."""
    from types import SimpleNamespace

    with torch.device("meta"):
        meta = torch.nn.Linear(3, 2)
    served = SimpleNamespace(repo_id="llava-hf/llava-1.5-7b-hf")
    remote = ExecutionOptions(remote="http://127.0.0.1:9")
    assert profiling._weights_id(meta, served, remote) == "hub:llava-hf/llava-1.5-7b-hf"
    model, _ = model_and_processor
    digest = models.weights_digest(model)
    assert profiling._weights_id(model, served, ExecutionOptions(remote="local")) == digest
    assert profiling._weights_id(model, served, ExecutionOptions()) == digest
    with pytest.raises(ValueError, match="meta device"):  # a meta model profiled locally is not given a name
        profiling._weights_id(meta, served, ExecutionOptions())


def test_the_weight_digest_of_an_offloaded_model_is_its_weights_digest(load_model):
    """device=auto on a GPU too small offloads layers (accelerate: meta tensors in the model, the
    values in its hooks); the digest reads them there and equals the digest of the model in memory."""
    from accelerate import cpu_offload

    model, _ = load_model()
    digest = models.weights_digest(model)
    offloaded, _ = load_model()
    cpu_offload(offloaded, execution_device=torch.device("cpu"))
    assert any(t.is_meta for t in offloaded.state_dict().values())
    assert models.weights_digest(offloaded) == digest


def test_resume_with_another_attention_implementation_is_refused(model_and_processor, load_model, toy_jsonl, tmp_path,
                                                                  monkeypatch):
    """attention=model profiles with the model's own kernel: a checkpoint made under sdpa is not
    continued under eager (same options, config and weights; other low bits, docs/footguns.md)."""
    options = ProfileOptions(batch_size=2, pooling="max", attention="model")
    out = tmp_path / "glasses"
    ckpt = interrupt(model_and_processor, toy_jsonl, out, monkeypatch, options=options)
    assert json.loads((ckpt / KEY_FILE).read_text())["attention"][""] == "sdpa"
    model, processor = load_model()
    model.set_attn_implementation("eager")
    with pytest.raises(CheckpointError, match=r"attention implementation differ: .*sdpa.* -> .*eager"):
        build_glasses(model, processor, toy_jsonl, options, SelectionOptions(), out=out, progress=False,
                      execution=ExecutionOptions(resume=True))
    assert len(batches_of(ckpt)) == 3 and not out.exists()
