/* kernels_avx2.c — AVX2 + FMA + F16C row kernels (the common x86-64 desktop baseline). Same structure
 * as kernels_avx512.c at 8 floats per vector; the integer dots use vpmaddubsw + vpmaddwd. */
#include "kernels.h"

#ifdef PI_HAVE_X86_KERNELS
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>
#include <math.h>

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

/* ---- activations -> Q8 blocks, bit for bit as kernels_scalar.c */
static void quantize_x(const float *x, int64_t n, int8_t *qs, int32_t *off, float *d) {
    const __m256i absmask = _mm256_set1_epi32(0x7fffffff);
    for (int64_t b = 0; b < n / 32; b++, x += 32, qs += 32, off += 8) {
        /* max |x| on the bit patterns: exact, and >= 0x7f800000 iff some value is inf / NaN */
        __m256i m = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++)
            m = _mm256_max_epi32(m, _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(x + 8 * j)), absmask));
        __m128i m4 = _mm_max_epi32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
        m4 = _mm_max_epi32(m4, _mm_shuffle_epi32(m4, 0x4e));
        m4 = _mm_max_epi32(m4, _mm_shuffle_epi32(m4, 0xb1));
        const uint32_t mb = (uint32_t)_mm_cvtsi128_si32(m4);
        float amax;
        memcpy(&amax, &mb, 4);
        const __m256 id = _mm256_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
        __m256i qi[4];
        for (int j = 0; j < 4; j++) {
            /* round half to even (explicitly, whatever MXCSR says); then an exact conversion */
            const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + 8 * j), id);
            qi[j] = _mm256_cvtps_epi32(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        }
        /* 4 x 8 int32 -> 32 int8 (the packs interleave lanes; the permute restores the order) */
        __m256i q = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
        q = _mm256_permutevar8x32_epi32(q, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)qs, q);
        /* off: 8 q (lanes 0-3) or 128 q (lanes 4-7) summed over each group of 4 (|pair sums| <= 32512) */
        const __m256i mult = _mm256_setr_epi64x(0x0808080808080808ll, 0x0808080808080808ll,
                                                (long long)0x8080808080808080ull, (long long)0x8080808080808080ull);
        const __m256i s8 = _mm256_madd_epi16(_mm256_maddubs_epi16(mult, q), _mm256_set1_epi16(1));
        _mm256_storeu_si256((__m256i *)off, _mm256_sub_epi32(_mm256_setzero_si256(), s8));
        d[b] = mb < 0x7f800000u ? _cvtsh_ss(_cvtss_sh(amax / 127.0f, _MM_FROUND_TO_NEAREST_INT)) : __builtin_nanf("");
    }
}

/* ---- dot products */
#define DOT_BODY(LOAD, SCALAR, ESIZE)                                                 \
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                         \
    int64_t i = 0;                                                                     \
    for (; i + 4 * W <= n; i += 4 * W) {                                               \
        PI_PREFETCH_STEP(pf, i * ESIZE, (4 * W * ESIZE + 63) / 64);                      \
        a0 = _mm256_fmadd_ps(LOAD(w + i), _mm256_loadu_ps(x + i), a0);                 \
        a1 = _mm256_fmadd_ps(LOAD(w + i + W), _mm256_loadu_ps(x + i + W), a1);         \
        a2 = _mm256_fmadd_ps(LOAD(w + i + 2 * W), _mm256_loadu_ps(x + i + 2 * W), a2); \
        a3 = _mm256_fmadd_ps(LOAD(w + i + 3 * W), _mm256_loadu_ps(x + i + 3 * W), a3); \
    }                                                                                  \
    for (; i + W <= n; i += W) a0 = _mm256_fmadd_ps(LOAD(w + i), _mm256_loadu_ps(x + i), a0); \
    float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));       \
    for (; i < n; i++) s += SCALAR(w[i]) * x[i];                                        \
    return s;

