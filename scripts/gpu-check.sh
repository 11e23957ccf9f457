#!/usr/bin/env bash
# What only a GPU can check (issue 7), stage by stage, each stage's log under OUT_DIR:
#   build     libpi_backend_cuda.so for this GPU's architecture (nvcc, -Werror)
#   tests     the GPU-marked tests: device kernels vs numpy, the whole model vs the CPU engine
#   generate  the CLI on the built-in model, CPU and GPU, greedy: the same text expected
#   gpu       the GPU kernel benchmarks (python -m ci.perf --suite gpu)
#   gpu_model the hybrid-model benchmarks (--suite gpu_model; builds the 7B-shaped bench models first)
# A stage that fails does not stop the later ones; the exit status is the number of failed stages.
#
# Usage: scripts/gpu-check.sh OUT_DIR [STAGE ...]   (default: every stage but gpu_model)
#   PYTHON   interpreter (default python3); the CPU module must be built (pip install -e . does both)
#   PI_CUDA_ARCHS  default: the compute capability nvidia-smi reports
#   STAGE_TIMEOUT  seconds per stage (default 900)
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="$(mkdir -p "${1:?usage: scripts/gpu-check.sh OUT_DIR [STAGE ...]}" && cd "$1" && pwd)"
shift
[ $# -gt 0 ] || set -- build tests generate gpu
PY="${PYTHON:-python3}"
cd "$ROOT"
export PYTHONUNBUFFERED=1

if [ -z "${PI_CUDA_ARCHS:-}" ] && command -v nvidia-smi >/dev/null; then
  PI_CUDA_ARCHS="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')"
  export PI_CUDA_ARCHS
fi

failed=0
stage() {  # stage NAME COMMAND...: run it with a time limit, log to OUT/NAME.log, print the tail
  local name=$1 t0=$SECONDS rc
  shift
  echo "== $name: $*"
  if declare -F "$1" >/dev/null; then "$@"; else timeout "${STAGE_TIMEOUT:-900}" "$@"; fi >"$OUT/$name.log" 2>&1
  rc=$?
  echo "   rc=$rc in $((SECONDS - t0)) s"
  tail -n 15 "$OUT/$name.log" | sed 's/^/   | /'
  [ $rc -eq 0 ] || failed=$((failed + 1))
}

generate_both() {  # the built-in model on the CPU, then with a 64 MiB VRAM budget: the same greedy text
  local cpu gpu
  cpu="$("$PY" -m pi_backend.cli generate -n 24 --device cpu)" || return 1
  gpu="$("$PY" -m pi_backend.cli generate -n 24 --device gpu --vram-budget 0.0625 --reset-gpu-index)" || return 1
  printf -- '--- cpu: %s\n--- gpu: %s\n' "$cpu" "$gpu"
  [ "$cpu" = "$gpu" ]
}

for s in "$@"; do
  case $s in
    build) { command -v nvidia-smi >/dev/null && nvidia-smi; } >"$OUT/nvidia-smi.log" 2>&1
           stage build "$PY" pi_backend/native/build_gpu.py --cuda --strict ;;
    tests) stage tests "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_kernels.py tests/test_gpu_model.py ;;
    generate) stage generate generate_both ;;
    gpu|gpu_model) stage "$s" "$PY" -m ci.perf --suite "$s" --update
                   cp -f "ci/baselines/$s.json" "$OUT/" 2>/dev/null ;;
    *) echo "unknown stage $s" >&2; failed=$((failed + 1)) ;;
  esac
done
exit $failed
