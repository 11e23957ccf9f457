"""What a placement has to fit: the model's real byte sizes at its weight types.

A neuron of layer l costs the bytes of its rows: gate (gated FFNs only), up, and down_t (PowerInfer's
neuron-major W_down), each `native.row_bytes(type, n_embd)` at that tensor's own type. (PowerInfer
estimates the per-neuron size from n_ff and a magic 4.5, which is right only when n_ff/n_embd is
about 8/3: for a 14336/4096 model a quarter of the budget stays unused.)

The dense blocks are listed in PowerInfer's order of offload priority: the attention of every layer
(numeric layer order), the predictors, the norms, the output head, then the KV cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pi_backend import native
from pi_backend.model.config import ModelConfig
from pi_backend.model.gguf_file import GGUFFile, TensorInfo

__all__ = ["DenseBlock", "ModelSizes", "DENSE_KINDS", "kv_cache_bytes"]

DENSE_KINDS = ("attention", "predictor", "norms", "output", "kv_cache")


@dataclass(frozen=True)
class DenseBlock:
    """A unit of dense offload: one layer's attention, one layer's predictor, all norms, the output head,
    or the KV cache."""

    name: str                 # "attn.3", "pred.3", "norms", "output", "kv_cache"
    kind: str                 # one of DENSE_KINDS
    nbytes: int
    layer: int | None = None
    tensors: tuple[str, ...] = ()  # GGUF tensor names (none for the KV cache)


@dataclass(frozen=True)
class ModelSizes:
    n_layer: int
    n_ff: int
    n_embd: int
    neuron_bytes: np.ndarray          # int64 [n_layer]: bytes of one neuron's rows in layer l
    dense: tuple[DenseBlock, ...]     # in offload priority order, KV cache last

    def __post_init__(self):
        nb = np.asarray(self.neuron_bytes, dtype=np.int64).reshape(-1)
        if nb.shape != (self.n_layer,) or (nb <= 0).any():
            raise ValueError(f"neuron_bytes: expected {self.n_layer} positive sizes, got {self.neuron_bytes!r}")
        object.__setattr__(self, "neuron_bytes", nb)
        kinds = [b.kind for b in self.dense]
        if any(k not in DENSE_KINDS for k in kinds):
            raise ValueError(f"dense: unknown block kind in {sorted(set(kinds))}; expected {DENSE_KINDS}")
        order = [DENSE_KINDS.index(k) for k in kinds]
        if order != sorted(order):
            raise ValueError("dense: blocks must come in priority order (attention, predictor, norms, output, kv_cache)")

    @property
    def ffn_bytes(self) -> int:
        """All FFN neurons of all layers."""
        return int(self.neuron_bytes.sum()) * self.n_ff

    @property
    def dense_bytes(self) -> int:
        return sum(b.nbytes for b in self.dense)

    @classmethod
    def synthetic(cls, n_layer: int, n_ff: int, n_embd: int, wtype: int = native.TYPE_Q4_0, gated: bool = True,
                  attention_bytes: int | None = None, predictor_bytes: int = 0, output_bytes: int = 0,
                  kv_bytes: int = 0, norm_bytes: int | None = None) -> "ModelSizes":
        """Sizes of a model that exists only as numbers (tests, benchmarks): every matrix in `wtype`."""
        row = native.row_bytes(wtype, n_embd)
        nb = np.full(n_layer, (3 if gated else 2) * row, np.int64)
        attn = 4 * n_embd * row if attention_bytes is None else attention_bytes
        blocks = [DenseBlock(f"attn.{i}", "attention", attn, i) for i in range(n_layer)]
        if predictor_bytes:
            blocks += [DenseBlock(f"pred.{i}", "predictor", predictor_bytes, i) for i in range(n_layer)]
        blocks.append(DenseBlock("norms", "norms", (2 * n_layer + 1) * n_embd * 4 if norm_bytes is None else norm_bytes))
        if output_bytes:
            blocks.append(DenseBlock("output", "output", output_bytes))
        if kv_bytes:
            blocks.append(DenseBlock("kv_cache", "kv_cache", kv_bytes))
        return cls(n_layer, n_ff, n_embd, nb, tuple(blocks))

    @classmethod
    def from_gguf(cls, gguf: GGUFFile, cfg: ModelConfig, n_ctx: int | None = None,
                  kv_bytes_per_value: int = 2) -> "ModelSizes":
        """Real sizes read from the file's tensor table. n_ctx: KV cache length (default: the model's
        training context); kv_bytes_per_value: the engine's KV type on the device as on the host, 2 for
        f16 (its default), 4 for f32 (engine/device_layers.py)."""
        t = gguf.tensors

        def nbytes(*names: str) -> int:
            return sum(t[n].nbytes for n in names if n in t)

        def row(info: TensorInfo) -> int:
            if info.ggml_type in native.TYPE_NAMES:
                return native.row_bytes(info.ggml_type, cfg.n_embd)
            return info.nbytes // info.shape[0]  # other types: the same, from the tensor's own size

        neuron = np.zeros(cfg.n_layer, np.int64)
        attention, predictors = [], []
        for i in range(cfg.n_layer):
            p = f"blk.{i}."
            nb = row(t[p + "ffn_up.weight"])
            if cfg.is_gated and p + "ffn_gate.weight" in t:
                nb += row(t[p + "ffn_gate.weight"])
            if p + "ffn_down_t.weight" in t:
                nb += row(t[p + "ffn_down_t.weight"])
            elif p + "ffn_down.weight" in t:  # [n_embd, n_ff]: a neuron is a column, ~1/n_ff of the bytes
                nb += -(-t[p + "ffn_down.weight"].nbytes // cfg.n_ff)
            neuron[i] = nb
            names = tuple(p + n for n in ("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
                                          "attn_qkv.weight", "attn_output.weight") if p + n in t)
            attention.append(DenseBlock(f"attn.{i}", "attention", nbytes(*names), i, names))
            pred = tuple(p + n for n in ("fc1.weight", "fc2.weight") if p + n in t)
            if pred:
                predictors.append(DenseBlock(f"pred.{i}", "predictor", nbytes(*pred), i, pred))
        norms = tuple(n for n in [f"blk.{i}.ffn_norm.weight" for i in range(cfg.n_layer)] + ["output_norm.weight"]
                      if n in t)
        out = "output.weight" if "output.weight" in t else "token_embd.weight"
        blocks = attention + predictors + [DenseBlock("norms", "norms", nbytes(*norms), None, norms),
                                           DenseBlock("output", "output", nbytes(out), None, (out,))]
        n_ctx = n_ctx or cfg.n_ctx_train
        blocks.append(DenseBlock("kv_cache", "kv_cache", kv_cache_bytes(cfg, n_ctx, kv_bytes_per_value)))
        return cls(cfg.n_layer, cfg.n_ff, cfg.n_embd, neuron, tuple(blocks))


def kv_cache_bytes(cfg: ModelConfig, n_ctx: int, bytes_per_value: int = 2) -> int:
    """K and V for every layer and position."""
    return 2 * cfg.n_layer * int(n_ctx) * cfg.n_head_kv * cfg.head_dim * int(bytes_per_value)