static float dot_f32(const void *row, const void *xv, int64_t n, const void *pf) {
    const float *w = (const float *)row, *x = (const float *)xv;
    DOT_BODY(_mm256_loadu_ps, ident, 4)
}
static float dot_f16(const void *row, const void *xv, int64_t n, const void *pf) {
    const uint16_t *w = (const uint16_t *)row;
    const float *x = (const float *)xv;
    DOT_BODY(load_f16, half, 2)
}
static float dot_bf16(const void *row, const void *xv, int64_t n, const void *pf) {
    const uint16_t *w = (const uint16_t *)row;
    const float *x = (const float *)xv;
    DOT_BODY(load_bf16, pi_bf16_to_fp32, 2)
}

/* nr float rows against nt tokens (pi_rows_tok_fn, kernels.h's body): two tokens at a time, as 2 x 4
 * accumulators and 4 weight vectors fill 12 of AVX2's 16 registers */
#define PI_V __m256
#define PI_V_ZERO _mm256_setzero_ps
#define PI_V_FMA _mm256_fmadd_ps
#define PI_V_LOADX _mm256_loadu_ps
#define PI_V_ADD _mm256_add_ps
#define PI_V_HSUM hsum
PI_ROWS_TOK_FN(rows_tok_f32, float, _mm256_loadu_ps, ident, 4, 2)
PI_ROWS_TOK_FN(rows_tok_f16, uint16_t, load_f16, half, 2, 2)
PI_ROWS_TOK_FN(rows_tok_bf16, uint16_t, load_bf16, pi_bf16_to_fp32, 2, 2)

/* Quantized rows x pi_xq: per block, vpmaddubsw (unsigned x signed bytes -> int16 pairs) and vpmaddwd
 * (-> int32 sums of 4), converted to float once per block and scaled by both scales in one FMA. */
#define QDOT_BODY(BLOCK_INT, BSIZE)                                                          \
    const pi_xq *x = (const pi_xq *)xv;                                                      \
    const int64_t nb = n / 32;                                                               \
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()}; \
    int64_t k = 0;                                                                           \
    for (; k + 4 <= nb; k += 4) {                                                            \
        PI_PREFETCH_STEP(pf, k * BSIZE, (4 * BSIZE + 63) / 64);                               \
        for (int j = 0; j < 4; j++) {                                                        \
            const __m256i is = BLOCK_INT(b + k + j, x, k + j);                               \
            const __m256 sc = _mm256_set1_ps(pi_fp16_table[b[k + j].d] * x->d[k + j]);        \
            acc[j] = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(is), acc[j]);                     \
        }                                                                                    \
    }                                                                                        \
    for (; k < nb; k++)                                                                      \
        acc[0] = _mm256_fmadd_ps(_mm256_set1_ps(pi_fp16_table[b[k].d] * x->d[k]),            \
                                 _mm256_cvtepi32_ps(BLOCK_INT(b + k, x, k)), acc[0]);         \
    return hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));

/* Q8_0: |w| times x with w's sign moved onto x (|w| <= 128, so the int16 pair sums cannot saturate) */
static inline __m256i q8_block_int(const pi_block_q8_0 *b, const pi_xq *x, int64_t k) {
    const __m256i w = _mm256_loadu_si256((const __m256i *)b->qs);
    const __m256i xq = _mm256_loadu_si256((const __m256i *)(x->qs + 32 * k));
    const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xq, w));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}
/* Q4_0: nibbles 0..15 are unsigned (pair sums <= 2 * 15 * 127); off supplies the "- 8" (its lanes
 * 4-7 hold -128 * sums for the AVX-512 kernel, shifted back to -8 * sums here) */
static inline __m256i q4_block_int(const pi_block_q4_0 *b, const pi_xq *x, int64_t k) {
    const __m128i v = _mm_loadu_si128((const __m128i *)b->qs);
    const __m256i w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(15));
    const __m256i p = _mm256_maddubs_epi16(w, _mm256_loadu_si256((const __m256i *)(x->qs + 32 * k)));
    const __m256i off = _mm256_srav_epi32(_mm256_loadu_si256((const __m256i *)(x->off + 8 * k)),
                                          _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
    return _mm256_add_epi32(_mm256_madd_epi16(p, _mm256_set1_epi16(1)), off);
}

