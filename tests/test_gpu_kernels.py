"""Device kernels (pi_dev_*, issue 7) against numpy, for every weight type, on each device library
this machine can run:

- gpu:   the built CUDA / HIP library on a real device (marked gpu, skipped without one);
- emu:   the same kernel source compiled with g++ against the CPU emulator (cuda/gpu_emu.h), which
         runs every block's threads as fibers with real barriers for __syncthreads and shuffles:
         the kernels' indexing, reductions, tiling and error flags are tested on any machine;
- emu64: the emulator with 64-lane warps, the geometry of CDNA GPUs under HIP.

Weights are quantized / dequantized by the `gguf` package (tests/native_helpers.py), so the reference
is independent of our decoders. Also here, without a GPU: the nvcc (and hipcc) compile of the
library and its exported symbols, and device.available() on a machine without a device.
"""
from __future__ import annotations

import pathlib
import shutil
import subprocess

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT
from gguf import quants

from pi_backend import native
from pi_backend.native import build_gpu, device
from tests.native_helpers import (ALL_TYPES, act_ref, assert_close, attention_np, make_matrix, q8_activations,
                                  quant_probe_activations)

ROOT = pathlib.Path(__file__).resolve().parent.parent
FLOAT_TYPES = (native.TYPE_F32, native.TYPE_F16, native.TYPE_BF16)
ACTS = ("reglu", "drelu", "relu", "swiglu", "geglu", "gelu")
UNGATED = native.UNGATED_ACTIVATIONS
TNAME = native.TYPE_NAMES


# ------------------------------------------------------------------ the device libraries

@pytest.fixture(scope="session", params=[pytest.param("gpu", marks=pytest.mark.gpu), "emu", "emu64"])
def dev(request, tmp_path_factory) -> device.Device:
    if request.param == "gpu":
        if not device.available():
            pytest.skip(f"no GPU: {device.why_unavailable()}")
        return device.default()
    if shutil.which("g++") is None:
        pytest.skip("no g++ for the emulator build")
    warp = 64 if request.param == "emu64" else 32
    lib = build_gpu.build_emu(tmp_path_factory.mktemp(request.param), warp=warp, verbose=False)
    return device.Device(lib)


def upload(dev: device.Device, m: native.Matrix, layout: str = "dense") -> device.DeviceMatrix:
    """m on the device as a packed matrix ("dense"), with padded rows ("stride": 6 bytes between rows,
    so float rows are no longer 16-byte aligned), or at an odd address ("offset": 1 byte in)."""
    if layout == "dense":
        return dev.matrix(m)
    rb = native.row_bytes(m.wtype, m.cols)
    raw = m.buffer.reshape(-1).view(np.uint8)
    stride = rb + 6 if layout == "stride" else rb
    offset = 1 if layout == "offset" else 0
    storage = np.zeros(offset + m.rows * stride, np.uint8)
    for r in range(m.rows):
        storage[offset + r * stride: offset + r * stride + rb] = raw[r * rb:(r + 1) * rb]
    return device.DeviceMatrix(dev.to_device(storage), m.wtype, m.rows, m.cols, stride, offset)


def layer(rng, wtype, n_ff, n_embd, scale=0.1):
    """gate, up, down_t host matrices and their exact values"""
    return [make_matrix(rng, n_ff, n_embd, wtype, scale) for _ in range(3)]


def act_np(act: str, g: np.ndarray) -> np.ndarray:
    if act == "swiglu":
        return g / (1.0 + np.exp(-g))
    if act in ("geglu", "gelu"):
        return 0.5 * g * (1.0 + np.tanh(0.7978845608 * (g + 0.044715 * g ** 3)))
    return np.maximum(g, 0.0)


def ffn_hidden(gate, up, x, idx, act, thr, wtype=native.TYPE_F16):
    """h [n_tok, n_idx] as pi_sparse_ffn defines it (float64); gate and up rows of a quantized type see
    x quantized to Q8_0 blocks, as on the CPU"""
    x = act_ref(x, wtype)
    first = up if act in UNGATED else gate
    a = act_np(act, x @ first[idx].T.astype(np.float64))
    a[np.abs(a) <= thr] = 0.0
    if act not in UNGATED:
        u = x @ up[idx].T.astype(np.float64)
        if act == "drelu":
            u = np.maximum(u, 0.0)
        a = np.where(a != 0.0, a * u, 0.0)
    return a


