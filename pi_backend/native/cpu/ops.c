/* ops.c — the CPU ops of pi_backend.h, written once against the per-ISA kernel table.
 *
 * Every entry point validates what it can see (matrix views against their buffers, every index, sizes
 * and their products) before touching memory, and returns an error code instead of reading out of
 * bounds. Work is split so that results do not depend on the thread count: rows are independent, and
 * the down projection splits the output columns, so each y element sums its neurons in list order.
 * Threads claim their work dynamically, so a thread that starts late (or not at all: pool.c) only
 * takes less. Q8_0 / Q4_0 rows are multiplied with the activations quantized once per call (pi_xq),
 * as llama.cpp does; the down projection adds float multiples of its rows. The kernels prefetch the
 * rows the op reads next, which is what makes scattered rows stream at close to DRAM bandwidth. */
#include "kernels.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------ ISA selection (once) */

static const pi_kernel_table *g_k = &pi_kernels_scalar;
static int g_isa = PI_ISA_SCALAR;
static pthread_once_t g_isa_once = PTHREAD_ONCE_INIT;

int pi_isa_supported(int isa) {
    switch (isa) {
    case PI_ISA_SCALAR: return 1;
#ifdef PI_HAVE_X86_KERNELS
    case PI_ISA_AVX2:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case PI_ISA_AVX512:
        __builtin_cpu_init();
        return pi_isa_supported(PI_ISA_AVX2) && __builtin_cpu_supports("avx512f") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512vnni");
#endif
    default: return 0;
    }
}

const char *pi_isa_name(int isa) {
    switch (isa) {
    case PI_ISA_SCALAR: return "scalar";
    case PI_ISA_AVX2: return "avx2";
    case PI_ISA_AVX512: return "avx512";
    default: return "unknown";
    }
}

static int set_isa_unchecked(int isa) {
    switch (isa) {
    case PI_ISA_SCALAR: g_k = &pi_kernels_scalar; break;
#ifdef PI_HAVE_X86_KERNELS
    case PI_ISA_AVX2: g_k = &pi_kernels_avx2; break;
    case PI_ISA_AVX512: g_k = &pi_kernels_avx512; break;
#endif
    default: return PI_ERR_ISA;
    }
    g_isa = isa;
    return PI_OK;
}

/* the best variant this CPU runs, capped by PI_BACKEND_ISA=scalar|avx2|avx512 (a lower one only) */
static void isa_init(void) {
    pi_kernels_init();
    int best = PI_ISA_SCALAR;
    for (int isa = PI_ISA_AVX512; isa > PI_ISA_SCALAR; isa--)
        if (pi_isa_supported(isa)) { best = isa; break; }
    const char *env = getenv("PI_BACKEND_ISA");
    if (env) {
        for (int isa = PI_ISA_SCALAR; isa <= PI_ISA_AVX512; isa++)
            if (strcmp(env, pi_isa_name(isa)) == 0 && isa < best) best = isa;
    }
    set_isa_unchecked(best);
    int threads = 0;
    const char *t = getenv("PI_BACKEND_THREADS");
    if (t && (threads = atoi(t)) > 0) pi_set_num_threads(threads);
}

static const pi_kernel_table *K(void) {
    pthread_once(&g_isa_once, isa_init);
    return g_k;
}

int pi_isa_active(void) {
    K();
    return g_isa;
}

int pi_set_isa(int isa) {
    K();
    if (!pi_isa_supported(isa)) return PI_ERR_ISA;
    return set_isa_unchecked(isa);
}

const char *pi_strerror(int code) {
    switch (code) {
    case PI_OK: return "ok";
    case PI_ERR_NULL: return "a required pointer is NULL";
    case PI_ERR_SHAPE: return "sizes disagree, are negative or overflow";
    case PI_ERR_TYPE: return "unsupported weight type or activation kind";
    case PI_ERR_INDEX: return "an index is outside [0, rows)";
    case PI_ERR_DUPLICATE: return "an index list that must be a set repeats an index";
    case PI_ERR_BOUNDS: return "a matrix view reaches past the end of its buffer";
    case PI_ERR_NOMEM: return "out of memory";
    case PI_ERR_ISA: return "instruction set not supported on this CPU or build";
    case PI_ERR_CAPACITY: return "output buffer too small";
    case PI_ERR_ALIGN: return "quantized row length is not a multiple of the block size";
    case PI_ERR_DEVICE: return "device call failed";
    default: return "unknown error";
    }
}

/* ------------------------------------------------------------------ validation */

int64_t pi_type_row_bytes(int32_t type, int64_t cols) {
    if (cols < 0 || cols > ((int64_t)1 << 40)) return PI_ERR_SHAPE;
    switch (type) {
    case PI_TYPE_F32: return cols * 4;
    case PI_TYPE_F16:
    case PI_TYPE_BF16: return cols * 2;
    case PI_TYPE_Q8_0: return cols % PI_QK8_0 ? PI_ERR_ALIGN : cols / PI_QK8_0 * PI_BLOCK_BYTES_Q8_0;
    case PI_TYPE_Q4_0: return cols % PI_QK4_0 ? PI_ERR_ALIGN : cols / PI_QK4_0 * PI_BLOCK_BYTES_Q4_0;
    case PI_TYPE_Q4_0X16: return cols % PI_COLS_Q4_0X16 ? PI_ERR_ALIGN : cols / PI_COLS_Q4_0X16 * PI_BYTES_Q4_0X16;
    default: return PI_ERR_TYPE;
    }
}

#define PI_MAX_DIM ((int64_t)1 << 40)

static int check_matrix(const pi_matrix *m) {
    if (!m || !m->data) return PI_ERR_NULL;
    if (pi_type_slot(m->type) < 0) return PI_ERR_TYPE;
    if (m->rows <= 0 || m->cols <= 0 || m->rows > PI_MAX_DIM || m->cols > PI_MAX_DIM || m->data_bytes < 0)
        return PI_ERR_SHAPE;
    int64_t rb = pi_type_row_bytes(m->type, m->cols);
    if (rb < 0) return (int)rb;
    if (m->row_stride < rb) return PI_ERR_SHAPE;
    /* (rows - 1) * stride + rb <= data_bytes, without overflow */
    if (rb > m->data_bytes) return PI_ERR_BOUNDS;
    if (m->rows - 1 > (m->data_bytes - rb) / m->row_stride) return PI_ERR_BOUNDS;
    return PI_OK;
}

int64_t pi_first_bad_index(const int32_t *idx, int64_t n, int64_t rows) {
    if (!idx) return n > 0 ? 0 : -1;
    for (int64_t k = 0; k < n; k++)
        if (idx[k] < 0 || (int64_t)idx[k] >= rows) return k;
    return -1;
}

static int check_indices(const int32_t *idx, int64_t n_idx, int64_t rows) {
    if (n_idx < 0 || n_idx > PI_MAX_DIM) return PI_ERR_SHAPE;
    if (n_idx > 0 && !idx) return PI_ERR_NULL;
    return pi_first_bad_index(idx, n_idx, rows) < 0 ? PI_OK : PI_ERR_INDEX;
}

static int check_unique(const int32_t *idx, int64_t n_idx, int64_t rows) {
    uint8_t *seen = calloc((size_t)(rows + 7) / 8, 1);
    if (!seen) return PI_ERR_NOMEM;
    int rc = PI_OK;
    for (int64_t k = 0; k < n_idx && rc == PI_OK; k++) {
        int32_t i = idx[k];
        if (seen[i >> 3] & (1u << (i & 7))) rc = PI_ERR_DUPLICATE;
        seen[i >> 3] |= (uint8_t)(1u << (i & 7));
    }
    free(seen);
    return rc;
}