static float dot_q8_0(const void *row, const void *xv, int64_t n, const void *pf) {
    const pi_block_q8_0 *b = (const pi_block_q8_0 *)row;
    QDOT_BODY(q8_block_int, PI_BLOCK_BYTES_Q8_0)
}
static float dot_q4_0(const void *row, const void *xv, int64_t n, const void *pf) {
    const pi_block_q4_0 *b = (const pi_block_q4_0 *)row;
    QDOT_BODY(q4_block_int, PI_BLOCK_BYTES_Q4_0)
}

/* ---- y += sum_r a[r] * rows[r] with a tile of y in registers (see kernels_avx512.c); the block
 * scales of quantized rows are read through pi_fp16_table */

#define AXPY_BODY(TYPE, LOAD, SCALAR, ESIZE)                                          \
    __m256 va[PI_AXPY_ROWS];                                                          \
    for (int r = 0; r < nr; r++) va[r] = _mm256_set1_ps(a[r]);                        \
    int64_t i = 0;                                                                    \
    for (; i + 4 * W <= n; i += 4 * W) {                                              \
        PI_PREFETCH_ROWS(pf, npf, i * ESIZE, (4 * W * ESIZE + 63) / 64);                    \
        __m256 y0 = _mm256_loadu_ps(y + i), y1 = _mm256_loadu_ps(y + i + W);          \
        __m256 y2 = _mm256_loadu_ps(y + i + 2 * W), y3 = _mm256_loadu_ps(y + i + 3 * W); \
        for (int r = 0; r < nr; r++) {                                                \
            const TYPE *w = (const TYPE *)rows[r] + i;                                \
            y0 = _mm256_fmadd_ps(va[r], LOAD(w), y0);                                 \
            y1 = _mm256_fmadd_ps(va[r], LOAD(w + W), y1);                             \
            y2 = _mm256_fmadd_ps(va[r], LOAD(w + 2 * W), y2);                         \
            y3 = _mm256_fmadd_ps(va[r], LOAD(w + 3 * W), y3);                         \
        }                                                                             \
        _mm256_storeu_ps(y + i, y0); _mm256_storeu_ps(y + i + W, y1);                 \
        _mm256_storeu_ps(y + i + 2 * W, y2); _mm256_storeu_ps(y + i + 3 * W, y3);     \
    }                                                                                 \
    for (; i + W <= n; i += W) {                                                      \
        __m256 y0 = _mm256_loadu_ps(y + i);                                           \
        for (int r = 0; r < nr; r++) y0 = _mm256_fmadd_ps(va[r], LOAD((const TYPE *)rows[r] + i), y0); \
        _mm256_storeu_ps(y + i, y0);                                                  \
    }                                                                                 \
    for (; i < n; i++)                                                                \
        for (int r = 0; r < nr; r++) y[i] = fmaf(a[r], SCALAR(((const TYPE *)rows[r])[i]), y[i]);

static void axpy_f32(const void *const *rows, const float *a, int nr, float *y, int64_t n, const void *const *pf,
                     int npf) {
    AXPY_BODY(float, _mm256_loadu_ps, ident, 4)
}
static void axpy_f16(const void *const *rows, const float *a, int nr, float *y, int64_t n, const void *const *pf,
                     int npf) {
    AXPY_BODY(uint16_t, load_f16, half, 2)
}
static void axpy_bf16(const void *const *rows, const float *a, int nr, float *y, int64_t n, const void *const *pf,
                      int npf) {
    AXPY_BODY(uint16_t, load_bf16, pi_bf16_to_fp32, 2)
}

/* 8 int8 -> 8 floats */
static inline __m256 i8x8(const int8_t *p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p))); }

