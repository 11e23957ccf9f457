"""Every CPU kernel x weight type x ISA variant against numpy, on values dequantized by `gguf`.

Q8_0 and Q4_0 rows are multiplied with activations quantized to Q8_0 blocks once per token, as
llama.cpp does (its vec_dot_type), so their reference is computed on the activations as llama.cpp's
x86 backend quantizes them (q8_activations); every ISA variant must reproduce that quantization bit for
bit (test_activation_quantization_is_llama_cpps). The down projection (axpy) keeps float activations.
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT
from gguf import quants

from pi_backend import native
from tests.native_helpers import (CPU_TYPES, QUANT_TYPES, act_ref, assert_close, attention_np, make_matrix,
                                  q8_activations, quant_probe_activations, valid_cols)

TYPE_IDS = [native.TYPE_NAMES[t] for t in CPU_TYPES]
def relu(v):
    return np.maximum(v, 0)


def silu(v):
    return v / (1 + np.exp(-v))


def gelu_tanh(v):
    return 0.5 * v * (1 + np.tanh(0.7978845608 * (v + 0.044715 * v**3)))


def ffn_reference(act, g_ref, u_ref, d_ref, x, idx, wtype=native.TYPE_F32):
    """Dense numpy FFN restricted to the neurons in idx (float64); gate and up see the activations as
    rows of `wtype` do (act_ref), the down projection takes h unquantized."""
    x64 = act_ref(x, wtype)
    u = x64 @ u_ref[idx].T.astype(np.float64)
    if act in ("relu", "gelu"):  # ungated
        h = relu(u) if act == "relu" else gelu_tanh(u)
    else:
        g = x64 @ g_ref[idx].T.astype(np.float64)
        a = {"reglu": relu, "drelu": relu, "swiglu": silu, "geglu": gelu_tanh}[act](g)
        h = a * (relu(u) if act == "drelu" else u)
    return h @ d_ref[idx].astype(np.float64)


@pytest.mark.parametrize("wtype", CPU_TYPES, ids=TYPE_IDS)
@pytest.mark.parametrize("rows,cols", [(37, 96), (8, 67), (1, 32), (130, 257)])
@pytest.mark.parametrize("n_tok", [1, 3, 17])
def test_gemm_matches_numpy(isa, wtype, rows, cols, n_tok):
    rng = np.random.default_rng(rows * 1000 + cols + n_tok)
    cols = valid_cols(wtype, cols)
    W, ref = make_matrix(rng, rows, cols, wtype)
    x = rng.standard_normal((n_tok, cols)).astype(np.float32)
    xr = act_ref(x, wtype)
    assert_close(native.gemm(W, x), xr @ ref.T.astype(np.float64))
    assert_close(native.gemm(W, x[0]), xr[0] @ ref.T.astype(np.float64))


@pytest.mark.parametrize("wtype", CPU_TYPES, ids=TYPE_IDS)
@pytest.mark.parametrize("n_tok", [1, 5])
def test_sparse_rows_reads_only_listed_rows(isa, wtype, n_tok):
    rng = np.random.default_rng(7)
    rows, cols = 200, valid_cols(wtype, 160)
    W, ref = make_matrix(rng, rows, cols, wtype)
    x = rng.standard_normal((n_tok, cols)).astype(np.float32)
    for idx in (np.array([], np.int32), np.array([5, 5, 199, 0, 17], np.int32),
                np.arange(rows, dtype=np.int32), rng.choice(rows, 23, replace=False).astype(np.int32)):
        y = native.sparse_rows(W, idx, x)
        assert y.shape == (n_tok, idx.size)
        assert_close(y, act_ref(x, wtype) @ ref[idx].T.astype(np.float64))


@pytest.mark.parametrize("wtype", CPU_TYPES, ids=TYPE_IDS)
@pytest.mark.parametrize("n_tok", [1, 3])
def test_a_rows_result_does_not_depend_on_its_neighbours(isa, wtype, n_tok):
    """Rows go through the kernels four at a time (dot4) and one at a time for the rest of a chunk;
    both must give the same bits, so a row's value never depends on where it sits in an index list
    (the oracle-equals-dense guarantee rests on it)."""
    rng = np.random.default_rng(8)
    rows, cols = 61, valid_cols(wtype, 1056)
    W, _ = make_matrix(rng, rows, cols, wtype)
    x = rng.standard_normal((n_tok, cols)).astype(np.float32)
    dense = native.gemm(W, x)
    for idx in (rng.permutation(rows).astype(np.int32), np.array([7], np.int32), np.arange(1, 6, dtype=np.int32)):
        np.testing.assert_array_equal(native.sparse_rows(W, idx, x), dense[:, idx])


@pytest.mark.parametrize("wtype", QUANT_TYPES, ids=["Q8_0", "Q4_0", "Q4_0X16"])
def test_activation_quantization_is_llama_cpps(isa, wtype):
    """A one-hot weight row j makes y[j] = w_jj * (the quantized x_j), so every activation value the
    kernel used is read back: each ISA variant must quantize exactly as q8_activations (one q off by
    one moves y by >= 1/127 relative, one fp16 step of d by 1/1024; the tolerance only absorbs float
    rounding)."""
    rng = np.random.default_rng(8)
    x4 = wtype == native.TYPE_Q4_0X16
    x = quant_probe_activations(rng, 32 if x4 else 24)  # Q4_0X16: whole runs of 16 blocks
    n = x.size
    eye = np.eye(n, dtype=np.float32)
    gt = GT.Q8_0 if wtype == native.TYPE_Q8_0 else GT.Q4_0
    raw = np.ascontiguousarray(quants.quantize(eye, gt))
    W = native.Matrix(raw, native.TYPE_Q4_0 if x4 else wtype, n, n)
    W = native.convert(W, wtype) if x4 else W
    diag = np.diag(quants.dequantize(raw, gt).reshape(n, n)).astype(np.float64)
    want = act_ref(x, wtype) * diag
    for got in (native.gemm(W, x), native.gemm(W, np.stack([x, x]))[1],
                native.sparse_rows(W, np.arange(n, dtype=np.int32)[::-1].copy(), x)[::-1]):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-30)
    # the reference itself: gguf's quantizer agrees except on the blocks built to tell them apart
    gguf_x = quants.dequantize(quants.quantize(x, GT.Q8_0), GT.Q8_0).reshape(-1, 32)
    differs = np.flatnonzero((gguf_x != q8_activations(x).reshape(-1, 32)).any(axis=1))
    assert set(differs) == {1, 2, 9}


@pytest.mark.parametrize("wtype", CPU_TYPES, ids=TYPE_IDS)
def test_nonfinite_activations_propagate(isa, wtype):
    """An inf or NaN activation makes every output non-finite, for quantized rows as for float ones."""
    rng = np.random.default_rng(9)
    cols = valid_cols(wtype, 96)
    W, _ = make_matrix(rng, 5, cols, wtype)
    for bad in (np.inf, np.nan):
        x = rng.standard_normal(cols).astype(np.float32)
        x[37] = bad
        assert not np.isfinite(native.gemm(W, x)).any()


@pytest.mark.parametrize("wtype", CPU_TYPES, ids=TYPE_IDS)
@pytest.mark.parametrize("n_tok", [1, 4])
@pytest.mark.parametrize("cols", [512, 96, 1056])
def test_sparse_axpy_accumulates_rows(isa, wtype, n_tok, cols):
    rng = np.random.default_rng(cols + n_tok)
    rows = 300
    cols = valid_cols(wtype, cols)
    Wt, ref = make_matrix(rng, rows, cols, wtype)
    idx = np.array([3, 250, 3, 7, 299, 0], np.int32)  # a repeated index counts once per occurrence
    h = rng.standard_normal((n_tok, idx.size)).astype(np.float32)
    h[:, 1] = 0.0  # zero weights are skipped, not read
    y0 = rng.standard_normal((n_tok, cols)).astype(np.float32)
    y = native.sparse_axpy(Wt, idx, h, y0.copy())
    assert_close(y, y0 + h.astype(np.float64) @ ref[idx].astype(np.float64))
    same = native.sparse_axpy(Wt, np.array([], np.int32), np.zeros((n_tok, 0), np.float32), y0.copy())
    np.testing.assert_array_equal(same, y0)
    # many rows: several kernel groups, each prefetching the next, and per-token zero weights
    idx = rng.integers(0, rows, 150).astype(np.int32)
    h = rng.standard_normal((n_tok, idx.size)).astype(np.float32)
    h[rng.random(h.shape) < 0.3] = 0.0
    for n_threads in (1, 2):
        y = native.sparse_axpy(Wt, idx, h, y0.copy(), n_threads=n_threads)
        assert_close(y, y0 + h.astype(np.float64) @ ref[idx].astype(np.float64))


@pytest.mark.parametrize("wtype", CPU_TYPES, ids=TYPE_IDS)
@pytest.mark.parametrize("act", ["reglu", "drelu", "relu", "swiglu", "geglu", "gelu"])
@pytest.mark.parametrize("n_tok", [1, 6, 21])  # 21: past the kernel's 16-token slices
def test_sparse_ffn_matches_dense_reference(isa, wtype, act, n_tok):
    rng = np.random.default_rng(11 + n_tok)
    n_ff, n_embd = 256, valid_cols(wtype, 128)
    gate, g_ref = make_matrix(rng, n_ff, n_embd, wtype, 0.2)
    up, u_ref = make_matrix(rng, n_ff, n_embd, wtype, 0.2)
    down, d_ref = make_matrix(rng, n_ff, n_embd, wtype, 0.2)
    x = rng.standard_normal((n_tok, n_embd)).astype(np.float32)
    g = None if act in native.UNGATED_ACTIVATIONS else gate
    for idx in (np.arange(n_ff, dtype=np.int32), np.sort(rng.choice(n_ff, 40, replace=False)).astype(np.int32),
                np.array([200, 3, 77], np.int32)):
        y = native.sparse_ffn(g, up, down, x, idx, act=act)
        assert_close(y, ffn_reference(act, g_ref, u_ref, d_ref, x, idx, wtype), rtol=5e-5)
    # the empty set contributes nothing; accumulate adds onto what is there
    y0 = rng.standard_normal((n_tok, n_embd)).astype(np.float32)
    np.testing.assert_array_equal(native.sparse_ffn(g, up, down, x, np.array([], np.int32), act=act,
                                                    out=y0.copy(), accumulate=True), y0)
    idx = np.arange(0, n_ff, 3, dtype=np.int32)
    y = native.sparse_ffn(g, up, down, x, idx, act=act, out=y0.copy(), accumulate=True)
    assert_close(y, y0 + ffn_reference(act, g_ref, u_ref, d_ref, x, idx, wtype), rtol=5e-5)


def test_relu_ffn_skips_neurons_that_do_not_fire(isa):
    """Oracle-exactness: for ReLU models, reading only the neurons that fire gives the dense result,
    and neurons listed but silent are counted as skipped (their up/down rows are never read)."""
    rng = np.random.default_rng(3)
    n_ff, n_embd = 512, 64
    gate, g_ref = make_matrix(rng, n_ff, n_embd, native.TYPE_F32)
    up, u_ref = make_matrix(rng, n_ff, n_embd, native.TYPE_F32)
    down, d_ref = make_matrix(rng, n_ff, n_embd, native.TYPE_F32)
    x = rng.standard_normal(n_embd).astype(np.float32)
    all_idx = np.arange(n_ff, dtype=np.int32)
    dense, skipped = native.sparse_ffn(gate, up, down, x, all_idx, return_skipped=True)
    firing = np.flatnonzero(x @ g_ref.T > 0).astype(np.int32)
    assert skipped == n_ff - firing.size
    np.testing.assert_array_equal(native.sparse_ffn(gate, up, down, x, firing), dense)


def test_swiglu_skip_threshold_is_the_cats_cut(isa):
    rng = np.random.default_rng(4)
    n_ff, n_embd = 300, 64
    gate, g_ref = make_matrix(rng, n_ff, n_embd, native.TYPE_F32)
    up, u_ref = make_matrix(rng, n_ff, n_embd, native.TYPE_F32)
    down, d_ref = make_matrix(rng, n_ff, n_embd, native.TYPE_F32)
    x = rng.standard_normal((1, n_embd)).astype(np.float32)
    a = silu(x.astype(np.float64) @ g_ref.T)[0]
    thr = float(np.quantile(np.abs(a), 0.6))
    keep = np.flatnonzero(np.abs(a) > thr).astype(np.int32)
    y, skipped = native.sparse_ffn(gate, up, down, x, np.arange(n_ff, dtype=np.int32), act="swiglu",
                                   skip_threshold=thr, return_skipped=True)
    assert skipped == n_ff - keep.size
    assert_close(y, ffn_reference("swiglu", g_ref, u_ref, d_ref, x, keep), rtol=5e-5)


@pytest.mark.parametrize("wtype", CPU_TYPES, ids=TYPE_IDS)
@pytest.mark.parametrize("n_tok", [1, 3])
def test_predictor_matches_numpy(isa, wtype, n_tok):
    rng = np.random.default_rng(21)
    n_embd, rank, n_ff = valid_cols(wtype, 96), valid_cols(wtype, 32), 500
    fc1, f1 = make_matrix(rng, rank, n_embd, wtype, 0.3)
    fc2, f2 = make_matrix(rng, n_ff, rank, wtype, 0.3)
    x = rng.standard_normal((n_tok, n_embd)).astype(np.float32)
    logits = act_ref(relu(act_ref(x, wtype) @ f1.T), wtype) @ f2.T
    for thr in (0.0, 1.5, -1.0):
        got = native.predict(fc1, fc2, x, thr)
        want = np.flatnonzero((logits >= thr).any(axis=0))
        # values within float noise of the threshold may land either side
        near = np.flatnonzero(np.abs(logits - thr).min(axis=0) < 1e-3 * max(1, np.abs(logits).max()))
        assert set(got) ^ set(want) <= set(near)
        assert np.all(np.diff(got) > 0)


def test_predictor_batch_is_the_union_even_past_a_nan_token(isa):
    """A batch lists a neuron when any token's logit reaches the threshold; a token whose logits are NaN
    (an overflowed activation) lists nothing and must not hide the other tokens' neurons."""
    rng = np.random.default_rng(22)
    fc1, _ = make_matrix(rng, 32, 64, native.TYPE_F32, 0.3)
    fc2, _ = make_matrix(rng, 300, 32, native.TYPE_F32, 0.3)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    x[1, 5] = np.nan
    union = set(native.predict(fc1, fc2, x[[0]], 0.2)) | set(native.predict(fc1, fc2, x[[2]], 0.2))
    assert native.predict(fc1, fc2, x[[1]], 0.2).size == 0
    assert list(native.predict(fc1, fc2, x, 0.2)) == sorted(union)
    assert list(native.predict(fc1, fc2, x[[1, 0, 2]], 0.2)) == sorted(union)


