#!/usr/bin/env bash
# Submit a vtw sweep to SLURM with plain sbatch: one job array (one task per point of the sweep), optionally a layer
# search job first (when the spec has vtw.layer=auto), and a summary job after the array. See slurm/README.md.
#
#   slurm/submit_sweep.sh [options] [--] OVERRIDE...        # a new sweep (Hydra -m syntax: vtw.layer=null,8,12)
#   slurm/submit_sweep.sh --spec sweeps/layers.txt          # the same from a spec file
#   slurm/submit_sweep.sh --sweep-dir outputs/sweeps/X      # resubmit: runs only the points without results
set -euo pipefail

usage() {
    cat <<'EOF'
usage: slurm/submit_sweep.sh [options] [--] [OVERRIDE...]

The sweep:
  --spec FILE            sweep spec file: Hydra -m overrides, lines joined, '#' comments
  OVERRIDE...            more overrides (after the spec's), e.g. vtw.layer=null,8,12 model=tiny-llava limit=20
  --sweep-dir DIR        sweep directory (default outputs/sweeps/<date_time>). If DIR already holds a sweep
                         (sweep.json), it is resubmitted: no spec or overrides then; only unfinished points run.
  --only LIST            array indices to (re)run, e.g. 1,3-4 (default: every point without results)
  --no-search            do not run the layer search as a first job when points have vtw.layer=auto

Resources (per array task):
  --partition P  --account A  --qos Q
  --time T               minutes or [D-]HH:MM:SS (default 60)
  --cpus-per-task N      (default 8)
  --gpus N               GPUs per task, as --gres=gpu:N; 0 for none (default 1)
  --mem M                e.g. 32G (default: the partition's default)
  --parallel N           run at most N array tasks at once (--array=...%N)
  --job-name NAME        (default vtw-sweep)
  --setup LINE           shell line run before each job, e.g. 'module load cuda/12.1' (repeatable). Lines are kept
                         in DIR/setup.sh, which also cds to the project and activates the submitting venv.
  --sbatch-arg ARG       any other sbatch option, for every job (repeatable), e.g. --sbatch-arg=--exclude=node7

  --dry-run              write the plan, print the sbatch commands, submit nothing
  -h, --help

Prints VTW_SWEEP_DIR=..., VTW_SEARCH_JOB=..., VTW_ARRAY_JOB=..., VTW_SUMMARY_JOB=... on stdout.
EOF
}

PROJECT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SLURM_DIR=$PROJECT_DIR/slurm
PYTHON=${VTW_PYTHON:-python}

SPEC="" SWEEP_DIR="" ONLY="" SEARCH=1 DRY=0
PARTITION="" ACCOUNT="" QOS="" TIME=60 CPUS=8 GPUS=1 MEM="" PARALLEL="" JOB_NAME=vtw-sweep
SETUP=() EXTRA=() OVERRIDES=()

die() { echo "submit_sweep: error: $*" >&2; exit 2; }
need() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"; }

while (($#)); do
    case $1 in
        --spec) need "$@"; SPEC=$2; shift 2 ;;
        --sweep-dir) need "$@"; SWEEP_DIR=$2; shift 2 ;;
        --only) need "$@"; ONLY=$2; shift 2 ;;
        --no-search) SEARCH=0; shift ;;
        --partition) need "$@"; PARTITION=$2; shift 2 ;;
        --account) need "$@"; ACCOUNT=$2; shift 2 ;;
        --qos) need "$@"; QOS=$2; shift 2 ;;
        --time) need "$@"; TIME=$2; shift 2 ;;
        --cpus-per-task) need "$@"; CPUS=$2; shift 2 ;;
        --gpus) need "$@"; GPUS=$2; shift 2 ;;
        --mem) need "$@"; MEM=$2; shift 2 ;;
        --parallel) need "$@"; PARALLEL=$2; shift 2 ;;
        --job-name) need "$@"; JOB_NAME=$2; shift 2 ;;
        --setup) need "$@"; SETUP+=("$2"); shift 2 ;;
        --sbatch-arg) need "$@"; EXTRA+=("$2"); shift 2 ;;
        --sbatch-arg=*) EXTRA+=("${1#--sbatch-arg=}"); shift ;;
        --dry-run) DRY=1; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; OVERRIDES+=("$@"); break ;;
        -m | --multirun) die "$1: not needed, every submission is a sweep" ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) OVERRIDES+=("$1"); shift ;;
    esac
done

[[ $CPUS =~ ^[1-9][0-9]*$ ]] || die "--cpus-per-task must be a positive integer, got '$CPUS'"
[[ $GPUS =~ ^[0-9]+$ ]] || die "--gpus must be a non-negative integer, got '$GPUS'"
[[ -z $PARALLEL || $PARALLEL =~ ^[1-9][0-9]*$ ]] || die "--parallel must be a positive integer, got '$PARALLEL'"
[[ $TIME =~ ^[0-9]+$|^([0-9]+-)?[0-9]+(:[0-9]+){1,2}$ ]] || die "--time must be minutes or [D-]HH:MM:SS, got '$TIME'"
[[ -z $ONLY || $ONLY =~ ^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$ ]] || die "--only must look like 1,3-4, got '$ONLY'"
[[ -z $SPEC || -f $SPEC ]] || die "--spec file '$SPEC' does not exist"
[[ -z $SPEC ]] || SPEC=$(realpath "$SPEC")
if ((!DRY)); then
    command -v sbatch >/dev/null || die "sbatch not found: not on a SLURM cluster (see slurm/README.md)"
fi

if [[ -z $SWEEP_DIR ]]; then
    SWEEP_DIR=$PROJECT_DIR/outputs/sweeps/$(date +%Y-%m-%d_%H-%M-%S)
