/* decode.c — one token through a llama-family model on the CPU in one call (pi_decode_step).
 *
 * The engine's decode pass (pi_backend/engine/model.py, Model.forward) is a loop over ~15 ops a layer.
 * From Python each op is a crossing that costs a few microseconds warm, and 10-30 us in a decode step,
 * where every op before it has just streamed megabytes of weights through the caches that Python's own
 * code and objects live in: ~0.7 ms of a 10.5 ms Q4_0 step of the 7B-shaped bench model. Here the same
 * public ops run in the same order with the same arguments, so a step gives the Python pass's bits;
 * only the crossings are gone. Each op still checks what it is given; pi_decode_step first checks that
 * the model's shapes fit together, so the scratch it sizes from them fits every op. */
#include "kernels.h"

#include <stdlib.h>

static int check_shape(const pi_matrix *m, int64_t rows, int64_t cols) {
    if (!m) return PI_ERR_NULL;
    return m->rows == rows && m->cols == cols ? PI_OK : PI_ERR_SHAPE;
}

static int check_layer(const pi_decode_model *m, const pi_decode_layer *L) {
    const int64_t e = m->n_embd, qd = m->n_head * m->head_dim, kvd = m->n_head_kv * m->head_dim;
    int rc;
    if (!L->attn_norm || !L->ffn_norm || !L->k_cache || !L->v_cache) return PI_ERR_NULL;
    if ((rc = check_shape(L->wq, qd, e)) || (rc = check_shape(L->wk, kvd, e)) || (rc = check_shape(L->wv, kvd, e)) ||
        (rc = check_shape(L->wo, e, qd)) || (rc = check_shape(L->up, m->n_ff, e)) ||
        (rc = check_shape(L->down_t, m->n_ff, e)))
        return rc;
    if (m->act != PI_ACT_RELU && m->act != PI_ACT_GELU) {
        if ((rc = check_shape(L->gate, m->n_ff, e))) return rc;
    } else if (L->gate) {
        return PI_ERR_SHAPE; /* the ungated kinds take no gate */
    }
    if (!L->fc1 != !L->fc2) return PI_ERR_NULL; /* a predictor is both matrices or neither */
    if (L->fc1 && ((rc = check_shape(L->fc1, L->fc1->rows, e)) || (rc = check_shape(L->fc2, m->n_ff, L->fc1->rows))))
        return rc;
    return PI_OK;
}

/* every size in [1, DIM_MAX]: the scratch's byte count cannot overflow, and neuron ids fit int32 */
#define DIM_MAX INT32_MAX
#define IN_RANGE(v) ((v) > 0 && (v) <= DIM_MAX)

static int check_model(const pi_decode_model *m) {
    if (!m || !m->token_embd || !m->output || !m->output_norm || (m->n_layer > 0 && !m->layers)) return PI_ERR_NULL;
    if (!IN_RANGE(m->n_embd) || !IN_RANGE(m->n_head) || !IN_RANGE(m->n_head_kv) || !IN_RANGE(m->head_dim) ||
        !IN_RANGE(m->n_ff) || !IN_RANGE(m->kv_rows) || m->n_layer < 0 || m->n_head > DIM_MAX / m->head_dim ||
        m->n_head % m->n_head_kv || m->n_rot <= 0 || m->n_rot > m->head_dim || m->n_rot % 2)
        return PI_ERR_SHAPE;
    if (m->kv_type != PI_TYPE_F32 && m->kv_type != PI_TYPE_F16) return PI_ERR_TYPE;
    if (m->act < PI_ACT_REGLU || m->act > PI_ACT_GELU) return PI_ERR_TYPE;
    int rc;
    if ((rc = check_shape(m->token_embd, m->token_embd->rows, m->n_embd)) ||
        (rc = check_shape(m->output, m->output->rows, m->n_embd)))
        return rc;
    for (int32_t i = 0; i < m->n_layer; i++)
        if ((rc = check_layer(m, &m->layers[i]))) return rc;
    return PI_OK;
}

