"""FFN executors: what computes a partition (a list of neurons) of one layer's FFN.

The protocol (every executor implements it; SparseFFN uses nothing else):

    prepare(layer, lw, neurons)      once at load: the neurons this executor will be given for `layer`
                                     (a GPU executor uploads their gate/up/down_t rows here)
    submit(layer, lw, act, idx, x, skip_threshold) -> handle
                                     start y_part = FFN over idx (global neuron ids, a subset of the
                                     prepared neurons) for the tokens x [n_tok, n_embd]; may return
                                     before the work is done
    wait(handle, out, accumulate) -> n_skipped
                                     the one synchronisation: out (+)= y_part; returns how many listed
                                     neurons did not fire
    run(lw, act, idx, x, out, accumulate, skip_threshold) -> n_skipped     synchronous form
    close()

Per layer SparseFFN submits the hot partition, computes the cold partition on the CPU while it runs,
then waits once: the only data crossing per layer are the hot index list, the hidden state x and the
n_embd-sized partial sum -- never an n_ff-sized vector.

Executors here:
  CpuExecutor        the native CPU pool, synchronous (submit defers the work to wait)
  CpuThreadExecutor  the GPU's stand-in on a CPU-only machine: a worker thread running the native
                     kernel with its own thread count (the pool serialises concurrent multi-thread
                     dispatches; a 1-thread call never touches it), overlapped with the cold partition
  DeviceExecutor     the hot partition on a CUDA / HIP device through pi_backend.native.device
                     (the CPU emulator build of the same kernels runs it in tests without a GPU)
  gpu_executor()     a DeviceExecutor on the default device, or GpuUnavailableError saying why
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from pi_backend import native
from pi_backend.engine.weights import LayerWeights

__all__ = [
    "Executor", "CpuExecutor", "CpuThreadExecutor", "DeviceExecutor", "GpuUnavailableError", "gpu_available",
    "gpu_free_bytes", "gpu_executor", "HotRows",
]


@runtime_checkable
class Executor(Protocol):
    name: str
    n_threads: int

    def prepare(self, layer: int, lw: LayerWeights, neurons: np.ndarray) -> None: ...

    def submit(self, layer: int, lw: LayerWeights, act: str, idx: np.ndarray, x: np.ndarray,
               skip_threshold: float, token_mask: np.ndarray | None = None) -> Any: ...

    def wait(self, handle: Any, out: np.ndarray, accumulate: bool) -> int: ...

    def run(self, lw: LayerWeights, act: str, idx: np.ndarray, x: np.ndarray, out: np.ndarray,
            accumulate: bool, skip_threshold: float) -> int: ...

    def close(self) -> None: ...


def _sparse_ffn(gate, up, down_t, act, idx, x, out, skip_threshold, n_threads, accumulate=False,
                token_mask=None) -> int:
    _, skipped = native.sparse_ffn(gate, up, down_t, x, idx, act=act, out=out, accumulate=accumulate,
                                   skip_threshold=skip_threshold, n_threads=n_threads, return_skipped=True,
                                   token_mask=token_mask)
    return skipped


def _merge(part: np.ndarray, out: np.ndarray, accumulate: bool) -> None:
    if accumulate:
        out += part
    else:
        out[...] = part


@dataclass
class _Deferred:
    lw: LayerWeights
    act: str
    idx: np.ndarray
    x: np.ndarray
    skip: float
    token_mask: np.ndarray | None = None


class CpuExecutor:
    """Computes the listed neurons of a layer on the native CPU thread pool."""

    name = "cpu"

    def __init__(self, n_threads: int = 0):
        self.n_threads = n_threads

    def prepare(self, layer: int, lw: LayerWeights, neurons: np.ndarray) -> None:
        pass  # reads the model's own (memory-mapped) rows

    def run(self, lw: LayerWeights, act: str, idx: np.ndarray, x: np.ndarray, out: np.ndarray,
            accumulate: bool, skip_threshold: float, token_mask: np.ndarray | None = None) -> int:
        """out (+)= FFN over idx (token t over the neurons its token_mask row sets, if given); returns
        how many listed neurons did not fire."""
        return _sparse_ffn(lw.gate, lw.up, lw.down_t, act, idx, x, out, skip_threshold, self.n_threads, accumulate,
                           token_mask)

    def submit(self, layer: int, lw: LayerWeights, act: str, idx: np.ndarray, x: np.ndarray,
               skip_threshold: float, token_mask: np.ndarray | None = None) -> _Deferred:
        return _Deferred(lw, act, idx, x, skip_threshold, token_mask)  # runs in wait: no concurrency here

    def wait(self, handle: _Deferred, out: np.ndarray, accumulate: bool) -> int:
        # the partition's own sum, then one add: the same arithmetic as the overlapped executors
        part = np.empty_like(out)
        skipped = self.run(handle.lw, handle.act, handle.idx, handle.x, part, False, handle.skip, handle.token_mask)
        _merge(part, out, accumulate)
        return skipped

    def close(self) -> None:
        pass


class HotRows:
    """The rows of a layer's hot neurons copied into one compact block (what a GPU executor uploads),
    with the global -> local id map. Lets the CPU stand-in run exactly the GPU's data path."""

    def __init__(self, lw: LayerWeights, neurons: np.ndarray):
        neurons = np.asarray(neurons, np.int32)
        self.n_ff = lw.up.rows
        self.local = np.full(self.n_ff, -1, np.int32)
        self.local[neurons] = np.arange(neurons.size, dtype=np.int32)
        self.gate = self._gather(lw.gate, neurons)
        self.up = self._gather(lw.up, neurons)
        self.down_t = self._gather(lw.down_t, neurons)

    @staticmethod
    def _gather(m: native.Matrix | None, rows: np.ndarray) -> native.Matrix | None:
        if m is None or rows.size == 0:
            return None
        rb = native.row_bytes(m.wtype, m.cols)
        src = np.lib.stride_tricks.as_strided(m.buffer.view(np.uint8).reshape(-1), shape=(m.rows, rb),
                                              strides=(m.row_stride, 1), writeable=False)
        return native.Matrix(np.ascontiguousarray(src[rows]), m.wtype, rows.size, m.cols)

    def to_local(self, idx: np.ndarray) -> np.ndarray:
        loc = self.local[idx]
        if loc.size and loc.min() < 0:
            bad = idx[loc < 0][0]
            raise ValueError(f"idx: neuron {int(bad)} was not prepared for this executor (not in the hot set)")
        return loc


