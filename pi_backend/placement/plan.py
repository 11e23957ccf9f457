"""The placement of one model at load time: statistics, cache, PowerInfer's index, solver.

    placement = plan_for_model(gguf, config, vram_budget=8.0)

Order of sources:
  1. disable_split (--disable-gpu-index): dense blocks only, every FFN neuron on the CPU;
  2. our cache `<model>.pi_placement.gguf`, when its model hash, statistics hash, budget, thresholds
     and solver parameters all match (reset=True, --reset-gpu-index, skips it);
  3. the solver, on the statistics in `activation_dir` (default `<model dir>/activation/`,
     PowerInfer's layout); the result is written to the cache (beside the model, or under
     ~/.cache/pi_backend/placement when the model's folder is read-only);
  4. without statistics, PowerInfer's `<model>.generated.gpuidx` if present and it fits the budget;
  5. otherwise dense blocks only, with a message saying where statistics were looked for.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from pi_backend.model.activation_stats import load_activation_dir
from pi_backend.model.config import ModelConfig
from pi_backend.model.gguf_file import GGUFFile
from pi_backend.placement import cache as pcache
from pi_backend.placement.cost import CostModel
from pi_backend.placement.sizes import ModelSizes
from pi_backend.placement.solver import GiB, MiB, Placement, PlacementError, solve_placement

__all__ = ["plan_for_model", "find_activation_dir", "SOLVER_VERSION", "user_cache_dir"]

log = logging.getLogger("pi_backend.placement")
SOLVER_VERSION = 1


def find_activation_dir(model_path: str | os.PathLike, activation_dir: str | os.PathLike | None = None) -> Path | None:
    d = Path(activation_dir) if activation_dir is not None else Path(model_path).absolute().parent / "activation"
    if activation_dir is not None and not d.is_dir():
        raise PlacementError(f"activation_dir: {d} is not a directory")
    return d if d.is_dir() and any(d.glob("activation_*.pt")) else None


def user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pi_backend" / "placement"


def _cache_candidates(model_path: str, mhash: str) -> list[Path]:
    return [pcache.cache_path(model_path), user_cache_dir() / f"{Path(model_path).name}.{mhash[:16]}{pcache.CACHE_SUFFIX}"]


def plan_for_model(gguf: GGUFFile, cfg: ModelConfig, vram_budget: float | None = None, *,
                   budget_bytes: int | None = None, activation_dir: str | os.PathLike | None = None,
                   reset: bool = False, disable_split: bool = False, n_ctx: int | None = None,
                   thresholds: Sequence[float] | None = None, cost: CostModel | None = None,
                   balance: float = 0.0, kv_cache: str = "auto", write_cache: bool = True,
                   stats: Sequence[np.ndarray] | None = None, kv_bytes_per_value: int = 2) -> Placement:
    """Place `gguf`'s model under vram_budget GiB (or budget_bytes). `stats` overrides the statistics
    files (tests, tools); thresholds: the predictor threshold of each layer (stored with the cache);
    kv_bytes_per_value: 2 for an f16 KV cache (the engine's default), 4 for f32."""
    if budget_bytes is None:
        if vram_budget is None:
            raise ValueError("vram_budget: a budget in GiB (or budget_bytes) is needed to place the model")
        if not vram_budget >= 0:
            raise ValueError(f"vram_budget: must be >= 0 GiB, got {vram_budget!r}")
        budget_bytes = int(vram_budget * GiB)
    cost = cost or CostModel()
    path = gguf.path
    sizes = ModelSizes.from_gguf(gguf, cfg, n_ctx, kv_bytes_per_value)
    L, n = cfg.n_layer, cfg.n_ff
    thresholds = np.asarray([cfg.threshold(i) for i in range(L)] if thresholds is None else thresholds, np.float32)
    zeros = np.zeros((L, n), np.float32)

    def dense_only(message: str | None, source: str = "none") -> Placement:
        p = solve_placement(zeros, sizes, budget_bytes, cost, kv_cache=kv_cache, split_ffn=False)
        p.messages = [m for m in p.messages if not m.startswith("FFN split disabled")]
        if message:
            p.messages.append(message)
        p.source = source
        p.layer_mass = p.hot_mass = p.gpu_seconds = p.cpu_seconds = p.cpu_only_seconds = None
        return _logged(p)

    if disable_split:
        return dense_only("FFN split disabled (disable_gpu_index): every neuron runs on the CPU, "
                          "only dense blocks are offloaded")

    stats_dir = None
    if stats is None:
        stats_dir = find_activation_dir(path, activation_dir)
        if stats_dir is not None:
            try:
                stats = load_activation_dir(stats_dir, n_layer=L, n_ff=n)
            except ValueError as exc:
                raise PlacementError(f"activation statistics in {stats_dir} do not fit {Path(path).name} "
                                     f"({exc}); pass activation_dir= or disable_gpu_index=True") from None
    if stats is None:
        return _from_gpuidx(path, cfg, sizes, budget_bytes, reset, dense_only, activation_dir)

    mhash = pcache.model_hash(gguf)
    expected = {
        "model_hash": mhash, "stats_hash": pcache.stats_hash(stats), "thresholds": thresholds,
        "params": f"solver={SOLVER_VERSION};{cost.key()};balance={balance:g};kv={kv_cache};"
                  f"dense={sizes.dense_bytes}",
    }
    candidates = _cache_candidates(path, mhash)
    stale = []
    if not reset:
        for cp in candidates:
            if not cp.exists():
                continue
            try:
                cached = pcache.read_placement_cache(cp)
                problems = pcache.cache_problems(cached, expected, budget_bytes, L, n)
            except (ValueError, KeyError) as exc:  # a damaged cache is rebuilt, never trusted
                problems = [f"unreadable ({exc})"]
            if not problems:
                cached.messages.insert(0, f"placement read from {cp}")
                return _logged(cached)
            stale.append(f"stale placement cache {cp.name} ({'; '.join(problems)}): rebuilding")

    p = solve_placement(stats, sizes, budget_bytes, cost, balance=balance, kv_cache=kv_cache)
    p.meta = expected
    notes = stale + [f"placement solved from {stats_dir or 'the given statistics'} in {p.solve_seconds * 1e3:.0f} ms"]
    if write_cache:  # the file keeps the solver's own messages only
        for cp in candidates:
            try:
                cp.parent.mkdir(parents=True, exist_ok=True)
                pcache.write_placement_cache(cp, p)
                notes.append(f"placement cached in {cp}")
                break
            except OSError as exc:
                notes.append(f"cannot write the placement cache {cp} ({exc.strerror or exc})")
    p.messages[:0] = notes
    return _logged(p)


def _from_gpuidx(path, cfg, sizes, budget_bytes, reset, dense_only, activation_dir) -> Placement:
    where = activation_dir or Path(path).absolute().parent / "activation"
    gp = pcache.gpuidx_path(path)
    if not gp.exists():
        return dense_only(f"no activation statistics (looked in {where}) and no {gp.name}: the FFN runs on the "
                          "CPU; profile the model to write activation/activation_<layer>.pt")
    if reset:
        return dense_only(f"reset_gpu_index: {gp.name} ignored, and there are no activation statistics "
                          f"(looked in {where}) to rebuild it from: the FFN runs on the CPU")
    idx = pcache.read_gpuidx(gp, n_layer=cfg.n_layer, n_ff=cfg.n_ff)
    p = dense_only(None, "powerinfer-gpuidx")
    room = p.budget_bytes - p.dense_bytes
    need = int(sum(h.size * b for h, b in zip(idx.hot, sizes.neuron_bytes)))
    if need > room:
        p.messages.append(f"{gp.name} asks for {need / MiB:.0f} MiB of hot neurons but only {room / MiB:.0f} MiB are "
                          "left after the dense blocks: ignored (no statistics to re-solve; the FFN runs on the CPU)")
        p.source = "none"
        return p
    p.hot = idx.hot
    p.messages.append(f"PowerInfer GPU index {gp.name} used ({need / MiB:.0f} MiB of hot neurons); it carries no "
                      "model hash, so it is trusted only for its shape: n_layer and n_ff checked")
    p.check_budget()
    return p


def _logged(p: Placement) -> Placement:
    for m in p.messages:
        log.info("placement: %s", m)
    return p
