"""One-call decode steps (pi_decode_step, pi_backend.h): a llama-family model's weights and KV cache are
checked and described to C once; each step is then one crossing instead of ~15 a layer.

The engine's Python pass stays the reference and runs everything else (prefill, batches, the hot/cold
split, devices, Falcon); DecodeStep gives the same results for one token, because C runs the same ops
in the same order (tests/test_decode_step.py compares them bit for bit).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pi_backend.native import (ACTIVATIONS, KV_TYPE_IDS, UNGATED_ACTIVATIONS, Matrix, _check, _f, _matrix,
                               _require, _threads, check_skip_threshold, ffi, lib)


@dataclass(frozen=True, eq=False)
class DecodeLayer:
    """One layer as pi_decode_step reads it. fc1 / fc2: the predictor, or None for every neuron listed."""

    attn_norm: np.ndarray
    wq: Matrix
    wk: Matrix
    wv: Matrix
    wo: Matrix
    ffn_norm: np.ndarray
    gate: Matrix | None
    up: Matrix
    down_t: Matrix
    k_cache: np.ndarray  # [n_head_kv, kv_rows, head_dim], float32 or float16, written in place
    v_cache: np.ndarray
    fc1: Matrix | None = None
    fc2: Matrix | None = None
    threshold: float = 0.0       # the predictor's
    skip_threshold: float = 0.0  # the fused FFN kernel's


def _shape(m: Matrix, name: str, rows: int, cols: int) -> None:
    if (m.rows, m.cols) != (rows, cols):
        raise ValueError(f"{name}: shape {m.rows}x{m.cols}, expected {rows}x{cols}")


def _norm(w, name: str, n: int) -> np.ndarray:
    w = _require(w, name, np.float32, ndim=1)
    if w.size != n:
        raise ValueError(f"{name}: {w.size} weights, expected {n}")
    return w


class DecodeStep:
    """step(token, n_past) -> (logits [1, n_vocab], counts [n_layer, 2]: neurons listed and skipped).

    Writes the token's K/V into each layer's caches at n_past. The caches and weights are held (and
    must not be reallocated: build a new DecodeStep then)."""

    def __init__(self, token_embd: Matrix, output: Matrix, output_norm: np.ndarray, layers: Sequence[DecodeLayer],
                 n_head: int, n_head_kv: int, n_rot: int, rope_freq_base: float, norm_eps: float, act: str):
        token_embd, output = _matrix(token_embd, "token_embd"), _matrix(output, "output")
        n_embd = token_embd.cols
        _shape(output, "output", output.rows, n_embd)
        self.output_norm = _norm(output_norm, "output_norm", n_embd)
        if act not in ACTIVATIONS:
            raise ValueError(f"act: unknown activation {act!r}; expected one of {sorted(ACTIVATIONS)}")
        try:
            n_head, n_head_kv, n_rot = (operator.index(v) for v in (n_head, n_head_kv, n_rot))
        except TypeError:
            raise TypeError(f"n_head / n_head_kv / n_rot: expected ints, got {n_head!r} / {n_head_kv!r} / {n_rot!r}") \
                from None
        if not (0 < n_head_kv <= n_head and n_head % n_head_kv == 0):
            raise ValueError(f"n_head / n_head_kv: {n_head!r} / {n_head_kv!r} (n_head must be a multiple)")
        if not layers:
            raise ValueError("layers: none")
        head_dim = _matrix(layers[0].wq, "layers[0].wq").rows // n_head
        if head_dim == 0 or not (0 < n_rot <= head_dim and n_rot % 2 == 0):
            raise ValueError(f"n_rot: must be even and in (0, {head_dim}], got {n_rot!r}")
        n_ff = _matrix(layers[0].up, "layers[0].up").rows
        cache0 = _require(layers[0].k_cache, "layers[0].k_cache", (np.float32, np.float16), ndim=3)
        self.kv_dtype, self.kv_rows = cache0.dtype, cache0.shape[1]
        kv_shape = (n_head_kv, self.kv_rows, head_dim)  # every layer's caches (checked in _describe)
        self.layers = list(layers)
        self._c_layers = ffi.new("pi_decode_layer[]", len(layers))
        for i, (L, c) in enumerate(zip(self.layers, self._c_layers)):
            self._describe(L, c, f"layers[{i}]", n_embd, n_head * head_dim, n_head_kv * head_dim, n_ff, act,
                           kv_shape)
        self.n_vocab, self.n_tokens = output.rows, token_embd.rows
        self._keep = (token_embd, output)  # their descriptors are in the C struct
        self._c = ffi.new("pi_decode_model *", dict(
            n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim, n_ff=n_ff, n_rot=n_rot,
            kv_rows=self.kv_rows, norm_eps=float(norm_eps), rope_freq_base=float(rope_freq_base),
            act=ACTIVATIONS[act], kv_type=KV_TYPE_IDS[self.kv_dtype], n_layer=len(layers), layers=self._c_layers,
            token_embd=token_embd._desc, output=output._desc, output_norm=_f(self.output_norm)))
        self._counts = np.zeros((len(layers), 2), np.int64)
        self._counts_p = ffi.from_buffer("int64_t *", self._counts)

    def _describe(self, L: DecodeLayer, c, name: str, n_embd: int, q_dim: int, kv_dim: int, n_ff: int, act: str,
                  kv_shape: tuple) -> None:
        if not isinstance(L, DecodeLayer):
            raise TypeError(f"{name}: expected DecodeLayer, got {type(L).__name__}")
        for m, rows, cols in (("wq", q_dim, n_embd), ("wk", kv_dim, n_embd), ("wv", kv_dim, n_embd),
                              ("wo", n_embd, q_dim), ("up", n_ff, n_embd), ("down_t", n_ff, n_embd)):
            _shape(_matrix(getattr(L, m), f"{name}.{m}"), f"{name}.{m}", rows, cols)
            setattr(c, m, getattr(L, m)._desc)
        if act in UNGATED_ACTIVATIONS:
            if L.gate is not None:
                raise ValueError(f"{name}.gate: must be None for act={act!r} (no gate)")
        else:
            _shape(_matrix(L.gate, f"{name}.gate"), f"{name}.gate", n_ff, n_embd)
            c.gate = L.gate._desc
        if (L.fc1 is None) != (L.fc2 is None):
            raise ValueError(f"{name}.fc1 / fc2: a predictor needs both matrices (or neither)")
        if L.fc1 is not None:
            rank = _matrix(L.fc1, f"{name}.fc1").rows
            _shape(L.fc1, f"{name}.fc1", rank, n_embd)
            _shape(_matrix(L.fc2, f"{name}.fc2"), f"{name}.fc2", n_ff, rank)
            c.fc1, c.fc2 = L.fc1._desc, L.fc2._desc
            if L.threshold != L.threshold:
                raise ValueError(f"{name}.threshold: NaN")
        check_skip_threshold(L.skip_threshold)
        c.threshold, c.skip_threshold = float(L.threshold), float(L.skip_threshold)
        c.attn_norm = _f(_norm(L.attn_norm, f"{name}.attn_norm", n_embd))
        c.ffn_norm = _f(_norm(L.ffn_norm, f"{name}.ffn_norm", n_embd))
        for cache in ("k_cache", "v_cache"):
            a = _require(getattr(L, cache), f"{name}.{cache}", self.kv_dtype.type, ndim=3, writable=True)
            if a.shape != kv_shape:
                raise ValueError(f"{name}.{cache}: shape {a.shape}, expected {kv_shape}")
            setattr(c, cache, _f(a, "void *"))

    def __call__(self, token: int, n_past: int, n_threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= token < self.n_tokens:
            raise ValueError(f"token: id {token} outside [0, {self.n_tokens})")
        if not 0 <= n_past < self.kv_rows:
            raise ValueError(f"n_past: {n_past} cached leaves no room in the cache's {self.kv_rows} rows")
        logits = np.empty((1, self.n_vocab), np.float32)
        _check("pi_decode_step", lib.pi_decode_step(self._c, int(token), int(n_past), _f(logits), self._counts_p,
                                                    _threads(n_threads)))
        return logits, self._counts.copy()