@pytest.mark.parametrize("wtype", CPU_TYPES, ids=TYPE_IDS)
def test_results_do_not_depend_on_thread_count(isa, wtype):
    rng = np.random.default_rng(5)
    n_ff, n_embd = 1024, valid_cols(wtype, 520)  # 520: float rows split between threads at any column
    mats = [make_matrix(rng, n_ff, n_embd, wtype)[0] for _ in range(3)]
    x = rng.standard_normal((3, n_embd)).astype(np.float32)
    idx = np.sort(rng.choice(n_ff, 300, replace=False)).astype(np.int32)
    outs = [native.sparse_ffn(*mats, x, idx, n_threads=n) for n in (1, 2, 3)]
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])
    g = [native.gemm(mats[0], x, n_threads=n) for n in (1, 2)]
    np.testing.assert_array_equal(g[0], g[1])


def test_rmsnorm_and_rope_match_numpy():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    w = rng.standard_normal(64).astype(np.float32)
    want = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5) * w
    assert_close(native.rmsnorm(x, w, 1e-5), want)

    n_tok, n_heads, hd = 4, 3, 16
    q = rng.standard_normal((n_tok, n_heads, hd)).astype(np.float32)
    pos = np.array([0, 1, 7, 100], np.int32)
    for neox in (False, True):
        got = native.rope(q.copy(), pos, hd, 10000.0, neox=neox)
        inv = 10000.0 ** (-np.arange(0, hd, 2) / hd)
        ang = pos[:, None] * inv[None, :]
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        if neox:
            a, b = q[..., : hd // 2], q[..., hd // 2:]
            want = np.concatenate([a * cos - b * sin, a * sin + b * cos], -1)
        else:
            a, b = q[..., 0::2], q[..., 1::2]
            want = np.stack([a * cos - b * sin, a * sin + b * cos], -1).reshape(q.shape)
        np.testing.assert_allclose(got, want, atol=2e-4)


@pytest.mark.parametrize("kv_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("n_head, n_head_kv, d", [(8, 2, 128), (12, 4, 48), (10, 2, 64), (16, 2, 16), (6, 3, 256),
                                                  (7, 1, 32)])
