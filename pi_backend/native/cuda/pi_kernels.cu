/*
 * pi_kernels.cu — the device entry points of pi_backend.h (pi_dev_*): kernels and their launchers.
 *
 * One source for CUDA (nvcc, this file) and ROCm (hipcc, hip/pi_kernels_hip.cpp includes it); every
 * difference lives in gpu_compat.h. Semantics are those of the CPU ops (cpu/ops.c), on device
 * pointers and a stream; descriptors and sizes are checked on the host before any launch, index
 * values on the device (a bad index sets g_pi_err and is skipped; pi_dev_sync reports it).
 *
 * Shape of the work. Decode is memory bound: every kernel is built to stream weight rows at DRAM
 * speed and to do nothing else that costs bandwidth.
 *  - k_rows: y[t, k] = W[idx[k]] . x[t] (dense GEMV/GEMM when idx is NULL, the hot gate/up rows, the
 *    predictor). One warp per row, several rows (warps) per block: a row is one contiguous stream, so
 *    the 32 (64) lanes of a warp read consecutive 16-byte chunks of it (one 512-byte coalesced request
 *    per warp-load for F16/BF16/F32), every lane accumulates its chunks for up to NT tokens in
 *    registers, and a shuffle butterfly reduces the lanes without shared memory or barriers. The
 *    weights are read once for NT tokens; x (a few KiB per token) stays in L1/L2.
 *  - k_axpy: y[t, :] += sum_k h[t, k] * Wt[idx[k], :] (the hot down projection, on the transposed
 *    down matrix so every neuron is a contiguous row). No atomics: a block owns a tile of output
 *    columns (one warp-width of chunks) and one contiguous split of the index list; its warps take
 *    interleaved rows of the split (neighbouring rows in flight together), sum them in registers,
 *    and reduce across warps through shared memory in a fixed order. When the column tiles alone
 *    cannot fill the GPU (n_embd = 4096 is only 16 tiles), the list is split S ways and a second
 *    kernel (k_reduce) sums the S partial rows in order: deterministic, any row count.
 *  - the fused FFN is k_rows (gate, activation + skip threshold, duplicate check) -> k_rows (up, only
 *    for neurons that fired, in place) -> k_axpy (down, only rows with a nonzero h) through an
 *    [n_tok, n_idx] scratch: no n_ff-sized intermediate, nothing read for a neuron that did not fire.
 *
 * Weight rows and alignment. A "chunk" is what one lane decodes at a time: 4 F32 or 8 F16/BF16
 * values (one 16-byte load), or 8 values of a quantized block (a quarter block). GGUF's Q8_0 (34 B)
 * and Q4_0 (18 B) blocks are only 2-byte aligned, so quantized chunks are read with 16-bit loads;
 * the lanes of a warp still cover one contiguous span (8 blocks), so the DRAM traffic is coalesced.
 * The 16-byte path needs 16-byte aligned rows (data and row_stride) and x, and cols a multiple of
 * the chunk; any other view (odd cols, odd strides, unaligned pointers) takes the generic path of
 * the same kernels: element-wise byte loads, correct for every layout, slower.
 */
#include "gpu_compat.h"
#include "../include/pi_backend.h"
#include "../include/pi_half.h"

#include <stdint.h>
#include <string.h>

#include <mutex>
#include <unordered_map>

#define PI_EXPORT extern "C" __attribute__((visibility("default")))

/* Error flags of the current device, set by kernels on a bad index list, read and cleared by
 * pi_dev_sync. Not per stream: a flag raised by any stream is reported by the next sync. */
__device__ unsigned int g_pi_err;

namespace {

constexpr int PI_BLOCK = 256; /* threads per block everywhere: 8 warps (CUDA, RDNA) or 4 (CDNA) */
constexpr int64_t PI_MAX_DIM = (int64_t)1 << 40;
constexpr int64_t GRID_Y_MAX = 65535; /* gridDim.y / gridDim.z limit: token tiles per launch */

enum { T_F32, T_F16, T_BF16, T_Q8_0, T_Q4_0 };
enum { MODE_PLAIN = 0, MODE_ACT = 1, MODE_GATED = 2 };
constexpr unsigned int ERR_INDEX = 1u, ERR_DUPLICATE = 2u;

/* values per chunk (see the top comment) */
template <int T> struct Chunk { static constexpr int CH = T == T_F32 ? 4 : 8; };

/* ------------------------------------------------------------------ device helpers */

__device__ __forceinline__ float warp_sum(float v) {
    /* butterfly: after log2(WARP_SIZE) steps every lane holds the same total */
#pragma unroll
    for (int o = PI_WARP_SIZE / 2; o > 0; o >>= 1) v += PI_SHFL_XOR(v, o);
    return v;
}

__device__ __forceinline__ float act_gate(int act, float g) {
    switch (act) {
    case PI_ACT_SWIGLU: return g / (1.0f + expf(-g));
    case PI_ACT_GEGLU:
    case PI_ACT_GELU: return 0.5f * g * (1.0f + tanhf(0.7978845608f * (g + 0.044715f * g * g * g)));
    default: return g > 0.0f ? g : 0.0f; /* ReGLU, dReLU, ReLU */
    }
}

/* An int8 / 4-bit value from its bits, without implementation-defined conversions and without an
 * int -> float conversion (a quarter-rate instruction): the bits go into the mantissa of 2^23 (exact),
 * and one subtraction removes 2^23 and the offset. */
__device__ __forceinline__ float s8(unsigned int b) { return __uint_as_float(((b & 0xffu) ^ 0x80u) | 0x4b000000u) - 8388736.0f; }
__device__ __forceinline__ float q4(unsigned int n) { return __uint_as_float((n & 15u) | 0x4b000000u) - 8388616.0f; }

/* a 2-byte aligned 16-bit load (quantized blocks) */
__device__ __forceinline__ unsigned int ld16(const uint8_t *p) {
    return PI_LDG(reinterpret_cast<const unsigned short *>(p));
}
/* a 16-bit value at any address (generic path) */
__device__ __forceinline__ unsigned int ldb16(const uint8_t *p) { return (unsigned int)p[0] | ((unsigned int)p[1] << 8); }

/* chunk c of an aligned row, decoded to CH floats */
template <int T>
__device__ __forceinline__ void load_fast(const uint8_t *__restrict__ row, int64_t c, float *w) {
    if constexpr (T == T_F32) {
        const float4 v = PI_LDG(reinterpret_cast<const float4 *>(row) + c);
        w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
    } else if constexpr (T == T_F16 || T == T_BF16) {
        const uint4 v = PI_LDG(reinterpret_cast<const uint4 *>(row) + c);
        const unsigned int u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            if constexpr (T == T_F16) {
                w[2 * i] = pi_gpu_h2f((unsigned short)(u[i] & 0xffffu));
                w[2 * i + 1] = pi_gpu_h2f((unsigned short)(u[i] >> 16));
            } else {
                w[2 * i] = pi_gpu_bf2f((unsigned short)(u[i] & 0xffffu));
                w[2 * i + 1] = pi_gpu_bf2f((unsigned short)(u[i] >> 16));
            }
        }
    } else if constexpr (T == T_Q8_0) {
        /* quarter q of block b: qs[8q .. 8q + 7] = elements 32b + 8q .. */
        const uint8_t *b = row + (c >> 2) * PI_BLOCK_BYTES_Q8_0;
        const float d = pi_gpu_h2f((unsigned short)ld16(b));
        const uint8_t *q = b + 2 + (c & 3) * 8;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const unsigned int u = ld16(q + 2 * i);
            w[2 * i] = d * s8(u);
            w[2 * i + 1] = d * s8(u >> 8);
        }
    } else {
        /* quarter q of block b: qs[4q .. 4q + 3], low nibbles = elements 32b + 4q + i, high nibbles =
         * elements 32b + 16 + 4q + i */
        const uint8_t *b = row + (c >> 2) * PI_BLOCK_BYTES_Q4_0;
        const float d = pi_gpu_h2f((unsigned short)ld16(b));
        const uint8_t *q = b + 2 + (c & 3) * 4;
        const unsigned int u = ld16(q) | (ld16(q + 2) << 16);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            w[i] = d * q4(u >> (8 * i));
            w[4 + i] = d * q4(u >> (8 * i + 4));
        }
    }
}

/* element index of value 4g (the start of a run of 4 consecutive elements) of chunk c, fast path */
template <int T>
__device__ __forceinline__ int64_t pos_fast(int64_t c, int g) {
    if constexpr (T == T_Q4_0) return (c >> 2) * 32 + (c & 3) * 4 + g * 16;
    else return c * Chunk<T>::CH + g * 4;
}

/* element e of a row at any alignment (generic path) */
template <int T>
__device__ __forceinline__ float elem_generic(const uint8_t *__restrict__ row, int64_t e) {
    if constexpr (T == T_F32) {
        return __uint_as_float(ldb16(row + 4 * e) | (ldb16(row + 4 * e + 2) << 16));
    } else if constexpr (T == T_F16) {
        return pi_gpu_h2f((unsigned short)ldb16(row + 2 * e));
    } else if constexpr (T == T_BF16) {
        return pi_gpu_bf2f((unsigned short)ldb16(row + 2 * e));
    } else if constexpr (T == T_Q8_0) {
        const uint8_t *b = row + (e >> 5) * PI_BLOCK_BYTES_Q8_0;
        return pi_gpu_h2f((unsigned short)ldb16(b)) * s8(b[2 + (e & 31)]);
    } else {
        const uint8_t *b = row + (e >> 5) * PI_BLOCK_BYTES_Q4_0;
        const int j = (int)(e & 31);
        const unsigned int byte = b[2 + (j & 15)];
        return pi_gpu_h2f((unsigned short)ldb16(b)) * q4(j < 16 ? byte : byte >> 4);
    }
}

