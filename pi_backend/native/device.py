"""pi_backend's device kernels (CUDA / HIP) from Python.

The library (libpi_backend_cuda.so from nvcc, libpi_backend_hip.so from hipcc, both built by the
package build when the compiler is found; see build_gpu.py) is bound with cffi in ABI mode: the
declarations are the `pi_matrix` struct and the PI_DEVICE_CDEF section of include/pi_backend.h, read
at load time, so Python and the library share one header. Nothing is loaded on import: the first
call to available() / default() looks for the library and asks it for a device, and returns False /
None (never raises) when there is no library, no driver or no device.

    from pi_backend.native import device
    if device.available():
        dev = device.default()
        W = dev.matrix(native_matrix)              # upload a pi_backend.native.Matrix
        x = dev.to_device(x_host)                  # float32 [n_tok, cols]
        y = dev.gemm(W, x).to_host()               # ops are asynchronous; to_host() syncs

Ops validate dtype and shape here (TypeError / ValueError naming the argument); the library checks
sizes again and index values on the device: a bad index is reported by the next sync (sync(),
to_host()) as NativeError PI_ERR_INDEX. PI_BACKEND_DEVICE_LIB=path selects a library explicitly (e.g.
the CPU emulator build that runs these kernels in tests without a GPU).
"""
from __future__ import annotations

import contextlib
import math
import os
import pathlib
import re
import threading
import weakref

import numpy as np
from cffi import FFI

from pi_backend import native

HERE = pathlib.Path(__file__).resolve().parent
HEADER = HERE / "include" / "pi_backend.h"
LIBRARY_NAMES = ("libpi_backend_cuda.so", "libpi_backend_hip.so")
ENV_LIBRARY = "PI_BACKEND_DEVICE_LIB"

_ACT_NAMES = native.ACTIVATIONS
# the dtypes the ops take, converted once (np.dtype() at every argument check showed in a decode step)
_DTYPES = {t: np.dtype(t) for t in (np.float32, np.float16, np.int32, np.uint8, np.bool_)}


def device_cdef(text: str | None = None) -> str:
    """The cffi declarations of the device library: struct pi_matrix + the PI_DEVICE_CDEF section."""
    text = HEADER.read_text() if text is None else text
    struct = re.search(r"typedef struct pi_matrix \{.*?\} pi_matrix;", text, re.S)
    if struct is None:
        raise RuntimeError(f"{HEADER}: no pi_matrix typedef")
    start = text.index("PI_DEVICE_CDEF_BEGIN")
    block = text[text.index("\n", start) + 1 : text.index("PI_DEVICE_CDEF_END", start)]
    block = block[: block.rfind("\n") + 1]  # drop the comment opener of the end marker's line
    return struct.group(0) + "\n" + block


def device_functions(text: str | None = None) -> list[str]:
    """Names of the pi_dev_* entry points the header declares (what every library must export)."""
    return re.findall(r"\b(pi_dev_\w+)\s*\(", device_cdef(text))


def _check(func: str, code: int) -> None:
    if code != native.lib.PI_OK:
        raise native.NativeError(func, code)


def _stream(ffi: FFI, stream):
    """None (the default stream) or a cudaStream_t / hipStream_t handle as an int (e.g. torch's
    `torch.cuda.current_stream().cuda_stream`)."""
    if stream is None:
        return ffi.NULL
    if isinstance(stream, (int, np.integer)) and not isinstance(stream, bool):
        return ffi.cast("void *", int(stream))
    raise TypeError(f"stream: expected None or an int handle, got {type(stream).__name__}")


