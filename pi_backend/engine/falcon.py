"""Falcon blocks (Falcon-ReLU as PowerInfer serves it), on the llama engine's KV cache, attention and FFN.

What differs from llama (llama.cpp's falcon graph):
  * LayerNorm with weight and bias (`blk.N.attn_norm.{weight,bias}`, `output_norm.{weight,bias}`),
    epsilon `falcon.attention.layer_norm_epsilon`; no separate `ffn_norm`.
  * Parallel attention and FFN from the layer input: x = x + attn(n_attn) + ffn(n_ffn). In 7B-style
    files both branches read n = attn_norm(x). Falcon-40B-style files also carry `attn_norm_2`
    (HF `ln_attn`): the attention then reads attn_norm_2(x) and the FFN reads attn_norm(x) (HF `ln_mlp`),
    as llama.cpp does.
  * A fused `attn_qkv.weight` [(n_head + 2 n_head_kv) head_dim, n_embd], rows q | k | v contiguous.
    That is the GGUF layout for every Falcon: llama.cpp's converter already un-interleaves Falcon-40B's
    grouped HF layout ([q.. k v] per kv group) into q | k | v, and llama.cpp's graph splits it the same way.
    We take q, k and v as zero-copy row ranges of the one tensor.
  * NeoX-style RoPE (rotate the two halves of each head, not interleaved pairs).
  * FFN: act(up x) then down, no gate: relu (Falcon-ReLU, and PowerInfer files by default) or gelu
    (stock Falcon, as llama.cpp computes it); the PowerInfer predictor reads the layer input.
  * Final LayerNorm with bias, then `output` (or tied `token_embd`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pi_backend import native
from pi_backend.engine.weights import LayerWeights, Weights, matrix, output_head, vector
from pi_backend.model.config import ModelConfig
from pi_backend.model.gguf_file import GGUFFile

if TYPE_CHECKING:
    from pi_backend.engine.model import Model


@dataclass
class FalconLayerWeights(LayerWeights):
    attn_norm_b: np.ndarray | None = None
    attn_norm_2: np.ndarray | None = None    # Falcon-40B style: the attention branch's LayerNorm
    attn_norm_2_b: np.ndarray | None = None


@dataclass
class FalconWeights(Weights):
    output_norm_b: np.ndarray | None = None


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, eps: float) -> np.ndarray:
    """LayerNorm over the last axis (statistics in float64, like ggml_norm's double sums)."""
    x64 = x.astype(np.float64)
    mean = x64.mean(-1, keepdims=True)
    xc = x64 - mean
    var = (xc * xc).mean(-1, keepdims=True)
    y = (xc / np.sqrt(var + eps)).astype(np.float32) * w
    if b is not None:
        y += b
    return np.ascontiguousarray(y, dtype=np.float32)


def _row_range(gguf: GGUFFile, name: str, start: int, stop: int) -> native.Matrix:
    """Rows [start, stop) of a matrix tensor, as a zero-copy view."""
    m = matrix(gguf, name)
    rb = native.row_bytes(m.wtype, m.cols)
    buf = gguf.tensor(name).raw.reshape(-1)
    return native.Matrix(buf[start * rb: stop * rb], m.wtype, stop - start, m.cols)


def load_falcon_weights(gguf: GGUFFile, cfg: ModelConfig) -> FalconWeights:
    opt_m = lambda name: matrix(gguf, name) if name in gguf.tensors else None  # noqa: E731
    opt_v = lambda name: vector(gguf, name) if name in gguf.tensors else None  # noqa: E731
    q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim
    layers = []
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        qkv = p + "attn_qkv.weight"
        layers.append(FalconLayerWeights(
            attn_norm=vector(gguf, p + "attn_norm.weight"),
            wq=_row_range(gguf, qkv, 0, q_dim),
            wk=_row_range(gguf, qkv, q_dim, q_dim + kv_dim),
            wv=_row_range(gguf, qkv, q_dim + kv_dim, q_dim + 2 * kv_dim),
            wo=matrix(gguf, p + "attn_output.weight"),
            ffn_norm=None,  # falcon's FFN reads attn_norm(x)
            gate=None,
            up=matrix(gguf, p + "ffn_up.weight"),
            down_t=opt_m(p + "ffn_down_t.weight"),
            down=opt_m(p + "ffn_down.weight"),
            fc1=opt_m(p + "fc1.weight"),
            fc2=opt_m(p + "fc2.weight"),
            attn_norm_b=opt_v(p + "attn_norm.bias"),
            attn_norm_2=opt_v(p + "attn_norm_2.weight"),
            attn_norm_2_b=opt_v(p + "attn_norm_2.bias"),
        ))
    return FalconWeights(
        token_embd=matrix(gguf, "token_embd.weight"),
        output_norm=vector(gguf, "output_norm.weight"),
        output=output_head(gguf),
        layers=layers,
        output_norm_b=opt_v("output_norm.bias"),
    )


def forward_falcon(model: "Model", ids: np.ndarray, pos: np.ndarray, all_logits: bool) -> np.ndarray:
    """Model.forward for falcon, after Model.forward has checked ids and computed pos."""
    cfg, w, st = model.config, model.weights, model.state
    T, nt, eps = ids.size, model.n_threads, cfg.norm_eps
    x = native.dequantize_rows(w.token_embd, ids)  # the residual stream [T, n_embd]
    for li, lw in enumerate(w.layers):
        n = layer_norm(x, lw.attn_norm, lw.attn_norm_b, eps)
        n_attn = n if lw.attn_norm_2 is None else layer_norm(x, lw.attn_norm_2, lw.attn_norm_2_b, eps)
        q = native.gemm(lw.wq, n_attn, n_threads=nt).reshape(T, cfg.n_head, cfg.head_dim)
        k = native.gemm(lw.wk, n_attn, n_threads=nt).reshape(T, cfg.n_head_kv, cfg.head_dim)
        v = native.gemm(lw.wv, n_attn, n_threads=nt).reshape(T, cfg.n_head_kv, cfg.head_dim)
        native.rope(q, pos, cfg.rope_dim, cfg.rope_freq_base, neox=True)
        native.rope(k, pos, cfg.rope_dim, cfg.rope_freq_base, neox=True)
        st.write(li, st.n_past, k, v)
        att = model._attention(q, li, st.n_past)
        attn_out = native.gemm(lw.wo, att, n_threads=nt)
        ffn_out = model.ffn[li](x, n)  # predictor input: the layer input (PowerInfer's falcon graph)
        x = x + attn_out + ffn_out
    st.n_past += T
    last = np.ascontiguousarray(x if all_logits else x[-1:])
    return native.gemm(w.output, layer_norm(last, w.output_norm, w.output_norm_b, eps), n_threads=nt)
