"""Plain-numpy reference forward pass of a llama-family decoder: the truth that fixtures, tools and
tests compare against (fixture sparsity calibration, file checks, engine and llama.cpp tests,
perplexity and predictor experiments on the tiny-relu model).

Written for clarity, not speed: every step is a direct transcription of the math, computed in float64
by default so that differences against an engine are the engine's rounding, not ours.

Model (GGUF tensor names, matrices row-major, `y = x @ W.T`):

    x = token_embd[tokens]
    for each layer:
        a = rms_norm(x) * attn_norm ;  x += attn_output · attention(RoPE(attn_q·a), RoPE(attn_k·a), attn_v·a)
        ffn_inp = x                                  # PowerInfer's predictor input (pre-norm)
        f = rms_norm(x) * ffn_norm ;  h = act(ffn_gate·f, ffn_up·f) ;  x += ffn_down · h
    logits = output · (rms_norm(x) * output_norm)    # no `output` tensor: tied to token_embd

rms_norm(x) = x / sqrt(mean(x²) + eps). Attention is causal, scaled by 1/sqrt(head_dim); with grouped
KV heads (GQA) query head j reads KV head j // (n_heads / n_kv_heads). RoPE turns pair i of the first
rope_dim features of each head by position · base^(-2i/rope_dim); the pairs are adjacent features
(2i, 2i+1), the layout of Meta, llama2.c and GGUF llama, or with `rope_neox` halves (i, i + rope_dim/2),
as in GPT-NeoX and HF-permuted weights.

FFN activations (gate = ffn_gate·f, up = ffn_up·f):
    reglu  h = relu(gate) * up          ReluLLaMA, ProSparse, the tiny-relu fixture
    drelu  h = relu(gate) * relu(up)    Bamboo / TurboSparse
    relu   h = relu(up)                 no gate
    swiglu h = silu(gate) * up          stock llama (dense: nothing is exactly zero)
A neuron is active for a token iff h != 0 (for reglu, h may be negative: do not test h > 0).

Weights come with GGUF names (`blk.N.attn_q.weight`; PowerInfer files may hold `ffn_down_t`, ffn_down
transposed) or with llama2.c / Meta names (`layers.N.attention.wq.weight`; w1 = gate, w3 = up, w2 = down,
and a gate-less model's only w1 is its up projection), as the tiny-relu fixture and `random_weights` do.

Entry points: `forward(cfg, weights, tokens)` with KV cache, FFN masks, internals and a working dtype;
`llama_forward` and `forward_from_config` take the hyperparameters as keywords or from a `ModelConfig`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence, Union

import numpy as np

from .config import FFN_ACTIVATIONS
from .tiny_relu import meta_to_gguf_names

__all__ = [
    "ReferenceConfig", "ReferenceWeights", "KVCache", "LayerInternals", "LayerMask", "FfnMask",
    "forward", "llama_forward", "forward_from_config", "attention", "rms_norm", "apply_rope", "ffn_activation",
    "gguf_named", "read_float_weights", "cross_entropy", "load_tiny_relu", "tiny_relu_available",
    "random_weights", "TINY_RELU_NPZ",
]

# the fp32 original of the built-in model: in the project's shared/ folder beside a source checkout
# (developers and CI have it; tests that need it skip without it), or wherever PI_BACKEND_TINY_RELU_NPZ says
TINY_RELU_NPZ = os.environ.get("PI_BACKEND_TINY_RELU_NPZ") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    os.pardir, "shared", "fixtures", "tiny-relu", "tiny_relu_C_l1.npz")


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
    #                          True: rotate (i, i + rope_dim/2) like GPT-NeoX / HF-permuted weights
    rope_dim: int | None = None  # features of each head that RoPE turns (the first ones); None: all

    def __post_init__(self):
        if self.ffn_act not in FFN_ACTIVATIONS:
            raise ValueError(f"ffn_act must be one of {FFN_ACTIVATIONS}, got {self.ffn_act!r}")
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError("dim must divide by n_heads and n_heads by n_kv_heads")
        rope_dim = self.rope_dim or self.head_dim
        if rope_dim % 2 or rope_dim > self.head_dim:
            raise ValueError("RoPE needs an even rope_dim no larger than head_dim")

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


def gguf_named(weights: Mapping[str, np.ndarray], ffn_act: str) -> Mapping[str, np.ndarray]:
    """`weights` under GGUF names: the mapping itself if it has them (so that an ffn_mask callable's
    edits to it are seen), else the same arrays renamed from llama2.c / Meta names."""
    if "token_embd.weight" in weights:
        return weights
    renamed = meta_to_gguf_names(weights)
    if ffn_act == "relu":  # llama2.c names a gate-less FFN's one input projection w1; GGUF, ffn_up
        for name in [n for n in renamed if n.endswith(".ffn_gate.weight")]:
            renamed[name.replace(".ffn_gate.", ".ffn_up.")] = renamed.pop(name)
    return renamed


def read_float_weights(gguf_file) -> dict[str, np.ndarray]:
    """Every tensor of an open GGUFFile dequantized to float32 (what the file really holds)."""
    return {name: gguf_file.dequantize(name) for name in gguf_file.tensors}


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


def _tensor(w: Mapping[str, np.ndarray], name: str, dtype) -> np.ndarray:
    return np.asarray(w[name], dtype=dtype)


# ----------------------------------------------------------------------------- building blocks
def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def apply_rope(x: np.ndarray, positions: np.ndarray, base: float, rope_dim: int | None = None,
               neox: bool = False) -> np.ndarray:
    """Rotate the first `rope_dim` (default: all) features of each head of x [..., T, heads, head_dim]:
    interleaved pairs (2i, 2i+1), or NeoX halves (i, i + rope_dim/2)."""
    rope_dim = rope_dim or x.shape[-1]
    inv_freq = 1.0 / base ** (np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim)
    angles = np.outer(np.asarray(positions, dtype=np.float64), inv_freq)  # [T, rope_dim/2]
    cos, sin = np.cos(angles)[:, None, :].astype(x.dtype), np.sin(angles)[:, None, :].astype(x.dtype)
    half = rope_dim // 2
    if neox:
        a, b = x[..., :half], x[..., half:rope_dim]
    else:
        a, b = x[..., 0:rope_dim:2], x[..., 1:rope_dim:2]
    ra, rb = a * cos - b * sin, a * sin + b * cos
    out = x.copy()
    if neox:
        out[..., :half], out[..., half:rope_dim] = ra, rb
    else:
        out[..., 0:rope_dim:2], out[..., 1:rope_dim:2] = ra, rb
    return out


@dataclass
class KVCache:
    """Keys (after RoPE) and values of the positions seen so far, per layer: [..., positions, kv_heads, hd]."""

    keys: list = field(default_factory=list)
    values: list = field(default_factory=list)

    @property
    def length(self) -> int:
        return 0 if not self.keys else self.keys[0].shape[-3]

    def extend(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Append these positions to the layer's cache; return all of its keys and values."""
        if len(self.keys) > layer:
            self.keys[layer] = np.concatenate([self.keys[layer], k], axis=-3)
            self.values[layer] = np.concatenate([self.values[layer], v], axis=-3)
        else:
            self.keys.append(k)
            self.values.append(v)
        return self.keys[layer], self.values[layer]


