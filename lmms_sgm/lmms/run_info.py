"""Deprecated: moved to :mod:`lmms_sgm.harness_common` (shared by the lmms-eval and lm-eval adapters);
this path keeps working, with a warning, for one release."""
import warnings

from lmms_sgm.harness_common import current, demo_data, publish  # noqa: F401

warnings.warn("lmms_sgm.lmms.run_info is deprecated: import lmms_sgm.harness_common (publish, current, demo_data)",
              DeprecationWarning, stacklevel=2)
