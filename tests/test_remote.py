"""Remote execution (lmms_sgm/remote.py) without internet: nnsight's in-process emulation
(``remote="local"``) and a real HTTP + websocket server on 127.0.0.1 speaking nnsight 0.8.1's
protocol (tests/ndif_server.py, its own process, the tiny model mapped from a Hub id).

References are plain local runs: glasses profiled here, generation and scores in hooks mode.
Remote profiling must give the same glasses bit for bit; suppressed generation the same tokens and
logits within 1e-5; a wrong or missing key, an unreachable host and a failing job clear errors
(exit 2 from the CLI); and the API key must appear in no output, message or file.

The CLI and client-process tests run as a user does: the model named by its Hub id, its config
and processor read from a Hugging Face cache seeded here (no weights), the server and key from
the environment or nnsight's config file. In-process server tests give a locally loaded model the
Hub id instead (``nn_model.repo_id``), which is all a client needs to name the model.
"""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import ndif_server
import remote_client
from lmms_sgm import remote
from lmms_sgm.interventions import SafetyGlasses
from lmms_sgm.options import (
    ExecutionOptions,
    ModelArgs,
    ProfileOptions,
    RemoteOptions,
    SelectionOptions,
)
from lmms_sgm.pipeline import build_glasses

HUB_ID = "tiny-org/tiny-llava"
KEY = "ndif-test-key-" + secrets.token_hex(8)  # unique, so that finding it anywhere means it leaked
OPTIONS = ProfileOptions(batch_size=4, pooling="max")
SELECTION = SelectionOptions(rule="det0", top_k=60)  # strong: they visibly change generations
BIN = Path(sys.executable).parent
OUTPUTS: list[str] = []  # everything the subprocesses printed, checked for the key at the end


@pytest.fixture(scope="module")
def glasses_dir(model_and_processor, toy_jsonl, tmp_path_factory):
    model, processor = model_and_processor
    out = tmp_path_factory.mktemp("remote_ref") / "glasses"
    build_glasses(model, processor, toy_jsonl, OPTIONS, SELECTION, out=out, progress=False)
    return out


@pytest.fixture(scope="module")
def hf_home(tiny_dir, tmp_path_factory):
    """A Hugging Face cache holding HUB_ID's config and processor files, not its weights."""
    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / ("models--" + HUB_ID.replace("/", "--"))
    revision = "0" * 40
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for f in Path(tiny_dir).iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return home


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    proc, url = ndif_server.start({HUB_ID: str(tiny_dir)}, api_key=KEY, log=log)

    def configure(**settings):
        import httpx

        httpx.post(f"{url}/_test/config", json=settings, timeout=10).raise_for_status()

    def requests() -> int:
        import httpx

        return httpx.get(f"{url}/_test/stats", timeout=10).json()["requests"]

    yield SimpleNamespace(url=url, log=log, configure=configure, requests=requests)
    proc.kill()
    proc.wait()


@pytest.fixture
def api_key(monkeypatch):
    """nnsight's configured key, for in-process clients (restored after the test)."""
    from nnsight.schema.config import CONFIG

    monkeypatch.setattr(CONFIG.API, "APIKEY", KEY)
    return KEY


@pytest.fixture
def hub_model(load_model):
    """A client model naming HUB_ID (weights loaded here only so that a test can compare)."""
    hf, processor = load_model()
    nn_model = remote.wrap(hf, processor)
    nn_model.repo_id = HUB_ID
    return nn_model, processor


@pytest.fixture
def no_wait(monkeypatch):
    waits = []
    monkeypatch.setattr(remote, "_sleep", waits.append)
    return waits


def equal_glasses(a: SafetyGlasses, b: SafetyGlasses) -> bool:
    return (a.digest() == b.digest() and all(torch.equal(a.auroc[s.name], b.auroc[s.name]) for s in a.sites)
            and all(torch.equal(a.mean_nontoxic[s.name], b.mean_nontoxic[s.name]) for s in a.sites))