/* ------------------------------------------------------------------ k_rows */

struct RowsArgs {
    const uint8_t *W;
    int64_t rows, cols, stride;
    const int32_t *idx; /* NULL: row k for output k */
    int64_t n_out;
    const float *x;     /* [n_tok, cols] */
    int64_t n_tok, t_base;
    float *y;           /* [n_tok, n_out]; MODE_GATED reads the activated gate from it and writes h */
    uint32_t *dup;      /* bitmap over rows to flag repeated indices, or NULL */
    int mode, act;
    float thr;
    int fast;
    /* Q8_0 / Q4_0 rows: x quantized to Q8_0 blocks (k_quantize_x): qs [n_tok, cols], d [n_tok, cols / 32] */
    const int8_t *xq;
    const float *xd;
};

/* Q8_0 / Q4_0 block b of a row: its scale, and its quants as 32-bit words (4 for Q4_0: 16 bytes of
 * nibbles; 8 for Q8_0: 32 int8), read with 16-bit loads (blocks are 2-byte aligned) or, for a row
 * at an odd address, bytes. */
template <int T, bool FAST>
__device__ __forceinline__ float qblock(const uint8_t *__restrict__ row, int64_t b, unsigned int *w) {
    constexpr int BB = T == T_Q4_0 ? PI_BLOCK_BYTES_Q4_0 : PI_BLOCK_BYTES_Q8_0;
    constexpr int NW = T == T_Q4_0 ? 4 : 8;
    const uint8_t *p = row + b * BB;
#pragma unroll
    for (int j = 0; j < NW; j++)
        w[j] = FAST ? ld16(p + 2 + 4 * j) | (ld16(p + 4 + 4 * j) << 16) : ldb16(p + 2 + 4 * j) | (ldb16(p + 4 + 4 * j) << 16);
    return pi_gpu_h2f((unsigned short)(FAST ? ld16(p) : ldb16(p)));
}

/* The exact integer dot of a block's quants with 32 int8 activations (x0: values 0-15, x1: 16-31), as the
 * CPU kernels compute it. Q4_0: low nibbles are elements 0-15, high nibbles 16-31; each nibble n becomes
 * the signed byte n - 8 by (n + 0x78) ^ 0x80 in every byte at once (no carries: n + 0x78 <= 0x87). */
template <int T>
__device__ __forceinline__ int qdot(const unsigned int *w, const uint4 x0, const uint4 x1) {
    const int xw[8] = {(int)x0.x, (int)x0.y, (int)x0.z, (int)x0.w, (int)x1.x, (int)x1.y, (int)x1.z, (int)x1.w};
    int s = 0;
    if constexpr (T == T_Q4_0) {
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const unsigned int lo = ((w[j] & 0x0f0f0f0fu) + 0x78787878u) ^ 0x80808080u;
            const unsigned int hi = (((w[j] >> 4) & 0x0f0f0f0fu) + 0x78787878u) ^ 0x80808080u;
            s = pi_dp4a((int)lo, xw[j], s);
            s = pi_dp4a((int)hi, xw[4 + j], s);
        }
    } else {
#pragma unroll
        for (int j = 0; j < 8; j++) s = pi_dp4a((int)w[j], xw[j], s);
    }
    return s;
}

/* x [n, 32] float -> Q8_0 blocks exactly as the CPU kernels quantize activations (cpu/kernels_scalar.c
 * quantize_x, llama.cpp's x86 rule): amax = max |x|, q = round-half-even(x * (127 / amax)), d = amax / 127
 * rounded to fp16; a block holding inf / NaN gets d = NaN. Thread per value, 32 lanes per block (xor
 * shuffles below 32 stay inside a block on 64-lane warps too); every lane runs the same number of
 * iterations, so the shuffles always see the whole warp. */
__global__ void __launch_bounds__(PI_BLOCK) k_quantize_x(const float *__restrict__ x, int64_t n,
                                                         int8_t *__restrict__ qs, float *__restrict__ d) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e - threadIdx.x < n; e += stride) {
        const float v = e < n ? x[e] : 0.0f;
        float amax = fabsf(v), nonfinite = v - v; /* 0, or NaN for inf / NaN */
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            amax = fmaxf(amax, PI_SHFL_XOR(amax, o)); /* fmaxf: a NaN lane does not hide the others */
            nonfinite += PI_SHFL_XOR(nonfinite, o);
        }
        if (e < n) {
            const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
            const float y = v * id;
            qs[e] = (int8_t)(fabsf(y) < 128.0f ? (int)rintf(y) : 0); /* rintf: half to even */
            if ((e & 31) == 0) d[e >> 5] = pi_fp16_to_fp32(pi_fp32_to_fp16(amax / 127.0f)) + nonfinite;
        }
    }
}

/* Warp per output k; the block's blockIdx.y picks a tile of NT tokens. */
template <int T, int NT>
__global__ void __launch_bounds__(PI_BLOCK, 2) k_rows(const RowsArgs a) {
    constexpr int CH = Chunk<T>::CH;
    const int lane = (int)(threadIdx.x % PI_WARP_SIZE);
    const int64_t wpb = blockDim.x / PI_WARP_SIZE;
    const int64_t nwarps = (int64_t)gridDim.x * wpb;
    const int64_t t0 = a.t_base + (int64_t)blockIdx.y * NT;
    if (t0 >= a.n_tok) return;
    const int nt = a.n_tok - t0 < NT ? (int)(a.n_tok - t0) : NT;
    const int64_t n_chunks = a.fast ? a.cols / CH : (a.cols + CH - 1) / CH;
    const float *__restrict__ x = a.x;

    for (int64_t k = (int64_t)blockIdx.x * wpb + threadIdx.x / PI_WARP_SIZE; k < a.n_out; k += nwarps) {
        int64_t r = k;
        if (a.idx) {
            r = PI_LDG(a.idx + k);
            if (r < 0 || r >= a.rows) { /* skipped: output 0, flagged once (the first token tile) */
                if (lane == 0 && t0 == 0) atomicOr(&g_pi_err, ERR_INDEX);
                if (lane < nt) a.y[(t0 + lane) * a.n_out + k] = 0.0f;
                continue;
            }
            if (a.dup && lane == 0 && t0 == 0) {
                const uint32_t bit = 1u << (r & 31);
                if (atomicOr(&a.dup[r >> 5], bit) & bit) atomicOr(&g_pi_err, ERR_DUPLICATE);
            }
        }
        float gin[NT] = {}; /* the activated gate (MODE_GATED) */
        if (a.mode == MODE_GATED) {
            /* the up row is read only if the gate fired for some token of this tile */
            bool any = false;
#pragma unroll
            for (int t = 0; t < NT; t++) {
                gin[t] = t < nt ? a.y[(t0 + t) * a.n_out + k] : 0.0f;
                any |= gin[t] != 0.0f;
            }
            if (!any) continue; /* h stays 0 */
        }
        const uint8_t *__restrict__ row = a.W + r * a.stride;
        float acc[NT];
#pragma unroll
        for (int t = 0; t < NT; t++) acc[t] = 0.0f;
        if constexpr (T == T_Q8_0 || T == T_Q4_0) {
            /* lane L takes blocks L, L + WARP, ...: an integer dot per block against the quantized x,
             * then one multiply-add with both scales (the CPU kernels' arithmetic) */
            const int64_t nb = a.cols / 32;
#pragma unroll 2
            for (int64_t b = lane; b < nb; b += PI_WARP_SIZE) {
                unsigned int w[T == T_Q4_0 ? 4 : 8];
                const float dw = a.fast ? qblock<T, true>(row, b, w) : qblock<T, false>(row, b, w);
#pragma unroll
                for (int t = 0; t < NT; t++) {
                    if (t < nt) {
                        const uint4 *xb = reinterpret_cast<const uint4 *>(a.xq + (t0 + t) * a.cols + 32 * b);
                        const int is = qdot<T>(w, PI_LDG(xb), PI_LDG(xb + 1));
                        acc[t] = fmaf(dw * PI_LDG(a.xd + (t0 + t) * nb + b), (float)is, acc[t]);
                    }
                }
            }
        } else if (a.fast) {
            /* lane L takes chunks L, L + WARP, ...: each warp-load is one contiguous span of the row.
             * Unrolled so that 4 loads per lane are in flight at one token: at 10% density a layer's
             * 1100 rows are about 1 block per SM, and bandwidth needs ~16 KiB in flight per SM (2 for
             * token tiles: more would spill their accumulators). */
            [[maybe_unused]] constexpr int UNROLL = NT == 1 ? 4 : 2; /* (unused where pragmas are ignored) */
#pragma unroll UNROLL
            for (int64_t c = lane; c < n_chunks; c += PI_WARP_SIZE) {
                float w[CH];
                load_fast<T>(row, c, w);
#pragma unroll
                for (int t = 0; t < NT; t++) {
                    if (t < nt) {
                        const float *xt = x + (t0 + t) * a.cols;
#pragma unroll
                        for (int g = 0; g < CH / 4; g++) {
                            const float4 xv = PI_LDG(reinterpret_cast<const float4 *>(xt + pos_fast<T>(c, g)));
                            acc[t] = fmaf(w[4 * g], xv.x, acc[t]);
                            acc[t] = fmaf(w[4 * g + 1], xv.y, acc[t]);
                            acc[t] = fmaf(w[4 * g + 2], xv.z, acc[t]);
                            acc[t] = fmaf(w[4 * g + 3], xv.w, acc[t]);
                        }
                    }
                }
            }
        } else {
            for (int64_t c = lane; c < n_chunks; c += PI_WARP_SIZE) {
#pragma unroll
                for (int j = 0; j < CH; j++) {
                    const int64_t e = c * CH + j;
                    if (e < a.cols) {
                        const float w = elem_generic<T>(row, e);
#pragma unroll
                        for (int t = 0; t < NT; t++)
                            if (t < nt) acc[t] = fmaf(w, x[(t0 + t) * a.cols + e], acc[t]);
                    }
                }
            }
        }
#pragma unroll
        for (int t = 0; t < NT; t++) acc[t] = warp_sum(acc[t]);
        /* lane t writes token t (every lane holds every total) */
#pragma unroll
        for (int t = 0; t < NT; t++) {
            if (t < nt && lane == t) {
                float v = acc[t];
                if (a.mode == MODE_ACT) {
                    v = act_gate(a.act, v);
                    if (fabsf(v) <= a.thr) v = 0.0f; /* NaN stays: it "fires", as on the CPU */
                } else if (a.mode == MODE_GATED) {
                    const float u = a.act == PI_ACT_DRELU ? (v > 0.0f ? v : 0.0f) : v;
                    v = gin[t] != 0.0f ? gin[t] * u : 0.0f;
                }
                a.y[(t0 + t) * a.n_out + k] = v;
            }
        }
    }
}

