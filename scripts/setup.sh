#!/usr/bin/env bash
# Idempotent set-up: a .venv with this package and everything it needs, from the repo's own files.
# Re-running is cheap: it reinstalls only when pyproject.toml or constraints.txt changed.
# Quiet by default (pip's output goes to .venv/setup.log, shown if a step fails); one closing line
# says what is ready. SETUP_VERBOSE=1 shows everything.
set -euo pipefail
cd "$(dirname "$0")/.."

# The CPU torch 2.13.0 wheel these machines carry is for CPython 3.11.
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
LOG=.venv/setup.log

step() {  # step DESCRIPTION CMD...: run quietly into $LOG; on failure show the log's tail and stop
  local what=$1
  shift
  if [ "${SETUP_VERBOSE:-0}" = 1 ]; then
    "$@"
    return
  fi
  if ! "$@" >>"$LOG" 2>&1; then
    echo "set-up failed while trying to $what; the last lines of $LOG:" >&2
    tail -n 40 "$LOG" >&2
    exit 1
  fi
}

[ -x .venv/bin/python ] || "$PY" -m venv .venv

# LMMS_SGM_NDIF=1 (CI): also NDIF's own server code for tests/test_ndif_real.py.
extras="eval,test,judges"
NDIF_PIN="ndif==0.1.2"
[ "${LMMS_SGM_NDIF:-0}" = 1 ] && extras="$extras,ndif-server"
want=$( (cat pyproject.toml constraints.txt; echo "$extras $NDIF_PIN") | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/.setup-stamp 2>/dev/null)" != "$want" ]; then
  : >"$LOG"
  echo "setting up .venv (first time ~3-4 minutes; log: $LOG)"
  step "upgrade pip" .venv/bin/python -m pip install -q --upgrade pip
  # constraints.txt pins torch==2.13.0 (CPU): anything newer pulls a multi-GB CUDA build.
  step "install lmms_sgm and its dependencies" .venv/bin/python -m pip install -q -c constraints.txt -e ".[$extras]"
  if [ "${LMMS_SGM_NDIF:-0}" = 1 ]; then
    # It declares Python >= 3.12 and pulls Ray (a GPU cluster's worth): neither is needed for the test.
    step "install $NDIF_PIN (NDIF's server code)" .venv/bin/python -m pip install -q --no-deps --ignore-requires-python "$NDIF_PIN"
  fi
  # lmms-eval drags in torchvision, whose only wheel here is a CUDA build that fails beside CPU
  # torch and then breaks LLaVA's import; transformers falls back to PIL image processors.
  if ! .venv/bin/python -c "import torchvision" >/dev/null 2>&1; then
    step "remove the broken torchvision" .venv/bin/python -m pip uninstall -y -q torchvision
  fi
  echo "$want" > .venv/.setup-stamp
  state="installed"
else
  state="up to date"
fi
versions=$(.venv/bin/python - <<'EOF'
from importlib.metadata import version
print(", ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "nnsight", "lmms_eval", "lm_eval")))
EOF
)
echo "lmms_sgm set-up: .venv $state ($versions); next: .venv/bin/lmms-sgm demo, or .venv/bin/python -m pytest -q"
