"""The functions the mmbench_local YAMLs name (``!function utils.<name>``).

lmms-eval executes this file by path once per ``!function`` reference, each time as a fresh module
called ``utils``; the code lives in the importable module ``lmms_sgm_tasks.mmbench_local.core``.
"""
from lmms_sgm_tasks.mmbench_local.core import (  # noqa: F401
    MMBenchLocalError,
    aggregate_accuracy,
    aggregate_accuracy_by_category,
    doc_to_choice,
    doc_to_target_mc,
    doc_to_text_mc,
    process_docs,
    process_results,
)
