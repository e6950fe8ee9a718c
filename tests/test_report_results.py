"""lmms_sgm.reports.results: the run descriptions (what a run wore, its harness, decoding, seed,
judge, model args, data digest) and reading results files, against hand-written values."""
from __future__ import annotations

import hashlib
import json
import locale
import os
from pathlib import Path

import pytest

from lmms_sgm.reports import results as rs

SGM = {"rule": "sgm", "threshold": 0.5}


# what the model wore, as our tasks record it (lmms_sgm/lmms/model.py: sgm, strength, defenses,
# and the glasses' identity: selection / text_only for SGM glasses, kind / layer / c / gated for steering)
@pytest.mark.parametrize("record, text", [
    (None, "not recorded"),
    ({}, "not recorded"),
    ({"model": "not sgm, sgm_llava or sgm_hf: no SGM identity"}, "not recorded"),
    # vanilla: the defenses alone name what it wore
    ({"sgm": False, "strength": 1}, "vanilla"),
    ({"sgm": False, "defenses": None}, "vanilla"),
    ({"sgm": False, "defenses": []}, "vanilla"),
    ({"sgm": False, "defenses": [{"name": "self_check"}]}, "self_check"),
    ({"sgm": False, "defenses": [{"name": "system_prompt"}, {"name": "self_check"}]}, "system_prompt+self_check"),
    ({"sgm": False, "defenses": [{"version": "1", "config": {}}, {"name": "output_filter"}]}, "?+output_filter"),
    # SGM glasses: rule and threshold, text-only, strength; missing fields take their defaults
    ({"sgm": True, "selection": SGM, "strength": 1}, "SGM t=0.5 s=1"),
    ({"sgm": True, "selection": {"rule": "sgm", "threshold": 0.25}, "strength": 0.5}, "SGM t=0.25 s=0.5"),
    ({"sgm": True, "selection": {"threshold": 0.75}, "strength": 2.0}, "SGM t=0.75 s=2"),  # no rule: sgm
    ({"sgm": True, "selection": {"rule": "sgm"}}, "SGM t=0.5 s=1"),  # no threshold, no strength
    ({"sgm": True, "selection": {}, "strength": 3}, "SGM t=0.5 s=3"),
    ({"sgm": True, "selection": None, "strength": 0.5}, "SGM t=0.5 s=0.5"),
    ({"sgm": True}, "SGM t=0.5 s=1"),
    ({"sgm": True, "selection": SGM, "strength": 1, "text_only": True}, "SGM t=0.5 text-only s=1"),
    ({"sgm": True, "selection": SGM, "strength": 1, "text_only": False}, "SGM t=0.5 s=1"),
    ({"sgm": True, "selection": {"rule": "det0", "top_k": 16}, "strength": 1}, "Det0 top-16 s=1"),
    ({"sgm": True, "selection": {"rule": "det0", "top_k": 50}, "strength": 1, "text_only": True}, "Det0 top-50 text-only s=1"),
    ({"sgm": True, "selection": {"rule": "damp", "top_k": 16, "damp_factor": 0.1}, "strength": 1.5}, "Damp top-16 x0.1 s=1.5"),
    ({"sgm": True, "selection": {"rule": "damp", "top_k": 8}, "strength": 1}, "Damp top-8 x0.5 s=1"),  # default factor
    ({"sgm": True, "selection": {"rule": "aura", "threshold": 0.3}, "strength": 1}, "aura s=1"),  # a rule it does not know
    # steering glasses: gated or not, layer, c, strength
    ({"sgm": True, "kind": "gated_steering", "gated": True, "layer": 3, "c": 4, "strength": 1}, "gated steering layer 3 c=4 s=1"),
    ({"sgm": True, "kind": "gated_steering", "gated": False, "layer": 2, "c": 8.0, "strength": 0.5}, "steering layer 2 c=8 s=0.5"),
    ({"sgm": True, "kind": "gated_steering", "layer": 5, "c": 2.5, "strength": 2}, "steering layer 5 c=2.5 s=2"),
    # another kind (a plugin's): its name, not SGM's label (lm-eval records it as glasses_kind)
    ({"sgm": True, "kind": "steering_v2", "layer": 5, "c": 2.5, "strength": 2}, "steering_v2 s=2"),
    ({"sgm": True, "kind": "mllm_text_only", "glasses_kind": "clamp", "strength": 0.75}, "clamp s=0.75"),
    ({"sgm": True, "kind": "causal_lm", "glasses_kind": "gated_steering", "gated": True, "layer": 2, "c": 8, "strength": 1},
     "gated steering layer 2 c=8 s=1"),
    ({"sgm": True, "kind": "causal_lm", "selection": {"rule": "det0", "top_k": 60}, "strength": 1}, "Det0 top-60 s=1"),
    # glasses and defenses (SGM*)
    ({"sgm": True, "selection": SGM, "strength": 1, "defenses": [{"name": "self_check"}, {"name": "output_filter"}]},
     "SGM t=0.5 s=1 + self_check+output_filter"),
    ({"sgm": True, "kind": "gated_steering", "gated": True, "layer": 3, "c": 2, "strength": 1, "defenses": [{"name": "system_prompt"}]},
     "gated steering layer 3 c=2 s=1 + system_prompt"),
    ({"sgm": True, "selection": {"rule": "det0", "top_k": 16}, "strength": 1, "defenses": [{}]}, "Det0 top-16 s=1 + ?"),
    ({"sgm": True, "selection": SGM, "strength": 1, "defenses": None}, "SGM t=0.5 s=1"),
])
def test_wore_names_the_glasses_their_settings_and_the_defenses(record, text):
    assert rs.wore(record) == text


