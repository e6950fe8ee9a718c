"""Options: string conversion (CLI / --model_args), validation, and layer specs."""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass

import pytest

from lmms_sgm.options import (
    ApplyOptions,
    ProfileOptions,
    SelectionOptions,
    add_arguments,
    from_namespace,
    from_strings,
    parse_layers,
    to_dict,
)


@dataclass(frozen=True)
class Sample:
    names: tuple[str, ...] = ("a",)
    k: typing.Optional[int] = 3  # noqa: UP045 (the older spelling, which third-party options may still use)
    m: int | None = None  # the PEP 604 spelling must convert the same way
    x: float = 1.0
    flag: bool = False
    n: int = 0
    label: str = "s"


# ---------------------------------------------------------------- from_strings conversion


@pytest.mark.parametrize(
    "raw, want",
    [("a,b,c", ("a", "b", "c")), ("a+b", ("a", "b")), ("a", ("a",)), ("a,,b,", ("a", "b")), ("", ())],
)
def test_tuple(raw, want):
    assert from_strings(Sample, {"names": raw}).names == want


@pytest.mark.parametrize("raw, want", [("none", None), ("None", None), ("null", None), ("", None), ("12", 12), ("-1", -1)])
def test_optional_int(raw, want):
    assert from_strings(Sample, {"k": raw}).k == want


@pytest.mark.parametrize("raw, want", [("none", None), ("7", 7)])
def test_pep604_optional_int(raw, want):
    assert from_strings(Sample, {"m": raw}).m == want


def test_optional_int_rejects_text():
    with pytest.raises(ValueError, match="k expects int"):
        from_strings(Sample, {"k": "twelve"})


@pytest.mark.parametrize("raw, want", [("0.3", 0.3), ("1e-2", 0.01), ("2", 2.0)])
def test_float(raw, want):
    got = from_strings(Sample, {"x": raw}).x
    assert isinstance(got, float) and got == want


def test_float_and_int_reject_garbage():
    with pytest.raises(ValueError, match="x expects float"):
        from_strings(Sample, {"x": "abc"})
    with pytest.raises(ValueError, match="n expects int"):
        from_strings(Sample, {"n": "1.5"})


@pytest.mark.parametrize("raw", ["1", "true", "True", "yes", "on"])
def test_bool_true(raw):
    assert from_strings(Sample, {"flag": raw}).flag is True


@pytest.mark.parametrize("raw", ["0", "false", "FALSE", "no", "off"])
def test_bool_false(raw):
    assert from_strings(Sample, {"flag": raw}, strict=True).flag is False


def test_bool_rejects_other():
    with pytest.raises(ValueError, match="flag expects true/false"):
        from_strings(Sample, {"flag": "maybe"})


def test_non_string_values_pass_through():
    s = from_strings(Sample, {"k": None, "x": 0.25, "names": ("p", "q")})
    assert (s.k, s.x, s.names) == (None, 0.25, ("p", "q"))


def test_real_options_from_strings():
    p = from_strings(ProfileOptions, {"modules": "gate_proj+intermediate", "layers": "0-1", "pooling": "max", "batch_size": "3"})
    assert p == ProfileOptions(modules=("gate_proj", "intermediate"), layers="0-1", pooling="max", batch_size=3)
    s = from_strings(SelectionOptions, {"rule": "damp", "top_k": "16", "damp_factor": "0.25", "threshold": "0.3"})
    assert s == SelectionOptions(rule="damp", top_k=16, damp_factor=0.25, threshold=0.3)
    assert from_strings(SelectionOptions, {"top_k": "none"}).top_k is None
    a = from_strings(ApplyOptions, {"strength": "0.5", "mode": "fold"})
    assert a == ApplyOptions(strength=0.5, mode="fold")


def test_to_dict_round_trip():
    for obj in (ProfileOptions(modules=("up_proj", "intermediate"), layers="1"), SelectionOptions(rule="det0", top_k=5),
                ApplyOptions(0.3, "nnsight")):
        d = to_dict(obj)
        assert all(not isinstance(v, tuple) for v in d.values())  # JSON-friendly
        assert from_strings(type(obj), d) == obj


# ---------------------------------------------------------------- errors


def test_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown option\(s\) bogus, zzz for ProfileOptions"):
        from_strings(ProfileOptions, {"bogus": "1", "zzz": "2", "pooling": "max"})
    # not strict: unknown keys are ignored, known ones still applied
    assert from_strings(ProfileOptions, {"bogus": "1", "pooling": "max"}, strict=False).pooling == "max"