/* a * b with overflow check, both >= 0 */
static int mul_ok(int64_t a, int64_t b, int64_t *out) {
    if (a < 0 || b < 0) return 0;
    if (a != 0 && b > INT64_MAX / a) return 0;
    *out = a * b;
    return 1;
}

static inline const uint8_t *row_ptr(const pi_matrix *m, int64_t r) {
    return (const uint8_t *)m->data + r * m->row_stride;
}

/* ------------------------------------------------------------------ shared pieces of the row ops */

/* Prefetch distance: a kernel reading row i prefetches row i + D as it goes, D rows being about this
 * many bytes. Scattered rows (2-8 KiB each at 10% density) then stream at close to the rate of one
 * long row: without it each row start waits for DRAM and the hardware prefetcher has to restart. */
#define PF_BYTES (16 * 1024)

static int64_t pf_rows_ahead(int64_t row_bytes) {
    int64_t d = (PF_BYTES + row_bytes - 1) / row_bytes;
    return d < 1 ? 1 : d > 64 ? 64 : d;
}

/* Dynamic work split in chunks, each thread claiming its next chunk one ahead, so that it knows which
 * rows it reads next and can prefetch across its chunk boundaries (not into rows another thread takes).
 * Fixed chunks (guide 0), or guided ones: each claim takes 1/guide of what is left, at least `chunk`
 * items, so long runs come first and the last ones are short: threads finish together. */
typedef struct {
    _Atomic int64_t *next;
    int64_t n, chunk, guide;
    int64_t cur, cur_end; /* current chunk [cur, cur_end) */
    int64_t nxt, nxt_end; /* the next chunk this thread claimed (nxt >= n: none) */
} chunk_iter;

static void chunks_claim(chunk_iter *it) {
    if (!it->guide) {
        it->nxt = atomic_fetch_add(it->next, it->chunk);
        it->nxt_end = it->nxt + it->chunk < it->n ? it->nxt + it->chunk : it->n;
        return;
    }
    int64_t s = atomic_load(it->next), len;
    do {
        if (s >= it->n) { it->nxt = it->nxt_end = s; return; }
        len = (it->n - s) / it->guide & ~(int64_t)3; /* groups of 4 rows stay whole */
        if (len < it->chunk) len = it->chunk;
    } while (!atomic_compare_exchange_weak(it->next, &s, s + len));
    it->nxt = s;
    it->nxt_end = s + len < it->n ? s + len : it->n;
}

static void chunks_start(chunk_iter *it, _Atomic int64_t *next, int64_t n, int64_t chunk, int64_t guide) {
    it->next = next;
    it->n = n;
    it->chunk = chunk;
    it->guide = guide;
    it->cur_end = 0;
    chunks_claim(it);
}

/* the next chunk [*r0, *r1) of this thread; 0 when the work is done */
static int chunks_next(chunk_iter *it, int64_t *r0, int64_t *r1) {
    it->cur = it->nxt;
    if (it->cur >= it->n) return 0;
    it->cur_end = it->nxt_end;
    chunks_claim(it);
    *r0 = it->cur;
    *r1 = it->cur_end;
    return 1;
}

/* the item d places after r (in the current chunk) in this thread's sequence, or -1 */
static int64_t chunks_ahead(const chunk_iter *it, int64_t r, int64_t d) {
    int64_t t = r + d;
    if (t < it->cur_end) return t;
    if (it->nxt >= it->n) return -1;
    t = it->nxt + (t - it->cur_end);
    return t < it->nxt_end ? t : -1;
}

/* Activations of every token quantized once per call for Q8_0 / Q4_0 rows (pi_xq) */
typedef struct {
    void *mem;
    pi_xq *tok; /* [n_tok] */
} xq_buf;

static int xq_prepare(const pi_kernel_table *k, const float *x, int64_t n_tok, int64_t cols, int regroup,
                      xq_buf *out) {
    out->mem = NULL;
    out->tok = NULL;
    /* per token: qs [cols] int8, off [cols / 4] int32, d [cols / 32] float, and for Q4_0X16 rows
     * (regroup) qs16 [cols] int8 and bsum [cols / 32] int32, each 64-byte aligned */
    const size_t qs_b = ((size_t)cols + 63) & ~(size_t)63, off_b = qs_b, d_b = ((size_t)cols / 8 + 63) & ~(size_t)63;
    const size_t per = qs_b + off_b + d_b + (regroup ? qs_b + d_b : 0);
    if ((uint64_t)n_tok > SIZE_MAX / per / 2) return PI_ERR_NOMEM;
    out->mem = aligned_alloc(64, per * (size_t)n_tok);
    out->tok = malloc((size_t)n_tok * sizeof(pi_xq));
    if (!out->mem || !out->tok) {
        free(out->mem); free(out->tok);
        out->mem = NULL; out->tok = NULL;
        return PI_ERR_NOMEM;
    }
    for (int64_t t = 0; t < n_tok; t++) {
        uint8_t *base = (uint8_t *)out->mem + (size_t)t * per;
        int8_t *qs = (int8_t *)base;
        int32_t *off = (int32_t *)(base + qs_b);
        float *d = (float *)(base + qs_b + off_b);
        k->quantize_x(x + t * cols, cols, qs, off, d);
        out->tok[t] = (pi_xq){qs, off, d, NULL, NULL};
        if (regroup) {
            int8_t *qs16 = (int8_t *)(base + qs_b + off_b + d_b);
            int32_t *bsum = (int32_t *)(base + 2 * qs_b + off_b + d_b);
            pi_xq_regroup(qs, cols, qs16, bsum);
            out->tok[t].qs16 = qs16;
            out->tok[t].bsum = bsum;
        }
    }
    return PI_OK;
}

/* x as float rows read by the float kernels, 64-byte aligned: numpy's buffers sit 16 bytes past a
 * line, and a 512-bit load across two lines costs two (prefill's F16 GEMM here: 48.8 -> 36.9 ms with x
 * aligned). A misaligned x is copied (n_tok * cols floats, next to a matrix's worth of FMAs); *owned is
 * what to free. */
static const float *x_aligned(const float *x, int64_t n_tok, int64_t cols, float **owned) {
    *owned = NULL;
    if (!((uintptr_t)x & 63)) return x;
    int64_t count;
    if (!mul_ok(n_tok, cols, &count) || (uint64_t)count > (SIZE_MAX - 63) / sizeof(float)) return NULL;
    *owned = aligned_alloc(64, ((size_t)count * sizeof(float) + 63) & ~(size_t)63);
    if (!*owned) return NULL;
    memcpy(*owned, x, (size_t)count * sizeof(float));
    return *owned;
}

static void xq_free(xq_buf *b) {
    free(b->mem);
    free(b->tok);
}

/* ------------------------------------------------------------------ rows x tokens (gemm, sparse rows) */

typedef struct {
    const pi_kernel_table *k;
    const pi_matrix *W;
    const int32_t *idx;  /* NULL: all rows */
    int64_t n_out;       /* rows computed (W.rows or n_idx) */
    const float *x;
    const pi_xq *xq;     /* [n_tok] for quantized weight types, else NULL */
    int64_t n_tok;
    float *y;            /* [n_tok, n_out] */
    int64_t chunk;       /* rows claimed at a time (the least, when guided) */
    int64_t guide;       /* 0: fixed chunks; else guided (chunks_claim) */
    _Atomic int64_t next;
    _Atomic int err;
} rows_ctx;

