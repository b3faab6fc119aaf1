#!/usr/bin/env bash
# Everything a GPU session should check, in one go (about 3-5 min on one GPU after the installs; no download):
#   1. bench_withdraw.py on LLaVA-1.5-7B's shapes, random-initialised on the GPU in bfloat16: vanilla vs VTW prefill and
#      decode-step latency at K = 8, 16, 24 next to the analytic ratio, KV bytes, peak GPU memory;
#   2. bench_methods.py on the same shapes: every method at half the prefill FLOPs;
#   3. the pipeline on the GPU: the embedded default (tiny-llava on synthvqa, 64 items) in one process, with
#      model.device_map=auto, and, with 2+ GPUs, data parallel over 2 processes (torchrun), compared with the first.
# Outputs go to $OUT (default ./gpu_check): one log per step, and summary.txt.
#
#   bash bench/gpu_check.sh            # PYTHON=.venv/bin/python by default, else python3
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
summary="$OUT/summary.txt"
: > "$summary"
step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, record the exit status
  local name=$1; shift
  echo "== $name: $*" | tee -a "$summary"
  local t0=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc, $((SECONDS - t0)) s" | tee -a "$summary"
  tail -n 25 "$OUT/$name.log"
  return 0
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt" | tee -a "$summary"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())" \
  | tee -a "$summary"

step bench_withdraw "$PY" bench/bench_withdraw.py --config llava-1.5-7b --device cuda --dtype bfloat16
step bench_methods "$PY" bench/bench_methods.py --config llava-1.5-7b --device cuda --dtype bfloat16

common=(dataset.limit=64 vtw.layer=3 compare_baseline=true progress=false logger.mode=offline)
step run_cuda "$PY" run.py "${common[@]}" device=cuda "hydra.run.dir=$OUT/run_cuda"
step run_device_map "$PY" run.py "${common[@]}" model.device_map=auto "hydra.run.dir=$OUT/run_device_map"
if [ "$("$PY" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  step run_dp2 "$PY" -m torch.distributed.run --nproc_per_node 2 run.py "${common[@]}" "hydra.run.dir=$OUT/run_dp2"
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
