"""Engine-based collection: watch every FFN call of a running pi_backend engine.

The tools (profile, train-predictor, calibrate-threshold, quantize's recall check) all need, per layer
and token, what the FFN *would* do over all its neurons on the inputs the engine really produces. A
hook wraps each layer's SparseFFN; before the layer runs it computes, with the native kernels,

    ffn_inp   the residual stream before the FFN norm (the predictor's input)
    x         the normed FFN input (what W_gate / W_up see)
    a         act(W_gate · x) for every neuron (ReLU / SiLU of the gate; relu(W_up · x) without a gate)
    h         the true activation over all neurons: a * (W_up · x)   (drelu: a * relu(W_up · x))

and hands them to a callback; then the layer runs exactly as configured (the hook observes, it does
not change the model). On top of that: a `collect_fn` for predictor training, the per-token
predictor/truth confusion counts, and a token-by-token ("decode") perplexity in which every token's
FFN uses only its own active set, as in generation.
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

from pi_backend import native
from pi_backend.engine.ffn import gate_activation

RELU_FAMILY = ("reglu", "drelu", "relu")


# ----------------------------------------------------------------------------- progress
class Progress:
    """A plain stderr progress bar: `\\r`-updated on a terminal, a line per ~10% otherwise."""

    def __init__(self, total: int, desc: str, enabled: bool = True, stream=None):
        self.total, self.desc, self.enabled = max(int(total), 1), desc, enabled
        self.stream = stream or sys.stderr
        self.n, self.t0, self._last_decile = 0, time.time(), -1
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._show()

    def update(self, k: int = 1) -> None:
        self.n = min(self.total, self.n + k)
        self._show()

    def _show(self) -> None:
        if not self.enabled:
            return
        frac = self.n / self.total
        elapsed = time.time() - self.t0
        eta = elapsed / frac - elapsed if frac > 0 else float("nan")
        bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
        line = f"{self.desc}: [{bar}] {self.n}/{self.total} {elapsed:5.1f}s" + (f" eta {eta:5.1f}s" if self.n < self.total and frac > 0 else "")
        if self._tty:
            self.stream.write("\r" + line + ("\n" if self.n >= self.total else ""))
            self.stream.flush()
        else:
            decile = int(10 * frac)
            if decile != self._last_decile:
                self._last_decile = decile
                self.stream.write(line + "\n")
                self.stream.flush()

    def close(self) -> None:
        if self.n < self.total:
            self.n = self.total
            self._show()


def progress(items: Sequence, desc: str, enabled: bool = True):
    bar = Progress(len(items), desc, enabled)
    for item in items:
        yield item
        bar.update()


# ----------------------------------------------------------------------------- the hook
@dataclass
class FFNCall:
    """What one layer saw in one forward call (arrays [T, ...], float32)."""

    layer: int
    ffn_inp: np.ndarray
    x: np.ndarray
    weights: object   # engine LayerWeights
    act: str
    threshold: float  # the layer's configured threshold (predictor cut or threshold-mode cut)

    def gate_activation(self) -> np.ndarray:
        """act(gate · x) for every neuron [T, n_ff] (act(up · x) for the ungated kinds)."""
        lw = self.weights
        first = lw.up if self.act in native.UNGATED_ACTIVATIONS else lw.gate
        return gate_activation(self.act, native.gemm(first, self.x))

    def activation(self, a: np.ndarray | None = None) -> np.ndarray:
        """h = act(gate · x) * (up · x) over every neuron [T, n_ff] (the true, unthresholded activation)."""
        a = self.gate_activation() if a is None else a
        if self.act in native.UNGATED_ACTIVATIONS:
            return a
        u = native.gemm(self.weights.up, self.x)
        return a * (np.maximum(u, 0) if self.act == "drelu" else u)

    def predictor_logits(self) -> np.ndarray:
        lw = self.weights
        if lw.fc1 is None:
            raise ValueError(f"layer {self.layer} has no predictor")
        z = np.maximum(native.gemm(lw.fc1, self.ffn_inp), 0)
        return native.gemm(lw.fc2, np.ascontiguousarray(z))


class _Hooked:
    def __init__(self, inner, callback):
        self.inner, self.callback = inner, callback

    def __call__(self, ffn_inp, x):
        self.callback(FFNCall(self.inner.layer, ffn_inp, x, self.inner.weights, self.inner.act, self.inner.threshold))
        return self.inner(ffn_inp, x)

    def __getattr__(self, name):  # stats, layer, mode, ... of the wrapped SparseFFN
        return getattr(self.inner, name)


@contextlib.contextmanager
def hooked(model, callback: Callable[[FFNCall], None]):
    """Within the block every FFN call of `model` first calls callback(FFNCall)."""
    original = list(model.ffn)
    model.ffn = [_Hooked(f, callback) for f in original]
    try:
        yield model
    finally:
        model.ffn = original


def run_windows(model, windows: Iterable[Sequence[int]], callback: Callable[[FFNCall], None],
                desc: str = "collect", show_progress: bool = True) -> int:
    """Run each window from an empty cache with the hook installed; returns the number of tokens."""
    windows = list(windows)
    n = 0
    with hooked(model, callback):
        for w in progress(windows, desc, show_progress):
            model.reset()
            model.forward(w)
            n += len(w)
    model.reset()
    return n


def check_windows(model, windows: Sequence[Sequence[int]]) -> None:
    """Fail now (not after an hour) on windows the model cannot run."""
    if not windows:
        raise ValueError("no token windows: the text is too short")
    longest = max(len(w) for w in windows)
    if longest > model.n_ctx:
        raise ValueError(f"windows of {longest} tokens exceed the model's context of {model.n_ctx}")


# ----------------------------------------------------------------------------- predictor training
def engine_collector(model, show_progress: bool = False) -> Callable[[np.ndarray], list]:
    """A train_predictor collect_fn: tokens -> per layer (ffn_inp [T, n_embd], active [T, n_ff] bool).

    `active` is h != 0 with h the true activation of every neuron on the engine's own inputs."""
    def collect(tokens) -> list:
        out: list = [None] * len(model.ffn)

        def record(call: FFNCall) -> None:
            out[call.layer] = (call.ffn_inp.copy(), call.activation() != 0)

        with hooked(model, record):
            model.reset()
            model.forward(np.asarray(tokens).tolist())
        model.reset()
        return out

    return collect


