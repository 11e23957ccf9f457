/*
 * gpu_compat.h — the thin portability layer that lets one kernel source (cuda/pi_kernels.cu) build
 * with nvcc for CUDA and with hipcc for ROCm.
 *
 * - Runtime API: every call the launcher makes is spelled gpuXxx here and maps to cudaXxx / hipXxx.
 * - Warps: PI_WARP_SIZE is the hardware warp (32 on NVIDIA and on RDNA, gfx10/11, compiled wave32;
 *   64 on CDNA, gfx9). Device code writes every reduction and lane mapping in terms of it, and the
 *   host takes launch geometry from the device's runtime warp size, never from this macro (in the
 *   host pass of a HIP build the kernels are not compiled and the value is a placeholder).
 * - Shuffles: CUDA's __shfl_xor_sync takes a participation mask, HIP's __shfl_xor does not.
 * - Read-only loads: __ldg routes through the non-coherent read-only path on NVIDIA; HIP has no such
 *   path (plain loads from `const __restrict__` pointers are what it wants).
 * - Launches: pi_launch(kernel, grid, block, stream, args...) instead of <<< >>>, so that the same
 *   source also compiles as plain C++ under PI_GPU_EMULATE (gpu_emu.h: a CPU emulator of this
 *   subset, which runs the kernels in tests on machines without a GPU).
 */
#ifndef PI_GPU_COMPAT_H
#define PI_GPU_COMPAT_H

#if defined(PI_GPU_EMULATE)
#include "gpu_emu.h"

#elif defined(__HIP_PLATFORM_AMD__) || defined(__HIPCC__)
#include <hip/hip_runtime.h>
#define PI_GPU_BACKEND "hip"

#define gpuError_t hipError_t
#define gpuSuccess hipSuccess
#define gpuStream_t hipStream_t
#define gpuMemPool_t hipMemPool_t
#define gpuMemPoolProps hipMemPoolProps
#define gpuDeviceProp hipDeviceProp_t
#define gpuGetDeviceCount hipGetDeviceCount
#define gpuGetDevice hipGetDevice
#define gpuGetDeviceProperties hipGetDeviceProperties
#define gpuDeviceGetAttribute hipDeviceGetAttribute
#define gpuDevAttrMultiProcessorCount hipDeviceAttributeMultiprocessorCount
#define gpuDevAttrWarpSize hipDeviceAttributeWarpSize
#define gpuDevAttrMemoryPoolsSupported hipDeviceAttributeMemoryPoolsSupported
#define gpuStreamSynchronize hipStreamSynchronize
#define gpuMalloc hipMalloc
#define gpuFree hipFree
#define gpuMemPoolCreate hipMemPoolCreate
#define gpuMemPoolSetAttribute hipMemPoolSetAttribute
#define gpuMemPoolAttrReleaseThreshold hipMemPoolAttrReleaseThreshold
#define gpuMemAllocationTypePinned hipMemAllocationTypePinned
#define gpuMemLocationTypeDevice hipMemLocationTypeDevice
#define gpuMallocFromPoolAsync hipMallocFromPoolAsync
#define gpuFreeAsync hipFreeAsync
#define gpuMemcpyAsync hipMemcpyAsync
#define gpuMemcpyHostToDevice hipMemcpyHostToDevice
#define gpuMemcpyDeviceToHost hipMemcpyDeviceToHost
#define gpuMemcpyDeviceToDevice hipMemcpyDeviceToDevice
#define gpuMemsetAsync hipMemsetAsync
#define gpuMemGetInfo hipMemGetInfo
#define gpuGetLastError hipGetLastError
#define gpuMemcpyFromSymbolAsync hipMemcpyFromSymbolAsync
#define gpuMemcpyToSymbolAsync hipMemcpyToSymbolAsync
#define PI_SYMBOL(s) HIP_SYMBOL(s)

#if defined(__AMDGCN_WAVEFRONT_SIZE)
#define PI_WARP_SIZE __AMDGCN_WAVEFRONT_SIZE
#else
#define PI_WARP_SIZE 64 /* host pass only (see above) */
#endif
#define PI_SHFL_XOR(v, m) __shfl_xor((v), (m), PI_WARP_SIZE)
#define PI_LDG(p) (*(p))

