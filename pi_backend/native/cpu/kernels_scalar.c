/* kernels_scalar.c — portable row kernels: the fallback on any CPU and the reference for the SIMD ones. */
#include "kernels.h"

static float dot_f32(const void *row, const float *x, int64_t n) {
    const float *w = (const float *)row;
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += w[i] * x[i]; s1 += w[i + 1] * x[i + 1];
        s2 += w[i + 2] * x[i + 2]; s3 += w[i + 3] * x[i + 3];
    }
    for (; i < n; i++) s0 += w[i] * x[i];
    return (s0 + s1) + (s2 + s3);
}

static float dot_f16(const void *row, const float *x, int64_t n) {
    const uint16_t *w = (const uint16_t *)row;
    float s = 0;
    for (int64_t i = 0; i < n; i++) s += pi_fp16_to_fp32(w[i]) * x[i];
    return s;
}

static float dot_bf16(const void *row, const float *x, int64_t n) {
    const uint16_t *w = (const uint16_t *)row;
    float s = 0;
    for (int64_t i = 0; i < n; i++) s += pi_bf16_to_fp32(w[i]) * x[i];
    return s;
}

static float dot_q8_0(const void *row, const float *x, int64_t n) {
    const pi_block_q8_0 *b = (const pi_block_q8_0 *)row;
    float s = 0;
    for (int64_t k = 0; k < n / PI_QK8_0; k++, x += PI_QK8_0) {
        float bs = 0;
        for (int j = 0; j < PI_QK8_0; j++) bs += (float)b[k].qs[j] * x[j];
        s += pi_fp16_to_fp32(b[k].d) * bs;
    }
    return s;
}

static float dot_q4_0(const void *row, const float *x, int64_t n) {
    const pi_block_q4_0 *b = (const pi_block_q4_0 *)row;
    float s = 0;
    for (int64_t k = 0; k < n / PI_QK4_0; k++, x += PI_QK4_0) {
        float bs = 0;
        for (int j = 0; j < PI_QK4_0 / 2; j++) {
            bs += (float)((b[k].qs[j] & 15) - 8) * x[j];
            bs += (float)((b[k].qs[j] >> 4) - 8) * x[j + PI_QK4_0 / 2];
        }
        s += pi_fp16_to_fp32(b[k].d) * bs;
    }
    return s;
}

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

static void axpy_f32(const void *row, float a, float *y, int64_t n) {
    const float *w = (const float *)row;
    for (int64_t i = 0; i < n; i++) y[i] += a * w[i];
}

static void axpy_f16(const void *row, float a, float *y, int64_t n) {
    const uint16_t *w = (const uint16_t *)row;
    for (int64_t i = 0; i < n; i++) y[i] += a * pi_fp16_to_fp32(w[i]);
}

static void axpy_bf16(const void *row, float a, float *y, int64_t n) {
    const uint16_t *w = (const uint16_t *)row;
    for (int64_t i = 0; i < n; i++) y[i] += a * pi_bf16_to_fp32(w[i]);
}

static void axpy_q8_0(const void *row, float a, float *y, int64_t n) {
    const pi_block_q8_0 *b = (const pi_block_q8_0 *)row;
    for (int64_t k = 0; k < n / PI_QK8_0; k++, y += PI_QK8_0) {
        float ad = a * pi_fp16_to_fp32(b[k].d);
        for (int j = 0; j < PI_QK8_0; j++) y[j] += ad * (float)b[k].qs[j];
    }
}

static void axpy_q4_0(const void *row, float a, float *y, int64_t n) {
    const pi_block_q4_0 *b = (const pi_block_q4_0 *)row;
    for (int64_t k = 0; k < n / PI_QK4_0; k++, y += PI_QK4_0) {
        float ad = a * pi_fp16_to_fp32(b[k].d);
        for (int j = 0; j < PI_QK4_0 / 2; j++) {
            y[j] += ad * (float)((b[k].qs[j] & 15) - 8);
            y[j + PI_QK4_0 / 2] += ad * (float)((b[k].qs[j] >> 4) - 8);
        }
    }
}

const pi_kernel_table pi_kernels_scalar = {
    "scalar",
    {dot_f32, dot_f16, dot_bf16, dot_q8_0, dot_q4_0},
    {axpy_f32, axpy_f16, axpy_bf16, axpy_q8_0, axpy_q4_0},
    {to_f32_f32, to_f32_f16, to_f32_bf16, to_f32_q8_0, to_f32_q4_0},
};
