#!/usr/bin/env bash
# Create .venv and install vtw with everything it needs (torch, transformers, lmms-eval, Hydra, W&B, test tools).
# Idempotent: re-running only installs what is missing. Usage: bash scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for c in python3.11 python3.12 python3.10 python3; do
    if command -v "$c" >/dev/null 2>&1; then PY=$c; break; fi
  done
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
echo "vtw installed in .venv ($(.venv/bin/python -c 'import torch, transformers, lmms_eval; print("torch", torch.__version__, "transformers", transformers.__version__)' 2>/dev/null))"
