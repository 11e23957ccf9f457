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
#include "../include/pi_half.h" /* pi_fp16_to_fp32, pi_fp32_to_fp16 */

enum { PI_T_F32, PI_T_F16, PI_T_BF16, PI_T_Q8_0, PI_T_Q4_0, PI_T_Q4_0X16, PI_T_COUNT };

/* Activations of one token quantized to Q8 blocks, the form Q8_0 and Q4_0 rows are multiplied with
 * (llama.cpp's vec_dot_type), exactly as llama.cpp's x86 CPU backend does it (quantize_row_q8_0 and
 * its repacked variant, AVX/AVX2/AVX-512 builds): per 32 values amax = max|x|, d = amax / 127 kept as
 * fp16, q = round-half-to-even(x * (127 / amax)). (gguf-py and ggml's scalar reference differ: x * (1 /
 * d) and roundf, which disagree on about 2 values per million float32 activations.) Every ISA variant
 * here produces exactly these values, so every variant computes the same function. The q of a block
 * holding inf or NaN are unspecified; its d is NaN. */
typedef struct pi_xq {
    const int8_t *qs;   /* [n] */
    const int32_t *off; /* [n / 4]: per block 8 int32, the start values of the SIMD integer dots against
                         * Q4_0 nibbles: lanes 0-3 (elements 0-15) -8 * (sum of each 4 qs), lanes 4-7
                         * (elements 16-31) -128 * (sum of each 4 qs), as the high nibbles are
                         * multiplied in place, i.e. times 16 (see kernels_avx512.c) */
    const float *d;     /* [n / 32] block scales, fp16-rounded, as float */
    /* for Q4_0X16 rows only (else NULL), made from qs by pi_xq_regroup: */
    const int8_t *qs16;   /* [n]: qs regrouped as the weights of a Q4_0X16 run: in each run of 512,
                           * slab s (64 bytes) lane l = bytes 4s .. 4s + 3 of block l's 32 qs */
    const int32_t *bsum;  /* [n / 32]: -8 * (sum of the block's 32 qs), the "- 8" of its nibbles */
} pi_xq;

/* qs16 and bsum from qs, n a multiple of PI_COLS_Q4_0X16 */
static inline void pi_xq_regroup(const int8_t *qs, int64_t n, int8_t *qs16, int32_t *bsum) {
    for (int64_t b = 0; b < n / 32; b++) {
        int32_t s = 0;
        for (int j = 0; j < 32; j++) s += qs[32 * b + j];
        bsum[b] = -8 * s;
    }
    for (int64_t c = 0; c < n / PI_COLS_Q4_0X16; c++)
        for (int l = 0; l < 16; l++)
            for (int sl = 0; sl < 8; sl++) memcpy(qs16 + 512 * c + 64 * sl + 4 * l, qs + 512 * c + 32 * l + 4 * sl, 4);
}

/* x -> (qs, off, d) for n a multiple of 32 */
typedef void (*pi_quantize_x_fn)(const float *x, int64_t n, int8_t *qs, int32_t *off, float *d);

/* dot(row, x) over n elements (n a multiple of the block size for quantized types). x is the token's
 * activations as float for F32/F16/BF16 and as a pi_xq for Q8_0/Q4_0. pf: NULL, or a row of the same
 * type and length that is prefetched as this one is read (the row a few rows ahead in the list), so
 * that scattered rows stream like one long row. */
typedef float (*pi_dot_fn)(const void *row, const void *x, int64_t n, const void *pf);

/* out[j] = dot(rows[j], x, n, pf[j]) for j = 0..3, bit for bit (the same operations in the same order),
 * so which rows happen to be grouped never changes a result. Reading four rows side by side shares every
 * load and conversion of x among them: on one core the quantized dots are bound by their instruction
 * count, not by DRAM. pf: NULL, or four rows (entries may be NULL) prefetched as the rows are read. */
typedef void (*pi_dot4_fn)(const void *const *rows, const void *x, int64_t n, float *out, const void *const *pf);

/* dot4 as four dot calls: for the types and instruction sets where sharing x gains nothing */
#define PI_DOT4_BY_ONE(name, dot)                                                                      \
    static void name(const void *const *rows, const void *x, int64_t n, float *out, const void *const *pf) { \
        for (int j = 0; j < 4; j++) out[j] = dot(rows[j], x, n, pf ? pf[j] : NULL);                    \
    }

