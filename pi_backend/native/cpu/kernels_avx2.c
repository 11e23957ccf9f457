/* kernels_avx2.c — AVX2 + FMA + F16C row kernels (the common x86-64 desktop baseline). Same structure
 * as kernels_avx512.c at 8 floats per vector. */
#include "kernels.h"

#ifdef PI_HAVE_X86_KERNELS
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

#define W 8

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline __m256 load_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
static inline __m256 load_bf16(const uint16_t *p) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}
static inline float half(uint16_t h) { return _cvtsh_ss(h); }
static inline float ident(float v) { return v; }

#define DOT_BODY(LOAD, SCALAR)                                                        \
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                         \
    int64_t i = 0;                                                                     \
    for (; i + 4 * W <= n; i += 4 * W) {                                               \
        a0 = _mm256_fmadd_ps(LOAD(w + i), _mm256_loadu_ps(x + i), a0);                 \
        a1 = _mm256_fmadd_ps(LOAD(w + i + W), _mm256_loadu_ps(x + i + W), a1);         \
        a2 = _mm256_fmadd_ps(LOAD(w + i + 2 * W), _mm256_loadu_ps(x + i + 2 * W), a2); \
        a3 = _mm256_fmadd_ps(LOAD(w + i + 3 * W), _mm256_loadu_ps(x + i + 3 * W), a3); \
    }                                                                                  \
    for (; i + W <= n; i += W) a0 = _mm256_fmadd_ps(LOAD(w + i), _mm256_loadu_ps(x + i), a0); \
    float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));       \
    for (; i < n; i++) s += SCALAR(w[i]) * x[i];                                        \
    return s;

static float dot_f32(const void *row, const float *x, int64_t n) {
    const float *w = (const float *)row;
    DOT_BODY(_mm256_loadu_ps, ident)
}
static float dot_f16(const void *row, const float *x, int64_t n) {
    const uint16_t *w = (const uint16_t *)row;
    DOT_BODY(load_f16, half)
}
static float dot_bf16(const void *row, const float *x, int64_t n) {
    const uint16_t *w = (const uint16_t *)row;
    DOT_BODY(load_bf16, pi_bf16_to_fp32)
}

/* 8 int8 -> 8 floats */
static inline __m256 i8x8(const int8_t *p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p))); }

static inline __m256 q8_block(const pi_block_q8_0 *b, const float *x) {
    __m256 s = _mm256_mul_ps(i8x8(b->qs), _mm256_loadu_ps(x));
    s = _mm256_fmadd_ps(i8x8(b->qs + 8), _mm256_loadu_ps(x + 8), s);
    s = _mm256_fmadd_ps(i8x8(b->qs + 16), _mm256_loadu_ps(x + 16), s);
    return _mm256_fmadd_ps(i8x8(b->qs + 24), _mm256_loadu_ps(x + 24), s);
}

static float dot_q8_0(const void *row, const float *x, int64_t n) {
    const pi_block_q8_0 *b = (const pi_block_q8_0 *)row;
    int64_t nb = n / PI_QK8_0, k = 0;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    for (; k + 2 <= nb; k += 2) {
        a0 = _mm256_fmadd_ps(_mm256_set1_ps(half(b[k].d)), q8_block(b + k, x + k * 32), a0);
        a1 = _mm256_fmadd_ps(_mm256_set1_ps(half(b[k + 1].d)), q8_block(b + k + 1, x + (k + 1) * 32), a1);
    }
    if (k < nb) a0 = _mm256_fmadd_ps(_mm256_set1_ps(half(b[k].d)), q8_block(b + k, x + k * 32), a0);
    return hsum(_mm256_add_ps(a0, a1));
}

/* Q4_0 block -> 4 vectors of 8 floats (elements 0..7, 8..15 from low nibbles; 16..31 from high) */
static inline void q4_unpack(const pi_block_q4_0 *b, __m256 out[4]) {
    __m128i v = _mm_loadu_si128((const __m128i *)b->qs);
    __m128i m = _mm_set1_epi8(15), eight = _mm_set1_epi8(8);
    __m128i l = _mm_sub_epi8(_mm_and_si128(v, m), eight);
    __m128i h = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), m), eight);
    out[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(l));
    out[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(l, 8)));
    out[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(h));
    out[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(h, 8)));
}

static inline __m256 q4_block(const pi_block_q4_0 *b, const float *x) {
    __m256 q[4];
    q4_unpack(b, q);
    __m256 s = _mm256_mul_ps(q[0], _mm256_loadu_ps(x));
    s = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(x + 8), s);
    s = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(x + 16), s);
    return _mm256_fmadd_ps(q[3], _mm256_loadu_ps(x + 24), s);
}

