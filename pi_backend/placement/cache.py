"""Placement files: our cache beside the model, and PowerInfer's `.generated.gpuidx`.

Both are GGUF files in PowerInfer's GPU-index layout -- arch `generic.gpu_index`,
`generic.gpu_index.block_count`, `split.vram_capacity` (u64), per layer `blk.i.gpu_idx` (I32 [n_ff],
0/1) and `blk.i.gpu_bucket` (I32, sorted ids of the hot neurons) -- so either reader reads either file.

Ours (`<model>.pi_placement.gguf`, plain GGUF magic) adds what PowerInfer's lacks, and is rebuilt
when any of it disagrees with the model being loaded:
  pi_placement.model_hash    sha256 of the header and tensor table, the file size and 8 sampled
                             64 KiB chunks of tensor data (milliseconds, not a read of a 40 GB file)
  pi_placement.stats_hash    sha256 of the activation statistics (shape and values)
  pi_placement.vram_budget   the budget in bytes (u64)
  pi_placement.thresholds    the per-layer predictor thresholds the statistics go with
  pi_placement.params        solver version, cost model, balance, KV policy, n_ctx, split flag
plus the dense blocks offloaded and the solver's per-layer masses, for the report.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from gguf.constants import GGUFValueType

from pi_backend.model.gguf_file import GGUFFile
from pi_backend.model.gguf_write import TypedValue, write_gguf
from pi_backend.placement.solver import Placement, PlacementError

__all__ = [
    "CACHE_SUFFIX", "GPUIDX_SUFFIX", "GpuIndex", "cache_path", "gpuidx_path", "model_hash", "stats_hash",
    "read_gpuidx", "write_gpuidx", "write_placement_cache", "read_placement_cache", "cache_problems",
]

CACHE_SUFFIX = ".pi_placement.gguf"
GPUIDX_SUFFIX = ".generated.gpuidx"
GPU_INDEX_ARCH = "generic.gpu_index"
FORMAT_VERSION = 1
_SAMPLES, _SAMPLE_BYTES = 8, 64 << 10
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.gpu_(?:idx|bucket)")


def cache_path(model_path: str | os.PathLike) -> Path:
    return Path(os.fspath(model_path) + CACHE_SUFFIX)


def gpuidx_path(model_path: str | os.PathLike) -> Path:
    return Path(os.fspath(model_path) + GPUIDX_SUFFIX)


def model_hash(gguf: GGUFFile) -> str:
    """A fast identity of a model file: everything before the tensor data (header, metadata, tensor
    table), the file size, and 8 chunks of tensor data spread over the file (a fine-tune with the same
    shapes and types changes those)."""
    h = hashlib.sha256()
    h.update(gguf.file_size.to_bytes(8, "little"))
    with open(gguf.path, "rb") as f:
        h.update(f.read(gguf.data_offset))
        span = max(gguf.file_size - gguf.data_offset - _SAMPLE_BYTES, 0)
        for i in range(_SAMPLES):
            f.seek(gguf.data_offset + span * i // max(_SAMPLES - 1, 1))
            h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()


def stats_hash(stats: Sequence[np.ndarray]) -> str:
    h = hashlib.sha256()
    for layer in stats:
        a = np.ascontiguousarray(layer, dtype="<f4")
        h.update(len(a).to_bytes(8, "little"))
        h.update(a.tobytes())
    return h.hexdigest()


# ---- PowerInfer's GPU index ---------------------------------------------------------------------

@dataclass
class GpuIndex:
    """What a `.gpuidx` file says: per layer the hot neurons, and the capacity it was solved for."""

    path: str
    hot: list[np.ndarray]  # sorted int32 ids per layer
    n_ff: int
    vram_capacity: int | None
    magic: str


def read_gpuidx(path: str | os.PathLike, n_layer: int | None = None, n_ff: int | None = None) -> GpuIndex:
    """Read a GPU index in PowerInfer's format (PWRI or GGUF magic). Checks every layer's mask and
    bucket against each other and, when given, the model's n_layer and n_ff (PowerInfer checks neither)."""
    with GGUFFile.open(path) as g:
        err = lambda problem: PlacementError(f"{g.path}: {problem}")  # noqa: E731
        if g.arch != GPU_INDEX_ARCH:
            raise err(f"not a GPU index: architecture {g.arch!r}, expected {GPU_INDEX_ARCH!r}")
        count = g.metadata.get(f"{GPU_INDEX_ARCH}.block_count")
        layers = sorted({int(m.group(1)) for m in map(_LAYER_TENSOR.fullmatch, g.tensors) if m})
        if count is None:
            count = len(layers)
        if layers != list(range(count)):
            raise err(f"block_count {count} but GPU index tensors for layers {layers[:8]}{'...' if len(layers) > 8 else ''}")
        if n_layer is not None and count != n_layer:
            raise err(f"{count} layers, the model has {n_layer}")
        hot, width = [], None
        for i in range(count):
            mask_name, bucket_name = f"blk.{i}.gpu_idx", f"blk.{i}.gpu_bucket"
            if mask_name not in g.tensors:
                raise err(f"missing tensor {mask_name!r}")
            mask = _i32(g, mask_name, err)
            if width is None:
                width = mask.size
            if mask.size != width or (n_ff is not None and mask.size != n_ff):
                raise err(f"{mask_name} has {mask.size} entries, expected {n_ff if n_ff is not None else width} (n_ff)")
            if mask.size and (mask.min() < 0 or mask.max() > 1):
                raise err(f"{mask_name} holds values other than 0 and 1")
            ids = np.flatnonzero(mask).astype(np.int32)
            if bucket_name in g.tensors:
                bucket = _i32(g, bucket_name, err)
                if bucket.size != ids.size or not np.array_equal(np.sort(bucket), ids):
                    raise err(f"{bucket_name} ({bucket.size} ids) disagrees with {mask_name} ({ids.size} set)")
            hot.append(ids)
        cap = g.metadata.get("split.vram_capacity")
        return GpuIndex(g.path, hot, int(width or 0), None if cap is None else int(cap), g.magic)


