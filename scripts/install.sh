#!/usr/bin/env bash
# Create a venv and install vtw with everything it needs (torch, transformers, lmms-eval, Hydra, W&B, test tools).
#
#   bash scripts/install.sh                  # .venv, exactly the versions in requirements.lock (what CI tests)
#   VTW_UNLOCKED=1 bash scripts/install.sh   # .venv-unlocked, a fresh resolve of pyproject.toml's ranges (newest
#                                            # releases they allow): how upstream breaks are seen before users see them
#
# VTW_VENV=DIR picks another venv folder; PYTHON=python3.12 another interpreter. Idempotent: re-running installs
# only what differs from the lock. Refresh the lock with: bash scripts/lock.sh
set -euo pipefail
cd "$(dirname "$0")/.."
UNLOCKED=${VTW_UNLOCKED:-0}
if [ "$UNLOCKED" = 1 ]; then VENV=${VTW_VENV:-.venv-unlocked}; else VENV=${VTW_VENV:-.venv}; fi
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for c in python3.11 python3.12 python3; do
    if command -v "$c" >/dev/null 2>&1; then PY=$c; break; fi
  done
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_install() { "$VENV/bin/python" -m pip install -q "$@"; }
if [ "$UNLOCKED" = 1 ]; then
  pip_install --upgrade pip
  pip_install --upgrade --upgrade-strategy eager -e ".[dev]"
  mode="unlocked resolve of pyproject.toml"
else
  # The lock's pip first, then every locked package as pinned (--no-deps: nothing outside the lock is resolved),
  # then vtw itself, built with the locked setuptools. `pip check` proves the lock is complete and consistent.
  pip_install "$(grep -E '^pip==' requirements.lock)"
  pip_install --no-deps -r requirements.lock
  pip_install --no-deps --no-build-isolation -e .
  # (decord's only wheel is tagged cp36 inside, so pip check calls it "not supported on this platform"; it works.)
  broken=$("$VENV/bin/python" -m pip check 2>&1 | grep -vE '^No broken requirements found|is not supported on this platform$' || true)
  [ -z "$broken" ] || { echo "pip check: $broken" >&2; exit 1; }
  mode="requirements.lock, sha256 $(sha256sum requirements.lock | cut -c1-12)"
fi
echo "vtw installed in $VENV from $mode ($("$VENV/bin/python" -c 'import torch, transformers, lmms_eval; print("torch", torch.__version__, "transformers", transformers.__version__)' 2>/dev/null))"