def test_grouped_query_heads_get_the_bits_they_get_alone(isa, n_head, n_head_kv, d, kv_dtype):
    """Query heads sharing a KV head (GQA; MQA with one KV head) go through one kernel per group of up to 4
    (AVX-512), each K and V vector read once for them: every head must get exactly the bits the per-head
    kernel gives it over a cache where its KV head is its own (the KV heads repeated). Groups of 2..8
    heads (sub-groups of 4 and a remainder), row counts around the 4-row score blocks, head sizes with
    1..16 vectors."""
    rng = np.random.default_rng(n_head * 31 + d)
    group = n_head // n_head_kv
    for n_tok, n_past in ((1, 0), (1, 13), (5, 37), (3, 2)):
        rows = n_past + n_tok + 2
        q = rng.standard_normal((n_tok, n_head, d)).astype(np.float32)
        K = rng.standard_normal((n_head_kv, rows, d)).astype(kv_dtype)
        V = rng.standard_normal((n_head_kv, rows, d)).astype(kv_dtype)
        got = native.attention(q, K, V, n_past, n_threads=2)
        alone = native.attention(q, np.repeat(K, group, axis=0), np.repeat(V, group, axis=0), n_past, n_threads=1)
        np.testing.assert_array_equal(got, alone)
        assert_close(got, attention_np(q, K.transpose(1, 0, 2).astype(np.float32),
                                       V.transpose(1, 0, 2).astype(np.float32), n_past), rtol=1e-5)


