/* kernels_avx512.c — AVX-512 (F + BW + VL) row kernels. Compiled with a target pragma so the rest of
 * the library stays baseline x86-64; ops.c only calls them after checking the CPU at run time. */
#include "kernels.h"

#ifdef PI_HAVE_X86_KERNELS
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
#include <immintrin.h>

#define W 16 /* floats per vector */

static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

static inline __m512 load_f16(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
static inline __m512 load_bf16(const uint16_t *p) {
    __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}
static inline float half(uint16_t h) { return _cvtsh_ss(h); }

/* Four accumulators over 64 elements hide the FMA latency; the scalar tail handles n % 16. */
#define DOT_BODY(LOAD, SCALAR)                                                        \
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                         \
    int64_t i = 0;                                                                     \
    for (; i + 4 * W <= n; i += 4 * W) {                                               \
        a0 = _mm512_fmadd_ps(LOAD(w + i), _mm512_loadu_ps(x + i), a0);                 \
        a1 = _mm512_fmadd_ps(LOAD(w + i + W), _mm512_loadu_ps(x + i + W), a1);         \
        a2 = _mm512_fmadd_ps(LOAD(w + i + 2 * W), _mm512_loadu_ps(x + i + 2 * W), a2); \
        a3 = _mm512_fmadd_ps(LOAD(w + i + 3 * W), _mm512_loadu_ps(x + i + 3 * W), a3); \
    }                                                                                  \
    for (; i + W <= n; i += W) a0 = _mm512_fmadd_ps(LOAD(w + i), _mm512_loadu_ps(x + i), a0); \
    float s = hsum(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));       \
    for (; i < n; i++) s += SCALAR(w[i]) * x[i];                                        \
    return s;

static inline float ident(float v) { return v; }

static float dot_f32(const void *row, const float *x, int64_t n) {
    const float *w = (const float *)row;
    DOT_BODY(_mm512_loadu_ps, ident)
}
static float dot_f16(const void *row, const float *x, int64_t n) {
    const uint16_t *w = (const uint16_t *)row;
    DOT_BODY(load_f16, half)
}
static float dot_bf16(const void *row, const float *x, int64_t n) {
    const uint16_t *w = (const uint16_t *)row;
    DOT_BODY(load_bf16, pi_bf16_to_fp32)
}

/* Q8_0: per block, the int8 values become two float vectors; the block's scale multiplies the block's
 * partial sum once (one FMA per 32 weights instead of per element). Two block streams in flight. */
static inline __m512 q8_block(const pi_block_q8_0 *b, const float *x) {
    __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)b->qs)));
    __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b->qs + 16))));
    return _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + 16), _mm512_mul_ps(lo, _mm512_loadu_ps(x)));
}

static float dot_q8_0(const void *row, const float *x, int64_t n) {
    const pi_block_q8_0 *b = (const pi_block_q8_0 *)row;
    int64_t nb = n / PI_QK8_0, k = 0;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    for (; k + 2 <= nb; k += 2) {
        a0 = _mm512_fmadd_ps(_mm512_set1_ps(half(b[k].d)), q8_block(b + k, x + k * 32), a0);
        a1 = _mm512_fmadd_ps(_mm512_set1_ps(half(b[k + 1].d)), q8_block(b + k + 1, x + (k + 1) * 32), a1);
    }
    if (k < nb) a0 = _mm512_fmadd_ps(_mm512_set1_ps(half(b[k].d)), q8_block(b + k, x + k * 32), a0);
    return hsum(_mm512_add_ps(a0, a1));
}

/* Q4_0: low nibbles are elements 0..15, high nibbles 16..31, each minus 8 (done on bytes). */
static inline void q4_unpack(const pi_block_q4_0 *b, __m512 *lo, __m512 *hi) {
    __m128i v = _mm_loadu_si128((const __m128i *)b->qs);
    __m128i m = _mm_set1_epi8(15), eight = _mm_set1_epi8(8);
    __m128i l = _mm_sub_epi8(_mm_and_si128(v, m), eight);
    __m128i h = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), m), eight);
    *lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(l));
    *hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(h));
}

