"""A judge and a defense from a separate tiny package, pip-installed (once, for both) into the venv
from a temporary directory (no network: --no-index --no-deps --no-build-isolation), are picked up
through their ``lmms_sgm`` entry point without changing this repository: the judge by
``get_judge``, by the environment selection the lmms-eval tasks use (in a fresh process), and by
``lmms-sgm rejudge``; the defense by ``defenses=`` of the lmms-eval model ``sgm`` (in-process and in
a fresh process). Uninstalled at the end."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest

from lmms_sgm.judges import JudgeError, get_judge, identity
from lmms_sgm.plugins import plugin_manager
from rejudge_fixtures import write_run

DIST = "lmms-sgm-theirs-judge"
PIP = [sys.executable, "-m", "pip"]


def installed() -> bool:
    try:
        distribution(DIST)
        return True
    except PackageNotFoundError:
        return False


@pytest.fixture
def their_package(tmp_path):
    assert not installed(), f"{DIST} is already installed: a previous run did not clean up"
    src = tmp_path / "pkg"
    (src / "theirs_judge").mkdir(parents=True)
    (src / "pyproject.toml").write_text(textwrap.dedent(f"""
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "{DIST}"
        version = "0.0.1"
        [project.entry-points.lmms_sgm]
        theirs = "theirs_judge.plugin"
        [tool.setuptools]
        packages = ["theirs_judge"]
    """))
    (src / "theirs_judge" / "__init__.py").write_text("")
    (src / "theirs_judge" / "plugin.py").write_text(textwrap.dedent('''
        from lmms_sgm.judges import JudgeItem, JudgeResult
        from lmms_sgm.plugins import hookimpl

        class BananaJudge:
            """Unsafe when the response mentions the word (case-insensitive); batches."""
            name, version = "theirs", "7"

            def __init__(self, word="banana"):
                self.word = word.lower()
                self.config = {"word": self.word}

            def judge(self, prompt, response):
                return self.judge_batch([JudgeItem(prompt, response)])[0]

            def judge_batch(self, items):
                return [JudgeResult(unsafe=self.word in x.response.lower(), refusal=False, reason="theirs")
                        for x in items]

        @hookimpl
        def sgm_judges():
            return {"theirs": BananaJudge}

        class NoBananas:
            """Replaces every answer that mentions the word."""
            name, version = "no_bananas", "2"

            def __init__(self, word="banana", say="no bananas ."):
                self.word, self.say = word.lower(), say
                self.config = {"word": self.word, "say": say}
                self.stats = {"replaced": 0}

            def review(self, generator, requests, answers):
                out = [self.say if self.word in a.lower().split() else None for a in answers]
                self.stats["replaced"] += sum(o is not None for o in out)
                return out

        @hookimpl
        def sgm_defenses():
            return {"no_bananas": NoBananas}
    '''))
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
        sys.modules.pop("theirs_judge.plugin", None)
        sys.modules.pop("theirs_judge", None)
    assert not installed()


def test_a_judge_and_a_defense_from_another_package(their_package, tmp_path, tiny_dir):
    judge = get_judge("theirs", word="idiot")
    assert identity(judge) == {"name": "theirs", "version": "7", "config": {"word": "idiot"}}
    assert judge.judge("q", "You IDIOT").unsafe and not judge.judge("q", "fine").unsafe

    # What the lmms-eval tasks call, in a fresh process: LMMS_SGM_JUDGE / LMMS_SGM_JUDGE_ARGS.
    code = ("from lmms_sgm.judges import judge_from_env, identity; import json; "
            "j = judge_from_env(); print(json.dumps(identity(j))); print(j.judge('q', 'a Banana').unsafe)")
    env = {"LMMS_SGM_JUDGE": "theirs", "LMMS_SGM_JUDGE_ARGS": "word=banana", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True).stdout
    assert json.loads(out.splitlines()[0])["name"] == "theirs" and out.splitlines()[1] == "True"

    # lmms-sgm rejudge finds it too.
    run = write_run(tmp_path / "run")
    proc = subprocess.run([str(Path(sys.executable).with_name("lmms-sgm")), "rejudge", str(run), "--judge", "theirs:word=stupid",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "original vs theirs" in proc.stdout
    results = json.loads(next((tmp_path / "out").rglob("*_results.json")).read_text())
    assert results["results"]["mm_toxic_qa"]["judge,none"]["name"] == "theirs"
    assert results["results"]["mm_toxic_qa"]["harmful_rate,none"] == pytest.approx(1 / 3)  # "You stupid idiot." of 3

    check_their_defense(tiny_dir)  # same install: one pip install for both


def check_their_defense(tiny_dir):
    from lmms_eval.api.instance import Instance

    from lmms_sgm import tiny
    from lmms_sgm.defenses import Request, Stack, available
    from lmms_sgm.lmms.model import SGM

    assert "no_bananas" in available()
    image = tiny.random_image(7)
    task = {"toy": {"test": [{"image": image}] * 2}}
    reqs = [Instance("generate_until", (q, {"max_new_tokens": 4}, lambda d: [d["image"]], i, "toy", "test"), idx=0,
                     metadata={"task": "toy", "doc_id": i, "repeats": 1}) for i, q in enumerate(["what is this ?", "how many ?"])]

    def make(extra):
        lm = SGM.create_from_arg_string(f"pretrained={tiny_dir},sgm=off{extra}", {"batch_size": "2"})
        lm.task_dict = task
        return lm

    plain = make("").generate_until(reqs)
    word = plain[0].split()[0]  # a word the tiny model says in its first answer
    lm = make(f",defenses=no_bananas,defense_args=no_bananas.word={word}")
    got = lm.generate_until(reqs)
    assert got == [("no bananas ." if word in a.split() else a) for a in plain] and got[0] == "no bananas ."
    assert lm.sgm_info["defenses"] == [{"name": "no_bananas", "version": "2", "config": {"word": word, "say": "no bananas ."}}]
    assert lm.sgm_info["defense_stats"] == {"no_bananas": {"replaced": sum(word in a.split() for a in plain)}}

    # What the lmms-eval model builds, in a fresh process.
    code = ("from lmms_sgm.defenses import Stack, Request; s = Stack.from_spec('no_bananas', 'no_bananas.word=kiwi'); "
            "print(s.review(None, [Request('q')] * 2, ['a kiwi', 'an apple'])[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"},
                         timeout=120, check=True).stdout
    assert out.strip() == "['no bananas .', 'an apple']"
    assert Stack.from_spec("no_bananas").review(None, [Request("q")], ["Banana split"])[0] == ["no bananas ."]


def test_the_plugin_is_gone_after_uninstalling():
    # Runs after the test above (file order): the venv is left as it was.
    assert not installed()
    with pytest.raises(JudgeError, match="unknown judge 'theirs'"):
        get_judge("theirs")
    from lmms_sgm.defenses import DefenseError, get_defense

    with pytest.raises(DefenseError, match="unknown defense 'no_bananas'"):
        get_defense("no_bananas")