def _float16_specials(rng) -> np.ndarray:
    """float32 values of every class for half rounding: random bit patterns (every exponent), exact
    ties between two halves, the subnormal range and its underflow, the overflow edge, zeros, inf."""
    bits = rng.integers(0, 2**32, 50_000, dtype=np.uint64).astype(np.uint32)
    ties = (rng.integers(0x33000000, 0x47800000, 5_000).astype(np.uint32) & ~np.uint32(0x1FFF)) | np.uint32(0x1000)
    special = np.array([0.0, -0.0, 65504.0, 65519.99, 65520.0, -65520.0, 1e6, 2.0**-14, 2.0**-24, 2.0**-25,
                        1.5 * 2.0**-25, 2.0**-26, 3 * 2.0**-25, 6.1e-5, np.inf, -np.inf], np.float32)
    x = np.concatenate([bits.view(np.float32), ties.view(np.float32), special])
    return x[~np.isnan(x)]


@pytest.mark.parametrize("kv_dtype", [np.float16, np.float32])
def test_kv_store_writes_the_head_major_cache(isa, kv_dtype):
    """New tokens' K/V into [n_head_kv, kv_rows, d]: each (token, head) row at its position, rounded to
    float16 exactly as numpy's astype (every class of value; F16C on AVX2 / AVX-512, integer rounding in
    the scalar variant), nothing else in the cache touched."""
    rng = np.random.default_rng(17)
    vals = _float16_specials(rng)
    n_tok, n_head_kv, rows, d = 5, 3, 12, 40  # d = 40: F16C's 16- and 8-wide steps and a scalar tail
    x = rng.choice(vals, (n_tok, n_head_kv, d)).astype(np.float32)
    cache = np.full((n_head_kv, rows, d), 7, kv_dtype)
    with np.errstate(over="ignore"):
        want = x.astype(kv_dtype)
    assert native.kv_store(cache, 6, x) is cache
    np.testing.assert_array_equal(cache[:, 6:11].view(np.uint8), want.transpose(1, 0, 2).view(np.uint8))
    assert (cache[:, :6] == 7).all() and (cache[:, 11:] == 7).all()
    if kv_dtype == np.float16:  # every value class, one long row (the vector loops and the tail alike)
        big = np.zeros((1, vals.size + 3), np.float16)[None]
        xs = np.concatenate([vals, vals[:3]]).reshape(1, 1, -1)
        native.kv_store(big.reshape(1, 1, -1), 0, xs)
        with np.errstate(over="ignore"):
            np.testing.assert_array_equal(big.reshape(-1).view(np.uint16), xs.reshape(-1).astype(np.float16).view(np.uint16))
    with pytest.raises(ValueError, match="pos0"):
        native.kv_store(cache, rows - n_tok + 1, x)
    with pytest.raises(ValueError, match="x: shape"):
        native.kv_store(cache, 0, x[:, :2].copy())
    with pytest.raises(TypeError, match="x"):
        native.kv_store(cache, 0, x.astype(np.float64))
    with pytest.raises(TypeError, match="cache"):
        native.kv_store(cache.astype(np.float64), 0, x)
    readonly = cache.copy()
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="cache: must be writable"):
        native.kv_store(readonly, 0, x)