/* out[t * stride] = dot(row, &x[t], n, pf) for the nt <= PI_DOT_TOK_MAX tokens x[0 .. nt) (x: an array
 * of pi_xq), bit for bit: one row against several tokens' quantized activations, each weight byte
 * loaded and unpacked once for all of them (prefill, batches: the dots are bound by instructions, not
 * by DRAM, there). Only where a variant has it (NULL otherwise). */
#define PI_DOT_TOK_MAX 4
typedef void (*pi_dot_tok_fn)(const void *row, const pi_xq *x, int nt, int64_t n, float *out, int64_t stride,
                              const void *pf);

/* out[t * stride + r] = dot(rows[r], x + t * n, n, -) for the nr <= PI_ROWS_TOK_MAX rows and the
 * nt <= PI_DOT_TOK_MAX tokens (x: nt rows of n floats), bit for bit: the float types' batches (prefill),
 * each weight vector converted once for the nt tokens and the columns taken in blocks that keep the
 * tokens' activations in L1 across the rows. pf: NULL, or nr rows prefetched meanwhile. Float types of
 * the variants that have it (NULL otherwise). */
#define PI_ROWS_TOK_MAX 16
typedef void (*pi_rows_tok_fn)(const void *const *rows, int nr, const float *x, int nt, int64_t n, float *out,
                               int64_t stride, const void *const *pf);

/* The body of a pi_rows_tok_fn for one float type, shared by the SIMD variants: the including file
 * defines PI_V (its float vector), PI_V_ZERO / PI_V_FMA / PI_V_LOADX / PI_V_ADD / PI_V_HSUM and W (floats
 * per vector); NT (<= TMAX, a compile-time constant where it is inlined) tokens, nr rows. Per (row,
 * token) the accumulators and their order are the variant's DOT_BODY -- four vectors over steps of
 * 4 W, the vector remainder into the first, their sum, the scalar tail -- so each result has dot()'s
 * bits; between column blocks of PI_ROWS_TOK_COLS they wait in acc[]. */
#define PI_ROWS_TOK_COLS 1024
#define PI_ROWS_TOK_BODY(TYPE, LOAD, SCALAR, ESIZE, TMAX)                                                        \
    PI_V acc[PI_ROWS_TOK_MAX][TMAX][4];                                                                          \
    for (int r = 0; r < nr; r++)                                                                                 \
        for (int t = 0; t < NT; t++) acc[r][t][0] = acc[r][t][1] = acc[r][t][2] = acc[r][t][3] = PI_V_ZERO();    \
    const int64_t main_end = n - n % (4 * W);                                                                    \
    for (int64_t k0 = 0; k0 < main_end; k0 += PI_ROWS_TOK_COLS) {                                                \
        const int64_t k1 = main_end - k0 < PI_ROWS_TOK_COLS ? main_end : k0 + PI_ROWS_TOK_COLS;                  \
        for (int r = 0; r < nr; r++) {                                                                           \
            const TYPE *w = (const TYPE *)rows[r];                                                               \
            const void *pfr = pf ? pf[r] : NULL;                                                                 \
            PI_V a[TMAX][4];                                                                                     \
            for (int t = 0; t < NT; t++)                                                                         \
                for (int v = 0; v < 4; v++) a[t][v] = acc[r][t][v];                                              \
            for (int64_t i = k0; i < k1; i += 4 * W) {                                                           \
                PI_PREFETCH_STEP(pfr, i * ESIZE, (4 * W * ESIZE + 63) / 64);                                     \
                const PI_V w0 = LOAD(w + i), w1 = LOAD(w + i + W), w2 = LOAD(w + i + 2 * W), w3 = LOAD(w + i + 3 * W); \
                for (int t = 0; t < NT; t++) {                                                                   \
                    const float *xt = x + t * n + i;                                                             \
                    a[t][0] = PI_V_FMA(w0, PI_V_LOADX(xt), a[t][0]);                                             \
                    a[t][1] = PI_V_FMA(w1, PI_V_LOADX(xt + W), a[t][1]);                                         \
                    a[t][2] = PI_V_FMA(w2, PI_V_LOADX(xt + 2 * W), a[t][2]);                                     \
                    a[t][3] = PI_V_FMA(w3, PI_V_LOADX(xt + 3 * W), a[t][3]);                                     \
                }                                                                                                \
            }                                                                                                    \
            for (int t = 0; t < NT; t++)                                                                         \
                for (int v = 0; v < 4; v++) acc[r][t][v] = a[t][v];                                              \
        }                                                                                                        \
    }                                                                                                            \
    for (int r = 0; r < nr; r++) { /* DOT_BODY's remainder: vectors into the first accumulator, then the tail */ \
        const TYPE *w = (const TYPE *)rows[r];                                                                   \
        for (int t = 0; t < NT; t++) {                                                                           \
            const float *xt = x + t * n;                                                                         \
            PI_V a0 = acc[r][t][0];                                                                              \
            int64_t i = main_end;                                                                                \
            for (; i + W <= n; i += W) a0 = PI_V_FMA(LOAD(w + i), PI_V_LOADX(xt + i), a0);                       \
            float s = PI_V_HSUM(PI_V_ADD(PI_V_ADD(a0, acc[r][t][1]), PI_V_ADD(acc[r][t][2], acc[r][t][3])));     \
            for (; i < n; i++) s += SCALAR(w[i]) * xt[i];                                                        \
            out[t * stride + r] = s;                                                                             \
        }                                                                                                        \
    }

