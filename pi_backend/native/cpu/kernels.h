/* kernels.h — internal: the per-ISA row kernels every CPU op is built from.
 *
 * ggml's CPU backend shape: one kernel per (op, weight type), one table per instruction set, the table
 * chosen once at start-up (ops.c). The ops (gemm, sparse rows, axpy, fused FFN, predictor) are written
 * once against this table. Rows are unaligned (GGUF packs 18/34-byte blocks back to back), so every
 * load is unaligned. */
#ifndef PI_KERNELS_H
#define PI_KERNELS_H

#include <stdint.h>
#include <string.h>
#include "../include/pi_backend.h"

enum { PI_T_F32, PI_T_F16, PI_T_BF16, PI_T_Q8_0, PI_T_Q4_0, PI_T_COUNT };

/* dot(row, x) over n elements (n a multiple of the block size for quantized types) */
typedef float (*pi_dot_fn)(const void *row, const float *x, int64_t n);
/* y += a * row */
typedef void (*pi_axpy_fn)(const void *row, float a, float *y, int64_t n);
/* out = row as F32 */
typedef void (*pi_to_f32_fn)(const void *row, float *out, int64_t n);

typedef struct pi_kernel_table {
    const char *name;
    pi_dot_fn dot[PI_T_COUNT];
    pi_axpy_fn axpy[PI_T_COUNT];
    pi_to_f32_fn to_f32[PI_T_COUNT];
} pi_kernel_table;

extern const pi_kernel_table pi_kernels_scalar;
#if defined(__x86_64__) && defined(__GNUC__)
#define PI_HAVE_X86_KERNELS 1
extern const pi_kernel_table pi_kernels_avx2;
extern const pi_kernel_table pi_kernels_avx512;
#endif

/* the GGUF block structs (byte-packed, as on disk) */
typedef struct { uint16_t d; int8_t qs[PI_QK8_0]; } pi_block_q8_0;
typedef struct { uint16_t d; uint8_t qs[PI_QK4_0 / 2]; } pi_block_q4_0;
_Static_assert(sizeof(pi_block_q8_0) == PI_BLOCK_BYTES_Q8_0, "Q8_0 block layout");
_Static_assert(sizeof(pi_block_q4_0) == PI_BLOCK_BYTES_Q4_0, "Q4_0 block layout");

/* IEEE half -> float without F16C, exact for every input (subnormals, inf, nan) */
static inline float pi_fp16_to_fp32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
    if (exp == 0x1fu) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do { mant <<= 1; e++; } while (!(mant & 0x400u));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((mant & 0x3ffu) << 13);
        }
    } else {
        bits = sign | ((exp + (127 - 15)) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float pi_bf16_to_fp32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* the internal type slot of a GGML type id, or -1 */
static inline int pi_type_slot(int32_t type) {
    switch (type) {
    case PI_TYPE_F32: return PI_T_F32;
    case PI_TYPE_F16: return PI_T_F16;
    case PI_TYPE_BF16: return PI_T_BF16;
    case PI_TYPE_Q8_0: return PI_T_Q8_0;
    case PI_TYPE_Q4_0: return PI_T_Q4_0;
    default: return -1;
    }
}

/* ---- thread pool (pool.c) ---- */
/* fn runs once per thread with tid in [0, nth); the caller is thread 0. Returns when all are done. */
typedef void (*pi_task_fn)(void *ctx, int tid, int nth);
void pi_pool_run(pi_task_fn fn, void *ctx, int nth);
int pi_pool_resolve_threads(int n_threads); /* 0 -> global default; clamps to [1, PI_MAX_THREADS] */

#endif