def test_isa_selection_and_info():
    info = native.info()
    assert info["isa"] in info["available_isas"]
    assert "scalar" in native.available_isas()
    with pytest.raises(ValueError, match="isa"):
        native.set_isa("sse9")
    native.set_num_threads(2)
    assert native.get_num_threads() == 2
    with pytest.raises(ValueError, match="n"):
        native.set_num_threads(0)


@pytest.mark.parametrize("n_tok, n_past, n_head, n_head_kv, d", [(1, 0, 4, 4, 16), (1, 37, 8, 2, 64),
                                                                  (5, 9, 4, 1, 32), (40, 300, 8, 4, 128),
                                                                  (3, 14, 4, 2, 80), (2, 15, 2, 2, 256)])
def test_attention_matches_numpy(isa, n_tok, n_past, n_head, n_head_kv, d):
    """Every variant (AVX-512: the scores 16 rows at a time and a vectorised softmax where d is a
    multiple of 16; d = 80 takes the general path), across row counts around 16."""
    rng = np.random.default_rng(n_tok + n_past)
    rows = n_past + n_tok + 3  # rows past the visible ones hold garbage that must not be read
    q = rng.standard_normal((n_tok, n_head, d)).astype(np.float32)
    K = rng.standard_normal((n_head_kv, rows, d)).astype(np.float32)  # head-major, as the engine's cache
    V = rng.standard_normal((n_head_kv, rows, d)).astype(np.float32)
    pos_major = lambda a: a.transpose(1, 0, 2)  # noqa: E731  (the reference's layout)
    want = attention_np(q, pos_major(K), pos_major(V), n_past)
    for n_threads in (1, 2):
        assert_close(native.attention(q, K, V, n_past, n_threads=n_threads), want, rtol=1e-5)
    # an f16 cache (llama.cpp's default): the same function of the values it holds
    K16, V16 = K.astype(np.float16), V.astype(np.float16)
    want16 = attention_np(q, pos_major(K16.astype(np.float32)), pos_major(V16.astype(np.float32)), n_past)
    for n_threads in (1, 2):
        assert_close(native.attention(q, K16, V16, n_past, n_threads=n_threads), want16, rtol=1e-5)
    with pytest.raises(ValueError, match="n_past"):
        native.attention(q, K, V, rows - n_tok + 1)
    with pytest.raises(ValueError, match="do not fit"):
        native.attention(q, K[:, :, :-1].copy(), V, n_past)
    with pytest.raises(TypeError, match="v_cache"):
        native.attention(q, K16, V, n_past)  # one type for both
    with pytest.raises(TypeError, match="k_cache"):
        native.attention(q, K.astype(np.float64), V, n_past)