def safe_threshold(a: np.ndarray) -> float:
    """A threshold near the median |activation| that sits in a wide gap, so float32 vs float64
    rounding cannot move a neuron across it."""
    v = np.unique(np.abs(a[a != 0]))
    lo, hi = len(v) // 4, 3 * len(v) // 4
    k = lo + int(np.argmax(np.diff(v[lo:hi + 1])))
    return float((v[k] + v[k + 1]) / 2)


# ------------------------------------------------------------------ dense and sparse rows

@pytest.mark.parametrize("wtype", ALL_TYPES, ids=TNAME.get)
@pytest.mark.parametrize("layout", ["dense", "stride", "offset"])
@pytest.mark.parametrize("n_tok", [1, 3, 9])
def test_gemm(dev, wtype, layout, n_tok):
    rng = np.random.default_rng(10 + wtype)
    # odd cols on the offset layout: float rows then take the generic (element-wise) path
    cols = 100 if (layout == "offset" and wtype in FLOAT_TYPES) else 256
    m, ref = make_matrix(rng, 37, cols, wtype)
    x = rng.standard_normal((n_tok, cols)).astype(np.float32)
    y = dev.gemm(upload(dev, m, layout), dev.to_device(x)).to_host()
    assert_close(y, act_ref(x, wtype) @ ref.T)


def test_gemm_one_token_vector(dev):
    rng = np.random.default_rng(1)
    m, ref = make_matrix(rng, 33, 64, native.TYPE_F16)
    x = rng.standard_normal(64).astype(np.float32)
    y = dev.gemm(dev.matrix(m), dev.to_device(x)).to_host()
    assert y.shape == (33,)
    assert_close(y, ref.astype(np.float64) @ x)


@pytest.mark.parametrize("wtype", [native.TYPE_Q8_0, native.TYPE_Q4_0], ids=TNAME.get)
@pytest.mark.parametrize("layout", ["dense", "offset"])
def test_activation_quantization_is_the_cpus(dev, wtype, layout):
    """Q8_0 / Q4_0 rows take x quantized to Q8_0 blocks on the device too, by the CPU's rule (ties, fp16
    subnormal scales, a zero block): with one-hot weight rows y[j] = w_jj * (the quantized x_j), and
    the device gives the CPU kernel's bits, for one token and for a tile of them."""
    rng = np.random.default_rng(8)
    x = quant_probe_activations(rng, 24)
    n = x.size
    gt = GT.Q8_0 if wtype == native.TYPE_Q8_0 else GT.Q4_0
    raw = np.ascontiguousarray(quants.quantize(np.eye(n, dtype=np.float32), gt))
    W = native.Matrix(raw, wtype, n, n)
    diag = np.diag(quants.dequantize(raw, gt).reshape(n, n)).astype(np.float64)
    np.testing.assert_allclose(native.gemm(W, x), q8_activations(x) * diag, rtol=1e-6, atol=1e-30)
    X = np.stack([x, -x, x[::-1].copy()])
    np.testing.assert_array_equal(dev.gemm(upload(dev, W, layout), dev.to_device(X)).to_host(), native.gemm(W, X))
    np.testing.assert_array_equal(dev.gemm(upload(dev, W, layout), dev.to_device(x)).to_host(), native.gemm(W, x))


@pytest.mark.parametrize("wtype", ALL_TYPES, ids=TNAME.get)
@pytest.mark.parametrize("n_tok", [1, 5])
def test_sparse_rows(dev, wtype, n_tok):
    rng = np.random.default_rng(20 + wtype)
    m, ref = make_matrix(rng, 70, 128, wtype)
    idx = np.array([69, 3, 3, 0, 41, 17, 68, 2, 3], np.int32)  # unsorted, repeats
    x = rng.standard_normal((n_tok, 128)).astype(np.float32)
    y = dev.sparse_rows(dev.matrix(m), dev.to_device(idx), dev.to_device(x)).to_host()
    assert_close(y, act_ref(x, wtype) @ ref[idx].T)


def test_sparse_rows_empty(dev):
    rng = np.random.default_rng(2)
    m, _ = make_matrix(rng, 8, 64, native.TYPE_F16)
    y = dev.sparse_rows(dev.matrix(m), dev.to_device(np.zeros(0, np.int32)),
                        dev.to_device(np.ones((2, 64), np.float32)))
    assert y.shape == (2, 0)


# ------------------------------------------------------------------ down projection

