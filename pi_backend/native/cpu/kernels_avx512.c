/* kernels_avx512.c — AVX-512 (F + BW + VL + VNNI) row kernels. Compiled with a target pragma so the
 * rest of the library stays baseline x86-64; ops.c only calls them after checking the CPU at run time.
 *
 * Float rows use 512-bit vectors. The integer dot products of quantized rows work on 256-bit
 * registers, one Q block (32 values) each: Zen 4 executes 512-bit ops as two 256-bit halves anyway,
 * and a block never has to be split across lanes. */
#include "kernels.h"

#ifdef PI_HAVE_X86_KERNELS
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")
#include <immintrin.h>
#include <math.h>

#define W 16 /* floats per vector */

static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline __m512 load_f16(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
static inline __m512 load_bf16(const uint16_t *p) {
    __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}
static inline float half(uint16_t h) { return _cvtsh_ss(h); }
static inline float ident(float v) { return v; }

/* ---- activations -> Q8 blocks, bit for bit as kernels_scalar.c */
static void quantize_x(const float *x, int64_t n, int8_t *qs, int32_t *off, float *d) {
    const __m512i absmask = _mm512_set1_epi32(0x7fffffff);
    const __m256i mult = _mm256_setr_epi64x(0x0808080808080808ll, 0x0808080808080808ll,
                                            (long long)0x8080808080808080ull, (long long)0x8080808080808080ull);
    for (int64_t b = 0; b < n / 32; b++, x += 32, qs += 32, off += 8) {
        const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
        /* max |x| on the bit patterns: exact, and >= 0x7f800000 iff some value is inf / NaN */
        const __m512i a0 = _mm512_and_si512(_mm512_castps_si512(x0), absmask);
        const __m512i a1 = _mm512_and_si512(_mm512_castps_si512(x1), absmask);
        const uint32_t mb = (uint32_t)_mm512_reduce_max_epi32(_mm512_max_epi32(a0, a1));
        float amax;
        memcpy(&amax, &mb, 4);
        const __m512 id = _mm512_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
        /* round half to even (explicitly, whatever MXCSR says); lanes hold |q| <= 127 */
#define RNE (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
        const __m512i q0 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(x0, id), RNE);
        const __m512i q1 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(x1, id), RNE);
#undef RNE
        const __m256i q = _mm256_set_m128i(_mm512_cvtepi32_epi8(q1), _mm512_cvtepi32_epi8(q0));
        _mm256_storeu_si256((__m256i *)qs, q);
        /* off: dpbusd(8 or 128, q) sums 8 q (lanes 0-3) or 128 q (lanes 4-7) over each group of 4 */
        const __m256i s8 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), mult, q);
        _mm256_storeu_si256((__m256i *)off, _mm256_sub_epi32(_mm256_setzero_si256(), s8));
        d[b] = mb < 0x7f800000u ? _cvtsh_ss(_cvtss_sh(amax / 127.0f, _MM_FROUND_TO_NEAREST_INT)) : __builtin_nanf("");
    }
}

/* ---- dot products. Four accumulators over 64 elements hide the FMA latency; the scalar tail handles
 * n % 16. The prefetch of the row ahead keeps pace with the bytes read. */
#define DOT_BODY(LOAD, SCALAR, ESIZE)                                                 \
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                         \
    int64_t i = 0;                                                                     \
    for (; i + 4 * W <= n; i += 4 * W) {                                               \
        PI_PREFETCH_STEP(pf, i * ESIZE, (4 * W * ESIZE + 63) / 64);                      \
        a0 = _mm512_fmadd_ps(LOAD(w + i), _mm512_loadu_ps(x + i), a0);                 \
        a1 = _mm512_fmadd_ps(LOAD(w + i + W), _mm512_loadu_ps(x + i + W), a1);         \
        a2 = _mm512_fmadd_ps(LOAD(w + i + 2 * W), _mm512_loadu_ps(x + i + 2 * W), a2); \
        a3 = _mm512_fmadd_ps(LOAD(w + i + 3 * W), _mm512_loadu_ps(x + i + 3 * W), a3); \
    }                                                                                  \
    for (; i + W <= n; i += W) a0 = _mm512_fmadd_ps(LOAD(w + i), _mm512_loadu_ps(x + i), a0); \
    float s = hsum(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));       \
    for (; i < n; i++) s += SCALAR(w[i]) * x[i];                                        \
    return s;

