#!/usr/bin/env bash
# Upload the W&B runs that jobs logged offline (compute nodes without network run with wandb.mode=offline) from a
# machine that has network, e.g. the login node:
#
#   slurm/wandb_sync.sh [--dry-run] [--project P] [--entity E] [DIR...]     # DIR default: outputs
#
# Finds every offline run (wandb/offline-run-*/run-<id>.wandb) under the DIRs, skips those `wandb sync` has already
# marked synced (run-<id>.wandb.synced), and syncs the rest with one `wandb sync` call. Safe to run again.
set -euo pipefail

DRY=0
WANDB_ARGS=()
DIRS=()
while (($#)); do
    case $1 in
        --dry-run) DRY=1; shift ;;
        --project | --entity)
            [[ $# -ge 2 ]] || { echo "wandb_sync: $1 needs a value" >&2; exit 2; }
            WANDB_ARGS+=("$1" "$2"); shift 2 ;;
        -h | --help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "wandb_sync: unknown option $1" >&2; exit 2 ;;
        *) DIRS+=("$1"); shift ;;
    esac
done
((${#DIRS[@]})) || DIRS=(outputs)
for d in "${DIRS[@]}"; do
    [[ -d $d ]] || { echo "wandb_sync: '$d' is not a directory" >&2; exit 2; }
done

runs=()
while IFS= read -r -d '' wandb_file; do
    [[ -e $wandb_file.synced ]] && continue
    runs+=("$(dirname "$wandb_file")")
done < <(find "${DIRS[@]}" -path '*/offline-run-*/run-*.wandb' -type f -print0 | sort -z)

if ((${#runs[@]} == 0)); then
    echo "wandb_sync: no unsynced offline runs under ${DIRS[*]}" >&2
    exit 0
fi
echo "wandb_sync: ${#runs[@]} unsynced offline run(s):" >&2
printf '  %s\n' "${runs[@]}" >&2
if ((DRY)); then
    exit 0
fi
command -v wandb >/dev/null || { echo "wandb_sync: the wandb command is not on PATH (activate the venv)" >&2; exit 2; }
wandb sync "${WANDB_ARGS[@]}" "${runs[@]}"