/* IEEE half bits -> float: clang's _Float16 converts exactly (subnormals, inf, nan) */
static __device__ __forceinline__ float pi_gpu_h2f(unsigned short h) {
    _Float16 f;
    __builtin_memcpy(&f, &h, 2);
    return (float)f;
}

#else /* CUDA */
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#define PI_GPU_BACKEND "cuda"

#define gpuError_t cudaError_t
#define gpuSuccess cudaSuccess
#define gpuStream_t cudaStream_t
#define gpuMemPool_t cudaMemPool_t
#define gpuMemPoolProps cudaMemPoolProps
#define gpuDeviceProp cudaDeviceProp
#define gpuGetDeviceCount cudaGetDeviceCount
#define gpuGetDevice cudaGetDevice
#define gpuGetDeviceProperties cudaGetDeviceProperties
#define gpuDeviceGetAttribute cudaDeviceGetAttribute
#define gpuDevAttrMultiProcessorCount cudaDevAttrMultiProcessorCount
#define gpuDevAttrWarpSize cudaDevAttrWarpSize
#define gpuDevAttrMemoryPoolsSupported cudaDevAttrMemoryPoolsSupported
#define gpuStreamSynchronize cudaStreamSynchronize
#define gpuMalloc cudaMalloc
#define gpuFree cudaFree
#define gpuMemPoolCreate cudaMemPoolCreate
#define gpuMemPoolSetAttribute cudaMemPoolSetAttribute
#define gpuMemPoolAttrReleaseThreshold cudaMemPoolAttrReleaseThreshold
#define gpuMemAllocationTypePinned cudaMemAllocationTypePinned
#define gpuMemLocationTypeDevice cudaMemLocationTypeDevice
#define gpuMallocFromPoolAsync cudaMallocFromPoolAsync
#define gpuFreeAsync cudaFreeAsync
#define gpuMemcpyAsync cudaMemcpyAsync
#define gpuMemcpyHostToDevice cudaMemcpyHostToDevice
#define gpuMemcpyDeviceToHost cudaMemcpyDeviceToHost
#define gpuMemcpyDeviceToDevice cudaMemcpyDeviceToDevice
#define gpuMemsetAsync cudaMemsetAsync
#define gpuMemGetInfo cudaMemGetInfo
#define gpuGetLastError cudaGetLastError
#define gpuMemcpyFromSymbolAsync cudaMemcpyFromSymbolAsync
#define gpuMemcpyToSymbolAsync cudaMemcpyToSymbolAsync
#define PI_SYMBOL(s) (s)

#define PI_WARP_SIZE 32
#define PI_SHFL_XOR(v, m) __shfl_xor_sync(0xffffffffu, (v), (m), PI_WARP_SIZE)
#define PI_LDG(p) __ldg(p)

static __device__ __forceinline__ float pi_gpu_h2f(unsigned short h) {
    return __half2float(__ushort_as_half(h)); /* one cvt.f32.f16, exact */
}
#endif

#if !defined(PI_GPU_EMULATE)
template <typename... P, typename... A>
static inline void pi_launch(void (*kernel)(P...), dim3 grid, dim3 block, gpuStream_t st, A... args) {
    kernel<<<grid, block, 0, st>>>(args...);
}
#endif

static __device__ __forceinline__ float pi_gpu_bf2f(unsigned short h) {
    return __uint_as_float((unsigned int)h << 16);
}

/* c + the dot product of the 4 signed bytes of a and b: one dp4a on NVIDIA; elsewhere (HIP, the
 * emulator) plain integer operations, which the compiler may map to the target's dot instruction */
#if defined(__CUDA_ARCH__)
static __device__ __forceinline__ int pi_dp4a(int a, int b, int c) { return __dp4a(a, b, c); }
#else
static __device__ __forceinline__ int pi_dp4a(int a, int b, int c) {
    const unsigned int ua = (unsigned int)a, ub = (unsigned int)b;
#pragma unroll
    for (int i = 0; i < 4; i++)
        c += ((int)(((ua >> (8 * i)) & 0xffu) ^ 0x80u) - 128) * ((int)(((ub >> (8 * i)) & 0xffu) ^ 0x80u) - 128);
    return c;
}
#endif

#endif /* PI_GPU_COMPAT_H */