static float dot_f32(const void *row, const void *xv, int64_t n, const void *pf) {
    const float *w = (const float *)row, *x = (const float *)xv;
    DOT_BODY(_mm512_loadu_ps, ident, 4)
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

/* nr float-type rows against up to 4 tokens (x: their rows of n floats; pi_rows_tok_fn). Converting a weight
 * vector once per token and streaming 4 tokens' activations (64 KiB at n = 4096) past every row made
 * prefill's F16 dots ~40% of the FMA peak here: vcvtph2ps contends with the FMAs for Zen 4's FP pipes,
 * and the activations came from L2. So each weight vector is converted once for the NT tokens, and the
 * columns go in blocks of PI_ROWS_TOK_COLS, every row of the group taking a block while its activations
 * (16 KiB) stay in L1. Per (row, token) the accumulators and their order are DOT_BODY's -- kept in
 * acc[] between blocks -- so every result has dot()'s bits (kernels.h: PI_ROWS_TOK_BODY). */
#define PI_V __m512
#define PI_V_ZERO _mm512_setzero_ps
#define PI_V_FMA _mm512_fmadd_ps
#define PI_V_LOADX _mm512_loadu_ps
#define PI_V_ADD _mm512_add_ps
#define PI_V_HSUM hsum
PI_ROWS_TOK_FN(rows_tok_f32, float, _mm512_loadu_ps, ident, 4, PI_DOT_TOK_MAX)
PI_ROWS_TOK_FN(rows_tok_f16, uint16_t, load_f16, half, 2, PI_DOT_TOK_MAX)
PI_ROWS_TOK_FN(rows_tok_bf16, uint16_t, load_bf16, pi_bf16_to_fp32, 2, PI_DOT_TOK_MAX)

/* ---- attention for one query head (pi_attn_head_fn) */

/* lane j of the result = the sum of the 16 lanes of a[j], for the first m of a[0..16) (the others 0) */
static inline __m512 hsum16(const __m512 *a) {
    __m512 s[8], u[4];
    for (int k = 0; k < 8; k++) /* rows 2k | 2k+1: halves added */
        s[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0x44),
                             _mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0xEE));
    for (int k = 0; k < 4; k++) /* one 128-bit block per row 4k .. 4k+3 */
        u[k] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * k], s[2 * k + 1], 0x88),
                             _mm512_shuffle_f32x4(s[2 * k], s[2 * k + 1], 0xDD));
    const __m512 v0 = _mm512_add_ps(_mm512_unpacklo_ps(u[0], u[1]), _mm512_unpackhi_ps(u[0], u[1]));
    const __m512 v1 = _mm512_add_ps(_mm512_unpacklo_ps(u[2], u[3]), _mm512_unpackhi_ps(u[2], u[3]));
    const __m512 w = _mm512_add_ps(_mm512_shuffle_ps(v0, v1, 0x44), _mm512_shuffle_ps(v0, v1, 0xEE));
    /* block b, lane l of w holds row 4 l + b */
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), w);
}

/* exp(x) for x <= 0 (scores minus their maximum): 2^(x log2 e), the fraction by a degree-6 polynomial
 * (PI_EXP2_FRAC), the integer part by vscalefps (denormal below -87, 0 from the clamp at -104) */
static inline __m512 exp_le0(__m512 x) {
    const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(1.44269504f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n); /* [-0.5, 0.5] */
    const __m512 p = PI_EXP2_FRAC(_mm512_fmadd_ps, _mm512_set1_ps, f);
    return _mm512_scalef_ps(p, n);
}

/* s[r] = exp(s[r] - m) for r < S in place, 16 rows at a time (the last masked); returns 1 / their sum */
static inline float softmax_exp(float *s, int64_t S, float m) {
    const __m512 mv = _mm512_set1_ps(m);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t r0 = 0; r0 < S; r0 += W) {
        const __mmask16 mk = (__mmask16)(S - r0 < W ? (1u << (S - r0)) - 1 : 0xffff);
        const __m512 e = exp_le0(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, s + r0), mv));
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(mk, e));
        _mm512_mask_storeu_ps(s + r0, mk, e);
    }
    return 1.0f / _mm512_reduce_add_ps(sum);
}