@pytest.mark.parametrize(
    "cls, values, match",
    [
        (ProfileOptions, {"pooling": "median"}, "unknown pooling 'median'; choose from mean, max"),
        (ProfileOptions, {"positions": "image"}, "unknown positions 'image'"),
        (ProfileOptions, {"modules": "gate_proj,o_proj"}, "unknown modules 'o_proj'"),
        (ProfileOptions, {"text_field": "answer"}, "unknown text_field 'answer'"),
        (SelectionOptions, {"rule": "aura"}, "unknown rule 'aura'; choose from sgm, det0, damp"),
        (ApplyOptions, {"mode": "patch"}, "unknown mode 'patch'; choose from hooks, nnsight, fold"),
    ],
)
def test_bad_choices(cls, values, match):
    with pytest.raises(ValueError, match=match):
        from_strings(cls, values)


@pytest.mark.parametrize("rule", ["det0", "damp"])
def test_topk_rules_need_top_k(rule):
    with pytest.raises(ValueError, match="needs top_k"):
        SelectionOptions(rule=rule)
    with pytest.raises(ValueError, match="needs top_k"):
        from_strings(SelectionOptions, {"rule": rule, "top_k": "none"})
    assert SelectionOptions(rule=rule, top_k=3).top_k == 3


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: SelectionOptions(top_k=0), "top_k must be >= 1"),
        (lambda: SelectionOptions(threshold=1.5), "threshold is an AUROC"),
        (lambda: SelectionOptions(threshold=-0.1), "threshold is an AUROC"),
        (lambda: ApplyOptions(strength=1.01), "strength must be in"),
        (lambda: ApplyOptions(strength=-0.5), "strength must be in"),
        (lambda: ProfileOptions(batch_size=0), "batch_size must be >= 1"),
        (lambda: ProfileOptions(modules=()), "modules is empty"),
        (lambda: from_strings(ProfileOptions, {"modules": ""}), "modules is empty"),
        (lambda: ProfileOptions(layers="first"), "bad layers spec"),
    ],
)
def test_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ---------------------------------------------------------------- parse_layers


@pytest.mark.parametrize(
    "spec, n, want",
    [
        ("all", None, None),
        ("all", 4, [0, 1, 2, 3]),
        ("2", 4, [2]),
        ("0-2", 4, [0, 1, 2]),
        ("1-1", 4, [1]),
        ("0,3,7", 8, [0, 3, 7]),
        (" 3 , 1 ", 8, [1, 3]),
        ("5-6,0,2-3", 8, [0, 2, 3, 5, 6]),
        ("1,1,0-1", None, [0, 1]),
    ],
)
def test_parse_layers(spec, n, want):
    assert parse_layers(spec, n) == want


@pytest.mark.parametrize("spec", ["x", "1-2-3", "", "1-", "-1", "a-b", "1.5", "all,1"])
def test_parse_layers_bad_spec(spec):
    with pytest.raises(ValueError, match="bad layers spec"):
        parse_layers(spec, 4)


def test_parse_layers_empty_range():
    with pytest.raises(ValueError, match="selects no layer"):
        parse_layers("3-1", 4)


def test_parse_layers_out_of_range():
    with pytest.raises(ValueError, match=r"layers \[4, 9\] do not exist: the model has 4 decoder layers \(0-3\)"):
        parse_layers("2,4,9", 4)
    # unknown model size: syntax only
    assert parse_layers("2,4,9", None) == [2, 4, 9]


# ---------------------------------------------------------------- CLI flags from the same fields


def test_argparse_flags_round_trip():
    parser = argparse.ArgumentParser()
    add_arguments(parser, SelectionOptions, prefix="sel_")
    add_arguments(parser, ProfileOptions)
    ns = parser.parse_args(["--sel-rule", "det0", "--sel-top-k", "8", "--modules", "up_proj,intermediate", "--batch-size", "2"])
    assert from_namespace(SelectionOptions, ns, prefix="sel_") == SelectionOptions(rule="det0", top_k=8)
    assert from_namespace(ProfileOptions, ns) == ProfileOptions(modules=("up_proj", "intermediate"), batch_size=2)
    # flags not given keep the dataclass defaults
    assert from_namespace(ProfileOptions, parser.parse_args([])) == ProfileOptions()
    flags = {a.dest for a in parser._actions}
    assert {f.name for f in dataclasses.fields(ProfileOptions)} <= flags