/* ------------------------------------------------------------------ k_axpy + k_reduce */

struct AxpyArgs {
    const uint8_t *W;
    int64_t rows, cols, stride;
    const int32_t *idx;
    int64_t n_idx;
    const float *h; /* entry k of token t at h[t * h_stride + k] */
    int64_t h_stride;
    int64_t n_tok, t_base;
    float *y;       /* [n_tok, cols] */
    float *part;    /* [S, n_tok, cols] partial sums, or NULL: write y directly (S == 1) */
    int64_t rows_per_split;
    int accumulate, fast;
};

/* Block (column tile x, split y, token tile z). Each thread owns one chunk (CH columns) of the tile
 * for NT tokens, accumulated in registers over its warp's rows of the split. */
template <int T, int NT>
__global__ void __launch_bounds__(PI_BLOCK, 2) k_axpy(const AxpyArgs a) {
    constexpr int CH = Chunk<T>::CH;
    __shared__ float red[PI_BLOCK * NT * (CH + 1)]; /* [warp][t][lane][CH + 1]: padded, conflict free */
    const int lane = (int)(threadIdx.x % PI_WARP_SIZE), warp = (int)(threadIdx.x / PI_WARP_SIZE);
    const int nwarps = (int)(blockDim.x / PI_WARP_SIZE);
    const int64_t t0 = a.t_base + (int64_t)blockIdx.z * NT;
    if (t0 >= a.n_tok) return; /* uniform over the block: before any barrier */
    const int nt = a.n_tok - t0 < NT ? (int)(a.n_tok - t0) : NT;
    const int64_t n_chunks = a.fast ? a.cols / CH : (a.cols + CH - 1) / CH;
    const int64_t c = (int64_t)blockIdx.x * PI_WARP_SIZE + lane;
    const int64_t s = blockIdx.y;
    const int64_t k0 = s * a.rows_per_split;
    const int64_t k1 = k0 + a.rows_per_split < a.n_idx ? k0 + a.rows_per_split : a.n_idx;
    const float *__restrict__ h = a.h;

    float acc[NT][CH];
#pragma unroll
    for (int t = 0; t < NT; t++)
#pragma unroll
        for (int j = 0; j < CH; j++) acc[t][j] = 0.0f;

    /* warps interleave over the rows so that neighbouring rows are in flight together */
#pragma unroll 2
    for (int64_t k = k0 + warp; k < k1; k += nwarps) {
        const int64_t r = PI_LDG(a.idx + k);
        if (r < 0 || r >= a.rows) {
            if (lane == 0 && blockIdx.x == 0 && t0 == 0) atomicOr(&g_pi_err, ERR_INDEX);
            continue;
        }
        float hv[NT];
        bool any = false;
#pragma unroll
        for (int t = 0; t < NT; t++) {
            hv[t] = t < nt ? PI_LDG(h + (t0 + t) * a.h_stride + k) : 0.0f;
            any |= hv[t] != 0.0f;
        }
        if (!any || c >= n_chunks) continue; /* a row no token of the tile needs is never read */
        const uint8_t *__restrict__ row = a.W + r * a.stride;
        float w[CH];
        if (a.fast) {
            load_fast<T>(row, c, w);
        } else {
#pragma unroll
            for (int j = 0; j < CH; j++) w[j] = c * CH + j < a.cols ? elem_generic<T>(row, c * CH + j) : 0.0f;
        }
#pragma unroll
        for (int t = 0; t < NT; t++) {
            if (hv[t] != 0.0f) { /* as the CPU: a zero weight skips the row for that token */
#pragma unroll
                for (int j = 0; j < CH; j++) acc[t][j] = fmaf(hv[t], w[j], acc[t][j]);
            }
        }
    }

#pragma unroll
    for (int t = 0; t < NT; t++)
#pragma unroll
        for (int j = 0; j < CH; j++) red[((warp * NT + t) * PI_WARP_SIZE + lane) * (CH + 1) + j] = acc[t][j];
    __syncthreads();
    /* item i = (t, lane l, value j), j fastest so that consecutive threads write neighbouring columns;
     * each sums the warps in order 0, 1, .. */
    for (int i = (int)threadIdx.x; i < NT * PI_WARP_SIZE * CH; i += (int)blockDim.x) {
        const int t = i / (PI_WARP_SIZE * CH), l = (i / CH) % PI_WARP_SIZE, j = i % CH;
        const int64_t cc = (int64_t)blockIdx.x * PI_WARP_SIZE + l;
        if (t >= nt || cc >= n_chunks) continue;
        const int64_t col = a.fast ? pos_fast<T>(cc, j >> 2) + (j & 3) : cc * CH + j;
        if (col >= a.cols) continue;
        float sum = 0.0f;
        for (int w = 0; w < nwarps; w++) sum += red[((w * NT + t) * PI_WARP_SIZE + l) * (CH + 1) + j];
        const int64_t o = (t0 + t) * a.cols + col;
        if (a.part) a.part[s * a.n_tok * a.cols + o] = sum;
        else a.y[o] = a.accumulate ? a.y[o] + sum : sum;
    }
}

/* y[e] (+)= sum over the S splits of part[s, e], in split order */
__global__ void __launch_bounds__(PI_BLOCK) k_reduce(const float *__restrict__ part, int64_t S, int64_t n,
                                                     float *__restrict__ y, int accumulate) {
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
        float sum = 0.0f;
        for (int64_t s = 0; s < S; s++) sum += part[s * n + e];
        y[e] = accumulate ? y[e] + sum : sum;
    }
}

/* ------------------------------------------------------------------ host: device state */

struct DevInfo {
    int sms = 0, ws = 0, pools = 0;
    gpuMemPool_t pool{};
    bool ready = false;
};

constexpr int MAX_DEVICES = 64;
DevInfo g_dev[MAX_DEVICES];
std::mutex g_dev_mu;

std::mutex g_alloc_mu;
std::unordered_map<void *, int64_t> g_allocs;
int64_t g_alloc_bytes = 0;

int device_error() {
    (void)gpuGetLastError(); /* clear a non-sticky error so that later calls do not report it */
    return PI_ERR_DEVICE;
}

/* the current device's properties (and scratch pool), queried once */
int dev_info(const DevInfo **out) {
    int d = 0;
    if (gpuGetDevice(&d) != gpuSuccess) return device_error();
    if (d < 0 || d >= MAX_DEVICES) return PI_ERR_DEVICE;
    std::lock_guard<std::mutex> lock(g_dev_mu);
    DevInfo &di = g_dev[d];
    if (!di.ready) {
        int sms = 0, ws = 0, pools = 0;
        if (gpuDeviceGetAttribute(&sms, gpuDevAttrMultiProcessorCount, d) != gpuSuccess ||
            gpuDeviceGetAttribute(&ws, gpuDevAttrWarpSize, d) != gpuSuccess)
            return device_error();
        if (sms <= 0 || ws <= 0 || PI_BLOCK % ws != 0) return PI_ERR_DEVICE;
        if (gpuDeviceGetAttribute(&pools, gpuDevAttrMemoryPoolsSupported, d) != gpuSuccess) {
            (void)gpuGetLastError();
            pools = 0;
        }
        if (pools) {
            /* our own stream-ordered pool for the ops' scratch: cheap per-call allocation, and it keeps
             * at most 32 MiB when idle (the default pool would release everything at each sync) */
            gpuMemPoolProps props;
            memset(&props, 0, sizeof props);
            props.allocType = gpuMemAllocationTypePinned;
            props.location.type = gpuMemLocationTypeDevice;
            props.location.id = d;
            if (gpuMemPoolCreate(&di.pool, &props) != gpuSuccess) {
                (void)gpuGetLastError();
                pools = 0;
            } else {
                uint64_t keep = (uint64_t)32 << 20;
                if (gpuMemPoolSetAttribute(di.pool, gpuMemPoolAttrReleaseThreshold, &keep) != gpuSuccess)
                    (void)gpuGetLastError();
            }
        }
        di.sms = sms;
        di.ws = ws;
        di.pools = pools;
        di.ready = true;
    }
    *out = &di;
    return PI_OK;
}