#define ATTN_HEAD_BODY(LOAD, ESIZE)                                                                         \
    const int nv = (int)(d / W);                                                                            \
    __m512 qv[PI_ATTN_MAX_D / W];                                                                           \
    for (int i = 0; i < nv; i++) qv[i] = _mm512_mul_ps(_mm512_loadu_ps(q + W * i), _mm512_set1_ps(scale)); \
    __m512 mx = _mm512_set1_ps(-INFINITY);                                                                  \
    for (int64_t r0 = 0; r0 < S; r0 += W) { /* scores, 16 rows at a time */                                \
        const int m = (int)(S - r0 < W ? S - r0 : W);                                                       \
        __m512 acc[W];                                                                                      \
        for (int j = 0; j < W; j++) acc[j] = _mm512_setzero_ps();                                           \
        for (int j = 0; j < m; j++) {                                                                       \
            const uint8_t *kr = k + (r0 + j) * row_bytes;                                                   \
            for (int i = 0; i < nv; i++) acc[j] = _mm512_fmadd_ps(LOAD(kr + ESIZE * W * i), qv[i], acc[j]); \
        }                                                                                                   \
        const __mmask16 mk = (__mmask16)((1u << m) - 1);                                                    \
        const __m512 sc = hsum16(acc);                                                                      \
        _mm512_mask_storeu_ps(s + r0, mk, sc);                                                              \
        mx = _mm512_mask_max_ps(mx, mk, mx, sc);                                                            \
    }                                                                                                       \
    const float inv = softmax_exp(s, S, _mm512_reduce_max_ps(mx));                                          \
    __m512 o[PI_ATTN_MAX_D / W];                                                                            \
    for (int i = 0; i < nv; i++) o[i] = _mm512_setzero_ps();                                                \
    for (int64_t r = 0; r < S; r++) { /* the weighted sum of V in registers */                             \
        const __m512 pr = _mm512_set1_ps(s[r] * inv);                                                      \
        const uint8_t *vr = v + r * row_bytes;                                                              \
        for (int i = 0; i < nv; i++) o[i] = _mm512_fmadd_ps(LOAD(vr + ESIZE * W * i), pr, o[i]);          \
    }                                                                                                       \
    for (int i = 0; i < nv; i++) _mm512_storeu_ps(out + W * i, o[i]);

static inline __m512 load_f32_bytes(const uint8_t *p) { return _mm512_loadu_ps((const float *)p); }
static inline __m512 load_f16_bytes(const uint8_t *p) { return load_f16((const uint16_t *)p); }
PI_ATTN_HEAD_FNS

/* ---- attention for up to PI_ATTN_GROUP query heads that share one KV head (GQA / MQA;
 * pi_attn_group_fn). Per head the operations and their order are ATTN_HEAD_BODY's, so each head gets
 * the bits it gets alone; what changes is that each K and V vector is loaded and converted once for
 * all the heads. Scores: 4 rows at a time, 4 heads x 4 rows = 16 accumulators (each over the columns
 * in order, as acc[j] there), one transposed reduction. Weighted sum of V: 4 vectors of d at a time
 * across all the rows. NG, M and IB are compile-time constants where these are inlined. */
#define PI_V_LOADA _mm512_load_ps
#define PI_V_SET1 _mm512_set1_ps
#define PI_V_STOREU _mm512_storeu_ps
#define PI_V_HSUMW hsum16
PI_ATTN_GROUP_PIECES(4, 4)

static inline __attribute__((always_inline)) void attn_group_ng(const float *q, const int NG, const uint8_t *k,
                                                                const uint8_t *v, int64_t row_bytes, int64_t S,
                                                                int64_t d, float scale, float *s, float *out,
                                                                const int f16) {
    const int nv = (int)(d / W);
    float qs[4][PI_ATTN_MAX_D] __attribute__((aligned(64)));
    for (int g = 0; g < NG; g++)
        for (int i = 0; i < nv; i++)
            _mm512_store_ps(qs[g] + W * i, _mm512_mul_ps(_mm512_loadu_ps(q + g * d + W * i), _mm512_set1_ps(scale)));
    for (int64_t r0 = 0; r0 < S; r0 += 4) {
        const int m = (int)(S - r0 < 4 ? S - r0 : 4);
        const uint8_t *kr = k + r0 * row_bytes;
        const __m512 sc = m == 4 ? group_scores(qs, kr, row_bytes, nv, NG, 4, f16)
                        : m == 3 ? group_scores(qs, kr, row_bytes, nv, NG, 3, f16)
                        : m == 2 ? group_scores(qs, kr, row_bytes, nv, NG, 2, f16)
                                 : group_scores(qs, kr, row_bytes, nv, NG, 1, f16);
        float t[W];
        _mm512_storeu_ps(t, sc);
        for (int g = 0; g < NG; g++)
            for (int r = 0; r < m; r++) s[g * S + r0 + r] = t[4 * g + r];
    }
    for (int g = 0; g < NG; g++) { /* ATTN_HEAD_BODY's maximum, softmax and 1 / sum, head by head */
        float *sg = s + g * S;
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int64_t r0 = 0; r0 < S; r0 += W) {
            const __mmask16 mk = (__mmask16)(S - r0 < W ? (1u << (S - r0)) - 1 : 0xffff);
            mx = _mm512_mask_max_ps(mx, mk, mx, _mm512_maskz_loadu_ps(mk, sg + r0));
        }
        const float inv = softmax_exp(sg, S, _mm512_reduce_max_ps(mx));
        for (int64_t r = 0; r < S; r++) sg[r] *= inv; /* the weight ATTN_HEAD_BODY broadcasts, s[r] * inv */
    }
    int i = 0;
    for (; i + 4 <= nv; i += 4) group_pv(s, S, v, row_bytes, i, 4, NG, out, d, f16);
    if (nv - i == 3) group_pv(s, S, v, row_bytes, i, 3, NG, out, d, f16);
    else if (nv - i == 2) group_pv(s, S, v, row_bytes, i, 2, NG, out, d, f16);
    else if (nv - i == 1) group_pv(s, S, v, row_bytes, i, 1, NG, out, d, f16);
}