/* A pi_rows_tok_fn `name` over that body: tokens TMAX at a time (the last group smaller), each group
 * size a compile-time constant so the accumulators stay in registers */
#define PI_ROWS_TOK_FN(name, TYPE, LOAD, SCALAR, ESIZE, TMAX)                                               \
    static inline __attribute__((always_inline)) void name##_nt(const void *const *rows, int nr, const float *x, \
                                                                const int NT, int64_t n, float *out,     \
                                                                int64_t stride, const void *const *pf) { \
        PI_ROWS_TOK_BODY(TYPE, LOAD, SCALAR, ESIZE, TMAX)                                                  \
    }                                                                                                      \
    static void name(const void *const *rows, int nr, const float *x, int nt, int64_t n, float *out,       \
                     int64_t stride, const void *const *pf) {                                              \
        for (int t = 0; t < nt; t += TMAX, pf = NULL) {                                                    \
            const int m = nt - t < TMAX ? nt - t : TMAX;                                                   \
            const float *xt = x + t * n;                                                                   \
            float *ot = out + t * stride;                                                                  \
            if (m == TMAX) name##_nt(rows, nr, xt, TMAX, n, ot, stride, pf);                               \
            else if (m == 1) name##_nt(rows, nr, xt, 1, n, ot, stride, pf);                                \
            else if (m == 2) name##_nt(rows, nr, xt, 2 < TMAX ? 2 : TMAX, n, ot, stride, pf);              \
            else name##_nt(rows, nr, xt, 3 < TMAX ? 3 : TMAX, n, ot, stride, pf);                          \
        }                                                                                                  \
    }

/* y[0:n] += sum_r a[r] * rows[r][0:n], rows summed in order r = 0, 1, .. nr - 1 into each element
 * (the same order as one row at a time), for nr <= PI_AXPY_ROWS; y is read and written once per call.
 * pf: npf rows to prefetch meanwhile (the next group's), or npf = 0. */
#define PI_AXPY_ROWS 8
typedef void (*pi_axpy_fn)(const void *const *rows, const float *a, int nr, float *y, int64_t n,
                           const void *const *pf, int npf);

/* One query head's attention over S cache rows (ops.c's attn_task, one (token, head) at a time):
 * out[0:d] = sum_r softmax_r(scale * q . k_r) v_r, with k_r = k + r * row_bytes (d elements of the
 * kernel slot's type, F32 or F16), v_r likewise; s: scratch of S floats. Where a variant has it
 * (NULL otherwise), for d a multiple of 16 up to PI_ATTN_MAX_D: the scores a vector's width of rows
 * at a time with one transposed reduction, a vectorised softmax, the weighted sum in registers.
 * Deterministic for given inputs: a token's result does not depend on the batch around it. */
#define PI_ATTN_MAX_D 256
typedef void (*pi_attn_head_fn)(const float *q, const uint8_t *k, const uint8_t *v, int64_t row_bytes, int64_t S,
                                int64_t d, float scale, float *s, float *out);
/* The same for ng <= PI_ATTN_GROUP query heads sharing one KV head (GQA, MQA): q and out hold the ng
 * heads' vectors d apart, s is scratch of ng * S floats; each head gets pi_attn_head_fn's bits, with
 * each K and V vector read once for all of them. Where a variant has it (NULL otherwise). */