static void axpy_q8_0(const void *const *rows, const float *a, int nr, float *y, int64_t n, const void *const *pf,
                      int npf) {
    __m256 va[PI_AXPY_ROWS];
    for (int r = 0; r < nr; r++) va[r] = _mm256_set1_ps(a[r]);
    for (int64_t k = 0; k < n / 32; k++) {
        if (!(k & 1)) PI_PREFETCH_ROWS(pf, npf, k * PI_BLOCK_BYTES_Q8_0, (2 * PI_BLOCK_BYTES_Q8_0 + 63) / 64);
        __m256 y0 = _mm256_loadu_ps(y + 32 * k), y1 = _mm256_loadu_ps(y + 32 * k + 8);
        __m256 y2 = _mm256_loadu_ps(y + 32 * k + 16), y3 = _mm256_loadu_ps(y + 32 * k + 24);
        for (int r = 0; r < nr; r++) {
            const pi_block_q8_0 *b = (const pi_block_q8_0 *)rows[r] + k;
            const __m256 s = _mm256_mul_ps(va[r], _mm256_set1_ps(pi_fp16_table[b->d]));
            y0 = _mm256_fmadd_ps(s, i8x8(b->qs), y0);
            y1 = _mm256_fmadd_ps(s, i8x8(b->qs + 8), y1);
            y2 = _mm256_fmadd_ps(s, i8x8(b->qs + 16), y2);
            y3 = _mm256_fmadd_ps(s, i8x8(b->qs + 24), y3);
        }
        _mm256_storeu_ps(y + 32 * k, y0); _mm256_storeu_ps(y + 32 * k + 8, y1);
        _mm256_storeu_ps(y + 32 * k + 16, y2); _mm256_storeu_ps(y + 32 * k + 24, y3);
    }
}

/* Q4_0 nibbles -> floats without integer conversion: widen the bytes to 32-bit lanes, then OR a low
 * nibble into the mantissa of 2^23 (ulp 1) and a high nibble, still at bits 4..7, into the mantissa of
 * 2^19 (ulp 1/16, so bits 4..7 weigh 1); subtracting 2^23 + 8 and 2^19 + 8 leaves q - 8 exactly. */
static void axpy_q4_0(const void *const *rows, const float *a, int nr, float *y, int64_t n, const void *const *pf,
                      int npf) {
    const __m256i m_lo = _mm256_set1_epi32(0x0f), m_hi = _mm256_set1_epi32(0xf0);
    const __m256i e_lo = _mm256_set1_epi32(0x4b000000), e_hi = _mm256_set1_epi32(0x49000000);
    const __m256 b_lo = _mm256_set1_ps(8388608.0f + 8.0f), b_hi = _mm256_set1_ps(524288.0f + 8.0f);
#define Q4F(v, m, e, bias) _mm256_sub_ps(_mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(v, m), e)), bias)
    __m256 va[PI_AXPY_ROWS];
    for (int r = 0; r < nr; r++) va[r] = _mm256_set1_ps(a[r]);
    for (int64_t k = 0; k < n / 32; k++) {
        if (!(k & 3)) PI_PREFETCH_ROWS(pf, npf, k * PI_BLOCK_BYTES_Q4_0, (4 * PI_BLOCK_BYTES_Q4_0 + 63) / 64);
        __m256 y0 = _mm256_loadu_ps(y + 32 * k), y1 = _mm256_loadu_ps(y + 32 * k + 8);
        __m256 y2 = _mm256_loadu_ps(y + 32 * k + 16), y3 = _mm256_loadu_ps(y + 32 * k + 24);
        for (int r = 0; r < nr; r++) {
            const pi_block_q4_0 *b = (const pi_block_q4_0 *)rows[r] + k;
            const __m256 s = _mm256_mul_ps(va[r], _mm256_set1_ps(pi_fp16_table[b->d]));
            const __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)b->qs));
            const __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(b->qs + 8)));
            y0 = _mm256_fmadd_ps(s, Q4F(v0, m_lo, e_lo, b_lo), y0);
            y1 = _mm256_fmadd_ps(s, Q4F(v1, m_lo, e_lo, b_lo), y1);
            y2 = _mm256_fmadd_ps(s, Q4F(v0, m_hi, e_hi, b_hi), y2);
            y3 = _mm256_fmadd_ps(s, Q4F(v1, m_hi, e_hi, b_hi), y3);
        }
        _mm256_storeu_ps(y + 32 * k, y0); _mm256_storeu_ps(y + 32 * k + 8, y1);
        _mm256_storeu_ps(y + 32 * k + 16, y2); _mm256_storeu_ps(y + 32 * k + 24, y3);
    }
