/*
 * pi_backend.h — the one C API of pi_backend's kernels.
 *
 * This header is the single source of truth: the cffi build (pi_backend/native/build_cffi.py) reads
 * the declarations between the PI_CDEF markers, and Python reads every constant from here through
 * the compiled module. The CUDA and HIP libraries implement the device section with the same
 * signatures plus a stream.
 *
 * Conventions
 * - Weight matrices are row-major [rows, cols] in a GGML/GGUF type (F32, F16, BF16, Q8_0, Q4_0, with
 *   GGUF's block layouts); one row = one neuron for gate/up, and for down stored transposed
 *   (`ffn_down_t`), so every sparse op reads whole rows.
 * - Activations are F32, [n_tok, n] row-major and contiguous.
 * - Index lists are int32. Every kernel checks every index and every size it is given and returns an
 *   error code instead of reading out of bounds.
 * - n_threads: 0 means the global setting (pi_set_num_threads); the pool never spins while idle.
 */
#ifndef PI_BACKEND_H
#define PI_BACKEND_H

#include <stdint.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* PI_CDEF_BEGIN: from here to the closing marker, cffi reads the declarations (and #define values) */

/* weight types: GGML's numbering, so GGUF tensor types map one to one */
#define PI_TYPE_F32 0
#define PI_TYPE_F16 1
#define PI_TYPE_Q4_0 2
#define PI_TYPE_Q8_0 8
#define PI_TYPE_BF16 30

/* GGUF block layouts: Q8_0 = {f16 d; int8 qs[32]}, Q4_0 = {f16 d; uint8 qs[16]}, value = d * q
 * (Q4_0: element j < 16 is qs[j] & 15, element j + 16 is qs[j] >> 4, both minus 8) */
#define PI_QK8_0 32
#define PI_QK4_0 32
#define PI_BLOCK_BYTES_Q8_0 34
#define PI_BLOCK_BYTES_Q4_0 18

/* pi_backend's own layout of Q4_0 rows (never in a GGUF file): each run of 16 blocks (512 values, 288
 * bytes) is stored as the 16 f16 scales, then 4 slabs of 64 bytes where bytes 4l .. 4l + 3 of slab m
 * are qs[4m .. 4m + 3] of block l. The same bytes as Q4_0, regrouped so that one 512-bit integer dot
 * product covers 16 blocks and each lane ends with one block's sum: no per-block scale broadcast or
 * horizontal sum. Rows must be whole runs (cols a multiple of PI_COLS_Q4_0X16). pi_convert_rows makes
 * it from Q4_0 and back; the dot products read it 2-2.7x faster per block than Q4_0 (AVX-512, AVX2). */
#define PI_TYPE_Q4_0X16 1002
#define PI_COLS_Q4_0X16 512
#define PI_BYTES_Q4_0X16 288

/* FFN activation kinds */
#define PI_ACT_REGLU 0   /* h = relu(gate.x) * (up.x)        ReluLLaMA, ProSparse */
#define PI_ACT_DRELU 1   /* h = relu(gate.x) * relu(up.x)  Bamboo, TurboSparse */
#define PI_ACT_RELU 2    /* h = relu(up.x), no gate          Falcon-ReLU, OPT */
#define PI_ACT_SWIGLU 3  /* h = silu(gate.x) * (up.x)        LLaMA/Mistral (dense or threshold) */
#define PI_ACT_GEGLU 4   /* h = gelu_tanh(gate.x) * (up.x) */
#define PI_ACT_GELU 5    /* h = gelu_tanh(up.x), no gate     Falcon (stock), GPT-style MLPs */

/* instruction-set variants of the CPU kernels */
#define PI_ISA_SCALAR 0
#define PI_ISA_AVX2 1
#define PI_ISA_AVX512 2