def test_q4_0x16_is_q4_0_regrouped_both_ways():
    """Q4_0 -> Q4_0X16 -> Q4_0 gives back the same bytes, into a new buffer or in place; each run of
    16 blocks keeps its bytes (scales first, then the nibbles as the header's slabs say)."""
    rng = np.random.default_rng(31)
    W, ref = make_matrix(rng, 9, 1024, native.TYPE_Q4_0)
    raw = W.buffer.reshape(-1).view(np.uint8)
    X = native.convert(W, native.TYPE_Q4_0X16)
    assert X.nbytes == W.nbytes and X.row_stride == W.row_stride
    run = X.buffer[:288]
    blocks = raw[:288].reshape(16, 18)
    np.testing.assert_array_equal(run[:32].reshape(16, 2), blocks[:, :2])  # the 16 scales
    slabs = run[32:].reshape(4, 16, 4)  # slab m, lane l = qs[4m:4m+4] of block l
    np.testing.assert_array_equal(slabs, blocks[:, 2:].reshape(16, 4, 4).transpose(1, 0, 2))
    np.testing.assert_array_equal(native.convert(X, native.TYPE_Q4_0).buffer, raw)
    np.testing.assert_array_equal(native.dequantize_rows(X), ref)
    buf = X.buffer.copy()
    inplace = native.convert(native.Matrix(buf, native.TYPE_Q4_0X16, 9, 1024), native.TYPE_Q4_0, out=buf)
    assert inplace.buffer.ctypes.data == buf.ctypes.data
    np.testing.assert_array_equal(buf, raw)


