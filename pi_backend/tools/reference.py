"""Plain-numpy reference forward pass of a llama-family decoder: the truth that tests compare against.

Written for clarity, not speed: every step is a direct transcription of the math, computed in float64
by default so that differences against an engine are the engine's rounding, not ours.

Model (llama2.c / Meta naming, matrices row-major, `y = x @ W.T`):

    x = tok_embeddings[tokens]
    for each layer:
        a = rms_norm(x) * attention_norm ;  x += wo · attention(RoPE(wq·a), RoPE(wk·a), wv·a)
        ffn_inp = x                                  # PowerInfer's predictor input (pre-norm)
        f = rms_norm(x) * ffn_norm ;  h = act(f) ;  x += w2 · h
    logits = output · (rms_norm(x) * norm)

FFN activations (w1 = gate, w3 = up, w2 = down):
    reglu  h = relu(w1 f) * (w3 f)          ReluLLaMA, ProSparse, the tiny-relu fixture
    drelu  h = relu(w1 f) * relu(w3 f)      Bamboo / TurboSparse
    relu   h = relu(w1 f)                   no gate (w3 unused)
    swiglu h = silu(w1 f) * (w3 f)          stock llama (dense: nothing is exactly zero)
A neuron is active for a token iff h != 0 (for reglu, h may be negative: do not test h > 0).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence, Union

import numpy as np

# the fp32 original of the built-in model: in the project's shared/ folder beside a source checkout
# (developers and CI have it; tests that need it skip without it), or wherever PI_BACKEND_TINY_RELU_NPZ says
TINY_RELU_NPZ = os.environ.get("PI_BACKEND_TINY_RELU_NPZ") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    os.pardir, "shared", "fixtures", "tiny-relu", "tiny_relu_C_l1.npz")

FFN_ACTIVATIONS = ("reglu", "drelu", "relu", "swiglu")


# ----------------------------------------------------------------------------- config and weights
@dataclass(frozen=True)
class ReferenceConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab: int
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    ffn_act: str = "reglu"
    rope_neox: bool = False  # False: rotate adjacent pairs (2i, 2i+1) like Meta/llama2.c/GGUF llama;
    #                          True: rotate (i, i + head_dim/2) like GPT-NeoX / HF-permuted weights

    def __post_init__(self):
        if self.ffn_act not in FFN_ACTIVATIONS:
            raise ValueError(f"ffn_act must be one of {FFN_ACTIVATIONS}, got {self.ffn_act!r}")
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError("dim must divide by n_heads and n_heads by n_kv_heads")
        if self.head_dim % 2:
            raise ValueError("RoPE needs an even head_dim")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


class ReferenceWeights(dict):
    """Name -> numpy array, with llama2.c / Meta tensor names (see module docstring)."""

    def layer(self, i: int, name: str) -> np.ndarray:
        return self[f"layers.{i}.{name}"]

    @staticmethod
    def expected_shapes(cfg: ReferenceConfig) -> dict:
        shapes = {"tok_embeddings.weight": (cfg.vocab, cfg.dim), "norm.weight": (cfg.dim,),
                  "output.weight": (cfg.vocab, cfg.dim)}
        for i in range(cfg.n_layers):
            p = f"layers.{i}."
            shapes.update({
                p + "attention_norm.weight": (cfg.dim,), p + "ffn_norm.weight": (cfg.dim,),
                p + "attention.wq.weight": (cfg.dim, cfg.dim), p + "attention.wk.weight": (cfg.kv_dim, cfg.dim),
                p + "attention.wv.weight": (cfg.kv_dim, cfg.dim), p + "attention.wo.weight": (cfg.dim, cfg.dim),
                p + "feed_forward.w1.weight": (cfg.ffn_dim, cfg.dim),
                p + "feed_forward.w2.weight": (cfg.dim, cfg.ffn_dim)})
            if cfg.ffn_act != "relu":
                shapes[p + "feed_forward.w3.weight"] = (cfg.ffn_dim, cfg.dim)
        return shapes

    def validate(self, cfg: ReferenceConfig) -> None:
        for name, shape in self.expected_shapes(cfg).items():
            if name not in self:
                raise KeyError(f"missing tensor {name}")
            if tuple(self[name].shape) != shape:
                raise ValueError(f"{name}: shape {self[name].shape}, expected {shape}")


def load_tiny_relu(npz_path: str = TINY_RELU_NPZ) -> tuple[ReferenceConfig, ReferenceWeights]:
    """Read the tiny-relu fixture (train_tiny_relu.py's npz export; its `_config` entry is JSON)."""
    with np.load(npz_path) as z:
        meta = json.loads(str(z["_config"]))
        weights = ReferenceWeights({k: np.asarray(z[k]) for k in z.files if not k.startswith("_")})
    # train_tiny_relu.py's --act picks the gate's activation: relu -> ReGLU, silu -> SwiGLU
    ffn_act = {"relu": "reglu", "silu": "swiglu"}[meta.get("act", "relu")]
    cfg = ReferenceConfig(dim=meta["dim"], n_layers=meta["n_layers"], n_heads=meta["n_heads"],
                          n_kv_heads=meta["n_heads"], ffn_dim=meta["hidden_dim"], vocab=meta["vocab_size"],
                          norm_eps=meta.get("norm_eps", 1e-5), rope_base=10000.0, ffn_act=ffn_act,
                          rope_neox=False)
    weights.validate(cfg)
    return cfg, weights


# ----------------------------------------------------------------------------- building blocks
def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope_angles(positions: np.ndarray, head_dim: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of shape [T, head_dim/2]: pair i turns by position * base^(-2i/head_dim)."""
    inv_freq = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.outer(np.asarray(positions, dtype=np.float64), inv_freq)
    return np.cos(angles), np.sin(angles)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, neox: bool) -> np.ndarray:
    """Rotate x [T, heads, head_dim]. Interleaved pairs (2i, 2i+1) or NeoX halves (i, i + hd/2)."""
    half = x.shape[-1] // 2
    if neox:
        a, b = x[..., :half], x[..., half:]
    else:
        a, b = x[..., 0::2], x[..., 1::2]
    c, s = cos[:, None, :].astype(x.dtype), sin[:, None, :].astype(x.dtype)
    ra, rb = a * c - b * s, a * s + b * c
    if neox:
        return np.concatenate([ra, rb], axis=-1)
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = ra, rb
    return out


@dataclass
class KVCache:
    """Keys (after RoPE) and values of the positions seen so far, per layer: [positions, kv_heads, hd]."""

    keys: list = field(default_factory=list)
    values: list = field(default_factory=list)

    @property
    def length(self) -> int:
        return 0 if not self.keys else self.keys[0].shape[0]


def attention(cfg: ReferenceConfig, w: ReferenceWeights, layer: int, a: np.ndarray,
              positions: np.ndarray, cache: Optional[KVCache]) -> np.ndarray:
    """Causal multi-head attention with grouped KV heads: query head j reads KV head j // group."""
    T, hd = a.shape[0], cfg.head_dim
    q = (a @ w.layer(layer, "attention.wq.weight").T.astype(a.dtype)).reshape(T, cfg.n_heads, hd)
    k = (a @ w.layer(layer, "attention.wk.weight").T.astype(a.dtype)).reshape(T, cfg.n_kv_heads, hd)
    v = (a @ w.layer(layer, "attention.wv.weight").T.astype(a.dtype)).reshape(T, cfg.n_kv_heads, hd)
    cos, sin = rope_angles(positions, hd, cfg.rope_base)
    q, k = apply_rope(q, cos, sin, cfg.rope_neox), apply_rope(k, cos, sin, cfg.rope_neox)
    if cache is not None:  # attend over everything cached before these tokens, then remember them
        if len(cache.keys) > layer:
            k = np.concatenate([cache.keys[layer], k]); v = np.concatenate([cache.values[layer], v])
            cache.keys[layer], cache.values[layer] = k, v
        else:
            cache.keys.append(k); cache.values.append(v)
    key_positions = np.arange(k.shape[0])
    allowed = key_positions[None, :] <= np.asarray(positions)[:, None]  # [T, S] causal mask
    group = cfg.n_heads // cfg.n_kv_heads
    out = np.empty((T, cfg.n_heads, hd), dtype=a.dtype)
    for head in range(cfg.n_heads):
        kv = head // group
        scores = (q[:, head, :] @ k[:, kv, :].T) / np.sqrt(hd)
        scores = np.where(allowed, scores, -np.inf)
        p = np.exp(scores - scores.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        out[:, head, :] = p @ v[:, kv, :]
    return out.reshape(T, cfg.dim) @ w.layer(layer, "attention.wo.weight").T.astype(a.dtype)


def ffn_activation(cfg: ReferenceConfig, w: ReferenceWeights, layer: int, f: np.ndarray) -> np.ndarray:
    """h [T, ffn_dim] from the normed FFN input f [T, dim]."""
    gate = f @ w.layer(layer, "feed_forward.w1.weight").T.astype(f.dtype)
    if cfg.ffn_act == "relu":
        return np.maximum(gate, 0)
    up = f @ w.layer(layer, "feed_forward.w3.weight").T.astype(f.dtype)
    if cfg.ffn_act == "reglu":
        return np.maximum(gate, 0) * up
    if cfg.ffn_act == "drelu":
        return np.maximum(gate, 0) * np.maximum(up, 0)
    return gate / (1.0 + np.exp(-gate)) * up  # swiglu


# A mask for one layer: None (dense), bool [T, ffn_dim] (per token), bool [ffn_dim] or an index array
# (the same neurons for every token).  ffn_mask as a whole: a sequence or mapping layer -> mask, or a
# callable (layer, ffn_inp [T, dim]) -> mask, which lets a predictor see the residual stream of the
# *masked* model, as it would in a sparse engine (errors of earlier layers propagate).
LayerMask = Union[None, np.ndarray, Sequence[int]]
FfnMask = Union[None, Sequence[LayerMask], Mapping[int, LayerMask], Callable[[int, np.ndarray], LayerMask]]


def _layer_mask(ffn_mask: FfnMask, layer: int, ffn_inp: np.ndarray, ffn_dim: int) -> Optional[np.ndarray]:
    if ffn_mask is None:
        return None
    if callable(ffn_mask):
        m = ffn_mask(layer, ffn_inp)
    elif isinstance(ffn_mask, Mapping):
        m = ffn_mask.get(layer)
    else:
        m = ffn_mask[layer]
    if m is None:
        return None
    m = np.asarray(m)
    if m.dtype != bool:  # index set -> boolean over neurons
        idx, m = m.astype(np.int64).ravel(), np.zeros(ffn_dim, dtype=bool)
        m[idx] = True
    if m.shape not in ((ffn_dim,), (ffn_inp.shape[0], ffn_dim)):
        raise ValueError(f"layer {layer}: mask shape {m.shape}, expected ({ffn_dim},) or ({ffn_inp.shape[0]}, {ffn_dim})")
    return m


@dataclass
class LayerInternals:
    ffn_inp: np.ndarray      # [T, dim] residual stream after attention, before ffn_norm (predictor input)
    ffn_normed: np.ndarray   # [T, dim] rms_norm(ffn_inp) * ffn_norm.weight (what w1/w3 see)
    h: np.ndarray            # [T, ffn_dim] true (unmasked) activation; active set = h != 0

    @property
    def active(self) -> np.ndarray:
        return self.h != 0


# ----------------------------------------------------------------------------- the forward pass
def forward(cfg: ReferenceConfig, w: ReferenceWeights, tokens, return_internals: bool = False,
            ffn_mask: FfnMask = None, cache: Optional[KVCache] = None, dtype=np.float64):
    """Logits [T, vocab] for `tokens` (1-D ints).

    cache: a KVCache to decode incrementally; the tokens are placed after the cached positions and the
    cache is extended in place. Without one, the tokens are a whole sequence starting at position 0.
    return_internals: also return a list (one per layer) of LayerInternals; `h` there is the activation
    before any ffn_mask is applied, so `h != 0` is the true active set of the (possibly masked) run.
    """
    tokens = np.asarray(tokens, dtype=np.int64).ravel()
    start = cache.length if cache is not None else 0
    positions = np.arange(start, start + tokens.shape[0])
    x = w["tok_embeddings.weight"][tokens].astype(dtype)
    internals = []
    for layer in range(cfg.n_layers):
        a = rms_norm(x, w.layer(layer, "attention_norm.weight").astype(dtype), cfg.norm_eps)
        x = x + attention(cfg, w, layer, a, positions, cache)
        ffn_inp = x
        f = rms_norm(ffn_inp, w.layer(layer, "ffn_norm.weight").astype(dtype), cfg.norm_eps)
        h = ffn_activation(cfg, w, layer, f)
        mask = _layer_mask(ffn_mask, layer, ffn_inp, cfg.ffn_dim)
        h_used = h if mask is None else h * mask
        x = ffn_inp + h_used @ w.layer(layer, "feed_forward.w2.weight").T.astype(dtype)
        if return_internals:
            internals.append(LayerInternals(ffn_inp=ffn_inp, ffn_normed=f, h=h))
    logits = rms_norm(x, w["norm.weight"].astype(dtype), cfg.norm_eps) @ w["output.weight"].T.astype(dtype)
    return (logits, internals) if return_internals else logits


def cross_entropy(logits: np.ndarray, targets) -> np.ndarray:
    """Per-position negative log-likelihood (nats) of targets [T] under logits [T, vocab]."""
    targets = np.asarray(targets, dtype=np.int64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=-1))
    return log_z - shifted[np.arange(len(targets)), targets]


def tiny_relu_available(npz_path: str = TINY_RELU_NPZ) -> bool:
    return os.path.exists(npz_path)


def random_weights(cfg: ReferenceConfig, seed: int = 0, std: float = 0.08) -> ReferenceWeights:
    """Random weights of the right shapes (norm weights near 1) for tests of the forward pass itself."""
    rng = np.random.default_rng(seed)
    w = ReferenceWeights()
    for name, shape in ReferenceWeights.expected_shapes(cfg).items():
        if len(shape) == 1:
            w[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            w[name] = (std * rng.standard_normal(shape)).astype(np.float32)
    return w
