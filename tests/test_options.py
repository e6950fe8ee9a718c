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
    k: typing.Optional[int] = 3  # noqa: UP045 (the spelling the package's own options use)
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
    for obj in (ProfileOptions(modules=("up_proj", "intermediate"), layers="1"), SelectionOptions(rule="det0", top_k=5), ApplyOptions(0.3, "nnsight")):
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
    ns = parser.parse_args(["--sel_rule", "det0", "--sel_top-k", "8", "--modules", "up_proj,intermediate", "--batch-size", "2"])
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
            assert a.option_strings == [f"--{prefix}{f.name.replace('_', '-')}"] and a.metavar == f.name.upper()
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = ",".join(default) if isinstance(default, tuple) else default
            choices = f.metadata.get("choices")
            assert a.help == f.metadata["help"] + (f" [{'|'.join(choices)}]" if choices else "") + f" (default: {shown})"
            assert a.default is None
    assert "[mean|max]" in actions["pooling"].help and "(default: gate_proj,up_proj" in actions["modules"].help
    ns = parser.parse_args(["--x_resume", "--x_remote", "--text-only"])
    assert from_namespace(ExecutionOptions, ns, prefix="x_") == ExecutionOptions(resume=True, remote="ndif")
    assert from_namespace(ProfileOptions, ns).text_only is True
    ns = parser.parse_args(["--x_resume", "false", "--x_remote", "local"])
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