def test_q4_0x16_conversion_refuses_what_it_cannot_do():
    rng = np.random.default_rng(32)
    W, _ = make_matrix(rng, 4, 1024, native.TYPE_Q4_0)
    with pytest.raises(ValueError, match="cols: 96"):
        native.convert(make_matrix(rng, 4, 96, native.TYPE_Q4_0)[0], native.TYPE_Q4_0X16)
    with pytest.raises(ValueError, match="only Q4_0 <-> Q4_0X16"):
        native.convert(make_matrix(rng, 4, 1024, native.TYPE_F16)[0], native.TYPE_Q4_0X16)
    with pytest.raises(ValueError, match="out: 100 bytes"):
        native.convert(W, native.TYPE_Q4_0X16, out=np.zeros(100, np.uint8))
    with pytest.raises(ValueError, match="out: may overlap"):  # a shifted overlap would read converted bytes
        big = np.zeros(W.nbytes + 288, np.uint8)
        big[:W.nbytes] = W.buffer.reshape(-1).view(np.uint8)
        native.convert(native.Matrix(big, native.TYPE_Q4_0, 4, 1024), native.TYPE_Q4_0X16, out=big[288:])
    with pytest.raises(ValueError, match="Q4_0X16"):  # a view of a Q4_0X16 matrix needs whole runs
        native.Matrix(np.zeros(4 * 288, np.uint8), native.TYPE_Q4_0X16, 4, 256)
    # the C side checks on its own: a buffer one byte short
    m = native.Matrix(np.zeros(4 * 576, np.uint8), native.TYPE_Q4_0X16, 4, 1024)
    out = np.zeros(4 * 576 - 1, np.uint8)
    rc = native.lib.pi_convert_rows(m._desc, native.TYPE_Q4_0, native.ffi.from_buffer(out), out.nbytes, 1)
    assert rc == native.lib.PI_ERR_CAPACITY