PI_ATTN_GROUP_FNS

/* Quantized rows x quantized activations (pi_xq), one block per 256-bit register: vpdpbusd multiplies
 * unsigned weight bytes by the signed activation bytes and sums each group of 4 into 8 int32 lanes,
 * starting from a start vector taken from the activation's offsets; the lanes become floats once per
 * block and take both scales in one FMA. Four accumulators, one per block of a group of 4. LANES scales
 * the lanes once at the end (Q4_0 sums its high nibbles at 16 times their value). A block's integer dot
 * is split into its weight part (W_INT) and its activation part (X_INIT, the start vector), so that
 * dot4 computes the activation part once for four rows. */
#define QDOT_BODY(BT, W_INT, X_INIT, BSIZE, LANES)                                           \
    const BT *b = (const BT *)row;                                                           \
    const pi_xq *x = (const pi_xq *)xv;                                                      \
    const int64_t nb = n / 32;                                                               \
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()}; \
    int64_t k = 0;                                                                           \
    for (; k + 4 <= nb; k += 4) {                                                            \
        PI_PREFETCH_STEP(pf, k * BSIZE, (4 * BSIZE + 63) / 64);                         \
        for (int j = 0; j < 4; j++) {                                                        \
            const __m256i is = _mm256_dpbusd_epi32(X_INIT(x, k + j), W_INT(b + k + j), x_qs(x, k + j)); \
            const __m256 sc = _mm256_set1_ps(pi_fp16_table[b[k + j].d] * x->d[k + j]);        \
            acc[j] = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(is), acc[j]);                     \
        }                                                                                    \
    }                                                                                        \
    for (; k < nb; k++) {                                                                    \
        const __m256i is = _mm256_dpbusd_epi32(X_INIT(x, k), W_INT(b + k), x_qs(x, k));      \
        acc[0] = _mm256_fmadd_ps(_mm256_set1_ps(pi_fp16_table[b[k].d] * x->d[k]), _mm256_cvtepi32_ps(is), acc[0]); \
    }                                                                                        \
    const __m256 s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])); \
    return hsum256(_mm256_mul_ps(s, LANES));

/* Four rows: the same operations per row as QDOT_BODY (sixteen accumulators), the activation's bytes,
 * start vector and scale loaded once per block for all four. */
