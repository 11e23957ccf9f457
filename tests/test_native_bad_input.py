"""Bad input never reaches C unchecked, and C refuses it again on its own (error code, no bad read)."""
from __future__ import annotations

import numpy as np
import pytest

from pi_backend import native
from pi_backend.native import ffi, lib
from tests.native_helpers import make_matrix


@pytest.fixture()
def ffn():
    rng = np.random.default_rng(0)
    return [make_matrix(rng, 64, 32, native.TYPE_F16)[0] for _ in range(3)]


def test_python_wrappers_name_the_bad_argument(ffn):
    gate, up, down = ffn
    x = np.ones(32, np.float32)
    with pytest.raises(TypeError, match="x: expected dtype float32"):
        native.gemm(up, x.astype(np.float64))
    with pytest.raises(ValueError, match="x: last dimension"):
        native.gemm(up, np.ones(31, np.float32))
    with pytest.raises(ValueError, match="x: must be C-contiguous"):
        native.gemm(up, np.ones((2, 64), np.float32)[:, ::2])
    with pytest.raises(TypeError, match="idx: expected dtype int32"):
        native.sparse_rows(up, np.array([1, 2]), x)
    with pytest.raises(ValueError, match="idx: index 64 outside"):
        native.sparse_rows(up, np.array([1, 64], np.int32), x)
    with pytest.raises(ValueError, match="idx: index -1 outside"):
        native.sparse_ffn(gate, up, down, x, np.array([-1], np.int32))
    with pytest.raises(ValueError, match="idx: the active set must not repeat"):
        native.sparse_ffn(gate, up, down, x, np.array([3, 3], np.int32))
    with pytest.raises(ValueError, match="act: unknown activation"):
        native.sparse_ffn(gate, up, down, x, np.array([3], np.int32), act="tanh")
    with pytest.raises(ValueError, match="down_t: shape"):
        native.sparse_ffn(gate, up, native.Matrix(np.zeros((32, 64), np.float32), native.TYPE_F32, 32, 64),
                          x, np.array([3], np.int32))
    with pytest.raises(ValueError, match="out: expected shape"):
        native.gemm(up, x, out=np.empty(63, np.float32))
    with pytest.raises(ValueError, match="n_threads"):
        native.gemm(up, x, n_threads=-1)
    with pytest.raises(TypeError, match="W: expected pi_backend.native.Matrix"):
        native.gemm(np.ones((64, 32), np.float32), x)


def test_matrix_refuses_buffers_too_small_or_misaligned():
    with pytest.raises(ValueError, match="buffer: .* cannot hold"):
        native.Matrix(np.zeros(100, np.uint8), native.TYPE_Q4_0, 4, 64)
    with pytest.raises(ValueError, match="not a valid row length"):
        native.Matrix(np.zeros(1000, np.uint8), native.TYPE_Q8_0, 2, 48)
    with pytest.raises(ValueError, match="wtype: unsupported"):
        native.Matrix(np.zeros(1000, np.uint8), 12, 2, 256)
    with pytest.raises(ValueError, match="row_stride"):
        native.Matrix(np.zeros(1000, np.float32), native.TYPE_F32, 2, 64, row_stride=8)


def _raw_desc(buf, wtype, rows, cols, stride, nbytes=None):
    """A descriptor built by hand, bypassing the Python checks, as a corrupt caller would."""
    d = ffi.new("pi_matrix *")
    d.data = ffi.from_buffer(buf)
    d.data_bytes = buf.nbytes if nbytes is None else nbytes
    d.rows, d.cols, d.row_stride, d.type = rows, cols, stride, wtype
    return d