#define PI_ATTN_GROUP 4
typedef void (*pi_attn_group_fn)(const float *q, int ng, const uint8_t *k, const uint8_t *v, int64_t row_bytes,
                                 int64_t S, int64_t d, float scale, float *s, float *out);

/* 2^f for f in [-0.5, 0.5] by a degree-6 polynomial (relative error ~2e-7): the attention kernels' exp,
 * in each variant's FMA and broadcast */
#define PI_EXP2_FRAC(FMA, SET1, f)                                                                          \
    FMA(FMA(FMA(FMA(FMA(FMA(SET1(1.5353362e-4f), f, SET1(1.3398874e-3f)), f, SET1(9.6181291e-3f)), f,        \
                    SET1(5.5504109e-2f)), f, SET1(2.4022651e-1f)), f, SET1(6.9314718e-1f)), f, SET1(1.0f))

/* The shared pieces of a variant's pi_attn_group_fn: the including file defines PI_V and PI_V_ZERO /
 * PI_V_FMA / PI_V_LOADA (aligned) / PI_V_SET1 / PI_V_STOREU, W, PI_V_HSUMW (lane j = the sum of vector j
 * of W, each by the same tree as alone) and load_f32_bytes / load_f16_bytes. RB rows of scores at a
 * time (W / RB heads at most), the weighted sum of V IBMAX vectors of d at a time; per (head, row) and
 * (head, column) the operations come in the per-head kernel's order. NG, M and IB are constants where
 * these are inlined. */
#define PI_ATTN_GROUP_PIECES(RB, IBMAX)                                                                     \
    static inline __attribute__((always_inline)) PI_V kv_load(const uint8_t *p, const int f16) {             \
        return f16 ? load_f16_bytes(p) : load_f32_bytes(p);                                                 \
    }                                                                                                       \
    /* lane RB g + r: head g's score of row r < M, rows row_bytes apart from k */                          \
    static inline __attribute__((always_inline)) PI_V group_scores(const float (*qs)[PI_ATTN_MAX_D],          \
                                                                   const uint8_t *k, int64_t row_bytes,      \
                                                                   int64_t nv, const int NG, const int M,    \
                                                                   const int f16) {                         \
        PI_V acc[W];                                                                                        \
        for (int j = 0; j < W; j++) acc[j] = PI_V_ZERO();                                                   \
        for (int64_t i = 0; i < nv; i++)                                                                    \
            for (int r = 0; r < M; r++) {                                                                   \
                const PI_V kv = kv_load(k + r * row_bytes + (f16 ? 2 : 4) * W * i, f16);                    \
                for (int g = 0; g < NG; g++)                                                                \
                    acc[RB * g + r] = PI_V_FMA(kv, PI_V_LOADA(qs[g] + W * i), acc[RB * g + r]);             \
            }                                                                                               \
        return PI_V_HSUMW(acc);                                                                             \
    }                                                                                                       \
    /* out[g][W i0 .. W (i0 + IB)) = sum_r p[g][r] v_r, rows in order */                                   \
    static inline __attribute__((always_inline)) void group_pv(const float *p, int64_t S, const uint8_t *v,   \
                                                               int64_t row_bytes, int64_t i0, const int IB,  \
                                                               const int NG, float *out, int64_t d,          \
                                                               const int f16) {                             \
        PI_V o[PI_ATTN_GROUP][IBMAX];                                                                       \
        for (int g = 0; g < NG; g++)                                                                        \
            for (int b = 0; b < IB; b++) o[g][b] = PI_V_ZERO();                                             \
        for (int64_t r = 0; r < S; r++) {                                                                   \
            const uint8_t *vr = v + r * row_bytes + (f16 ? 2 : 4) * W * i0;                                 \
            PI_V vv[IBMAX];                                                                                 \
            for (int b = 0; b < IB; b++) vv[b] = kv_load(vr + (f16 ? 2 : 4) * W * b, f16);                  \
            for (int g = 0; g < NG; g++) {                                                                  \
                const PI_V pr = PI_V_SET1(p[g * S + r]);                                                    \
                for (int b = 0; b < IB; b++) o[g][b] = PI_V_FMA(vv[b], pr, o[g][b]);                        \
            }                                                                                               \
        }                                                                                                   \
        for (int g = 0; g < NG; g++)                                                                        \
            for (int b = 0; b < IB; b++) PI_V_STOREU(out + g * d + W * (i0 + b), o[g][b]);                  \
    }