def test_argparse_help_metavars_and_bare_flags():
    """Each flag says its help, its choices and its default (tuples joined by commas); a boolean,
    or a field with a ``const``, given bare means true / its const; a value still overrides."""
    from lmms_sgm.options import ExecutionOptions

    parser = argparse.ArgumentParser()
    add_arguments(parser, ProfileOptions)
    add_arguments(parser, ExecutionOptions, prefix="x_")
    groups = {g.title: g for g in parser._action_groups}
    assert {"ProfileOptions", "ExecutionOptions"} <= set(groups)
    actions = {a.dest: a for a in parser._actions}
    for cls, prefix in ((ProfileOptions, ""), (ExecutionOptions, "x_")):
        for f in dataclasses.fields(cls):
            a = actions[prefix + f.name]
            assert a in groups[cls.__name__]._group_actions
            # the flag spells the prefix like the field, with hyphens (--self-label-samples); dest keeps underscores
            assert a.option_strings == [f"--{(prefix + f.name).replace('_', '-')}"] and a.metavar == f.name.upper()
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = ",".join(default) if isinstance(default, tuple) else default
            choices = f.metadata.get("choices")
            assert a.help == f.metadata["help"] + (f" [{'|'.join(choices)}]" if choices else "") + f" (default: {shown})"
            assert a.default is None
    assert "[mean|max]" in actions["pooling"].help and "(default: gate_proj,up_proj" in actions["modules"].help
    ns = parser.parse_args(["--x-resume", "--x-remote", "--text-only"])
    assert from_namespace(ExecutionOptions, ns, prefix="x_") == ExecutionOptions(resume=True, remote="ndif")
    assert from_namespace(ProfileOptions, ns).text_only is True
    ns = parser.parse_args(["--x-resume", "false", "--x-remote", "local"])
    assert from_namespace(ExecutionOptions, ns, prefix="x_") == ExecutionOptions(resume=False, remote="local")
    with pytest.raises(SystemExit):  # a plain field still needs its value
        parser.parse_args(["--batch-size"])


@pytest.mark.parametrize("raw, want", [
    ("off", "off"), (" False ", "off"), ("NO", "off"), ("0", "off"), ("None", "off"), ("", "off"), (False, "off"),
    ("ndif", "ndif"), ("True", "ndif"), ("YES", "ndif"), ("on", "ndif"), ("1", "ndif"), (True, "ndif"),
    ("local", "local"), ("LOCAL", "local"),
    ("http://127.0.0.1:8000", "http://127.0.0.1:8000"), (" https://ndif.example ", "https://ndif.example"),
])
def test_remote_spellings_are_normalised(raw, want):
    from lmms_sgm.options import RemoteOptions

    got = RemoteOptions(remote=raw)
    assert got.remote == want and got.is_remote == (want != "off")


def test_remote_limits():
    from lmms_sgm.options import RemoteOptions

    assert RemoteOptions(remote_retries=0, remote_max_mb=0.5).remote_retries == 0
    for bad, match in (({"remote_retries": -1}, "remote_retries must be >= 0, got -1"),
                       ({"remote_max_mb": 0}, "remote_max_mb must be > 0, got 0"),
                       ({"remote": "HTTP//x"}, "use off, ndif, local or a server URL")):
        with pytest.raises(ValueError, match=match):
            RemoteOptions(**bad)


def test_model_args_validation():
    """The --model_args of sgm_llava / sgm_hf: each rule of their __post_init__, and the message of
    a remote run in a local-only mode."""
    from lmms_sgm.options import EvalModelArgs, LoadOptions, ModelArgs

    assert EvalModelArgs(pretrained="m").batch_size == 1
    cases = [
        (EvalModelArgs, {}, "pretrained is required: a Hub id or a local model directory"),
        (EvalModelArgs, {"pretrained": "m", "batch_size": 0}, "batch_size must be >= 1, got 0"),
        (EvalModelArgs, {"pretrained": "m", "mode": "x"}, "mode"),
        (ModelArgs, {"pretrained": "m", "remote": "ndif", "mode": "hooks"},
         ("mode=hooks cannot run remotely: it works through forward hooks on the local module, which an NDIF server "
          "never sees; remote execution applies the glasses inside the nnsight trace: use mode=nnsight")),
        (ModelArgs, {"pretrained": "m", "remote": "local", "mode": "fold"},
         "mode=fold cannot run remotely: it works through factors folded into the local weights"),
        (ModelArgs, {"pretrained": "m", "glasses": "g", "profile_data": "d"}, "give either glasses .* or profile_data"),
        (ModelArgs, {"pretrained": "m", "remote": "ftp://x"}, "use off, ndif, local or a server URL"),
    ]
    for cls, kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            cls(**kwargs)
    ModelArgs(pretrained="m", remote="local", mode="nnsight")
    ModelArgs(pretrained="m", mode="fold")  # local: any mode
    for f in dataclasses.fields(LoadOptions):
        if f.metadata.get("choices"):
            with pytest.raises(ValueError, match=f.name):
                LoadOptions(**{f.name: "no-such-choice"})


