#!/usr/bin/env bash
# Refresh requirements.lock: resolve pyproject.toml's dependencies with its `dev` and `slurm` extras, plus
# requirements/lock-inputs.txt (pip, setuptools, the torch build of the dev/CI machines), to the newest releases the
# ranges allow, with uv's `uv pip compile` (a pinned uv, installed into .venv-lock). The lock is universal: one file
# for Python 3.11-3.12 on Linux (x86_64 and aarch64) and macOS, with environment markers where versions differ.
#
#   bash scripts/lock.sh                 # rewrite requirements.lock
#   bash scripts/lock.sh --upgrade-package wandb   # extra arguments go to `uv pip compile`
#
# Then install from it (bash scripts/install.sh) on a fresh venv and run the suite before committing the new lock.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
PY=${PYTHON:-python3}
if ! [ -x .venv-lock/bin/uv ] || [ "$(.venv-lock/bin/uv --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  "$PY" -m venv .venv-lock
  .venv-lock/bin/python -m pip install -q "uv==$UV_VERSION"
fi
.venv-lock/bin/uv pip compile pyproject.toml requirements/lock-inputs.txt \
  --extra dev --extra slurm --universal --python-version 3.11 \
  --index-url https://pypi.org/simple --no-config \
  --custom-compile-command "bash scripts/lock.sh" \
  -o requirements.lock "$@"
echo "requirements.lock: $(grep -cE '^[A-Za-z0-9]' requirements.lock) pinned lines"
