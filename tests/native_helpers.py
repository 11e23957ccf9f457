"""Weight matrices for kernel tests, quantized and dequantized by the `gguf` package itself (the
independent reference for GGUF's block layouts)."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as GT
from gguf import quants

from pi_backend import native

GGUF_TYPE = {
    native.TYPE_F32: GT.F32,
    native.TYPE_F16: GT.F16,
    native.TYPE_BF16: GT.BF16,
    native.TYPE_Q8_0: GT.Q8_0,
    native.TYPE_Q4_0: GT.Q4_0,
}
ALL_TYPES = list(GGUF_TYPE)
# the CPU kernels also take pi_backend's own regrouping of Q4_0 (made from gguf's Q4_0 bytes)
CPU_TYPES = ALL_TYPES + [native.TYPE_Q4_0X16]


def make_matrix(rng: np.random.Generator, rows: int, cols: int, wtype: int, scale: float = 1.0):
    """(Matrix, its exact float32 values as gguf dequantizes them)."""
    dense = (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
    if wtype == native.TYPE_F32:
        return native.Matrix(dense, wtype, rows, cols), dense
    if wtype == native.TYPE_Q4_0X16:
        m, ref = make_matrix(rng, rows, cols, native.TYPE_Q4_0, scale)
        return native.convert(m, wtype), ref
    raw = np.ascontiguousarray(quants.quantize(dense, GGUF_TYPE[wtype]))
    ref = quants.dequantize(raw, GGUF_TYPE[wtype]).astype(np.float32).reshape(rows, cols)
    return native.Matrix(raw, wtype, rows, cols), ref


def valid_cols(wtype: int, cols: int) -> int:
    """Quantized rows must be whole 32-element blocks (Q4_0X16: whole runs of 512)."""
    if wtype == native.TYPE_Q4_0X16:
        return max(512, cols // 512 * 512)
    return cols if wtype in (native.TYPE_F32, native.TYPE_F16, native.TYPE_BF16) else max(32, cols // 32 * 32)


def assert_close(actual, expected, rtol=2e-5):
    """Float32 sums in a different order: compare against the magnitude of the result."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale * 50)


def attention_np(q, K, V, n_past):
    """Causal GQA attention in float64: q [T, H, d] at positions n_past .., K/V [S, Hkv, d]."""
    T, H, d = q.shape
    group = H // K.shape[1]
    out = np.zeros((T, H, d))
    for t in range(T):
        S = n_past + t + 1
        for h in range(H):
            s = K[:S, h // group].astype(np.float64) @ q[t, h] / np.sqrt(d)
            p = np.exp(s - s.max())
            out[t, h] = p @ V[:S, h // group] / p.sum()
    return out.reshape(T, H * d)