/* a pi_attn_group_fn `name` around the variant's attn_group_ng(q, NG, ..., f16), NG a constant */
#define PI_ATTN_GROUP_FN(name, F16)                                                                         \
    static void name(const float *q, int ng, const uint8_t *k, const uint8_t *v, int64_t row_bytes, int64_t S, \
                     int64_t d, float scale, float *s, float *out) {                                         \
        if (ng == 4) attn_group_ng(q, 4, k, v, row_bytes, S, d, scale, s, out, F16);                         \
        else if (ng == 3) attn_group_ng(q, 3, k, v, row_bytes, S, d, scale, s, out, F16);                    \
        else if (ng == 2) attn_group_ng(q, 2, k, v, row_bytes, S, d, scale, s, out, F16);                    \
        else attn_group_ng(q, 1, k, v, row_bytes, S, d, scale, s, out, F16);                                 \
    }
#define PI_ATTN_GROUP_FNS PI_ATTN_GROUP_FN(attn_group_f32, 0) PI_ATTN_GROUP_FN(attn_group_f16, 1)

/* the F32 and F16 pi_attn_head_fn of a variant, around its ATTN_HEAD_BODY(LOAD, ESIZE) and its
 * load_f32_bytes / load_f16_bytes */
#define PI_ATTN_HEAD_FNS                                                                                    \
    static void attn_head_f32(const float *q, const uint8_t *k, const uint8_t *v, int64_t row_bytes,       \
                              int64_t S, int64_t d, float scale, float *s, float *out) {                   \
        ATTN_HEAD_BODY(load_f32_bytes, 4)                                                                   \
    }                                                                                                       \
    static void attn_head_f16(const float *q, const uint8_t *k, const uint8_t *v, int64_t row_bytes,       \
                              int64_t S, int64_t d, float scale, float *s, float *out) {                   \
        ATTN_HEAD_BODY(load_f16_bytes, 2)                                                                   \
    }

/* out = row as F32 */
typedef void (*pi_to_f32_fn)(const void *row, float *out, int64_t n);
/* out[i] = half(x[i]) for i < n, rounded as pi_fp32_to_fp16 (F16C where the variant has it: the same bits) */
typedef void (*pi_to_f16_fn)(const float *x, uint16_t *out, int64_t n);

typedef struct pi_kernel_table {
    const char *name;
    pi_dot_fn dot[PI_T_COUNT];
    pi_dot4_fn dot4[PI_T_COUNT];
    pi_axpy_fn axpy[PI_T_COUNT];
    pi_to_f32_fn to_f32[PI_T_COUNT];
    pi_quantize_x_fn quantize_x;
    pi_dot_tok_fn dot_tok[PI_T_COUNT]; /* NULL: dot / dot4 token by token */
    pi_rows_tok_fn rows_tok[PI_T_COUNT]; /* NULL: dot / dot4 token by token */
    pi_attn_head_fn attn_head[PI_T_COUNT]; /* F32 / F16 KV caches; NULL: dot, softmax, axpy */
    pi_to_f16_fn f32_to_f16;              /* new rows of an F16 KV cache */
    pi_attn_group_fn attn_group[PI_T_COUNT]; /* F32 / F16 KV caches shared by query heads; NULL: head by head */
} pi_kernel_table;

/* fp16 -> fp32 for every half (256 KiB, ggml's table): the block scales of quantized rows are read
 * through it, cheaper than a scalar conversion per block. Filled by pi_kernels_init(), which ops.c
 * runs before the first kernel call. */
extern float pi_fp16_table[1 << 16];
void pi_kernels_init(void);

/* is this weight type multiplied with quantized activations (pi_xq)? */
static inline int pi_slot_is_quant(int slot) {
    return slot == PI_T_Q8_0 || slot == PI_T_Q4_0 || slot == PI_T_Q4_0X16;
}

