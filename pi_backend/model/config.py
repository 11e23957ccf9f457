"""Model hyperparameters read from GGUF metadata, and a check of the tensors against them."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from .gguf_file import GGUFError, GGUFFile

__all__ = ["ModelConfig", "FFN_ACTIVATIONS", "SUPPORTED_ARCHS", "FFN_ACT_KEY", "SPARSE_THRESHOLDS_KEY", "load_config"]

# reglu: relu(gate)*up (ReluLLaMA, ProSparse); drelu: relu(gate)*relu(up) (Bamboo/TurboSparse);
# relu: relu(up), no gate (ReluFalcon); swiglu: silu(gate)*up (stock LLaMA: dense, not sparse).
FFN_ACTIVATIONS = ("reglu", "drelu", "relu", "swiglu", "gelu")
GATED_ACTIVATIONS = ("reglu", "drelu", "swiglu")
SUPPORTED_ARCHS = ("llama", "bamboo", "falcon")
FFN_ACT_KEY = "pi_backend.ffn_act"  # our own key: dense ReLU files otherwise look like SiLU llama
SPARSE_THRESHOLD_KEY = "powerinfer.sparse_threshold"
SPARSE_THRESHOLDS_KEY = "pi_backend.sparse_thresholds"  # optional per-layer f32 array


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_vocab: int
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    norm_eps: float
    rope_freq_base: float
    rope_dim: int
    n_ctx_train: int
    ffn_act: str
    ffn_act_source: str  # "override" | "metadata" | "arch-default"
    is_powerinfer: bool
    sparse_threshold: float
    layer_sparse_thresholds: tuple[float, ...] | None
    predictor_ranks: tuple[int | None, ...]  # fc1 rows per layer; None where a layer has no predictor
    ffn_down_transposed: bool  # ffn_down_t (neuron-major) rather than ffn_down
    tied_embeddings: bool  # no output.weight: the output projection reuses token_embd

    @property
    def is_gated(self) -> bool:
        return self.ffn_act in GATED_ACTIVATIONS

    @property
    def has_predictors(self) -> bool:
        return any(rank is not None for rank in self.predictor_ranks)

    def threshold(self, layer: int) -> float:
        """The predictor threshold for a layer: per-layer value when the file has one, else the global."""
        if self.layer_sparse_thresholds is not None:
            return self.layer_sparse_thresholds[layer]
        return self.sparse_threshold

    @classmethod
    def from_gguf(cls, gguf: GGUFFile, *, ffn_act: str | None = None, validate: bool = True) -> "ModelConfig":
        """Read the config; `ffn_act` overrides what the file says or implies. With `validate`, every
        tensor the architecture needs must be present with the expected shape."""
        config = _read_config(gguf, ffn_act)
        if validate:
            config.validate_tensors(gguf)
        return config

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Required tensors and their row-major shapes (predictors included where the file has them)."""
        e, v, f = self.n_embd, self.n_vocab, self.n_ff
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_head_kv * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (v, e), "output_norm.weight": (e,)}
        if not self.tied_embeddings:
            shapes["output.weight"] = (v, e)
        for i in range(self.n_layer):
            p = f"blk.{i}."
            shapes[p + "attn_norm.weight"] = (e,)
            if self.arch == "falcon":
                shapes[p + "attn_qkv.weight"] = (q_dim + 2 * kv_dim, e)
            else:
                shapes[p + "attn_q.weight"] = (q_dim, e)
                shapes[p + "attn_k.weight"] = (kv_dim, e)
                shapes[p + "attn_v.weight"] = (kv_dim, e)
                shapes[p + "ffn_norm.weight"] = (e,)
                shapes[p + "ffn_gate.weight"] = (f, e)
            shapes[p + "attn_output.weight"] = (e, q_dim)
            shapes[p + "ffn_up.weight"] = (f, e)
            if self.ffn_down_transposed:
                shapes[p + "ffn_down_t.weight"] = (f, e)
            else:
                shapes[p + "ffn_down.weight"] = (e, f)
            rank = self.predictor_ranks[i]
            if rank is not None:
                shapes[p + "fc1.weight"] = (rank, e)
                shapes[p + "fc2.weight"] = (f, rank)
        return shapes

    def validate_tensors(self, gguf: GGUFFile) -> None:
        for name, expected in self.expected_shapes().items():
            info = gguf.tensors.get(name)
            if info is None:
                raise GGUFError(gguf.path, f"missing tensor {name!r} (expected shape {expected})")
            if info.shape != expected:
                raise GGUFError(gguf.path, f"tensor {name!r} has shape {info.shape}, expected {expected}")


def load_config(path: str | os.PathLike, *, ffn_act: str | None = None, validate: bool = True) -> ModelConfig:
    with GGUFFile.open(path) as gguf:
        return ModelConfig.from_gguf(gguf, ffn_act=ffn_act, validate=validate)