@pytest.mark.parametrize("wtype", ALL_TYPES, ids=TNAME.get)
@pytest.mark.parametrize("n_tok", [1, 2, 6])
@pytest.mark.parametrize("layout", ["dense", "offset"])
def test_sparse_axpy(dev, wtype, n_tok, layout):
    rng = np.random.default_rng(30 + wtype)
    cols = 72 if (layout == "offset" and wtype in FLOAT_TYPES) else 256
    m, ref = make_matrix(rng, 50, cols, wtype)
    idx = rng.choice(50, 24, replace=False).astype(np.int32)
    idx[5] = idx[6]  # a repeated index contributes once per occurrence
    h = rng.standard_normal((n_tok, idx.size)).astype(np.float32)
    h[:, 2] = 0.0    # a neuron no token needs: its row is never read
    h[0, 7] = 0.0    # a zero for one token only
    y0 = rng.standard_normal((n_tok, cols)).astype(np.float32)
    y = dev.to_device(y0)
    dev.sparse_axpy(upload(dev, m, layout), dev.to_device(idx), dev.to_device(h), y)
    assert_close(y.to_host(), y0 + h.astype(np.float64) @ ref[idx].astype(np.float64))


@pytest.mark.parametrize("wtype", [native.TYPE_F16, native.TYPE_Q4_0, native.TYPE_F32], ids=TNAME.get)
def test_sparse_axpy_split_reduction(dev, wtype):
    """Enough rows that the list is split across blocks and summed by the second (reduce) kernel;
    the result is deterministic: two runs agree bit for bit."""
    rng = np.random.default_rng(40 + wtype)
    m, ref = make_matrix(rng, 700, 256, wtype)
    idx = rng.permutation(700)[:650].astype(np.int32)
    h = rng.standard_normal((3, idx.size)).astype(np.float32)
    W, didx, dh = dev.matrix(m), dev.to_device(idx), dev.to_device(h)
    runs = []
    for _ in range(2):
        y = dev.zeros((3, 256))
        dev.sparse_axpy(W, didx, dh, y)
        runs.append(y.to_host())
    assert_close(runs[0], h.astype(np.float64) @ ref[idx].astype(np.float64))
    np.testing.assert_array_equal(runs[0], runs[1])


# ------------------------------------------------------------------ fused FFN

@pytest.mark.parametrize("wtype", ALL_TYPES, ids=TNAME.get)
@pytest.mark.parametrize("act", ACTS)
def test_sparse_ffn(dev, wtype, act):
    rng = np.random.default_rng(50 + wtype)
    n_ff, n_embd = 96, 128
    (g, gr), (u, ur), (d, dr) = layer(rng, wtype, n_ff, n_embd)
    idx = np.sort(rng.choice(n_ff, 40, replace=False)).astype(np.int32)
    x = rng.standard_normal((2, n_embd)).astype(np.float32)
    y = dev.sparse_ffn(None if act in UNGATED else dev.matrix(g), dev.matrix(u), dev.matrix(d),
                       dev.to_device(x), dev.to_device(idx), act=act).to_host()
    assert_close(y, ffn_hidden(gr, ur, x, idx, act, 0.0, wtype) @ dr[idx].astype(np.float64))


@pytest.mark.parametrize("act", ["reglu", "swiglu", "relu", "gelu"])
@pytest.mark.parametrize("n_tok", [1, 4, 11])
def test_sparse_ffn_threshold_accumulate(dev, act, n_tok):
    rng = np.random.default_rng(60 + n_tok)
    n_ff, n_embd = 80, 96
    (g, gr), (u, ur), (d, dr) = layer(rng, native.TYPE_F16, n_ff, n_embd)
    idx = rng.permutation(n_ff)[:50].astype(np.int32)  # unsorted set
    x = rng.standard_normal((n_tok, n_embd)).astype(np.float32)
    first = ur if act in UNGATED else gr
    thr = safe_threshold(act_np(act, x.astype(np.float64) @ first[idx].T.astype(np.float64)))
    y0 = rng.standard_normal((n_tok, n_embd)).astype(np.float32)
    y = dev.to_device(y0)
    dev.sparse_ffn(None if act in UNGATED else dev.matrix(g), dev.matrix(u), dev.matrix(d), dev.to_device(x),
                   dev.to_device(idx), act=act, out=y, accumulate=True, skip_threshold=thr)
    h = ffn_hidden(gr, ur, x, idx, act, thr)
    assert (h == 0).any() and (h != 0).any()
    assert_close(y.to_host(), y0 + h @ dr[idx].astype(np.float64))