int scratch_alloc(const DevInfo *di, size_t bytes, gpuStream_t st, void **p) {
    *p = nullptr;
    if (bytes == 0) return PI_OK;
    const gpuError_t e = di->pools ? gpuMallocFromPoolAsync(p, bytes, di->pool, st) : gpuMalloc(p, bytes);
    if (e != gpuSuccess) {
        (void)gpuGetLastError();
        *p = nullptr;
        return PI_ERR_NOMEM;
    }
    return PI_OK;
}

/* stream-ordered free after the launches that use it; without pools, cudaFree waits for the device */
void scratch_free(const DevInfo *di, void *p, gpuStream_t st) {
    if (!p) return;
    if ((di->pools ? gpuFreeAsync(p, st) : gpuFree(p)) != gpuSuccess) (void)gpuGetLastError();
}

/* ------------------------------------------------------------------ host: validation (as cpu/ops.c) */

int64_t row_bytes(int32_t type, int64_t cols) {
    if (cols < 0 || cols > PI_MAX_DIM) return PI_ERR_SHAPE;
    switch (type) {
    case PI_TYPE_F32: return cols * 4;
    case PI_TYPE_F16:
    case PI_TYPE_BF16: return cols * 2;
    case PI_TYPE_Q8_0: return cols % PI_QK8_0 ? PI_ERR_ALIGN : cols / PI_QK8_0 * PI_BLOCK_BYTES_Q8_0;
    case PI_TYPE_Q4_0: return cols % PI_QK4_0 ? PI_ERR_ALIGN : cols / PI_QK4_0 * PI_BLOCK_BYTES_Q4_0;
    default: return PI_ERR_TYPE;
    }
}

int check_matrix(const pi_matrix *m) {
    if (!m || !m->data) return PI_ERR_NULL;
    if (row_bytes(m->type, 0) == PI_ERR_TYPE) return PI_ERR_TYPE;
    if (m->rows <= 0 || m->cols <= 0 || m->rows > PI_MAX_DIM || m->cols > PI_MAX_DIM || m->data_bytes < 0)
        return PI_ERR_SHAPE;
    const int64_t rb = row_bytes(m->type, m->cols);
    if (rb < 0) return (int)rb;
    if (m->row_stride < rb) return PI_ERR_SHAPE;
    if (rb > m->data_bytes) return PI_ERR_BOUNDS;
    if (m->rows - 1 > (m->data_bytes - rb) / m->row_stride) return PI_ERR_BOUNDS;
    return PI_OK;
}

bool mul_ok(int64_t a, int64_t b, int64_t *out) {
    if (a < 0 || b < 0) return false;
    if (a != 0 && b > INT64_MAX / a) return false;
    *out = a * b;
    return true;
}

int check_list(const int32_t *idx, int64_t n_idx) {
    if (n_idx < 0 || n_idx > PI_MAX_DIM) return PI_ERR_SHAPE;
    if (n_idx > 0 && !idx) return PI_ERR_NULL;
    return PI_OK;
}

bool aligned(const void *p, uintptr_t a) { return ((uintptr_t)p & (a - 1)) == 0; }

/* can the rows of m take the 16-byte (float types) / 16-bit (quantized) path? */
bool fast_weights(const pi_matrix *m) {
    switch (m->type) {
    case PI_TYPE_F32: return m->cols % 4 == 0 && aligned(m->data, 16) && m->row_stride % 16 == 0;
    case PI_TYPE_F16:
    case PI_TYPE_BF16: return m->cols % 8 == 0 && aligned(m->data, 16) && m->row_stride % 16 == 0;
    default: return aligned(m->data, 2) && m->row_stride % 2 == 0; /* Q8_0, Q4_0: cols % 32 == 0 */
    }
}

size_t round256(size_t n) { return (n + 255) & ~(size_t)255; }

/* blocks for a grid-stride loop over n elements (thread per element) */
int grid_for(int64_t n, const DevInfo *di) {
    int64_t blocks = (n + PI_BLOCK - 1) / PI_BLOCK;
    const int64_t cap = 32 * (int64_t)di->sms;
    if (blocks > cap) blocks = cap;
    return blocks < 1 ? 1 : (int)blocks;
}

/* blocks for a grid-stride loop over n elements (thread per element) */
/* ------------------------------------------------------------------ host: launchers */

template <int T>
void launch_rows_t(int nt, dim3 grid, const RowsArgs &a, gpuStream_t st) {
    switch (nt) {
    case 1: pi_launch(k_rows<T, 1>, grid, dim3(PI_BLOCK), st, a); break;
    case 4: pi_launch(k_rows<T, 4>, grid, dim3(PI_BLOCK), st, a); break;
    default: pi_launch(k_rows<T, 8>, grid, dim3(PI_BLOCK), st, a); break;
    }
}

template <int T>
void launch_axpy_t(int nt, dim3 grid, const AxpyArgs &a, gpuStream_t st) {
    switch (nt) {
    case 1: pi_launch(k_axpy<T, 1>, grid, dim3(PI_BLOCK), st, a); break;
    default: pi_launch(k_axpy<T, 4>, grid, dim3(PI_BLOCK), st, a); break;
    }
}

bool quantized(const pi_matrix *W) { return W->type == PI_TYPE_Q8_0 || W->type == PI_TYPE_Q4_0; }

/* x [n_tok, cols] quantized to Q8_0 blocks for Q8_0 / Q4_0 rows (k_quantize_x), in scratch */
struct QuantX {
    void *mem = nullptr;
    const int8_t *qs = nullptr;
    const float *d = nullptr;
};

int quantize_x(const DevInfo *di, const float *x, int64_t n_tok, int64_t cols, gpuStream_t st, QuantX *q) {
    const int64_t n = n_tok * cols, n_blocks = n / 32; /* cols % 32 == 0: check_matrix of the rows' matrix */
    const size_t qs_bytes = round256((size_t)n);
    int rc = scratch_alloc(di, qs_bytes + (size_t)n_blocks * sizeof(float), st, &q->mem);
    if (rc) return rc;
    int8_t *qs = static_cast<int8_t *>(q->mem);
    float *d = reinterpret_cast<float *>(static_cast<uint8_t *>(q->mem) + qs_bytes);
    q->qs = qs;
    q->d = d;
    pi_launch(k_quantize_x, dim3((unsigned)grid_for(n, di)), dim3(PI_BLOCK), st, x, n, qs, d);
    return gpuGetLastError() == gpuSuccess ? PI_OK : PI_ERR_DEVICE;
}

/* y [n_tok, n_out] from the rows of W listed in idx (all rows when NULL), with the epilogue `mode`.
 * Q8_0 / Q4_0 rows take x quantized (qx: done by the caller for several calls on the same x, or here) */
int run_rows(const DevInfo *di, const pi_matrix *W, const int32_t *idx, int64_t n_out, const float *x,
             int64_t n_tok, float *y, int mode, int act, float thr, uint32_t *dup, gpuStream_t st,
             const QuantX *qx = nullptr) {
    if (n_out == 0) return PI_OK;
    if (quantized(W) && !qx) {
        QuantX own;
        int rc = quantize_x(di, x, n_tok, W->cols, st, &own);
        if (!rc) rc = run_rows(di, W, idx, n_out, x, n_tok, y, mode, act, thr, dup, st, &own);
        scratch_free(di, own.mem, st);
        return rc;
    }
    RowsArgs a;
    a.W = static_cast<const uint8_t *>(W->data);
    a.rows = W->rows;
    a.cols = W->cols;
    a.stride = W->row_stride;
    a.idx = idx;
    a.n_out = n_out;
    a.x = x;
    a.n_tok = n_tok;
    a.t_base = 0;
    a.y = y;
    a.dup = dup;
    a.mode = mode;
    a.act = act;
    a.thr = thr;
    a.fast = fast_weights(W) && (quantized(W) || aligned(x, 16));
    a.xq = qx ? qx->qs : nullptr;
    a.xd = qx ? qx->d : nullptr;
    /* tokens per tile: weights are read once per tile; 8 accumulators per lane cost no occupancy.
     * Tiles of 1, 4 or 8 (a tile may be partly empty): fewer instantiations, a faster build. */
    const int nt = n_tok >= 5 ? 8 : n_tok >= 2 ? 4 : 1;
    const int64_t wpb = PI_BLOCK / di->ws;
    int64_t bx = (n_out + wpb - 1) / wpb; /* the warps loop over the rows beyond this */
    if (bx > ((int64_t)1 << 20)) bx = (int64_t)1 << 20;
    const int64_t tiles = (n_tok + nt - 1) / nt;
    for (int64_t tb = 0; tb < tiles; tb += GRID_Y_MAX) {
        a.t_base = tb * nt;
        const dim3 grid((unsigned)bx, (unsigned)(tiles - tb < GRID_Y_MAX ? tiles - tb : GRID_Y_MAX));
        switch (W->type) {
        case PI_TYPE_F32: launch_rows_t<T_F32>(nt, grid, a, st); break;
        case PI_TYPE_F16: launch_rows_t<T_F16>(nt, grid, a, st); break;
        case PI_TYPE_BF16: launch_rows_t<T_BF16>(nt, grid, a, st); break;
        case PI_TYPE_Q8_0: launch_rows_t<T_Q8_0>(nt, grid, a, st); break;
        default: launch_rows_t<T_Q4_0>(nt, grid, a, st); break;
        }
        if (gpuGetLastError() != gpuSuccess) return PI_ERR_DEVICE;
    }
    return PI_OK;
}