/* error codes (0 = success); pi_strerror names them */
#define PI_OK 0
#define PI_ERR_NULL -1        /* a required pointer is NULL */
#define PI_ERR_SHAPE -2       /* sizes disagree, are negative, or overflow */
#define PI_ERR_TYPE -3        /* unsupported weight type or activation kind */
#define PI_ERR_INDEX -4       /* an index is outside [0, rows) */
#define PI_ERR_DUPLICATE -5   /* an index list that must be a set repeats an index */
#define PI_ERR_BOUNDS -6      /* a matrix would be read past the end of its buffer */
#define PI_ERR_NOMEM -7       /* allocation failed */
#define PI_ERR_ISA -8         /* the requested instruction set is not supported here */
#define PI_ERR_CAPACITY -9    /* an output buffer is too small */
#define PI_ERR_ALIGN -10      /* quantized cols not a multiple of the block size */
#define PI_ERR_DEVICE -11     /* a device (CUDA/HIP) call failed */

/* A weight matrix: a view of rows x cols elements in `type`, rows `row_stride` bytes apart, inside a
 * buffer of `data_bytes` bytes starting at `data`. The kernels refuse a view that would read past
 * data + data_bytes. */
typedef struct pi_matrix {
    const void *data;
    int64_t data_bytes;
    int64_t rows;
    int64_t cols;
    int64_t row_stride;
    int32_t type;
} pi_matrix;

/* ---- library state ---- */
const char *pi_strerror(int code);
int pi_isa_supported(int isa);           /* 1 if this CPU (and build) can run it */
int pi_isa_active(void);                 /* the variant in use */
int pi_set_isa(int isa);                 /* select a supported variant (tests, PI_BACKEND_ISA) */
const char *pi_isa_name(int isa);
int pi_set_num_threads(int n);           /* global default for n_threads == 0; 1..PI_MAX_THREADS */
int pi_get_num_threads(void);
#define PI_MAX_THREADS 64
int64_t pi_type_row_bytes(int32_t type, int64_t cols);  /* bytes of one row, < 0 on error */
/* Copy src's rows into dst (src.rows contiguous rows of dst_type) converting between Q4_0 and
 * Q4_0X16 (either way; the same type copies). dst_bytes must hold them. dst may be src's own buffer
 * when src's rows are contiguous (in-place conversion); no other overlap is allowed. */
int pi_convert_rows(const pi_matrix *src, int32_t dst_type, void *dst, int64_t dst_bytes, int n_threads);
/* the position of the first index outside [0, rows) in idx[0 .. n), or -1 if there is none (the
 * wrappers' argument check: one pass here costs a tenth of numpy's min() and max()) */
int64_t pi_first_bad_index(const int32_t *idx, int64_t n, int64_t rows);

/* ---- dense ---- */
/* y[t, r] = sum_c W[r, c] * x[t, c] for all rows r; x [n_tok, W.cols], y [n_tok, W.rows] */
int pi_gemm(const pi_matrix *W, const float *x, int64_t n_tok, float *y, int n_threads);

/* rows of W as F32: out[k, :] = W[idx[k], :] (embedding lookup, tests) */
int pi_dequantize_rows(const pi_matrix *W, const int32_t *idx, int64_t n_idx, float *out);

/* ---- sparse ---- */
/* y[t, k] = W[idx[k], :] . x[t, :]; y [n_tok, n_idx]; indices may repeat */
int pi_sparse_gemm_rows(const pi_matrix *W, const int32_t *idx, int64_t n_idx,
                        const float *x, int64_t n_tok, float *y, int n_threads);

/* y[t, :] += sum_k h[t, k] * Wt[idx[k], :]; Wt is the transposed down matrix [n_ff, n_embd],
 * h [n_tok, n_idx], y [n_tok, Wt.cols]; a repeated index contributes once per occurrence */
int pi_sparse_axpy_rows(const pi_matrix *Wt, const int32_t *idx, int64_t n_idx,
                        const float *h, int64_t n_tok, float *y, int n_threads);

