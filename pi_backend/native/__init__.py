"""Thin, validating wrappers over the cffi-bound CPU kernels (pi_backend/native/include/pi_backend.h).

Every wrapper checks dtype, shape, contiguity and index ranges and raises TypeError / ValueError naming
the argument before anything crosses into C; the C side checks again and its error codes surface as
NativeError. Constants (types, activation kinds, error codes) are read from the compiled header.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from pi_backend.native._pi_native import ffi, lib

# ---- constants, from the header
TYPE_F32, TYPE_F16, TYPE_BF16 = lib.PI_TYPE_F32, lib.PI_TYPE_F16, lib.PI_TYPE_BF16
TYPE_Q8_0, TYPE_Q4_0 = lib.PI_TYPE_Q8_0, lib.PI_TYPE_Q4_0
TYPE_Q4_0X16 = lib.PI_TYPE_Q4_0X16  # pi_backend's regrouped Q4_0 (pi_backend.h); never in a GGUF file
TYPE_NAMES = {TYPE_F32: "F32", TYPE_F16: "F16", TYPE_BF16: "BF16", TYPE_Q8_0: "Q8_0", TYPE_Q4_0: "Q4_0",
              TYPE_Q4_0X16: "Q4_0X16"}
ACTIVATIONS = {
    "reglu": lib.PI_ACT_REGLU,
    "drelu": lib.PI_ACT_DRELU,
    "relu": lib.PI_ACT_RELU,
    "swiglu": lib.PI_ACT_SWIGLU,
    "geglu": lib.PI_ACT_GEGLU,
    "gelu": lib.PI_ACT_GELU,
}
UNGATED_ACTIVATIONS = ("relu", "gelu")  # h = act(up . x): no gate matrix
ISAS = {"scalar": lib.PI_ISA_SCALAR, "avx2": lib.PI_ISA_AVX2, "avx512": lib.PI_ISA_AVX512}
BLOCK_SIZE = {TYPE_Q8_0: lib.PI_QK8_0, TYPE_Q4_0: lib.PI_QK4_0, TYPE_Q4_0X16: lib.PI_COLS_Q4_0X16}
_MAX_THREADS = lib.PI_MAX_THREADS
# the numpy dtype a plain (unquantized) type is viewed as
_PLAIN_DTYPES = {TYPE_F32: np.dtype(np.float32), TYPE_F16: np.dtype(np.float16), TYPE_BF16: np.dtype(np.uint16)}


class NativeError(ValueError):
    """A kernel refused its arguments (the C side's own check)."""

    def __init__(self, func: str, code: int):
        self.code = code
        super().__init__(f"{func}: {ffi.string(lib.pi_strerror(code)).decode()} (code {code})")


def _check(func: str, code: int) -> None:
    if code != lib.PI_OK:
        raise NativeError(func, code)


# ---- library state

def available_isas() -> list[str]:
    """The instruction-set variants this CPU and build can run, lowest first."""
    return [name for name, isa in ISAS.items() if lib.pi_isa_supported(isa)]


def set_isa(name: str) -> None:
    if name not in ISAS:
        raise ValueError(f"isa: unknown instruction set {name!r}; expected one of {sorted(ISAS)}")
    if not lib.pi_isa_supported(ISAS[name]):
        raise ValueError(f"isa: {name!r} is not supported on this CPU (available: {available_isas()})")
    _check("pi_set_isa", lib.pi_set_isa(ISAS[name]))


def set_num_threads(n: int) -> None:
    """Default thread count of every kernel call that passes n_threads=0."""
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or not 1 <= n <= lib.PI_MAX_THREADS:
        raise ValueError(f"n: thread count must be an int in [1, {lib.PI_MAX_THREADS}], got {n!r}")
    _check("pi_set_num_threads", lib.pi_set_num_threads(int(n)))


def _default_threads() -> int:
    """PI_BACKEND_THREADS if set (read by the C side at start-up), else the CPUs this process may use."""
    try:
        return max(1, min(len(os.sched_getaffinity(0)), lib.PI_MAX_THREADS))
    except AttributeError:  # not Linux
        return max(1, min(os.cpu_count() or 1, lib.PI_MAX_THREADS))


if not os.environ.get("PI_BACKEND_THREADS"):
    set_num_threads(_default_threads())


def get_num_threads() -> int:
    return lib.pi_get_num_threads()


def info() -> dict:
    active = lib.pi_isa_active()
    return {
        "isa": ffi.string(lib.pi_isa_name(active)).decode(),
        "available_isas": available_isas(),
        "num_threads": lib.pi_get_num_threads(),
        "cpu_count": os.cpu_count(),
        "forced_by_env": os.environ.get("PI_BACKEND_ISA"),
    }


def row_bytes(wtype: int, cols: int) -> int:
    n = lib.pi_type_row_bytes(wtype, cols)
    if n < 0:
        raise ValueError(f"cols: {cols} is not a valid row length for type {TYPE_NAMES.get(wtype, wtype)}")
    return n


# ---- weight matrices

@dataclass(frozen=True, eq=False)
class Matrix:
    """A [rows, cols] weight matrix in one of the kernel types, viewing (not copying) `buffer`.

    `buffer` is any C-contiguous numpy array holding the bytes (a GGUF memmap slice, a float16 array,
    raw Q4_0 blocks as uint8). The cffi descriptor is built once and keeps the buffer alive.
    """

    buffer: np.ndarray
    wtype: int
    rows: int
    cols: int
    row_stride: int

    def __init__(self, buffer: np.ndarray, wtype: int, rows: int, cols: int, row_stride: int | None = None):
        if not isinstance(buffer, np.ndarray):
            raise TypeError(f"buffer: expected a numpy array, got {type(buffer).__name__}")
        if wtype not in TYPE_NAMES:
            raise ValueError(f"wtype: unsupported weight type {wtype!r}; supported: {sorted(TYPE_NAMES.values())}")
        if not buffer.flags.c_contiguous:
            raise ValueError("buffer: must be C-contiguous")
        for name, v in (("rows", rows), ("cols", cols)):
            if not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"{name}: must be a positive int, got {v!r}")
        rb = row_bytes(wtype, int(cols))
        stride = rb if row_stride is None else int(row_stride)
        if stride < rb:
            raise ValueError(f"row_stride: {stride} is less than one row ({rb} bytes)")
        need = (int(rows) - 1) * stride + rb
        if buffer.nbytes < need:
            raise ValueError(f"buffer: {buffer.nbytes} bytes cannot hold {rows}x{cols} {TYPE_NAMES[wtype]} ({need} bytes)")
        object.__setattr__(self, "buffer", buffer)
        object.__setattr__(self, "wtype", int(wtype))
        object.__setattr__(self, "rows", int(rows))
        object.__setattr__(self, "cols", int(cols))
        object.__setattr__(self, "row_stride", stride)
        desc = ffi.new("pi_matrix *")
        desc.data = ffi.from_buffer(buffer)
        desc.data_bytes = buffer.nbytes
        desc.rows, desc.cols, desc.row_stride, desc.type = int(rows), int(cols), stride, int(wtype)
        object.__setattr__(self, "_desc", desc)

    @classmethod
    def from_array(cls, a: np.ndarray) -> "Matrix":
        """A 2-D float32 / float16 array as an F32 / F16 matrix."""
        a = _require(a, "a", (np.float32, np.float16), ndim=2)
        return cls(a, TYPE_F32 if a.dtype == np.float32 else TYPE_F16, a.shape[0], a.shape[1])

    @property
    def type_name(self) -> str:
        return TYPE_NAMES[self.wtype]

    @property
    def nbytes(self) -> int:
        return self.rows * row_bytes(self.wtype, self.cols)

    def __repr__(self) -> str:
        return f"Matrix({self.rows}x{self.cols} {self.type_name})"