def _i32(g: GGUFFile, name: str, err) -> np.ndarray:
    info = g.tensor(name)
    if info.type_name != "I32" or len(info.shape) != 1:
        raise err(f"{name} is {info.type_name} {info.shape}, expected a 1-D I32 tensor")
    return np.array(g.array(name))


def _gpu_index_tensors(hot: Sequence[np.ndarray], n_ff: int) -> dict[str, np.ndarray]:
    tensors = {}
    for i, ids in enumerate(hot):
        mask = np.zeros(n_ff, np.int32)
        mask[ids] = 1
        tensors[f"blk.{i}.gpu_idx"] = mask
        if len(ids):  # GGUF has no empty tensors: a missing bucket means "none"
            tensors[f"blk.{i}.gpu_bucket"] = np.sort(np.asarray(ids, np.int32))
    return tensors


def _atomic_write(path: Path, write) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_gpuidx(path: str | os.PathLike, hot: Sequence[np.ndarray], n_ff: int, vram_capacity: int,
                 powerinfer_magic: bool = True) -> Path:
    """Write a GPU index exactly as PowerInfer's exporter lays it out (PWRI magic by default), e.g. to
    hand our placement to PowerInfer itself."""
    meta = {f"{GPU_INDEX_ARCH}.block_count": TypedValue(len(hot), GGUFValueType.UINT32),
            "split.vram_capacity": TypedValue(int(vram_capacity), GGUFValueType.UINT64)}
    return _atomic_write(Path(path), lambda p: write_gguf(p, GPU_INDEX_ARCH, meta, _gpu_index_tensors(hot, n_ff),
                                                          powerinfer=powerinfer_magic))


# ---- our cache -----------------------------------------------------------------------------------

