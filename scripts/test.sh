#!/usr/bin/env bash
# Install everything, bring up a one-node SLURM cluster on localhost (root + Debian only; otherwise the SLURM tests
# skip with a reason), run the whole test suite, stop the cluster. Usage: bash scripts/test.sh [pytest args]
#
#   bash scripts/test.sh                  # against .venv, installed from requirements.lock (what CI runs)
#   VTW_UNLOCKED=1 bash scripts/test.sh   # against .venv-unlocked, a fresh resolve of pyproject.toml's ranges
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${VTW_UNLOCKED:-0}" = 1 ]; then VENV=${VTW_VENV:-.venv-unlocked}; else VENV=${VTW_VENV:-.venv}; fi
bash scripts/install.sh || exit 1
started=0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && [ -f scripts/slurm_cluster.sh ]; then
  if bash scripts/slurm_cluster.sh start; then started=1; else echo "SLURM cluster did not start: SLURM tests will skip"; fi
fi
cleanup() { [ "$started" = 1 ] && bash scripts/slurm_cluster.sh stop; }
trap cleanup EXIT
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
