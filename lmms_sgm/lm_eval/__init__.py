"""lm-eval (EleutherAI lm-evaluation-harness 0.4) integration: the ``sgm_hf`` model and the
``lm-eval-sgm`` launcher. The only part of lmms_sgm that imports lm_eval (docs/text_only.md)."""