/* Prefetch (into L2) the row pf as a kernel consumes its own row in consecutive steps of at most
 * 64 * LINES bytes: called once per step with the step's first byte, it prefetches LINES lines 64 bytes
 * apart, so the prefetch stream keeps pace with the reads and, step after step, covers every line of
 * the row. No loop over the span and no branch but the NULL test: the span loop this replaced cost
 * ~20% of the quantized dot products' throughput on rows in cache (Q4_0: 2.64 -> 2.18 cycles per block
 * and row, Zen 4). Prefetches past the row's end are harmless (they never fault). */
#define PI_PREFETCH_STEP(pf, lo, LINES)                                                   \
    do {                                                                                 \
        if (pf) {                                                                        \
            const char *pf_ = (const char *)(pf) + (lo);                                 \
            for (int l_ = 0; l_ < (LINES); l_++) __builtin_prefetch(pf_ + 64 * l_, 0, 2); \
        }                                                                                \
    } while (0)

/* the same for the npf rows pf[0 .. npf) of an axpy's next group */
#define PI_PREFETCH_ROWS(pf, npf, lo, LINES) \
    for (int r_ = 0; r_ < (npf); r_++) PI_PREFETCH_STEP((pf)[r_], lo, LINES)

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

/* One Q4_0X16 run (PI_BYTES_Q4_0X16 bytes) <-> its 16 Q4_0 blocks */
static inline void pi_x16_unpack_run(const uint8_t *run, pi_block_q4_0 *b) {
    for (int l = 0; l < 16; l++) {
        memcpy(&b[l].d, run + 2 * l, 2);
        for (int m = 0; m < 4; m++) memcpy(b[l].qs + 4 * m, run + 32 + 64 * m + 4 * l, 4);
    }
}
static inline void pi_x16_pack_run(const pi_block_q4_0 *b, uint8_t *run) {
    for (int l = 0; l < 16; l++) {
        memcpy(run + 2 * l, &b[l].d, 2);
        for (int m = 0; m < 4; m++) memcpy(run + 32 + 64 * m + 4 * l, b[l].qs + 4 * m, 4);
    }
}

/* the Q4_0 view of run c of a token's quantized activations */
static inline pi_xq pi_xq_run(const pi_xq *x, int64_t c) {
    return (pi_xq){x->qs + 512 * c, x->off + 128 * c, x->d + 16 * c, NULL, NULL};
}

/* The Q4_0X16 axpy and to_f32 of a variant: each run unpacked to Q4_0 blocks for the variant's own
 * Q4_0 kernel, so they give exactly the Q4_0 results (the same per-element operations). The layout is
 * only chosen for matrices that dot products read; these serve tests and odd callers. */
#define PI_Q4_0X16_AXPY_BY_RUNS(name, to_f32_name, axpy_q4_0)                                    \
    static void name(const void *const *rows, const float *a, int nr, float *y, int64_t n,      \
                     const void *const *pf, int npf) {                                          \
        (void)pf; (void)npf;                                                                    \
        pi_block_q4_0 b[PI_AXPY_ROWS][16];                                                      \
        const void *rp[PI_AXPY_ROWS];                                                           \
        for (int64_t c = 0; c < n / PI_COLS_Q4_0X16; c++) {                                     \
            for (int r = 0; r < nr; r++) {                                                      \
                pi_x16_unpack_run((const uint8_t *)rows[r] + PI_BYTES_Q4_0X16 * c, b[r]);       \
                rp[r] = b[r];                                                                   \
            }                                                                                   \
            axpy_q4_0(rp, a, nr, y + PI_COLS_Q4_0X16 * c, PI_COLS_Q4_0X16, NULL, 0);            \
        }                                                                                       \
    }                                                                                           \
    static void to_f32_name(const void *row, float *out, int64_t n) {                           \
        const float one = 1.0f;                                                                 \
        memset(out, 0, (size_t)n * 4);                                                          \
        name(&row, &one, 1, out, n, NULL, 0);                                                   \
    }

/* IEEE half -> float without F16C, exact for every input (subnormals, inf, nan) */
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
    case PI_TYPE_Q4_0X16: return PI_T_Q4_0X16;
    default: return -1;
    }
}

/* ---- thread pool (pool.c) ---- */
/* fn runs once per thread with tid in [0, nth); the caller is thread 0. Returns when all are done. */
typedef void (*pi_task_fn)(void *ctx, int tid, int nth);
void pi_pool_run(pi_task_fn fn, void *ctx, int nth);
int pi_pool_resolve_threads(int n_threads); /* 0 -> global default; clamps to [1, PI_MAX_THREADS] */

#endif
