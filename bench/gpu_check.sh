#!/usr/bin/env bash
# Everything a GPU session should check, in one go (about 3-5 min on one GPU after the installs; no download):
#   1. bench_withdraw.py on LLaVA-1.5-7B's shapes, random-initialised on the GPU in bfloat16: vanilla vs VTW prefill and
#      decode-step latency at K = 8, 16, 24 next to the analytic ratio, KV bytes, peak GPU memory;
#   2. bench_methods.py on the same shapes: every method at half the prefill FLOPs;
#   3. the pipeline on the GPU: the embedded default (tiny-llava on synthvqa, 64 items) in one process, with
#      model.device_map=auto, and, with 2+ GPUs, data parallel over 2 processes (torchrun), compared with the first.
# Outputs go to $OUT (default ./gpu_check): one log per step, and summary.txt. No W&B (logger=none).
#
#   bash bench/gpu_check.sh            # PYTHON=.venv/bin/python by default, else python3
#
# On the lent GPU machine (no network; its image has torch and transformers but not lmms-eval, Hydra, ...): build the
# wheels here with `bash scripts/gpu_wheels.sh`, carry `.whl` with the tree, and run this there. When `.whl/` exists
# and lmms_eval does not import, the wheels are installed into $VTW_SITE (default /tmp/vtw_site, no deps, no network)
# and PYTHONPATH=$VTW_SITE:$PWD: the set's transformers and huggingface-hub go before the image's.
# Each step has its own time limit (BENCH_TIMEOUT=150 s, RUN_TIMEOUT=120 s), cut so that the whole check ends within
# BUDGET_S=560 s of its start (a device command may run 600 s); a step with under 20 s left is skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
BENCH_TIMEOUT=${BENCH_TIMEOUT:-150} RUN_TIMEOUT=${RUN_TIMEOUT:-120} BUDGET_S=${BUDGET_S:-560}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
summary="$OUT/summary.txt"
: > "$summary"
SITE="${VTW_SITE:-/tmp/vtw_site}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ] && ! "$PY" -c "import lmms_eval" 2>/dev/null; then
  if ! PYTHONPATH="$SITE:$PWD" "$PY" -c "import lmms_eval" 2>/dev/null; then
    echo "installing $(ls .whl/*.whl | wc -l) wheels from .whl into $SITE" | tee -a "$summary"
    rm -rf "$SITE"
    if "$PY" -m pip --version > /dev/null 2>&1; then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl
    else  # no pip in the image: a wheel is a zip of what goes into site-packages
      "$PY" -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" \
        "$SITE" .whl/*.whl
    fi
  fi
  export PYTHONPATH="$SITE:$PWD"
fi
step() {  # step NAME SECONDS COMMAND...: run under a time limit, log to $OUT/NAME.log, record the exit status (124:
  # the limit), skip when under 20 s of BUDGET_S is left
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET_S - SECONDS))
  if (( left < 20 )); then
    echo "== $name: skipped (${left} s left of BUDGET_S=$BUDGET_S)" | tee -a "$summary"
    return 0
  fi
  (( limit > left )) && limit=$left
  echo "== $name (limit ${limit} s): $*" | tee -a "$summary"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc, $((SECONDS - t0)) s" | tee -a "$summary"
  tail -n 25 "$OUT/$name.log"
  return 0
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt" | tee -a "$summary"
"$PY" -c "
import platform, torch, transformers
print('ran with: python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus',
      torch.cuda.device_count(), 'transformers', transformers.__version__, 'from', transformers.__file__)
" 2>&1 | tee -a "$summary"

step bench_withdraw "$BENCH_TIMEOUT" "$PY" bench/bench_withdraw.py --config llava-1.5-7b --device cuda --dtype bfloat16
step bench_methods "$BENCH_TIMEOUT" "$PY" bench/bench_methods.py --config llava-1.5-7b --device cuda --dtype bfloat16

common=(dataset.limit=64 vtw.layer=3 compare_baseline=true progress=false logger=none)
step run_cuda "$RUN_TIMEOUT" "$PY" run.py "${common[@]}" device=cuda "hydra.run.dir=$OUT/run_cuda"
step run_device_map "$RUN_TIMEOUT" "$PY" run.py "${common[@]}" model.device_map=auto "hydra.run.dir=$OUT/run_device_map"
if [ "$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)" -ge 2 ]; then
  step run_dp2 "$RUN_TIMEOUT" "$PY" -m torch.distributed.run --nproc_per_node 2 run.py "${common[@]}" \
    "hydra.run.dir=$OUT/run_dp2"
  "$PY" - "$OUT/run_cuda" "$OUT/run_dp2" <<'PYEOF' 2>&1 | tee -a "$summary"
import json, sys
a, b = (json.load(open(f"{d}/results.json")) for d in sys.argv[1:])
for v in ("baseline", "result"):
    print(v, "accuracy 1 proc / 2 procs:", a[v]["accuracy"], b[v]["accuracy"], "tflops:", a[v]["tflops"], b[v]["tflops"],
          "samples/s:", round(a[v]["samples_per_s"], 1), round(b[v]["samples_per_s"], 1))
PYEOF
else
  echo "== run_dp2: skipped (one GPU; two NCCL ranks cannot share a GPU; the CPU test covers 2 processes)" | tee -a "$summary"
fi
for d in run_cuda run_device_map; do
  [ -f "$OUT/$d/results.json" ] && "$PY" -c "
import json; r = json.load(open('$OUT/$d/results.json'))
print('$d', {v: (r[v]['accuracy'], round(r[v]['latency_s'], 4), r[v]['peak_mem_gb']) for v in ('baseline', 'result')}, r['job']['device'], r['job']['device_map'])
" | tee -a "$summary"
done
echo "outputs in $OUT"