def local_reference(model, processor, glasses):
    """Hooks-mode generation and scores, and the vanilla generation, on the same inputs."""
    gen_inputs = remote_client.inputs(processor, TOY_DATA[0], "left")
    score_inputs = remote_client.inputs(processor, TOY_DATA[0], "right")
    with torch.inference_mode():
        vanilla = model.generate(**gen_inputs, **remote_client.GEN)
        with glasses.apply(model, mode="hooks"):
            worn = model.generate(**gen_inputs, **remote_client.GEN)
            logits = model(**score_inputs).logits[:, :-1].float()
    targets = score_inputs["input_ids"][:, 1:]
    logprobs = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return vanilla, worn, logprobs, logits.argmax(-1) == targets


TOY_DATA: list = []


@pytest.fixture(autouse=True)
def _toy_data(toy_jsonl):
    TOY_DATA[:] = [toy_jsonl]


def assert_matches_hooks(got: dict, reference) -> None:
    vanilla, worn, logprobs, greedy = reference
    assert not torch.equal(worn.sequences, vanilla.sequences) or any(
        not torch.equal(a, b) for a, b in zip(worn.logits, vanilla.logits)), "the glasses change nothing: no test"
    assert torch.equal(got["sequences"], worn.sequences)  # token for token
    assert len(got["logits"]) == len(worn.logits)
    for a, b in zip(got["logits"], worn.logits):
        assert (a - b).abs().max().item() <= 1e-5
    assert (got["logprobs"] - logprobs).abs().max().item() <= 1e-5
    assert torch.equal(got["greedy"], greedy)


# ---------------------------------------------------------------- nnsight's in-process emulation


def test_local_emulation_profiles_the_same_glasses(model_and_processor, toy_jsonl, glasses_dir, monkeypatch):
    from nnsight.intervention.backends.local import LocalSimulationBackend

    calls = []
    run = LocalSimulationBackend.__call__
    monkeypatch.setattr(LocalSimulationBackend, "__call__", lambda self, tracer: (calls.append(1), run(self, tracer))[1])
    model, processor = model_and_processor
    got = build_glasses(model, processor, toy_jsonl, OPTIONS, SELECTION, progress=False,
                        execution=ExecutionOptions(remote="local", checkpoint_dir="off"))
    assert calls  # every batch went through serialisation and back
    assert equal_glasses(got, SafetyGlasses.load(glasses_dir))


def test_local_emulation_wears_glasses_like_hooks(load_model, glasses_dir):
    model, processor = load_model()
    glasses = SafetyGlasses.load(glasses_dir)
    reference = local_reference(model, processor, glasses)
    handle = glasses.apply(model, mode="nnsight", processor=processor, remote="local")
    generated = handle.generate(remote_client.inputs(processor, TOY_DATA[0], "left"), **remote_client.GEN)
    logprobs, greedy = handle.token_scores(remote_client.inputs(processor, TOY_DATA[0], "right"))
    assert_matches_hooks({"sequences": generated.sequences, "logits": generated.logits, "logprobs": logprobs,
                          "greedy": greedy}, reference)
    handle.remove()  # nothing was changed here: the model is the vanilla one
    with torch.inference_mode():
        again = model.generate(**remote_client.inputs(processor, TOY_DATA[0], "left"), **remote_client.GEN)
    assert torch.equal(again.sequences, reference[0].sequences)


def test_strength_zero_remotely_is_the_vanilla_model(load_model, glasses_dir):
    model, processor = load_model()
    glasses = SafetyGlasses.load(glasses_dir)
    vanilla = local_reference(model, processor, glasses)[0]
    handle = glasses.apply(model, strength=0.0, mode="nnsight", processor=processor, remote="local")
    got = handle.generate(remote_client.inputs(processor, TOY_DATA[0], "left"), **remote_client.GEN)
    assert torch.equal(got.sequences, vanilla.sequences)


