"""A model's weights as zero-copy kernel views of the memory-mapped GGUF file.

Big matrices are never copied: each becomes a native.Matrix over its bytes in the file's one memmap, so
a 7B Q4_0 model costs its file size in page cache and nothing more. Only the small 1-D norm weights are
copied to float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pi_backend import native
from pi_backend.model.config import ModelConfig
from pi_backend.model.gguf_file import GGUFError, GGUFFile

KERNEL_TYPES = {native.TYPE_F32, native.TYPE_F16, native.TYPE_BF16, native.TYPE_Q8_0, native.TYPE_Q4_0}


@dataclass
class LayerWeights:
    attn_norm: np.ndarray
    wq: native.Matrix
    wk: native.Matrix
    wv: native.Matrix
    wo: native.Matrix
    ffn_norm: np.ndarray
    gate: native.Matrix | None   # None for ungated ReLU FFNs
    up: native.Matrix
    down_t: native.Matrix | None  # neuron-major W_down (PowerInfer's ffn_down_t): sparse down reads
    down: native.Matrix | None    # W_down as plain GGUF stores it [n_embd, n_ff]: dense down only
    fc1: native.Matrix | None     # predictor [rank, n_embd]
    fc2: native.Matrix | None     # predictor [n_ff, rank]


@dataclass
class Weights:
    token_embd: native.Matrix
    output_norm: np.ndarray
    output: native.Matrix
    layers: list[LayerWeights]


def matrix(gguf: GGUFFile, name: str) -> native.Matrix:
    info = gguf.tensor(name)
    if info.ggml_type not in KERNEL_TYPES:
        raise GGUFError(gguf.path, f"tensor {name!r} has type {info.type_name}, which pi_backend does not run "
                                   f"(supported: F32, F16, BF16, Q8_0, Q4_0)")
    if len(info.shape) != 2:
        raise GGUFError(gguf.path, f"tensor {name!r} has shape {info.shape}, expected a matrix")
    rows, cols = info.shape
    return native.Matrix(info.raw, info.ggml_type, rows, cols)


def vector(gguf: GGUFFile, name: str) -> np.ndarray:
    return np.ascontiguousarray(gguf.dequantize(name), dtype=np.float32)


def output_head(gguf: GGUFFile) -> native.Matrix:
    """output.weight, or token_embd.weight for models with tied embeddings."""
    return matrix(gguf, "output.weight" if "output.weight" in gguf.tensors else "token_embd.weight")


# the matrices only dot products read (token_embd is looked up by rows, down_t summed by axpy)
DOT_MATRICES = ("wq", "wk", "wv", "wo", "gate", "up", "down", "fc1", "fc2")


HUGE_PAGE = 2 << 20


def _huge_page_arena(nbytes: int) -> np.ndarray:
    """nbytes of fresh memory starting on a 2 MiB boundary (numpy advises it as huge pages)."""
    if nbytes == 0:
        return np.empty(0, np.uint8)
    buf = np.empty(nbytes + HUGE_PAGE, np.uint8)
    start = -buf.ctypes.data % HUGE_PAGE
    return buf[start: start + nbytes]


def regroup_q4_0(gguf: GGUFFile, weights: Weights, n_threads: int = 0) -> int:
    """Swap every Q4_0 matrix that only dot products read for its Q4_0X16 regrouping (pi_backend.h)
    where the active kernels gain from it (native.q4_0x16_pays; AVX2 / AVX-512: 2-2.7x fewer cycles per
    block). The weights stay in memory once: a private --no-mmap copy is converted in place; from a
    mapped file the rows are copied and the mapping's pages under them released. Returns the number
    of matrices regrouped."""
    owners = [(lw, name) for lw in weights.layers for name in DOT_MATRICES] + [(weights, "output")]
    todo = [(o, name, m) for o, name in owners if (m := getattr(o, name, None)) is not None
            and m.wtype == native.TYPE_Q4_0 and native.q4_0x16_pays(m.cols)]
    embd = weights.token_embd.buffer  # looked up by rows: its bytes (tied output head too) stay as they are
    tied = [np.may_share_memory(m.buffer, embd) for _, _, m in todo]
    in_place = [None if shared else gguf.writable(m.buffer) for (_, _, m), shared in zip(todo, tied)]
    # the copies go into one 2 MiB-aligned arena: numpy advises big allocations as huge pages, but
    # separate arrays, not 2 MiB aligned at their ends, left ~20% of the copies in 4 KiB pages, which
    # read 20-30% slower (page_cache.py)
    sizes = [m.nbytes + 63 & ~63 for _, _, m in todo]
    arena = _huge_page_arena(sum(size for size, out in zip(sizes, in_place) if out is None))
    at = 0
    for (o, name, m), out, size in zip(todo, in_place, sizes):
        if out is None:
            out, at = arena[at: at + size], at + size
        setattr(o, name, native.convert(m, native.TYPE_Q4_0X16, out=out, n_threads=n_threads))
    for (_, _, m), shared, out in zip(todo, tied, in_place):  # after all: falcon's q / k / v share a tensor
        if not shared and out is None:
            gguf.release(m.buffer)
    return len(todo)


def load_weights(gguf: GGUFFile, cfg: ModelConfig) -> Weights:
    """Views of every tensor the config names (ModelConfig.validate_tensors has checked the shapes)."""
    if cfg.arch == "falcon":
        from pi_backend.engine.falcon import load_falcon_weights  # falcon.py imports this module

        return load_falcon_weights(gguf, cfg)
    if cfg.arch not in ("llama", "bamboo"):
        raise GGUFError(gguf.path, f"architecture {cfg.arch!r} is not supported by the engine yet "
                                   "(supported: llama, bamboo, falcon)")
    opt = lambda name: matrix(gguf, name) if name in gguf.tensors else None  # noqa: E731
    layers = []
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        layers.append(LayerWeights(
            attn_norm=vector(gguf, p + "attn_norm.weight"),
            wq=matrix(gguf, p + "attn_q.weight"),
            wk=matrix(gguf, p + "attn_k.weight"),
            wv=matrix(gguf, p + "attn_v.weight"),
            wo=matrix(gguf, p + "attn_output.weight"),
            ffn_norm=vector(gguf, p + "ffn_norm.weight"),
            gate=opt(p + "ffn_gate.weight") if cfg.is_gated else None,
            up=matrix(gguf, p + "ffn_up.weight"),
            down_t=opt(p + "ffn_down_t.weight"),
            down=opt(p + "ffn_down.weight"),
            fc1=opt(p + "fc1.weight"),
            fc2=opt(p + "fc2.weight"),
        ))
    return Weights(
        token_embd=matrix(gguf, "token_embd.weight"),
        output_norm=vector(gguf, "output_norm.weight"),
        output=output_head(gguf),
        layers=layers,
    )
