#!/usr/bin/env bash
# Install llama-cpp-python (pinned) from a wheel cached on this machine, building it once if absent.
# PyPI ships only the source package; compiling llama.cpp takes 6-12 min on 2 cores, so the built
# wheel is kept in ~/.cache/pi_backend/wheels and reused by later CI runs on the same machine.
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${PI_BACKEND_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pi_backend/wheels}"
PY="${PYTHON:-python3}"
mkdir -p "$CACHE"
if "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama_cpp_python') != '$VERSION')" 2>/dev/null; then
  echo "llama-cpp-python $VERSION already installed"; exit 0
fi
wheel=$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$wheel" ]; then
  echo "building llama-cpp-python $VERSION wheel (one-off, several minutes) into $CACHE"
  # Multimodal (llava/mtmd) is unsupported by pi_backend anyway; skipping it saves ~1/4 of the build.
  CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF}" \
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$PY" -m pip wheel --no-deps --wheel-dir "$CACHE.tmp.$$" "llama-cpp-python==$VERSION"
  mv "$CACHE.tmp.$$"/llama_cpp_python-*.whl "$CACHE"/ && rmdir "$CACHE.tmp.$$"
  wheel=$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl | head -n1)
fi
"$PY" -m pip install --no-deps "$wheel"
# its runtime deps (small, pure Python)
"$PY" -m pip install "typing-extensions>=4.5" "diskcache>=5.6.1" "jinja2>=2.11.3"