class _Job:
    __slots__ = ("args", "part", "skipped", "error")

    def __init__(self, args, part):
        self.args, self.part, self.skipped, self.error = args, part, 0, None


class _Channel:
    """What the worker thread shares with its executor (never the executor itself, so that an executor
    nobody closed is still collected, and its __del__ stops the thread)."""

    def __init__(self):
        self.go = threading.Lock()    # binary semaphores (the cheapest primitive CPython has):
        self.done = threading.Lock()  # held = "not signalled"
        self.go.acquire()
        self.done.acquire()
        self.job: _Job | None = None


def _worker(ch: _Channel) -> None:
    while True:
        ch.go.acquire()
        job = ch.job
        if job is None:  # close()
            return
        try:
            job.skipped = _sparse_ffn(*job.args)  # cffi releases the GIL for the native call
        except BaseException as exc:  # handed to wait()
            job.error = exc
        ch.done.release()


class CpuThreadExecutor:
    """The GPU partition's stand-in on a CPU-only machine: submit hands the native call to a worker
    thread (cffi releases the GIL for its duration) and returns at once, so the caller computes the
    cold partition concurrently; wait joins and adds the partial sum. One job in flight at a time, as
    on a device stream. compact=True computes from a copy of the hot rows with local ids (HotRows),
    the path a GPU executor takes; False reads the model's rows in place."""

    name = "cpu-thread"

    def __init__(self, n_threads: int = 1, compact: bool = False):
        self.n_threads = n_threads
        self.compact = compact
        self._rows: dict[int, HotRows] = {}
        self._ch = _Channel()
        self._busy = False
        self._closed = False
        self._thread: threading.Thread | None = None

    def prepare(self, layer: int, lw: LayerWeights, neurons: np.ndarray) -> None:
        if self.compact:
            self._rows[layer] = HotRows(lw, neurons)

    def _args(self, layer: int | None, lw: LayerWeights, act: str, idx: np.ndarray, x: np.ndarray,
              out: np.ndarray, skip_threshold: float, token_mask: np.ndarray | None = None) -> tuple:
        rows = self._rows.get(layer) if layer is not None else None
        if rows is not None:
            return (rows.gate, rows.up, rows.down_t, act, rows.to_local(idx), x, out, skip_threshold, self.n_threads,
                    False, token_mask)
        return lw.gate, lw.up, lw.down_t, act, idx, x, out, skip_threshold, self.n_threads, False, token_mask

    def run(self, lw: LayerWeights, act: str, idx: np.ndarray, x: np.ndarray, out: np.ndarray,
            accumulate: bool, skip_threshold: float, layer: int | None = None,
            token_mask: np.ndarray | None = None) -> int:
        """Synchronous, on the calling thread."""
        part = np.empty_like(out)
        skipped = _sparse_ffn(*self._args(layer, lw, act, idx, x, part, skip_threshold, token_mask))
        _merge(part, out, accumulate)
        return skipped

    def submit(self, layer: int, lw: LayerWeights, act: str, idx: np.ndarray, x: np.ndarray,
               skip_threshold: float, token_mask: np.ndarray | None = None) -> _Job:
        if self._closed:
            raise RuntimeError("CpuThreadExecutor: closed")
        if self._busy:
            raise RuntimeError("CpuThreadExecutor: submit while a job is in flight (wait for it first)")
        part = np.empty(x.shape[:-1] + (lw.up.cols,), np.float32)
        job = _Job(self._args(layer, lw, act, idx, x, part, skip_threshold, token_mask), part)
        if idx.size == 0:  # nothing to hand over
            return job
        if self._thread is None:
            self._thread = threading.Thread(target=_worker, args=(self._ch,), name="pi-hot-partition", daemon=True)
            self._thread.start()
        self._busy = True
        self._ch.job = job
        self._ch.go.release()
        return job

    def wait(self, handle: _Job, out: np.ndarray, accumulate: bool) -> int:
        if handle.args[4].size == 0:
            if not accumulate:
                out[...] = 0
            return 0
        self._ch.done.acquire()
        self._busy = False
        self._ch.job = None
        if handle.error is not None:
            raise handle.error
        _merge(handle.part, out, accumulate)
        return handle.skipped

    def close(self) -> None:
        if self._thread is not None and not self._closed:
            if self._busy:
                self._ch.done.acquire()
                self._busy = False
            self._ch.job = None
            self._ch.go.release()
            self._thread.join()
        self._closed = True

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