class DeviceArray:
    """A C-contiguous float32 / int32 (or raw uint8) array in device memory, owned (freed on del).

    Views (rows(), reshape()) share the storage. A decode step makes hundreds of calls through these
    objects, so sizes are computed once and each typed pointer is cast once per array: on a GPU the
    Python between kernel launches, not the kernels, was what a small model's step waited for."""

    def __init__(self, dev: "Device", shape: tuple, dtype):
        self.dev, self.shape, self.dtype = dev, tuple(int(s) for s in shape), np.dtype(dtype)
        if any(s < 0 for s in self.shape):
            raise ValueError(f"shape: negative dimension in {self.shape}")
        self.size = math.prod(self.shape)
        self.nbytes = self.size * self.dtype.itemsize
        p = dev.ffi.new("void **")
        _check("pi_dev_malloc", dev.lib.pi_dev_malloc(p, self.nbytes))
        self._ptr = dev.ffi.cast("char *", p[0])
        self._casts: dict[str, object] = {}
        self._finalizer = weakref.finalize(self, dev.lib.pi_dev_free, p[0])
        self._live = [True]  # shared with the views; cheaper to test than the finalizer's `alive`

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def ptr(self, ctype: str = "void *"):
        if not self._live[0]:
            raise ValueError("DeviceArray: used after free()")
        c = self._casts.get(ctype)
        if c is None:
            c = self._casts[ctype] = self.dev.ffi.cast(ctype, self._ptr)
        return c

    def copy_from(self, a: np.ndarray, stream=None) -> "DeviceArray":
        a = np.ascontiguousarray(a)
        if a.dtype != self.dtype or a.shape != self.shape:
            raise ValueError(f"a: expected {self.dtype} {self.shape}, got {a.dtype} {a.shape}")
        if self.nbytes:
            ffi = self.dev.ffi
            self.dev._run("pi_dev_memcpy_h2d", self.ptr(), ffi.from_buffer(a), self.nbytes, _stream(ffi, stream))
        return self

    def copy_to_host(self, out: np.ndarray, stream=None) -> np.ndarray:
        """Enqueue the copy into the C-contiguous host array `out` (same size in bytes); no wait: it is
        complete after the next sync of `stream`."""
        if not (isinstance(out, np.ndarray) and out.flags.c_contiguous and out.flags.writeable
                and out.nbytes == self.nbytes):
            raise ValueError(f"out: expected a writable C-contiguous array of {self.nbytes} bytes")
        if self.nbytes:
            ffi = self.dev.ffi
            self.dev._run("pi_dev_memcpy_d2h", ffi.from_buffer(out), self.ptr(), self.nbytes, _stream(ffi, stream))
        return out

    def to_host(self, stream=None) -> np.ndarray:
        """Copy back after everything enqueued on `stream` (sync: raises a flagged index error)."""
        out = self.copy_to_host(np.empty(self.shape, self.dtype), stream)
        self.dev.sync(stream)
        return out

    def copy_to(self, dst: "DeviceArray", stream=None) -> "DeviceArray":
        """Device-to-device copy into dst (same size in bytes)."""
        if not isinstance(dst, DeviceArray) or dst.dev is not self.dev or dst.nbytes != self.nbytes:
            raise ValueError(f"dst: expected a DeviceArray of {self.nbytes} bytes on the same device")
        if self.nbytes:
            self.dev._run("pi_dev_memcpy_d2d", dst.ptr(), self.ptr(), self.nbytes, _stream(self.dev.ffi, stream))
        return dst

    def fill_zero(self, stream=None) -> "DeviceArray":
        if self.nbytes:
            self.dev._run("pi_dev_memset", self.ptr(), 0, self.nbytes, _stream(self.dev.ffi, stream))
        return self

    def _view(self, shape: tuple[int, ...], byte_offset: int) -> "DeviceArray":
        """A view of the same storage (shape: ints, already checked by the caller)."""
        if not self._live[0]:
            raise ValueError("DeviceArray: used after free()")
        v = object.__new__(DeviceArray)
        v.dev, v.dtype, v.shape = self.dev, self.dtype, shape
        v.size = math.prod(shape)
        v.nbytes = v.size * self.dtype.itemsize
        v._ptr = self._ptr + byte_offset if byte_offset else self._ptr
        v._casts = {}
        v._finalizer, v._live, v._base = self._finalizer, self._live, self  # the storage outlives its views
        return v

    def rows(self, start: int, stop: int) -> "DeviceArray":
        """A view (no copy) of rows start .. stop - 1 of the first dimension."""
        if not self.shape or not 0 <= start <= stop <= self.shape[0]:
            raise ValueError(f"rows: [{start}, {stop}) outside the first dimension of {self.shape}")
        row = self.nbytes // self.shape[0] if self.shape[0] else 0
        return self._view((int(stop - start),) + self.shape[1:], int(start) * row)

    def reshape(self, *shape) -> "DeviceArray":
        """A view (no copy) with another shape of the same size."""
        shape = tuple(int(s) for s in (shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape))
        if math.prod(shape) != self.size or any(s < 0 for s in shape):
            raise ValueError(f"reshape: {shape} does not hold the {self.size} elements of {self.shape}")
        return self._view(shape, 0)

    def free(self) -> None:
        if getattr(self, "_base", None) is None:  # a view never frees its storage
            self._finalizer()
            self._live[0] = False

    def __repr__(self) -> str:
        return f"DeviceArray({self.shape}, {self.dtype}, on {self.dev.name})"