#define ROWS_CHUNK 16

static void rows_task(void *p, int tid, int nth) {
    (void)tid; (void)nth;
    rows_ctx *c = (rows_ctx *)p;
    const int slot = pi_type_slot(c->W->type);
    if (slot < 0) return; /* unreachable: check_matrix refused the type */
    const int64_t cols = c->W->cols, T = c->n_tok;
    const int64_t ahead = pf_rows_ahead(pi_type_row_bytes(c->W->type, cols));
    const pi_dot_fn dot = c->k->dot[slot];
    const pi_dot4_fn dot4 = c->k->dot4[slot];
    const pi_dot_tok_fn dot_tok = T > 1 ? c->k->dot_tok[slot] : NULL;
    const pi_rows_tok_fn rows_tok = T > 1 ? c->k->rows_tok[slot] : NULL;
#define ROW(r) row_ptr(c->W, c->idx ? c->idx[r] : (r))
#define AHEAD(r) (t == 0 ? chunks_ahead(&it, (r), ahead) : -1)
    chunk_iter it;
    chunks_start(&it, &c->next, c->n_out, c->chunk, c->guide);
    int64_t r0, r1;
    while (chunks_next(&it, &r0, &r1)) {
        if (rows_tok) { /* float rows, several tokens: groups of rows that stay in L2 while every
                         * group of tokens takes them, each weight vector converted once per group */
            for (int64_t g0 = r0; g0 < r1; g0 += PI_ROWS_TOK_MAX) {
                const int nr = (int)(r1 - g0 < PI_ROWS_TOK_MAX ? r1 - g0 : PI_ROWS_TOK_MAX);
                const void *rows[PI_ROWS_TOK_MAX], *pf[PI_ROWS_TOK_MAX];
                for (int j = 0; j < nr; j++) {
                    const int64_t ra = chunks_ahead(&it, g0 + j, ahead);
                    rows[j] = ROW(g0 + j);
                    pf[j] = ra >= 0 ? ROW(ra) : NULL;
                }
                for (int64_t t = 0; t < T; t += PI_DOT_TOK_MAX) {
                    const int nt = (int)(T - t < PI_DOT_TOK_MAX ? T - t : PI_DOT_TOK_MAX);
                    rows_tok(rows, nr, c->x + t * cols, nt, cols, c->y + t * c->n_out + g0, c->n_out, t == 0 ? pf : NULL);
                }
            }
            continue;
        }
        if (dot_tok) { /* several tokens per row: each weight byte unpacked once for all of them */
            for (int64_t t = 0; t < T; t += PI_DOT_TOK_MAX) {
                const int nt = (int)(T - t < PI_DOT_TOK_MAX ? T - t : PI_DOT_TOK_MAX);
                for (int64_t r = r0; r < r1; r++) {
                    const int64_t ra = AHEAD(r);
                    dot_tok(ROW(r), c->xq + t, nt, cols, c->y + t * c->n_out + r, c->n_out, ra >= 0 ? ROW(ra) : NULL);
                }
            }
            continue;
        }
        /* token by token over the chunk: its rows come from DRAM once (prefetched on the first pass)
         * and stay in cache for the other tokens, whose activations are read once per chunk. Rows go
         * four at a time (dot4: the same results as one at a time). */
        for (int64_t t = 0; t < T; t++) {
            const void *xt = c->xq ? (const void *)&c->xq[t] : (const void *)(c->x + t * cols);
            float *yt = c->y + t * c->n_out;
            int64_t r = r0;
            for (; r + 4 <= r1; r += 4) {
                const void *rows[4], *pf[4];
                for (int j = 0; j < 4; j++) {
                    const int64_t ra = AHEAD(r + j);
                    rows[j] = ROW(r + j);
                    pf[j] = ra >= 0 ? ROW(ra) : NULL;
                }
                dot4(rows, xt, cols, yt + r, pf);
            }
            for (; r < r1; r++) {
                const int64_t ra = AHEAD(r);
                yt[r] = dot(ROW(r), xt, cols, ra >= 0 ? ROW(ra) : NULL);
            }
        }
    }
#undef AHEAD
#undef ROW
}

static int run_rows(const pi_matrix *W, const int32_t *idx, int64_t n_out, const float *x, int64_t n_tok,
                    float *y, int n_threads) {
    if (n_out == 0) return PI_OK;
    const pi_kernel_table *k = K();
    xq_buf xq = {NULL, NULL};
    float *x_owned = NULL;
    if (pi_slot_is_quant(pi_type_slot(W->type))) {
        int rc = xq_prepare(k, x, n_tok, W->cols, W->type == PI_TYPE_Q4_0X16, &xq);
        if (rc) return rc;
    } else if (!(x = x_aligned(x, n_tok, W->cols, &x_owned))) {
        return PI_ERR_NOMEM;
    }
    int nth = pi_pool_resolve_threads(n_threads);
    /* A dense matrix is split in long contiguous runs, guided: each thread streams a long run first
     * (the hardware prefetcher stays locked on) and the runs shrink towards the end, so the threads
     * finish within a short chunk of each other. Scattered rows keep short fixed chunks: their
     * prefetch comes from the index list. */
    const int64_t guide = idx ? 0 : 2 * nth;
    rows_ctx c = {k, W, idx, n_out, x, xq.tok, n_tok, y, ROWS_CHUNK, guide, 0, PI_OK};
    int64_t chunks = (n_out + ROWS_CHUNK - 1) / ROWS_CHUNK;
    if (nth > chunks) nth = (int)chunks;
    pi_pool_run(rows_task, &c, nth);
    xq_free(&xq);
    free(x_owned);
    return atomic_load(&c.err);
}

static int check_tokens(const float *x, int64_t n_tok, const float *y) {
    if (!x || !y) return PI_ERR_NULL;
    if (n_tok <= 0 || n_tok > PI_MAX_DIM) return PI_ERR_SHAPE;
    return PI_OK;
}

int pi_gemm(const pi_matrix *W, const float *x, int64_t n_tok, float *y, int n_threads) {
    int rc = check_matrix(W);
    if (rc) return rc;
    if ((rc = check_tokens(x, n_tok, y))) return rc;
    int64_t tmp;
    if (!mul_ok(n_tok, W->rows, &tmp) || !mul_ok(n_tok, W->cols, &tmp)) return PI_ERR_SHAPE;
    return run_rows(W, NULL, W->rows, x, n_tok, y, n_threads);
}

int pi_sparse_gemm_rows(const pi_matrix *W, const int32_t *idx, int64_t n_idx, const float *x, int64_t n_tok,
                        float *y, int n_threads) {
    int rc = check_matrix(W);
    if (rc) return rc;
    if ((rc = check_tokens(x, n_tok, y))) return rc;
    if ((rc = check_indices(idx, n_idx, W->rows))) return rc;
    int64_t tmp;
    if (!mul_ok(n_tok, n_idx, &tmp) || !mul_ok(n_tok, W->cols, &tmp)) return PI_ERR_SHAPE;
    return run_rows(W, idx, n_idx, x, n_tok, y, n_threads);
}

