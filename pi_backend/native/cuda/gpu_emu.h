/*
 * gpu_emu.h — a CPU emulator of the CUDA subset that pi_kernels.cu uses, so that the kernels
 * themselves (not a re-implementation) run in tests on machines without a GPU. Included by
 * gpu_compat.h when PI_GPU_EMULATE is defined; build with `python pi_backend/native/build_gpu.py
 * --emu` (g++), load with PI_BACKEND_DEVICE_LIB=.../libpi_backend_emu.so.
 *
 * - A launch runs its blocks one after another; the threads of a block run as cooperative fibers
 *   (ucontext) in the calling OS thread. A fiber only yields at a barrier, so the interleaving is
 *   deterministic and __syncthreads / warp shuffles are real barriers over the block / warp: a kernel
 *   that lets lanes of a warp diverge around a shuffle, or threads around __syncthreads, deadlocks
 *   here and is reported (abort) instead of silently working.
 * - `__shared__` arrays become function statics: shared by the threads of a block, and blocks never
 *   overlap.
 * - Device memory is host memory (256-byte aligned as cudaMalloc, exactly as long as asked). PI_LDG checks the
 *   natural alignment of every load through it (a 16-byte vector load on a misaligned address is a
 *   fault on a GPU, silent on a CPU).
 * - PI_EMU_WARP (default 32) sets the warp size: 64 exercises the CDNA (wave64) geometry.
 * - Under AddressSanitizer (-fsanitize=address) fiber switches are annotated, so out-of-bounds
 *   kernel reads of "device" buffers are reported like any heap overflow.
 */
#ifndef PI_GPU_EMU_H
#define PI_GPU_EMU_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

#include "../include/pi_half.h"

#include <functional>
#include <memory>
#include <unordered_map>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

#define PI_GPU_BACKEND "emulator"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

#ifndef PI_EMU_WARP
#define PI_EMU_WARP 32
#endif
#define PI_WARP_SIZE PI_EMU_WARP
#ifndef PI_EMU_SMS
#define PI_EMU_SMS 4
#endif