static inline __m512 q4_block(const pi_block_q4_0 *b, const float *x) {
    __m512 lo, hi;
    q4_unpack(b, &lo, &hi);
    return _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + 16), _mm512_mul_ps(lo, _mm512_loadu_ps(x)));
}

static float dot_q4_0(const void *row, const float *x, int64_t n) {
    const pi_block_q4_0 *b = (const pi_block_q4_0 *)row;
    int64_t nb = n / PI_QK4_0, k = 0;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    for (; k + 2 <= nb; k += 2) {
        a0 = _mm512_fmadd_ps(_mm512_set1_ps(half(b[k].d)), q4_block(b + k, x + k * 32), a0);
        a1 = _mm512_fmadd_ps(_mm512_set1_ps(half(b[k + 1].d)), q4_block(b + k + 1, x + (k + 1) * 32), a1);
    }
    if (k < nb) a0 = _mm512_fmadd_ps(_mm512_set1_ps(half(b[k].d)), q4_block(b + k, x + k * 32), a0);
    return hsum(_mm512_add_ps(a0, a1));
}

#define AXPY_BODY(LOAD, SCALAR)                                                      \
    __m512 va = _mm512_set1_ps(a);                                                    \
    int64_t i = 0;                                                                    \
    for (; i + 2 * W <= n; i += 2 * W) {                                              \
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, LOAD(w + i), _mm512_loadu_ps(y + i))); \
        _mm512_storeu_ps(y + i + W, _mm512_fmadd_ps(va, LOAD(w + i + W), _mm512_loadu_ps(y + i + W))); \
    }                                                                                 \
    for (; i + W <= n; i += W)                                                        \
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, LOAD(w + i), _mm512_loadu_ps(y + i))); \
    for (; i < n; i++) y[i] += a * SCALAR(w[i]);

static void axpy_f32(const void *row, float a, float *y, int64_t n) {
    const float *w = (const float *)row;
    AXPY_BODY(_mm512_loadu_ps, ident)
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
        __m512 s = _mm512_set1_ps(a * half(b[k].d));
        __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)b[k].qs)));
        __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b[k].qs + 16))));
        _mm512_storeu_ps(y, _mm512_fmadd_ps(s, lo, _mm512_loadu_ps(y)));
        _mm512_storeu_ps(y + 16, _mm512_fmadd_ps(s, hi, _mm512_loadu_ps(y + 16)));
    }
}

static void axpy_q4_0(const void *row, float a, float *y, int64_t n) {
    const pi_block_q4_0 *b = (const pi_block_q4_0 *)row;
    for (int64_t k = 0; k < n / PI_QK4_0; k++, y += 32) {
        __m512 s = _mm512_set1_ps(a * half(b[k].d)), lo, hi;
        q4_unpack(b + k, &lo, &hi);
        _mm512_storeu_ps(y, _mm512_fmadd_ps(s, lo, _mm512_loadu_ps(y)));
        _mm512_storeu_ps(y + 16, _mm512_fmadd_ps(s, hi, _mm512_loadu_ps(y + 16)));
    }
}

static void to_f32_f32(const void *row, float *out, int64_t n) { memcpy(out, row, (size_t)n * 4); }
static void to_f32_f16(const void *row, float *out, int64_t n) {
    const uint16_t *w = (const uint16_t *)row;
    int64_t i = 0;
    for (; i + W <= n; i += W) _mm512_storeu_ps(out + i, load_f16(w + i));
    for (; i < n; i++) out[i] = half(w[i]);
}
static void to_f32_bf16(const void *row, float *out, int64_t n) {
    const uint16_t *w = (const uint16_t *)row;
    int64_t i = 0;
    for (; i + W <= n; i += W) _mm512_storeu_ps(out + i, load_bf16(w + i));
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

const pi_kernel_table pi_kernels_avx512 = {
    "avx512",
    {dot_f32, dot_f16, dot_bf16, dot_q8_0, dot_q4_0},
    {axpy_f32, axpy_f16, axpy_bf16, axpy_q8_0, axpy_q4_0},
    {to_f32_f32, to_f32_f16, to_f32_bf16, to_f32_q8_0, to_f32_q4_0},
};

#pragma GCC pop_options
#endif
