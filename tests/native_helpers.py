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
# rows multiplied with activations quantized to Q8_0 blocks (q8_activations), on the CPU and the device
QUANT_TYPES = (native.TYPE_Q8_0, native.TYPE_Q4_0, native.TYPE_Q4_0X16)


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


def q8_activations(x):
    """x quantized to Q8_0 blocks and back as llama.cpp's x86 CPU backend does before Q8_0 / Q4_0
    matrix products (quantize_row_q8_0 and its repacked variant in AVX/AVX2/AVX-512 builds): per 32
    values amax = max|x|, d = fp16(amax / 127), q = round-half-even(x * (127 / amax)). gguf-py (and
    ggml's scalar reference) compute x * (1 / d) and round half away from zero instead: the two differ
    on exact ties and on about 2 in a million float32 values."""
    b = np.asarray(x, np.float32).reshape(-1, 32)
    amax = np.abs(b).max(axis=1, keepdims=True)
    d = (amax / np.float32(127)).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(amax == 0, np.float32(0), np.float32(127) / amax).astype(np.float32)
    return (np.rint(b * inv) * d).reshape(np.shape(x))


def act_ref(x, wtype):
    """The activations a row of `wtype` is multiplied with: q8_activations for quantized weights,
    unchanged otherwise (float64)."""
    x = np.asarray(x, np.float32)
    return (q8_activations(x) if wtype in QUANT_TYPES else x).astype(np.float64)


def quant_probe_activations(rng, n_blocks=24):
    """Blocks that exercise the activation quantizer: random scales, halfway cases (max 127 makes
    127 / max = 1, so x.5 lands exactly on a tie), values just below a tie, a value where x * (127 /
    max) and x * (1 / d) round apart, an all-zero block, and scales that are fp16 subnormals, round
    to zero or come close to the largest fp16."""
    x = rng.standard_normal((n_blocks, 32)).astype(np.float32) * np.logspace(-2, 2, n_blocks, dtype=np.float32)[:, None]
    x[0] = 0.0
    x[1] = np.arange(-15.5, 16.5, 1.0, dtype=np.float32)[:32]
    x[1, 0] = 127.0
    x[2] = -x[1]
    x[3] = np.nextafter(x[1], np.float32(0))
    x[3, 0] = 127.0
    x[4] *= np.float32(1e-3) / np.abs(x[4]).max()    # d = 7.9e-6: an fp16 subnormal
    x[5] *= np.float32(3e-5) / np.abs(x[5]).max()    # d is a few fp16 subnormal ulps
    x[8] *= np.float32(3e-6) / np.abs(x[8]).max()    # d rounds to 0 although q does not
    x[6] *= np.float32(8.3e6) / np.abs(x[6]).max()   # d close to the largest fp16
    x[7] = np.where(x[7] < 0, -3.0, 3.0)              # all of equal magnitude: q = +-127
    x[9, :2] = np.array([1066328253, 3204333904], np.uint32).view(np.float32)  # 127/amax vs 1/d: -56 vs -57
    x[9, 2:] *= x[9, 0] / np.abs(x[9, 2:]).max() / 2
    return x.reshape(-1)