# ------------------------------------------------------------------ harness, decoding, seed, judge, model args


@pytest.mark.parametrize("run, name", [
    ({"results": {}}, "lmms-eval"),
    ({"results": {}, "source_file": "/o/m/20260101_000000_results.json"}, "lmms-eval"),
    ({"results": {}, "source_file": ""}, "lmms-eval"),
    ({"results": {}, "source_file": None}, "lmms-eval"),
    ({"results": {}, "source_file": "/o/m/results_2026-01-01T00-00-00.json"}, "lm-eval"),  # by the file name alone
    ({"results": {}, "source_file": "/o/m/1_results.json", "lm_eval_version": "0.4.9"}, "lm-eval"),
    ({"results": {}, "source_file": "/o/m/1_results.json", "pretty_env_info": "PyTorch 2"}, "lm-eval"),
    ({"results": {}, "lm_eval_version": "0.4.9"}, "lm-eval"),
    ({"results": {}, "source_file": "/o/m/1_results.json", "task_sources": {"t": "/o/m/results_1.json"}}, "lmms-eval + lm-eval"),
    ({"results": {}, "source_file": "/o/m/1_results.json", "task_sources": {}}, "lmms-eval"),
])
def test_harness_from_the_file_name_or_lm_evals_own_keys(run, name):
    assert rs.harness(run) == name


GEN = {"until": ["\n"], "max_new_tokens": 64}


@pytest.mark.parametrize("run, expected", [
    ({"configs": {"t": {"generation_kwargs": GEN}}}, GEN),  # no run-wide config at all
    ({"configs": {"t": {"generation_kwargs": GEN}}, "config": {}}, GEN),
    ({"configs": {"t": {"generation_kwargs": GEN}}, "config": {"gen_kwargs": ""}}, GEN),
    ({"configs": {"t": {"generation_kwargs": GEN}}, "config": {"gen_kwargs": "temperature=0"}},
     {**GEN, "--gen_kwargs": "temperature=0"}),
    ({"configs": {"t": {"generation_kwargs": None, "repeats": 4}}, "config": {"gen_kwargs": "do_sample=True"}},
     {"repeats": 4, "--gen_kwargs": "do_sample=True"}),
    ({"configs": {"t": {"repeats": 1}}, "config": {"gen_kwargs": None}}, {}),
    ({"configs": {"t": {"output_type": "loglikelihood"}}, "config": {"gen_kwargs": "temperature=0"}}, None),
    ({"configs": {}, "config": {"gen_kwargs": "temperature=0"}}, None),
])
def test_generation_settings_with_the_run_wide_gen_kwargs(run, expected):
    assert rs.generation(run, "t") == expected