struct AxpyPlan {
    int nt;
    int64_t n_chunks, col_tiles, tiles, S, rps;
    size_t part_floats;
};

/* How many splits of the index list: enough blocks to fill the GPU (about 4 per SM) when the column
 * tiles and token tiles alone do not, but at least 4 rows per warp (so that each warp has loads in
 * flight and the partial sums stay small next to the weights read) and at most 64 MiB of partials. */
int plan_axpy(const DevInfo *di, const pi_matrix *Wt, int64_t n_idx, int64_t n_tok, AxpyPlan *p) {
    const int CH = Wt->type == PI_TYPE_F32 ? 4 : 8;
    p->nt = n_tok >= 2 ? 4 : 1;
    p->n_chunks = (Wt->cols + CH - 1) / CH;
    p->col_tiles = (p->n_chunks + di->ws - 1) / di->ws;
    if (p->col_tiles > INT32_MAX) return PI_ERR_SHAPE;
    p->tiles = (n_tok + p->nt - 1) / p->nt;
    const int64_t warps = PI_BLOCK / di->ws;
    const int64_t base = p->col_tiles * (p->tiles < GRID_Y_MAX ? p->tiles : GRID_Y_MAX);
    const int64_t target = 4 * (int64_t)di->sms;
    int64_t S = base >= target ? 1 : (target + base - 1) / base;
    const int64_t by_rows = n_idx / (4 * warps);
    if (S > by_rows) S = by_rows;
    if (S > 1024) S = 1024;
    const int64_t per = n_tok * Wt->cols; /* checked for overflow by the caller */
    const int64_t by_mem = ((int64_t)16 << 20) / per;
    if (S > by_mem) S = by_mem;
    if (S < 1) S = 1;
    p->rps = (n_idx + S - 1) / S;
    p->S = (n_idx + p->rps - 1) / p->rps;
    p->part_floats = p->S > 1 ? (size_t)(p->S * per) : 0;
    return PI_OK;
}

int run_axpy(const DevInfo *di, const AxpyPlan &p, const pi_matrix *Wt, const int32_t *idx, int64_t n_idx,
             const float *h, int64_t h_stride, int64_t n_tok, float *y, int accumulate, float *part,
             gpuStream_t st) {
    AxpyArgs a;
    a.W = static_cast<const uint8_t *>(Wt->data);
    a.rows = Wt->rows;
    a.cols = Wt->cols;
    a.stride = Wt->row_stride;
    a.idx = idx;
    a.n_idx = n_idx;
    a.h = h;
    a.h_stride = h_stride;
    a.n_tok = n_tok;
    a.t_base = 0;
    a.y = y;
    a.part = p.S > 1 ? part : nullptr;
    a.rows_per_split = p.rps;
    a.accumulate = accumulate;
    a.fast = fast_weights(Wt);
    for (int64_t tb = 0; tb < p.tiles; tb += GRID_Y_MAX) {
        a.t_base = tb * p.nt;
        const dim3 grid((unsigned)p.col_tiles, (unsigned)p.S,
                        (unsigned)(p.tiles - tb < GRID_Y_MAX ? p.tiles - tb : GRID_Y_MAX));
        switch (Wt->type) {
        case PI_TYPE_F32: launch_axpy_t<T_F32>(p.nt, grid, a, st); break;
        case PI_TYPE_F16: launch_axpy_t<T_F16>(p.nt, grid, a, st); break;
        case PI_TYPE_BF16: launch_axpy_t<T_BF16>(p.nt, grid, a, st); break;
        case PI_TYPE_Q8_0: launch_axpy_t<T_Q8_0>(p.nt, grid, a, st); break;
        default: launch_axpy_t<T_Q4_0>(p.nt, grid, a, st); break;
        }
        if (gpuGetLastError() != gpuSuccess) return PI_ERR_DEVICE;
    }
    if (p.S > 1) {
        const int64_t n = n_tok * Wt->cols;
        int64_t blocks = (n + PI_BLOCK - 1) / PI_BLOCK;
        if (blocks > 8 * (int64_t)di->sms * 8) blocks = 8 * (int64_t)di->sms * 8;
        pi_launch(k_reduce, dim3((unsigned)blocks), dim3(PI_BLOCK), st, (const float *)part, p.S, n, y, accumulate);
        if (gpuGetLastError() != gpuSuccess) return PI_ERR_DEVICE;
    }
    return PI_OK;
}

/* ------------------------------------------------------------------ dense blocks: norm, RoPE, attention

These keep an offloaded layer's attention block on the device: the residual stream stays there between
layers and only the FFN input (n_embd floats per token) and a compact cold index list come back. They
are small next to the weight streams (k_rows does the projections); written for clarity and fixed
reduction orders (deterministic), not for the last microsecond. */

struct SumOp {
    __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct MaxOp {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

/* op over the block in a fixed order (deterministic): warp butterflies, then every thread folds the warp
 * results in order. sh: >= PI_BLOCK / warp floats of shared memory; callable repeatedly (a barrier
 * before reuse). */
template <class Op>
__device__ __forceinline__ float block_reduce(float v, float *sh, Op op) {
    const int lane = (int)(threadIdx.x % PI_WARP_SIZE), warp = (int)(threadIdx.x / PI_WARP_SIZE);
    const int nw = (int)(blockDim.x / PI_WARP_SIZE);
#pragma unroll
    for (int o = PI_WARP_SIZE / 2; o > 0; o >>= 1) v = op(v, PI_SHFL_XOR(v, o));
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    float t = sh[0];
    for (int w = 1; w < nw; w++) t = op(t, sh[w]);
    return t;
}

/* y[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w; block per token; y may be x */
__global__ void __launch_bounds__(PI_BLOCK) k_rmsnorm(const float *x, const float *__restrict__ w, int64_t n,
                                                      float eps, float *y) {
    __shared__ float sh[PI_BLOCK / 32];
    const float *xt = x + (int64_t)blockIdx.x * n;
    float *yt = y + (int64_t)blockIdx.x * n;
    float ss = 0.0f;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) ss = fmaf(xt[i], xt[i], ss);
    ss = block_reduce(ss, sh, SumOp());
    const float scale = 1.0f / sqrtf(ss / (float)n + eps);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) yt[i] = xt[i] * scale * PI_LDG(w + i);
}

/* rotary embedding in place, x [n_tok, n_heads, head_dim] at positions pos0 + t; one thread per pair.
 * theta_i = pos * theta_scale^i by repeated float multiplication, as the CPU op (and ggml) */
__global__ void __launch_bounds__(PI_BLOCK) k_rope(float *x, int64_t pos0, int64_t n_tok, int64_t n_heads,
                                                   int64_t head_dim, int64_t n_rot, float theta_scale, int neox) {
    const int64_t half = n_rot / 2, n = n_tok * n_heads * half;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t i = e % half, th = e / half, t = th / n_heads;
        float theta = (float)(pos0 + t);
        for (int64_t j = 0; j < i; j++) theta *= theta_scale;
        const float c = cosf(theta), s = sinf(theta);
        float *v = x + th * head_dim;
        const int64_t a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
        const float x0 = v[a], x1 = v[b];
        v[a] = x0 * c - x1 * s;
        v[b] = x0 * s + x1 * c;
    }
}

/* y[i] = half(x[i]): rows written into an f16 KV cache */
__global__ void __launch_bounds__(PI_BLOCK) k_to_f16(const float *__restrict__ x, unsigned short *__restrict__ y,
                                                     int64_t n) {
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x)
        y[e] = pi_fp32_to_fp16(x[e]); /* pi_half.h: the CPU kernels' bits */
}

/* one KV cache element as float: F32 or F16 caches (pi_dev_attention's kv_type) */
struct KvF32 {
    static __device__ __forceinline__ float at(const void *p, int64_t e) { return static_cast<const float *>(p)[e]; }
};
struct KvF16 {
    static __device__ __forceinline__ float at(const void *p, int64_t e) {
        return pi_gpu_h2f(static_cast<const unsigned short *>(p)[e]);
    }
};

/* Causal GQA attention, block (head h, token t): token t (at position n_past + t) sees cache rows
 * 0 .. n_past + t. q [n_tok, n_head * d], K/V [kv_rows, n_head_kv * d] of KV (KvF32 / KvF16), out
 * [n_tok, n_head * d], sc: scratch [n_tok, n_head, n_past + n_tok] for the scores. Warp per cache row
 * for the scores, then softmax over the block, then groups of d threads sum interleaved rows of V (in a
 * fixed order). */
