#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a virtualenv in .venv holding pi_backend (editable, with its
# test/benchmark extras) and llama-cpp-python (built once per machine, then reused from a wheel cache).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${PI_BACKEND_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
log() { echo "[setup] $*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# Re-install only when the package's build inputs changed (the native sources, pyproject, setup.py).
stamp="$VENV/.pi_backend.stamp"
digest="$(cd "$ROOT" && cat pyproject.toml setup.py pi_backend/native/build_cffi.py pi_backend/native/include/*.h \
          pi_backend/native/cpu/*.[ch] 2>/dev/null | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ] || ! "$VPY" -c "import pi_backend.native" 2>/dev/null; then
  log "installing pi_backend (editable, compiles the native kernels)"
  "$VPY" -m pip install -q -U pip "setuptools>=77" wheel
  (cd "$ROOT" && "$VPY" -m pip install -q -e ".[dev]")
  echo "$digest" > "$stamp"
fi

PYTHON="$VPY" "$ROOT/scripts/install-llama-cpp-python.sh" >&2
# llama-cpp-python's server extras (installed without rebuilding llama.cpp) for the adapter's server
if ! "$VPY" -c "import fastapi, uvicorn, sse_starlette, starlette_context, pydantic_settings" 2>/dev/null; then
  log "installing the llama-cpp-python server extras"
  "$VPY" -m pip install -q fastapi uvicorn sse-starlette starlette-context pydantic-settings
fi