def write_placement_cache(path: str | os.PathLike, placement: Placement) -> Path:
    """Write `placement` with its provenance (`placement.meta`: model_hash, stats_hash, thresholds, params)."""
    p, m = placement, placement.meta
    missing = {"model_hash", "stats_hash", "thresholds", "params"} - set(m)
    if missing:
        raise ValueError(f"placement.meta lacks {sorted(missing)}: the cache could never be validated")
    u64 = lambda v: TypedValue(int(v), GGUFValueType.UINT64)  # noqa: E731
    meta = {
        f"{GPU_INDEX_ARCH}.block_count": TypedValue(p.n_layer, GGUFValueType.UINT32),
        "split.vram_capacity": u64(p.budget_bytes - p.dense_bytes),
        "pi_placement.format_version": TypedValue(FORMAT_VERSION, GGUFValueType.UINT32),
        "pi_placement.model_hash": m["model_hash"],
        "pi_placement.stats_hash": m["stats_hash"],
        "pi_placement.vram_budget": u64(p.budget_bytes),
        "pi_placement.thresholds": np.asarray(m["thresholds"], np.float32),
        "pi_placement.params": m["params"],
        "pi_placement.n_ff": TypedValue(p.n_ff, GGUFValueType.UINT32),
        "pi_placement.dense_bytes": u64(p.dense_bytes),
        "pi_placement.neuron_bytes": np.asarray(p.neuron_bytes, np.int64),
        "pi_placement.solve_seconds": float(p.solve_seconds),
    }
    if p.dense_gpu:
        meta["pi_placement.dense_gpu"] = list(p.dense_gpu)
    for key in ("layer_mass", "hot_mass", "gpu_seconds", "cpu_seconds", "cpu_only_seconds"):
        value = getattr(p, key)
        if value is not None:
            meta[f"pi_placement.{key}"] = np.asarray(value, np.float64)
    if p.messages:
        meta["pi_placement.messages"] = list(p.messages)
    return _atomic_write(Path(path), lambda t: write_gguf(t, GPU_INDEX_ARCH, meta, _gpu_index_tensors(p.hot, p.n_ff)))


def read_placement_cache(path: str | os.PathLike) -> Placement:
    """Read our cache back into a Placement (source "cache"); raises PlacementError / GGUFError."""
    idx = read_gpuidx(path)
    with GGUFFile.open(path) as g:
        md = g.metadata
        if md.get("pi_placement.format_version") != FORMAT_VERSION:
            raise PlacementError(f"{path}: not a pi_backend placement cache of format {FORMAT_VERSION}")
        arr = lambda k: None if f"pi_placement.{k}" not in md else np.asarray(md[f"pi_placement.{k}"], np.float64)  # noqa: E731
        p = Placement(
            budget_bytes=int(md["pi_placement.vram_budget"]), n_ff=int(md["pi_placement.n_ff"]),
            neuron_bytes=np.asarray(md["pi_placement.neuron_bytes"], np.int64), hot=idx.hot,
            dense_gpu=tuple(md.get("pi_placement.dense_gpu", ())), dense_bytes=int(md["pi_placement.dense_bytes"]),
            layer_mass=arr("layer_mass"), hot_mass=arr("hot_mass"), gpu_seconds=arr("gpu_seconds"),
            cpu_seconds=arr("cpu_seconds"), cpu_only_seconds=arr("cpu_only_seconds"),
            messages=list(md.get("pi_placement.messages", [])), source="cache",
            solve_seconds=float(md.get("pi_placement.solve_seconds", 0.0)),
            meta={"model_hash": md["pi_placement.model_hash"], "stats_hash": md["pi_placement.stats_hash"],
                  "thresholds": np.asarray(md["pi_placement.thresholds"], np.float32),
                  "params": md["pi_placement.params"]},
        )
    if idx.n_ff != p.n_ff or len(p.neuron_bytes) != p.n_layer:
        raise PlacementError(f"{path}: inconsistent cache (n_ff {idx.n_ff} vs {p.n_ff}, {p.n_layer} layers)")
    return p


def cache_problems(cached: Placement, expected: dict, budget_bytes: int, n_layer: int, n_ff: int) -> list[str]:
    """Why a cached placement does not fit this load (empty list: it does)."""
    problems = []
    if cached.n_layer != n_layer or cached.n_ff != n_ff:
        problems.append(f"shape {cached.n_layer}x{cached.n_ff} != model {n_layer}x{n_ff}")
    if cached.meta["model_hash"] != expected["model_hash"]:
        problems.append("the model file changed")
    if cached.meta["stats_hash"] != expected["stats_hash"]:
        problems.append("the activation statistics changed")
    if cached.budget_bytes != int(budget_bytes):
        problems.append(f"budget {cached.budget_bytes} != {int(budget_bytes)} bytes")
    t_old, t_new = np.asarray(cached.meta["thresholds"], np.float32), np.asarray(expected["thresholds"], np.float32)
    if t_old.shape != t_new.shape or not np.array_equal(t_old, t_new):
        problems.append("the predictor thresholds changed")
    if cached.meta["params"] != expected["params"]:
        problems.append(f"solver parameters changed ({cached.meta['params']} -> {expected['params']})")
    return problems