/* one layer: x += attention(rmsnorm(x)); x += ffn(rmsnorm(x)), as Model.forward does it for one token */
/* idx: room for the predictor's set; all: every neuron's id (layers without a predictor) */
static int decode_layer(const pi_decode_model *m, const pi_decode_layer *L, float *x, int64_t n_past, float *s,
                        int32_t *idx, const int32_t *all, int64_t *count, int nt) {
    const int64_t e = m->n_embd, qd = m->n_head * m->head_dim, kvd = m->n_head_kv * m->head_dim;
    float *h = s, *q = h + e, *k = q + qd, *v = k + kvd, *att = v + kvd, *o = att + qd;
    const int32_t pos = (int32_t)n_past;
    int rc;
    if ((rc = pi_rmsnorm(x, L->attn_norm, 1, e, m->norm_eps, h)) || (rc = pi_gemm(L->wq, h, 1, q, nt)) ||
        (rc = pi_gemm(L->wk, h, 1, k, nt)) || (rc = pi_gemm(L->wv, h, 1, v, nt)) ||
        (rc = pi_rope(q, &pos, 1, m->n_head, m->head_dim, m->n_rot, m->rope_freq_base, 0)) ||
        (rc = pi_rope(k, &pos, 1, m->n_head_kv, m->head_dim, m->n_rot, m->rope_freq_base, 0)) ||
        (rc = pi_kv_store(L->k_cache, m->kv_type, m->kv_rows, m->n_head_kv, m->head_dim, n_past, k, 1)) ||
        (rc = pi_kv_store(L->v_cache, m->kv_type, m->kv_rows, m->n_head_kv, m->head_dim, n_past, v, 1)) ||
        (rc = pi_attention(q, L->k_cache, L->v_cache, m->kv_type, m->kv_rows, n_past, 1, m->n_head, m->n_head_kv,
                           m->head_dim, att, nt)) ||
        (rc = pi_gemm(L->wo, att, 1, o, nt)))
        return rc;
    for (int64_t i = 0; i < e; i++) x[i] += o[i];
    /* the FFN: the predictor reads the residual stream, the kernel its norm (h); y = o's room */
    if ((rc = pi_rmsnorm(x, L->ffn_norm, 1, e, m->norm_eps, h))) return rc;
    int64_t n_idx = m->n_ff, skipped = 0;
    if (L->fc1 && (rc = pi_predict(L->fc1, L->fc2, x, 1, L->threshold, idx, m->n_ff, &n_idx, NULL, nt))) return rc;
    if ((rc = pi_sparse_ffn(L->gate, L->up, L->down_t, m->act, L->fc1 ? idx : all, n_idx, NULL, h, 1, o, 0,
                            L->skip_threshold, &skipped, nt)))
        return rc;
    for (int64_t i = 0; i < e; i++) x[i] += o[i];
    count[0] = n_idx;
    count[1] = skipped;
    return PI_OK;
}

int pi_decode_step(const pi_decode_model *m, int32_t token, int64_t n_past, float *logits, int64_t *counts,
                   int n_threads) {
    int rc = check_model(m);
    if (rc) return rc;
    if (!logits || (m->n_layer > 0 && !counts)) return PI_ERR_NULL;
    if (token < 0 || token >= m->token_embd->rows) return PI_ERR_INDEX;
    if (n_past < 0 || n_past >= m->kv_rows) return PI_ERR_SHAPE;
    const int64_t e = m->n_embd, qd = m->n_head * m->head_dim, kvd = m->n_head_kv * m->head_dim;
    /* x, then the layer's scratch: h, q, k, v, att, o; the predicted set, then every neuron's id */
    float *x = malloc((size_t)(2 * e + 2 * qd + 2 * kvd + e) * sizeof(float));
    int32_t *idx = malloc((size_t)m->n_ff * 2 * sizeof(int32_t)), *all = idx ? idx + m->n_ff : NULL;
    if (!x || !idx) { free(x); free(idx); return PI_ERR_NOMEM; }
    for (int32_t i = 0; i < m->n_layer; i++)
        if (!m->layers[i].fc1) { /* some layer lists every neuron: the list, once a step */
            for (int64_t j = 0; j < m->n_ff; j++) all[j] = (int32_t)j;
            break;
        }
    rc = pi_dequantize_rows(m->token_embd, &token, 1, x);
    for (int32_t i = 0; i < m->n_layer && !rc; i++)
        rc = decode_layer(m, &m->layers[i], x, n_past, x + e, idx, all, counts + 2 * i, n_threads);
    if (!rc && !(rc = pi_rmsnorm(x, m->output_norm, 1, e, m->norm_eps, x + e)))
        rc = pi_gemm(m->output, x + e, 1, logits, n_threads);
    free(x);
    free(idx);
    return rc;
}