int pi_dequantize_rows(const pi_matrix *W, const int32_t *idx, int64_t n_idx, float *out) {
    int rc = check_matrix(W);
    if (rc) return rc;
    if (!out) return PI_ERR_NULL;
    if (idx) {
        if ((rc = check_indices(idx, n_idx, W->rows))) return rc;
    } else if (n_idx < 0 || n_idx > W->rows) {
        return PI_ERR_SHAPE;
    }
    const pi_kernel_table *k = K();
    int slot = pi_type_slot(W->type);
    for (int64_t r = 0; r < n_idx; r++)
        k->to_f32[slot](row_ptr(W, idx ? idx[r] : r), out + r * W->cols, W->cols);
    return PI_OK;
}

/* ------------------------------------------------------------------ layout conversion */

typedef struct {
    const pi_matrix *src;
    int32_t dst_type;
    uint8_t *dst;
    int64_t dst_row_bytes;
    _Atomic int64_t next;
} convert_ctx;

static void convert_task(void *p, int tid, int nth) {
    (void)tid; (void)nth;
    convert_ctx *c = (convert_ctx *)p;
    const int64_t runs = c->src->cols / PI_COLS_Q4_0X16, rb = c->dst_row_bytes;
    uint8_t run[PI_BYTES_Q4_0X16]; /* a run occupies the same bytes in both layouts: converting through
                                    * a copy of it lets dst be src itself */
    pi_block_q4_0 b[16];
    for (;;) {
        const int64_t r0 = atomic_fetch_add(&c->next, 64);
        if (r0 >= c->src->rows) break;
        const int64_t r1 = r0 + 64 < c->src->rows ? r0 + 64 : c->src->rows;
        for (int64_t r = r0; r < r1; r++) {
            const uint8_t *s = row_ptr(c->src, r);
            uint8_t *d = c->dst + r * rb;
            if (c->src->type == c->dst_type) {
                memmove(d, s, (size_t)rb);
                continue;
            }
            for (int64_t k = 0; k < runs; k++) {
                memcpy(run, s + PI_BYTES_Q4_0X16 * k, sizeof run);
                if (c->dst_type == PI_TYPE_Q4_0X16) {
                    pi_x16_pack_run((const pi_block_q4_0 *)run, d + PI_BYTES_Q4_0X16 * k);
                } else {
                    pi_x16_unpack_run(run, b);
                    memcpy(d + PI_BYTES_Q4_0X16 * k, b, sizeof b);
                }
            }
        }
    }
}

int pi_convert_rows(const pi_matrix *src, int32_t dst_type, void *dst, int64_t dst_bytes, int n_threads) {
    int rc = check_matrix(src);
    if (rc) return rc;
    if (!dst) return PI_ERR_NULL;
    const int q4 = src->type == PI_TYPE_Q4_0 || src->type == PI_TYPE_Q4_0X16;
    if (dst_type != src->type && !(q4 && (dst_type == PI_TYPE_Q4_0 || dst_type == PI_TYPE_Q4_0X16))) return PI_ERR_TYPE;
    const int64_t rb = pi_type_row_bytes(dst_type, src->cols);
    if (rb < 0) return (int)rb;
    int64_t need;
    if (!mul_ok(src->rows, rb, &need)) return PI_ERR_SHAPE;
    if (dst_bytes < need) return PI_ERR_CAPACITY;
    convert_ctx c = {src, dst_type, (uint8_t *)dst, rb, 0};
    int nth = pi_pool_resolve_threads(n_threads);
    if (nth > (src->rows + 63) / 64) nth = (int)((src->rows + 63) / 64);
    pi_pool_run(convert_task, &c, nth);
    return PI_OK;
}

/* ------------------------------------------------------------------ sparse AXPY (down projection) */

typedef struct {
    const pi_kernel_table *k;
    const pi_matrix *Wt;
    const uint8_t *const *rows; /* [n_rows] the rows with a nonzero weight for some token, in list order */
    const int64_t *pos;         /* [n_rows] their position k in the index list (column of h) */
    int64_t n_rows;
    const float *h;  /* [n_tok, h_stride], entry k of token t at h[t * h_stride + k] */
    int64_t h_stride;
    int64_t n_tok;
    float *y;        /* [n_tok, cols] */
    int64_t unit;    /* column split granularity (block size for quantized types) */
    int64_t n_ranges;
    _Atomic int64_t next; /* next column range to claim */
} axpy_ctx;

#define G PI_AXPY_ROWS

/* y[:, c0:c0+len] += the rows' segments: G rows per kernel call (y read and written once per group),
 * the segments PF_BYTES ahead prefetched meanwhile. Every y element sums its rows in list order. */
static void axpy_range(axpy_ctx *c, int64_t c0, int64_t len) {
    const int64_t cols = c->Wt->cols;
    const int64_t off = pi_type_row_bytes(c->Wt->type, c0); /* c0 is block aligned */
    const int64_t seg_bytes = pi_type_row_bytes(c->Wt->type, len);
    const int64_t gahead = 1 + PF_BYTES / (G * seg_bytes + 1); /* groups ahead to prefetch, >= 1 */
    const pi_axpy_fn axpy = c->k->axpy[pi_type_slot(c->Wt->type)];
    const void *grp[G], *pf[G];
    float a[G];
    for (int64_t g0 = 0; g0 < c->n_rows; g0 += G) {
        const int ng = (int)(c->n_rows - g0 < G ? c->n_rows - g0 : G);
        const int64_t p0 = g0 + gahead * G;
        const int npf = p0 >= c->n_rows ? 0 : (int)(c->n_rows - p0 < G ? c->n_rows - p0 : G);
        for (int j = 0; j < npf; j++) pf[j] = c->rows[p0 + j] + off;
        /* token by token: the group's segments come from DRAM once (prefetched on the first pass) and
         * stay in cache for the other tokens; a token skips the rows where its weight is zero */
        for (int64_t t = 0; t < c->n_tok; t++) {
            int n = 0;
            for (int j = 0; j < ng; j++) {
                const float at = c->h[t * c->h_stride + c->pos[g0 + j]];
                if (at != 0.0f) { grp[n] = c->rows[g0 + j] + off; a[n++] = at; }
            }
            if (n) axpy(grp, a, n, c->y + t * cols + c0, len, t == 0 ? pf : NULL, t == 0 ? npf : 0);
        }
    }
}

/* Threads claim ranges of output columns (n_ranges of them, about equal) until none is left */
static void axpy_task(void *p, int tid, int nth) {
    (void)tid; (void)nth;
    axpy_ctx *c = (axpy_ctx *)p;
    const int64_t cols = c->Wt->cols, units = cols / c->unit, R = c->n_ranges;
    for (;;) {
        const int64_t r = atomic_fetch_add(&c->next, 1);
        if (r >= R) break;
        const int64_t c0 = units * r / R * c->unit;
        const int64_t c1 = r == R - 1 ? cols : units * (r + 1) / R * c->unit;
        if (c1 > c0) axpy_range(c, c0, c1 - c0);
    }
}
#undef G

