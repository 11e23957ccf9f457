#!/usr/bin/env bash
# Install Debian's hipcc (bookworm: ROCm 5.2.3 on clang-15) to compile the HIP kernels without a GPU.
# Measured on a bookworm container: 32 packages, 41 MB download (+29 MB already present), 370 MB on
# disk, about 25 s. It compiles for gfx90a and gfx1030; its device libraries (rocm-device-libs 5.2.3)
# predate gfx11, so gfx1100 needs build_gpu.py --synth-isa-libs (scripts/build-gpu.sh passes it).
# It is a compiler, not a ROCm runtime for a GPU.
set -euo pipefail
if command -v hipcc >/dev/null; then
  echo "hipcc already installed: $(command -v hipcc)"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends hipcc
# with nvcc on the machine hipcc defaults to the NVIDIA platform: build_gpu.py sets HIP_PLATFORM=amd
HIP_PLATFORM=amd hipcc --version | head -n 2