class DeviceMatrix:
    """A weight matrix in device memory: the pi_matrix descriptor of a view of a DeviceArray."""

    def __init__(self, storage: DeviceArray, wtype: int, rows: int, cols: int, row_stride: int | None = None,
                 offset: int = 0):
        if not isinstance(storage, DeviceArray):
            raise TypeError(f"storage: expected DeviceArray, got {type(storage).__name__}")
        if wtype not in native.TYPE_NAMES:
            raise ValueError(f"wtype: unsupported weight type {wtype!r}")
        rb = native.row_bytes(wtype, int(cols))
        stride = rb if row_stride is None else int(row_stride)
        if not 0 <= offset <= storage.nbytes:
            raise ValueError(f"offset: {offset} outside the {storage.nbytes}-byte storage")
        self.storage, self.wtype, self.rows, self.cols, self.row_stride = storage, int(wtype), int(rows), int(cols), stride
        desc = storage.dev.ffi.new("pi_matrix *")
        desc.data = storage.dev.ffi.cast("char *", storage.ptr()) + offset
        desc.data_bytes = storage.nbytes - offset
        desc.rows, desc.cols, desc.row_stride, desc.type = self.rows, self.cols, stride, self.wtype
        self._desc = desc  # the library checks the view against data_bytes (PI_ERR_BOUNDS)

    @property
    def dev(self) -> "Device":
        return self.storage.dev

    @property
    def type_name(self) -> str:
        return native.TYPE_NAMES[self.wtype]

    def __repr__(self) -> str:
        return f"DeviceMatrix({self.rows}x{self.cols} {self.type_name}, on {self.dev.name})"