#define QDOT4_BODY(BT, W_INT, X_INIT, BSIZE, LANES)                                          \
    const BT *b[4] = {(const BT *)rows[0], (const BT *)rows[1], (const BT *)rows[2], (const BT *)rows[3]}; \
    const pi_xq *x = (const pi_xq *)xv;                                                      \
    const int64_t nb = n / 32;                                                               \
    __m256 acc[4][4];                                                                        \
    for (int r = 0; r < 4; r++)                                                              \
        for (int j = 0; j < 4; j++) acc[r][j] = _mm256_setzero_ps();                         \
    int64_t k = 0;                                                                           \
    for (; k + 4 <= nb; k += 4) {                                                            \
        if (pf)                                                                              \
            for (int r = 0; r < 4; r++) PI_PREFETCH_STEP(pf[r], k * BSIZE, (4 * BSIZE + 63) / 64); \
        _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) {                                \
            const __m256i xs = x_qs(x, k + j), init = X_INIT(x, k + j);                      \
            __m256 xd = _mm256_set1_ps(x->d[k + j]);                                         \
            __asm__("" : "+v"(xd)); /* opaque: keeps the products vector (embedded broadcast) */ \
            _Pragma("GCC unroll 4") for (int r = 0; r < 4; r++) {                            \
                const __m256i is = _mm256_dpbusd_epi32(init, W_INT(b[r] + k + j), xs);       \
                const __m256 sc = _mm256_mul_ps(_mm256_set1_ps(pi_fp16_table[b[r][k + j].d]), xd); \
                acc[r][j] = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(is), acc[r][j]);           \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
    for (; k < nb; k++) {                                                                    \
        const __m256i xs = x_qs(x, k), init = X_INIT(x, k);                                  \
        const float xd = x->d[k];                                                            \
        for (int r = 0; r < 4; r++) {                                                        \
            const __m256i is = _mm256_dpbusd_epi32(init, W_INT(b[r] + k), xs);               \
            acc[r][0] = _mm256_fmadd_ps(_mm256_set1_ps(pi_fp16_table[b[r][k].d] * xd), _mm256_cvtepi32_ps(is), acc[r][0]); \
        }                                                                                    \
    }                                                                                        \
    for (int r = 0; r < 4; r++) {                                                            \
        const __m256 s = _mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]), _mm256_add_ps(acc[r][2], acc[r][3])); \
        out[r] = hsum256(_mm256_mul_ps(s, LANES));                                           \
    }

static inline __m256i x_qs(const pi_xq *x, int64_t k) { return _mm256_loadu_si256((const __m256i *)(x->qs + 32 * k)); }
static inline __m256i x_off(const pi_xq *x, int64_t k) { return _mm256_loadu_si256((const __m256i *)(x->off + 8 * k)); }

/* Q8_0: weights made unsigned by flipping the sign bit (w + 128); the extra 128 * sum(x) is removed
 * by starting from -128 * (sums of 4): off, with lanes 0-3 shifted from -8 to -128 */
static inline __m256i q8_w_int(const pi_block_q8_0 *b) {
    return _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)b->qs), _mm256_set1_epi8((char)0x80));
}
static inline __m256i q8_x_init(const pi_xq *x, int64_t k) {
    return _mm256_sllv_epi32(x_off(x, k), _mm256_setr_epi32(4, 4, 4, 4, 0, 0, 0, 0));
}
/* Q4_0: the 16 bytes go to both halves; masking the low half with 0x0f and the high half with 0xf0
 * gives the nibbles of elements 0-15 and 16 times those of 16-31, all unsigned, without a shift or
 * lane insert. off supplies the "- 8" (times 16 in the high lanes). */
static inline __m256i q4_w_int(const pi_block_q4_0 *b) {
    const __m256i nib = _mm256_setr_epi64x(0x0f0f0f0f0f0f0f0fll, 0x0f0f0f0f0f0f0f0fll,
                                           (long long)0xf0f0f0f0f0f0f0f0ull, (long long)0xf0f0f0f0f0f0f0f0ull);
    return _mm256_and_si256(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)b->qs)), nib);
}

#define Q8_LANES _mm256_set1_ps(1.0f)
#define Q4_LANES _mm256_setr_ps(1, 1, 1, 1, 0.0625f, 0.0625f, 0.0625f, 0.0625f)

static float dot_q8_0(const void *row, const void *xv, int64_t n, const void *pf) {
    QDOT_BODY(pi_block_q8_0, q8_w_int, q8_x_init, PI_BLOCK_BYTES_Q8_0, Q8_LANES)
}
static float dot_q4_0(const void *row, const void *xv, int64_t n, const void *pf) {
    QDOT_BODY(pi_block_q4_0, q4_w_int, x_off, PI_BLOCK_BYTES_Q4_0, Q4_LANES)
}
static void dot4_q8_0(const void *const *rows, const void *xv, int64_t n, float *out, const void *const *pf) {
    QDOT4_BODY(pi_block_q8_0, q8_w_int, q8_x_init, PI_BLOCK_BYTES_Q8_0, Q8_LANES)
}
static void dot4_q4_0(const void *const *rows, const void *xv, int64_t n, float *out, const void *const *pf) {
    QDOT4_BODY(pi_block_q4_0, q4_w_int, x_off, PI_BLOCK_BYTES_Q4_0, Q4_LANES)
}
PI_DOT4_BY_ONE(dot4_f32, dot_f32)
PI_DOT4_BY_ONE(dot4_f16, dot_f16)
PI_DOT4_BY_ONE(dot4_bf16, dot_bf16)