@pytest.mark.parametrize("wtype", [native.TYPE_F16, native.TYPE_Q4_0], ids=TNAME.get)
@pytest.mark.parametrize("act", ["reglu", "drelu", "relu", "swiglu"])
def test_sparse_ffn_token_mask(dev, wtype, act):
    """Each token over its own neurons: h is 0 where the mask is 0, as numpy says, and as the CPU
    kernel computes with the same mask (the engine's hot and cold partitions must agree)."""
    rng = np.random.default_rng(70 + wtype)
    n_ff, n_embd, n_tok = 96, 128, 5
    (g, gr), (u, ur), (d, dr) = layer(rng, wtype, n_ff, n_embd)
    idx = np.sort(rng.choice(n_ff, 48, replace=False)).astype(np.int32)
    x = rng.standard_normal((n_tok, n_embd)).astype(np.float32)
    mask = (rng.random((n_tok, idx.size)) < 0.5).astype(np.uint8)
    mask[0] = 0  # a token that takes none of the neurons gets exactly nothing
    G = None if act in UNGATED else dev.matrix(g)
    y = dev.sparse_ffn(G, dev.matrix(u), dev.matrix(d), dev.to_device(x), dev.to_device(idx), act=act,
                       token_mask=dev.to_device(mask)).to_host()
    h = ffn_hidden(gr, ur, x, idx, act, 0.0, wtype) * mask
    assert_close(y, h @ dr[idx].astype(np.float64))
    assert (y[0] == 0).all()
    cpu = native.sparse_ffn(None if act in UNGATED else g, u, d, x, idx, act=act, token_mask=mask.astype(bool))
    assert_close(y, cpu)
    with pytest.raises(ValueError, match="token_mask"):
        dev.sparse_ffn(G, dev.matrix(u), dev.matrix(d), dev.to_device(x), dev.to_device(idx), act=act,
                       token_mask=dev.to_device(mask[:, :-1]))
    with pytest.raises(TypeError, match="token_mask"):
        dev.sparse_ffn(G, dev.matrix(u), dev.matrix(d), dev.to_device(x), dev.to_device(idx), act=act,
                       token_mask=dev.to_device(mask.astype(np.int32)))


def test_sparse_ffn_empty_set(dev):
    rng = np.random.default_rng(3)
    (g, _), (u, _), (d, _) = layer(rng, native.TYPE_Q8_0, 32, 64)
    G, U, D = dev.matrix(g), dev.matrix(u), dev.matrix(d)
    x, none = dev.to_device(np.ones((2, 64), np.float32)), dev.to_device(np.zeros(0, np.int32))
    y = dev.to_device(np.full((2, 64), 7.0, np.float32))
    dev.sparse_ffn(G, U, D, x, none, out=y, accumulate=True)
    assert (y.to_host() == 7.0).all()
    dev.sparse_ffn(G, U, D, x, none, out=y)
    assert (y.to_host() == 0.0).all()


# ------------------------------------------------------------------ predictor

@pytest.mark.parametrize("wtype", ALL_TYPES, ids=TNAME.get)
@pytest.mark.parametrize("n_tok", [1, 3])
def test_predict_logits(dev, wtype, n_tok):
    rng = np.random.default_rng(70 + wtype)
    n_embd, rank, n_ff = 128, 64, 150
    fc1, r1 = make_matrix(rng, rank, n_embd, wtype)
    fc2, r2 = make_matrix(rng, n_ff, rank, wtype)
    x = rng.standard_normal((n_tok, n_embd)).astype(np.float32)
    logits = dev.predict_logits(dev.matrix(fc1), dev.matrix(fc2), dev.to_device(x)).to_host()
    z = np.maximum(act_ref(x, wtype) @ r1.T, 0.0)
    assert_close(logits, act_ref(z, wtype) @ r2.T)


# ------------------------------------------------------------------ errors

def _code(excinfo) -> int:
    return excinfo.value.code


# ------------------------------------------------------------------ dense blocks

@pytest.mark.parametrize("n_tok, n", [(1, 128), (3, 300)])
def test_rmsnorm(dev, n_tok, n):
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((n_tok, n)).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    ref = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + 1e-5) * w
    dx = dev.to_device(x)
    assert_close(dev.rmsnorm(dx, dev.to_device(w), 1e-5).to_host(), ref, 1e-5)
    dev.rmsnorm(dx, dev.to_device(w), 1e-5, out=dx)  # in place
    assert_close(dx.to_host(), ref, 1e-5)


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("n_rot", [16, 12])
def test_rope_matches_the_cpu_op(dev, neox, n_rot):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((5, 3, 16)).astype(np.float32)
    ref = x.copy()
    native.rope(ref, np.arange(40, 45, dtype=np.int32), n_rot, 10000.0, neox=neox)
    out = dev.rope(dev.to_device(x), 40, n_rot, 10000.0, neox=neox).to_host()
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-5)


