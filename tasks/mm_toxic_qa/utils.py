"""The functions the MM-TOXIC-QA YAMLs name (``!function utils.<name>``).

lmms-eval executes this file by path once per ``!function`` reference, each time as a fresh module
called ``utils``. The code therefore lives in the importable module
``lmms_sgm_tasks.mm_toxic_qa.core``, so there is one copy of each function and of the error class
(``except MMToxicQAError`` catches what a run raises), whichever way it was reached.
"""
from lmms_sgm_tasks.mm_toxic_qa.core import (  # noqa: F401
    MMToxicQAError,
    aggregate_by_category,
    aggregate_judge,
    aggregate_perplexity,
    aggregate_rate,
    aggregate_sgm,
    doc_to_fluency_target,
    doc_to_target,
    doc_to_text,
    doc_to_visual,
    process_adv,
    process_benign,
    process_benign_results,
    process_fluency,
    process_fluency_results,
    process_harmful,
    process_harmful_results,
)