/* Q4_0X16 (pi_backend.h): per run of 16 blocks, four 64-byte loads per row. Each is masked twice, with
 * 0x0f (the nibbles of elements 4m..4m+3 of block l in lane l) and 0xf0 (16 times those of 16+4m..),
 * and multiplied by the activation bytes regrouped the same way (qs16): after 8 vpdpbusd, lane l holds
 * block l's whole integer dot (the high sum, exact multiple of 16, shifted back; bsum supplies the
 * "- 8"). Then one conversion and one FMA with the 16 weight scales times the 16 activation scales:
 * per block and row ~1.4 512-bit ops instead of ~5 256-bit ones (C harness, in cache, one Zen 4 core:
 * 1.18 vs 2.18 cycles per block and row). NR rows share the activation loads; each row's operations
 * are the same for NR = 1 and 4, so dot4 is four dots bit for bit. */
static inline __attribute__((always_inline)) void dot_q4_0x16_rows(const void *const *rows, int NR, const pi_xq *x,
                                                                   int64_t n, float *out, const void *const *pf) {
    const __m512i m_lo = _mm512_set1_epi8(0x0f), m_hi = _mm512_set1_epi8((char)0xf0);
    __m512 acc[4];
    for (int r = 0; r < NR; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < n / PI_COLS_Q4_0X16; c++) {
        const int64_t at = PI_BYTES_Q4_0X16 * c;
        if (pf)
            for (int r = 0; r < NR; r++) PI_PREFETCH_STEP(pf[r], at, (PI_BYTES_Q4_0X16 + 63) / 64);
        const int8_t *xq = x->qs16 + PI_COLS_Q4_0X16 * c;
        __m512i lo[4], hi[4];
        for (int r = 0; r < NR; r++) {
            lo[r] = _mm512_loadu_si512(x->bsum + 16 * c);
            hi[r] = _mm512_setzero_si512();
        }
        _Pragma("GCC unroll 4") for (int m = 0; m < 4; m++) {
            const __m512i xl = _mm512_loadu_si512(xq + 64 * m), xh = _mm512_loadu_si512(xq + 256 + 64 * m);
            _Pragma("GCC unroll 4") for (int r = 0; r < NR; r++) {
                const __m512i v = _mm512_loadu_si512((const uint8_t *)rows[r] + at + 32 + 64 * m);
                lo[r] = _mm512_dpbusd_epi32(lo[r], _mm512_and_si512(v, m_lo), xl);
                hi[r] = _mm512_dpbusd_epi32(hi[r], _mm512_and_si512(v, m_hi), xh);
            }
        }
        const __m512 xd = _mm512_loadu_ps(x->d + 16 * c);
        for (int r = 0; r < NR; r++) {
            const __m512i is = _mm512_add_epi32(lo[r], _mm512_srai_epi32(hi[r], 4));
            const __m512 wd = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint8_t *)rows[r] + at)));
            acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(wd, xd), _mm512_cvtepi32_ps(is), acc[r]);
        }
    }
    for (int r = 0; r < NR; r++) out[r] = hsum(acc[r]);
}
/* One row against nt tokens: per run the weight bytes are loaded and masked once, then each token takes
 * the same operations as in dot_q4_0x16_rows (so the same bits), its activation bytes read from cache */
static void dot_tok_q4_0x16(const void *row, const pi_xq *x, int nt, int64_t n, float *out, int64_t stride,
                            const void *pf) {
    const __m512i m_lo = _mm512_set1_epi8(0x0f), m_hi = _mm512_set1_epi8((char)0xf0);
    __m512 acc[PI_DOT_TOK_MAX];
    for (int t = 0; t < nt; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t c = 0; c < n / PI_COLS_Q4_0X16; c++) {
        const int64_t at = PI_BYTES_Q4_0X16 * c;
        PI_PREFETCH_STEP(pf, at, (PI_BYTES_Q4_0X16 + 63) / 64);
        const uint8_t *w = (const uint8_t *)row + at;
        __m512i wl[4], wh[4];
        for (int m = 0; m < 4; m++) {
            const __m512i v = _mm512_loadu_si512(w + 32 + 64 * m);
            wl[m] = _mm512_and_si512(v, m_lo);
            wh[m] = _mm512_and_si512(v, m_hi);
        }
        const __m512 wd = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)w));
        for (int t = 0; t < nt; t++) {
            const int8_t *xq = x[t].qs16 + PI_COLS_Q4_0X16 * c;
            __m512i lo = _mm512_loadu_si512(x[t].bsum + 16 * c), hi = _mm512_setzero_si512();
            _Pragma("GCC unroll 4") for (int m = 0; m < 4; m++) {
                lo = _mm512_dpbusd_epi32(lo, wl[m], _mm512_loadu_si512(xq + 64 * m));
                hi = _mm512_dpbusd_epi32(hi, wh[m], _mm512_loadu_si512(xq + 256 + 64 * m));
            }
            const __m512i is = _mm512_add_epi32(lo, _mm512_srai_epi32(hi, 4));
            acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(wd, _mm512_loadu_ps(x[t].d + 16 * c)), _mm512_cvtepi32_ps(is), acc[t]);
        }
    }
    for (int t = 0; t < nt; t++) out[t * stride] = hsum(acc[t]);
}

