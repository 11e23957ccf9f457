/* kernels_scalar.c — portable row kernels: the fallback on any CPU and the reference for the SIMD ones. */
#include "kernels.h"

#include <math.h>

float pi_fp16_table[1 << 16];

void pi_kernels_init(void) {
    for (uint32_t h = 0; h < (1u << 16); h++) pi_fp16_table[h] = pi_fp16_to_fp32((uint16_t)h);
}

/* ---- activations -> Q8 blocks (pi_xq); the SIMD variants reproduce this bit for bit */

/* round half to even whatever the FP rounding mode; |v| < 2^23 */
static inline float round_even(float v) {
    const float t = truncf(v), f = fabsf(v - t);
    return f > 0.5f || (f == 0.5f && fmodf(t, 2.0f) != 0.0f) ? t + copysignf(1.0f, v) : t;
}

static void quantize_x(const float *x, int64_t n, int8_t *qs, int32_t *off, float *d) {
    for (int64_t b = 0; b < n / 32; b++, x += 32, qs += 32, off += 8) {
        float amax = 0.0f, nonfinite = 0.0f;
        for (int j = 0; j < 32; j++) {
            const float a = fabsf(x[j]);
            amax = a > amax ? a : amax;
            nonfinite += x[j] - x[j]; /* 0, or NaN if any value is inf / NaN */
        }
        const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        for (int j = 0; j < 32; j++) {
            const float v = x[j] * id;
            qs[j] = (int8_t)(fabsf(v) < 128.0f ? round_even(v) : 0.0f); /* |v| <= 127 unless not finite */
        }
        for (int g = 0; g < 8; g++) /* see pi_xq */
            off[g] = (g < 4 ? -8 : -128) * (qs[4 * g] + qs[4 * g + 1] + qs[4 * g + 2] + qs[4 * g + 3]);
        d[b] = pi_fp16_to_fp32(pi_fp32_to_fp16(amax / 127.0f)) + nonfinite;
    }
}

/* ---- dot products */
static float dot_f32(const void *row, const void *xv, int64_t n, const void *pf) {
    (void)pf;
    const float *w = (const float *)row, *x = (const float *)xv;
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += w[i] * x[i]; s1 += w[i + 1] * x[i + 1];
        s2 += w[i + 2] * x[i + 2]; s3 += w[i + 3] * x[i + 3];
    }
    for (; i < n; i++) s0 += w[i] * x[i];
    return (s0 + s1) + (s2 + s3);
}

static float dot_f16(const void *row, const void *xv, int64_t n, const void *pf) {
    (void)pf;
    const uint16_t *w = (const uint16_t *)row;
    const float *x = (const float *)xv;
    float s = 0;
    for (int64_t i = 0; i < n; i++) s += pi_fp16_to_fp32(w[i]) * x[i];
    return s;
}

static float dot_bf16(const void *row, const void *xv, int64_t n, const void *pf) {
    (void)pf;
    const uint16_t *w = (const uint16_t *)row;
    const float *x = (const float *)xv;
    float s = 0;
    for (int64_t i = 0; i < n; i++) s += pi_bf16_to_fp32(w[i]) * x[i];
    return s;
}

/* quantized rows: an exact integer dot per block, then one float multiply-add with both scales */
static float dot_q8_0(const void *row, const void *xv, int64_t n, const void *pf) {
    (void)pf;
    const pi_block_q8_0 *b = (const pi_block_q8_0 *)row;
    const pi_xq *x = (const pi_xq *)xv;
    float s = 0;
    for (int64_t k = 0; k < n / PI_QK8_0; k++) {
        const int8_t *xq = x->qs + k * 32;
        int32_t is = 0;
        for (int j = 0; j < 32; j++) is += b[k].qs[j] * xq[j];
        s += pi_fp16_to_fp32(b[k].d) * x->d[k] * (float)is;
    }
    return s;
}

static float dot_q4_0(const void *row, const void *xv, int64_t n, const void *pf) {
    (void)pf;
    const pi_block_q4_0 *b = (const pi_block_q4_0 *)row;
    const pi_xq *x = (const pi_xq *)xv;
    float s = 0;
    for (int64_t k = 0; k < n / PI_QK4_0; k++) {
        const int8_t *xq = x->qs + k * 32;
        int32_t is = 0;
        for (int j = 0; j < 16; j++) is += ((b[k].qs[j] & 15) - 8) * xq[j] + ((b[k].qs[j] >> 4) - 8) * xq[j + 16];
        s += pi_fp16_to_fp32(b[k].d) * x->d[k] * (float)is;
    }
    return s;
}

/* ---- rows -> F32 */
static void to_f32_f32(const void *row, float *out, int64_t n) { memcpy(out, row, (size_t)n * 4); }

static void to_f32_f16(const void *row, float *out, int64_t n) {
    const uint16_t *w = (const uint16_t *)row;
    for (int64_t i = 0; i < n; i++) out[i] = pi_fp16_to_fp32(w[i]);
}

static void to_f32_bf16(const void *row, float *out, int64_t n) {
    const uint16_t *w = (const uint16_t *)row;
    for (int64_t i = 0; i < n; i++) out[i] = pi_bf16_to_fp32(w[i]);
}

static void to_f32_q8_0(const void *row, float *out, int64_t n) {
    const pi_block_q8_0 *b = (const pi_block_q8_0 *)row;
    for (int64_t k = 0; k < n / PI_QK8_0; k++, out += PI_QK8_0) {
        float d = pi_fp16_to_fp32(b[k].d);
        for (int j = 0; j < PI_QK8_0; j++) out[j] = d * (float)b[k].qs[j];
    }
}