@pytest.mark.parametrize("config, expected", [
    ({"random_seed": 0, "seed": [1, 2, 3, 4]}, 0),  # lmms-eval's random_seed comes first
    ({"random_seed": 7}, 7),
    ({"seed": [1, 2, 3, 4]}, [1, 2, 3, 4]),
    ({}, None),
])
def test_seed_prefers_random_seed(config, expected):
    assert rs.seed({"config": config}) == expected
    assert rs.seed({}) is None


@pytest.mark.parametrize("config, expected", [
    ({}, None),
    ({"model_args": None}, None),
    ({"model_args": "pretrained=x,sgm=on"}, "pretrained=x,sgm=on"),
    ({"model_args": ""}, ""),
    ({"model_args": {"sgm": "on", "pretrained": "x"}}, '{"pretrained": "x", "sgm": "on"}'),  # lm-eval: a dict, keys sorted
    ({"model_args": ["b", "a"]}, '["b", "a"]'),
])
def test_model_args_as_one_string(config, expected):
    assert rs.model_args({"config": config}) == expected


def test_model_args_without_a_run_config():
    assert rs.model_args({}) is None


JUDGE = {"name": "lexicon", "version": "1", "config": {}}


@pytest.mark.parametrize("run, expected", [
    ({}, None),
    ({"results": {}}, None),
    ({"results": {"other": {"judge,none": JUDGE}}}, None),
    ({"results": {"t": {"acc,none": 0.5}}}, None),
    ({"results": {"t": {"harmful_rate_by_category,none": {"a": 0.1}, "judge,none": JUDGE}}}, JUDGE),
    ({"results": {"t": {"harmful_rate_by_category,none": {"a": 0.1}, "sgm,none": {"sgm": True}}}}, None),
    ({"results": {"t": {"judge,none": "N/A", "judge,samples": JUDGE}}}, JUDGE),
])
def test_judge_of_is_the_tasks_judge_record(run, expected):
    assert rs.judge_of(run, "t") == expected


# ------------------------------------------------------------------ data digest


def _sha16(obj, **kw) -> str:
    return hashlib.sha256(json.dumps(obj, **kw).encode()).hexdigest()[:16]


CFG = {"dataset_path": "lmms-lab/x", "dataset_name": "default", "dataset_kwargs": {"token": True, "b": 1},
       "test_split": "test", "output_type": "generate_until"}


def _config_run(cfg=CFG, n=None):
    return {"results": {"t": {"acc,none": 0.5}}, "configs": {"t": cfg}, "n-samples": {"t": n or {"original": 10, "effective": 4}}}


def test_data_digest_without_samples_is_of_the_dataset_settings_and_count():
    # the documented recipe: the four dataset settings and the task's n-samples, keys sorted, 16 hex digits
    expected = {"dataset_kwargs": {"b": 1, "token": True}, "dataset_name": "default", "dataset_path": "lmms-lab/x",
                "n": {"effective": 4, "original": 10}, "test_split": "test"}
    assert rs.data_digest(_config_run(), "t") == "config:" + _sha16(expected)
    assert rs.data_digest(_config_run(), "absent") is None
    bare = {"results": {"t": {}}, "configs": {"t": {}}}  # nothing known: still a digest, of nothing
    assert rs.data_digest(bare, "t") == "config:" + _sha16({"dataset_kwargs": None, "dataset_name": None,
                                                             "dataset_path": None, "n": None, "test_split": None})


@pytest.mark.parametrize("change", [
    {"dataset_path": "lmms-lab/y"}, {"dataset_name": "other"}, {"dataset_kwargs": {"token": False, "b": 1}},
    {"test_split": "validation"},
])
def test_data_digest_changes_with_each_dataset_setting(change):
    assert rs.data_digest(_config_run({**CFG, **change}), "t") != rs.data_digest(_config_run(), "t")


def test_data_digest_changes_with_the_document_count_only():
    base = rs.data_digest(_config_run(), "t")
    assert rs.data_digest(_config_run(n={"original": 10, "effective": 5}), "t") != base
    # other settings of the task, and the dataset_kwargs' key order, do not count
    same = {**CFG, "output_type": "loglikelihood", "dataset_kwargs": {"b": 1, "token": True}}
    assert rs.data_digest(_config_run(same), "t") == base
    other_task = _config_run()
    other_task["n-samples"]["u"] = {"original": 10, "effective": 9}
    assert rs.data_digest(other_task, "t") == base