fi
mkdir -p "$SWEEP_DIR"
SWEEP_DIR=$(cd "$SWEEP_DIR" && pwd)
[[ $SWEEP_DIR != *[\'\\,]* ]] || die "the sweep dir must not contain quotes, backslashes or commas: $SWEEP_DIR"
[[ -f $SWEEP_DIR/sweep.json ]] && echo "resubmitting the sweep in $SWEEP_DIR" >&2

# Plan a new sweep (sweep.json) or read the existing one; learn the layer searches and the points without results.
spec_args=()
[[ -n $SPEC ]] && spec_args=(--spec "$SPEC")
info=$(cd "$PROJECT_DIR" && "$PYTHON" -m vtw.pipeline.sweepspec prepare --config-dir "$PROJECT_DIR/conf" \
    "${spec_args[@]}" -- "$SWEEP_DIR" "${OVERRIDES[@]}") || die "could not plan the sweep (see above)"
NPOINTS=$(sed -n 's/^points=//p' <<<"$info")
NSEARCH=$(sed -n 's/^searches=//p' <<<"$info")
PENDING=$(sed -n 's/^pending=//p' <<<"$info")
echo "$SWEEP_DIR: $NPOINTS points, $NSEARCH layer searches, without results: ${PENDING:-none}" >&2
mkdir -p "$SWEEP_DIR/logs"

# setup.sh: sourced by every job before it runs anything. Kept from an earlier submission unless --setup is given.
if [[ ! -f $SWEEP_DIR/setup.sh || ${#SETUP[@]} -gt 0 ]]; then
    {
        echo "# Sourced by slurm/sweep.sbatch and slurm/summary.sbatch before they run (edit it, then resubmit)."
        printf 'cd %q\n' "$PROJECT_DIR"
        if [[ -n ${VIRTUAL_ENV:-} ]]; then printf 'source %q\n' "$VIRTUAL_ENV/bin/activate"; fi
        for line in "${SETUP[@]}"; do echo "$line"; done
    } >"$SWEEP_DIR/setup.sh.tmp"
    mv "$SWEEP_DIR/setup.sh.tmp" "$SWEEP_DIR/setup.sh"
fi

INDICES=${ONLY:-$PENDING}

common=(--parsable --export="ALL,VTW_SWEEP_DIR=$SWEEP_DIR")
[[ -n $PARTITION ]] && common+=(--partition="$PARTITION")
[[ -n $ACCOUNT ]] && common+=(--account="$ACCOUNT")
[[ -n $QOS ]] && common+=(--qos="$QOS")
common+=("${EXTRA[@]}")
task=(--time="$TIME" --cpus-per-task="$CPUS" --requeue --open-mode=append)
((GPUS > 0)) && task+=(--gres="gpu:$GPUS")
[[ -n $MEM ]] && task+=(--mem="$MEM")

submit() {  # submit ARGS...: sbatch, print the job id (or a fake one with --dry-run)
    if ((DRY)); then
        printf '%q ' sbatch "$@" >&2
        echo >&2
        echo "DRYRUN"
    else
        sbatch "$@"
    fi
}

SEARCH_JOB="" ARRAY_JOB=""
if [[ -n $INDICES ]]; then
    dep=()
    if ((SEARCH && NSEARCH > 0)); then
        SEARCH_JOB=$(submit "${common[@]}" "${task[@]}" --job-name="$JOB_NAME-search" --array="0-$((NSEARCH - 1))" \
            --output="$SWEEP_DIR/logs/search_%A_%a.out" --export="ALL,VTW_SWEEP_DIR=$SWEEP_DIR,VTW_SWEEP_STAGE=search" \
            "$SLURM_DIR/sweep.sbatch")
        SEARCH_JOB=${SEARCH_JOB%%;*}
        dep=(--dependency="afterok:$SEARCH_JOB" --kill-on-invalid-dep=yes)
    fi
    array=$INDICES
    [[ -n $PARALLEL ]] && array+="%$PARALLEL"
    ARRAY_JOB=$(submit "${common[@]}" "${task[@]}" "${dep[@]}" --job-name="$JOB_NAME" --array="$array" \
        --output="$SWEEP_DIR/logs/%A_%a.out" "$SLURM_DIR/sweep.sbatch")
    ARRAY_JOB=${ARRAY_JOB%%;*}
    echo "submitted points $INDICES as job array $ARRAY_JOB" >&2
else
    echo "every point has results; only the summary runs" >&2
fi

sdep=()
[[ -n $ARRAY_JOB ]] && sdep=(--dependency="afterany:$ARRAY_JOB" --kill-on-invalid-dep=no)
SUMMARY_JOB=$(submit "${common[@]}" "${sdep[@]}" --job-name="$JOB_NAME-summary" --time=30 --cpus-per-task=1 \
    --output="$SWEEP_DIR/logs/summary_%j.out" "$SLURM_DIR/summary.sbatch")
SUMMARY_JOB=${SUMMARY_JOB%%;*}

if ((!DRY)); then
    printf '%s search=%s array=%s points=%s summary=%s\n' "$(date -Is)" "${SEARCH_JOB:--}" "${ARRAY_JOB:--}" \
        "${INDICES:--}" "$SUMMARY_JOB" >>"$SWEEP_DIR/submissions.log"
fi
echo "VTW_SWEEP_DIR=$SWEEP_DIR"
echo "VTW_SEARCH_JOB=$SEARCH_JOB"
echo "VTW_ARRAY_JOB=$ARRAY_JOB"
echo "VTW_SUMMARY_JOB=$SUMMARY_JOB"