static int run_axpy(const pi_matrix *Wt, const int32_t *idx, int64_t n_idx, const float *h, int64_t h_stride,
                    int64_t n_tok, float *y, int n_threads) {
    if (n_idx == 0) return PI_OK;
    /* the rows some token needs (a zero weight is skipped: its row is never read) */
    const uint8_t **rows = malloc((size_t)n_idx * sizeof(*rows));
    int64_t *pos = malloc((size_t)n_idx * sizeof(*pos));
    if (!rows || !pos) { free(rows); free(pos); return PI_ERR_NOMEM; }
    int64_t n_rows = 0;
    for (int64_t k = 0; k < n_idx; k++) {
        int any = 0;
        for (int64_t t = 0; t < n_tok && !any; t++) any = h[t * h_stride + k] != 0.0f;
        if (!any) continue;
        rows[n_rows] = row_ptr(Wt, idx[k]);
        pos[n_rows++] = k;
    }
    int64_t unit = Wt->type == PI_TYPE_Q8_0 || Wt->type == PI_TYPE_Q4_0 ? 32 : 16;
    if (Wt->cols % unit) unit = Wt->type == PI_TYPE_Q8_0 || Wt->type == PI_TYPE_Q4_0 ? 32 : 1;
    if (Wt->type == PI_TYPE_Q4_0X16) unit = PI_COLS_Q4_0X16; /* ranges of whole runs */
    int nth = pi_pool_resolve_threads(n_threads);
    /* below ~256 columns a thread's share is too small to pay for the dispatch */
    int64_t max_nth = Wt->cols / 256 > 0 ? Wt->cols / 256 : 1;
    if (nth > max_nth) nth = (int)max_nth;
    if (nth > Wt->cols / unit) nth = (int)(Wt->cols / unit);
    /* one column range per thread: the longest runs of each row, so the fewest DRAM pages opened */
    axpy_ctx c = {K(), Wt, rows, pos, n_rows, h, h_stride, n_tok, y, unit, nth, 0};
    if (n_rows > 0) pi_pool_run(axpy_task, &c, nth);
    free(rows);
    free(pos);
    return PI_OK;
}

int pi_sparse_axpy_rows(const pi_matrix *Wt, const int32_t *idx, int64_t n_idx, const float *h, int64_t n_tok,
                        float *y, int n_threads) {
    int rc = check_matrix(Wt);
    if (rc) return rc;
    if (!y || (n_idx > 0 && !h)) return PI_ERR_NULL;
    if (n_tok <= 0 || n_tok > PI_MAX_DIM) return PI_ERR_SHAPE;
    if ((rc = check_indices(idx, n_idx, Wt->rows))) return rc;
    int64_t tmp;
    if (!mul_ok(n_tok, n_idx, &tmp) || !mul_ok(n_tok, Wt->cols, &tmp)) return PI_ERR_SHAPE;
    return run_axpy(Wt, idx, n_idx, h, n_idx, n_tok, y, n_threads);
}

/* ------------------------------------------------------------------ fused sparse FFN */

static inline float act_gate(int32_t act, float g) {
    switch (act) {
    case PI_ACT_SWIGLU: return g / (1.0f + expf(-g));
    case PI_ACT_GEGLU:
    case PI_ACT_GELU: return 0.5f * g * (1.0f + tanhf(0.7978845608f * (g + 0.044715f * g * g * g)));
    default: return g > 0.0f ? g : 0.0f; /* ReGLU, dReLU, ReLU */
    }
}

typedef struct {
    const pi_kernel_table *k;
    const pi_matrix *m;       /* the matrix this phase reads: gate (or up, ungated), then up */
    int32_t act;
    const int32_t *idx;       /* [n_idx] the listed neurons */
    int64_t n_idx;
    const int64_t *pos;       /* phase 2: [n_rows] positions in idx of the neurons that fired; phase 1: NULL */
    int64_t n_rows;           /* rows this phase reads: n_idx, or the fired ones */
    const float *x;
    const pi_xq *xq;          /* [n_tok] if the matrix is quantized, else NULL */
    int64_t n_tok;
    float skip_threshold;
    float *h;                 /* [n_tok, n_idx] */
    uint8_t *keep;            /* [n_idx]: some token's h is nonzero */
    const uint8_t *tok_mask;  /* NULL, or [n_tok, n_idx]: the tokens that take each listed neuron */
    _Atomic int64_t next;
} ffn_ctx;

#define FFN_CHUNK 16
#define PI_FFN_GROUP_TOKENS 16 /* tokens per slice of a row group (stack buffers) */

/* out[t * stride + j] = rows[j] . x[t] for the n (<= 4) rows of one group (matrix slot s), for tokens
 * with want[t * stride + j] != 0 (want NULL: every token). The rows come from DRAM once, prefetching pf
 * on the way, and from cache for the other tokens. Four rows that every token needs go through dot4. */
static void ffn_group_dots(const ffn_ctx *c, int s, const void *const *rows, const void *const *pf, int n,
                           const float *want, float *out, int64_t stride) {
    const int64_t cols = c->m->cols;
    const pi_dot_tok_fn dot_tok = c->k->dot_tok[s];
    if (dot_tok && c->n_tok > 1) {
        /* several tokens per row (the same bits), for the rows at least half the tokens want; the
         * others token by token (a neuron's up row is wanted only where its gate fired) */
        for (int j = 0; j < n; j++) {
            int64_t wanted = c->n_tok;
            if (want) {
                wanted = 0;
                for (int64_t t = 0; t < c->n_tok; t++) wanted += want[t * stride + j] != 0.0f;
            }
            const void *pfj = pf ? pf[j] : NULL;
            if (2 * wanted >= c->n_tok) {
                for (int64_t t = 0; t < c->n_tok; t += PI_DOT_TOK_MAX) {
                    const int nt = (int)(c->n_tok - t < PI_DOT_TOK_MAX ? c->n_tok - t : PI_DOT_TOK_MAX);
                    dot_tok(rows[j], c->xq + t, nt, cols, out + t * stride + j, stride, t == 0 ? pfj : NULL);
                }
                continue;
            }
            for (int64_t t = 0; t < c->n_tok; t++, pfj = NULL)
                if (want[t * stride + j] != 0.0f) out[t * stride + j] = c->k->dot[s](rows[j], &c->xq[t], cols, pfj);
        }
        return;
    }
    for (int64_t t = 0; t < c->n_tok; t++) {
        const void *xt = pi_slot_is_quant(s) ? (const void *)&c->xq[t] : (const void *)(c->x + t * cols);
        const void *const *pft = t == 0 ? pf : NULL;
        int all = n == 4;
        for (int j = 0; j < n && all && want; j++) all = want[t * stride + j] != 0.0f;
        if (all) {
            float o[4];
            c->k->dot4[s](rows, xt, cols, o, pft);
            for (int j = 0; j < 4; j++) out[t * stride + j] = o[j];
            continue;
        }
        for (int j = 0; j < n; j++)
            if (!want || want[t * stride + j] != 0.0f) out[t * stride + j] = c->k->dot[s](rows[j], xt, cols, pft ? pft[j] : NULL);
    }
}

/* Both phases walk their rows in chunks, four rows at a time, prefetching the rows `ahead` places on.
 * Phase 1 (pos NULL): gate . x for every listed neuron and token, through the activation and the skip
 * cut, into h; keep[k] says whether it fired for some token. Phase 2 (gated FFNs): up . x for the
 * neurons that fired, only for the tokens they fired for, multiplied into h. Splitting the two lets the
 * up rows, known only once the gate has fired, stream with a prefetch ahead like the gate rows do. */
