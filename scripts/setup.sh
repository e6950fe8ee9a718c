#!/usr/bin/env bash
# Idempotent set-up: a .venv with this package and everything it needs, from the repo's own files.
# Re-running is cheap: it reinstalls only when pyproject.toml or constraints.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."

# The CPU torch 2.13.0 wheel these machines carry is for CPython 3.11.
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
[ -x .venv/bin/python ] || "$PY" -m venv .venv

want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/.setup-stamp 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # constraints.txt pins torch==2.13.0 (CPU): anything newer pulls a multi-GB CUDA build.
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[eval,test]"
  # lmms-eval drags in torchvision, whose only wheel here is a CUDA build that fails beside CPU
  # torch and then breaks LLaVA's import; transformers falls back to PIL image processors.
  if ! .venv/bin/python -c "import torchvision" >/dev/null 2>&1; then
    .venv/bin/python -m pip uninstall -y -q torchvision || true
  fi
  echo "$want" > .venv/.setup-stamp
fi
