#!/usr/bin/env bash
# Everything the transfer kernels need checked on a real NVIDIA GPU, in one unattended run.
#
# Made for a short-lived GPU box with PyTorch, nvcc and pytest but no network and no vLLM,
# LMCache, pyzmq or msgspec: only the kernels and their front door (kvconn_plugin.ops) are
# exercised, and they import none of those. It
#   1. builds the native libraries in place for the local GPU's architecture,
#   2. prints the build record (python -m kvconn_plugin),
#   3. runs tests/kernels with KVCONN_KERNELS=native (GPU parity, poisoned outputs, stream
#      ordering, bounds errors, plus the CPU parity suite),
#   4. runs the cuda tests once more under compute-sanitizer memcheck when it is installed,
#   5. runs benchmarks/bench_transfer.py --sweep-ctas.
# Logs and JSON land in $OUT (default .gpucheck/); a summary line per step ends the output.
# A failing step does not stop the later ones, and the whole run ends within BUDGET_S seconds
# (default 540: each step's limit is cut to what is left). Expect 3-6 minutes on an H200.
# At most 8 files are written, so everything fits what a remote runner hands back.
#
#   bash scripts/gpu_check.sh                 # uses python3 from PATH
#   PYTHON=/path/python OUT=/tmp/r bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-.gpucheck}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export KVCONN_KERNELS=native
SUMMARY=()
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-540} ))

step() {  # step NAME TIMEOUT_S CMD...: runs CMD, tees its output to $OUT/NAME.log
  local name=$1 limit=$2 t0 rc left
  shift 2
  t0=$(date +%s)
  left=$(( DEADLINE - t0 - 5 ))
  if (( left < 20 )); then
    SUMMARY+=("$(printf '%-10s skipped (time budget spent)' "$name")")
    return 0
  fi
  (( limit > left )) && limit=$left
  echo "=== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  SUMMARY+=("$(printf '%-10s rc=%-3s %4ss' "$name" "$rc" "$(( $(date +%s) - t0 ))")")
  return "$rc"
}

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader
  nvcc --version | tail -n 2
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
  "cuda", torch.version.cuda, "gpu", torch.cuda.is_available())'
} 2>&1 | tee "$OUT/machine.txt"

# Only the local architecture: a full fat build is setup.py's job, not this check's.
CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
export KVCONN_CUDA_ARCHS=${KVCONN_CUDA_ARCHS:-${CAP:-90}} KVCONN_BUILD_CUDA=1 KVCONN_BUILD_CPU=1
step build 180 "$PY" setup.py -q build_ext --inplace
step doctor 60 "$PY" -m kvconn_plugin

# Third-party deprecations of whatever torch the box has stay visible but do not fail the run;
# everything else keeps the project's warnings-are-errors setting.
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rs -W default::DeprecationWarning
        -W default::FutureWarning -W default::UserWarning)
step tests 240 "${PYTEST[@]}" tests/kernels
step bench 240 "$PY" benchmarks/bench_transfer.py --device cuda --sweep-ctas \
  --json "$OUT/bench_transfer.json"

# Last, because it is the slowest and the least essential: the same cuda tests with every
# device access checked. Fewer hypothesis examples, as memcheck slows each kernel a lot.
if command -v compute-sanitizer >/dev/null 2>&1; then
  step memcheck 300 env KVCONN_HYPOTHESIS_EXAMPLES=4 compute-sanitizer --tool memcheck \
    --error-exitcode 97 --target-processes all "${PYTEST[@]}" -m cuda tests/kernels
else
  SUMMARY+=("memcheck   skipped (no compute-sanitizer)")
fi

echo "=== summary ($OUT)"
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
! grep -q 'rc=[1-9]' "$OUT/summary.txt"