static float dot_q4_0x16(const void *row, const void *xv, int64_t n, const void *pf) {
    float out;
    dot_q4_0x16_rows(&row, 1, (const pi_xq *)xv, n, &out, pf ? &pf : NULL);
    return out;
}
static void dot4_q4_0x16(const void *const *rows, const void *xv, int64_t n, float *out, const void *const *pf) {
    dot_q4_0x16_rows(rows, 4, (const pi_xq *)xv, n, out, pf);
}

/* ---- y += sum_r a[r] * rows[r]: a tile of y stays in registers while every row adds into it, so y
 * is loaded and stored once per call instead of once per row. Each element sees the rows in order.
 * The rows of the next group are prefetched over the same byte range as the tile consumes. */
#define AXPY_BODY(TYPE, LOAD, SCALAR, ESIZE)                                          \
    __m512 va[PI_AXPY_ROWS];                                                          \
    for (int r = 0; r < nr; r++) va[r] = _mm512_set1_ps(a[r]);                        \
    int64_t i = 0;                                                                    \
    for (; i + 4 * W <= n; i += 4 * W) {                                              \
        PI_PREFETCH_ROWS(pf, npf, i * ESIZE, (4 * W * ESIZE + 63) / 64);                    \
        __m512 y0 = _mm512_loadu_ps(y + i), y1 = _mm512_loadu_ps(y + i + W);          \
        __m512 y2 = _mm512_loadu_ps(y + i + 2 * W), y3 = _mm512_loadu_ps(y + i + 3 * W); \
        for (int r = 0; r < nr; r++) {                                                \
            const TYPE *w = (const TYPE *)rows[r] + i;                                \
            y0 = _mm512_fmadd_ps(va[r], LOAD(w), y0);                                 \
            y1 = _mm512_fmadd_ps(va[r], LOAD(w + W), y1);                             \
            y2 = _mm512_fmadd_ps(va[r], LOAD(w + 2 * W), y2);                         \
            y3 = _mm512_fmadd_ps(va[r], LOAD(w + 3 * W), y3);                         \
        }                                                                             \
        _mm512_storeu_ps(y + i, y0); _mm512_storeu_ps(y + i + W, y1);                 \
        _mm512_storeu_ps(y + i + 2 * W, y2); _mm512_storeu_ps(y + i + 3 * W, y3);     \
    }                                                                                 \
    for (; i + W <= n; i += W) {                                                      \
        __m512 y0 = _mm512_loadu_ps(y + i);                                           \
        for (int r = 0; r < nr; r++) y0 = _mm512_fmadd_ps(va[r], LOAD((const TYPE *)rows[r] + i), y0); \
        _mm512_storeu_ps(y + i, y0);                                                  \
    }                                                                                 \
    for (; i < n; i++)                                                                \
        for (int r = 0; r < nr; r++) y[i] = fmaf(a[r], SCALAR(((const TYPE *)rows[r])[i]), y[i]);

static void axpy_f32(const void *const *rows, const float *a, int nr, float *y, int64_t n, const void *const *pf,
                     int npf) {
    AXPY_BODY(float, _mm512_loadu_ps, ident, 4)
}
static void axpy_f16(const void *const *rows, const float *a, int nr, float *y, int64_t n, const void *const *pf,
                     int npf) {
    AXPY_BODY(uint16_t, load_f16, half, 2)
}
static void axpy_bf16(const void *const *rows, const float *a, int nr, float *y, int64_t n, const void *const *pf,
                      int npf) {
    AXPY_BODY(uint16_t, load_bf16, pi_bf16_to_fp32, 2)
}