def test_validation_boundaries_and_combinations():
    """Each rule's edge: the bounds themselves are valid, one step past them is not; a rule that
    refuses a combination still accepts each part alone."""
    from lmms_sgm.options import ExecutionOptions, ModelArgs

    for ok in (lambda: ApplyOptions(strength=0.0), lambda: ApplyOptions(strength=1.0), lambda: ProfileOptions(batch_size=1),
               lambda: ProfileOptions(positions="response", text_field="question+response"),
               lambda: SelectionOptions(rule="det0", top_k=1), lambda: SelectionOptions(rule="damp", top_k=1),
               lambda: SelectionOptions(rule="sgm", direction="amplify"), lambda: SelectionOptions(threshold=0.0),
               lambda: SelectionOptions(threshold=1.0), lambda: ExecutionOptions(resume=True),
               lambda: ExecutionOptions(checkpoint_dir="off"), lambda: ModelArgs(pretrained="m", glasses="g"),
               lambda: ModelArgs(pretrained="m", profile_data="d")):
        ok()
    bad = [
        (lambda: ApplyOptions(strength=-0.01), r"strength must be in \[0, 1\], got -0.01"),
        (lambda: ApplyOptions(strength=1.01), r"strength must be in \[0, 1\]"),
        (lambda: ProfileOptions(batch_size=0), "batch_size must be >= 1, got 0"),
        (lambda: ProfileOptions(positions="response", text_field="response"), "positions='response' needs text_field"),
        (lambda: SelectionOptions(rule="det0", top_k=1, direction="amplify"), "rule='det0' only suppresses; direction='amplify'"),
        (lambda: SelectionOptions(rule="damp", top_k=1, direction="both"), "rule='damp' only suppresses"),
        (lambda: SelectionOptions(top_k=0), "top_k must be >= 1, got 0"),
        (lambda: SelectionOptions(threshold=1.5), r"threshold is an AUROC in \[0, 1\], got 1.5"),
        (lambda: ExecutionOptions(checkpoint_dir="  "), "checkpoint_dir is empty"),
        (lambda: ExecutionOptions(resume=True, checkpoint_dir="off"), "resume needs a checkpoint"),
    ]
    for make, match in bad:
        with pytest.raises(ValueError, match=match):
            make()
    assert parse_layers(" 0, 2 ", 3) == [0, 2]


# The sampling flags each command had before SamplingOptions (recorded from the hand-written parsers):
# flag -> (dest, default, the help it had or None). They must parse to the same values.
SAMPLING_FLAGS_BEFORE = {
    "self-label": {"--samples": ("samples", 4, "answers sampled per prompt"),
                   "--max-new-tokens": ("max_new_tokens", 32, None),
                   "--temperature": ("temperature", 1.0, "0 = greedy (then use --samples 1)"),
                   "--batch-size": ("batch_size", 8, None), "--seed": ("seed", 0, None)},
    "tune": {"--samples": ("samples", 5, "sampled answers per harmful prompt"), "--seed": ("seed", 0, None),
             "--self-label-samples": ("self_label_samples", 4, None),
             "--self-label-batch-size": ("self_label_batch_size", 8, None)},
    "diagnose": {"--samples": ("samples", 5, "sampled answers per harmful input"), "--seed": ("seed", 0, None)},
}
REQUIRED = {"self-label": ["--model", "m", "--prompts", "p", "--out", "o"], "tune": ["--model", "m", "--val", "v", "--out", "o"],
            "diagnose": ["--model", "m", "--data", "d", "--out", "o"]}


