"""Placement and hybrid-execution benchmarks (issue 7).

- The solver on an 80-layer x 28672-neuron model (a 70B shape, Q4_0): must stay well under a second
  (PowerInfer spawns a ~30 s GLPK subprocess whose answer equals a sort). Tracked as a ratio to one
  numpy sort of the same statistics, measured in the same run; the absolute time is reported.
- One 7B-shaped FFN layer (4096 x 11008, Q4_0, 10% active, the active set split half hot / half cold)
  computed by: one executor on all threads; the split run sequentially; the split overlapped (the
  hot partition on the CPU stand-in's worker thread while the cold one runs), with 1+1 and 1+2
  threads, and with the stand-in reading a compact copy of its rows (the GPU executor's data path).
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

from pi_backend import native
from pi_backend.engine.executors import CpuExecutor, CpuThreadExecutor
from pi_backend.engine.weights import LayerWeights
from pi_backend.placement import ModelSizes, solve_placement

L70, NFF70, NEMBD70 = 80, 28672, 8192
N_EMBD, N_FF = 4096, 11008


@functools.lru_cache(maxsize=None)
def stats_70b() -> np.ndarray:
    rng = np.random.default_rng(0)  # skewed, and differently so per layer
    return np.stack([rng.beta(0.15 + 0.01 * (i % 20), 3.0, NFF70) for i in range(L70)]).astype(np.float32)


def test_numpy_sort_80x28k(benchmark):
    F = stats_70b()
    benchmark.extra_info["bytes"] = F.nbytes
    benchmark.pedantic(lambda: np.sort(F, axis=1), rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("budget_gib", [12, 24])
def test_solve_80x28k(benchmark, budget_gib):
    F, sizes = stats_70b(), ModelSizes.synthetic(L70, NFF70, NEMBD70, native.TYPE_Q4_0)
    budget = budget_gib << 30
    p = benchmark.pedantic(lambda: solve_placement(F, sizes, budget), rounds=5, iterations=1, warmup_rounds=1)
    assert p.total_bytes <= budget and p.has_split
    benchmark.extra_info.update(bytes=F.nbytes, served=p.served_fraction)


@functools.lru_cache(maxsize=None)
def layer() -> LayerWeights:
    from tests.native_helpers import make_matrix

    rng = np.random.default_rng(0)
    gate, up, down = (make_matrix(rng, N_FF, N_EMBD, native.TYPE_Q4_0, 0.02)[0] for _ in range(3))
    return LayerWeights(None, None, None, None, None, None, gate, up, down, None, None, None)


def split() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    active = np.sort(rng.choice(N_FF, N_FF // 10, replace=False)).astype(np.int32)
    hot = np.zeros(N_FF, bool)
    hot[rng.choice(N_FF, N_FF // 2, replace=False)] = True
    return active, active[hot[active]], active[~hot[active]]


def x_vec() -> np.ndarray:
    return np.random.default_rng(2).standard_normal((1, N_EMBD)).astype(np.float32)


_FLUSH = np.ones(96 << 18, np.float32)


def _evict():
    _FLUSH.sum()


def _layer_step(hot_ex, cold_ex, lw, hot_idx, cold_idx, x, y):
    h = hot_ex.submit(0, lw, "swiglu", hot_idx, x, 0.0)
    try:
        cold_ex.run(lw, "swiglu", cold_idx, x, y, False, 0.0)
    finally:
        hot_ex.wait(h, y, True)


CONFIGS = {  # name -> (hot executor factory, cold threads)
    "single-2t": None,
    "sequential-2t": (lambda: CpuExecutor(2), 2),
    "overlap-1+1": (lambda: CpuThreadExecutor(1), 1),
    "overlap-1+2": (lambda: CpuThreadExecutor(1), 2),
    "overlap-compact-1+1": (lambda: CpuThreadExecutor(1, compact=True), 1),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_ffn_layer_hybrid(benchmark, config):
    lw, x = layer(), x_vec()
    active, hot_idx, cold_idx = split()
    y = np.zeros((1, N_EMBD), np.float32)
    nbytes = 3 * active.size * native.row_bytes(native.TYPE_Q4_0, N_EMBD)
    benchmark.extra_info["bytes"] = nbytes
    if CONFIGS[config] is None:
        ex = CpuExecutor(2)
        fn = lambda: ex.run(lw, "swiglu", active, x, y, False, 0.0)  # noqa: E731
    else:
        make_hot, cold_threads = CONFIGS[config]
        hot_ex, cold_ex = make_hot(), CpuExecutor(cold_threads)
        hot_ex.prepare(0, lw, np.flatnonzero(np.isin(np.arange(N_FF), hot_idx)).astype(np.int32))
        fn = lambda: _layer_step(hot_ex, cold_ex, lw, hot_idx, cold_idx, x, y)  # noqa: E731
    benchmark.pedantic(fn, setup=_evict, rounds=50, iterations=1, warmup_rounds=2)


def metrics(median, bytes_of) -> dict[str, float]:
    """Tracked ratios (higher is better), all from benchmarks of this same run."""
    out = {}
    for b in (12, 24):
        out[f"solver_vs_sort.{b}GiB"] = median("test_numpy_sort_80x28k") / median(f"test_solve_80x28k[{b}]")
        out[f"info.solver_seconds.{b}GiB"] = median(f"test_solve_80x28k[{b}]")
        out[f"info.solver_under_1s_margin.{b}GiB"] = 1.0 / median(f"test_solve_80x28k[{b}]")
    # reported, not tracked: the configurations run one after another, and on a shared 2-core machine
    # their medians move with whoever else is running (measured here: 1.0x to 1.5x run to run)
    seq = median("test_ffn_layer_hybrid[sequential-2t]")
    single = median("test_ffn_layer_hybrid[single-2t]")
    for c in ("overlap-1+1", "overlap-1+2", "overlap-compact-1+1"):
        out[f"info.overlap_speedup_vs_sequential.{c}"] = seq / median(f"test_ffn_layer_hybrid[{c}]")
        out[f"info.overlap_vs_single_executor.{c}"] = single / median(f"test_ffn_layer_hybrid[{c}]")
    out["info.split_sequential_vs_single"] = single / seq
    return out


GOALS = {  # the targets, reported beside the baseline check
    "info.solver_under_1s_margin.*": 1.0,  # > 1: the 80 x 28k solve takes under a second
}