_DTYPES: dict = {}  # dtype spec -> tuple of np.dtype (np.dtype() per call costs a decode step ~50 us)


def _require(a, name: str, dtypes, ndim=None, writable=False) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(a).__name__}")
    allowed = _DTYPES.get(dtypes)
    if allowed is None:
        allowed = _DTYPES[dtypes] = tuple(np.dtype(d) for d in (dtypes if isinstance(dtypes, tuple) else (dtypes,)))
    if a.dtype not in allowed:
        raise TypeError(f"{name}: expected dtype {'/'.join(d.name for d in allowed)}, got {a.dtype}")
    if ndim is not None and a.ndim not in (ndim if isinstance(ndim, tuple) else (ndim,)):
        raise ValueError(f"{name}: expected {ndim}-D, got shape {a.shape}")
    flags = a.flags
    if not flags.c_contiguous:
        raise ValueError(f"{name}: must be C-contiguous")
    if writable and not flags.writeable:
        raise ValueError(f"{name}: must be writable")
    return a


def _tokens(x, name: str, width: int) -> tuple[np.ndarray, int]:
    """x as [n_tok, width] float32; 1-D means one token."""
    x = _require(x, name, np.float32, ndim=(1, 2))
    if x.shape[-1] != width:
        raise ValueError(f"{name}: last dimension {x.shape[-1]} != {width}")
    n_tok = 1 if x.ndim == 1 else x.shape[0]
    if n_tok == 0:
        raise ValueError(f"{name}: no tokens")
    return x, n_tok