@pytest.mark.parametrize("kv_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("n_tok, n_past, d", [(1, 0, 32), (1, 37, 64), (4, 9, 16), (3, 300, 32)])
def test_attention(dev, n_tok, n_past, d, kv_dtype):
    """f32 and f16 caches (the engine's default KV type): the same function of the values they hold."""
    rng = np.random.default_rng(7)
    H, Hkv, rows = 4, 2, n_past + n_tok + 3
    q = rng.standard_normal((n_tok, H, d)).astype(np.float32)
    K = rng.standard_normal((rows, Hkv, d)).astype(kv_dtype)
    V = rng.standard_normal((rows, Hkv, d)).astype(kv_dtype)
    out = dev.attention(dev.to_device(q), dev.to_device(K), dev.to_device(V), n_past).to_host()
    assert_close(out, attention_np(q, K.astype(np.float32), V.astype(np.float32), n_past), 1e-5)
    with pytest.raises(ValueError, match="n_past"):
        dev.attention(dev.to_device(q), dev.to_device(K), dev.to_device(V), rows)
    other = np.float16 if kv_dtype == np.float32 else np.float32
    with pytest.raises(TypeError, match="v_cache"):  # one type for both
        dev.attention(dev.to_device(q), dev.to_device(K), dev.to_device(V.astype(other)), n_past)
    with pytest.raises(TypeError, match="k_cache"):
        dev.attention(dev.to_device(q), dev.to_device(K.astype(np.float64)), dev.to_device(V), n_past)


def test_to_f16_rounds_as_numpy(dev):
    """Every float32 class against numpy's astype(float16), bit for bit: normals with random low bits
    and exact ties, the subnormal range and its underflow to 0, values around the largest half (65504)
    and overflow to inf, signed zeros, infinities and NaN."""
    rng = np.random.default_rng(11)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)  # every exponent
    ties = (rng.integers(0x33000000, 0x47800000, 20_000).astype(np.uint32) & ~np.uint32(0x1FFF)) | np.uint32(0x1000)
    special = np.array([0.0, -0.0, 65504.0, 65519.99, 65520.0, -65520.0, 1e6, 2.0**-14, 2.0**-24, 2.0**-25,
                        1.5 * 2.0**-25, 2.0**-26, 3 * 2.0**-25, 6.1e-5, np.inf, -np.inf], np.float32)
    x = np.concatenate([bits.view(np.float32), ties.view(np.float32),
                        rng.standard_normal(10_000).astype(np.float32) * 1e-5, special])
    with np.errstate(over="ignore"):
        want = x.astype(np.float16)
    got = dev.to_f16(dev.to_device(x), dev.empty(x.shape, np.float16)).to_host()
    nan = np.isnan(x)
    assert np.isnan(got[nan]).all()
    np.testing.assert_array_equal(got[~nan].view(np.uint16), want[~nan].view(np.uint16))
    with pytest.raises(ValueError, match="out"):
        dev.to_f16(dev.to_device(x), dev.empty((3,), np.float16))
    with pytest.raises(TypeError, match="out"):
        dev.to_f16(dev.to_device(x), dev.empty(x.shape, np.float32))


def test_add_and_views(dev):
    a, b = np.arange(12, dtype=np.float32).reshape(4, 3), np.ones((2, 3), np.float32)
    da = dev.to_device(a)
    dev.add(da.rows(1, 3), dev.to_device(b))
    a[1:3] += 1
    np.testing.assert_array_equal(da.to_host(), a)
    np.testing.assert_array_equal(da.reshape(12).rows(3, 6).to_host(), a.reshape(-1)[3:6])
    with pytest.raises(ValueError, match="rows"):
        da.rows(2, 5)


