"""The sparse FFN inside vLLM: one opaque torch custom op, `torch.ops.pi_backend.sparse_ffn`, that runs a
layer's predictor -> active set (the batch's union, its rows read once, with each token's own predicted
neurons as a mask over it: prefill and decode tokens alike) -> pi_backend's fused sparse FFN kernel,
directly on the tensors' memory.

No copies on the CPU path: weights are contiguous torch parameters that native.Matrix views through
`tensor.numpy()` (bfloat16 through an int16 view); float32 activations are viewed the same way and the
kernel writes straight into the output tensor. Above a density crossover (measured once per layer shape
at load time: dense torch GEMMs against the sparse kernel at 100% density, per batch size) and for
batches of more than `max_sparse_tokens` tokens (vLLM's profiling run sends thousands) the layer runs
dense in torch instead.

The op is registered in its own `torch.library.Library("pi_backend", "DEF")` (kept alive here), with a
fake implementation of exact shape, so Dynamo/Inductor treat it as one node. The layer is found by name
through vLLM's forward context (static_forward_context), like vLLM's own attention layers.

Deliberately no `from __future__ import annotations`: torch infers the op schema from real annotations.
"""
import logging
import os
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from pi_backend import native
from pi_backend.native import _check, ffi, lib

logger = logging.getLogger("vllm.pi_backend")

OP_NAMESPACE, OP = "pi_backend", "sparse_ffn"
_LIB = torch.library.Library(OP_NAMESPACE, "DEF")  # the op lives as long as this object: keep it
_LAYERS: "weakref.WeakValueDictionary[str, PowerInferMLP]" = weakref.WeakValueDictionary()
# Test/diagnostic hooks: called as fn(layer, info) after every call (info: tokens, active, path, idx).
OBSERVERS: list = []
_NATIVE_ACT = {"reglu": "reglu", "drelu": "drelu", "swiglu": "swiglu"}
_TORCH_TO_NATIVE = {torch.float32: native.TYPE_F32, torch.float16: native.TYPE_F16,
                    torch.bfloat16: native.TYPE_BF16}


def as_matrix(t: torch.Tensor) -> native.Matrix:
    """A zero-copy kernel view of a contiguous 2-D CPU tensor (float32 / float16 / bfloat16).
    The Matrix keeps the numpy view alive, and the numpy view keeps the tensor's storage alive."""
    if t.dim() != 2 or not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(f"expected a contiguous 2-D CPU tensor, got {tuple(t.shape)} on {t.device}")
    if t.dtype not in _TORCH_TO_NATIVE:
        raise TypeError(f"unsupported weight dtype {t.dtype} (float32, float16, bfloat16)")
    t = t.detach()
    buf = t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()
    return native.Matrix(buf, _TORCH_TO_NATIVE[t.dtype], t.shape[0], t.shape[1])