@pytest.mark.parametrize("mode", ["hooks", "fold"])
def test_modes_that_change_the_local_module_are_refused_remotely(mode, model_and_processor, glasses_dir):
    model, processor = model_and_processor
    with pytest.raises(ValueError, match=f"mode={mode} cannot run remotely.*use mode=nnsight"):
        SafetyGlasses.load(glasses_dir).apply(model, mode=mode, processor=processor, remote="local")
    with pytest.raises(ValueError, match=f"mode={mode} cannot run remotely"):
        ModelArgs(pretrained=HUB_ID, remote="ndif", mode=mode)


def test_model_args_remote_defaults_to_nnsight_mode_and_remote_values_are_checked():
    from lmms_sgm.lmms.model import parse_model_args

    args, _, _ = parse_model_args({"pretrained": HUB_ID, "sgm": False, "remote": "http://127.0.0.1:9"})
    assert args.mode == "nnsight" and args.remote == "http://127.0.0.1:9"
    assert parse_model_args({"pretrained": HUB_ID, "sgm": False, "remote": True})[0].remote == "ndif"
    assert parse_model_args({"pretrained": HUB_ID, "sgm": False})[0].mode == "hooks"
    with pytest.raises(ValueError, match="use off, ndif, local or a server URL"):
        RemoteOptions(remote="ftp://x")


def test_messages_passed_on_never_carry_the_key(api_key):
    """The loopback server never echoes the key; a real one, a proxy or a library might."""
    from nnsight.intervention.backends.remote import RemoteError as NnsightRemoteError

    from lmms_sgm.redaction import REDACTED, redact

    assert "NDIF_API_KEY" not in os.environ  # the key comes from nnsight's config only: no variable names it
    kind, detail = remote.classify(NnsightRemoteError(f"job failed: header ndif-api-key={KEY} rejected"))
    assert kind == "job" and KEY not in detail and f"ndif-api-key={REDACTED} rejected" in detail
    # read once, the key is registered: the repo's one redaction removes it from anything written
    assert redact({"echo": [f"a{KEY}b"]}) == {"echo": [f"a{REDACTED}b"]}


def test_remote_and_checkpoint_errors_are_one_line_exit_2_in_the_cli():
    from lmms_sgm.checkpoint import CheckpointError
    from lmms_sgm.cli import _expected_errors

    for error in (remote.RemoteError, remote.RemoteAuthError, remote.RemoteJobError, CheckpointError):
        assert issubclass(error, _expected_errors()), error


def test_a_local_directory_cannot_be_sent(tiny_dir, model_and_processor):
    with pytest.raises(ValueError, match=r"names the model by its Hub id.*remote=local"):
        remote.load(str(tiny_dir), RemoteOptions(remote="ndif"))
    model, processor = model_and_processor
    with pytest.raises(ValueError, match=r"local directory .* cannot run remotely"), \
            remote.Session(remote.wrap(model, processor), RemoteOptions(remote="http://127.0.0.1:9")):
        pass


# ---------------------------------------------------------------- against the loopback NDIF server


def test_server_profiling_gives_the_local_glasses(server, api_key, hub_model, toy_jsonl, glasses_dir):
    nn_model, processor = hub_model
    before = server.requests()
    got = build_glasses(nn_model, processor, toy_jsonl, OPTIONS, SELECTION, progress=False,
                        execution=ExecutionOptions(remote=server.url, checkpoint_dir="off"))
    assert server.requests() > before  # it did go to the server
    assert equal_glasses(got, SafetyGlasses.load(glasses_dir))