#undef Q4F
}

/* ---- F32 -> F16 (vcvtps2ph, round to nearest even: pi_fp32_to_fp16's bits) */
static void f32_to_f16(const float *x, uint16_t *out, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(out + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) out[i] = pi_fp32_to_fp16(x[i]);
}

/* ---- rows -> F32 */
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
    const float one = 1.0f;
    memset(out, 0, (size_t)n * 4);
    axpy_q8_0(&row, &one, 1, out, n, NULL, 0);
}
static void to_f32_q4_0(const void *row, float *out, int64_t n) {
    const float one = 1.0f;
    memset(out, 0, (size_t)n * 4);
    axpy_q4_0(&row, &one, 1, out, n, NULL, 0);
}

PI_DOT4_BY_ONE(dot4_f32, dot_f32)
PI_DOT4_BY_ONE(dot4_f16, dot_f16)
PI_DOT4_BY_ONE(dot4_bf16, dot_bf16)
PI_DOT4_BY_ONE(dot4_q8_0, dot_q8_0)
PI_DOT4_BY_ONE(dot4_q4_0, dot_q4_0)
/* Q4_0X16 (pi_backend.h) without VNNI: the run's two halves (blocks 0-7, 8-15) in turn, each 32-byte
 * half-slab masked for its low nibbles and shifted for its high ones (shifted, not masked in place:
 * vpmaddubsw's pair sums saturate at 2^15, and 240 * 127 * 2 would), vpmaddubsw + vpmaddwd leaving
 * each block's integer dot in its lane. NR rows share the activation loads; a row's operations are the
 * same for NR = 1 and 4, so dot4 is four dots bit for bit. 16 vector registers: one accumulator per
 * row, the halves added into it in order. */
static inline __attribute__((always_inline)) void dot_q4_0x16_rows(const void *const *rows, int NR, const pi_xq *x,
                                                                   int64_t n, float *out, const void *const *pf) {
    const __m256i m4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    __m256 acc[4];
    for (int r = 0; r < NR; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t c = 0; c < n / PI_COLS_Q4_0X16; c++) {
        const int64_t at = PI_BYTES_Q4_0X16 * c;
        if (pf)
            for (int r = 0; r < NR; r++) PI_PREFETCH_STEP(pf[r], at, (PI_BYTES_Q4_0X16 + 63) / 64);
        const int8_t *xq = x->qs16 + PI_COLS_Q4_0X16 * c;
        for (int h = 0; h < 2; h++) {
            __m256i is[4];
            for (int r = 0; r < NR; r++) is[r] = _mm256_loadu_si256((const __m256i *)(x->bsum + 16 * c + 8 * h));
            _Pragma("GCC unroll 4") for (int m = 0; m < 4; m++) {
                const __m256i xl = _mm256_loadu_si256((const __m256i *)(xq + 64 * m + 32 * h));
                const __m256i xh = _mm256_loadu_si256((const __m256i *)(xq + 256 + 64 * m + 32 * h));
                for (int r = 0; r < NR; r++) {
                    const __m256i v = _mm256_loadu_si256((const __m256i *)((const uint8_t *)rows[r] + at + 32 + 64 * m + 32 * h));
                    const __m256i pl = _mm256_maddubs_epi16(_mm256_and_si256(v, m4), xl);
                    const __m256i ph = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4), xh);
                    is[r] = _mm256_add_epi32(is[r], _mm256_madd_epi16(_mm256_add_epi16(pl, ph), ones));
                }
            }
            const __m256 xd = _mm256_loadu_ps(x->d + 16 * c + 8 * h);
            for (int r = 0; r < NR; r++) {
                const __m256 wd = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint8_t *)rows[r] + at + 16 * h)));
                acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(wd, xd), _mm256_cvtepi32_ps(is[r]), acc[r]);
            }
        }
    }
    for (int r = 0; r < NR; r++) out[r] = hsum(acc[r]);
}
static float dot_q4_0x16(const void *row, const void *xv, int64_t n, const void *pf) {
    float out;
    dot_q4_0x16_rows(&row, 1, (const pi_xq *)xv, n, &out, pf ? &pf : NULL);
    return out;
}
/* One row against nt tokens: each half-slab loaded, masked and shifted once, then every token takes
 * the operations a row takes in dot_q4_0x16_rows (so dot()'s bits) */