# ---- the device backend ------------------------------------------------------------------------------

class GpuUnavailableError(RuntimeError):
    """A GPU executor was requested on a machine (or build) without one."""


def _device_module():
    try:
        from pi_backend.native import device  # loads no library until asked
    except ImportError:
        return None
    return device


def gpu_available() -> bool:
    dev = _device_module()
    return bool(dev is not None and dev.available())  # available() never raises


def gpu_free_bytes() -> int | None:
    """Free device memory, or None without a device."""
    if not gpu_available():
        return None
    return int(_device_module().default().mem_info()[0])


class _DeviceJob:
    __slots__ = ("y", "n_tok")

    def __init__(self, y, n_tok):
        self.y, self.n_tok = y, n_tok


class DeviceExecutor:
    """The hot partition on a CUDA / HIP device (pi_backend.native.device).

    prepare uploads a compact copy of each layer's hot rows (HotRows) once. submit copies the local
    index list and x into buffers allocated once (grown when needed), launches pi_dev_sparse_ffn on
    `stream` and returns while the kernel runs; wait copies the n_embd-sized partial sum back -- the
    layer's one synchronisation -- and adds it. (pi_dev_sparse_ffn reports no skip count: wait returns 0.)
    """

    name = "gpu"
    n_threads = 0

    def __init__(self, dev=None, stream=None):
        if dev is None:
            mod = _device_module()
            dev = mod.default() if mod is not None else None
            if dev is None:
                raise GpuUnavailableError(f"no GPU device: {mod.why_unavailable() if mod else 'no device module'}")
        self.dev, self.stream = dev, stream
        self._layers: dict[int, tuple] = {}
        self._buf: dict[str, Any] = {}
        self._busy = False

    def prepare(self, layer: int, lw: LayerWeights, neurons: np.ndarray) -> None:
        rows = HotRows(lw, neurons)
        if rows.up is None:
            self._layers[layer] = (rows.local, None, None, None)
            return
        up = lambda m: None if m is None else self.dev.matrix(m)  # noqa: E731
        self._layers[layer] = (rows.local, up(rows.gate), up(rows.up), up(rows.down_t))

    def _scratch(self, name: str, shape: tuple, dtype) -> Any:
        """A view of shape `shape` into the scratch buffer `name` (allocated once, grown when needed)."""
        n = int(np.prod(shape))
        arr = self._buf.get(name)
        if arr is None or arr.size < n:
            arr = self._buf[name] = self.dev.empty((max(n, 1),), dtype)
        return arr.rows(0, n).reshape(shape)

    def _upload(self, name: str, a: np.ndarray) -> Any:
        """a copied into the scratch buffer `name`."""
        a = np.ascontiguousarray(a)
        return self._scratch(name, a.shape, a.dtype).copy_from(a, self.stream)

    def submit(self, layer: int, lw: LayerWeights, act: str, idx: np.ndarray, x: np.ndarray,
               skip_threshold: float, token_mask: np.ndarray | None = None) -> _DeviceJob:
        if self._busy:
            raise RuntimeError("DeviceExecutor: submit while a job is in flight (wait for it first)")
        n_tok = 1 if x.ndim == 1 else x.shape[0]
        if idx.size == 0:
            return _DeviceJob(None, n_tok)
        local, gate, up, down_t = self._layers[layer]
        loc = local[idx]
        if loc.min() < 0:
            raise ValueError(f"idx: neuron {int(idx[loc < 0][0])} was not prepared for this executor")
        d_idx = self._upload("idx", loc.astype(np.int32))
        d_x = self._upload("x", np.asarray(x, np.float32))
        d_mask = None if token_mask is None else self._upload("mask", np.asarray(token_mask).astype(np.uint8, copy=False))
        d_y = self.dev.sparse_ffn(gate, up, down_t, d_x, d_idx, act=act, out=self._scratch("y", d_x.shape, np.float32),
                                  skip_threshold=skip_threshold, token_mask=d_mask, stream=self.stream)
        self._busy = True
        return _DeviceJob(d_y, n_tok)

    def wait(self, handle: _DeviceJob, out: np.ndarray, accumulate: bool) -> int:
        if handle.y is None:
            if not accumulate:
                out[...] = 0
            return 0
        self._busy = False
        part = handle.y.copy_to_host(np.empty(out.shape, np.float32), self.stream)
        self.dev.sync(self.stream)  # the one synchronisation (raises a device-flagged index error)
        _merge(part, out, accumulate)
        return 0

    def run(self, lw: LayerWeights, act: str, idx: np.ndarray, x: np.ndarray, out: np.ndarray,
            accumulate: bool, skip_threshold: float, layer: int = 0, token_mask: np.ndarray | None = None) -> int:
        return self.wait(self.submit(layer, lw, act, idx, x, skip_threshold, token_mask), out, accumulate)

    def close(self) -> None:
        self._layers.clear()
        self._buf.clear()


def gpu_executor(**kwargs) -> Executor:
    """The device executor for the hot partition; a clear error where there is none."""
    dev = _device_module()
    if dev is None or not dev.available():
        why = dev.why_unavailable() if dev is not None else "pi_backend.native.device is missing"
        raise GpuUnavailableError(
            f"device='gpu' requested, but no usable GPU was found ({why}). Build the CUDA or HIP library "
            "(pi_backend/native/build_gpu.py), or use device='auto' (falls back to the CPU) or device='cpu'.")
    return DeviceExecutor(dev.default(), **kwargs)