def test_server_batches_are_cut_to_the_size_limit(server, api_key, hub_model, toy_pairs, toy_jsonl, glasses_dir):
    from lmms_sgm.data import encode_batch
    from lmms_sgm.profiling import length_batches, token_lengths

    nn_model, processor = hub_model
    width = sum(s.width for s in SafetyGlasses.load(glasses_dir).sites)
    request = remote.tensor_bytes(encode_batch(processor, [toy_pairs[0]], "response").values()) * 2
    limit = 2.5 * max(width * 4, request) / 2**20  # room for two examples per request, not for four
    expected = len(length_batches(token_lengths(processor, toy_pairs, "response", 4), 2))
    assert expected > len(length_batches(token_lengths(processor, toy_pairs, "response", 4), 4))
    before = server.requests()
    got = build_glasses(nn_model, processor, toy_jsonl, OPTIONS, SELECTION, progress=False,
                        execution=ExecutionOptions(remote=server.url, checkpoint_dir="off", remote_max_mb=limit))
    assert server.requests() - before == expected
    assert equal_glasses(got, SafetyGlasses.load(glasses_dir))


def test_server_generation_and_scores_match_hooks(server, api_key, hub_model, load_model, glasses_dir):
    model, processor = load_model()
    glasses = SafetyGlasses.load(glasses_dir)
    reference = local_reference(model, processor, glasses)
    nn_model, processor = hub_model
    handle = glasses.apply(nn_model, mode="nnsight", processor=processor, remote=server.url)
    generated = handle.generate(remote_client.inputs(processor, TOY_DATA[0], "left"), **remote_client.GEN)
    logprobs, greedy = handle.token_scores(remote_client.inputs(processor, TOY_DATA[0], "right"))
    assert_matches_hooks({"sequences": generated.sequences, "logits": generated.logits, "logprobs": logprobs,
                          "greedy": greedy}, reference)


@pytest.mark.parametrize("kind", ["sgm", "gated_sgm", "gated_steering", "steering"])
def test_server_wears_every_kind_like_the_reference(kind, server, api_key, hub_model, load_model, toy_pairs):
    """The matrix's remote cells through the protocol server (tests/test_interventions_matrix.py
    holds the others): each kind's edits applied inside each trace on the server give the plain-hook
    reference's logits (1e-5) and greedy tokens; steering glasses used to be refused remotely."""
    from lmms_sgm.interventions.wearing import wear
    from test_interventions_matrix import GEN, STRENGTH, Reference, build_kinds

    model, processor = load_model()
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                           tokenize=False, add_generation_prompt=True)
             for q in ("what is this ?", "what do you think of this picture ? is it nice ?")]
    enc = processor(images=[toy_pairs[0].load_image(), toy_pairs[1].load_image()], text=texts, return_tensors="pt",
                    padding=True)
    glasses = build_kinds(model, processor, enc)[kind]
    with Reference(model, glasses, STRENGTH), torch.no_grad():
        want_logits = model(**enc).logits
        want_ids = model.generate(**enc, **GEN)
    nn_model, processor = hub_model
    with wear(nn_model, glasses, "nnsight", STRENGTH, processor=processor, remote=server.url) as handle:
        logits = handle.logits(dict(enc))
        ids = handle.generate(dict(enc), **GEN)
    torch.testing.assert_close(logits.float(), want_logits.float(), atol=1e-5, rtol=0)
    assert torch.equal(ids, want_ids)


def _profile_remotely(hub_model, toy_jsonl, url, retries=0):
    nn_model, processor = hub_model
    return build_glasses(nn_model, processor, toy_jsonl, OPTIONS, SELECTION, progress=False,
                         execution=ExecutionOptions(remote=url, checkpoint_dir="off", remote_retries=retries))


def test_a_wrong_key_is_refused_without_retries_or_the_key_in_the_message(server, hub_model, toy_jsonl, no_wait,
                                                                         monkeypatch, capsys):
    from nnsight.schema.config import CONFIG

    wrong = "wrong-" + KEY
    monkeypatch.setattr(CONFIG.API, "APIKEY", wrong)
    with pytest.raises(remote.RemoteAuthError, match=r"the API key was refused.*set NDIF_API_KEY") as e:
        _profile_remotely(hub_model, toy_jsonl, server.url, retries=3)
    assert not no_wait and wrong not in str(e.value) and KEY not in str(e.value)
    captured = capsys.readouterr()
    assert wrong not in captured.out + captured.err
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    with pytest.raises(remote.RemoteAuthError, match="no API key is configured"):
        _profile_remotely(hub_model, toy_jsonl, server.url)


