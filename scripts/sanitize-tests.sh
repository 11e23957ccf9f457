#!/usr/bin/env bash
# Build the native module with AddressSanitizer + UndefinedBehaviorSanitizer in a scratch copy (the
# installed module stays as it is) and run the kernel tests against it.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cp -r "$ROOT/pi_backend" "$ROOT/tests" "$WORK/"
find "$WORK/pi_backend/native" -name '_pi_native*' -delete
(cd "$WORK" && PI_BACKEND_SANITIZE=1 "$PY" pi_backend/native/build_cffi.py > build.log 2>&1) || { cat "$WORK/build.log"; exit 1; }
LIBASAN="$(gcc -print-file-name=libasan.so)"
cd "$WORK"
# Python itself is not built with ASan: preload the runtime, and leave leak checking to C tests.
LD_PRELOAD="$LIBASAN" ASAN_OPTIONS="detect_leaks=0:abort_on_error=1" UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
  PYTHONPATH="$WORK" "$PY" -m pytest -q -p no:cacheprovider tests/test_native_kernels.py tests/test_native_bad_input.py \
  tests/test_decode_step.py "$@"
