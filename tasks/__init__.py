"""lmms-eval tasks shipped with lmms_sgm (installed as the package ``lmms_sgm_tasks``)."""