def test_an_unreachable_host_is_retried_then_named(api_key, hub_model, toy_jsonl, no_wait):
    url = f"http://127.0.0.1:{ndif_server.free_port()}"  # nothing listens there
    with pytest.warns(UserWarning, match="retry [12] of 2"), \
            pytest.raises(remote.RemoteError, match=f"cannot reach the NDIF server {url} after 3 tries") as e:
        _profile_remotely(hub_model, toy_jsonl, url, retries=2)
    assert no_wait == [2.0, 4.0] and KEY not in str(e.value)


def test_a_job_that_fails_on_the_server_says_so(server, api_key, hub_model, toy_jsonl, no_wait):
    server.configure(fail_job="CUDA out of memory (simulated)")
    try:
        with pytest.raises(remote.RemoteJobError, match=r"failed on the NDIF server .*CUDA out of memory") as e:
            _profile_remotely(hub_model, toy_jsonl, server.url, retries=3)
    finally:
        server.configure(fail_job="")
    assert not no_wait and KEY not in str(e.value)


def test_a_transient_server_error_is_retried(server, api_key, hub_model, toy_jsonl, glasses_dir, no_wait):
    server.configure(fail_status=503, fail_times=1)
    with pytest.warns(UserWarning, match="503|Service temporarily unavailable"):
        got = _profile_remotely(hub_model, toy_jsonl, server.url, retries=1)
    assert no_wait == [2.0]
    assert equal_glasses(got, SafetyGlasses.load(glasses_dir))


# ---------------------------------------------------------------- as a user runs it: other processes