/* One layer's FFN over the neurons in idx (a set: duplicates are refused), without an n_ff-sized
 * intermediate: for each neuron i in idx and token t
 *   a = act(gate[i] . x[t]) (or up[i] . x[t] for the ungated PI_ACT_RELU / PI_ACT_GELU, gate may be
 *   NULL), h = a * up-part,
 *   y[t] += h * down_t[i]
 * Neurons whose |h| <= skip_threshold for every token are skipped: their remaining rows are never
 * read (exact zeros for ReLU models; the TEAL/CATS cut for SiLU models when > 0).
 * tok_mask: NULL (every token takes every listed neuron), or [n_tok, n_idx] bytes: token t takes
 * neuron idx[k] only if tok_mask[t * n_idx + k] != 0, else its h is 0 and its gate row is not
 * multiplied for it (a batch where each token has its own predicted set: PowerInfer's per-token rule;
 * a neuron's rows are still read once for all the tokens that take it).
 * accumulate = 0 overwrites y, 1 adds into it. If n_skipped is not NULL it receives the number of
 * listed neurons that were skipped. */
int pi_sparse_ffn(const pi_matrix *gate, const pi_matrix *up, const pi_matrix *down_t,
                  int32_t act, const int32_t *idx, int64_t n_idx, const uint8_t *tok_mask,
                  const float *x, int64_t n_tok, float *y, int32_t accumulate,
                  float skip_threshold, int64_t *n_skipped, int n_threads);

/* The predictor: logits[t] = fc2 . relu(fc1 . x[t]); neuron i is active if logits[t, i] >= threshold
 * for any token t. Writes the active set, sorted ascending, to idx_out (capacity fc2.rows) and its
 * size to n_out. fc1 [rank, n_embd], fc2 [n_ff, rank]. tok_mask: NULL, or [n_tok, capacity] bytes
 * that receive, for each token t and k < n_out, whether token t's own logit of idx_out[k] reaches the
 * threshold (the per-token sets, as pi_sparse_ffn's tok_mask with row stride capacity). */
int pi_predict(const pi_matrix *fc1, const pi_matrix *fc2, const float *x, int64_t n_tok,
               float threshold, int32_t *idx_out, int64_t capacity, int64_t *n_out, uint8_t *tok_mask,
               int n_threads);

/* ---- small helpers ---- */
/* y[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w; in place allowed */
int pi_rmsnorm(const float *x, const float *w, int64_t n_tok, int64_t n, float eps, float *y);
/* rotary embedding in place on x [n_tok, n_heads, head_dim] at positions pos[n_tok];
 * neox = 0: adjacent pairs (Meta / GGUF llama layout), 1: halves (NeoX / HF layout) */
int pi_rope(float *x, const int32_t *pos, int64_t n_tok, int64_t n_heads, int64_t head_dim,
            int64_t n_rot, float freq_base, int32_t neox);
/* causal grouped-query attention: q [n_tok, n_head, head_dim] at positions n_past .. n_past + n_tok - 1
 * over the caches k_cache / v_cache [n_head_kv, kv_rows, head_dim] (head-major: a head's positions are
 * contiguous, so a decode step streams each head's rows in one run instead of striding a whole position
 * apart), positions 0 .. n_past + n_tok - 1 filled (the new tokens' included); token t sees positions
 * 0 .. n_past + t. out [n_tok, n_head * head_dim].
 * The cache holds kv_type elements: PI_TYPE_F32 or PI_TYPE_F16 (llama.cpp's default KV type: half the
 * memory and half the bytes read per token). Needs n_head % n_head_kv == 0 and n_past + n_tok <= kv_rows. */
int pi_attention(const float *q, const void *k_cache, const void *v_cache, int32_t kv_type, int64_t kv_rows,
                 int64_t n_past, int64_t n_tok, int64_t n_head, int64_t n_head_kv, int64_t head_dim, float *out,
                 int n_threads);
/* new tokens into a cache of pi_attention's layout: cache [n_head_kv, kv_rows, head_dim] of kv_type
 * (PI_TYPE_F32, or PI_TYPE_F16 rounded to nearest even) gets x [n_tok, n_head_kv, head_dim] at positions
 * pos0 .. pos0 + n_tok - 1. Needs pos0 + n_tok <= kv_rows. */
int pi_kv_store(void *cache, int32_t kv_type, int64_t kv_rows, int64_t n_head_kv, int64_t head_dim, int64_t pos0,
                const float *x, int64_t n_tok);