# ----------------------------------------------------------------------------- predictor quality
@dataclass
class Confusion:
    """Per layer, over (token, neuron) pairs: predictor vs truth (h != 0)."""

    tp: np.ndarray
    n_true: np.ndarray
    n_pred: np.ndarray
    n_pairs: np.ndarray

    @classmethod
    def zeros(cls, n_layer: int) -> "Confusion":
        z = lambda: np.zeros(n_layer, np.int64)  # noqa: E731
        return cls(z(), z(), z(), z())

    @property
    def recall(self) -> np.ndarray:
        return self.tp / np.maximum(self.n_true, 1)

    @property
    def precision(self) -> np.ndarray:
        return self.tp / np.maximum(self.n_pred, 1)

    @property
    def true_density(self) -> np.ndarray:
        return self.n_true / np.maximum(self.n_pairs, 1)

    @property
    def predicted_density(self) -> np.ndarray:
        return self.n_pred / np.maximum(self.n_pairs, 1)

    def overall_recall(self) -> float:
        return float(self.tp.sum() / max(self.n_true.sum(), 1))


def predictor_confusion(model, windows, show_progress: bool = True, desc: str = "recall") -> Confusion:
    """Per-token predictor recall / precision / density on the engine's own inputs (in the model's
    configured mode: sparse mode lets prediction errors propagate into later layers' inputs)."""
    c = Confusion.zeros(len(model.ffn))

    def record(call: FFNCall) -> None:
        pred = call.predictor_logits() >= np.float32(call.threshold)
        true = call.activation() != 0
        i = call.layer
        c.tp[i] += np.count_nonzero(pred & true)
        c.n_true[i] += np.count_nonzero(true)
        c.n_pred[i] += np.count_nonzero(pred)
        c.n_pairs[i] += true.size

    for i, f in enumerate(model.ffn):
        if f.weights.fc1 is None:
            raise ValueError(f"layer {i} has no predictor (blk.{i}.fc1/fc2)")
    run_windows(model, windows, record, desc, show_progress)
    return c


# ----------------------------------------------------------------------------- perplexity, token by token
def decode_nll(model, windows, show_progress: bool = True, desc: str = "perplexity") -> tuple[float, int]:
    """Mean NLL (nats/token) with every window fed one token at a time, as in generation: in sparse
    and threshold modes each token's FFN then uses only its own active set (a batched forward would
    use the union over the batch, hiding the predictor's misses)."""
    total, count = 0.0, 0
    for w in progress(list(windows), desc, show_progress):
        model.reset()
        for t in range(len(w) - 1):
            logits = model.forward([w[t]])[-1].astype(np.float64)
            logits -= logits.max()
            total -= logits[w[t + 1]] - np.log(np.exp(logits).sum())
            count += 1
    model.reset()
    return total / max(count, 1), count
