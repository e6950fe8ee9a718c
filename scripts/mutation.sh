#!/usr/bin/env bash
# The mutation check (docs/testing.md).
#
#   bash scripts/mutation.sh            # the full pass: mutmut over the modules of [tool.mutmut] in pyproject.toml
#   bash scripts/mutation.sh 'lmms_sgm.expertise*'   # only the mutants whose names match (mutmut's globs)
#   bash scripts/mutation.sh --fast     # the fixed sample CI runs: tests/test_mutants.py (~3 min)
#
# The full pass installs the `mutation` extra (mutmut, pinned) into .venv, runs nice'd on two
# workers, keeps its state in mutants/ (git-ignored; a rerun continues and re-tests only what
# changed) and ends with the summary and the survivors in mutants/summary.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ "${1:-}" = "--fast" ]; then
  exec .venv/bin/python -m pytest -q tests/test_mutants.py
fi
[ -x .venv/bin/python ] || bash scripts/setup.sh
.venv/bin/python -c "import mutmut" 2>/dev/null || .venv/bin/python -m pip install -q -c constraints.txt -e ".[mutation]"
nice -n 10 .venv/bin/mutmut run --max-children "${MUTATION_WORKERS:-2}" "$@" || true
.venv/bin/python scripts/mutation_summary.py | tee mutants/summary.txt