/* ---- one-token decode of a llama-family model ----
 * pi_decode_step runs one token through every layer and the output head on the CPU in one call: the
 * same ops as above, in the order and with the arguments of the engine's Python pass (so the same
 * results), without a return to Python between them. Per layer: attention (RMSNorm, Q/K/V, RoPE with
 * adjacent pairs, KV write at position n_past, pi_attention, Wo, residual add), then the FFN (RMSNorm;
 * the active set from the predictor on the residual stream, or every neuron; pi_sparse_ffn; residual
 * add). The model's shapes are checked to fit together before anything runs. */
typedef struct pi_decode_layer {
    const float *attn_norm, *ffn_norm;   /* [n_embd] */
    const pi_matrix *wq, *wk, *wv, *wo;  /* [n_head * head_dim | n_head_kv * head_dim, n_embd]; wo transposed */
    const pi_matrix *fc1, *fc2;          /* predictor [rank, n_embd], [n_ff, rank]; both NULL: every neuron */
    float threshold;                     /* the predictor's threshold */
    float skip_threshold;                /* pi_sparse_ffn's skip_threshold */
    const pi_matrix *gate, *up, *down_t; /* [n_ff, n_embd]; gate NULL for PI_ACT_RELU / PI_ACT_GELU */
    void *k_cache, *v_cache;             /* [n_head_kv, kv_rows, head_dim] of kv_type (pi_attention's) */
} pi_decode_layer;

typedef struct pi_decode_model {
    int64_t n_embd, n_head, n_head_kv, head_dim, n_ff, n_rot, kv_rows;
    float norm_eps, rope_freq_base;
    int32_t act, kv_type, n_layer;
    const pi_decode_layer *layers;       /* [n_layer] */
    const pi_matrix *token_embd, *output; /* [n_vocab, n_embd] each */
    const float *output_norm;            /* [n_embd] */
} pi_decode_model;

/* token at position n_past (0 <= n_past < kv_rows; the caches hold positions 0 .. n_past - 1) through
 * the model: writes its K/V at n_past, logits [output.rows], and per layer counts[2 * i] = the neurons
 * listed, counts[2 * i + 1] = those the kernel skipped. */
int pi_decode_step(const pi_decode_model *m, int32_t token, int64_t n_past, float *logits, int64_t *counts,
                   int n_threads);

/* PI_CDEF_END */

/* ---- device entry points (pi_backend/native/cuda, pi_backend/native/hip) ----
 * Same semantics as the CPU functions above, on device memory: every pointer (matrix data, x, y, h,
 * idx, logits) is a device pointer, `stream` is a cudaStream_t / hipStream_t (NULL = the default
 * stream), and every op is asynchronous on that stream. Sizes and pi_matrix descriptors are checked on
 * the host before anything is launched (the same rules and error codes as the CPU side). Index lists
 * are checked on the device: an index outside [0, rows) is skipped (its output is 0) and sets an error
 * flag of the current device; a repeated index in pi_dev_sparse_ffn's set sets another. pi_dev_sync()
 * waits for the stream, then reports and clears the flags: PI_ERR_INDEX, else PI_ERR_DUPLICATE. The
 * flags are per device, not per stream. Results are deterministic: no floating-point atomics.
 * Built as libpi_backend_cuda.so (nvcc) / libpi_backend_hip.so (hipcc) from one kernel source. */
/* PI_DEVICE_CDEF_BEGIN */
int pi_dev_available(void);              /* 1 if a device is present and usable, else 0 (never fails) */
const char *pi_dev_name(void);           /* the current device's name, "none" without one */
const char *pi_dev_backend(void);        /* "cuda" or "hip" */
int pi_dev_sync(void *stream);
int pi_dev_malloc(void **ptr, int64_t bytes);  /* bytes == 0 gives NULL */
int pi_dev_free(void *ptr);                    /* NULL is fine */
int pi_dev_memcpy_h2d(void *dst, const void *src, int64_t bytes, void *stream);
int pi_dev_memcpy_d2h(void *dst, const void *src, int64_t bytes, void *stream);
int pi_dev_memcpy_d2d(void *dst, const void *src, int64_t bytes, void *stream);
int pi_dev_memset(void *dst, int32_t value, int64_t bytes, void *stream);
int pi_dev_mem_info(int64_t *free_bytes, int64_t *total_bytes);
/* bytes currently held through pi_dev_malloc (all devices); the ops' transient scratch comes from a
 * separate stream-ordered pool that keeps at most 32 MiB per device when idle */