def _indices(idx, name: str, rows: int) -> np.ndarray:
    idx = _require(idx, name, np.int32, ndim=1)
    if idx.size:
        k = lib.pi_first_bad_index(ffi.from_buffer("int32_t *", idx), idx.size, rows)
        if k >= 0:
            raise ValueError(f"{name}: index {int(idx[k])} outside [0, {rows})")
    return idx


def _out(out, name: str, shape: tuple, zero: bool = False) -> np.ndarray:
    if out is None:
        return np.zeros(shape, np.float32) if zero else np.empty(shape, np.float32)
    out = _require(out, name, np.float32, writable=True)
    if out.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {out.shape}")
    return out


def _matrix(m, name: str) -> Matrix:
    if not isinstance(m, Matrix):
        raise TypeError(f"{name}: expected pi_backend.native.Matrix, got {type(m).__name__}")
    return m


def _f(a: np.ndarray, ctype: str = "float *"):
    return ffi.from_buffer(ctype, a) if a.size else ffi.NULL


def _threads(n_threads: int) -> int:
    if type(n_threads) is int and 0 <= n_threads <= _MAX_THREADS:  # the common case, checked cheaply
        return n_threads
    if not isinstance(n_threads, (int, np.integer)) or not 0 <= n_threads <= _MAX_THREADS:
        raise ValueError(f"n_threads: must be an int in [0, {_MAX_THREADS}] (0 = default), got {n_threads!r}")
    return int(n_threads)


def convert(m: "Matrix", wtype: int, out: np.ndarray | None = None, n_threads: int = 0) -> "Matrix":
    """m's rows (contiguous) in another layout of the same values: Q4_0 <-> Q4_0X16. Into a new buffer,
    or into `out` (uint8, writable, large enough), which may be m's own buffer when its rows are
    contiguous: an in-place conversion."""
    m = _matrix(m, "m")
    if wtype not in TYPE_NAMES:
        raise ValueError(f"wtype: unsupported weight type {wtype!r}; supported: {sorted(TYPE_NAMES.values())}")
    q4 = (TYPE_Q4_0, TYPE_Q4_0X16)
    if wtype != m.wtype and not (m.wtype in q4 and wtype in q4):
        raise ValueError(f"wtype: cannot convert {m.type_name} rows to {TYPE_NAMES[wtype]} (only Q4_0 <-> Q4_0X16)")
    need = m.rows * row_bytes(wtype, m.cols)
    if out is None:
        out = np.empty(need, np.uint8)
    else:
        out = _require(out, "out", np.uint8, writable=True)
        if out.nbytes < need:
            raise ValueError(f"out: {out.nbytes} bytes cannot hold {m.rows}x{m.cols} {TYPE_NAMES[wtype]} ({need})")
        if np.shares_memory(out, m.buffer) and not (m.row_stride == row_bytes(m.wtype, m.cols)
                                                    and out.ctypes.data == m.buffer.ctypes.data):
            raise ValueError("out: may overlap m's buffer only as the same contiguous rows (in place)")
    _check("pi_convert_rows", lib.pi_convert_rows(m._desc, wtype, ffi.from_buffer(out), out.nbytes,
                                                  _threads(n_threads)))
    return Matrix(out.reshape(-1)[:need], wtype, m.rows, m.cols)


def as_gguf_layout(m: "Matrix") -> "Matrix":
    """m itself, or for Q4_0X16 its rows back in GGUF's Q4_0 layout (what device kernels read)."""
    return convert(m, TYPE_Q4_0) if m.wtype == TYPE_Q4_0X16 else m


