"""The functions the sgm_text YAMLs name (``!function utils.<name>``).

lm-eval executes this file by path, as a module of its own; the code lives in the importable
``lmms_sgm_lm_eval_tasks.sgm_text.core`` so that there is one copy of each function.
"""
from lmms_sgm_lm_eval_tasks.sgm_text.core import (  # noqa: F401
    aggregate_judge,
    aggregate_sgm,
    load_prompts,
    load_texts,
    process_ppl_results,
    process_sampled_toxicity_results,
    process_toxicity_results,
)