template <class KV>
__global__ void __launch_bounds__(PI_BLOCK) k_attention(const float *__restrict__ q, const void *__restrict__ K,
                                                        const void *__restrict__ V, int64_t n_past, int64_t t_base,
                                                        int64_t n_head, int64_t n_head_kv, int64_t d, float scale,
                                                        float *__restrict__ sc, int64_t s_max, float *__restrict__ out) {
    __shared__ float red[PI_BLOCK];
    const int lane = (int)(threadIdx.x % PI_WARP_SIZE), warp = (int)(threadIdx.x / PI_WARP_SIZE);
    const int nw = (int)(blockDim.x / PI_WARP_SIZE), bd = (int)blockDim.x, tid = (int)threadIdx.x;
    const int64_t h = blockIdx.x, t = t_base + blockIdx.y;
    const int64_t g = h / (n_head / n_head_kv), S = n_past + t + 1, kv_w = n_head_kv * d;
    const float *qv = q + (t * n_head + h) * d;
    float *s = sc + (blockIdx.y * n_head + h) * s_max;
    for (int64_t r = warp; r < S; r += nw) {
        const int64_t kr = r * kv_w + g * d;
        float dot = 0.0f;
        for (int64_t j = lane; j < d; j += PI_WARP_SIZE) dot = fmaf(qv[j], KV::at(K, kr + j), dot);
        dot = warp_sum(dot);
        if (lane == 0) s[r] = dot * scale;
    }
    __syncthreads();
    float m = -INFINITY;
    for (int64_t r = tid; r < S; r += bd) m = fmaxf(m, s[r]);
    m = block_reduce(m, red, MaxOp());
    float sum = 0.0f;
    for (int64_t r = tid; r < S; r += bd) {
        const float e = expf(s[r] - m);
        s[r] = e;
        sum += e;
    }
    sum = block_reduce(sum, red, SumOp()); /* its barriers also publish the s[] writes */
    const float inv = 1.0f / sum;
    float *o = out + (t * n_head + h) * d;
    if (d <= bd) {
        const int G = bd / (int)d, gi = tid / (int)d, j = tid % (int)d;
        float acc = 0.0f;
        if (gi < G)
            for (int64_t r = gi; r < S; r += G) acc = fmaf(s[r], KV::at(V, r * kv_w + g * d + j), acc);
        __syncthreads();
        if (gi < G) red[gi * d + j] = acc;
        __syncthreads();
        if (tid < d) {
            float v = 0.0f;
            for (int k = 0; k < G; k++) v += red[k * d + tid];
            o[tid] = v * inv;
        }
    } else {
        for (int64_t j = tid; j < d; j += bd) {
            float acc = 0.0f;
            for (int64_t r = 0; r < S; r++) acc = fmaf(s[r], KV::at(V, r * kv_w + g * d + j), acc);
            o[j] = acc * inv;
        }
    }
}

/* h[e] = 0 where mask[e] == 0: the neurons a token of a batch does not take (pi_sparse_ffn's tok_mask).
 * Between the gate and the up pass, so the up pass skips them like any neuron whose gate did not fire. */
__global__ void __launch_bounds__(PI_BLOCK) k_mask(float *__restrict__ h, const uint8_t *__restrict__ mask, int64_t n) {
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x)
        if (!mask[e]) h[e] = 0.0f;
}

/* y += x, elementwise */
__global__ void __launch_bounds__(PI_BLOCK) k_add(float *__restrict__ y, const float *__restrict__ x, int64_t n) {
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x)
        y[e] += x[e];
}

/* The predictor's threshold and the hot/cold split, on one block: neuron i is active if logits[t, i] >= thr
 * for some token; an active neuron with part[i] >= 0 goes to hot_out as its local id part[i], one with
 * part[i] == -1 (or every neuron, part NULL) to cold_out as i. Both lists come out in ascending neuron
 * order; counts[0] = hot, counts[1] = cold. A part[] entry outside [-1, n_local) flags ERR_INDEX and
 * counts as cold. Thread k owns the contiguous range k * per .. of the neurons: it counts its hot and cold
 * neurons, one block-wide exclusive scan gives each range its offsets, and each thread writes its own.
 * (A scan per chunk of PI_BLOCK neurons took 43 dependent rounds of loads and barriers for 11008.) */
__device__ __forceinline__ int select_class(const float *__restrict__ logits, int64_t n_tok, int64_t n_ff, float thr,
                                            const int32_t *__restrict__ part, int64_t n_local, int64_t i,
                                            int32_t *m, bool flag) {
    bool on = false;
    for (int64_t t = 0; t < n_tok && !on; t++) on = logits[t * n_ff + i] >= thr;
    *m = -1;
    if (part) {
        *m = PI_LDG(part + i);
        if (*m < -1 || *m >= n_local) {
            if (flag) atomicOr(&g_pi_err, ERR_INDEX);
            *m = -1;
        }
    }
    return !on ? 0 : *m >= 0 ? 1 : 2; /* inactive, hot, cold */
}

__global__ void __launch_bounds__(PI_BLOCK) k_select(const float *__restrict__ logits, int64_t n_tok, int64_t n_ff,
                                                     float thr, const int32_t *__restrict__ part, int64_t n_local,
                                                     int32_t *__restrict__ hot_out, int32_t *__restrict__ cold_out,
                                                     int32_t *__restrict__ counts) {
    __shared__ int32_t scan_h[PI_BLOCK], scan_c[PI_BLOCK];
    const int tid = (int)threadIdx.x, bd = (int)blockDim.x;
    const int64_t per = (n_ff + bd - 1) / bd, i0 = tid * per, i1 = i0 + per < n_ff ? i0 + per : n_ff;
    int32_t nh = 0, nc = 0, m;
    for (int64_t i = i0; i < i1; i++) {
        const int k = select_class(logits, n_tok, n_ff, thr, part, n_local, i, &m, true);
        nh += k == 1;
        nc += k == 2;
    }
    /* inclusive Hillis-Steele scan of the per-thread counts (n_ff <= INT32_MAX: no overflow) */
    scan_h[tid] = nh;
    scan_c[tid] = nc;
    __syncthreads();
    for (int o = 1; o < bd; o <<= 1) {
        const int32_t vh = tid >= o ? scan_h[tid - o] : 0, vc = tid >= o ? scan_c[tid - o] : 0;
        __syncthreads();
        scan_h[tid] += vh;
        scan_c[tid] += vc;
        __syncthreads();
    }
    int32_t oh = scan_h[tid] - nh, oc = scan_c[tid] - nc;
    for (int64_t i = i0; i < i1; i++) {
        const int k = select_class(logits, n_tok, n_ff, thr, part, n_local, i, &m, false);
        if (k == 1) hot_out[oh++] = m;
        else if (k == 2) cold_out[oc++] = (int32_t)i;
    }
    if (tid == bd - 1) {
        counts[0] = scan_h[tid];
        counts[1] = scan_c[tid];
    }
}

int check_tokens(const float *x, int64_t n_tok, const float *y) {
    if (!x || !y) return PI_ERR_NULL;
    if (n_tok <= 0 || n_tok > PI_MAX_DIM) return PI_ERR_SHAPE;
    return PI_OK;
}

}  // namespace

/* ------------------------------------------------------------------ entry points: device and memory */

PI_EXPORT int pi_dev_available(void) {
    int n = 0;
    if (gpuGetDeviceCount(&n) != gpuSuccess) { /* no driver, no device: not an error here */
        (void)gpuGetLastError();
        return 0;
    }
    return n > 0 ? 1 : 0;
}

PI_EXPORT const char *pi_dev_name(void) {
    static thread_local char name[256];
    int d = 0;
    gpuDeviceProp prop;
    if (!pi_dev_available() || gpuGetDevice(&d) != gpuSuccess || gpuGetDeviceProperties(&prop, d) != gpuSuccess) {
        (void)gpuGetLastError();
        return "none";
    }
    strncpy(name, prop.name, sizeof name - 1);
    name[sizeof name - 1] = '\0';
    return name;
}

PI_EXPORT const char *pi_dev_backend(void) { return PI_GPU_BACKEND; }

PI_EXPORT int pi_dev_sync(void *stream) {
    gpuStream_t st = static_cast<gpuStream_t>(stream);
    unsigned int flags = 0;
    /* the flags are read in stream order, after every op enqueued on this stream before the sync */
    if (gpuMemcpyFromSymbolAsync(&flags, PI_SYMBOL(g_pi_err), sizeof flags, 0, gpuMemcpyDeviceToHost, st) !=
            gpuSuccess ||
        gpuStreamSynchronize(st) != gpuSuccess)
        return device_error();
    if (flags) {
        static const unsigned int zero = 0;
        if (gpuMemcpyToSymbolAsync(PI_SYMBOL(g_pi_err), &zero, sizeof zero, 0, gpuMemcpyHostToDevice, st) !=
                gpuSuccess ||
            gpuStreamSynchronize(st) != gpuSuccess)
            return device_error();
        return flags & ERR_INDEX ? PI_ERR_INDEX : PI_ERR_DUPLICATE;
    }
    return PI_OK;
}

PI_EXPORT int pi_dev_malloc(void **ptr, int64_t bytes) {
    if (!ptr) return PI_ERR_NULL;
    *ptr = nullptr;
    if (bytes < 0) return PI_ERR_SHAPE;
    if (bytes == 0) return PI_OK;
    void *p = nullptr;
    if (gpuMalloc(&p, (size_t)bytes) != gpuSuccess) {
        (void)gpuGetLastError();
        return PI_ERR_NOMEM;
    }
    std::lock_guard<std::mutex> lock(g_alloc_mu);
    g_allocs[p] = bytes;
    g_alloc_bytes += bytes;
    *ptr = p;
    return PI_OK;
}

