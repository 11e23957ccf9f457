"""A slow, plain-numpy LLaMA-family forward pass: the yardstick for fixtures and file checks.

Deliberately simple (float64, whole sequences, no KV cache) so that it is easy to trust. It is used
to calibrate the random fixture models' sparsity, to check converted files, and as an independent
reference for engine tests. Architectures: llama and bamboo (gated FFN); not falcon.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

__all__ = ["llama_forward", "rms_norm", "apply_rope", "ffn_activation", "read_float_weights", "forward_from_config"]


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def apply_rope(x: np.ndarray, positions: np.ndarray, base: float, rope_dim: int) -> np.ndarray:
    """Rotate adjacent pairs (2i, 2i+1) of the first `rope_dim` features of each head, the GGUF
    llama layout (llama.cpp's "normal" RoPE). x: (..., T, heads, head_dim)."""
    inv_freq = base ** (-np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim)
    angles = positions[:, None].astype(np.float64) * inv_freq[None, :]  # (T, rope_dim/2)
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    out = x.copy()
    even, odd = x[..., 0:rope_dim:2], x[..., 1:rope_dim:2]
    out[..., 0:rope_dim:2] = even * cos - odd * sin
    out[..., 1:rope_dim:2] = even * sin + odd * cos
    return out


def ffn_activation(gate: np.ndarray | None, up: np.ndarray, act: str) -> np.ndarray:
    if act == "reglu":
        return np.maximum(gate, 0) * up
    if act == "drelu":
        return np.maximum(gate, 0) * np.maximum(up, 0)
    if act == "swiglu":
        return gate / (1 + np.exp(-gate)) * up
    if act == "relu":
        return np.maximum(up, 0)
    raise ValueError(f"unknown FFN activation {act!r}")


def llama_forward(
    weights: Mapping[str, np.ndarray],
    tokens,
    *,
    n_head: int,
    n_head_kv: int,
    norm_eps: float,
    ffn_act: str,
    rope_freq_base: float = 10000.0,
    rope_dim: int | None = None,
    before_ffn: Callable[[int, np.ndarray], None] | None = None,
    logits: bool = True,
) -> np.ndarray:
    """Logits (..., T, n_vocab) for token ids of shape (T,) or (B, T), positions 0..T-1
    (with `logits=False`, the final normed hidden states (..., T, n_embd) instead).

    `weights` use GGUF tensor names with row-major shapes (`ffn_down_t` is accepted for `ffn_down`;
    a missing `output.weight` means tied embeddings). `before_ffn(layer, ffn_inp)` sees each layer's
    FFN input (the residual stream before the FFN norm, the predictor's input) before the layer's
    FFN weights are read, so it may adjust them (fixture calibration does)."""
    tokens = np.asarray(tokens)
    embd = np.asarray(weights["token_embd.weight"], dtype=np.float64)
    x = embd[tokens]  # (..., T, E)
    n_embd = x.shape[-1]
    head_dim = n_embd // n_head
    rope_dim = rope_dim or head_dim
    seq_len = x.shape[-2]
    positions = np.arange(seq_len)
    causal = np.triu(np.full((seq_len, seq_len), -np.inf), k=1)
    group = n_head // n_head_kv

    layer = 0
    while f"blk.{layer}.attn_norm.weight" in weights:
        w = lambda name: np.asarray(weights[f"blk.{layer}.{name}.weight"], dtype=np.float64)  # noqa: E731
        h = rms_norm(x, w("attn_norm"), norm_eps)
        q = (h @ w("attn_q").T).reshape(*x.shape[:-1], n_head, head_dim)
        k = (h @ w("attn_k").T).reshape(*x.shape[:-1], n_head_kv, head_dim)
        v = (h @ w("attn_v").T).reshape(*x.shape[:-1], n_head_kv, head_dim)
        q, k = apply_rope(q, positions, rope_freq_base, rope_dim), apply_rope(k, positions, rope_freq_base, rope_dim)
        k, v = np.repeat(k, group, axis=-2), np.repeat(v, group, axis=-2)
        scores = np.einsum("...qhd,...khd->...hqk", q, k) / np.sqrt(head_dim) + causal
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = scores / scores.sum(axis=-1, keepdims=True)
        attn = np.einsum("...hqk,...khd->...qhd", probs, v).reshape(x.shape)
        x = x + attn @ w("attn_output").T

        if before_ffn is not None:
            before_ffn(layer, x)
        h = rms_norm(x, w("ffn_norm"), norm_eps)
        gate = h @ w("ffn_gate").T if ffn_act != "relu" else None
        act = ffn_activation(gate, h @ w("ffn_up").T, ffn_act)
        if f"blk.{layer}.ffn_down_t.weight" in weights:
            x = x + act @ w("ffn_down_t")
        else:
            x = x + act @ w("ffn_down").T
        layer += 1

    h = rms_norm(x, np.asarray(weights["output_norm.weight"], dtype=np.float64), norm_eps)
    if not logits:
        return h
    out = np.asarray(weights.get("output.weight", embd), dtype=np.float64)
    return h @ out.T


def read_float_weights(gguf_file) -> dict[str, np.ndarray]:
    """Every tensor of an open GGUFFile dequantized to float32 (what the file really holds)."""
    return {name: gguf_file.dequantize(name) for name in gguf_file.tensors}


def forward_from_config(weights: Mapping[str, np.ndarray], tokens, config, **kwargs) -> np.ndarray:
    """`llama_forward` with hyperparameters from a `ModelConfig`."""
    if config.arch == "falcon":
        raise NotImplementedError("the numpy reference covers llama and bamboo only")
    return llama_forward(
        weights,
        tokens,
        n_head=config.n_head,
        n_head_kv=config.n_head_kv,
        norm_eps=config.norm_eps,
        ffn_act=config.ffn_act,
        rope_freq_base=config.rope_freq_base,
        rope_dim=config.rope_dim,
        **kwargs,
    )