def _f32_view(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def run_kernel(layer: "PowerInferMLP", x: np.ndarray, idx: np.ndarray, out: np.ndarray, skip: float,
               mask: Optional[np.ndarray] = None) -> None:
    """out = the layer's FFN over the neurons idx for the tokens x (float32 [n_tok, hidden], C-contiguous),
    reading each listed neuron's rows once for all tokens; with mask (bool [n_tok, idx.size], from the
    predictor), each token over its own predicted neurons. native.sparse_ffn without its Python-side
    argument checks (they cost ~0.2 ms a call, np.unique included): idx comes sorted and unique from the
    predictor or np.arange, shapes are fixed at load time, and the C side re-checks every index and size."""
    if idx.size == 0:
        out.fill(0.0)
        return
    _check("pi_sparse_ffn", lib.pi_sparse_ffn(
        layer._gate_m._desc, layer._up_m._desc, layer._down_m._desc, layer._act_code,
        ffi.cast("int32_t *", ffi.from_buffer(idx)), idx.size,
        ffi.NULL if mask is None else ffi.cast("uint8_t *", ffi.from_buffer(mask)),
        ffi.cast("float *", ffi.from_buffer(x)), x.shape[0],
        ffi.cast("float *", ffi.from_buffer(out)), 0, float(skip), layer._skipped, layer.n_threads))


@dataclass
class LayerStats:
    calls: int = 0
    tokens: int = 0
    sparse_calls: int = 0
    dense_calls: int = 0
    listed: int = 0        # neurons in the active sets of sparse calls, summed over calls
    neuron_slots: int = 0  # n_ff per sparse call, summed (listed / neuron_slots = density)

    @property
    def density(self) -> float:
        return self.listed / self.neuron_slots if self.neuron_slots else float("nan")


# ---- the custom op -----------------------------------------------------------------------------

def _lookup(layer_name: str) -> "PowerInferMLP":
    try:
        from vllm.forward_context import get_forward_context, is_forward_context_available

        if is_forward_context_available():
            layer = get_forward_context().no_compile_layers.get(layer_name)
            if layer is not None:
                return layer
    except ImportError:  # pragma: no cover
        pass
    layer = _LAYERS.get(layer_name)
    if layer is None:
        raise KeyError(f"pi_backend.sparse_ffn: no layer named {layer_name!r}")
    return layer


def sparse_ffn_op(x: torch.Tensor, ffn_inp: torch.Tensor, layer_name: str) -> torch.Tensor:
    return _lookup(layer_name).compute(x, ffn_inp)


def sparse_ffn_fake(x: torch.Tensor, ffn_inp: torch.Tensor, layer_name: str) -> torch.Tensor:
    return torch.empty_like(x)


def _register_op() -> None:
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op(OP, sparse_ffn_op, mutates_args=[], fake_impl=sparse_ffn_fake,
                              target_lib=_LIB, dispatch_key="CPU")
    if torch.cuda.is_available():  # GPU activations: the op copies to the host and back (no GPU kernels yet)
        _LIB.impl(OP, sparse_ffn_op, "CUDA")


_register_op()


# ---- dense/sparse crossover, measured ------------------------------------------------------------

_CROSSOVER_CACHE: dict = {}
CROSSOVER_BATCHES = (1, 4, 16, 64, 256)


def _best_time(fn: Callable[[], object], reps: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_crossover(layer: "PowerInferMLP", batches=CROSSOVER_BATCHES) -> dict[int, float]:
    """For each batch size n: the active fraction at which the sparse kernel costs what dense torch does
    (t_dense(n) / t_sparse(n, all neurons)). Cached per (shape, dtype, activation, threads)."""
    key = (tuple(layer.up_weight.shape), layer.up_weight.dtype, layer.ffn_act, layer.n_threads, tuple(batches))
    if key in _CROSSOVER_CACHE:
        return _CROSSOVER_CACHE[key]
    n_ff, hidden = layer.up_weight.shape
    gen = torch.Generator().manual_seed(0)
    everything = np.arange(n_ff, dtype=np.int32)
    out = {}
    t_start = time.perf_counter()
    for n in batches:
        x = torch.randn(n, hidden, generator=gen, dtype=torch.float32)
        xd = x.to(layer.up_weight.dtype)
        y = np.empty((n, hidden), np.float32)
        xn = x.numpy()
        t_dense = _best_time(lambda: layer._dense(xd))
        # swiglu with no skip threshold computes every listed neuron: the sparse kernel's full cost
        t_sparse = _best_time(lambda: native.sparse_ffn(layer._gate_m, layer._up_m, layer._down_m, xn, everything,
                                                        act="swiglu", out=y, n_threads=layer.n_threads))
        out[n] = float(min(1.0, max(0.02, t_dense / t_sparse)))
    _CROSSOVER_CACHE[key] = out
    logger.info("pi_backend: dense/sparse crossover for %dx%d %s (%s threads), measured in %.2f s: %s",
                n_ff, hidden, str(layer.up_weight.dtype).replace("torch.", ""), layer.n_threads,
                time.perf_counter() - t_start, ", ".join(f"batch {n}: {d:.0%}" for n, d in out.items()))
    return out


# ---- the layer -----------------------------------------------------------------------------------

class PowerInferMLP(nn.Module):
    """A llama FFN (gate, up, down) run by pi_backend's kernels. Parameters are neuron-major:
    gate_weight / up_weight [n_ff, hidden] as in HF, down_t_weight [n_ff, hidden] = down_proj.weight.T.
    With tensor parallelism each rank owns a contiguous slice of the neurons (and of the predictor's
    fc2 rows); partial outputs are all-reduced."""

    def __init__(self, *, hidden_size: int, intermediate_size: int, ffn_act: str, mode: str,
                 threshold: float, layer_idx: int, prefix: str, max_sparse_tokens: int = 256,
                 dense_crossover="auto", n_threads: int = 0, params_dtype: Optional[torch.dtype] = None,
                 tp_rank: int = 0, tp_size: int = 1, static_forward_context: Optional[dict] = None):
        super().__init__()
        if ffn_act not in _NATIVE_ACT:
            raise ValueError(f"ffn_act: {ffn_act!r} is not one of {sorted(_NATIVE_ACT)}")
        if intermediate_size % tp_size:
            raise ValueError(f"intermediate_size {intermediate_size} is not divisible by the tensor-parallel "
                             f"size {tp_size}")
        dtype = params_dtype or torch.get_default_dtype()
        self.hidden_size, self.n_ff_total = hidden_size, intermediate_size
        self.n_ff = intermediate_size // tp_size
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.ffn_act, self.mode, self.threshold = ffn_act, mode, float(threshold)
        self.layer_idx, self.layer_name = layer_idx, prefix
        self.max_sparse_tokens, self.dense_crossover_option = int(max_sparse_tokens), dense_crossover
        self.n_threads = max(0, min(int(n_threads), lib.PI_MAX_THREADS))
        self.gate_weight = nn.Parameter(torch.empty(self.n_ff, hidden_size, dtype=dtype), requires_grad=False)
        self.up_weight = nn.Parameter(torch.empty(self.n_ff, hidden_size, dtype=dtype), requires_grad=False)
        self.down_t_weight = nn.Parameter(torch.empty(self.n_ff, hidden_size, dtype=dtype), requires_grad=False)
        self.fc1: Optional[torch.Tensor] = None  # predictor [rank, hidden]
        self.fc2: Optional[torch.Tensor] = None  # predictor [n_ff (this rank's), rank]
        self.stats = LayerStats()
        self._ready = False
        self._crossover: dict[int, float] = {}
        self._all = np.arange(self.n_ff, dtype=np.int32)
        if static_forward_context is not None:
            if prefix in static_forward_context:
                raise ValueError(f"duplicate layer name {prefix!r}")
            static_forward_context[prefix] = self
        _LAYERS[prefix] = self

    # ---- weights
    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's neurons (rows) of an [n_ff_total, ...] tensor."""
        if t.shape[0] != self.n_ff_total:
            raise ValueError(f"{self.layer_name}: expected {self.n_ff_total} rows, got {tuple(t.shape)}")
        return t[self.tp_rank * self.n_ff : (self.tp_rank + 1) * self.n_ff]

    def load_weights(self, weights) -> set[str]:
        """HF names relative to this module: gate_up_proj.weight (vLLM's stacked name, shard 0 = gate,
        1 = up) or gate_proj / up_proj, down_proj.weight [hidden, n_ff], fc1.weight, fc2.weight."""
        loaded = set()
        for name, w in weights:
            if name == "gate_up_proj.weight":
                shard = getattr(w, "shard_id", None)
                name = {0: "gate_proj.weight", 1: "up_proj.weight"}.get(shard)
                if name is None:
                    raise ValueError(f"{self.layer_name}: gate_up_proj.weight without a shard id")
            with torch.no_grad():
                if name == "gate_proj.weight":
                    self.gate_weight.copy_(self._rows(w))
                    loaded.add("gate_weight")
                elif name == "up_proj.weight":
                    self.up_weight.copy_(self._rows(w))
                    loaded.add("up_weight")
                elif name == "down_proj.weight":
                    self.down_t_weight.copy_(self._rows(w.t()))
                    loaded.add("down_t_weight")
                elif name in ("fc1.weight", "fc2.weight"):
                    self.set_predictor(**{name.split(".")[0]: w})
                else:
                    raise ValueError(f"{self.layer_name}: unexpected weight {name!r}")
        return loaded

    def set_predictor(self, fc1: Optional[torch.Tensor] = None, fc2: Optional[torch.Tensor] = None) -> None:
        def keep(t: torch.Tensor) -> torch.Tensor:
            t = t.detach().to("cpu")
            if t.dtype not in _TORCH_TO_NATIVE:
                t = t.float()
            return t.contiguous().clone()

        if fc1 is not None:
            if fc1.dim() != 2 or fc1.shape[1] != self.hidden_size:
                raise ValueError(f"{self.layer_name}: fc1 has shape {tuple(fc1.shape)}, expected [rank, {self.hidden_size}]")
            self.fc1 = keep(fc1)
        if fc2 is not None:
            if fc2.dim() != 2:
                raise ValueError(f"{self.layer_name}: fc2 has shape {tuple(fc2.shape)}, expected [{self.n_ff_total}, rank]")
            self.fc2 = keep(self._rows(fc2))

    def finalize(self) -> None:
        """After loading: build the kernel views (zero-copy) and decide the dense crossover."""
        if self.mode == "sparse":
            if self.fc1 is None or self.fc2 is None:
                raise ValueError(f"{self.layer_name}: mode 'sparse' needs the layer's predictor (fc1, fc2): put "
                                 "predictor.safetensors beside the model, set powerinfer.predictor, or use mode "
                                 "'oracle' / 'dense'")
            if self.fc2.shape[1] != self.fc1.shape[0]:
                raise ValueError(f"{self.layer_name}: fc2 has {self.fc2.shape[1]} columns but fc1 has rank {self.fc1.shape[0]}")
        for p in (self.gate_weight, self.up_weight, self.down_t_weight):
            if p.device.type != "cpu":
                raise ValueError(f"{self.layer_name}: pi_backend's kernels need the weights in host memory")
        self._gate_m = as_matrix(self.gate_weight.data)
        self._up_m = as_matrix(self.up_weight.data)
        self._down_m = as_matrix(self.down_t_weight.data)
        self._fc1_m = as_matrix(self.fc1) if self.fc1 is not None else None
        self._fc2_m = as_matrix(self.fc2) if self.fc2 is not None else None
        self._act_code = native.ACTIVATIONS[_NATIVE_ACT[self.ffn_act]]
        self._skipped = ffi.new("int64_t *")
        if self.dense_crossover_option == "auto":
            self._crossover = measure_crossover(self) if self.mode != "dense" else {}
        else:
            self._crossover = {n: float(self.dense_crossover_option) for n in CROSSOVER_BATCHES}
        self._ready = True

    def crossover(self, n_tok: int) -> float:
        """The active fraction above which a batch of n_tok tokens runs dense (the measured value at the
        next measured batch size up: the conservative side)."""
        for n in sorted(self._crossover):
            if n_tok <= n:
                return self._crossover[n]
        return self._crossover[max(self._crossover)] if self._crossover else 1.0

    # ---- forward
    def forward(self, x: torch.Tensor, ffn_inp: torch.Tensor) -> torch.Tensor:
        """x: the normed FFN input [tokens, hidden]; ffn_inp: the residual stream before the norm (the
        predictor's input, as in PowerInfer)."""
        y = torch.ops.pi_backend.sparse_ffn(x, ffn_inp, self.layer_name)
        if self.tp_size > 1:
            from vllm.distributed import tensor_model_parallel_all_reduce

            y = tensor_model_parallel_all_reduce(y)
        return y

    def _dense(self, x: torch.Tensor, idx: Optional[np.ndarray] = None,
               mask: Optional[np.ndarray] = None) -> torch.Tensor:
        """Every neuron in torch; with idx (and each token's mask over it), the output keeps only the
        neurons of idx (each token's own), so that a batch gives the same result whichever side of the
        crossover it falls on."""
        g = torch.nn.functional.linear(x, self.gate_weight)
        u = torch.nn.functional.linear(x, self.up_weight)
        if self.ffn_act == "swiglu":
            h = torch.nn.functional.silu(g) * u
        elif self.ffn_act == "drelu":
            h = torch.relu(g) * torch.relu(u)
        else:
            h = torch.relu(g) * u
        if idx is not None and mask is not None:
            keep = torch.zeros((h.shape[0], self.n_ff), dtype=h.dtype)
            keep[:, torch.from_numpy(idx).long()] = torch.from_numpy(mask).to(h.dtype)
            h = h * keep
        elif idx is not None and idx.size < self.n_ff:
            keep = torch.zeros(self.n_ff, dtype=h.dtype)
            keep[torch.from_numpy(idx).long()] = 1
            h = h * keep
        return h @ self.down_t_weight

    def active_set(self, ffn_inp32: np.ndarray):
        """(idx, mask): the batch's predicted neurons, and which of them each token's own logits select
        (None for one token, or outside sparse mode). Each token computes only its own set, as
        PowerInfer does and as decoding the sequence alone would: a request's output does not depend
        on which requests share its batch."""
        if self.mode == "sparse":
            if ffn_inp32.shape[0] > 1:
                return native.predict(self._fc1_m, self._fc2_m, ffn_inp32, self.threshold,
                                      n_threads=self.n_threads, per_token=True)
            return native.predict(self._fc1_m, self._fc2_m, ffn_inp32, self.threshold, n_threads=self.n_threads), None
        return self._all, None  # oracle / threshold: the kernel skips the neurons that do not fire

    def compute(self, x: torch.Tensor, ffn_inp: torch.Tensor) -> torch.Tensor:
        """The op's body: [tokens, hidden] -> [tokens, hidden] in x's dtype."""
        if not self._ready:
            raise RuntimeError(f"{self.layer_name}: weights not finalized (process_weights_after_loading not run)")
        if x.device.type != "cpu":
            return self.compute(x.cpu(), ffn_inp.cpu()).to(x.device)
        n_tok = x.shape[0]
        st = self.stats
        st.calls += 1
        st.tokens += n_tok
        if n_tok == 0:
            return torch.empty_like(x)
        if self.mode == "dense" or n_tok > self.max_sparse_tokens:
            return self._run_dense(x, n_tok, None, ffn_inp)
        x32 = x.detach().contiguous().float()
        idx, mask = self.active_set(ffn_inp.detach().contiguous().float().numpy() if self.mode == "sparse" else None)
        if self.mode == "sparse" and idx.size > self.crossover(n_tok) * self.n_ff:
            return self._run_dense(x, n_tok, idx, ffn_inp, mask)
        out = torch.empty((n_tok, self.hidden_size), dtype=torch.float32)
        run_kernel(self, _f32_view(x32), idx, _f32_view(out), self.threshold if self.mode == "threshold" else 0.0,
                   mask)
        st.sparse_calls += 1
        st.listed += int(idx.size)
        st.neuron_slots += self.n_ff
        for fn in OBSERVERS:
            fn(self, {"tokens": n_tok, "active": int(idx.size), "path": "sparse", "idx": idx, "mask": mask,
                      "x": x32, "ffn_inp": ffn_inp})
        return out if x.dtype == torch.float32 else out.to(x.dtype)

    def _run_dense(self, x: torch.Tensor, n_tok: int, idx, ffn_inp: Optional[torch.Tensor] = None,
                   mask: Optional[np.ndarray] = None) -> torch.Tensor:
        self.stats.dense_calls += 1
        y = self._dense(x if x.dtype == self.up_weight.dtype else x.to(self.up_weight.dtype), idx, mask)
        for fn in OBSERVERS:
            fn(self, {"tokens": n_tok, "active": self.n_ff if idx is None else int(idx.size), "path": "dense",
                      "idx": idx, "mask": mask, "x": x, "ffn_inp": ffn_inp})
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden_size}, n_ff={self.n_ff}/{self.n_ff_total}, act={self.ffn_act}, "
                f"mode={self.mode}, threshold={self.threshold}")


def all_layers() -> list[PowerInferMLP]:
    """Every live PowerInferMLP of this process, in layer order (tests, diagnostics)."""
    return sorted(_LAYERS.values(), key=lambda layer: layer.layer_idx)


def default_threads() -> int:
    """PI_BACKEND_THREADS, else the CPUs this worker may run on (vLLM binds each tensor-parallel worker
    to its own cores before the model is built; torch itself is cut to fewer threads for serving)."""
    env = os.environ.get("PI_BACKEND_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
