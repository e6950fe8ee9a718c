"""lmms_sgm.redaction: the one function that removes secrets, and the writers that must use it
(the lmms-eval runner's command.sh and log, the run identity the tasks write into results.json).
The judges' use of it is tested against a server that echoes the key (tests/test_judges_llm.py)."""
from __future__ import annotations

import sys

import pytest

from lmms_sgm import redaction
from lmms_sgm.redaction import REDACTED, known_secrets, redact, register_secret

SECRET = "sk-live-7d1e2c9a-do-not-store"  # in a variable named like a key
OTHER = "tok-4b8f6a"  # registered


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    """No credential-named variable of the caller's, a fresh registry, one key in the environment."""
    for name in list(__import__("os").environ):
        if redaction._SECRET_NAME.search(name):
            monkeypatch.delenv(name)
    monkeypatch.setattr(redaction, "_registered", set())
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)


def test_strings_bytes_and_nested_containers_keys_included():
    register_secret(OTHER)
    obj = {"auth": f"Bearer {SECRET}", OTHER: [f"x{OTHER}y", (SECRET.encode(), 3, None, 2.5)],
           "n": {"deep": [{"k": f"{SECRET}{SECRET}"}]}, "plain": "nothing here"}
    assert redact(obj) == {"auth": f"Bearer {REDACTED}", REDACTED: [f"x{REDACTED}y", (REDACTED.encode(), 3, None, 2.5)],
                           "n": {"deep": [{"k": REDACTED * 2}]}, "plain": "nothing here"}
    assert obj["auth"] == f"Bearer {SECRET}"  # the input is not changed
    assert isinstance(redact((SECRET,)), tuple) and isinstance(redact([SECRET]), list)


def test_a_longer_secret_holding_a_shorter_one_is_replaced_whole():
    longer = f"{OTHER}-and-more"
    register_secret(OTHER)
    register_secret(longer)
    assert known_secrets()[:2] == [SECRET, longer]  # longest first
    assert redact(f"a {longer} b {OTHER} c") == f"a {REDACTED} b {REDACTED} c"  # not "[redacted]-and-more"


def test_short_and_empty_values_are_ignored(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "12345")  # 5 characters: too likely in ordinary text
    monkeypatch.setenv("NDIF_API_KEY", "")
    register_secret("abc")
    register_secret(None)
    register_secret("")
    assert known_secrets() == [SECRET]
    assert redact("12345 abc") == "12345 abc"
    register_secret("abcdef")  # MIN_SECRET_CHARS = 6: taken
    assert redact("abcdef 12345") == f"{REDACTED} 12345"


def test_variables_are_matched_by_name_and_extra_values_only_for_the_call(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_TOKEN", "value-of-a-token")
    monkeypatch.setenv("DB_PASSWORD", "hunter2hunter2")
    monkeypatch.setenv("EDITOR", "vim-but-long")  # not named like a credential
    assert redact("value-of-a-token hunter2hunter2 vim-but-long") == f"{REDACTED} {REDACTED} vim-but-long"
    assert redact("per-call-secret", extra=["per-call-secret"]) == REDACTED
    assert redact("per-call-secret") == "per-call-secret"
    monkeypatch.delenv("OPENAI_API_KEY")  # read at each call, not once
    assert redact(SECRET) == SECRET


def test_other_values_come_back_as_they_are():
    for v in (3, 2.5, None, True, object):
        assert redact(v) is v


def test_the_runner_writes_and_prints_no_secret(tmp_path, capsys, monkeypatch):
    """command.sh, the log's first line, the printed command and the failure's message: the key
    of a credential-named variable in the run's environment, and a registered value in its
    arguments, read [redacted]; the child still got the real values."""
    from lmms_sgm.reports import runner

    register_secret(OTHER)
    env = {"LMMS_SGM_SERVICE_TOKEN": SECRET, "LMMS_SGM_JUDGE": "lexicon"}
    script = (f"import os, sys; ok = os.environ['LMMS_SGM_SERVICE_TOKEN'] == sys.argv[1] == {SECRET!r} "
              f"and sys.argv[2] == {OTHER!r}; print('child ran', ok); sys.exit(3)")
    with pytest.raises(ChildProcessError) as failed:
        runner.run("x", [sys.executable, "-c", script, SECRET, OTHER], env, tmp_path / "run", "a test run")
    out = capsys.readouterr().out
    log = (tmp_path / "run" / "lmms_eval.log").read_text()
    assert "child ran True" in log  # the child got the real values
    command = (tmp_path / "run" / "command.sh").read_text()
    assert f"LMMS_SGM_SERVICE_TOKEN={REDACTED}" in command and "LMMS_SGM_JUDGE=lexicon" in command
    for text in (command, log, out, str(failed.value)):
        assert SECRET not in text and OTHER not in text
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and (SECRET.encode() in p.read_bytes()
                                                                    or OTHER.encode() in p.read_bytes())]


def test_the_run_identity_the_tasks_write_holds_no_secret(monkeypatch):
    from lmms_sgm import harness_common as run_info

    monkeypatch.setattr(run_info, "_current", None)
    run_info.publish({"pretrained": "m", "model_args": f"pretrained=m,remote=https://u:{SECRET}@host"})
    assert run_info.current() == {"pretrained": "m", "model_args": f"pretrained=m,remote=https://u:{REDACTED}@host"}


def test_the_old_run_info_path_warns_and_reaches_the_one_run_identity(monkeypatch):
    """lmms_sgm.lmms.run_info moved to lmms_sgm.harness_common (shared by both adapters); a task of
    the user's that imports the old path still publishes and reads the one identity, with a warning."""
    import importlib

    from lmms_sgm import harness_common

    monkeypatch.setattr(harness_common, "_current", None)
    monkeypatch.delitem(sys.modules, "lmms_sgm.lmms.run_info", raising=False)
    with pytest.warns(DeprecationWarning, match="lmms_sgm.harness_common"):
        old = importlib.import_module("lmms_sgm.lmms.run_info")
    old.publish({"pretrained": "sgm-demo-llava", "model_args": f"remote=https://u:{SECRET}@host"})
    assert harness_common.current() == {"pretrained": "sgm-demo-llava", "model_args": f"remote=https://u:{REDACTED}@host"}
    assert old.current() == harness_common.current()
    assert old.demo_data() == harness_common.demo_data() is not None
