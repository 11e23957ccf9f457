/* pi_kernels_hip.cpp — the ROCm build of the device kernels: the CUDA source itself, compiled by hipcc;
 * every CUDA/HIP difference lives in ../cuda/gpu_compat.h. Build: pi_backend/native/build_gpu.py --hip
 * (HIP_PLATFORM=amd hipcc --offload-arch=gfx90a --offload-arch=gfx1030 --offload-arch=gfx1100 ...). */
#include "../cuda/pi_kernels.cu"
