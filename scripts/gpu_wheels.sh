#!/usr/bin/env bash
# Build the wheel folder that bench/gpu_check.sh installs on the lent GPU machine, which has no network and whose image
# lacks lmms-eval, Hydra and their run-time needs (IMAGE in scripts/gpu_wheels_check.py: what the image has). Every
# wheel is at requirements.lock's version, for CPython 3.12 on manylinux x86_64, plus a dist-info-only wheel of vtw
# (its code comes from the carried tree on PYTHONPATH) so that lmms-eval finds the `vtw` model through the
# `lmms_eval.models` entry point.
#
#   bash scripts/gpu_wheels.sh             # -> .whl/, then checks it (scripts/gpu_wheels_check.py), prints its size
#   WHL=DIR bash scripts/gpu_wheels.sh     # another folder
#
# Then carry .whl to the device machine and run `bash bench/gpu_check.sh` there.
set -euo pipefail
cd "$(dirname "$0")/.."
WHL=${WHL:-.whl}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
# What the image lacks and the run path (run.py logger=none -> lmms-eval -> vtw) needs. Not wandb (gpu_check.sh runs
# with logger=none), not PyAV (video only). antlr4-python3-runtime is built below: PyPI has only its sdist.
PACKAGES=(
  # named by the image notes
  lmms-eval hydra-core omegaconf datasets evaluate dill multiprocess loguru numexpr python-dotenv zstandard chardet
  defusedxml truststore httpx2 httpcore2 wcwidth sniffio pytz submitit hydra-submitit-launcher
  # imported on the run path too (found with `scripts/gpu_wheels_check.py simulate`): datasets -> xxhash;
  # lmms_eval.api.task -> tenacity; evaluate -> requests; lmms_eval.api.metrics -> sacrebleu -> portalocker,
  # tabulate, colorama, lxml; lmms_eval.llm_judge -> aiohttp -> multidict, attrs, yarl, propcache, aiohappyeyeballs,
  # aiosignal, frozenlist
  xxhash tenacity requests urllib3 charset-normalizer sacrebleu portalocker tabulate colorama lxml aiohttp multidict
  attrs yarl propcache aiohappyeyeballs aiosignal frozenlist
  # submitit's requirement (launcher=slurm only, never imported on the run path; small, keeps the set consistent)
  cloudpickle
  # newer than the image's: vtw pins transformers, which needs this regex; datasets needs huggingface-hub 2.x
  transformers regex huggingface-hub
)
locked() {  # locked NAME: the version requirements.lock pins NAME to (its lines are `name==version[ ; marker]`)
  local v
  v=$(grep -iE "^$1==" requirements.lock | head -n1 | sed -E 's/ *;.*//; s/^[^=]+==//')
  [ -n "$v" ] || { echo "gpu_wheels: $1 is not in requirements.lock" >&2; exit 1; }
  echo "$v"
}
pins=()
for p in "${PACKAGES[@]}"; do pins+=("$p==$(locked "$p")"); done
rm -rf "$WHL" && mkdir -p "$WHL"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$WHL" "${pins[@]}"
"$PY" -m pip wheel -q --no-deps --no-binary=:all: -w "$WHL" "antlr4-python3-runtime==$(locked antlr4-python3-runtime)"

# vtw: METADATA + entry_points.txt only (name, version and entry points from pyproject.toml)
"$PY" - "$WHL" <<'PYEOF'
import base64, hashlib, sys, tomllib, zipfile

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
name, version = project["name"], project["version"]
info = f"{name}-{version}.dist-info"
eps = "".join(
    f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()) + "\n"
    for group, entries in project.get("entry-points", {}).items()
)
files = {
    f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nSummary: {project['description']}\n",
    f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: scripts/gpu_wheels.sh\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    f"{info}/entry_points.txt": eps,
}
digest = lambda s: base64.urlsafe_b64encode(hashlib.sha256(s.encode()).digest()).rstrip(b"=").decode()  # noqa: E731
record = "".join(f"{p},sha256={digest(s)},{len(s.encode())}\n" for p, s in files.items()) + f"{info}/RECORD,,\n"
with zipfile.ZipFile(f"{sys.argv[1]}/{name}-{version}-py3-none-any.whl", "w", zipfile.ZIP_DEFLATED) as z:
    for path, text in {**files, f"{info}/RECORD": record}.items():
        z.writestr(path, text)
PYEOF

# Prove the set installs for CPython 3.12 manylinux x86_64 (pip checks every wheel's tags), then check each
# wheel's Requires-Dist against the set and the image's packages.
target=$(mktemp -d)
trap 'rm -rf "$target"' EXIT
"$PY" -m pip install -q --no-deps --no-index --only-binary=:all: --find-links "$WHL" --python-version 3.12 \
  --implementation cp --abi cp312 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --target "$target" "$WHL"/*.whl
"$PY" scripts/gpu_wheels_check.py requires "$target"
echo "$WHL: $(ls "$WHL"/*.whl | wc -l) wheels, $(du -cb "$WHL"/*.whl | tail -n1 | awk '{printf "%.1f MiB", $1 / 1048576}')"