PI_EXPORT int pi_dev_free(void *ptr) {
    if (!ptr) return PI_OK;
    if (gpuFree(ptr) != gpuSuccess) return device_error();
    std::lock_guard<std::mutex> lock(g_alloc_mu);
    auto it = g_allocs.find(ptr);
    if (it != g_allocs.end()) {
        g_alloc_bytes -= it->second;
        g_allocs.erase(it);
    }
    return PI_OK;
}

PI_EXPORT int pi_dev_mem_used(int64_t *bytes) {
    if (!bytes) return PI_ERR_NULL;
    std::lock_guard<std::mutex> lock(g_alloc_mu);
    *bytes = g_alloc_bytes;
    return PI_OK;
}

PI_EXPORT int pi_dev_memcpy_h2d(void *dst, const void *src, int64_t bytes, void *stream) {
    if (bytes < 0) return PI_ERR_SHAPE;
    if (bytes == 0) return PI_OK;
    if (!dst || !src) return PI_ERR_NULL;
    if (gpuMemcpyAsync(dst, src, (size_t)bytes, gpuMemcpyHostToDevice, static_cast<gpuStream_t>(stream)) != gpuSuccess)
        return device_error();
    return PI_OK;
}

PI_EXPORT int pi_dev_memcpy_d2h(void *dst, const void *src, int64_t bytes, void *stream) {
    if (bytes < 0) return PI_ERR_SHAPE;
    if (bytes == 0) return PI_OK;
    if (!dst || !src) return PI_ERR_NULL;
    if (gpuMemcpyAsync(dst, src, (size_t)bytes, gpuMemcpyDeviceToHost, static_cast<gpuStream_t>(stream)) != gpuSuccess)
        return device_error();
    return PI_OK;
}

PI_EXPORT int pi_dev_memcpy_d2d(void *dst, const void *src, int64_t bytes, void *stream) {
    if (bytes < 0) return PI_ERR_SHAPE;
    if (bytes == 0) return PI_OK;
    if (!dst || !src) return PI_ERR_NULL;
    if (gpuMemcpyAsync(dst, src, (size_t)bytes, gpuMemcpyDeviceToDevice, static_cast<gpuStream_t>(stream)) !=
        gpuSuccess)
        return device_error();
    return PI_OK;
}

PI_EXPORT int pi_dev_memset(void *dst, int32_t value, int64_t bytes, void *stream) {
    if (bytes < 0) return PI_ERR_SHAPE;
    if (bytes == 0) return PI_OK;
    if (!dst) return PI_ERR_NULL;
    if (gpuMemsetAsync(dst, value, (size_t)bytes, static_cast<gpuStream_t>(stream)) != gpuSuccess)
        return device_error();
    return PI_OK;
}

PI_EXPORT int pi_dev_mem_info(int64_t *free_bytes, int64_t *total_bytes) {
    if (!free_bytes || !total_bytes) return PI_ERR_NULL;
    size_t f = 0, t = 0;
    if (gpuMemGetInfo(&f, &t) != gpuSuccess) return device_error();
    *free_bytes = (int64_t)f;
    *total_bytes = (int64_t)t;
    return PI_OK;
}

/* ------------------------------------------------------------------ entry points: ops */

PI_EXPORT int pi_dev_gemm(const pi_matrix *W, const float *x, int64_t n_tok, float *y, void *stream) {
    int rc = check_matrix(W);
    if (rc) return rc;
    if ((rc = check_tokens(x, n_tok, y))) return rc;
    int64_t tmp;
    if (!mul_ok(n_tok, W->rows, &tmp) || !mul_ok(n_tok, W->cols, &tmp)) return PI_ERR_SHAPE;
    const DevInfo *di;
    if ((rc = dev_info(&di))) return rc;
    return run_rows(di, W, nullptr, W->rows, x, n_tok, y, MODE_PLAIN, 0, 0.0f, nullptr,
                    static_cast<gpuStream_t>(stream));
}

PI_EXPORT int pi_dev_sparse_gemm_rows(const pi_matrix *W, const int32_t *idx, int64_t n_idx, const float *x,
                                      int64_t n_tok, float *y, void *stream) {
    int rc = check_matrix(W);
    if (rc) return rc;
    if ((rc = check_tokens(x, n_tok, y))) return rc;
    if ((rc = check_list(idx, n_idx))) return rc;
    int64_t tmp;
    if (!mul_ok(n_tok, n_idx, &tmp) || !mul_ok(n_tok, W->cols, &tmp)) return PI_ERR_SHAPE;
    if (n_idx == 0) return PI_OK;
    const DevInfo *di;
    if ((rc = dev_info(&di))) return rc;
    return run_rows(di, W, idx, n_idx, x, n_tok, y, MODE_PLAIN, 0, 0.0f, nullptr, static_cast<gpuStream_t>(stream));
}

PI_EXPORT int pi_dev_sparse_axpy_rows(const pi_matrix *Wt, const int32_t *idx, int64_t n_idx, const float *h,
                                      int64_t n_tok, float *y, void *stream) {
    int rc = check_matrix(Wt);
    if (rc) return rc;
    if (!y || (n_idx > 0 && !h)) return PI_ERR_NULL;
    if (n_tok <= 0 || n_tok > PI_MAX_DIM) return PI_ERR_SHAPE;
    if ((rc = check_list(idx, n_idx))) return rc;
    int64_t tmp;
    if (!mul_ok(n_tok, n_idx, &tmp) || !mul_ok(n_tok, Wt->cols, &tmp)) return PI_ERR_SHAPE;
    if (n_idx == 0) return PI_OK;
    const DevInfo *di;
    if ((rc = dev_info(&di))) return rc;
    gpuStream_t st = static_cast<gpuStream_t>(stream);
    AxpyPlan p;
    if ((rc = plan_axpy(di, Wt, n_idx, n_tok, &p))) return rc;
    void *part = nullptr;
    if ((rc = scratch_alloc(di, p.part_floats * sizeof(float), st, &part))) return rc;
    rc = run_axpy(di, p, Wt, idx, n_idx, h, n_idx, n_tok, y, 1, static_cast<float *>(part), st);
    scratch_free(di, part, st);
    return rc;
}

static int launch_mask(const DevInfo *di, float *h, const uint8_t *mask, int64_t n, gpuStream_t st) {
    pi_launch(k_mask, dim3((unsigned)grid_for(n, di)), dim3(PI_BLOCK), st, h, mask, n);
    return gpuGetLastError() == gpuSuccess ? PI_OK : PI_ERR_DEVICE;
}

PI_EXPORT int pi_dev_sparse_ffn(const pi_matrix *gate, const pi_matrix *up, const pi_matrix *down_t, int32_t act,
                                const int32_t *idx, int64_t n_idx, const uint8_t *tok_mask, const float *x,
                                int64_t n_tok, float *y, int32_t accumulate, float skip_threshold, void *stream) {
    int rc;
    if (act < PI_ACT_REGLU || act > PI_ACT_GELU) return PI_ERR_TYPE;
    const bool gated = act != PI_ACT_RELU && act != PI_ACT_GELU;
    if ((rc = check_matrix(up)) || (rc = check_matrix(down_t))) return rc;
    if (gated && (rc = check_matrix(gate))) return rc;
    if ((rc = check_tokens(x, n_tok, y))) return rc;
    const int64_t n_ff = up->rows, n_embd = up->cols;
    if (down_t->rows != n_ff || down_t->cols != n_embd) return PI_ERR_SHAPE;
    if (gated && (gate->rows != n_ff || gate->cols != n_embd)) return PI_ERR_SHAPE;
    if (!(skip_threshold >= 0.0f)) return PI_ERR_SHAPE; /* also refuses NaN */
    if ((rc = check_list(idx, n_idx))) return rc;
    int64_t hsize, ysize;
    if (!mul_ok(n_tok, n_embd, &ysize) || !mul_ok(n_tok, n_idx, &hsize)) return PI_ERR_SHAPE;
    const DevInfo *di;
    if ((rc = dev_info(&di))) return rc;
    gpuStream_t st = static_cast<gpuStream_t>(stream);
    if (n_idx == 0) {
        if (!accumulate && gpuMemsetAsync(y, 0, (size_t)ysize * sizeof(float), st) != gpuSuccess) return device_error();
        return PI_OK;
    }
    AxpyPlan p;
    if ((rc = plan_axpy(di, down_t, n_idx, n_tok, &p))) return rc;
    /* one scratch block: h [n_tok, n_idx] | duplicate bitmap over n_ff | axpy partials */
    const size_t h_bytes = round256((size_t)hsize * sizeof(float));
    const size_t bm_bytes = round256((size_t)((n_ff + 31) / 32) * sizeof(uint32_t));
    void *mem = nullptr;
    if ((rc = scratch_alloc(di, h_bytes + bm_bytes + p.part_floats * sizeof(float), st, &mem))) return rc;
    float *hbuf = static_cast<float *>(mem);
    uint32_t *bitmap = reinterpret_cast<uint32_t *>(static_cast<uint8_t *>(mem) + h_bytes);
    float *part = reinterpret_cast<float *>(static_cast<uint8_t *>(mem) + h_bytes + bm_bytes);
    /* gate and up read the same x: quantized once when both want it */
    QuantX qx;
    const bool share_qx = gated && quantized(gate) && quantized(up);
    if (gpuMemsetAsync(bitmap, 0, bm_bytes, st) != gpuSuccess) {
        rc = device_error();
    } else if (!(rc = share_qx ? quantize_x(di, x, n_tok, n_embd, st, &qx) : PI_OK) &&
               !(rc = run_rows(di, gated ? gate : up, idx, n_idx, x, n_tok, hbuf, MODE_ACT, act, skip_threshold,
                               bitmap, st, share_qx ? &qx : nullptr)) &&
               !(rc = tok_mask ? launch_mask(di, hbuf, tok_mask, hsize, st) : PI_OK) &&
               !(rc = gated ? run_rows(di, up, idx, n_idx, x, n_tok, hbuf, MODE_GATED, act, 0.0f, nullptr, st,
                                       share_qx ? &qx : nullptr)
                            : PI_OK)) {
        rc = run_axpy(di, p, down_t, idx, n_idx, hbuf, n_idx, n_tok, y, accumulate ? 1 : 0, part, st);
    }
    scratch_free(di, qx.mem, st);
    scratch_free(di, mem, st);
    return rc;
}

