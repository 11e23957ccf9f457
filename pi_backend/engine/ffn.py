"""One layer's FFN as PowerInfer organises it: an active-set rule, then hot and cold partitions, each
computed by its executor, whose partial outputs are summed.

Active-set rules (mode):
  sparse    the layer's predictor fc2 . relu(fc1 . ffn_inp) >= threshold (default for PowerInfer GGUF)
  oracle    every neuron is listed and the kernel skips those whose ReLU gate is zero: the exact active
            set, identical to dense for ReLU models (for tests and recall measurements)
  dense     every neuron computed
  threshold SiLU models without a predictor (TEAL/CATS): neurons whose |silu(gate)| is below a
            per-layer threshold are skipped, their up/down rows never read

Executors (executors.py): the cold partition runs on the CPU pool; the hot one on a GPU executor, or
on a CPU-only machine on a worker-thread stand-in overlapped with the cold one, so the split, the
merge and the scheduling are exercised everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pi_backend import native
from pi_backend.engine.executors import CpuExecutor, Executor
from pi_backend.engine.weights import LayerWeights

MODES = ("sparse", "dense", "oracle", "threshold")
RELU_FAMILY = ("reglu", "drelu", "relu")


@dataclass
class FFNStats:
    """Counters over all calls of one layer: how many neurons were listed and how many computed."""

    n_ff: int
    calls: int = 0
    listed: int = 0    # neurons the rule listed (predicted active), summed over calls
    computed: int = 0  # neurons whose up/down rows were read
    hot_listed: int = 0

    def reset(self) -> None:
        self.calls = self.listed = self.computed = self.hot_listed = 0

    def record(self, listed: int, computed: int, hot_listed: int = 0) -> None:
        """One call of the layer: the neurons listed, those whose rows were read, the hot ones listed."""
        self.calls += 1
        self.listed += listed
        self.computed += computed
        self.hot_listed += hot_listed

    @property
    def computed_fraction(self) -> float:
        return self.computed / max(1, self.calls * self.n_ff)

    @property
    def listed_fraction(self) -> float:
        return self.listed / max(1, self.calls * self.n_ff)


@dataclass
class SparseFFN:
    layer: int
    weights: LayerWeights
    act: str
    mode: str
    threshold: float              # predictor threshold (sparse) or |activation| cut (threshold mode)
    hot_mask: np.ndarray | None   # bool [n_ff]: neurons of the hot partition
    hot: Executor                 # the hot partition (GPU, or its CPU stand-in): submit/wait, overlapped
    cold: CpuExecutor
    n_threads: int | None = None  # predictor and explicit path (None: the cold executor's count)
    per_token: bool = True        # sparse batches: each token its own predicted set (False: the union)
    stats: FFNStats = field(init=False)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode: unknown FFN mode {self.mode!r}; expected one of {MODES}")
        n_ff = self.weights.up.rows
        if self.mode == "sparse" and self.weights.fc1 is None:
            raise ValueError(f"mode 'sparse': layer {self.layer} has no predictor (blk.{self.layer}.fc1/fc2); "
                             "use a PowerInfer GGUF, or mode 'oracle' / 'dense' / 'threshold'")
        if self.mode in ("sparse", "oracle") and self.act not in RELU_FAMILY:
            raise ValueError(f"mode {self.mode!r} needs a ReLU-family FFN, this model uses {self.act!r}: "
                             "use mode 'threshold' (TEAL/CATS-style) or 'dense'")
        if self.hot_mask is not None and self.hot_mask.shape != (n_ff,):
            raise ValueError(f"hot_mask: layer {self.layer} expects {n_ff} entries, got {self.hot_mask.shape}")
        self.all_neurons = np.arange(n_ff, dtype=np.int32)
        self.stats = FFNStats(n_ff)
        self._threads = self.cold.n_threads if self.n_threads is None else self.n_threads

    def active_set(self, ffn_inp: np.ndarray) -> np.ndarray:
        if self.mode == "sparse":
            return native.predict(self.weights.fc1, self.weights.fc2, ffn_inp, self.threshold,
                                  n_threads=self._threads)
        return self.all_neurons

    def takes_token_masks(self, n_tok: int) -> bool:
        """Whether a batch of n_tok tokens goes each token over its own predicted neurons (PowerInfer's
        rule, and what decoding each token alone gives), rather than all over the batch's union; the
        union's rows are read once for all of them either way."""
        return self.per_token and self.mode == "sparse" and self.weights.down_t is not None and n_tok > 1

    def predicted(self, ffn_inp: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(the listed neurons, None or the per-token mask [n_tok, listed] where takes_token_masks)."""
        if self.takes_token_masks(ffn_inp.shape[0] if ffn_inp is not None and ffn_inp.ndim == 2 else 1):
            return native.predict(self.weights.fc1, self.weights.fc2, ffn_inp, self.threshold,
                                  n_threads=self._threads, per_token=True)
        return self.active_set(ffn_inp), None

    def __call__(self, ffn_inp: np.ndarray, x: np.ndarray) -> np.ndarray:
        """ffn_inp: the residual stream before the FFN norm (the predictor's input); x: after it."""
        skip = self.threshold if self.mode == "threshold" else 0.0
        y = np.empty_like(x)
        idx, mask = self.predicted(ffn_inp)
        hot_listed = 0
        if self.weights.down_t is None or self.mode == "dense":
            computed = self._explicit(idx, x, y)
        elif self.hot_mask is None:
            computed = idx.size - self.cold.run(self.weights, self.act, idx, x, y, False, skip, token_mask=mask)
        else:
            in_hot = self.hot_mask[idx]
            hot_idx, cold_idx = idx[in_hot], idx[~in_hot]
            hot_mask = cold_mask = None
            if mask is not None:
                hot_mask, cold_mask = np.ascontiguousarray(mask[:, in_hot]), np.ascontiguousarray(mask[:, ~in_hot])
            # the hot partition starts first and runs while the CPU computes the cold one; one wait
            handle = self.hot.submit(self.layer, self.weights, self.act, hot_idx, x, skip, token_mask=hot_mask)
            try:
                computed = cold_idx.size - self.cold.run(self.weights, self.act, cold_idx, x, y, False, skip,
                                                         token_mask=cold_mask)
            finally:
                hot_skipped = self.hot.wait(handle, y, True)
            computed += hot_idx.size - hot_skipped
            hot_listed = hot_idx.size
        self.stats.record(idx.size, computed, hot_listed)
        return y

    def _explicit(self, idx: np.ndarray, x: np.ndarray, y: np.ndarray) -> int:
        """Gate and up rows of idx, the activation in numpy, then the down projection.

        Dense mode takes this path on purpose: every listed neuron is computed, nothing skipped, so it
        is an independent check of the fused kernel's skipping. Plain GGUF keeps W_down as
        [n_embd, n_ff], whose columns cannot be read sparsely: the down projection is then a dense
        GEMV over the scattered activations (PowerInfer GGUF stores ffn_down_t for a sparse one)."""
        w, n_threads = self.weights, self._threads
        ungated = self.act in native.UNGATED_ACTIVATIONS
        u = native.sparse_rows(w.up, idx, x, n_threads=n_threads)
        g = u if ungated else native.sparse_rows(w.gate, idx, x, n_threads=n_threads)
        a = gate_activation(self.act, g)
        if self.mode == "threshold":  # the kernel's cut: |act(gate)| <= threshold contributes nothing
            a[np.abs(a) <= self.threshold] = 0
        if ungated:
            h = a
        else:
            h = a * (np.maximum(u, 0) if self.act == "drelu" else u)
        h = np.ascontiguousarray(h, dtype=np.float32)
        if w.down_t is not None:
            y[...] = 0
            native.sparse_axpy(w.down_t, idx, h, y, n_threads=n_threads)
        else:
            full = np.zeros(x.shape[:-1] + (w.up.rows,), np.float32)
            full[..., idx] = h
            native.gemm(w.down, full, out=y, n_threads=n_threads)
        return idx.size  # every listed neuron's gate and up rows were read


def gate_activation(act: str, g: np.ndarray) -> np.ndarray:
    """The kernels' activation of the gate (or of up, ungated), in numpy: an independent path."""
    if act == "swiglu":
        return g / (1 + np.exp(-g))
    if act in ("gelu", "geglu"):  # the tanh approximation, as llama.cpp's ggml_gelu
        return 0.5 * g * (1 + np.tanh(np.float32(0.7978845608) * (g + np.float32(0.044715) * g * g * g)))
    return np.maximum(g, 0)
