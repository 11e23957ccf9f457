"""The host's share of a GPU decode step, on any machine: the engine's device path (DeviceLayers: every
dense block, the KV cache, the predictor and the hot partition on the "device") driven against a
device library that does no device work (ci/tools/null_device.c, built here with the C compiler), so
what is timed is the Python and the C calls between the kernels, plus the CPU's small cold partition.
That share is what a small or well-offloaded model waits for on a real GPU, and the GPU suites never
run in CI: this one guards it.

Tracked: the CPU engine's decode step on the same model divided by the device path's host time, both
measured in this run (higher is better). The model is small (8 layers, n_embd 256), so the CPU step is
itself mostly Python: the ratio moves when either path adds work per layer.
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
TOKENS = [1, 84, 104, 101, 32, 99, 97, 116]
N_STEPS = 32


def _null_library() -> Path | None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    out = Path(tempfile.mkdtemp(prefix="pi_null_device_")) / "libpi_null_device.so"
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-fvisibility=hidden", "-o", str(out),
                    str(HERE / "tools" / "null_device.c")], check=True)
    return out


# the device library is chosen once per process, at the first device.default(): set it before any load
_LIB = _null_library()
if _LIB is not None:
    os.environ["PI_BACKEND_DEVICE_LIB"] = str(_LIB)


@functools.lru_cache(maxsize=None)
def model_path() -> Path:
    from pi_backend.model.activation_stats import save_activation_tensor
    from pi_backend.model.factory import write_llama_model

    d = Path(tempfile.mkdtemp(prefix="pi_bench_host_"))
    fm = write_llama_model(d / "m.powerinfer.gguf", n_embd=256, n_ff=1024, n_layer=8, n_head=4, n_head_kv=2,
                           ffn_act="reglu", powerinfer=True, predictor_rank=64, weight_type="f16", seed=5,
                           vocab="byte")
    (d / "activation").mkdir()
    rng = np.random.default_rng(2)
    for i in range(8):
        save_activation_tensor(d / "activation" / f"activation_{i}.pt", rng.beta(0.3, 3.0, 1024).astype(np.float32))
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


@pytest.mark.parametrize("path_kind", ["cpu", "device"])
def test_decode_host_time(benchmark, path_kind):
    if _LIB is None:
        pytest.skip("no C compiler for the no-op device library")
    m = model(path_kind)

    def prefill():
        m.reset()
        m.forward(TOKENS)

    def steps():
        for t in range(N_STEPS):
            m.forward([13 + t])

    benchmark.pedantic(steps, setup=prefill, rounds=15, warmup_rounds=2)
    benchmark.extra_info.update(bytes=0.0, path=path_kind)


def metrics(median, bytes_of) -> dict[str, float]:
    cpu, dev = median("test_decode_host_time[cpu]"), median("test_decode_host_time[device]")
    return {"cpu_step_vs_device_host_step": cpu / dev,
            "info.device_host_us_per_layer": dev / N_STEPS / 8 * 1e6,
            "info.cpu_us_per_layer": cpu / N_STEPS / 8 * 1e6}


GOALS: dict[str, float] = {}