def q4_0x16_pays(cols: int) -> bool:
    """Whether Q4_0 rows of this length multiply faster as Q4_0X16 with the active kernels: whole runs
    of 512, and a variant with kernels of its own for the layout (AVX-512, AVX2; scalar unpacks it)."""
    return cols % lib.PI_COLS_Q4_0X16 == 0 and lib.pi_isa_active() in (lib.PI_ISA_AVX512, lib.PI_ISA_AVX2)


# ---- ops

def gemm(W: Matrix, x: np.ndarray, out: np.ndarray | None = None, n_threads: int = 0) -> np.ndarray:
    """y = x @ W.T for x [n_tok, cols] (or [cols]); weights read once for all tokens."""
    W = _matrix(W, "W")
    x, n_tok = _tokens(x, "x", W.cols)
    y = _out(out, "out", x.shape[:-1] + (W.rows,))
    _check("pi_gemm", lib.pi_gemm(W._desc, _f(x), n_tok, _f(y), _threads(n_threads)))
    return y


def sparse_rows(W: Matrix, idx: np.ndarray, x: np.ndarray, out: np.ndarray | None = None,
                n_threads: int = 0) -> np.ndarray:
    """y[..., k] = W[idx[k]] . x: only the listed rows are read."""
    W = _matrix(W, "W")
    idx = _indices(idx, "idx", W.rows)
    x, n_tok = _tokens(x, "x", W.cols)
    y = _out(out, "out", x.shape[:-1] + (idx.size,))
    if idx.size:
        _check("pi_sparse_gemm_rows", lib.pi_sparse_gemm_rows(
            W._desc, _f(idx, "int32_t *"), idx.size, _f(x), n_tok, _f(y), _threads(n_threads)))
    return y


def sparse_axpy(Wt: Matrix, idx: np.ndarray, h: np.ndarray, y: np.ndarray, n_threads: int = 0) -> np.ndarray:
    """y[t] += sum_k h[t, k] * Wt[idx[k]] in place (Wt: the transposed down matrix, [n_ff, n_embd])."""
    Wt = _matrix(Wt, "Wt")
    idx = _indices(idx, "idx", Wt.rows)
    h, n_tok = _tokens(h, "h", idx.size) if idx.size else (h, 1 if np.ndim(h) <= 1 else len(h))
    y = _require(y, "y", np.float32, ndim=(1, 2), writable=True)
    if y.shape != h.shape[:-1] + (Wt.cols,):
        raise ValueError(f"y: expected shape {h.shape[:-1] + (Wt.cols,)}, got {y.shape}")
    if idx.size:
        _check("pi_sparse_axpy_rows", lib.pi_sparse_axpy_rows(
            Wt._desc, _f(idx, "int32_t *"), idx.size, _f(h), n_tok, _f(y), _threads(n_threads)))
    return y