def test_c_refuses_what_python_would_have_caught():
    buf = np.zeros((64, 32), np.float32)
    x = np.ones(32, np.float32)
    y = np.zeros(64, np.float32)
    xp, yp = ffi.from_buffer("float[]", x), ffi.from_buffer("float[]", y)
    good = _raw_desc(buf, lib.PI_TYPE_F32, 64, 32, 128)
    assert lib.pi_gemm(good, xp, 1, yp, 1) == lib.PI_OK
    # a view past the end of its buffer
    assert lib.pi_gemm(_raw_desc(buf, lib.PI_TYPE_F32, 65, 32, 128), xp, 1, yp, 1) == lib.PI_ERR_BOUNDS
    assert lib.pi_gemm(_raw_desc(buf, lib.PI_TYPE_F32, 64, 32, 128, nbytes=100), xp, 1, yp, 1) == lib.PI_ERR_BOUNDS
    # absurd sizes from a lying header: no overflow, no read
    assert lib.pi_gemm(_raw_desc(buf, lib.PI_TYPE_F32, 2**62, 32, 2**62), xp, 1, yp, 1) < 0
    assert lib.pi_gemm(_raw_desc(buf, lib.PI_TYPE_F32, 4, 32, 128), xp, 2**62, yp, 1) == lib.PI_ERR_SHAPE
    assert lib.pi_gemm(_raw_desc(buf, 77, 64, 32, 128), xp, 1, yp, 1) == lib.PI_ERR_TYPE
    assert lib.pi_gemm(_raw_desc(buf, lib.PI_TYPE_Q4_0, 4, 48, 27), xp, 1, yp, 1) == lib.PI_ERR_ALIGN
    assert lib.pi_gemm(good, ffi.NULL, 1, yp, 1) == lib.PI_ERR_NULL
    # indices out of range, from a corrupt predictor output or index file
    for bad in ([0, 64], [-5], [2**31 - 1]):
        idx = np.array(bad, np.int32)
        ip = ffi.from_buffer("int32_t[]", idx)
        assert lib.pi_sparse_gemm_rows(good, ip, idx.size, xp, 1, yp, 1) == lib.PI_ERR_INDEX
        assert lib.pi_sparse_axpy_rows(_raw_desc(buf.T.copy(), lib.PI_TYPE_F32, 32, 64, 256), ip, idx.size,
                                       xp, 1, yp, 1) == lib.PI_ERR_INDEX
        assert lib.pi_sparse_ffn(good, good, good, lib.PI_ACT_REGLU, ip, idx.size, ffi.NULL, xp, 1, yp, 0, 0.0,
                                 ffi.NULL, 1) == lib.PI_ERR_INDEX
    dup = np.array([1, 2, 1], np.int32)
    assert lib.pi_sparse_ffn(good, good, good, lib.PI_ACT_REGLU, ffi.from_buffer("int32_t[]", dup), 3, ffi.NULL,
                             xp, 1, yp, 0, 0.0, ffi.NULL, 1) == lib.PI_ERR_DUPLICATE
    assert lib.pi_sparse_ffn(good, good, good, 99, ffi.NULL, 0, ffi.NULL, xp, 1, yp, 0, 0.0, ffi.NULL,
                             1) == lib.PI_ERR_TYPE
    out = np.empty(10, np.int32)
    n = ffi.new("int64_t *")
    fc1 = _raw_desc(np.zeros((8, 32), np.float32), lib.PI_TYPE_F32, 8, 32, 128)
    fc2 = _raw_desc(np.zeros((64, 8), np.float32), lib.PI_TYPE_F32, 64, 8, 32)
    assert lib.pi_predict(fc1, fc2, xp, 1, 0.0, ffi.from_buffer("int32_t[]", out), 10, n, ffi.NULL,
                          1) == lib.PI_ERR_CAPACITY
    assert lib.pi_set_isa(99) == lib.PI_ERR_ISA
    with pytest.raises(native.NativeError, match="index is outside"):
        native._check("pi_sparse_gemm_rows", lib.PI_ERR_INDEX)


