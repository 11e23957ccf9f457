/* ops.c — the CPU ops of pi_backend.h, written once against the per-ISA kernel table.
 *
 * Every entry point validates what it can see (matrix views against their buffers, every index, sizes
 * and their products) before touching memory, and returns an error code instead of reading out of
 * bounds. Work is split so that results do not depend on the thread count: rows are independent, and
 * the down projection splits the output columns, so each y element sums its neurons in list order. */
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
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
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

static int check_indices(const int32_t *idx, int64_t n_idx, int64_t rows) {
    if (n_idx < 0 || n_idx > PI_MAX_DIM) return PI_ERR_SHAPE;
    if (n_idx > 0 && !idx) return PI_ERR_NULL;
    for (int64_t k = 0; k < n_idx; k++)
        if (idx[k] < 0 || (int64_t)idx[k] >= rows) return PI_ERR_INDEX;
    return PI_OK;
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

/* ------------------------------------------------------------------ rows x tokens (gemm, sparse rows) */

typedef struct {
    const pi_kernel_table *k;
    const pi_matrix *W;
    const int32_t *idx;  /* NULL: all rows */
    int64_t n_out;       /* rows computed (W.rows or n_idx) */
    const float *x;
    int64_t n_tok;
    float *y;            /* [n_tok, n_out] */
    _Atomic int64_t next;
    _Atomic int err;
} rows_ctx;

#define ROWS_CHUNK 8

static void rows_task(void *p, int tid, int nth) {
    (void)tid; (void)nth;
    rows_ctx *c = (rows_ctx *)p;
    const int slot = pi_type_slot(c->W->type);
    if (slot < 0) return; /* unreachable: check_matrix refused the type */
    const int64_t cols = c->W->cols;
    const pi_dot_fn dot = c->k->dot[slot], dot32 = c->k->dot[PI_T_F32];
    float *scratch = NULL;
    if (c->n_tok > 1 && slot != PI_T_F32) {
        scratch = malloc((size_t)(ROWS_CHUNK * cols) * sizeof(float));
        if (!scratch) { atomic_store(&c->err, PI_ERR_NOMEM); return; }
    }
    for (;;) {
        int64_t r0 = atomic_fetch_add(&c->next, ROWS_CHUNK);
        if (r0 >= c->n_out) break;
        int64_t r1 = r0 + ROWS_CHUNK < c->n_out ? r0 + ROWS_CHUNK : c->n_out;
        if (c->n_tok == 1) {
            for (int64_t r = r0; r < r1; r++)
                c->y[r] = dot(row_ptr(c->W, c->idx ? c->idx[r] : r), c->x, cols);
            continue;
        }
        /* several tokens: decode each weight row once, then reuse it from cache for every token */
        const float *rows[ROWS_CHUNK];
        for (int64_t r = r0; r < r1; r++) {
            const uint8_t *src = row_ptr(c->W, c->idx ? c->idx[r] : r);
            if (scratch) {
                c->k->to_f32[slot](src, scratch + (r - r0) * cols, cols);
                rows[r - r0] = scratch + (r - r0) * cols;
            } else {
                rows[r - r0] = (const float *)src;
            }
        }
        for (int64_t t = 0; t < c->n_tok; t++) {
            const float *xt = c->x + t * cols;
            float *yt = c->y + t * c->n_out;
            for (int64_t r = r0; r < r1; r++) yt[r] = dot32(rows[r - r0], xt, cols);
        }
    }
    free(scratch);
}

static int run_rows(const pi_matrix *W, const int32_t *idx, int64_t n_out, const float *x, int64_t n_tok,
                    float *y, int n_threads) {
    if (n_out == 0) return PI_OK;
    rows_ctx c = {K(), W, idx, n_out, x, n_tok, y, 0, PI_OK};
    int nth = pi_pool_resolve_threads(n_threads);
    int64_t chunks = (n_out + ROWS_CHUNK - 1) / ROWS_CHUNK;
    if (nth > chunks) nth = (int)chunks;
    pi_pool_run(rows_task, &c, nth);
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

/* ------------------------------------------------------------------ sparse AXPY (down projection) */

typedef struct {
    const pi_kernel_table *k;
    const pi_matrix *Wt;
    const int32_t *idx;
    int64_t n_idx;
    const float *h;  /* [n_tok, h_stride], entry k of token t at h[t * h_stride + k] */
    int64_t h_stride;
    int64_t n_tok;
    float *y;        /* [n_tok, cols] */
    int64_t unit;    /* column split granularity (block size for quantized types) */
    _Atomic int err;
} axpy_ctx;

static void axpy_task(void *p, int tid, int nth) {
    axpy_ctx *c = (axpy_ctx *)p;
    const int64_t cols = c->Wt->cols, units = cols / c->unit;
    const int64_t c0 = units * tid / nth * c->unit;
    const int64_t c1 = tid == nth - 1 ? cols : units * (tid + 1) / nth * c->unit;
    const int64_t len = c1 - c0;
    if (len <= 0) return;
    const int slot = pi_type_slot(c->Wt->type);
    const int64_t off = pi_type_row_bytes(c->Wt->type, c0); /* c0 is block aligned */
    const pi_axpy_fn axpy = c->k->axpy[slot], axpy32 = c->k->axpy[PI_T_F32];
    if (c->n_tok == 1) {
        for (int64_t k = 0; k < c->n_idx; k++) {
            float a = c->h[k];
            if (a != 0.0f) axpy(row_ptr(c->Wt, c->idx[k]) + off, a, c->y + c0, len);
        }
        return;
    }
    float *seg = malloc((size_t)len * sizeof(float));
    if (!seg) { atomic_store(&c->err, PI_ERR_NOMEM); return; }
    for (int64_t k = 0; k < c->n_idx; k++) {
        int any = 0;
        for (int64_t t = 0; t < c->n_tok && !any; t++) any = c->h[t * c->h_stride + k] != 0.0f;
        if (!any) continue;
        /* the weight segment is read from memory once for the whole batch */
        c->k->to_f32[slot](row_ptr(c->Wt, c->idx[k]) + off, seg, len);
        for (int64_t t = 0; t < c->n_tok; t++) {
            float a = c->h[t * c->h_stride + k];
            if (a != 0.0f) axpy32(seg, a, c->y + t * cols + c0, len);
        }
    }
    free(seg);
}

static int run_axpy(const pi_matrix *Wt, const int32_t *idx, int64_t n_idx, const float *h, int64_t h_stride,
                    int64_t n_tok, float *y, int n_threads) {
    if (n_idx == 0) return PI_OK;
    int64_t unit = Wt->type == PI_TYPE_Q8_0 || Wt->type == PI_TYPE_Q4_0 ? 32 : 16;
    if (Wt->cols % unit) unit = Wt->type == PI_TYPE_Q8_0 || Wt->type == PI_TYPE_Q4_0 ? 32 : 1;
    axpy_ctx c = {K(), Wt, idx, n_idx, h, h_stride, n_tok, y, unit, PI_OK};
    int nth = pi_pool_resolve_threads(n_threads);
    /* below ~256 columns a thread's share is too small to pay for the dispatch */
    int64_t max_nth = Wt->cols / 256 > 0 ? Wt->cols / 256 : 1;
    if (nth > max_nth) nth = (int)max_nth;
    if (nth > Wt->cols / unit) nth = (int)(Wt->cols / unit);
    pi_pool_run(axpy_task, &c, nth);
    return atomic_load(&c.err);
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
    case PI_ACT_GEGLU: return 0.5f * g * (1.0f + tanhf(0.7978845608f * (g + 0.044715f * g * g * g)));
    default: return g > 0.0f ? g : 0.0f; /* ReGLU, dReLU, ReLU */
    }
}

typedef struct {
    const pi_kernel_table *k;
    const pi_matrix *first;   /* gate, or up for PI_ACT_RELU */
    const pi_matrix *up;      /* NULL for PI_ACT_RELU */
    int32_t act;
    const int32_t *idx;
    int64_t n_idx;
    const float *x;
    int64_t n_tok;
    float skip_threshold;
    float *h;                 /* [n_tok, n_idx] */
    uint8_t *keep;            /* [n_idx] */
    _Atomic int64_t next;
    _Atomic int err;
} ffn_ctx;

#define FFN_CHUNK 16

/* phase 1: per listed neuron, the activation for every token; rows of `up` (and later `down`) are
 * only read for neurons whose gate fires for some token */
static void ffn_hidden_task(void *p, int tid, int nth) {
    (void)tid; (void)nth;
    ffn_ctx *c = (ffn_ctx *)p;
    const int64_t cols = c->first->cols, T = c->n_tok;
    const int s1 = pi_type_slot(c->first->type), s2 = c->up ? pi_type_slot(c->up->type) : 0;
    const pi_dot_fn dot32 = c->k->dot[PI_T_F32];
    float *a = malloc((size_t)T * sizeof(float));
    float *row = T > 1 ? malloc((size_t)cols * sizeof(float)) : NULL;
    if (!a || (T > 1 && !row)) {
        free(a); free(row);
        atomic_store(&c->err, PI_ERR_NOMEM);
        return;
    }
    for (;;) {
        int64_t k0 = atomic_fetch_add(&c->next, FFN_CHUNK);
        if (k0 >= c->n_idx) break;
        int64_t k1 = k0 + FFN_CHUNK < c->n_idx ? k0 + FFN_CHUNK : c->n_idx;
        for (int64_t k = k0; k < k1; k++) {
            const int64_t i = c->idx[k];
            int fires = 0;
            if (T == 1) {
                a[0] = act_gate(c->act, c->k->dot[s1](row_ptr(c->first, i), c->x, cols));
            } else {
                c->k->to_f32[s1](row_ptr(c->first, i), row, cols);
                for (int64_t t = 0; t < T; t++) a[t] = act_gate(c->act, dot32(row, c->x + t * cols, cols));
            }
            for (int64_t t = 0; t < T; t++) {
                if (fabsf(a[t]) <= c->skip_threshold) a[t] = 0.0f;
                else fires = 1;
            }
            int nonzero = 0;
            if (fires && c->up) {
                if (T == 1) {
                    float u = c->k->dot[s2](row_ptr(c->up, i), c->x, cols);
                    a[0] *= c->act == PI_ACT_DRELU ? (u > 0.0f ? u : 0.0f) : u;
                } else {
                    c->k->to_f32[s2](row_ptr(c->up, i), row, cols);
                    for (int64_t t = 0; t < T; t++) {
                        if (a[t] == 0.0f) continue;
                        float u = dot32(row, c->x + t * cols, cols);
                        a[t] *= c->act == PI_ACT_DRELU ? (u > 0.0f ? u : 0.0f) : u;
                    }
                }
            }
            for (int64_t t = 0; t < T; t++) {
                c->h[t * c->n_idx + k] = a[t];
                nonzero |= a[t] != 0.0f;
            }
            c->keep[k] = (uint8_t)nonzero;
        }
    }
    free(a);
    free(row);
}

int pi_sparse_ffn(const pi_matrix *gate, const pi_matrix *up, const pi_matrix *down_t, int32_t act,
                  const int32_t *idx, int64_t n_idx, const float *x, int64_t n_tok, float *y, int32_t accumulate,
                  float skip_threshold, int64_t *n_skipped, int n_threads) {
    int rc;
    if (act < PI_ACT_REGLU || act > PI_ACT_GEGLU) return PI_ERR_TYPE;
    const int gated = act != PI_ACT_RELU;
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

    float *h = malloc((size_t)hsize * sizeof(float));
    uint8_t *keep = malloc((size_t)n_idx);
    int32_t *kidx = malloc((size_t)n_idx * sizeof(int32_t));
    float *kh = malloc((size_t)hsize * sizeof(float));
    if (!h || !keep || !kidx || !kh) { rc = PI_ERR_NOMEM; goto done; }

    ffn_ctx c = {K(), gated ? gate : up, gated ? up : NULL, act, idx, n_idx, x, n_tok, skip_threshold,
                 h, keep, 0, PI_OK};
    int nth = pi_pool_resolve_threads(n_threads);
    int64_t chunks = (n_idx + FFN_CHUNK - 1) / FFN_CHUNK;
    pi_pool_run(ffn_hidden_task, &c, nth > chunks ? (int)chunks : nth);
    if ((rc = atomic_load(&c.err))) goto done;

    /* compact to the neurons that fired: their down rows are the only ones read */
    int64_t n_keep = 0;
    for (int64_t k = 0; k < n_idx; k++) {
        if (!keep[k]) continue;
        kidx[n_keep] = idx[k];
        for (int64_t t = 0; t < n_tok; t++) kh[t * n_idx + n_keep] = h[t * n_idx + k];
        n_keep++;
    }
    if (n_skipped) *n_skipped = n_idx - n_keep;
    rc = run_axpy(down_t, kidx, n_keep, kh, n_idx, n_tok, y, n_threads);
done:
    free(h); free(keep); free(kidx); free(kh);
    return rc;
}

/* ------------------------------------------------------------------ predictor */

int pi_predict(const pi_matrix *fc1, const pi_matrix *fc2, const float *x, int64_t n_tok, float threshold,
               int32_t *idx_out, int64_t capacity, int64_t *n_out, int n_threads) {
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
    int64_t n = 0;
    for (int64_t i = 0; i < n_ff; i++) {
        for (int64_t t = 0; t < n_tok; t++) {
            if (logits[t * n_ff + i] >= threshold) { idx_out[n++] = (int32_t)i; break; }
        }
    }
    *n_out = n;
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
        double ss = 0.0;
        for (int64_t i = 0; i < n; i++) ss += (double)xt[i] * xt[i];
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
