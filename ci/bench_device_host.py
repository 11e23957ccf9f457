"""The host's share of a GPU decode step, on any machine: the engine's device path (DeviceLayers: every
dense block, the KV cache, the predictor and the hot partition on the "device") driven against a
device library that does no device work (ci/tools/null_device.c, built here with the C compiler), so
what is timed is the Python and the C calls between the kernels, plus the CPU's small cold partition.
That share is what a small or well-offloaded model waits for on a real GPU, and the GPU suites never
run in CI: this one guards it.

Tracked: a yardstick of plain Python work (a function call around one bare C call of the library,
repeated) over the device path's host time, both measured in this run (higher is better), since both
move with the machine's speed for Python. The CPU engine's step on the same model is reported beside
it; it is no yardstick here: on this VM it jumps between ~110 and ~210 us a layer from run to run.
"""
from __future__ import annotations

import functools
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from ci import ctools

TOKENS = [1, 84, 104, 101, 32, 99, 97, 116]
N_STEPS = 32


# the device library is chosen once per process, at the first device.default(): set it before any load
_LIB = ctools.build("null_device.c", "libpi_null_device.so", ["-O2", "-shared", "-fPIC", "-fvisibility=hidden"])
if _LIB is not None:
    os.environ["PI_BACKEND_DEVICE_LIB"] = str(_LIB)


@functools.lru_cache(maxsize=None)
def model_path() -> Path:
    from pi_backend.model.factory import write_llama_model, write_skewed_activation_stats

    d = Path(tempfile.mkdtemp(prefix="pi_bench_host_"))
    fm = write_llama_model(d / "m.powerinfer.gguf", n_embd=256, n_ff=1024, n_layer=8, n_head=4, n_head_kv=2,
                           ffn_act="reglu", powerinfer=True, predictor_rank=64, weight_type="f16", seed=5,
                           vocab="byte")
    write_skewed_activation_stats(d, n_layer=8, n_ff=1024, seed=2)
    return fm.path


@functools.lru_cache(maxsize=None)
def model(path_kind: str):
    import pi_backend
    from pi_backend.placement import CostModel

    if path_kind == "cpu":
        return pi_backend.load(model_path(), device="cpu", n_ctx=256, n_threads=1)
    m = pi_backend.load(model_path(), device="gpu", vram_budget=1.0, n_ctx=256, n_threads=1, reset_gpu_index=True,
                        placement_cost=CostModel.cpu_standin(sync_s=0))
    assert m.device_layers is not None and len(m.device_layers.layers) == 8, "every layer on the device"
    return m


YARDSTICK_CALLS = 1000
ROUNDS = 15


def _yardstick(dev) -> float:
    """Seconds for YARDSTICK_CALLS Python calls, each around one C call of the library (pi_dev_sync)."""
    sync, null = dev.lib.pi_dev_sync, dev.ffi.NULL

    def call(i):
        return sync(null) + i

    t0 = time.perf_counter()
    for i in range(YARDSTICK_CALLS):
        call(i)
    return time.perf_counter() - t0


def _steps(m) -> float:
    """Seconds for N_STEPS decode steps after a fresh prompt."""
    m.reset()
    m.forward(TOKENS)
    t0 = time.perf_counter()
    for t in range(N_STEPS):
        m.forward([13 + t])
    return time.perf_counter() - t0


def test_device_host_side_by_side(benchmark):
    """The device path's decode steps and the yardstick in alternation, round after round (this VM's
    speed for Python jumps by half between runs, and both move with it); the CPU engine's steps too."""
    if _LIB is None:
        pytest.skip("no C compiler for the no-op device library")
    from pi_backend.native import device

    dev, m, cpu = device.default(), model("device"), model("cpu")
    runs = {"device": lambda: _steps(m), "yardstick": lambda: _yardstick(dev)}
    times: dict[str, list[float]] = {name: [] for name in runs}

    def run():
        for f in runs.values():  # warm-up
            f()
        for r in range(ROUNDS):  # the one that goes first alternates
            for name in list(runs)[:: 1 if r % 2 else -1]:
                times[name].append(runs[name]())
        times["cpu"] = [_steps(cpu) for _ in range(5)]

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(times=times, bytes=0.0)


def metrics(median, bytes_of, extra) -> dict[str, float]:
    t = extra("test_device_host_side_by_side")["times"]
    per_layer = [d / N_STEPS / 8 for d in t["device"]]
    # per round: 1000 yardstick calls over one layer of the device path's host time (~4.4 here: a layer
    # costs about as much as 230 such calls)
    ratios = [y / YARDSTICK_CALLS * 1000 / p for y, p in zip(t["yardstick"], per_layer)]
    return {"yardstick_1000_calls_vs_device_host_layer": float(np.median(ratios)),
            "info.device_host_us_per_layer": float(np.median(per_layer)) * 1e6,
            "info.cpu_us_per_layer": float(np.median(t["cpu"])) / N_STEPS / 8 * 1e6}


GOALS: dict[str, float] = {}
