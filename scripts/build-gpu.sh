#!/usr/bin/env bash
# Compile pi_backend's device kernels (CI runs this on every run: a kernel that does not compile fails
# CI even on machines without a GPU).
#   - libpi_backend_cuda.so with nvcc: sm_80, sm_86, sm_89, sm_90 + compute_90 PTX, one -O3 compile,
#     warnings are errors (PI_CUDA_ARCHS=80,90 narrows the list);
#   - libpi_backend_hip.so with hipcc when it is installed (scripts/install-hipcc.sh): gfx90a, gfx1030,
#     gfx1100 (PI_HIP_ARCHS narrows; a missing ROCm ISA bitcode file is synthesized, see build_gpu.py);
#   - then checks that each library exports every pi_dev_* entry point the header declares.
# Usage: scripts/build-gpu.sh [OUT_DIR]   (default: pi_backend/native, where device.py loads them)
# PI_GPU_SKIP_HIP=1 skips the HIP build.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
OUT="${1:-$ROOT/pi_backend/native}"
BUILD="$ROOT/pi_backend/native/build_gpu.py"
HEADER="$ROOT/pi_backend/native/include/pi_backend.h"

expected="$(sed -n '/PI_DEVICE_CDEF_BEGIN/,/PI_DEVICE_CDEF_END/p' "$HEADER" | grep -o 'pi_dev_[a-z0-9_]*(' | tr -d '(' | sort -u)"
check_exports() {
  local lib="$1" have missing
  have="$(nm -D --defined-only "$lib" | awk '$2 == "T" {print $3}' | grep '^pi_dev_' | sort -u || true)"
  missing="$(comm -23 <(echo "$expected") <(echo "$have"))"
  if [ -n "$missing" ]; then
    echo "error: $lib does not export: $missing" >&2
    exit 1
  fi
  echo "$lib exports all $(echo "$expected" | wc -l) pi_dev_* entry points"
}

"$PY" "$BUILD" --cuda --strict --out "$OUT"
check_exports "$OUT/libpi_backend_cuda.so"

if [ "${PI_GPU_SKIP_HIP:-0}" != "1" ] && { command -v hipcc >/dev/null || [ -x "${ROCM_PATH:-/opt/rocm}/bin/hipcc" ]; }; then
  "$PY" "$BUILD" --hip --strict --synth-isa-libs --out "$OUT"
  check_exports "$OUT/libpi_backend_hip.so"
else
  echo "hipcc not found: HIP build skipped (scripts/install-hipcc.sh installs it)"
fi