def _causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """softmax(q·k / sqrt(hd)) · v over the keys at or before each query's position.
    q [..., T, heads, hd]; k, v [..., S, kv_heads, hd] for positions 0..S-1; returns [..., T, heads * hd]."""
    *lead, n_tokens, n_heads, hd = q.shape
    n_kv = k.shape[-2]
    # heads become a batch axis, grouped by the KV head they read, which broadcasts over its group
    qg = np.moveaxis(q.reshape(*lead, n_tokens, n_kv, n_heads // n_kv, hd), -4, -2)  # [..., kv, group, T, hd]
    kg, vg = (np.moveaxis(t, -3, -2)[..., None, :, :] for t in (k, v))                # [..., kv, 1, S, hd]
    scores = (qg @ np.swapaxes(kg, -1, -2)) / np.sqrt(hd)
    allowed = np.arange(k.shape[-3])[None, :] <= np.asarray(positions)[:, None]       # [T, S]
    scores = np.where(allowed, scores, -np.inf)
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    out = (p @ vg).astype(q.dtype)  # np.sqrt's float64 scalar promoted a float32 softmax to float64
    return np.moveaxis(out, -2, -4).reshape(*lead, n_tokens, n_heads * hd)


def attention(cfg: ReferenceConfig, w: Mapping[str, np.ndarray], layer: int, a: np.ndarray,
              positions: np.ndarray, cache: KVCache | None = None) -> np.ndarray:
    """The layer's attention output [..., T, dim] for its normed input a (GGUF-named weights);
    with a cache, over everything cached before these tokens, which it then remembers."""
    p, hd = f"blk.{layer}.", cfg.head_dim

    def project(name: str, heads: int) -> np.ndarray:
        return (a @ _tensor(w, p + name, a.dtype).T).reshape(*a.shape[:-1], heads, hd)

    q, k = project("attn_q.weight", cfg.n_heads), project("attn_k.weight", cfg.n_kv_heads)
    v = project("attn_v.weight", cfg.n_kv_heads)
    q = apply_rope(q, positions, cfg.rope_base, cfg.rope_dim, cfg.rope_neox)
    k = apply_rope(k, positions, cfg.rope_base, cfg.rope_dim, cfg.rope_neox)
    if cache is not None:
        k, v = cache.extend(layer, k, v)
    return _causal_attention(q, k, v, positions) @ _tensor(w, p + "attn_output.weight", a.dtype).T


def ffn_activation(gate: np.ndarray | None, up: np.ndarray, act: str) -> np.ndarray:
    """h from the gate and up projections (gate unused, may be None, for relu)."""
    if act == "reglu":
        return np.maximum(gate, 0) * up
    if act == "drelu":
        return np.maximum(gate, 0) * np.maximum(up, 0)
    if act == "swiglu":
        return gate / (1 + np.exp(-gate)) * up
    if act == "relu":
        return np.maximum(up, 0)
    raise ValueError(f"unknown FFN activation {act!r}")


def _ffn_hidden(cfg: ReferenceConfig, w: Mapping[str, np.ndarray], layer: int, f: np.ndarray) -> np.ndarray:
    """h [..., T, ffn_dim] from the normed FFN input f [..., T, dim]."""
    p = f"blk.{layer}."
    gate = None if cfg.ffn_act == "relu" else f @ _tensor(w, p + "ffn_gate.weight", f.dtype).T
    return ffn_activation(gate, f @ _tensor(w, p + "ffn_up.weight", f.dtype).T, cfg.ffn_act)


def _ffn_down(w: Mapping[str, np.ndarray], layer: int, dtype) -> np.ndarray:
    """The down projection as the [ffn_dim, dim] matrix that h multiplies (ffn_down_t is stored so)."""
    p = f"blk.{layer}."
    if p + "ffn_down_t.weight" in w:
        return _tensor(w, p + "ffn_down_t.weight", dtype)
    return _tensor(w, p + "ffn_down.weight", dtype).T


# A mask for one layer: None (dense), bool [..., T, ffn_dim] (per token), bool [ffn_dim] or an index array
# (the same neurons for every token).  ffn_mask as a whole: a sequence or mapping layer -> mask, or a
# callable (layer, ffn_inp [..., T, dim]) -> mask, which lets a predictor see the residual stream of the
# *masked* model, as it would in a sparse engine (errors of earlier layers propagate).  The callable runs
# before the layer's FFN weights are read, so it may also adjust them (fixture calibration does).
LayerMask = Union[None, np.ndarray, Sequence[int]]
FfnMask = Union[None, Sequence[LayerMask], Mapping[int, LayerMask], Callable[[int, np.ndarray], LayerMask]]


def _layer_mask(ffn_mask: FfnMask, layer: int, ffn_inp: np.ndarray, ffn_dim: int) -> np.ndarray | None:
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
    per_token = ffn_inp.shape[:-1] + (ffn_dim,)
    if m.shape not in ((ffn_dim,), per_token):
        raise ValueError(f"layer {layer}: mask shape {m.shape}, expected ({ffn_dim},) or {per_token}")
    return m


@dataclass
class LayerInternals:
    ffn_inp: np.ndarray      # [..., T, dim] residual stream after attention, before ffn_norm (predictor input)
    ffn_normed: np.ndarray   # [..., T, dim] rms_norm(ffn_inp) * ffn_norm (what the gate and up projections see)
    h: np.ndarray            # [..., T, ffn_dim] true (unmasked) activation; active set = h != 0

    @property
    def active(self) -> np.ndarray:
        return self.h != 0


# ----------------------------------------------------------------------------- the forward pass
def forward(cfg: ReferenceConfig, w: Mapping[str, np.ndarray], tokens, return_internals: bool = False,
            ffn_mask: FfnMask = None, cache: KVCache | None = None, dtype=np.float64, logits: bool = True):
    """Logits [..., T, vocab] for token ids of shape [T] or [B, T] (with `logits=False`, the final normed
    hidden states [..., T, dim] instead). `w`: GGUF or llama2.c / Meta names (see module docstring).

    cache: a KVCache to decode incrementally; the tokens are placed after the cached positions and the
    cache is extended in place. Without one, the tokens are a whole sequence starting at position 0.
    return_internals: also return a list (one per layer) of LayerInternals; `h` there is the activation
    before any ffn_mask is applied, so `h != 0` is the true active set of the (possibly masked) run.
    """
    w = gguf_named(w, cfg.ffn_act)
    tokens = np.atleast_1d(np.asarray(tokens, dtype=np.int64))
    start = cache.length if cache is not None else 0
    positions = np.arange(start, start + tokens.shape[-1])
    x = np.asarray(w["token_embd.weight"])[tokens].astype(dtype)
    internals = []
    for layer in range(cfg.n_layers):
        p = f"blk.{layer}."
        a = rms_norm(x, _tensor(w, p + "attn_norm.weight", dtype), cfg.norm_eps)
        x = x + attention(cfg, w, layer, a, positions, cache)
        ffn_inp = x
        mask = _layer_mask(ffn_mask, layer, ffn_inp, cfg.ffn_dim)
        f = rms_norm(ffn_inp, _tensor(w, p + "ffn_norm.weight", dtype), cfg.norm_eps)
        h = _ffn_hidden(cfg, w, layer, f)
        x = ffn_inp + (h if mask is None else h * mask) @ _ffn_down(w, layer, dtype)
        if return_internals:
            internals.append(LayerInternals(ffn_inp=ffn_inp, ffn_normed=f, h=h))
    out = rms_norm(x, _tensor(w, "output_norm.weight", dtype), cfg.norm_eps)
    if logits:
        out = out @ _tensor(w, "output.weight" if "output.weight" in w else "token_embd.weight", dtype).T
    return (out, internals) if return_internals else out


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
    """`forward` in float64 over GGUF-named weights, the sizes read off the tensors (the layers: as many
    as `blk.N.attn_norm.weight` there are). `before_ffn(layer, ffn_inp)` is a callable ffn_mask that
    returns None: it sees each layer's FFN input before the layer's FFN weights are read."""
    n_layers = 0
    while f"blk.{n_layers}.attn_norm.weight" in weights:
        n_layers += 1
    vocab, dim = np.shape(weights["token_embd.weight"])
    cfg = ReferenceConfig(dim=dim, n_layers=n_layers, n_heads=n_head, n_kv_heads=n_head_kv,
                          ffn_dim=np.shape(weights["blk.0.ffn_up.weight"])[0], vocab=vocab, norm_eps=norm_eps,
                          rope_base=rope_freq_base, ffn_act=ffn_act, rope_dim=rope_dim)
    return forward(cfg, weights, tokens, ffn_mask=before_ffn, logits=logits)


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


def cross_entropy(logits: np.ndarray, targets) -> np.ndarray:
    """Per-position negative log-likelihood (nats) of targets [T] under logits [T, vocab]."""
    targets = np.asarray(targets, dtype=np.int64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=-1))
    return log_z - shifted[np.arange(len(targets)), targets]
