#!/usr/bin/env bash
# The mutation check (docs/testing.md).
#
#   bash scripts/mutation.sh --fast              # the fixed sample CI runs: tests/test_mutants.py (~5 min)
#   bash scripts/mutation.sh                     # the full pass: every group of scripts/mutation.py (hours)
#   bash scripts/mutation.sh expertise reports   # some groups (expertise, options, glasses, intervention,
#                                                # profiling, reports, scoring, tasks, wrapper)
#   bash scripts/mutation.sh --summary           # the kill rates and survivors of what ran
#
# The full pass installs the `mutation` extra (mutmut, pinned) into .venv and runs each group of
# modules against its own tests, nice'd, two workers (MUTATION_WORKERS), with its state in
# .mutation/<group>/ (git-ignored; a rerun continues and re-tests only what changed).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ "${1:-}" = "--fast" ]; then
  exec .venv/bin/python -m pytest -q tests/test_mutants.py
fi
[ -x .venv/bin/python ] || bash scripts/setup.sh
.venv/bin/python -c "import mutmut" 2>/dev/null || .venv/bin/python -m pip install -q -c constraints.txt -e ".[mutation]"
exec .venv/bin/python scripts/mutation.py "$@"