def _subparsers():
    from lmms_sgm.cli import build_parser

    return next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_sampling_flags_are_those_of_before_with_the_same_defaults_and_help():
    from lmms_sgm.options import SamplingOptions

    subs = _subparsers()
    for cmd, flags in SAMPLING_FLAGS_BEFORE.items():
        actions = {s: a for a in subs[cmd]._actions for s in a.option_strings}
        ns = subs[cmd].parse_args(REQUIRED[cmd])
        for flag, (dest, default, help_) in flags.items():
            a = actions[flag]
            assert a.dest == dest and getattr(ns, dest) == default and type(getattr(ns, dest)) is type(default), (cmd, flag)
            assert a.help.startswith(help_ or "") and a.help.endswith(f"(default: {default})"), (cmd, flag, a.help)
        prefix = "self_label_" if cmd == "tune" else ""
        got = from_namespace(SamplingOptions, ns)
        assert {k: getattr(got, k) for k in ("samples", "seed")} == {k: flags[f"--{k}"][1] for k in ("samples", "seed")}
        if cmd == "tune":
            own = from_namespace(SamplingOptions, ns, prefix=prefix)
            assert (own.samples, own.batch_size) == (4, 8)
    # given values arrive typed, and bad ones are refused by the one dataclass
    ns = subs["self-label"].parse_args([*REQUIRED["self-label"], "--samples", "3", "--temperature", "0.7",
                                        "--max-new-tokens", "9", "--batch-size", "2", "--seed", "11"])
    assert from_namespace(SamplingOptions, ns) == SamplingOptions(samples=3, temperature=0.7, max_new_tokens=9,
                                                                  batch_size=2, seed=11)
    ns = subs["tune"].parse_args([*REQUIRED["tune"], "--self-label-samples", "6", "--samples", "7"])
    assert from_namespace(SamplingOptions, ns, prefix="self_label_").samples == 6 and from_namespace(SamplingOptions, ns).samples == 7
    with pytest.raises(ValueError, match="samples must be >= 1, got 0"):
        from_namespace(SamplingOptions, subs["diagnose"].parse_args([*REQUIRED["diagnose"], "--samples", "0"]))
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplingOptions(temperature=-1)


def test_a_bad_sampling_flag_is_one_error_line_naming_it(tmp_path, capsys):
    from lmms_sgm.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"image": "x.png", "question": "q"}\n')
    assert main(["self-label", "--model", str(tmp_path / "none"), "--prompts", str(prompts), "--out", str(tmp_path / "o"),
                 "--samples", "many"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmms-sgm self-label: error: ") and "samples expects int, got 'many'" in err and "\n" not in err


def test_the_rule_flags_of_tune_report_and_sweep_come_from_one_dataclass():
    """tune, report and sweep read RuleOptions from the same flags; report's and sweep's old
    spellings (--min-retention, --max-over-refusal-points, --harm-metric) still work."""
    from lmms_sgm.options import RuleOptions

    subs = _subparsers()
    req = {"tune": REQUIRED["tune"], "report": ["r1"], "sweep": ["--pretrained", "m", "--tasks", "t", "--out", "o"]}
    for cmd in ("tune", "report", "sweep"):
        ns = subs[cmd].parse_args([*req[cmd], "--retention", "0.9", "--over-refusal-points", "3"])
        assert from_namespace(RuleOptions, ns) == RuleOptions(retention=0.9, over_refusal_points=3), cmd
        assert from_namespace(RuleOptions, subs[cmd].parse_args(req[cmd])) == RuleOptions()
    for cmd in ("report", "sweep"):
        ns = subs[cmd].parse_args([*req[cmd], "--min-retention", "0.9", "--max-over-refusal-points", "3",
                                   "--harm-metric", "mm_toxic_qa:harmful_rate"])
        assert from_namespace(RuleOptions, ns) == RuleOptions(metric="mm_toxic_qa:harmful_rate", retention=0.9,
                                                              over_refusal_points=3)


def test_importing_lmms_sgm_leaves_the_warning_filters_alone():
    """No module of the package changes the process's warning filters when imported (its
    dependencies, imported first, may: numpy, torch, lmms-eval do; those are not ours)."""
    import subprocess
    import sys

    code = (
        "import importlib, pkgutil, warnings\n"
        "import numpy, torch, transformers, nnsight, PIL.Image, lmms_eval.api.model, lm_eval.api.registry, lm_eval.models.huggingface\n"
        "before = list(warnings.filters)\n"
        "import lmms_sgm\n"
        "changed = []\n"
        "for m in pkgutil.walk_packages(lmms_sgm.__path__, 'lmms_sgm.'):\n"
        "    importlib.import_module(m.name)\n"
        "    if list(warnings.filters) != before:\n"
        "        changed.append(m.name); before = list(warnings.filters)\n"
        "print('changed:', changed)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "changed: []"
