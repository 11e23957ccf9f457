/*
 * A device library that does no device work, for measuring the host's share of a GPU decode step on a
 * machine without a GPU (ci/bench_device_host.py): it exports the pi_dev_* entry points of
 * include/pi_backend.h, keeps "device" memory in host memory, copies what is copied, and returns at
 * once from every op. pi_dev_select reports a fixed split (64 hot, 32 cold neurons) so that the engine
 * takes the hybrid path, cold partition included.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../../pi_backend/native/include/pi_backend.h"

#define EXPORT __attribute__((visibility("default")))

EXPORT int pi_dev_available(void) { return 1; }
EXPORT const char *pi_dev_name(void) { return "null (no-op device library)"; }
EXPORT const char *pi_dev_backend(void) { return "cuda"; }
EXPORT int pi_dev_sync(void *stream) { (void)stream; return PI_OK; }
EXPORT int pi_dev_malloc(void **ptr, int64_t bytes) {
    *ptr = bytes > 0 ? aligned_alloc(256, (size_t)(bytes + 255) / 256 * 256) : NULL;
    return bytes > 0 && !*ptr ? PI_ERR_NOMEM : PI_OK;
}
EXPORT int pi_dev_free(void *ptr) { free(ptr); return PI_OK; }
EXPORT int pi_dev_memcpy_h2d(void *dst, const void *src, int64_t n, void *s) { (void)s; memcpy(dst, src, (size_t)n); return PI_OK; }
EXPORT int pi_dev_memcpy_d2h(void *dst, const void *src, int64_t n, void *s) { (void)s; memcpy(dst, src, (size_t)n); return PI_OK; }
EXPORT int pi_dev_memcpy_d2d(void *dst, const void *src, int64_t n, void *s) { (void)s; memmove(dst, src, (size_t)n); return PI_OK; }
EXPORT int pi_dev_memset(void *dst, int32_t v, int64_t n, void *s) { (void)s; memset(dst, v, (size_t)n); return PI_OK; }
EXPORT int pi_dev_mem_info(int64_t *free_bytes, int64_t *total_bytes) { *free_bytes = *total_bytes = (int64_t)16 << 30; return PI_OK; }
EXPORT int pi_dev_mem_used(int64_t *bytes) { *bytes = 0; return PI_OK; }

EXPORT int pi_dev_gemm(const pi_matrix *W, const float *x, int64_t n_tok, float *y, void *s) {
    (void)W; (void)x; (void)n_tok; (void)y; (void)s; return PI_OK;
}
EXPORT int pi_dev_sparse_gemm_rows(const pi_matrix *W, const int32_t *idx, int64_t n_idx, const float *x, int64_t n_tok,
                                   float *y, void *s) {
    (void)W; (void)idx; (void)n_idx; (void)x; (void)n_tok; (void)y; (void)s; return PI_OK;
}
EXPORT int pi_dev_sparse_axpy_rows(const pi_matrix *Wt, const int32_t *idx, int64_t n_idx, const float *h, int64_t n_tok,
                                   float *y, void *s) {
    (void)Wt; (void)idx; (void)n_idx; (void)h; (void)n_tok; (void)y; (void)s; return PI_OK;
}
EXPORT int pi_dev_sparse_ffn(const pi_matrix *gate, const pi_matrix *up, const pi_matrix *down_t, int32_t act,
                             const int32_t *idx, int64_t n_idx, const uint8_t *tok_mask, const float *x, int64_t n_tok,
                             float *y, int32_t accumulate, float skip_threshold, void *s) {
    (void)gate; (void)up; (void)down_t; (void)act; (void)idx; (void)n_idx; (void)tok_mask; (void)x; (void)n_tok;
    (void)y; (void)accumulate; (void)skip_threshold; (void)s; return PI_OK;
}
EXPORT int pi_dev_predict_logits(const pi_matrix *fc1, const pi_matrix *fc2, const float *x, int64_t n_tok,
                                 float *logits, void *s) {
    (void)fc1; (void)fc2; (void)x; (void)n_tok; (void)logits; (void)s; return PI_OK;
}
EXPORT int pi_dev_rmsnorm(const float *x, const float *w, int64_t n_tok, int64_t n, float eps, float *y, void *s) {
    (void)x; (void)w; (void)n_tok; (void)n; (void)eps; (void)y; (void)s; return PI_OK;
}
EXPORT int pi_dev_rope(float *x, int64_t pos0, int64_t n_tok, int64_t n_heads, int64_t head_dim, int64_t n_rot,
                       float freq_base, int32_t neox, void *s) {
    (void)x; (void)pos0; (void)n_tok; (void)n_heads; (void)head_dim; (void)n_rot; (void)freq_base; (void)neox; (void)s;
    return PI_OK;
}
EXPORT int pi_dev_attention(const float *q, const void *k_cache, const void *v_cache, int32_t kv_type, int64_t kv_rows,
                            int64_t n_past, int64_t n_tok, int64_t n_head, int64_t n_head_kv, int64_t head_dim,
                            float *out, void *s) {
    (void)q; (void)k_cache; (void)v_cache; (void)kv_type; (void)kv_rows; (void)n_past; (void)n_tok; (void)n_head;
    (void)n_head_kv; (void)head_dim; (void)out; (void)s; return PI_OK;
}
EXPORT int pi_dev_to_f16(const float *x, uint16_t *y, int64_t n, void *s) { (void)x; (void)y; (void)n; (void)s; return PI_OK; }
EXPORT int pi_dev_add(float *y, const float *x, int64_t n, void *s) { (void)y; (void)x; (void)n; (void)s; return PI_OK; }
EXPORT int pi_dev_select(const float *logits, int64_t n_tok, int64_t n_ff, float threshold, const int32_t *part,
                         int64_t n_local, int32_t *hot_out, int32_t *cold_out, int32_t *counts, void *s) {
    (void)logits; (void)n_tok; (void)threshold; (void)part; (void)s;
    const int32_t n_hot = n_local < 64 ? (int32_t)n_local : 64, n_cold = n_ff < 32 ? (int32_t)n_ff : 32;
    for (int32_t i = 0; i < n_hot; i++) hot_out[i] = i;
    for (int32_t i = 0; i < n_cold; i++) cold_out[i] = (int32_t)(n_ff - 1 - i);
    counts[0] = n_hot;
    counts[1] = n_cold;
    return PI_OK;
}
