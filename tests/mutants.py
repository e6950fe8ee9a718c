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
    Mutant("glasses_digest_ignores_nontoxic_means", "lmms_sgm/glasses.py",
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
    Mutant("towards_mean_shift_sign", "lmms_sgm/glasses.py",
           "shift = ((1 - f.to(torch.float64)) * self.mean_nontoxic[name].to(torch.float64)).to(torch.float32)",
           "shift = ((f.to(torch.float64) - 1) * self.mean_nontoxic[name].to(torch.float64)).to(torch.float32)",
           ("tests/test_intervention.py::test_towards_mean_matches_reference",),
           "towards=nontoxic_mean would push experts away from the non-toxic mean"),
)