static void to_f32_q4_0(const void *row, float *out, int64_t n) {
    const pi_block_q4_0 *b = (const pi_block_q4_0 *)row;
    for (int64_t k = 0; k < n / PI_QK4_0; k++, out += PI_QK4_0) {
        float d = pi_fp16_to_fp32(b[k].d);
        for (int j = 0; j < PI_QK4_0 / 2; j++) {
            out[j] = d * (float)((b[k].qs[j] & 15) - 8);
            out[j + PI_QK4_0 / 2] = d * (float)((b[k].qs[j] >> 4) - 8);
        }
    }
}

/* ---- y += sum_r a[r] * rows[r], one row at a time (the SIMD variants keep y in registers) */
static void axpy_f32(const void *const *rows, const float *a, int nr, float *y, int64_t n, const void *const *pf,
                     int npf) {
    (void)pf; (void)npf;
    for (int r = 0; r < nr; r++) {
        const float *w = (const float *)rows[r];
        for (int64_t i = 0; i < n; i++) y[i] += a[r] * w[i];
    }
}

static void axpy_f16(const void *const *rows, const float *a, int nr, float *y, int64_t n, const void *const *pf,
                     int npf) {
    (void)pf; (void)npf;
    for (int r = 0; r < nr; r++) {
        const uint16_t *w = (const uint16_t *)rows[r];
        for (int64_t i = 0; i < n; i++) y[i] += a[r] * pi_fp16_to_fp32(w[i]);
    }
}

static void axpy_bf16(const void *const *rows, const float *a, int nr, float *y, int64_t n, const void *const *pf,
                      int npf) {
    (void)pf; (void)npf;
    for (int r = 0; r < nr; r++) {
        const uint16_t *w = (const uint16_t *)rows[r];
        for (int64_t i = 0; i < n; i++) y[i] += a[r] * pi_bf16_to_fp32(w[i]);
    }
}

static void axpy_q8_0(const void *const *rows, const float *a, int nr, float *y, int64_t n, const void *const *pf,
                      int npf) {
    (void)pf; (void)npf;
    for (int r = 0; r < nr; r++) {
        const pi_block_q8_0 *b = (const pi_block_q8_0 *)rows[r];
        for (int64_t k = 0; k < n / PI_QK8_0; k++) {
            const float ad = a[r] * pi_fp16_to_fp32(b[k].d);
            for (int j = 0; j < PI_QK8_0; j++) y[k * 32 + j] += ad * (float)b[k].qs[j];
        }
    }
}

static void axpy_q4_0(const void *const *rows, const float *a, int nr, float *y, int64_t n, const void *const *pf,
                      int npf) {
    (void)pf; (void)npf;
    for (int r = 0; r < nr; r++) {
        const pi_block_q4_0 *b = (const pi_block_q4_0 *)rows[r];
        for (int64_t k = 0; k < n / PI_QK4_0; k++) {
            const float ad = a[r] * pi_fp16_to_fp32(b[k].d);
            for (int j = 0; j < PI_QK4_0 / 2; j++) {
                y[k * 32 + j] += ad * (float)((b[k].qs[j] & 15) - 8);
                y[k * 32 + j + 16] += ad * (float)((b[k].qs[j] >> 4) - 8);
            }
        }
    }
}

PI_DOT4_BY_ONE(dot4_f32, dot_f32)
PI_DOT4_BY_ONE(dot4_f16, dot_f16)
PI_DOT4_BY_ONE(dot4_bf16, dot_bf16)
PI_DOT4_BY_ONE(dot4_q8_0, dot_q8_0)
PI_DOT4_BY_ONE(dot4_q4_0, dot_q4_0)
/* Q4_0X16 here: each run unpacked to its 16 Q4_0 blocks (correct, not fast: the layout is only chosen
 * where a variant has kernels of its own, AVX2 / AVX-512) */
static float dot_q4_0x16(const void *row, const void *xv, int64_t n, const void *pf) {
    (void)pf;
    pi_block_q4_0 b[16];
    float s = 0.0f;
    for (int64_t c = 0; c < n / PI_COLS_Q4_0X16; c++) {
        const pi_xq xc = pi_xq_run((const pi_xq *)xv, c);
        pi_x16_unpack_run((const uint8_t *)row + PI_BYTES_Q4_0X16 * c, b);
        s += dot_q4_0(b, &xc, PI_COLS_Q4_0X16, NULL);
    }
    return s;
}
PI_DOT4_BY_ONE(dot4_q4_0x16, dot_q4_0x16)
PI_Q4_0X16_AXPY_BY_RUNS(axpy_q4_0x16, to_f32_q4_0x16, axpy_q4_0)

static void f32_to_f16(const float *x, uint16_t *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = pi_fp32_to_fp16(x[i]);
}

const pi_kernel_table pi_kernels_scalar = {
    "scalar",
    {dot_f32, dot_f16, dot_bf16, dot_q8_0, dot_q4_0, dot_q4_0x16},
    {dot4_f32, dot4_f16, dot4_bf16, dot4_q8_0, dot4_q4_0, dot4_q4_0x16},
    {axpy_f32, axpy_f16, axpy_bf16, axpy_q8_0, axpy_q4_0, axpy_q4_0x16},
    {to_f32_f32, to_f32_f16, to_f32_bf16, to_f32_q8_0, to_f32_q4_0, to_f32_q4_0x16},
    quantize_x,
    .f32_to_f16 = f32_to_f16,
};