int pi_dev_mem_used(int64_t *bytes);
int pi_dev_gemm(const pi_matrix *W, const float *x, int64_t n_tok, float *y, void *stream);
int pi_dev_sparse_gemm_rows(const pi_matrix *W, const int32_t *idx, int64_t n_idx,
                            const float *x, int64_t n_tok, float *y, void *stream);
int pi_dev_sparse_axpy_rows(const pi_matrix *Wt, const int32_t *idx, int64_t n_idx,
                            const float *h, int64_t n_tok, float *y, void *stream);
/* as pi_sparse_ffn, without n_skipped; a repeated index sets the duplicate flag; tok_mask (NULL, or
 * [n_tok, n_idx] bytes on the device) as there */
int pi_dev_sparse_ffn(const pi_matrix *gate, const pi_matrix *up, const pi_matrix *down_t,
                      int32_t act, const int32_t *idx, int64_t n_idx, const uint8_t *tok_mask,
                      const float *x, int64_t n_tok, float *y, int32_t accumulate,
                      float skip_threshold, void *stream);
/* logits [n_tok, fc2.rows] = fc2 . relu(fc1 . x[t]), the predictor of pi_predict before its threshold */
int pi_dev_predict_logits(const pi_matrix *fc1, const pi_matrix *fc2, const float *x, int64_t n_tok,
                          float *logits, void *stream);
/* ---- dense blocks of an offloaded layer (the residual stream stays on the device) */
/* as pi_rmsnorm; w is a device array of n floats */
int pi_dev_rmsnorm(const float *x, const float *w, int64_t n_tok, int64_t n, float eps, float *y, void *stream);
/* as pi_rope at the consecutive positions pos0 .. pos0 + n_tok - 1 */
int pi_dev_rope(float *x, int64_t pos0, int64_t n_tok, int64_t n_heads, int64_t head_dim, int64_t n_rot,
                float freq_base, int32_t neox, void *stream);
/* causal grouped-query attention of q [n_tok, n_head, head_dim] at positions n_past .. over the cache
 * rows k_cache / v_cache [kv_rows, n_head_kv, head_dim] (position-major on the device: a warp reads a
 * row's head_dim values side by side), of kv_type PI_TYPE_F32 or PI_TYPE_F16 (rows n_past .. n_past +
 * n_tok - 1 already hold the new tokens); out [n_tok, n_head * head_dim]. Needs n_past + n_tok <= kv_rows. */
int pi_dev_attention(const float *q, const void *k_cache, const void *v_cache, int32_t kv_type, int64_t kv_rows,
                     int64_t n_past, int64_t n_tok, int64_t n_head, int64_t n_head_kv, int64_t head_dim, float *out,
                     void *stream);
/* y[i] = x[i] as IEEE half bits, rounded to nearest even (numpy's astype(float16)), for i < n: new rows
 * of an F16 KV cache */
int pi_dev_to_f16(const float *x, uint16_t *y, int64_t n, void *stream);
/* y[i] += x[i] for i < n */
int pi_dev_add(float *y, const float *x, int64_t n, void *stream);
/* The predictor's active set split into the hot and cold partitions, on the device: neuron i is active
 * if logits[t, i] >= threshold for some token t (logits [n_tok, n_ff]); part[i] is its local id in the
 * hot partition (< n_local) or -1 (cold; part NULL: every neuron is cold). Writes the hot local ids and
 * the cold neuron ids, each ascending, to hot_out / cold_out (capacity n_ff each) and their counts to
 * counts[0] / counts[1] (device memory): only the cold list and two counts need to come back. */
int pi_dev_select(const float *logits, int64_t n_tok, int64_t n_ff, float threshold, const int32_t *part,
                  int64_t n_local, int32_t *hot_out, int32_t *cold_out, int32_t *counts, void *stream);
/* PI_DEVICE_CDEF_END */

#ifdef __cplusplus
}
#endif
#endif /* PI_BACKEND_H */