static void dot_tok_q4_0x16(const void *row, const pi_xq *x, int nt, int64_t n, float *out, int64_t stride,
                            const void *pf) {
    const __m256i m4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    __m256 acc[PI_DOT_TOK_MAX];
    for (int t = 0; t < nt; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t c = 0; c < n / PI_COLS_Q4_0X16; c++) {
        const int64_t at = PI_BYTES_Q4_0X16 * c;
        PI_PREFETCH_STEP(pf, at, (PI_BYTES_Q4_0X16 + 63) / 64);
        const uint8_t *w = (const uint8_t *)row + at;
        for (int h = 0; h < 2; h++) {
            __m256i is[PI_DOT_TOK_MAX];
            for (int t = 0; t < nt; t++) is[t] = _mm256_loadu_si256((const __m256i *)(x[t].bsum + 16 * c + 8 * h));
            _Pragma("GCC unroll 4") for (int m = 0; m < 4; m++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(w + 32 + 64 * m + 32 * h));
                const __m256i wl = _mm256_and_si256(v, m4), wh = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                for (int t = 0; t < nt; t++) {
                    const int8_t *xq = x[t].qs16 + PI_COLS_Q4_0X16 * c;
                    const __m256i pl = _mm256_maddubs_epi16(wl, _mm256_loadu_si256((const __m256i *)(xq + 64 * m + 32 * h)));
                    const __m256i ph = _mm256_maddubs_epi16(wh, _mm256_loadu_si256((const __m256i *)(xq + 256 + 64 * m + 32 * h)));
                    is[t] = _mm256_add_epi32(is[t], _mm256_madd_epi16(_mm256_add_epi16(pl, ph), ones));
                }
            }
            const __m256 wd = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + 16 * h)));
            for (int t = 0; t < nt; t++)
                acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(wd, _mm256_loadu_ps(x[t].d + 16 * c + 8 * h)),
                                         _mm256_cvtepi32_ps(is[t]), acc[t]);
        }
    }
    for (int t = 0; t < nt; t++) out[t * stride] = hsum(acc[t]);
}
static void dot4_q4_0x16(const void *const *rows, const void *xv, int64_t n, float *out, const void *const *pf) {
    dot_q4_0x16_rows(rows, 4, (const pi_xq *)xv, n, out, pf);
}
PI_Q4_0X16_AXPY_BY_RUNS(axpy_q4_0x16, to_f32_q4_0x16, axpy_q4_0)

/* ---- attention for one query head (pi_attn_head_fn; kernels_avx512.c's scheme at 8 lanes) */