static void ffn_phase_task(void *p, int tid, int nth) {
    (void)tid; (void)nth;
    ffn_ctx *c = (ffn_ctx *)p;
    const int64_t T = c->n_tok, n_idx = c->n_idx;
    const int s = pi_type_slot(c->m->type);
    const int64_t ahead = pf_rows_ahead(pi_type_row_bytes(c->m->type, c->m->cols));
#define NEURON(r) (c->pos ? c->idx[c->pos[r]] : c->idx[r])
#define POS(r) (c->pos ? c->pos[r] : (r))
    chunk_iter it;
    chunks_start(&it, &c->next, c->n_rows, FFN_CHUNK, 0);
    int64_t r0, r1;
    while (chunks_next(&it, &r0, &r1)) {
        for (int64_t g = r0; g < r1; g += 4) {
            const int n = (int)(r1 - g < 4 ? r1 - g : 4);
            const void *rows[4], *pf[4];
            float v[4 * PI_FFN_GROUP_TOKENS], want[4 * PI_FFN_GROUP_TOKENS];
            for (int j = 0; j < n; j++) {
                const int64_t ra = chunks_ahead(&it, g + j, ahead);
                rows[j] = row_ptr(c->m, NEURON(g + j));
                pf[j] = ra >= 0 ? row_ptr(c->m, NEURON(ra)) : NULL;
            }
            /* tokens in slices that fit the stack buffers (a batch of any size) */
            for (int64_t t0 = 0; t0 < T; t0 += PI_FFN_GROUP_TOKENS) {
                const int64_t nt = T - t0 < PI_FFN_GROUP_TOKENS ? T - t0 : PI_FFN_GROUP_TOKENS;
                ffn_ctx sub = *c; /* the same phase over tokens t0 .. t0 + nt (x / xq offset) */
                sub.n_tok = nt;
                sub.x = c->x + t0 * c->m->cols;
                sub.xq = c->xq ? c->xq + t0 : NULL;
                if (c->pos) /* phase 2 computes up where the gate fired: h nonzero */
                    for (int64_t t = 0; t < nt; t++)
                        for (int j = 0; j < n; j++) want[t * 4 + j] = c->h[(t0 + t) * n_idx + POS(g + j)];
                else if (c->tok_mask) /* phase 1: the gate for the tokens that take the neuron */
                    for (int64_t t = 0; t < nt; t++)
                        for (int j = 0; j < n; j++) want[t * 4 + j] = c->tok_mask[(t0 + t) * n_idx + POS(g + j)];
                ffn_group_dots(&sub, s, rows, t0 == 0 ? pf : NULL, n, c->pos || c->tok_mask ? want : NULL, v, 4);
                for (int j = 0; j < n; j++) {
                    const int64_t k = POS(g + j);
                    for (int64_t t = 0; t < nt; t++) {
                        float *hk = &c->h[(t0 + t) * n_idx + k];
                        if (!c->pos) { /* phase 1: the activation, cut (0 for a token not taking it) */
                            const float a = c->tok_mask && !c->tok_mask[(t0 + t) * n_idx + k] ? 0.0f
                                                                                           : act_gate(c->act, v[t * 4 + j]);
                            *hk = fabsf(a) <= c->skip_threshold ? 0.0f : a;
                        } else if (*hk != 0.0f) { /* phase 2: times up */
                            const float u = v[t * 4 + j];
                            *hk *= c->act == PI_ACT_DRELU ? (u > 0.0f ? u : 0.0f) : u;
                        }
                    }
                }
            }
            for (int j = 0; j < n; j++) {
                const int64_t k = POS(g + j);
                int nonzero = 0;
                for (int64_t t = 0; t < T && !nonzero; t++) nonzero = c->h[t * n_idx + k] != 0.0f;
                c->keep[k] = (uint8_t)nonzero;
            }
        }
    }
#undef POS
#undef NEURON
}

static void ffn_run_phase(ffn_ctx *c, const pi_matrix *m, const int64_t *pos, int64_t n_rows, int nth) {
    if (n_rows == 0) return;
    c->m = m;
    c->pos = pos;
    c->n_rows = n_rows;
    atomic_store(&c->next, 0);
    const int64_t chunks = (n_rows + FFN_CHUNK - 1) / FFN_CHUNK;
    pi_pool_run(ffn_phase_task, c, nth > chunks ? (int)chunks : nth);
}

int pi_sparse_ffn(const pi_matrix *gate, const pi_matrix *up, const pi_matrix *down_t, int32_t act,
                  const int32_t *idx, int64_t n_idx, const uint8_t *tok_mask, const float *x, int64_t n_tok,
                  float *y, int32_t accumulate, float skip_threshold, int64_t *n_skipped, int n_threads) {
    int rc;
    if (act < PI_ACT_REGLU || act > PI_ACT_GELU) return PI_ERR_TYPE;
    const int gated = act != PI_ACT_RELU && act != PI_ACT_GELU;
    if ((rc = check_matrix(up)) || (rc = check_matrix(down_t))) return rc;
    if (gated && (rc = check_matrix(gate))) return rc;
    if ((rc = check_tokens(x, n_tok, y))) return rc;
    const int64_t n_ff = up->rows, n_embd = up->cols;
    if (down_t->rows != n_ff || down_t->cols != n_embd) return PI_ERR_SHAPE;
    if (gated && (gate->rows != n_ff || gate->cols != n_embd)) return PI_ERR_SHAPE;
    if (!(skip_threshold >= 0.0f)) return PI_ERR_SHAPE; /* also refuses NaN */
    if ((rc = check_indices(idx, n_idx, n_ff))) return rc;
    if ((rc = check_unique(idx, n_idx, n_ff))) return rc;
    int64_t hsize, ysize;
    if (!mul_ok(n_tok, n_embd, &ysize) || !mul_ok(n_tok, n_idx, &hsize)) return PI_ERR_SHAPE;

    if (!accumulate) memset(y, 0, (size_t)ysize * sizeof(float));
    if (n_skipped) *n_skipped = n_idx;
    if (n_idx == 0) return PI_OK;

    const pi_kernel_table *k = K();
    float *h = malloc((size_t)hsize * sizeof(float));
    uint8_t *keep = malloc((size_t)n_idx);
    int64_t *fired = malloc((size_t)n_idx * sizeof(int64_t));
    int32_t *kidx = malloc((size_t)n_idx * sizeof(int32_t));
    float *kh = malloc((size_t)hsize * sizeof(float));
    xq_buf xq = {NULL, NULL};
    float *x_owned = NULL;
    if (!h || !keep || !fired || !kidx || !kh) { rc = PI_ERR_NOMEM; goto done; }
    if (pi_slot_is_quant(pi_type_slot(up->type)) || (gated && pi_slot_is_quant(pi_type_slot(gate->type))))
        if ((rc = xq_prepare(k, x, n_tok, n_embd,
                             up->type == PI_TYPE_Q4_0X16 || (gated && gate->type == PI_TYPE_Q4_0X16), &xq)))
            goto done;

    if (!pi_slot_is_quant(pi_type_slot(up->type)) || (gated && !pi_slot_is_quant(pi_type_slot(gate->type))))
        if (!(x = x_aligned(x, n_tok, n_embd, &x_owned))) { rc = PI_ERR_NOMEM; goto done; }

    ffn_ctx c = {k, NULL, act, idx, n_idx, NULL, 0, x, xq.tok, n_tok, skip_threshold, h, keep, tok_mask, 0};
    const int nth = pi_pool_resolve_threads(n_threads);
    ffn_run_phase(&c, gated ? gate : up, NULL, n_idx, nth);
    if (gated) { /* up rows only for the neurons whose gate fired */
        int64_t n_fired = 0;
        for (int64_t j = 0; j < n_idx; j++)
            if (keep[j]) fired[n_fired++] = j;
        ffn_run_phase(&c, up, fired, n_fired, nth);
    }

    /* compact to the neurons with a nonzero h: their down rows are the only ones read */
    int64_t n_keep = 0;
    for (int64_t j = 0; j < n_idx; j++) {
        if (!keep[j]) continue;
        kidx[n_keep] = idx[j];
        for (int64_t t = 0; t < n_tok; t++) kh[t * n_idx + n_keep] = h[t * n_idx + j];
        n_keep++;
    }
    if (n_skipped) *n_skipped = n_idx - n_keep;
    rc = run_axpy(down_t, kidx, n_keep, kh, n_idx, n_tok, y, n_threads);
done:
    xq_free(&xq);
    free(x_owned);
    free(h); free(keep); free(fired); free(kidx); free(kh);
    return rc;
}