def test_attention_c_side_refuses_bad_sizes():
    """The C op checks sizes itself (the wrapper is not the only guard)."""
    q = np.zeros((2, 4, 8), np.float32)
    kv = np.zeros((2, 5, 8), np.float32)  # [n_head_kv, kv_rows, head_dim]
    out = np.zeros((2, 32), np.float32)
    f = lambda a: ffi.cast("float *", ffi.from_buffer(a))  # noqa: E731
    F32 = lib.PI_TYPE_F32
    assert lib.pi_attention(f(q), f(kv), f(kv), F32, 5, 4, 2, 4, 2, 8, f(out), 1) == lib.PI_ERR_SHAPE  # 4 + 2 > 5 rows
    assert lib.pi_attention(f(q), f(kv), f(kv), F32, 5, 0, 2, 4, 3, 8, f(out), 1) == lib.PI_ERR_SHAPE  # 4 % 3 heads
    assert lib.pi_attention(f(q), ffi.NULL, f(kv), F32, 5, 0, 2, 4, 2, 8, f(out), 1) == lib.PI_ERR_NULL
    assert lib.pi_attention(f(q), f(kv), f(kv), lib.PI_TYPE_Q8_0, 5, 3, 2, 4, 2, 8, f(out), 1) == lib.PI_ERR_TYPE
    assert lib.pi_attention(f(q), f(kv), f(kv), F32, 5, 3, 2, 4, 2, 8, f(out), 1) == lib.PI_OK
    x = np.zeros((2, 2, 8), np.float32)  # two tokens' rows of the 2 heads
    assert lib.pi_kv_store(f(kv), F32, 5, 2, 8, 4, f(x), 2) == lib.PI_ERR_SHAPE  # positions 4, 5 of 5 rows
    assert lib.pi_kv_store(f(kv), F32, 5, 2, 8, -1, f(x), 2) == lib.PI_ERR_SHAPE
    assert lib.pi_kv_store(f(kv), F32, 5, 2, 8, 0, f(x), 0) == lib.PI_ERR_SHAPE
    assert lib.pi_kv_store(f(kv), lib.PI_TYPE_BF16, 5, 2, 8, 0, f(x), 2) == lib.PI_ERR_TYPE
    assert lib.pi_kv_store(ffi.NULL, F32, 5, 2, 8, 0, f(x), 2) == lib.PI_ERR_NULL
    assert lib.pi_kv_store(f(kv), F32, 5, 2, 8, 3, f(x), 2) == lib.PI_OK


def test_c_refuses_bad_q4_0x16_views_and_conversions():
    """Q4_0X16 views are checked as any other (whole runs of 512, the buffer holds every row), and
    pi_convert_rows refuses types it cannot convert and outputs too small, on the C side alone."""
    raw = np.zeros(4 * 576, np.uint8)  # 4 rows of 1024 columns
    x = np.ones(1024, np.float32)
    y = np.zeros(4, np.float32)
    xp, yp = ffi.from_buffer("float[]", x), ffi.from_buffer("float[]", y)
    good = _raw_desc(raw, lib.PI_TYPE_Q4_0X16, 4, 1024, 576)
    assert lib.pi_gemm(good, xp, 1, yp, 1) == lib.PI_OK
    assert lib.pi_gemm(_raw_desc(raw, lib.PI_TYPE_Q4_0X16, 5, 1024, 576), xp, 1, yp, 1) == lib.PI_ERR_BOUNDS
    assert lib.pi_gemm(_raw_desc(raw, lib.PI_TYPE_Q4_0X16, 4, 992, 558), xp, 1, yp, 1) == lib.PI_ERR_ALIGN
    out = np.zeros(4 * 576, np.uint8)
    op = ffi.from_buffer(out)
    assert lib.pi_convert_rows(good, lib.PI_TYPE_Q4_0, op, out.nbytes, 1) == lib.PI_OK
    assert lib.pi_convert_rows(good, lib.PI_TYPE_Q4_0, op, out.nbytes - 1, 1) == lib.PI_ERR_CAPACITY
    assert lib.pi_convert_rows(good, lib.PI_TYPE_F16, op, out.nbytes, 1) == lib.PI_ERR_TYPE
    assert lib.pi_convert_rows(good, lib.PI_TYPE_Q4_0, ffi.NULL, out.nbytes, 1) == lib.PI_ERR_NULL
    f32 = _raw_desc(np.zeros((4, 512), np.float32), lib.PI_TYPE_F32, 4, 512, 2048)
    assert lib.pi_convert_rows(f32, lib.PI_TYPE_Q4_0X16, op, out.nbytes, 1) == lib.PI_ERR_TYPE