def client_env(hf_home, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NDIF_", "NNSIGHT_"))}
    env.update({"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "OMP_NUM_THREADS": "1", "NNSIGHT_CONFIG": str(Path(hf_home) / "no-nnsight-config.yaml")})
    env.update(extra)
    return env


def run(cmd, env) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    OUTPUTS.extend([proc.stdout, proc.stderr])
    return proc


def test_cli_profiles_remotely_with_nnsight_config_file(server, hf_home, toy_jsonl, glasses_dir, tmp_path):
    config = tmp_path / "nnsight.yaml"  # the user's nnsight configuration: where and with which key
    config.write_text(f"API:\n  HOST: {server.url}\n  APIKEY: {KEY}\n")
    out = tmp_path / "glasses"
    cmd = [str(BIN / "lmms-sgm"), "profile", "--model", HUB_ID, "--data", str(toy_jsonl), "--out", str(out),
           "--batch-size", "4", "--pooling", "max", "--rule", "det0", "--top-k", "60", "--remote"]
    try:
        proc = run(cmd, client_env(hf_home, NNSIGHT_CONFIG=str(config)))
    finally:
        config.unlink()  # the one file that holds the key on purpose: the user's own configuration
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("manifest.json", "glasses.safetensors"):  # byte for byte the locally profiled glasses
        assert (out / name).read_bytes() == (glasses_dir / name).read_bytes()


def test_cli_wrong_key_exits_2_with_one_line(server, hf_home, toy_jsonl, tmp_path):
    wrong = "wrong-" + KEY
    cmd = [str(BIN / "lmms-sgm"), "profile", "--model", HUB_ID, "--data", str(toy_jsonl), "--out", str(tmp_path / "g"),
           "--remote", server.url]
    proc = run(cmd, client_env(hf_home, NDIF_API_KEY=wrong))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("lmms-sgm profile: error: NDIF server")
    assert "API key was refused" in proc.stderr and wrong not in proc.stdout + proc.stderr
    assert not (tmp_path / "g").exists() and not list(tmp_path.glob(".g.*"))


def test_cli_offline_without_the_processor_keeps_the_hint(hf_home, toy_jsonl, tmp_path):
    """HF_HUB_OFFLINE=1 and a Hub id whose processor is not cached: the message says what a
    remote model needs here (not only Hugging Face's own offline error)."""
    cmd = [str(BIN / "lmms-sgm"), "profile", "--model", "tiny-org/not-cached", "--data", str(toy_jsonl),
           "--out", str(tmp_path / "g"), "--remote", "http://127.0.0.1:9"]
    proc = run(cmd, client_env(hf_home, NDIF_API_KEY=KEY))  # client_env sets HF_HUB_OFFLINE=1
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("lmms-sgm profile: error: model tiny-org/not-cached: its processor is not in the Hugging "
                           "Face cache"), line
    assert "HF_HUB_OFFLINE" in line and "download them once" in line
    assert not (tmp_path / "g").exists()


def test_cli_refuses_a_local_directory_remotely(tiny_dir, toy_jsonl, tmp_path, capsys):
    from lmms_sgm.cli import main

    assert main(["profile", "--model", str(tiny_dir), "--data", str(toy_jsonl), "--out", str(tmp_path / "g"),
                 "--remote"]) == 2
    assert "names the model by its Hub id" in capsys.readouterr().err


def test_a_client_process_generates_like_hooks(server, hf_home, load_model, glasses_dir, toy_jsonl, tmp_path):
    model, processor = load_model()
    reference = local_reference(model, processor, SafetyGlasses.load(glasses_dir))
    out = tmp_path / "remote.pt"
    cmd = [sys.executable, remote_client.__file__, str(glasses_dir), HUB_ID, str(toy_jsonl), str(out)]
    proc = run(cmd, client_env(hf_home, NDIF_HOST=server.url, NDIF_API_KEY=KEY))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_matches_hooks(torch.load(out, weights_only=False), reference)


def test_cli_diagnoses_through_a_meta_device_client_model(server, hf_home, tiny_dir, tmp_path):
    """A real remote client builds the model on the meta device (no weights here): diagnose must
    neither compute with its tensors nor move inputs there. Its rows equal the local hooks run's
    (the uncached lockstep loop, the remote way) where the client samples; generate samples on
    the server (its own random generator), so those rows are checked for range only."""
    import json

    from lmms_sgm import diagnose, models, tiny
    from lmms_sgm.judges import get_judge

    twins = tiny.write_toy_twins(tmp_path / "twins", 4)
    out = tmp_path / "diag"
    cmd = [str(BIN / "lmms-sgm"), "diagnose", "--model", HUB_ID, "--data", str(twins), "--remote", server.url,
           "--backend", "nnsight", "--samples", "2", "--no-per-layer", "--no-attention", "--out", str(out),
           "--no-progress"]
    before = server.requests()
    proc = run(cmd, client_env(hf_home, NDIF_API_KEY=KEY))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert server.requests() > before
    got = json.loads((out / "diagnosis.json").read_text())
    assert (got["backend"], got["remote"], got["lockstep_cache"]) == ("nnsight", server.url, False)
    model, processor = models.load(str(tiny_dir))
    local = diagnose.diagnose(model, processor, diagnose.read_twins(twins), get_judge("lexicon"), samples=2,
                              per_layer=False, attention=False, lockstep_cache=False)
    assert [r["name"] for r in got["rows"]] == [r["name"] for r in local["rows"]]
    for mine, theirs in zip(got["rows"], local["rows"]):
        assert 0.0 <= mine["rate"] <= 1.0
        if mine["kind"] == "lockstep" or mine["name"].startswith("lockstep"):  # sampled here, seeded
            assert mine["rate"] == theirs["rate"], mine["name"]


def test_the_key_is_in_no_output_log_or_file(server, tmp_path_factory):
    """Last in this module: everything the remote tests printed or wrote (glasses, checkpoints,
    caches, the server's log) is searched for the key."""
    assert OUTPUTS and all(KEY not in text for text in OUTPUTS)
    files = [p for p in Path(tmp_path_factory.getbasetemp()).rglob("*") if p.is_file()]
    assert server.log in files
    leaked = [str(p) for p in files if KEY.encode() in p.read_bytes()]
    assert not leaked, leaked