/* ------------------------------------------------------------------ predictor */

int pi_predict(const pi_matrix *fc1, const pi_matrix *fc2, const float *x, int64_t n_tok, float threshold,
               int32_t *idx_out, int64_t capacity, int64_t *n_out, uint8_t *tok_mask, int n_threads) {
    int rc;
    if ((rc = check_matrix(fc1)) || (rc = check_matrix(fc2))) return rc;
    if (!x || !idx_out || !n_out) return PI_ERR_NULL;
    if (n_tok <= 0 || n_tok > PI_MAX_DIM) return PI_ERR_SHAPE;
    if (fc2->cols != fc1->rows) return PI_ERR_SHAPE;
    if (fc2->rows > INT32_MAX) return PI_ERR_SHAPE;
    if (capacity < fc2->rows) return PI_ERR_CAPACITY;
    if (threshold != threshold) return PI_ERR_SHAPE; /* NaN */
    const int64_t r = fc1->rows, n_ff = fc2->rows;
    int64_t zs, ls;
    if (!mul_ok(n_tok, r, &zs) || !mul_ok(n_tok, n_ff, &ls)) return PI_ERR_SHAPE;
    float *z = malloc((size_t)zs * sizeof(float));
    float *logits = malloc((size_t)ls * sizeof(float));
    if (!z || !logits) { rc = PI_ERR_NOMEM; goto done; }
    if ((rc = run_rows(fc1, NULL, r, x, n_tok, z, n_threads))) goto done;
    for (int64_t j = 0; j < zs; j++) z[j] = z[j] > 0.0f ? z[j] : 0.0f;
    if ((rc = run_rows(fc2, NULL, n_ff, z, n_tok, logits, n_threads))) goto done;
    if (tok_mask) /* each token's own set, before row 0 becomes the union below */
        for (int64_t t = 0; t < n_tok; t++)
            for (int64_t i = 0; i < n_ff; i++) tok_mask[t * capacity + i] = logits[t * n_ff + i] >= threshold;
    /* branch-free: each neuron's index is written, and kept (n advances) when some token's logit
     * reaches the threshold; a branch per neuron mispredicts on a fifth of 11008 random logits */
    for (int64_t t = 1; t < n_tok; t++) /* the batch's union: a token that reaches it stands for the neuron */
        for (int64_t i = 0; i < n_ff; i++)
            logits[i] = logits[t * n_ff + i] >= threshold ? logits[t * n_ff + i] : logits[i];
    int64_t n = 0;
    for (int64_t i = 0; i < n_ff; i++) {
        idx_out[n] = (int32_t)i;
        n += logits[i] >= threshold;
    }
    *n_out = n;
    if (tok_mask) /* columns compacted to the union's positions, in place (idx_out[k] >= k) */
        for (int64_t t = 0; t < n_tok; t++)
            for (int64_t k = 0; k < n; k++) tok_mask[t * capacity + k] = tok_mask[t * capacity + idx_out[k]];
done:
    free(z);
    free(logits);
    return rc;
}

/* ------------------------------------------------------------------ small helpers */

int pi_rmsnorm(const float *x, const float *w, int64_t n_tok, int64_t n, float eps, float *y) {
    if (!x || !w || !y) return PI_ERR_NULL;
    if (n_tok <= 0 || n <= 0 || !(eps >= 0.0f)) return PI_ERR_SHAPE;
    for (int64_t t = 0; t < n_tok; t++) {
        const float *xt = x + t * n;
        float *yt = y + t * n;
        /* eight partial sums in a fixed order: eight independent add chains instead of one (the
         * latency of one chain was most of the call), the same result for any thread or ISA */
        double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t i = 0;
        for (; i + 8 <= n; i += 8)
            for (int j = 0; j < 8; j++) part[j] += (double)xt[i + j] * xt[i + j];
        for (; i < n; i++) part[0] += (double)xt[i] * xt[i];
        const double ss = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
        float scale = (float)(1.0 / sqrt(ss / (double)n + eps));
        for (int64_t i = 0; i < n; i++) yt[i] = xt[i] * scale * w[i];
    }
    return PI_OK;
}

int pi_rope(float *x, const int32_t *pos, int64_t n_tok, int64_t n_heads, int64_t head_dim, int64_t n_rot,
            float freq_base, int32_t neox) {
    if (!x || !pos) return PI_ERR_NULL;
    if (n_tok <= 0 || n_heads <= 0 || head_dim <= 0 || n_rot <= 0 || n_rot > head_dim || n_rot % 2 ||
        !(freq_base > 0.0f))
        return PI_ERR_SHAPE;
    /* as ggml: theta_i = pos * base^(-2i/n_rot), accumulated by repeated multiplication in float */
    const float theta_scale = powf(freq_base, -2.0f / (float)n_rot);
    float *cs = malloc((size_t)n_rot * sizeof(float));
    if (!cs) return PI_ERR_NOMEM;
    for (int64_t t = 0; t < n_tok; t++) {
        float theta = (float)pos[t];
        for (int64_t i = 0; i < n_rot; i += 2) {
            cs[i] = cosf(theta);
            cs[i + 1] = sinf(theta);
            theta *= theta_scale;
        }
        for (int64_t hd = 0; hd < n_heads; hd++) {
            float *v = x + (t * n_heads + hd) * head_dim;
            for (int64_t i = 0; i < n_rot; i += 2) {
                int64_t a = neox ? i / 2 : i, b = neox ? i / 2 + n_rot / 2 : i + 1;
                float x0 = v[a], x1 = v[b], c = cs[i], s = cs[i + 1];
                v[a] = x0 * c - x1 * s;
                v[b] = x0 * s + x1 * c;
            }
        }
    }
    free(cs);
    return PI_OK;
}

/* ------------------------------------------------------------------ attention */

typedef struct {
    const float *q;
    const uint8_t *k, *v;  /* the caches, [n_head_kv, kv_rows, d] elements of the kernel slot `slot` */
    int slot;
    int64_t row_bytes;     /* one position of one KV head: d elements */
    int64_t kvhead_bytes;  /* one KV head's kv_rows positions */
    int64_t n_past, n_tok, n_head, n_head_kv, group, d;
    float *out;
    _Atomic int64_t next; /* next work item (attn_items) */
    _Atomic int err;
} attn_ctx;

/* the work items: (token, query head) pairs, or where the variant takes query heads by groups sharing
 * a KV head (pi_attn_group_fn), (token, KV head, group of up to PI_ATTN_GROUP of its query heads) */
static int64_t attn_items(const attn_ctx *c) {
    const pi_kernel_table *k = K();
    if (c->group > 1 && c->d % 16 == 0 && c->d <= PI_ATTN_MAX_D && k->attn_group[c->slot])
        return c->n_tok * c->n_head_kv * ((c->group + PI_ATTN_GROUP - 1) / PI_ATTN_GROUP);
    return c->n_tok * c->n_head;
}