PI_EXPORT int pi_dev_predict_logits(const pi_matrix *fc1, const pi_matrix *fc2, const float *x, int64_t n_tok,
                                    float *logits, void *stream) {
    int rc;
    if ((rc = check_matrix(fc1)) || (rc = check_matrix(fc2))) return rc;
    if ((rc = check_tokens(x, n_tok, logits))) return rc;
    if (fc2->cols != fc1->rows) return PI_ERR_SHAPE;
    int64_t zs, ls, tmp;
    if (!mul_ok(n_tok, fc1->rows, &zs) || !mul_ok(n_tok, fc2->rows, &ls) || !mul_ok(n_tok, fc1->cols, &tmp))
        return PI_ERR_SHAPE;
    const DevInfo *di;
    if ((rc = dev_info(&di))) return rc;
    gpuStream_t st = static_cast<gpuStream_t>(stream);
    void *z = nullptr;
    if ((rc = scratch_alloc(di, (size_t)zs * sizeof(float), st, &z))) return rc;
    float *zf = static_cast<float *>(z);
    if (!(rc = run_rows(di, fc1, nullptr, fc1->rows, x, n_tok, zf, MODE_ACT, PI_ACT_RELU, 0.0f, nullptr, st)))
        rc = run_rows(di, fc2, nullptr, fc2->rows, zf, n_tok, logits, MODE_PLAIN, 0, 0.0f, nullptr, st);
    scratch_free(di, z, st);
    return rc;
}

/* ------------------------------------------------------------------ entry points: dense blocks */

PI_EXPORT int pi_dev_rmsnorm(const float *x, const float *w, int64_t n_tok, int64_t n, float eps, float *y,
                             void *stream) {
    if (!x || !w || !y) return PI_ERR_NULL;
    int64_t tmp;
    if (n_tok <= 0 || n <= 0 || n_tok > GRID_Y_MAX * 1024 || !mul_ok(n_tok, n, &tmp) || !(eps >= 0.0f))
        return PI_ERR_SHAPE;
    const DevInfo *di;
    int rc;
    if ((rc = dev_info(&di))) return rc;
    (void)di;
    pi_launch(k_rmsnorm, dim3((unsigned)n_tok), dim3(PI_BLOCK), static_cast<gpuStream_t>(stream), x, w, n, eps, y);
    return gpuGetLastError() == gpuSuccess ? PI_OK : PI_ERR_DEVICE;
}

PI_EXPORT int pi_dev_rope(float *x, int64_t pos0, int64_t n_tok, int64_t n_heads, int64_t head_dim, int64_t n_rot,
                          float freq_base, int32_t neox, void *stream) {
    if (!x) return PI_ERR_NULL;
    int64_t a, b;
    if (n_tok <= 0 || n_heads <= 0 || head_dim <= 0 || n_rot <= 0 || n_rot > head_dim || n_rot % 2 || pos0 < 0 ||
        pos0 > PI_MAX_DIM || !(freq_base > 0.0f) || !mul_ok(n_tok, n_heads, &a) || !mul_ok(a, head_dim, &b))
        return PI_ERR_SHAPE;
    const DevInfo *di;
    int rc;
    if ((rc = dev_info(&di))) return rc;
    const float theta_scale = powf(freq_base, -2.0f / (float)n_rot); /* on the host: the CPU op's value */
    pi_launch(k_rope, dim3((unsigned)grid_for(a * (n_rot / 2), di)), dim3(PI_BLOCK), static_cast<gpuStream_t>(stream),
              x, pos0, n_tok, n_heads, head_dim, n_rot, theta_scale, (int)(neox != 0));
    return gpuGetLastError() == gpuSuccess ? PI_OK : PI_ERR_DEVICE;
}

PI_EXPORT int pi_dev_attention(const float *q, const void *k_cache, const void *v_cache, int32_t kv_type,
                               int64_t kv_rows, int64_t n_past, int64_t n_tok, int64_t n_head, int64_t n_head_kv,
                               int64_t head_dim, float *out, void *stream) {
    if (!q || !k_cache || !v_cache || !out) return PI_ERR_NULL;
    if (kv_type != PI_TYPE_F32 && kv_type != PI_TYPE_F16) return PI_ERR_TYPE;
    int64_t tmp;
    if (n_tok <= 0 || n_past < 0 || n_head <= 0 || n_head_kv <= 0 || head_dim <= 0 || n_head % n_head_kv ||
        n_head > GRID_Y_MAX || kv_rows > PI_MAX_DIM || n_past > kv_rows || n_tok > kv_rows - n_past ||
        !mul_ok(kv_rows, n_head_kv * head_dim, &tmp) || !mul_ok(n_tok, n_head * head_dim, &tmp))
        return PI_ERR_SHAPE;
    const DevInfo *di;
    int rc;
    if ((rc = dev_info(&di))) return rc;
    gpuStream_t st = static_cast<gpuStream_t>(stream);
    /* the scores of a chunk of tokens: at most 16 Mi floats of scratch at a time */
    const int64_t s_max = n_past + n_tok;
    int64_t chunk = ((int64_t)16 << 20) / (n_head * s_max);
    if (chunk < 1) chunk = 1;
    if (chunk > GRID_Y_MAX) chunk = GRID_Y_MAX;
    if (chunk > n_tok) chunk = n_tok;
    void *sc = nullptr;
    if ((rc = scratch_alloc(di, (size_t)(chunk * n_head * s_max) * sizeof(float), st, &sc))) return rc;
    const float scale = 1.0f / sqrtf((float)head_dim);
    for (int64_t t0 = 0; t0 < n_tok && !rc; t0 += chunk) {
        const int64_t nt = n_tok - t0 < chunk ? n_tok - t0 : chunk;
        if (kv_type == PI_TYPE_F16)
            pi_launch(k_attention<KvF16>, dim3((unsigned)n_head, (unsigned)nt), dim3(PI_BLOCK), st, q, k_cache, v_cache,
                      n_past, t0, n_head, n_head_kv, head_dim, scale, static_cast<float *>(sc), s_max, out);
        else
            pi_launch(k_attention<KvF32>, dim3((unsigned)n_head, (unsigned)nt), dim3(PI_BLOCK), st, q, k_cache, v_cache,
                      n_past, t0, n_head, n_head_kv, head_dim, scale, static_cast<float *>(sc), s_max, out);
        if (gpuGetLastError() != gpuSuccess) rc = PI_ERR_DEVICE;
    }
    scratch_free(di, sc, st);
    return rc;
}

/* an elementwise kernel over n items (a grid-stride loop): n checked, one launch on the stream */
template <typename... P, typename... A>
static int launch_elementwise(void (*kernel)(P...), int64_t n, void *stream, A... args) {
    if (n < 0 || n > PI_MAX_DIM) return PI_ERR_SHAPE;
    if (n == 0) return PI_OK;
    const DevInfo *di;
    int rc;
    if ((rc = dev_info(&di))) return rc;
    pi_launch(kernel, dim3((unsigned)grid_for(n, di)), dim3(PI_BLOCK), static_cast<gpuStream_t>(stream), args...);
    return gpuGetLastError() == gpuSuccess ? PI_OK : PI_ERR_DEVICE;
}

PI_EXPORT int pi_dev_to_f16(const float *x, uint16_t *y, int64_t n, void *stream) {
    if (!y || !x) return PI_ERR_NULL;
    return launch_elementwise(k_to_f16, n, stream, x, reinterpret_cast<unsigned short *>(y), n);
}

PI_EXPORT int pi_dev_add(float *y, const float *x, int64_t n, void *stream) {
    if (!y || !x) return PI_ERR_NULL;
    return launch_elementwise(k_add, n, stream, y, x, n);
}

PI_EXPORT int pi_dev_select(const float *logits, int64_t n_tok, int64_t n_ff, float threshold, const int32_t *part,
                            int64_t n_local, int32_t *hot_out, int32_t *cold_out, int32_t *counts, void *stream) {
    if (!logits || !hot_out || !cold_out || !counts) return PI_ERR_NULL;
    int64_t tmp;
    if (n_tok <= 0 || n_ff <= 0 || n_ff > INT32_MAX || n_local < 0 || n_local > n_ff || !mul_ok(n_tok, n_ff, &tmp) ||
        threshold != threshold)
        return PI_ERR_SHAPE;
    const DevInfo *di;
    int rc;
    if ((rc = dev_info(&di))) return rc;
    (void)di;
    pi_launch(k_select, dim3(1), dim3(PI_BLOCK), static_cast<gpuStream_t>(stream), logits, n_tok, n_ff, threshold,
              part, n_local, hot_out, cold_out, counts);
    return gpuGetLastError() == gpuSuccess ? PI_OK : PI_ERR_DEVICE;
}