@pytest.mark.parametrize("n_tok", [1, 3])
@pytest.mark.parametrize("n_ff", [7, 256, 1000, 11008, 40001])
def test_select_splits_the_active_set(dev, n_tok, n_ff):
    rng = np.random.default_rng(n_ff + n_tok)
    logits = rng.standard_normal((n_tok, n_ff)).astype(np.float32)
    active = np.flatnonzero((logits >= 0.8).any(0))
    hot = np.sort(rng.choice(n_ff, n_ff // 3, replace=False))
    part = np.full(n_ff, -1, np.int32)
    part[hot] = np.arange(hot.size)
    hot_out, cold_out, counts = dev.empty(n_ff, np.int32), dev.empty(n_ff, np.int32), dev.empty(2, np.int32)
    dev.select(dev.to_device(logits), 0.8, dev.to_device(part), hot.size, hot_out, cold_out, counts)
    n_hot, n_cold = counts.to_host()
    want_hot = part[active[part[active] >= 0]]
    want_cold = active[part[active] < 0]
    np.testing.assert_array_equal(hot_out.to_host()[:n_hot], want_hot)
    np.testing.assert_array_equal(cold_out.to_host()[:n_cold], want_cold)
    dev.select(dev.to_device(logits), 0.8, None, 0, hot_out, cold_out, counts)  # no hot partition
    assert tuple(counts.to_host()) == (0, active.size)
    np.testing.assert_array_equal(cold_out.to_host()[:active.size], active)
    part[3] = n_ff  # a corrupt map entry: flagged at the next sync, counted cold
    dev.select(dev.to_device(logits), 0.8, dev.to_device(part), hot.size, hot_out, cold_out, counts)
    with pytest.raises(native.NativeError, match="index is outside"):
        dev.sync()


def test_recorded_calls_replay_on_new_contents(dev):
    """Device.recording(): the ops run as usual and their C calls are kept; replay() repeats them on the
    same buffers, whatever they hold now, without the Python checks. The library's own checks still
    hold: an index made bad after recording is flagged at the next sync."""
    rng = np.random.default_rng(12)
    m, ref = make_matrix(rng, 40, 64, native.TYPE_F16)
    W = dev.matrix(m)
    x, idx = dev.to_device(rng.standard_normal((1, 64)).astype(np.float32)), dev.to_device(np.array([3, 39, 0], np.int32))
    y, acc = dev.empty((1, 40)), dev.zeros((1, 40))
    with dev.recording() as calls:
        dev.gemm(W, x, out=y)
        dev.add(acc, y)
        part = dev.sparse_rows(W, idx, x)
    assert [c[0] for c in calls] == ["pi_dev_gemm", "pi_dev_add", "pi_dev_sparse_gemm_rows"]
    first = acc.to_host()
    x_new = rng.standard_normal((1, 64)).astype(np.float32)
    x.copy_from(x_new)
    dev.replay(calls)
    assert_close(acc.to_host(), first + x_new.astype(np.float64) @ ref.T)
    assert_close(part.to_host(), x_new.astype(np.float64) @ ref[[3, 39, 0]].T)
    idx.copy_from(np.array([3, 40, 0], np.int32))
    dev.replay(calls)
    with pytest.raises(native.NativeError) as e:
        dev.sync()
    assert _code(e) == native.lib.PI_ERR_INDEX
    dev.gemm(W, x, out=y)  # outside recording(): nothing is kept
    assert len(calls) == 3


def test_bad_indices_are_flagged_and_skipped(dev):
    rng = np.random.default_rng(4)
    m, ref = make_matrix(rng, 20, 64, native.TYPE_F16)
    W, x = dev.matrix(m), dev.to_device(rng.standard_normal((2, 64)).astype(np.float32))
    idx = np.array([1, 20, 5, -1, 19], np.int32)
    y = dev.sparse_rows(W, dev.to_device(idx), x)
    with pytest.raises(native.NativeError) as e:
        dev.sync()
    assert _code(e) == native.lib.PI_ERR_INDEX
    dev.sync()  # the flag is cleared by the sync that reported it
    out = y.to_host()
    assert (out[:, [1, 3]] == 0).all()  # skipped: 0
    ok = [0, 2, 4]
    assert_close(out[:, ok], x.to_host().astype(np.float64) @ ref[idx[ok]].T)

    h, yy = dev.to_device(np.ones((1, 2), np.float32)), dev.zeros((1, 64))
    dev.sparse_axpy(W, dev.to_device(np.array([3, 1 << 30], np.int32)), h, yy)
    with pytest.raises(native.NativeError) as e:
        yy.to_host()
    assert _code(e) == native.lib.PI_ERR_INDEX
    dev.sync()


def test_bad_index_flagged_even_with_zero_weight(dev):
    rng = np.random.default_rng(5)
    m, _ = make_matrix(rng, 10, 64, native.TYPE_F16)
    y = dev.zeros((1, 64))
    dev.sparse_axpy(dev.matrix(m), dev.to_device(np.array([10], np.int32)), dev.zeros((1, 1)), y)
    with pytest.raises(native.NativeError) as e:
        dev.sync()
    assert _code(e) == native.lib.PI_ERR_INDEX


@pytest.mark.parametrize("bad, code", [([3, 9, 3], "PI_ERR_DUPLICATE"), ([3, 32, 4], "PI_ERR_INDEX")])
def test_sparse_ffn_bad_set(dev, bad, code):
    rng = np.random.default_rng(6)
    (g, _), (u, _), (d, _) = layer(rng, native.TYPE_F16, 32, 64)
    dev.sparse_ffn(dev.matrix(g), dev.matrix(u), dev.matrix(d), dev.to_device(np.ones((1, 64), np.float32)),
                   dev.to_device(np.array(bad, np.int32)))
    with pytest.raises(native.NativeError) as e:
        dev.sync()
    assert _code(e) == getattr(native.lib, code)
    dev.sync()


def test_host_side_checks(dev):
    """Descriptors and sizes are refused before any launch, with the CPU side's codes."""
    rng = np.random.default_rng(7)
    m, _ = make_matrix(rng, 16, 64, native.TYPE_Q4_0)
    W = dev.matrix(m)
    x, y = dev.to_device(np.ones((1, 64), np.float32)), dev.zeros((1, 16))
    lib, ffi = dev.lib, dev.ffi
    xp, yp = x.ptr("float *"), y.ptr("float *")

    def gemm_with(**fields) -> int:
        desc = ffi.new("pi_matrix *", {"data": W._desc.data, "data_bytes": W._desc.data_bytes, "rows": 16,
                                       "cols": 64, "row_stride": W._desc.row_stride, "type": native.TYPE_Q4_0})
        for k, v in fields.items():
            setattr(desc, k, v)
        return lib.pi_dev_gemm(desc, xp, 1, yp, ffi.NULL)

    L = native.lib
    assert gemm_with() == L.PI_OK
    assert gemm_with(rows=17) == L.PI_ERR_BOUNDS
    assert gemm_with(type=7) == L.PI_ERR_TYPE
    assert gemm_with(cols=48, row_stride=36 * 2) == L.PI_ERR_ALIGN
    assert gemm_with(row_stride=10) == L.PI_ERR_SHAPE
    assert gemm_with(data=ffi.NULL) == L.PI_ERR_NULL
    assert lib.pi_dev_gemm(W._desc, xp, 0, yp, ffi.NULL) == L.PI_ERR_SHAPE
    assert lib.pi_dev_gemm(W._desc, ffi.NULL, 1, yp, ffi.NULL) == L.PI_ERR_NULL
    assert lib.pi_dev_sparse_gemm_rows(W._desc, ffi.NULL, 3, xp, 1, yp, ffi.NULL) == L.PI_ERR_NULL
    assert lib.pi_dev_sparse_ffn(W._desc, W._desc, W._desc, 9, ffi.NULL, 0, ffi.NULL, xp, 1, yp, 0, 0.0, ffi.NULL) == L.PI_ERR_TYPE
    assert lib.pi_dev_sparse_ffn(W._desc, W._desc, W._desc, 0, ffi.NULL, 0, ffi.NULL, xp, 1, yp, 0, float("nan"),
                                 ffi.NULL) == L.PI_ERR_SHAPE
    assert lib.pi_dev_predict_logits(W._desc, W._desc, xp, 1, yp, ffi.NULL) == L.PI_ERR_SHAPE  # 64 != 16
    assert lib.pi_dev_malloc(ffi.new("void **"), -1) == L.PI_ERR_SHAPE
    dev.sync()


# ------------------------------------------------------------------ memory

def test_memory_accounting(dev):
    used0 = dev.mem_used()
    free0, total = dev.mem_info()
    assert 0 < free0 <= total
    a = dev.empty((3 << 20,), np.uint8)
    assert dev.mem_used() == used0 + (3 << 20)
    free1, _ = dev.mem_info()
    assert free1 <= free0 - (3 << 20)
    b = dev.to_device(np.arange(1000, dtype=np.float32))
    assert dev.mem_used() == used0 + (3 << 20) + 4000
    np.testing.assert_array_equal(b.to_host(), np.arange(1000, dtype=np.float32))
    c = b.copy_to(dev.empty(1000))
    np.testing.assert_array_equal(c.to_host(), np.arange(1000, dtype=np.float32))
    a.free()
    b.free()
    c.free()
    a.free()  # idempotent
    assert dev.mem_used() == used0
    free2, _ = dev.mem_info()
    assert free2 >= free0 - (2 << 20)
    # the ops' scratch does not count as held memory
    rng = np.random.default_rng(8)
    (g, _), (u, _), (d, _) = layer(rng, native.TYPE_F16, 64, 64)
    G, U, D, x = dev.matrix(g), dev.matrix(u), dev.matrix(d), dev.to_device(np.ones((1, 64), np.float32))
    idx, y = dev.to_device(np.arange(64, dtype=np.int32)), dev.empty((1, 64))
    held = dev.mem_used()
    dev.sparse_ffn(G, U, D, x, idx, out=y).to_host()
    assert dev.mem_used() == held
    with pytest.raises(ValueError, match="after free"):
        a.ptr()


# ------------------------------------------------------------------ without a GPU

def test_available_without_a_library(monkeypatch):
    """available() probes and never raises: a missing or unloadable library means False."""
    monkeypatch.setattr(device, "_tried", False)
    monkeypatch.setattr(device, "_default", None)
    monkeypatch.setenv(device.ENV_LIBRARY, "/nonexistent/libpi_backend_cuda.so")
    assert device.available() is False
    assert "cannot be loaded" in device.why_unavailable()
    with pytest.raises(RuntimeError, match="no GPU"):
        device.require()


def test_device_cdef_matches_header():
    names = device.device_functions()
    assert {"pi_dev_gemm", "pi_dev_sparse_gemm_rows", "pi_dev_sparse_axpy_rows", "pi_dev_sparse_ffn",
            "pi_dev_predict_logits", "pi_dev_sync", "pi_dev_malloc", "pi_dev_mem_info"} <= set(names)


def _exports(lib: pathlib.Path) -> set[str]:
    out = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True).stdout
    return {p[2] for p in (ln.split() for ln in out.splitlines()) if len(p) == 3 and p[1] == "T"}


@pytest.mark.skipif(build_gpu.find_nvcc() is None or shutil.which("nm") is None, reason="needs nvcc and nm")
def test_cuda_library_compiles_and_exports_every_entry_point(tmp_path):
    """The nvcc compile, warnings as errors, for one arch (scripts/build-gpu.sh, run by CI, builds all):
    a kernel that does not compile fails here even without a GPU."""
    lib = build_gpu.build_cuda(tmp_path, archs="80", strict=True, verbose=False)
    exported = _exports(lib)
    assert set(device.device_functions()) <= exported
    assert {s for s in exported if s.startswith("pi_")} == set(device.device_functions())  # nothing else
    dev = device.Device(lib)  # loads without a GPU, and says so
    assert dev.backend == "cuda"
    assert isinstance(dev.available(), bool)
    if not dev.available():
        assert dev.name == "none"


@pytest.mark.skipif(build_gpu.find_hipcc() is None or shutil.which("nm") is None, reason="needs hipcc and nm")
def test_hip_library_compiles_and_exports_every_entry_point(tmp_path):
    """The same kernel source through hipcc, for a wave64 target (gfx90a)."""
    lib = build_gpu.build_hip(tmp_path, archs="gfx90a", strict=True, verbose=False)
    assert set(device.device_functions()) <= _exports(lib)


def test_rocm_queries_through_hip_python(monkeypatch):
    """pi_backend.native.rocm reads devices through hip-python: nothing without it (as here), and the
    properties of each device with it -- checked against a stand-in module of hip-python's API (both
    its calling conventions: (err, props) = hipGetDeviceProperties(id), and the older fill-in form)."""
    import sys
    import types

    from pi_backend.native import rocm

    monkeypatch.setitem(sys.modules, "hip", None)  # not installed
    assert rocm.devices() == []

    class Props:
        name, gcnArchName = b"AMD Instinct MI210\0junk", b"gfx90a:sramecc+:xnack-"
        warpSize, multiProcessorCount, totalGlobalMem = 64, 104, 64 << 30

    new_api = types.SimpleNamespace(
        hipError_t=types.SimpleNamespace(hipSuccess=0), hipGetDeviceCount=lambda: (0, 1),
        hipGetDeviceProperties=lambda i: (0, Props()))

    def old_get_properties(*args):  # hipGetDeviceProperties(props, device_id) -> err
        if len(args) != 2 or not isinstance(args[0], Props):
            raise TypeError("hipGetDeviceProperties(props, deviceId)")
        return 0

    old_api = types.SimpleNamespace(hipGetDeviceCount=lambda: (0, 1), hipDeviceProp_t=Props,
                                    hipGetDeviceProperties=old_get_properties)
    for api in (new_api, old_api):
        pkg = types.ModuleType("hip")
        pkg.hip = api
        monkeypatch.setitem(sys.modules, "hip", pkg)
        assert rocm.devices() == [{"id": 0, "name": "AMD Instinct MI210", "arch": "gfx90a:sramecc+:xnack-",
                                   "wave_size": 64, "compute_units": 104, "total_bytes": 64 << 30}]
    no_device = types.SimpleNamespace(hipError_t=types.SimpleNamespace(hipSuccess=0), hipGetDeviceCount=lambda: (100, 0))
    pkg = types.ModuleType("hip")
    pkg.hip = no_device
    monkeypatch.setitem(sys.modules, "hip", pkg)
    assert rocm.devices() == []