/* Quantized rows: one block (32 columns, two vectors) of y per step; each row adds s * q with
 * s = a * d (d read through pi_fp16_table). Q8_0 bytes widen and convert. Q4_0 nibbles widen once; the
 * low ones index a 16-entry table of the floats q - 8 (vpermps uses the low 4 bits of each lane, so
 * they need no mask), the high ones, still at bits 4..7, are ORed into the mantissa of 2^19 (ulp 1/16,
 * so they weigh 1: one vpternlogd) and 2^19 + 8 subtracted, exactly q - 8 again. Splitting the two
 * halves between the shuffle unit (vpermps) and the ALU / FP adder (vpternlogd, vsubps) instead of two
 * vpermps and a shift measured ~10% more blocks per cycle on Zen 4, where shuffles and FMAs contend;
 * the values, hence the results, are the same. */
/* 16 int8 -> 16 floats */
static inline __m512 i8x16(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

static void axpy_q8_0(const void *const *rows, const float *a, int nr, float *y, int64_t n, const void *const *pf,
                      int npf) {
    __m512 va[PI_AXPY_ROWS];
    for (int r = 0; r < nr; r++) va[r] = _mm512_set1_ps(a[r]);
    for (int64_t k = 0; k < n / 32; k++) {
        if (!(k & 1)) PI_PREFETCH_ROWS(pf, npf, k * PI_BLOCK_BYTES_Q8_0, (2 * PI_BLOCK_BYTES_Q8_0 + 63) / 64);
        __m512 lo = _mm512_loadu_ps(y + 32 * k), hi = _mm512_loadu_ps(y + 32 * k + 16);
        for (int r = 0; r < nr; r++) {
            const pi_block_q8_0 *b = (const pi_block_q8_0 *)rows[r] + k;
            const __m512 s = _mm512_mul_ps(va[r], _mm512_set1_ps(pi_fp16_table[b->d]));
            lo = _mm512_fmadd_ps(s, i8x16(b->qs), lo);
            hi = _mm512_fmadd_ps(s, i8x16(b->qs + 16), hi);
        }
        _mm512_storeu_ps(y + 32 * k, lo);
        _mm512_storeu_ps(y + 32 * k + 16, hi);
    }
}

static void axpy_q4_0(const void *const *rows, const float *a, int nr, float *y, int64_t n, const void *const *pf,
                      int npf) {
    const __m512 q_minus_8 = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    const __m512i m_hi = _mm512_set1_epi32(0xf0), e_hi = _mm512_set1_epi32(0x49000000);
    const __m512 b_hi = _mm512_set1_ps(524288.0f + 8.0f);
    __m512 va[PI_AXPY_ROWS];
    for (int r = 0; r < nr; r++) va[r] = _mm512_set1_ps(a[r]);
    for (int64_t k = 0; k < n / 32; k++) {
        if (!(k & 3)) PI_PREFETCH_ROWS(pf, npf, k * PI_BLOCK_BYTES_Q4_0, (4 * PI_BLOCK_BYTES_Q4_0 + 63) / 64);
        __m512 lo = _mm512_loadu_ps(y + 32 * k), hi = _mm512_loadu_ps(y + 32 * k + 16);
        for (int r = 0; r < nr; r++) {
            const pi_block_q4_0 *b = (const pi_block_q4_0 *)rows[r] + k;
            const __m512 s = _mm512_mul_ps(va[r], _mm512_set1_ps(pi_fp16_table[b->d]));
            const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)b->qs));
            lo = _mm512_fmadd_ps(s, _mm512_permutexvar_ps(v, q_minus_8), lo);
            hi = _mm512_fmadd_ps(s, _mm512_sub_ps(_mm512_castsi512_ps(_mm512_ternarylogic_epi32(v, m_hi, e_hi, 0xea)), b_hi), hi);
        }
        _mm512_storeu_ps(y + 32 * k, lo);
        _mm512_storeu_ps(y + 32 * k + 16, hi);
    }
}

PI_Q4_0X16_AXPY_BY_RUNS(axpy_q4_0x16, to_f32_q4_0x16, axpy_q4_0)

/* ---- F32 -> F16 (vcvtps2ph, round to nearest even: pi_fp32_to_fp16's bits) */
static void f32_to_f16(const float *x, uint16_t *out, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(out + i),
                            _mm512_cvtps_ph(_mm512_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    for (; i < n; i++) out[i] = pi_fp32_to_fp16(x[i]);
}

/* ---- rows -> F32 */
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
    const float one = 1.0f;
    memset(out, 0, (size_t)n * 4);
    axpy_q8_0(&row, &one, 1, out, n, NULL, 0);
}
static void to_f32_q4_0(const void *row, float *out, int64_t n) {
    const float one = 1.0f;
    memset(out, 0, (size_t)n * 4);
    axpy_q4_0(&row, &one, 1, out, n, NULL, 0);
}

const pi_kernel_table pi_kernels_avx512 = {
    "avx512",
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