class Device:
    """One loaded device library (all its calls act on the current device of the calling thread)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.ffi = FFI()
        self.ffi.cdef(device_cdef())
        self.lib = self.ffi.dlopen(self.path)  # OSError if it cannot be loaded
        # every entry point looked up now: a library built from another header is refused here (AttributeError)
        self._fns = {fn: getattr(self.lib, fn) for fn in device_functions()}
        self._tape = threading.local()

    # ---- the C calls of the ops: run, and recorded for replay inside recording()
    def _run(self, name: str, *args) -> None:
        fn = self._fns[name]
        tape = getattr(self._tape, "calls", None)
        if tape is not None:
            tape.append((name, fn, args))
        _check(name, fn(*args))

    @contextlib.contextmanager
    def recording(self):
        """Run ops as usual (checked, on the device) and collect their C calls with the arguments as
        converted: replay(calls) makes the same calls again without the Python checks. For a fixed
        sequence repeated on the same buffers (a decode step's dense block), whose arguments were
        checked the first time; the caller keeps every array it used alive and unchanged in place."""
        prev = getattr(self._tape, "calls", None)
        self._tape.calls = calls = []
        try:
            yield calls
        finally:
            self._tape.calls = prev

    def replay(self, calls: list) -> None:
        for name, fn, args in calls:
            _check(name, fn(*args))

    # ---- state
    def available(self) -> bool:
        return bool(self.lib.pi_dev_available())

    @property
    def name(self) -> str:
        return self.ffi.string(self.lib.pi_dev_name()).decode(errors="replace")

    @property
    def backend(self) -> str:
        return self.ffi.string(self.lib.pi_dev_backend()).decode()

    def sync(self, stream=None) -> None:
        """Wait for the stream; raise NativeError for an index error flagged by a kernel since the last sync."""
        _check("pi_dev_sync", self.lib.pi_dev_sync(_stream(self.ffi, stream)))

    def mem_info(self) -> tuple[int, int]:
        """(free, total) bytes of the current device."""
        f, t = self.ffi.new("int64_t *"), self.ffi.new("int64_t *")
        _check("pi_dev_mem_info", self.lib.pi_dev_mem_info(f, t))
        return int(f[0]), int(t[0])

    def mem_used(self) -> int:
        """Bytes this process holds through pi_dev_malloc (DeviceArray)."""
        b = self.ffi.new("int64_t *")
        _check("pi_dev_mem_used", self.lib.pi_dev_mem_used(b))
        return int(b[0])

    # ---- memory
    def empty(self, shape, dtype=np.float32) -> DeviceArray:
        return DeviceArray(self, shape if isinstance(shape, tuple) else (shape,), dtype)

    def zeros(self, shape, dtype=np.float32, stream=None) -> DeviceArray:
        return self.empty(shape, dtype).fill_zero(stream)

    def to_device(self, a: np.ndarray, stream=None) -> DeviceArray:
        if not isinstance(a, np.ndarray):
            raise TypeError(f"a: expected a numpy array, got {type(a).__name__}")
        return self.empty(a.shape, a.dtype).copy_from(a, stream)

    def matrix(self, m: "native.Matrix", stream=None) -> DeviceMatrix:
        """Upload a host pi_backend.native.Matrix (its whole buffer, same layout; the CPU's own
        Q4_0X16 regrouping goes back to GGUF's Q4_0, the layout the device kernels read)."""
        if not isinstance(m, native.Matrix):
            raise TypeError(f"m: expected pi_backend.native.Matrix, got {type(m).__name__}")
        m = native.as_gguf_layout(m)
        raw = np.frombuffer(m.buffer.reshape(-1).view(np.uint8), np.uint8)
        return DeviceMatrix(self.to_device(raw, stream), m.wtype, m.rows, m.cols, m.row_stride)

    # ---- argument checks
    def _mat(self, m, name: str) -> DeviceMatrix:
        if not isinstance(m, DeviceMatrix):
            raise TypeError(f"{name}: expected DeviceMatrix, got {type(m).__name__}")
        if m.dev is not self:
            raise ValueError(f"{name}: belongs to another device library")
        return m

    def _arr(self, a, name: str, dtype, ndim=None) -> DeviceArray:
        if not isinstance(a, DeviceArray):
            raise TypeError(f"{name}: expected DeviceArray, got {type(a).__name__}")
        if a.dev is not self:
            raise ValueError(f"{name}: belongs to another device library")
        want = _DTYPES.get(dtype) or np.dtype(dtype)
        if a.dtype != want:
            raise TypeError(f"{name}: expected dtype {want.name}, got {a.dtype}")
        if ndim is not None and len(a.shape) not in (ndim if isinstance(ndim, tuple) else (ndim,)):
            raise ValueError(f"{name}: expected {ndim}-D, got shape {a.shape}")
        return a

    def _tokens(self, x, name: str, width: int) -> tuple[DeviceArray, int]:
        x = self._arr(x, name, np.float32, (1, 2))
        if x.shape[-1] != width:
            raise ValueError(f"{name}: last dimension {x.shape[-1]} != {width}")
        n_tok = 1 if x.ndim == 1 else x.shape[0]
        if n_tok == 0:
            raise ValueError(f"{name}: no tokens")
        return x, n_tok

    def _out(self, out, name: str, shape: tuple) -> DeviceArray:
        if out is None:
            return self.empty(shape, np.float32)
        out = self._arr(out, name, np.float32)
        if out.shape != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {out.shape}")
        return out

    def _idx(self, idx, name: str) -> DeviceArray:
        return self._arr(idx, name, np.int32, 1)

    # ---- ops (asynchronous on `stream`)
    def gemm(self, W: DeviceMatrix, x: DeviceArray, out: DeviceArray | None = None, stream=None) -> DeviceArray:
        """y = x @ W.T for x [n_tok, cols] (or [cols])."""
        W = self._mat(W, "W")
        x, n_tok = self._tokens(x, "x", W.cols)
        y = self._out(out, "out", x.shape[:-1] + (W.rows,))
        self._run("pi_dev_gemm", W._desc, x.ptr("float *"), n_tok, y.ptr("float *"), _stream(self.ffi, stream))
        return y

    def sparse_rows(self, W: DeviceMatrix, idx: DeviceArray, x: DeviceArray, out: DeviceArray | None = None,
                    stream=None) -> DeviceArray:
        """y[..., k] = W[idx[k]] . x (indices checked on the device)."""
        W, idx = self._mat(W, "W"), self._idx(idx, "idx")
        x, n_tok = self._tokens(x, "x", W.cols)
        y = self._out(out, "out", x.shape[:-1] + (idx.size,))
        if idx.size:
            self._run("pi_dev_sparse_gemm_rows",
                W._desc, idx.ptr("int32_t *"), idx.size, x.ptr("float *"), n_tok, y.ptr("float *"),
                _stream(self.ffi, stream))
        return y

    def sparse_axpy(self, Wt: DeviceMatrix, idx: DeviceArray, h: DeviceArray, y: DeviceArray,
                    stream=None) -> DeviceArray:
        """y[t] += sum_k h[t, k] * Wt[idx[k]] in place."""
        Wt, idx = self._mat(Wt, "Wt"), self._idx(idx, "idx")
        h, n_tok = self._tokens(h, "h", idx.size)
        y = self._arr(y, "y", np.float32, (1, 2))
        if y.shape != h.shape[:-1] + (Wt.cols,):
            raise ValueError(f"y: expected shape {h.shape[:-1] + (Wt.cols,)}, got {y.shape}")
        if idx.size:
            self._run("pi_dev_sparse_axpy_rows",
                Wt._desc, idx.ptr("int32_t *"), idx.size, h.ptr("float *"), n_tok, y.ptr("float *"),
                _stream(self.ffi, stream))
        return y

    def sparse_ffn(self, gate: DeviceMatrix | None, up: DeviceMatrix, down_t: DeviceMatrix, x: DeviceArray,
                   idx: DeviceArray, act: str = "reglu", out: DeviceArray | None = None, accumulate: bool = False,
                   skip_threshold: float = 0.0, token_mask: DeviceArray | None = None, stream=None) -> DeviceArray:
        """One layer's FFN over the neurons in idx (a set; a repeat is flagged on the device). token_mask:
        None, or uint8 [n_tok, idx.size]: token t takes neuron idx[k] only where token_mask[t, k] != 0."""
        gate, up, down_t = native.ffn_matrices(act, gate, up, down_t, self._mat)
        idx = self._idx(idx, "idx")
        native.check_skip_threshold(skip_threshold)
        x, n_tok = self._tokens(x, "x", up.cols)
        if token_mask is not None:
            dtype = token_mask.dtype if isinstance(token_mask, DeviceArray) and token_mask.dtype == np.bool_ else np.uint8
            token_mask = self._arr(token_mask, "token_mask", dtype, 2)
            if token_mask.shape != (n_tok, idx.size):
                raise ValueError(f"token_mask: expected shape {(n_tok, idx.size)}, got {token_mask.shape}")
        if accumulate and out is None:
            raise ValueError("out: required with accumulate=True")
        y = self._out(out, "out", x.shape[:-1] + (up.cols,))
        self._run("pi_dev_sparse_ffn",
            gate._desc if gate is not None else self.ffi.NULL, up._desc, down_t._desc, _ACT_NAMES[act],
            idx.ptr("int32_t *") if idx.size else self.ffi.NULL, idx.size,
            token_mask.ptr("uint8_t *") if token_mask is not None and idx.size else self.ffi.NULL, x.ptr("float *"), n_tok,
            y.ptr("float *"), int(bool(accumulate)), float(skip_threshold), _stream(self.ffi, stream))
        return y

    def predict_logits(self, fc1: DeviceMatrix, fc2: DeviceMatrix, x: DeviceArray, out: DeviceArray | None = None,
                       stream=None) -> DeviceArray:
        """logits = fc2 . relu(fc1 . x), [n_tok, n_ff] (threshold them for the active set)."""
        fc1, fc2 = self._mat(fc1, "fc1"), self._mat(fc2, "fc2")
        if fc2.cols != fc1.rows:
            raise ValueError(f"fc2: has {fc2.cols} columns but fc1 has rank {fc1.rows}")
        x, n_tok = self._tokens(x, "x", fc1.cols)
        y = self._out(out, "out", x.shape[:-1] + (fc2.rows,))
        self._run("pi_dev_predict_logits",
            fc1._desc, fc2._desc, x.ptr("float *"), n_tok, y.ptr("float *"), _stream(self.ffi, stream))
        return y

    # ---- dense blocks (an offloaded layer's attention; the residual stream stays on the device)
    def rmsnorm(self, x: DeviceArray, w: DeviceArray, eps: float, out: DeviceArray | None = None,
                stream=None) -> DeviceArray:
        """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w (out may be x)."""
        w = self._arr(w, "w", np.float32, 1)
        x, n_tok = self._tokens(x, "x", w.size)
        if not (isinstance(eps, (int, float, np.floating)) and eps >= 0):
            raise ValueError(f"eps: must be a number >= 0, got {eps!r}")
        y = self._out(out, "out", x.shape)
        self._run("pi_dev_rmsnorm", x.ptr("float *"), w.ptr("float *"), n_tok, w.size,
            float(eps), y.ptr("float *"), _stream(self.ffi, stream))
        return y

    def rope(self, x: DeviceArray, pos0: int, n_rot: int, freq_base: float, neox: bool = False,
             stream=None) -> DeviceArray:
        """Rotary embedding in place on x [n_tok, n_heads, head_dim] at positions pos0, pos0 + 1, .."""
        x = self._arr(x, "x", np.float32, 3)
        n_tok, n_heads, head_dim = x.shape
        if not 0 < n_rot <= head_dim or n_rot % 2:
            raise ValueError(f"n_rot: must be even and in (0, {head_dim}], got {n_rot}")
        if int(pos0) < 0:
            raise ValueError(f"pos0: must be >= 0, got {pos0}")
        if not freq_base > 0:
            raise ValueError(f"freq_base: must be > 0, got {freq_base}")
        self._run("pi_dev_rope", x.ptr("float *"), int(pos0), n_tok, n_heads, head_dim, int(n_rot),
            float(freq_base), int(bool(neox)), _stream(self.ffi, stream))
        return x

    def attention(self, q: DeviceArray, k_cache: DeviceArray, v_cache: DeviceArray, n_past: int,
                  out: DeviceArray | None = None, stream=None) -> DeviceArray:
        """Causal GQA attention of q [n_tok, n_head, d] (positions n_past ..) over the cache rows
        [kv_rows, n_head_kv, d] (the new tokens' rows already written), float32 or float16 (both of one
        type); returns [n_tok, n_head * d]."""
        q = self._arr(q, "q", np.float32, 3)
        kv_dtype = getattr(k_cache, "dtype", None)
        kv_type = native.KV_TYPE_IDS.get(kv_dtype) if isinstance(kv_dtype, np.dtype) else None
        if kv_type is None:
            raise TypeError(f"k_cache: expected a float32 or float16 DeviceArray, got {k_cache!r}")
        k_cache = self._arr(k_cache, "k_cache", kv_dtype, 3)
        v_cache = self._arr(v_cache, "v_cache", kv_dtype, 3)
        n_tok, n_head, d = q.shape
        kv_rows, n_head_kv, dk = k_cache.shape
        if v_cache.shape != k_cache.shape or dk != d:
            raise ValueError(f"k_cache / v_cache: shapes {k_cache.shape} / {v_cache.shape} do not fit q {q.shape}")
        if n_head % n_head_kv:
            raise ValueError(f"q: {n_head} heads is not a multiple of the cache's {n_head_kv}")
        if not 0 <= int(n_past) <= kv_rows - n_tok:
            raise ValueError(f"n_past: {n_past} cached + {n_tok} new exceeds the cache's {kv_rows} rows")
        y = self._out(out, "out", (n_tok, n_head * d))
        self._run("pi_dev_attention",
            q.ptr("float *"), k_cache.ptr("void *"), v_cache.ptr("void *"), kv_type, kv_rows, int(n_past), n_tok,
            n_head, n_head_kv, d, y.ptr("float *"), _stream(self.ffi, stream))
        return y

    def to_f16(self, x: DeviceArray, out: DeviceArray, stream=None) -> DeviceArray:
        """out = x rounded to float16 (as numpy's astype), same shape: new rows of an f16 KV cache."""
        x, out = self._arr(x, "x", np.float32), self._arr(out, "out", np.float16)
        if out.shape != x.shape:
            raise ValueError(f"out: shape {out.shape} != x {x.shape}")
        self._run("pi_dev_to_f16", x.ptr("float *"), out.ptr("uint16_t *"), x.size, _stream(self.ffi, stream))
        return out

    def add(self, y: DeviceArray, x: DeviceArray, stream=None) -> DeviceArray:
        """y += x in place (same shape)."""
        y, x = self._arr(y, "y", np.float32), self._arr(x, "x", np.float32)
        if x.shape != y.shape:
            raise ValueError(f"x: shape {x.shape} != y {y.shape}")
        self._run("pi_dev_add", y.ptr("float *"), x.ptr("float *"), y.size, _stream(self.ffi, stream))
        return y

    def select(self, logits: DeviceArray, threshold: float, part: DeviceArray | None, n_local: int,
               hot_out: DeviceArray, cold_out: DeviceArray, counts: DeviceArray, stream=None) -> None:
        """The active set of logits [n_tok, n_ff] (>= threshold for any token) split by part (int32 [n_ff]:
        local hot id or -1; None: all cold) into hot_out (local ids) and cold_out (neuron ids), ascending,
        with counts [2] = (n_hot, n_cold); all on the device."""
        logits = self._arr(logits, "logits", np.float32, (1, 2))
        n_ff = logits.shape[-1]
        n_tok = 1 if logits.ndim == 1 else logits.shape[0]
        if n_tok == 0:
            raise ValueError("logits: no tokens")
        if part is not None:
            part = self._arr(part, "part", np.int32, 1)
            if part.size != n_ff:
                raise ValueError(f"part: expected {n_ff} entries, got {part.size}")
        if not 0 <= int(n_local) <= n_ff:
            raise ValueError(f"n_local: must be in [0, {n_ff}], got {n_local}")
        for name, a in (("hot_out", hot_out), ("cold_out", cold_out)):
            if self._arr(a, name, np.int32, 1).size < n_ff:
                raise ValueError(f"{name}: capacity {a.size} < n_ff {n_ff}")
        if self._arr(counts, "counts", np.int32, 1).size < 2:
            raise ValueError("counts: needs 2 entries")
        if threshold != threshold:
            raise ValueError("threshold: NaN")
        self._run("pi_dev_select",
            logits.ptr("float *"), n_tok, n_ff, float(threshold), part.ptr("int32_t *") if part is not None else self.ffi.NULL,
            int(n_local), hot_out.ptr("int32_t *"), cold_out.ptr("int32_t *"), counts.ptr("int32_t *"),
            _stream(self.ffi, stream))

    def __repr__(self) -> str:
        return f"Device({self.backend}: {self.name}, {self.path})"


# ---- the default device library, loaded on first use

_lock = threading.Lock()
_default: Device | None = None
_tried = False
_why_not = ""


def library_path() -> pathlib.Path | None:
    """PI_BACKEND_DEVICE_LIB if set, else the first built library next to this module."""
    env = os.environ.get(ENV_LIBRARY)
    if env:
        return pathlib.Path(env)
    for name in LIBRARY_NAMES:
        if (HERE / name).is_file():
            return HERE / name
    return None


def default() -> Device | None:
    """The device library if one is built and finds a device, else None (reason: why_unavailable())."""
    global _default, _tried, _why_not
    with _lock:
        if not _tried:
            _tried = True
            path = library_path()
            if path is None:
                _why_not = f"no device library built ({' / '.join(LIBRARY_NAMES)} in {HERE})"
            else:
                try:
                    dev = Device(path)
                    if dev.available():
                        _default = dev
                    else:
                        _why_not = f"{path.name}: no usable device (driver or GPU missing)"
                except (OSError, AttributeError) as e:  # not loadable, or built from another header
                    _why_not = f"{path}: cannot be loaded ({e})"
        return _default


def available() -> bool:
    """True if a device library is built and a GPU is usable; never raises."""
    try:
        return default() is not None
    except Exception:  # noqa: BLE001 - available() is a probe
        return False


def why_unavailable() -> str:
    default()
    return _why_not


def require() -> Device:
    dev = default()
    if dev is None:
        raise RuntimeError(f"no GPU device: {why_unavailable()}")
    return dev