@pytest.mark.parametrize("wtype", CPU_TYPES, ids=TYPE_IDS)
def test_a_batch_gives_each_token_its_own_result(isa, wtype):
    """Batched calls read each row once for several tokens (Q4_0X16 on AVX-512: a kernel that unpacks
    a row's bytes once for up to PI_DOT_TOK_MAX tokens); every token's result must be the bits it gets
    alone, or prefill and decode would disagree."""
    rng = np.random.default_rng(41)
    rows, cols = 37, valid_cols(wtype, 1024)
    W, _ = make_matrix(rng, rows, cols, wtype)
    x = rng.standard_normal((11, cols)).astype(np.float32)
    alone = np.stack([native.gemm(W, x[t]) for t in range(len(x))])
    np.testing.assert_array_equal(native.gemm(W, x), alone)
    idx = rng.permutation(rows)[:13].astype(np.int32)
    np.testing.assert_array_equal(native.sparse_rows(W, idx, x), alone[:, idx])
    gate, up, down = (make_matrix(rng, 64, cols, wtype, 0.3)[0] for _ in range(3))
    fidx = np.arange(0, 64, 2, dtype=np.int32)
    batch = native.sparse_ffn(gate, up, down, x, fidx)
    np.testing.assert_array_equal(batch, np.stack([native.sparse_ffn(gate, up, down, x[t:t + 1], fidx)[0]
                                                   for t in range(len(x))]))


@pytest.mark.parametrize("wtype", [native.TYPE_F32, native.TYPE_F16, native.TYPE_BF16], ids=["F32", "F16", "BF16"])
@pytest.mark.parametrize("cols", [2085, 1088, 48])
def test_float_batch_blocks_keep_each_tokens_bits(isa, wtype, cols):
    """Float batches go through the rows x tokens kernel: the columns in blocks of 1024 with the
    accumulators kept between them, groups of up to 16 rows and 4 tokens. Across block boundaries,
    partial groups, the vector remainder and the scalar tail, each token keeps the bits it gets alone;
    an x 16 bytes past a cache line (numpy's usual placement) is taken through an aligned copy."""
    rng = np.random.default_rng(cols)
    W, ref = make_matrix(rng, 70, cols, wtype)
    buf = np.zeros(9 * cols + 16, np.float32)
    start = ((-buf.ctypes.data) % 64) // 4 + 4  # 16 bytes past a 64-byte line
    x = buf[start:start + 9 * cols].reshape(9, cols)
    x[...] = rng.standard_normal((9, cols))
    alone = np.stack([native.gemm(W, np.ascontiguousarray(x[t])) for t in range(9)])
    batch = native.gemm(W, x)
    np.testing.assert_array_equal(batch, alone)
    assert_close(batch, x.astype(np.float64) @ ref.T)


@pytest.mark.parametrize("wtype", [native.TYPE_F16, native.TYPE_Q4_0X16], ids=["F16", "Q4_0X16"])
def test_token_mask_gives_each_token_its_own_neurons(isa, wtype):
    """predict(per_token=True) says which of the union's neurons each token's own logits select;
    sparse_ffn with that token_mask gives every token the bits it gets alone over its own set."""
    rng = np.random.default_rng(43)
    n_embd, n_ff, rank = valid_cols(wtype, 512), 96, valid_cols(wtype, 64)
    fc1, f1 = make_matrix(rng, rank, n_embd, wtype, 0.3)
    fc2, f2 = make_matrix(rng, n_ff, rank, wtype, 0.3)
    x = rng.standard_normal((7, n_embd)).astype(np.float32)
    idx, mask = native.predict(fc1, fc2, x, 1.0, per_token=True)
    assert mask.shape == (7, idx.size) and mask.dtype == np.bool_
    np.testing.assert_array_equal(idx, native.predict(fc1, fc2, x, 1.0))
    for t in range(len(x)):  # token t's own set, as predict gives it for t alone
        np.testing.assert_array_equal(idx[mask[t]], native.predict(fc1, fc2, x[t], 1.0))
    assert 0 < mask.mean() < 1
    gate, up, down = (make_matrix(rng, n_ff, n_embd, wtype, 0.3)[0] for _ in range(3))
    y = native.sparse_ffn(gate, up, down, x, idx, token_mask=mask)
    for t in range(len(x)):
        np.testing.assert_array_equal(y[t], native.sparse_ffn(gate, up, down, x[t:t + 1], idx[mask[t]])[0])
    with pytest.raises(ValueError, match="token_mask: expected shape"):
        native.sparse_ffn(gate, up, down, x, idx, token_mask=mask[:3])
    with pytest.raises(TypeError, match="token_mask: expected dtype"):
        native.sparse_ffn(gate, up, down, x, idx, token_mask=mask.astype(np.float32))