def _read_config(gguf: GGUFFile, ffn_act_override: str | None) -> ModelConfig:
    meta = gguf.metadata
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise GGUFError(gguf.path, f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")

    def get(key: str, kind: type, default: Any = None) -> Any:
        full = f"{arch}.{key}"
        value = meta.get(full, default)
        if value is None:
            raise GGUFError(gguf.path, f"missing metadata key {full!r}")
        if isinstance(value, (list, np.ndarray, str)) or (kind is int and isinstance(value, float)):
            raise GGUFError(gguf.path, f"metadata key {full!r} = {_short(value)} is not a single {kind.__name__}")
        value = kind(value)
        if kind is int and value <= 0:
            raise GGUFError(gguf.path, f"metadata key {full!r} = {value} must be positive")
        return value

    n_embd = get("embedding_length", int)
    n_layer = get("block_count", int)
    n_head = get("attention.head_count", int)
    n_head_kv = get("attention.head_count_kv", int, n_head)
    n_ff = get("feed_forward_length", int, 4 * n_embd if arch == "falcon" else None)
    if n_embd % n_head:
        raise GGUFError(gguf.path, f"embedding_length {n_embd} is not divisible by head_count {n_head}")
    if n_head % n_head_kv:
        raise GGUFError(gguf.path, f"head_count {n_head} is not divisible by head_count_kv {n_head_kv}")
    head_dim = get("attention.key_length", int, n_embd // n_head)
    eps_key = "attention.layer_norm_epsilon" if arch == "falcon" else "attention.layer_norm_rms_epsilon"
    norm_eps = get(eps_key, float)

    tokens = meta.get("tokenizer.ggml.tokens")
    embd = gguf.tensors.get("token_embd.weight")
    if tokens is not None:
        n_vocab = len(tokens)
    elif f"{arch}.vocab_size" in meta:
        n_vocab = get("vocab_size", int)
    elif embd is not None:
        n_vocab = embd.shape[0]
    else:
        raise GGUFError(gguf.path, "cannot tell the vocabulary size: no tokenizer.ggml.tokens, vocab_size or token_embd.weight")

    ffn_act, ffn_act_source = _ffn_activation(gguf, arch, ffn_act_override)
    predictor_ranks = _predictor_ranks(gguf, n_layer)
    has_down = [f"blk.{i}.ffn_down.weight" in gguf.tensors for i in range(n_layer)]
    has_down_t = [f"blk.{i}.ffn_down_t.weight" in gguf.tensors for i in range(n_layer)]
    if any(has_down) and any(has_down_t):
        raise GGUFError(gguf.path, "file mixes ffn_down and ffn_down_t tensors; expected one layout for all layers")

    return ModelConfig(
        arch=arch,
        n_vocab=n_vocab,
        n_embd=n_embd,
        n_ff=n_ff,
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        norm_eps=norm_eps,
        rope_freq_base=get("rope.freq_base", float, 10000.0),
        rope_dim=get("rope.dimension_count", int, head_dim),
        n_ctx_train=get("context_length", int, 2048),
        ffn_act=ffn_act,
        ffn_act_source=ffn_act_source,
        is_powerinfer=gguf.is_powerinfer,
        sparse_threshold=_sparse_threshold(gguf),
        layer_sparse_thresholds=_layer_thresholds(gguf, n_layer),
        predictor_ranks=predictor_ranks,
        ffn_down_transposed=any(has_down_t),
        tied_embeddings="output.weight" not in gguf.tensors,
    )


def _ffn_activation(gguf: GGUFFile, arch: str, override: str | None) -> tuple[str, str]:
    if override is not None:
        act, source = override, "override"
    elif FFN_ACT_KEY in gguf.metadata:
        act, source = gguf.metadata[FFN_ACT_KEY], "metadata"
    else:
        # PowerInfer runs llama-arch PWRI files with ReLU on the gate (falcon ones with ReLU, Falcon-ReLU);
        # stock llama is SiLU and stock falcon GELU, as llama.cpp computes them.
        pwri = gguf.is_powerinfer
        defaults = {"llama": "reglu" if pwri else "swiglu", "bamboo": "drelu", "falcon": "relu" if pwri else "gelu"}
        act, source = defaults[arch], "arch-default"
    if act not in FFN_ACTIVATIONS:
        raise GGUFError(gguf.path, f"unknown FFN activation {act!r} ({source}); choose from {', '.join(FFN_ACTIVATIONS)}")
    gated_arch = arch != "falcon"
    if gated_arch != (act in GATED_ACTIVATIONS):
        expected = "a gated one (" + ", ".join(GATED_ACTIVATIONS) + ")" if gated_arch else "'relu' or 'gelu'"
        raise GGUFError(gguf.path, f"FFN activation {act!r} ({source}) does not fit arch {arch!r}: expected {expected}")
    return act, source


def _predictor_ranks(gguf: GGUFFile, n_layer: int) -> tuple[int | None, ...]:
    ranks = []
    for i in range(n_layer):
        fc1 = gguf.tensors.get(f"blk.{i}.fc1.weight")
        fc2 = gguf.tensors.get(f"blk.{i}.fc2.weight")
        if (fc1 is None) != (fc2 is None):
            present, absent = ("fc1", "fc2") if fc1 is not None else ("fc2", "fc1")
            raise GGUFError(gguf.path, f"layer {i} has predictor tensor blk.{i}.{present}.weight but no blk.{i}.{absent}.weight")
        if fc1 is not None and len(fc1.shape) != 2:
            raise GGUFError(gguf.path, f"tensor 'blk.{i}.fc1.weight' has shape {fc1.shape}, expected 2 dimensions")
        ranks.append(fc1.shape[0] if fc1 is not None else None)
    return tuple(ranks)


def _sparse_threshold(gguf: GGUFFile) -> float:
    value = gguf.metadata.get(SPARSE_THRESHOLD_KEY, 0.0)
    if isinstance(value, (list, np.ndarray, str, bool)):
        raise GGUFError(gguf.path, f"metadata key {SPARSE_THRESHOLD_KEY!r} = {_short(value)} is not a number")
    return float(value)


def _layer_thresholds(gguf: GGUFFile, n_layer: int) -> tuple[float, ...] | None:
    value = gguf.metadata.get(SPARSE_THRESHOLDS_KEY)
    if value is None:
        return None
    if not isinstance(value, np.ndarray) or value.dtype.kind != "f" or value.shape != (n_layer,):
        raise GGUFError(
            gguf.path, f"metadata key {SPARSE_THRESHOLDS_KEY!r} must be a float array of {n_layer} values, found {_short(value)}"
        )
    return tuple(float(x) for x in value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