/* one (token, head): scores over the visible rows (the cache type's dot kernel), softmax, then the
 * weighted sum of V rows (its axpy kernel, PI_AXPY_ROWS rows per call) */
static void attn_task(void *p, int tid, int nth) {
    (void)tid; (void)nth;
    attn_ctx *c = (attn_ctx *)p;
    const pi_kernel_table *k = K();
    const pi_dot_fn dot = k->dot[c->slot];
    const pi_axpy_fn axpy = k->axpy[c->slot];
    const int64_t row_bytes = c->row_bytes, kvhead_bytes = c->kvhead_bytes;
    const int64_t d = c->d, n_items = attn_items(c);
    const int vec = d % 16 == 0 && d <= PI_ATTN_MAX_D;
    const pi_attn_head_fn head = vec ? k->attn_head[c->slot] : NULL;
    const pi_attn_group_fn group = vec && c->group > 1 ? k->attn_group[c->slot] : NULL;
    float *s = malloc((size_t)(c->n_past + c->n_tok) * PI_ATTN_GROUP * sizeof(float));
    if (!s) { atomic_store(&c->err, PI_ERR_NOMEM); return; }
    const float scale = 1.0f / sqrtf((float)d);
    const int64_t subs = (c->group + PI_ATTN_GROUP - 1) / PI_ATTN_GROUP; /* sub-groups per KV head */
    for (;;) {
        const int64_t item = atomic_fetch_add(&c->next, 1);
        if (item >= n_items) break;
        if (group) { /* (token, KV head, up to PI_ATTN_GROUP of its query heads): K and V read once for them */
            const int64_t t = item / (c->n_head_kv * subs), g = item / subs % c->n_head_kv, h = g * c->group + item % subs * PI_ATTN_GROUP;
            const int ng = (int)(c->group - (h - g * c->group) < PI_ATTN_GROUP ? c->group - (h - g * c->group) : PI_ATTN_GROUP);
            const int64_t at = t * c->n_head + h;
            group(c->q + at * d, ng, c->k + g * kvhead_bytes, c->v + g * kvhead_bytes, row_bytes, c->n_past + t + 1, d,
                  scale, s, c->out + at * d);
            continue;
        }
        const int64_t t = item / c->n_head, h = item % c->n_head, g = h / c->group, S = c->n_past + t + 1;
        const float *qv = c->q + item * d;
        if (head) {
            head(qv, c->k + g * kvhead_bytes, c->v + g * kvhead_bytes, row_bytes, S, d, scale, s, c->out + item * d);
            continue;
        }
        float m = -INFINITY;
        for (int64_t r = 0; r < S; r++) {
            s[r] = dot(c->k + g * kvhead_bytes + r * row_bytes, qv, d, NULL) * scale;
            m = s[r] > m ? s[r] : m;
        }
        float sum = 0.0f;
        for (int64_t r = 0; r < S; r++) sum += (s[r] = expf(s[r] - m));
        const float inv = 1.0f / sum;
        for (int64_t r = 0; r < S; r++) s[r] *= inv;
        float *o = c->out + item * d;
        memset(o, 0, (size_t)d * sizeof(float));
        const void *rows[PI_AXPY_ROWS];
        for (int64_t r0 = 0; r0 < S; r0 += PI_AXPY_ROWS) {
            const int nr = (int)(S - r0 < PI_AXPY_ROWS ? S - r0 : PI_AXPY_ROWS);
            for (int j = 0; j < nr; j++) rows[j] = c->v + g * kvhead_bytes + (r0 + j) * row_bytes;
            axpy(rows, s + r0, nr, o, d, NULL, 0);
        }
    }
    free(s);
}

int pi_attention(const float *q, const void *k_cache, const void *v_cache, int32_t kv_type, int64_t kv_rows,
                 int64_t n_past, int64_t n_tok, int64_t n_head, int64_t n_head_kv, int64_t head_dim, float *out,
                 int n_threads) {
    if (!q || !k_cache || !v_cache || !out) return PI_ERR_NULL;
    if (kv_type != PI_TYPE_F32 && kv_type != PI_TYPE_F16) return PI_ERR_TYPE;
    int64_t tmp, kv_w;
    if (n_tok <= 0 || n_past < 0 || n_head <= 0 || n_head_kv <= 0 || head_dim <= 0 || n_head % n_head_kv ||
        kv_rows > PI_MAX_DIM || n_past > kv_rows || n_tok > kv_rows - n_past || !mul_ok(n_head_kv, head_dim, &kv_w) ||
        !mul_ok(kv_rows, kv_w, &tmp) || !mul_ok(n_tok, n_head, &tmp) || !mul_ok(tmp, head_dim, &tmp))
        return PI_ERR_SHAPE;
    const int64_t row_bytes = pi_type_row_bytes(kv_type, head_dim);
    if (row_bytes < 0 || pi_type_row_bytes(kv_type, kv_w) < 0 || !mul_ok(kv_rows, row_bytes, &tmp)) return PI_ERR_SHAPE;
    attn_ctx c = {q, (const uint8_t *)k_cache, (const uint8_t *)v_cache, pi_type_slot(kv_type), row_bytes,
                  tmp, n_past, n_tok, n_head, n_head_kv, n_head / n_head_kv, head_dim, out, 0, PI_OK};
    /* a decode step's few heads over a short cache cost less than a dispatch: one thread below ~64k MACs */
    int nth = pi_pool_resolve_threads(n_threads);
    const int64_t work = n_tok * n_head * (n_past + n_tok) * head_dim;
    if (work < ((int64_t)1 << 16)) nth = 1;
    const int64_t items = attn_items(&c);
    if (nth > items) nth = (int)items;
    pi_pool_run(attn_task, &c, nth);
    return atomic_load(&c.err);
}

int pi_kv_store(void *cache, int32_t kv_type, int64_t kv_rows, int64_t n_head_kv, int64_t head_dim, int64_t pos0,
                const float *x, int64_t n_tok) {
    if (!cache || !x) return PI_ERR_NULL;
    if (kv_type != PI_TYPE_F32 && kv_type != PI_TYPE_F16) return PI_ERR_TYPE;
    int64_t tmp;
    if (n_tok <= 0 || pos0 < 0 || n_head_kv <= 0 || head_dim <= 0 || kv_rows > PI_MAX_DIM || pos0 > kv_rows ||
        n_tok > kv_rows - pos0 || !mul_ok(n_head_kv, kv_rows, &tmp) || !mul_ok(tmp, head_dim, &tmp) ||
        !mul_ok(tmp, 4, &tmp) || !mul_ok(n_tok, n_head_kv, &tmp) || !mul_ok(tmp, head_dim, &tmp))
        return PI_ERR_SHAPE;
    const pi_kernel_table *k = K();
    /* numpy's float16 cast runs ~2.5 ns a value: 11 us for one token's K of a 7B layer, 1.3 ms for a
     * 64-token prompt's K and V */
    for (int64_t t = 0; t < n_tok; t++)
        for (int64_t h = 0; h < n_head_kv; h++) {
            const float *src = x + (t * n_head_kv + h) * head_dim;
            const int64_t at = (h * kv_rows + pos0 + t) * head_dim;
            if (kv_type == PI_TYPE_F16)
                k->f32_to_f16(src, (uint16_t *)cache + at, head_dim);
            else
                memcpy((float *)cache + at, src, (size_t)head_dim * sizeof(float));
        }
    return PI_OK;
}