static float dot_q4_0(const void *row, const float *x, int64_t n) {
    const pi_block_q4_0 *b = (const pi_block_q4_0 *)row;
    int64_t nb = n / PI_QK4_0, k = 0;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    for (; k + 2 <= nb; k += 2) {
        a0 = _mm256_fmadd_ps(_mm256_set1_ps(half(b[k].d)), q4_block(b + k, x + k * 32), a0);
        a1 = _mm256_fmadd_ps(_mm256_set1_ps(half(b[k + 1].d)), q4_block(b + k + 1, x + (k + 1) * 32), a1);
    }
    if (k < nb) a0 = _mm256_fmadd_ps(_mm256_set1_ps(half(b[k].d)), q4_block(b + k, x + k * 32), a0);
    return hsum(_mm256_add_ps(a0, a1));
}

#define AXPY_BODY(LOAD, SCALAR)                                                      \
    __m256 va = _mm256_set1_ps(a);                                                    \
    int64_t i = 0;                                                                    \
    for (; i + W <= n; i += W)                                                        \
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, LOAD(w + i), _mm256_loadu_ps(y + i))); \
    for (; i < n; i++) y[i] += a * SCALAR(w[i]);

static void axpy_f32(const void *row, float a, float *y, int64_t n) {
    const float *w = (const float *)row;
    AXPY_BODY(_mm256_loadu_ps, ident)
}
static void axpy_f16(const void *row, float a, float *y, int64_t n) {
    const uint16_t *w = (const uint16_t *)row;
    AXPY_BODY(load_f16, half)
}
static void axpy_bf16(const void *row, float a, float *y, int64_t n) {
    const uint16_t *w = (const uint16_t *)row;
    AXPY_BODY(load_bf16, pi_bf16_to_fp32)
}

static void axpy_q8_0(const void *row, float a, float *y, int64_t n) {
    const pi_block_q8_0 *b = (const pi_block_q8_0 *)row;
    for (int64_t k = 0; k < n / PI_QK8_0; k++, y += 32) {
        __m256 s = _mm256_set1_ps(a * half(b[k].d));
        for (int j = 0; j < 32; j += 8)
            _mm256_storeu_ps(y + j, _mm256_fmadd_ps(s, i8x8(b[k].qs + j), _mm256_loadu_ps(y + j)));
    }
}

static void axpy_q4_0(const void *row, float a, float *y, int64_t n) {
    const pi_block_q4_0 *b = (const pi_block_q4_0 *)row;
    for (int64_t k = 0; k < n / PI_QK4_0; k++, y += 32) {
        __m256 s = _mm256_set1_ps(a * half(b[k].d)), q[4];
        q4_unpack(b + k, q);
        for (int j = 0; j < 4; j++)
            _mm256_storeu_ps(y + 8 * j, _mm256_fmadd_ps(s, q[j], _mm256_loadu_ps(y + 8 * j)));
    }
}

static void to_f32_f32(const void *row, float *out, int64_t n) { memcpy(out, row, (size_t)n * 4); }
static void to_f32_f16(const void *row, float *out, int64_t n) {
    const uint16_t *w = (const uint16_t *)row;
    int64_t i = 0;
    for (; i + W <= n; i += W) _mm256_storeu_ps(out + i, load_f16(w + i));
    for (; i < n; i++) out[i] = half(w[i]);
}
static void to_f32_bf16(const void *row, float *out, int64_t n) {
    const uint16_t *w = (const uint16_t *)row;
    int64_t i = 0;
    for (; i + W <= n; i += W) _mm256_storeu_ps(out + i, load_bf16(w + i));
    for (; i < n; i++) out[i] = pi_bf16_to_fp32(w[i]);
}
static void to_f32_q8_0(const void *row, float *out, int64_t n) {
    memset(out, 0, (size_t)n * 4);
    axpy_q8_0(row, 1.0f, out, n);
}
static void to_f32_q4_0(const void *row, float *out, int64_t n) {
    memset(out, 0, (size_t)n * 4);
    axpy_q4_0(row, 1.0f, out, n);
}

const pi_kernel_table pi_kernels_avx2 = {
    "avx2",
    {dot_f32, dot_f16, dot_bf16, dot_q8_0, dot_q4_0},
    {axpy_f32, axpy_f16, axpy_bf16, axpy_q8_0, axpy_q4_0},
    {to_f32_f32, to_f32_f16, to_f32_bf16, to_f32_q8_0, to_f32_q4_0},
};

#pragma GCC pop_options
#endif