def ffn_matrices(act: str, gate, up, down_t, matrix):
    """The fused FFN's activation and matrices checked (the CPU and the device wrappers share this):
    `matrix(m, name)` type-checks one matrix; the gate must be None exactly for the ungated kinds, and
    gate, up and down_t (W_down transposed) must have one shape."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act: unknown activation {act!r}; expected one of {sorted(ACTIVATIONS)}")
    up, down_t = matrix(up, "up"), matrix(down_t, "down_t")
    if act in UNGATED_ACTIVATIONS:
        if gate is not None:
            raise ValueError(f"gate: must be None for act={act!r} (no gate)")
    else:
        gate = matrix(gate, "gate")
        if (gate.rows, gate.cols) != (up.rows, up.cols):
            raise ValueError(f"gate: shape {gate.rows}x{gate.cols} != up {up.rows}x{up.cols}")
    if (down_t.rows, down_t.cols) != (up.rows, up.cols):
        raise ValueError(f"down_t: shape {down_t.rows}x{down_t.cols} != up {up.rows}x{up.cols} (pass W_down transposed)")
    return gate, up, down_t


def check_skip_threshold(skip_threshold) -> None:
    if not (isinstance(skip_threshold, (int, float, np.floating)) and skip_threshold >= 0):
        raise ValueError(f"skip_threshold: must be a number >= 0, got {skip_threshold!r}")


def sparse_ffn(gate: Matrix | None, up: Matrix, down_t: Matrix, x: np.ndarray, idx: np.ndarray,
               act: str = "reglu", out: np.ndarray | None = None, accumulate: bool = False,
               skip_threshold: float = 0.0, n_threads: int = 0, return_skipped: bool = False,
               token_mask: np.ndarray | None = None):
    """One layer's FFN over the neurons in idx (a set), with no n_ff-sized intermediate.

    act: reglu | drelu | swiglu | geglu, or the ungated relu | gelu (pass gate=None). Neurons whose activation is
    <= skip_threshold in magnitude for every token are skipped and their up/down rows never read.
    token_mask: None, or bool/uint8 [n_tok, idx.size]: token t takes neuron idx[k] only where it is set
    (each token its own predicted set, as predict(per_token=True) gives them).
    Returns y [n_tok, n_embd] (and the number of skipped neurons if return_skipped).
    """
    gate, up, down_t = ffn_matrices(act, gate, up, down_t, _matrix)
    idx = _indices(idx, "idx", up.rows)
    check_skip_threshold(skip_threshold)
    x, n_tok = _tokens(x, "x", up.cols)
    mask = ffi.NULL
    if token_mask is not None:
        token_mask = _require(token_mask, "token_mask", (np.bool_, np.uint8), ndim=2)
        if token_mask.shape != (n_tok, idx.size):
            raise ValueError(f"token_mask: expected shape {(n_tok, idx.size)}, got {token_mask.shape}")
        mask = _f(token_mask, "uint8_t *")
    shape = x.shape[:-1] + (up.cols,)
    y = _out(out, "out", shape)
    skipped = ffi.new("int64_t *")
    code = lib.pi_sparse_ffn(
        gate._desc if gate is not None else ffi.NULL, up._desc, down_t._desc, ACTIVATIONS[act],
        _f(idx, "int32_t *"), idx.size, mask, _f(x), n_tok, _f(y), int(bool(accumulate)), float(skip_threshold),
        skipped, _threads(n_threads))
    if code == lib.PI_ERR_DUPLICATE:  # checked in C (a bitmap, before y is touched): cheaper than np.unique
        raise ValueError("idx: the active set must not repeat a neuron")
    _check("pi_sparse_ffn", code)
    return (y, int(skipped[0])) if return_skipped else y


def predict(fc1: Matrix, fc2: Matrix, x: np.ndarray, threshold: float = 0.0, n_threads: int = 0,
            per_token: bool = False):
    """Sorted active set: neurons with fc2 . relu(fc1 . x[t]) >= threshold for any token t; with
    per_token, also the bool [n_tok, set size] mask of each token's own set within it."""
    fc1, fc2 = _matrix(fc1, "fc1"), _matrix(fc2, "fc2")
    if fc2.cols != fc1.rows:
        raise ValueError(f"fc2: has {fc2.cols} columns but fc1 has rank {fc1.rows}")
    threshold = float(threshold)
    if threshold != threshold:
        raise ValueError("threshold: NaN")
    x, n_tok = _tokens(x, "x", fc1.cols)
    idx = np.empty(fc2.rows, np.int32)
    n = ffi.new("int64_t *")
    mask = np.empty((n_tok, fc2.rows), np.bool_) if per_token else None
    _check("pi_predict", lib.pi_predict(fc1._desc, fc2._desc, _f(x), n_tok, threshold,
                                        _f(idx, "int32_t *"), idx.size, n,
                                        _f(mask, "uint8_t *") if per_token else ffi.NULL, _threads(n_threads)))
    if per_token:
        return idx[: n[0]].copy(), np.ascontiguousarray(mask[:, : n[0]])
    return idx[: n[0]].copy()


def dequantize_rows(W: Matrix, idx: np.ndarray | None = None) -> np.ndarray:
    """Rows of W as float32 (all rows when idx is None)."""
    W = _matrix(W, "W")
    if idx is None:
        out = np.empty((W.rows, W.cols), np.float32)
        _check("pi_dequantize_rows", lib.pi_dequantize_rows(W._desc, ffi.NULL, W.rows, _f(out)))
        return out
    idx = _indices(idx, "idx", W.rows)
    out = np.empty((idx.size, W.cols), np.float32)
    if idx.size:
        _check("pi_dequantize_rows", lib.pi_dequantize_rows(W._desc, _f(idx, "int32_t *"), idx.size, _f(out)))
    return out


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float, out: np.ndarray | None = None) -> np.ndarray:
    w = _require(w, "w", np.float32, ndim=1)
    x, n_tok = _tokens(x, "x", w.size)
    y = _out(out, "out", x.shape)
    _check("pi_rmsnorm", lib.pi_rmsnorm(_f(x), _f(w), n_tok, w.size, float(eps), _f(y)))
    return y


def attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, n_past: int,
              out: np.ndarray | None = None, n_threads: int = 0) -> np.ndarray:
    """Causal grouped-query attention of q [n_tok, n_head, d] (positions n_past ..) over the caches
    [n_head_kv, kv_rows, d] (head-major: pi_backend.h), the new tokens' positions already written;
    returns [n_tok, n_head * d]. The caches are float32 or float16 (both of one type)."""
    q = _require(q, "q", np.float32, ndim=3)
    k_cache = _require(k_cache, "k_cache", (np.float32, np.float16), ndim=3)
    v_cache = _require(v_cache, "v_cache", k_cache.dtype.type, ndim=3)
    n_tok, n_head, d = q.shape
    n_head_kv, kv_rows, dk = k_cache.shape
    if v_cache.shape != k_cache.shape or dk != d:
        raise ValueError(f"k_cache / v_cache: shapes {k_cache.shape} / {v_cache.shape} do not fit q {q.shape}")
    if n_tok == 0 or n_head % n_head_kv:
        raise ValueError(f"q: {n_head} heads over {n_tok} tokens does not fit the cache's {n_head_kv} KV heads")
    if not 0 <= int(n_past) <= kv_rows - n_tok:
        raise ValueError(f"n_past: {n_past} cached + {n_tok} new exceeds the cache's {kv_rows} rows")
    y = _out(out, "out", (n_tok, n_head * d))
    _check("pi_attention", lib.pi_attention(_f(q), _f(k_cache, "void *"), _f(v_cache, "void *"),
                                            KV_TYPE_IDS[k_cache.dtype], kv_rows, int(n_past), n_tok, n_head,
                                            n_head_kv, d, _f(y), _threads(n_threads)))
    return y


KV_TYPE_IDS = {np.dtype(np.float32): TYPE_F32, np.dtype(np.float16): TYPE_F16}  # KV cache dtype -> type id


def kv_store(cache: np.ndarray, pos0: int, x: np.ndarray) -> np.ndarray:
    """Write x [n_tok, n_head_kv, d] (float32) into cache [n_head_kv, kv_rows, d] (attention's layout,
    float32 or float16: rounded to nearest even, as astype) at positions pos0 .. pos0 + n_tok - 1."""
    cache = _require(cache, "cache", (np.float32, np.float16), ndim=3, writable=True)
    x = _require(x, "x", np.float32, ndim=3)
    n_head_kv, kv_rows, d = cache.shape
    if x.shape[1:] != (n_head_kv, d) or x.shape[0] == 0:
        raise ValueError(f"x: shape {x.shape} does not fit the cache {cache.shape} ([n_tok, {n_head_kv}, {d}])")
    if not isinstance(pos0, (int, np.integer)) or not 0 <= pos0 <= kv_rows - x.shape[0]:
        raise ValueError(f"pos0: {pos0!r} + {x.shape[0]} new positions exceeds the cache's {kv_rows} rows")
    _check("pi_kv_store", lib.pi_kv_store(_f(cache, "void *"), KV_TYPE_IDS[cache.dtype], kv_rows, n_head_kv, d,
                                          int(pos0), _f(x), x.shape[0]))
    return cache


def rope(x: np.ndarray, pos: np.ndarray, n_rot: int, freq_base: float, neox: bool = False) -> np.ndarray:
    """Rotary embedding in place on x [n_tok, n_heads, head_dim] at positions pos [n_tok]."""
    x = _require(x, "x", np.float32, ndim=3, writable=True)
    pos = _require(pos, "pos", np.int32, ndim=1)
    n_tok, n_heads, head_dim = x.shape
    if pos.size != n_tok:
        raise ValueError(f"pos: {pos.size} positions for {n_tok} tokens")
    if not 0 < n_rot <= head_dim or n_rot % 2:
        raise ValueError(f"n_rot: must be even and in (0, {head_dim}], got {n_rot}")
    _check("pi_rope", lib.pi_rope(_f(x), _f(pos, "int32_t *"), n_tok, n_heads, head_dim, int(n_rot),
                                  float(freq_base), int(bool(neox))))
    return x
