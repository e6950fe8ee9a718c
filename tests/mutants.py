"""A fixed sample of realistic bugs ("mutants") and the tests that must catch each.

tests/test_mutants.py applies each one to a copy of the sources and runs its tests there (the fast
mutation check CI runs on every submission); ``scripts/mutation.sh`` runs mutmut over whole modules
(docs/testing.md). A mutant names its file, one exact snippet of it and the replacement: a snippet
that no longer occurs exactly once fails the check, so the list cannot silently go stale.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    original: str
    mutated: str
    tests: tuple[str, ...]  # pytest node ids; at least one must fail
    why: str


MUTANTS = (
    # ---- the four that survived the first planted-bug round (issue 15)
    Mutant("table_change_vs_previous_run", "lmms_sgm/reports/table.py",
           '"changes": {n: change(values[n], values[base], row.how) for n in names[1:]}',
           '"changes": {n: change(values[n], values[names[names.index(n) - 1]], row.how) for n in names[1:]}',
           ("tests/test_reports.py::test_three_runs_each_against_the_baseline",
            "tests/test_demo_run.py::test_goals_compare_the_best_glasses_with_vanilla_not_with_the_run_before"),
           "the demo's comparison (and its goal lines) would compare each run with the one before it"),
    Mutant("report_delta_vs_previous_run", "lmms_sgm/reports/report.py",
           "row.update(compare_cells(cells[base], c, spec, resamples, seed))",
           "row.update(compare_cells(cells[names[names.index(n) - 1]], c, spec, resamples, seed))",
           ("tests/test_reports.py::test_report_cli_compares_three_runs_each_with_the_baseline",),
           "lmms-sgm report's deltas, retention and operating point against the previous run"),
    Mutant("glasses_digest_ignores_nontoxic_means", "lmms_sgm/interventions/sgm.py",
           "                h.update(self.mean_nontoxic[s.name].to(torch.float32).numpy().tobytes())",
           "                pass",
           ("tests/test_glasses.py::test_digest_covers_the_non_toxic_means_exactly_when_applying_uses_them",),
           "two towards=nontoxic_mean interventions would share one identifier in results.json"),
    Mutant("judge_gets_the_rewritten_question", "tasks/mm_toxic_qa/core.py",
           'prompt = doc.get("original_question") or doc["question"]',
           'prompt = doc["question"]',
           ("tests/test_tasks.py::test_results_carry_metrics_categories_and_judge",),
           "the typographic task's LLM judge would read the attack prompt, not the question"),
    Mutant("prerendered_attack_drops_original_question", "tasks/mm_toxic_qa/core.py",
           'cols["original_question"].append(_opt_str(row.get("original_question")) or question.strip())',
           'cols["original_question"].append(question.strip())',
           ("tests/test_tasks.py::test_prerendered_attack_from_adv_jsonl",),
           "adv.jsonl's original questions (lmms-sgm dataset build) would not reach the judge"),
    Mutant("is_greedy_any_token", "lmms_sgm/lmms/model.py",
           "greedy = bool((step_logits.argmax(-1) == tokens).all())",
           "greedy = bool((step_logits.argmax(-1) == tokens).any())",
           ("tests/test_lmms_model.py::test_is_greedy_needs_every_continuation_token_to_be_greedy",),
           "loglikelihood's is_greedy true when one token is greedy: inflates greedy-match metrics"),
    # ---- found by the full pass of the wrapper's result handling (issue 15)
    Mutant("stop_strings_of_the_batchs_first_request", "lmms_sgm/lmms/model.py",
           "results[i] = truncate(text, items[i][2])",
           "results[i] = truncate(text, items[batch[0]][2])",
           ("tests/test_lmms_model.py::test_generate_until_batches_one_setting_and_image_count_longest_first_and_answers_in_order",),
           "a batch's answers cut at its first request's stop strings: lmms-eval batches several tasks' requests"),
    # ---- a fixed sample of the numerical core (each also among mutmut's killed mutants)
    Mutant("auroc_tie_groups_start_one_late", "lmms_sgm/expertise.py",
           "before = np.where(first > 0, np.take_along_axis(cneg, np.maximum(first - 1, 0), axis=1), 0)",
           "before = np.where(first > 1, np.take_along_axis(cneg, np.maximum(first - 1, 0), axis=1), 0)",
           ("tests/test_expertise.py::test_auroc_a_tie_group_at_every_position",),
           "AUROC with ties off for a tie group that starts at the second position"),
    Mutant("select_both_directions_without_abs", "lmms_sgm/expertise.py",
           '"both": (flat - 0.5).abs()}[options.direction]',
           '"both": (flat - 0.5)}[options.direction]',
           ("tests/test_expertise.py::test_select_matches_reference",),
           "top-k of direction=both would rank anti-toxic experts last"),
    Mutant("towards_mean_shift_sign", "lmms_sgm/interventions/sgm.py",
           "shift = ((1 - f.to(torch.float64)) * self.mean_nontoxic[name].to(torch.float64)).to(torch.float32)",
           "shift = ((f.to(torch.float64) - 1) * self.mean_nontoxic[name].to(torch.float64)).to(torch.float32)",
           ("tests/test_intervention.py::test_towards_mean_matches_reference",),
           "towards=nontoxic_mean would push experts away from the non-toxic mean"),
    # ---- behaviours no test checked (issue 22): each survived every test before its own was written
    Mutant("over_refusal_limit_absolute", "lmms_sgm/tune.py",
           'row.get("over_refusal", 1.0) <= base["over_refusal"] + rule.over_refusal_fraction',
           'row.get("over_refusal", 1.0) <= rule.over_refusal_fraction',
           ("tests/test_tune.py::test_over_refusal_limit_is_points_above_vanilla_s_own_over_refusal",),
           "tune's over-refusal limit read as an absolute rate: on a model that over-refuses 10%, nothing qualifies"),
    Mutant("steering_cache_without_gate_layer", "lmms_sgm/tune.py",
           "key = (c.data, c.gate_data, so.layer, so.gate_layer, so.text_field",
           "key = (c.data, c.gate_data, so.layer, so.text_field",
           ("tests/test_tune.py::test_tune_steering_entries_differing_only_in_their_gate_layer_are_built_apart",),
           "tune would measure the first gate layer's glasses under every other gate layer's name"),
    Mutant("self_label_answer_of_the_wrong_prompt", "lmms_sgm/selflabel.py",
           "r = batch[j // samples]",
           "r = batch[j % len(batch)]",
           ("tests/test_selflabel.py::test_several_samples_of_several_prompts_per_batch_are_paired_with_their_own_prompt",),
           "self-labelled answers paired with another prompt's question and image when samples > 1"),
    Mutant("template_min_exclusive_in_splits", "lmms_sgm/datasets/splits.py",
           "if len(s) >= template_min}",
           "if len(s) > template_min}",
           ("tests/test_datasets_splits.py::test_a_question_on_exactly_template_min_distinct_images_is_a_template",),
           "a question on exactly --template-min images would link its records into one group"),
    Mutant("template_min_exclusive_in_check", "lmms_sgm/datasets/check.py",
           "if len(s) >= template_min}",
           "if len(s) > template_min}",
           ("tests/test_datasets_build.py::test_check_counts_a_question_on_exactly_the_manifest_s_template_min_images_as_a_template",),
           "dataset check would report leaks of a template question the build (rightly) did not group by"),
    Mutant("self_check_unclear_taken_as_harmful", "lmms_sgm/defenses/builtin.py",
           "out: list[str | None] = [self.refusal if v else None for v in verdicts]",
           "out: list[str | None] = [self.refusal if v is not False else None for v in verdicts]",
           ("tests/test_defenses.py::test_self_check_keeps_an_answer_whose_check_reply_is_neither_yes_nor_no",),
           "the self-check would refuse every answer its model does not plainly call harmless"),
)
