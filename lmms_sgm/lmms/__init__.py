"""lmms-eval integration: the only part of lmms_sgm that imports lmms_eval."""