/* lane j = the sum of the 8 lanes of a[j] */
static inline __m256 hsum8(const __m256 *a) {
    const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

/* exp(x) for x <= 0: 2^(x log2 e), the fraction by a degree-6 polynomial, 2^n through the exponent
 * bits (x clamped at -87: exp is then below every normal float's ulp of 1) */
static inline __m256 exp_le0(__m256 x) {
    const __m256 t = _mm256_mul_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(1.44269504f));
    const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(t, n);
    const __m256 p = PI_EXP2_FRAC(_mm256_fmadd_ps, _mm256_set1_ps, f);
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* d a multiple of 8: q and the output are taken 8 vectors (64 columns) at a time, as 16 registers
 * would not hold a whole head */
/* s[r] = exp(s[r] - m) for r < S in place, 8 rows at a time (the last ones in a block padded with m);
 * returns 1 / their sum */
static inline float softmax_exp(float *s, int64_t S, float m) {
    const __m256 mv = _mm256_set1_ps(m);
    __m256 sum = _mm256_setzero_ps();
    int64_t r = 0;
    for (; r + W <= S; r += W) {
        const __m256 e = exp_le0(_mm256_sub_ps(_mm256_loadu_ps(s + r), mv));
        sum = _mm256_add_ps(sum, e);
        _mm256_storeu_ps(s + r, e);
    }
    float total = hsum(sum), tmp[W];
    if (r < S) { /* the last rows through the same function, in a padded block */
        for (int j = 0; j < W; j++) tmp[j] = r + j < S ? s[r + j] : m;
        _mm256_storeu_ps(tmp, exp_le0(_mm256_sub_ps(_mm256_loadu_ps(tmp), mv)));
        for (int64_t j = 0; r + j < S; j++) total += (s[r + j] = tmp[j]);
    }
    return 1.0f / total;
}

#define ATTN_HEAD_BODY(LOAD, ESIZE)                                                                         \
    const int64_t nv = d / W;                                                                               \
    const __m256 sv = _mm256_set1_ps(scale);                                                                \
    float mx = -INFINITY, tmp[W];                                                                           \
    for (int64_t r0 = 0; r0 < S; r0 += W) { /* scores, 8 rows at a time */                                 \
        const int m = (int)(S - r0 < W ? S - r0 : W);                                                       \
        __m256 acc[W];                                                                                      \
        for (int j = 0; j < W; j++) acc[j] = _mm256_setzero_ps();                                           \
        for (int64_t i = 0; i < nv; i++) {                                                                  \
            const __m256 qi = _mm256_mul_ps(_mm256_loadu_ps(q + W * i), sv);                                \
            for (int j = 0; j < m; j++)                                                                     \
                acc[j] = _mm256_fmadd_ps(LOAD(k + (r0 + j) * row_bytes + ESIZE * W * i), qi, acc[j]);       \
        }                                                                                                   \
        _mm256_storeu_ps(tmp, hsum8(acc));                                                                  \
        for (int j = 0; j < m; j++) {                                                                       \
            s[r0 + j] = tmp[j];                                                                             \
            mx = tmp[j] > mx ? tmp[j] : mx;                                                                 \
        }                                                                                                   \
    }                                                                                                       \
    const float inv = softmax_exp(s, S, mx);                                                                \
    for (int64_t i0 = 0; i0 < nv; i0 += 8) {                                                                \
        const int nb = (int)(nv - i0 < 8 ? nv - i0 : 8);                                                    \
        __m256 o[8];                                                                                        \
        for (int i = 0; i < nb; i++) o[i] = _mm256_setzero_ps();                                            \
        for (int64_t rr = 0; rr < S; rr++) {                                                                \
            const __m256 pr = _mm256_set1_ps(s[rr] * inv);                                                  \
            const uint8_t *vr = v + rr * row_bytes + ESIZE * W * i0;                                        \
            for (int i = 0; i < nb; i++) o[i] = _mm256_fmadd_ps(LOAD(vr + ESIZE * W * i), pr, o[i]);        \
        }                                                                                                   \
        for (int i = 0; i < nb; i++) _mm256_storeu_ps(out + W * (i0 + i), o[i]);                            \
    }

static inline __m256 load_f32_bytes(const uint8_t *p) { return _mm256_loadu_ps((const float *)p); }
static inline __m256 load_f16_bytes(const uint8_t *p) { return load_f16((const uint16_t *)p); }
PI_ATTN_HEAD_FNS

/* ---- up to PI_ATTN_GROUP query heads sharing one KV head (pi_attn_group_fn): per head
 * ATTN_HEAD_BODY's operations in its order (its bits), each K and V vector loaded and converted once
 * for all of them. Scores 2 rows at a time (4 heads x 2 rows = hsum8's 8 accumulators), the weighted
 * sum of V 2 vectors of d at a time across the rows (4 heads x 2 = 8 of the 16 registers). */
#define PI_V_LOADA _mm256_load_ps
#define PI_V_SET1 _mm256_set1_ps
#define PI_V_STOREU _mm256_storeu_ps
#define PI_V_HSUMW hsum8
PI_ATTN_GROUP_PIECES(2, 2)

static inline __attribute__((always_inline)) void attn_group_ng(const float *q, const int NG, const uint8_t *k,
                                                                const uint8_t *v, int64_t row_bytes, int64_t S,
                                                                int64_t d, float scale, float *s, float *out,
                                                                const int f16) {
    const int64_t nv = d / W;
    float qs[4][PI_ATTN_MAX_D] __attribute__((aligned(32))), mx[4], tmp[W];
    for (int g = 0; g < NG; g++) {
        mx[g] = -INFINITY;
        for (int64_t i = 0; i < nv; i++)
            _mm256_store_ps(qs[g] + W * i, _mm256_mul_ps(_mm256_loadu_ps(q + g * d + W * i), _mm256_set1_ps(scale)));
    }
    for (int64_t r0 = 0; r0 < S; r0 += 2) {
        const int m = S - r0 < 2 ? 1 : 2;
        const uint8_t *kr = k + r0 * row_bytes;
        _mm256_storeu_ps(tmp, m == 2 ? group_scores(qs, kr, row_bytes, nv, NG, 2, f16)
                                     : group_scores(qs, kr, row_bytes, nv, NG, 1, f16));
        for (int g = 0; g < NG; g++)
            for (int r = 0; r < m; r++) {
                const float t = tmp[2 * g + r];
                s[g * S + r0 + r] = t;
                mx[g] = t > mx[g] ? t : mx[g];
            }
    }
    for (int g = 0; g < NG; g++) { /* ATTN_HEAD_BODY's softmax, head by head */
        float *sg = s + g * S;
        const float inv = softmax_exp(sg, S, mx[g]);
        for (int64_t rr = 0; rr < S; rr++) sg[rr] *= inv; /* the weight ATTN_HEAD_BODY broadcasts */
    }
    int64_t i = 0;
    for (; i + 2 <= nv; i += 2) group_pv(s, S, v, row_bytes, i, 2, NG, out, d, f16);
    if (i < nv) group_pv(s, S, v, row_bytes, i, 1, NG, out, d, f16);
}

PI_ATTN_GROUP_FNS

const pi_kernel_table pi_kernels_avx2 = {
    "avx2",
    {dot_f32, dot_f16, dot_bf16, dot_q8_0, dot_q4_0, dot_q4_0x16},
    {dot4_f32, dot4_f16, dot4_bf16, dot4_q8_0, dot4_q4_0, dot4_q4_0x16},
    {axpy_f32, axpy_f16, axpy_bf16, axpy_q8_0, axpy_q4_0, axpy_q4_0x16},
    {to_f32_f32, to_f32_f16, to_f32_bf16, to_f32_q8_0, to_f32_q4_0, to_f32_q4_0x16},
    quantize_x,
    {NULL, NULL, NULL, NULL, NULL, dot_tok_q4_0x16},
    {rows_tok_f32, rows_tok_f16, rows_tok_bf16, NULL, NULL, NULL},
    {attn_head_f32, attn_head_f16, NULL, NULL, NULL, NULL},
    f32_to_f16,
    {attn_group_f32, attn_group_f16, NULL, NULL, NULL, NULL},
};

#pragma GCC pop_options
#endif