def test_data_digest_reads_settings_that_are_not_json_as_their_text():
    run = _config_run({**CFG, "dataset_path": Path("/data/x")})  # a run dict built in memory
    assert rs.data_digest(run, "t") == rs.data_digest(_config_run({**CFG, "dataset_path": "/data/x"}), "t")


def _logged(tmp_path, lines, name="1"):
    d = tmp_path / name
    d.mkdir()
    (d / "1_samples_t.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return {"results": {"t": {"acc,none": 0.5}}, "configs": {"t": CFG}, "source_file": str(d / "1_results.json")}


def test_data_digest_with_samples_is_of_ids_prompts_and_targets_in_doc_order(tmp_path):
    lines = [{"doc_id": "b", "input": "q-b", "target": "B"}, {"doc_id": 10, "input": "q10", "target": 1},
             {"doc_id": 9, "input": "q9"}, {"doc_id": 2.5, "input": "q2.5", "target": "x"}]
    # numbers in numeric order (9 before 10), then strings; a missing target reads "None"
    rows = [["2.5", "q2.5", "x"], ["9", "q9", "None"], ["10", "q10", "1"], ["b", "q-b", "B"]]
    expected = "samples:" + _sha16(rows)
    assert rs.data_digest(_logged(tmp_path, lines), "t") == expected
    assert rs.data_digest(_logged(tmp_path, lines[::-1], "2"), "t") == expected  # the order logged does not count
    renumbered = [dict(s, doc_id=s["doc_id"] + 100 if s["doc_id"] != "b" else "c") for s in lines]
    assert rs.data_digest(_logged(tmp_path, renumbered, "3"), "t") != expected


# ------------------------------------------------------------------ reading files


def test_a_results_file_with_non_ascii_text_reads_under_an_ascii_locale(tmp_path):
    """open() without an encoding takes the locale's (nl_langinfo(CODESET)); results files are UTF-8."""
    path = tmp_path / "m" / "1_results.json"
    path.parent.mkdir()
    run = {"results": {"t": {"alias": "café ☕ 毒性", "acc,none": 0.5}}}
    path.write_bytes(json.dumps(run, ensure_ascii=False).encode("utf-8"))
    saved = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")  # ASCII, where UTF-8 mode is off (it is unless PYTHONUTF8 / -X utf8)
    try:
        got = rs.load_run(path)
    finally:
        locale.setlocale(locale.LC_CTYPE, saved)
    assert got["results"]["t"]["alias"] == "café ☕ 毒性" and got["source_file"] == str(path)


@pytest.mark.parametrize("text", ['[{"results": {}}]', '"results"', "3", '{"config": {}}', '{"results": []}', '{"results": null}'])
def test_a_json_file_that_is_no_results_object_is_an_input_error(tmp_path, text):
    path = tmp_path / "1_results.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="not an lmms-eval / lm-eval results file"):
        rs.load_run(path)


def test_find_results_newer_than_includes_a_file_written_at_that_instant(tmp_path):
    path = tmp_path / "m" / "1_results.json"
    path.parent.mkdir()
    path.write_text('{"results": {}}')
    os.utime(path, (1_700_000_000.0, 1_700_000_000.0))
    assert rs.find_results(tmp_path, newer_than=1_700_000_000.0) == path
    with pytest.raises(FileNotFoundError, match="from this run"):
        rs.find_results(tmp_path, newer_than=1_700_000_000.5)


def test_logged_samples_are_read_again_once_the_file_is_rewritten(tmp_path):
    run = _logged(tmp_path, [{"doc_id": 0, "input": "q"}])
    samples = tmp_path / "1" / "1_samples_t.jsonl"
    os.utime(samples, (1_700_000_000.0, 1_700_000_000.0))
    assert rs.logged_samples(run, "t") == [{"doc_id": 0, "input": "q"}]
    samples.write_text(json.dumps({"doc_id": 1, "input": "r"}) + "\n")
    os.utime(samples, (1_700_000_100.0, 1_700_000_100.0))
    assert rs.logged_samples(run, "t") == [{"doc_id": 1, "input": "r"}]
