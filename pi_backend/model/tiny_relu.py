"""Convert the tiny-relu fixture (llama2.c / Meta tensor names, numpy .npz) to a llama GGUF.

The model was trained with interleaved (adjacent-pair) RoPE, which is GGUF llama's own layout, so
Q and K are copied unpermuted. Its 256 byte tokens get the byte-level BPE vocabulary (257 tokens),
so the embedding and output matrices gain one zero row for the never-produced token 256.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from gguf.constants import GGUFValueType

from .config import FFN_ACT_KEY, load_config
from .gguf_write import TypedValue, write_model
from .vocab import BYTE_VOCAB_SIZE, byte_vocab_metadata

__all__ = ["convert_tiny_relu", "meta_to_gguf_names", "PACKAGED_TINY_RELU"]

PACKAGED_TINY_RELU = Path(__file__).resolve().parent.parent / "data" / "tiny-relu.gguf"

_LAYER_NAMES = {
    "attention.wq": "attn_q",
    "attention.wk": "attn_k",
    "attention.wv": "attn_v",
    "attention.wo": "attn_output",
    "attention_norm": "attn_norm",
    "ffn_norm": "ffn_norm",
    "feed_forward.w1": "ffn_gate",
    "feed_forward.w3": "ffn_up",
    "feed_forward.w2": "ffn_down",
}
_GLOBAL_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "output.weight": "output.weight"}


def meta_to_gguf_names(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename llama2.c / Meta tensors (`layers.N.feed_forward.w1.weight`, ...) to GGUF names."""
    out = {}
    for name, array in arrays.items():
        if name in _GLOBAL_NAMES:
            out[_GLOBAL_NAMES[name]] = array
            continue
        parts = name.split(".")
        if parts[0] != "layers" or parts[-1] != "weight" or ".".join(parts[2:-1]) not in _LAYER_NAMES:
            raise ValueError(f"unexpected tensor name {name!r}")
        out[f"blk.{parts[1]}.{_LAYER_NAMES['.'.join(parts[2:-1])]}.weight"] = array
    return out


def convert_tiny_relu(npz_path: str | os.PathLike, out_path: str | os.PathLike, weight_type: str = "f16") -> Path:
    """Write the tiny-relu model as a plain llama GGUF with `pi_backend.ffn_act = "reglu"`."""
    with np.load(npz_path) as npz:
        config = json.loads(str(npz["_config"]))
        arrays = {name: np.asarray(npz[name], dtype=np.float32) for name in npz.files if not name.startswith("_")}
    if config.get("act") != "relu" or config.get("vocab_size") != 256:
        raise ValueError(f"{npz_path}: expected the ReGLU byte-vocabulary model, config says {config}")
    weights = meta_to_gguf_names(arrays)
    for name in ("token_embd.weight", "output.weight"):
        padded = np.zeros((BYTE_VOCAB_SIZE, config["dim"]), dtype=np.float32)
        padded[: weights[name].shape[0]] = weights[name]
        weights[name] = padded

    n_embd, n_head = config["dim"], config["n_heads"]
    arch = "llama"
    metadata = {
        "general.name": "tiny-relu",
        "general.description": "4-layer ReGLU LLaMA trained on CPU with L1 activation sparsity (pi_backend test fixture)",
        f"{arch}.context_length": config["seq_len"],
        f"{arch}.embedding_length": n_embd,
        f"{arch}.block_count": config["n_layers"],
        f"{arch}.feed_forward_length": config["hidden_dim"],
        f"{arch}.attention.head_count": n_head,
        f"{arch}.attention.head_count_kv": config.get("n_kv_heads", n_head),
        f"{arch}.attention.layer_norm_rms_epsilon": TypedValue(float(config["norm_eps"]), GGUFValueType.FLOAT32),
        f"{arch}.rope.freq_base": TypedValue(10000.0, GGUFValueType.FLOAT32),
        f"{arch}.rope.dimension_count": n_embd // n_head,
        FFN_ACT_KEY: "reglu",
        **byte_vocab_metadata(),
    }
    path = write_model(out_path, arch, metadata, weights, weight_type=weight_type)
    load_config(path)  # the written file must validate against its own metadata
    return path
