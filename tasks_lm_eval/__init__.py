"""lm-eval (EleutherAI lm-evaluation-harness 0.4) tasks of lmms_sgm: the text-only leg.

Installed as the package ``lmms_sgm_lm_eval_tasks``; ``lm-eval-sgm`` (``lmms_sgm/lm_eval``) adds this
folder to lm-eval's task search path, and ``--include_path`` names it for a plain lm-eval run.
Kept apart from ``tasks/`` (lmms-eval's), whose folder lmms-eval indexes whole.
"""