struct dim3 {
    unsigned int x, y, z;
    dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace pi_emu {

[[noreturn]] inline void fail(const char *what) {
    fprintf(stderr, "pi_backend GPU emulator: %s (block %u,%u,%u thread %u)\n", what, blockIdx.x, blockIdx.y,
            blockIdx.z, threadIdx.x);
    abort();
}

struct Fiber {
    ucontext_t ctx;
    std::unique_ptr<char[]> stack; /* STACK_BYTES, not touched until used */
    bool done = false;
};

constexpr size_t STACK_BYTES = 256 << 10;
inline ucontext_t g_main;
inline std::vector<Fiber> g_fibers;
inline unsigned int g_cur = 0;
inline const std::function<void()> *g_body = nullptr;
#if defined(__SANITIZE_ADDRESS__)
inline const void *g_main_stack = nullptr;
inline size_t g_main_stack_size = 0;
#endif

inline void to_main(bool finishing) {
#if defined(__SANITIZE_ADDRESS__)
    void *fake = nullptr;
    __sanitizer_start_switch_fiber(finishing ? nullptr : &fake, g_main_stack, g_main_stack_size);
#else
    (void)finishing;
#endif
    swapcontext(&g_fibers[g_cur].ctx, &g_main);
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

inline void fiber_entry() {
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_finish_switch_fiber(nullptr, &g_main_stack, &g_main_stack_size);
#endif
    (*g_body)();
    g_fibers[g_cur].done = true;
    to_main(true);
}

inline void yield() { to_main(false); }

/* a reusable barrier over `expected` fibers (generation counted) */
struct Barrier {
    unsigned int count = 0, gen = 0;
};

inline void arrive_and_wait(Barrier &b, unsigned int expected) {
    const unsigned int g = b.gen;
    if (++b.count == expected) {
        b.count = 0;
        b.gen++;
        return;
    }
    for (long spins = 0; b.gen == g; spins++) {
        if (spins > 20000000) fail("deadlock: not every thread reached a barrier (divergent __syncthreads or shuffle)");
        yield();
    }
}

inline Barrier g_block_bar;
inline Barrier g_warp_bar[1024 / 32];
inline float g_warp_slot[1024 / 32][64];

/* run body once per thread of every block of the grid */
inline void launch(dim3 grid, dim3 block, const std::function<void()> &body) {
    if (block.y != 1 || block.z != 1 || block.x == 0 || block.x > 1024 || block.x % PI_WARP_SIZE)
        fail("unsupported block shape");
    const unsigned int n = block.x;
    gridDim = grid;
    blockDim = block;
    g_body = &body;
    if (g_fibers.size() < n) g_fibers.resize(n);
    for (unsigned int bz = 0; bz < grid.z; bz++)
        for (unsigned int by = 0; by < grid.y; by++)
            for (unsigned int bx = 0; bx < grid.x; bx++) {
                blockIdx = dim3(bx, by, bz);
                g_block_bar = Barrier();
                for (auto &w : g_warp_bar) w = Barrier();
                for (unsigned int i = 0; i < n; i++) {
                    Fiber &f = g_fibers[i];
                    if (!f.stack) f.stack.reset(new char[STACK_BYTES]);
                    getcontext(&f.ctx);
                    f.ctx.uc_stack.ss_sp = f.stack.get();
                    f.ctx.uc_stack.ss_size = STACK_BYTES;
                    f.ctx.uc_link = nullptr;
                    makecontext(&f.ctx, fiber_entry, 0);
                    f.done = false;
                }
                for (bool live = true; live;) {
                    live = false;
                    for (unsigned int i = 0; i < n; i++) {
                        if (g_fibers[i].done) continue;
                        live = true;
                        g_cur = i;
                        threadIdx = dim3(i);
#if defined(__SANITIZE_ADDRESS__)
                        void *fake = nullptr;
                        __sanitizer_start_switch_fiber(&fake, g_fibers[i].stack.get(), STACK_BYTES);
#endif
                        swapcontext(&g_main, &g_fibers[i].ctx);
#if defined(__SANITIZE_ADDRESS__)
                        __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
                    }
                }
            }
    threadIdx = dim3(0);
}

inline float shfl_xor(float v, int mask, int width) {
    if (width != PI_WARP_SIZE || mask <= 0 || mask >= width) fail("unsupported shuffle");
    const unsigned int w = threadIdx.x / PI_WARP_SIZE, lane = threadIdx.x % PI_WARP_SIZE;
    g_warp_slot[w][lane] = v;
    arrive_and_wait(g_warp_bar[w], PI_WARP_SIZE);
    const float r = g_warp_slot[w][lane ^ (unsigned int)mask];
    arrive_and_wait(g_warp_bar[w], PI_WARP_SIZE); /* nobody overwrites a slot before all have read */
    return r;
}

template <class T>
inline T ldg(const T *p) {
    if ((uintptr_t)p % alignof(T)) fail("misaligned load");
    return *p;
}

/* "device" memory */
inline int64_t g_dev_bytes = 0;
inline std::unordered_map<void *, int64_t> g_dev_sizes;
constexpr int64_t DEV_TOTAL = (int64_t)1 << 30;

/* 256-byte aligned like cudaMalloc, and exactly n bytes long, so that ASan sees a read one byte past */
inline int alloc(void **p, size_t n) {
    *p = nullptr;
    return posix_memalign(p, 256, n ? n : 1) == 0 ? 0 : 2;
}

}  // namespace pi_emu

inline void __syncthreads() { pi_emu::arrive_and_wait(pi_emu::g_block_bar, blockDim.x); }
inline unsigned int atomicOr(unsigned int *p, unsigned int v) {
    const unsigned int old = *p;
    *p = old | v;
    return old;
}
inline float __uint_as_float(unsigned int u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline unsigned int __float_as_uint(float f) {
    unsigned int u;
    memcpy(&u, &f, 4);
    return u;
}

#define PI_SHFL_XOR(v, m) pi_emu::shfl_xor((v), (m), PI_WARP_SIZE)
#define PI_LDG(p) pi_emu::ldg(p)
static inline float pi_gpu_h2f(unsigned short h) { return pi_fp16_to_fp32(h); }

template <typename... P, typename... A>
static inline void pi_launch(void (*kernel)(P...), dim3 grid, dim3 block, void *st, A... args) {
    (void)st;
    pi_emu::launch(grid, block, [&] { kernel(args...); });
}

/* ---- the runtime API subset */
typedef int gpuError_t;
typedef void *gpuStream_t;
typedef void *gpuMemPool_t;
struct gpuMemLocation { int type, id; };
struct gpuMemPoolProps { int allocType, handleTypes; gpuMemLocation location; };
struct gpuDeviceProp { char name[256]; };
enum { gpuSuccess = 0 };
enum { gpuMemAllocationTypePinned = 1, gpuMemLocationTypeDevice = 1, gpuMemPoolAttrReleaseThreshold = 4 };
enum { gpuDevAttrMultiProcessorCount = 16, gpuDevAttrWarpSize = 10, gpuDevAttrMemoryPoolsSupported = 115 };
enum { gpuMemcpyHostToDevice = 1, gpuMemcpyDeviceToHost = 2, gpuMemcpyDeviceToDevice = 3 };
#define PI_SYMBOL(s) (s)

static inline gpuError_t gpuGetDeviceCount(int *n) { *n = 1; return gpuSuccess; }
static inline gpuError_t gpuGetDevice(int *d) { *d = 0; return gpuSuccess; }
static inline gpuError_t gpuGetDeviceProperties(gpuDeviceProp *p, int) {
    snprintf(p->name, sizeof p->name, "pi_backend CPU emulator (warp %d)", PI_WARP_SIZE);
    return gpuSuccess;
}
static inline gpuError_t gpuDeviceGetAttribute(int *v, int attr, int) {
    *v = attr == gpuDevAttrMultiProcessorCount ? PI_EMU_SMS : attr == gpuDevAttrWarpSize ? PI_WARP_SIZE : 1;
    return gpuSuccess;
}
static inline gpuError_t gpuGetLastError() { return gpuSuccess; }
static inline gpuError_t gpuStreamSynchronize(gpuStream_t) { return gpuSuccess; }
static inline gpuError_t gpuMalloc(void **p, size_t n) {
    if (pi_emu::alloc(p, n)) return 2;
    const int64_t r = (int64_t)((n + 255) & ~(size_t)255);
    pi_emu::g_dev_sizes[*p] = r;
    pi_emu::g_dev_bytes += r;
    return gpuSuccess;
}
static inline gpuError_t gpuFree(void *p) {
    auto it = pi_emu::g_dev_sizes.find(p);
    if (it != pi_emu::g_dev_sizes.end()) {
        pi_emu::g_dev_bytes -= it->second;
        pi_emu::g_dev_sizes.erase(it);
    }
    free(p);
    return gpuSuccess;
}
static inline gpuError_t gpuMemPoolCreate(gpuMemPool_t *pool, const gpuMemPoolProps *) { *pool = nullptr; return gpuSuccess; }
static inline gpuError_t gpuMemPoolSetAttribute(gpuMemPool_t, int, void *) { return gpuSuccess; }
static inline gpuError_t gpuMallocFromPoolAsync(void **p, size_t n, gpuMemPool_t, gpuStream_t) {
    return pi_emu::alloc(p, n) ? 2 : gpuSuccess;
}
static inline gpuError_t gpuFreeAsync(void *p, gpuStream_t) { free(p); return gpuSuccess; }
static inline gpuError_t gpuMemcpyAsync(void *d, const void *s, size_t n, int, gpuStream_t) { memcpy(d, s, n); return gpuSuccess; }
static inline gpuError_t gpuMemsetAsync(void *d, int v, size_t n, gpuStream_t) { memset(d, v, n); return gpuSuccess; }
static inline gpuError_t gpuMemGetInfo(size_t *f, size_t *t) {
    *t = (size_t)pi_emu::DEV_TOTAL;
    *f = (size_t)(pi_emu::DEV_TOTAL - pi_emu::g_dev_bytes);
    return gpuSuccess;
}
template <class T>
static inline gpuError_t gpuMemcpyFromSymbolAsync(void *d, const T &sym, size_t n, size_t off, int, gpuStream_t) {
    memcpy(d, (const char *)&sym + off, n);
    return gpuSuccess;
}
template <class T>
static inline gpuError_t gpuMemcpyToSymbolAsync(T &sym, const void *s, size_t n, size_t off, int, gpuStream_t) {
    memcpy((char *)&sym + off, s, n);
    return gpuSuccess;
}

#endif /* PI_GPU_EMU_H */
