"""GPU model benchmark (issue 7): decode tokens/s of the 7B-shaped ReLU-LLaMA of ci/bench_engine.py
(F16 and Q4_0, 4 layers, rank-1024 predictors, ~90% sparsity) in three set-ups, side by side:

    cpu        every block on the CPU (device='cpu')
    hybrid     a VRAM budget of every dense block + about half the FFN bytes: dense blocks, KV cache and
               the hottest neurons on the GPU, the cold neurons on the CPU, overlapped
    dense_gpu  the same budget with the FFN split disabled (--disable-gpu-index): dense blocks on the
               GPU, every FFN neuron on the CPU

Activation statistics come from profiling the model on the CPU (oracle mode, exact for ReLU) over
random token windows, once per file, beside the cached model. Marked gpu: skipped without a device.
Run with `python -m ci.perf --suite gpu_model` (tracked: hybrid vs cpu, hybrid vs dense_gpu).
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

from ci.bench_engine import PROMPT, TYPES, _decode_steps, models
from pi_backend.native import device

pytestmark = pytest.mark.gpu
N_CTX = 512
SETUPS = ("cpu", "hybrid", "dense_gpu")


@pytest.fixture(autouse=True)
def _need_gpu():
    if not device.available():
        pytest.skip(f"no GPU: {device.why_unavailable()}")


def activation_dir(path: Path) -> Path:
    from pi_backend.tools.profile import profile_model

    out = path.parent / (path.name + ".activation")
    if not (out / "activation_0.pt").exists():
        rng = np.random.default_rng(0)
        windows = [[1] + rng.integers(3, 32000, 127).tolist() for _ in range(4)]
        profile_model(path, windows=windows, show_progress=False, out_dir=out, force=True).save(out)
    return out


def half_ffn_budget_gib(path: Path) -> float:
    from pi_backend.model.config import ModelConfig
    from pi_backend.model.gguf_file import GGUFFile
    from pi_backend.placement import ModelSizes

    with GGUFFile.open(path) as g:
        sizes = ModelSizes.from_gguf(g, ModelConfig.from_gguf(g), n_ctx=N_CTX)
    return (sizes.dense_bytes + sizes.ffn_bytes / 2) / (1 << 30)


@functools.lru_cache(maxsize=None)
def model(wtype: str, setup: str):
    import pi_backend

    path = models(wtype)[0]
    if setup == "cpu":
        return pi_backend.load(path, n_ctx=N_CTX, device="cpu")
    budget = half_ffn_budget_gib(path)
    return pi_backend.load(path, n_ctx=N_CTX, device="gpu", vram_budget=budget, activation_dir=activation_dir(path),
                           reset_gpu_index=True, disable_gpu_index=setup == "dense_gpu")


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("wtype", TYPES)
def test_decode(benchmark, wtype, setup):
    m = model(wtype, setup)

    def prefill():
        m.reset()
        m.forward(PROMPT)

    benchmark.pedantic(lambda: _decode_steps(lambda t: int(np.argmax(m.forward([t])[-1]))),
                       setup=prefill, rounds=5, warmup_rounds=1)
    p = m.placement
    benchmark.extra_info.update(
        bytes=0.0, setup=setup, device=device.default().name,
        dense_gpu=list(p.dense_gpu) if p is not None else [],
        offloaded_layers=sorted(m.device_layers.layers) if m.device_layers is not None else [],
        hot_fraction=float(p.hot_counts.sum() / (p.n_layer * p.n_ff)) if p is not None and p.has_split else 0.0,
        device_bytes=device.default().mem_used())


def metrics(median, bytes_of) -> dict[str, float]:
    from ci.bench_engine import N_DECODE

    out = {}
    for t in TYPES:
        s = {k: median(f"test_decode[{t}-{k}]") for k in SETUPS}
        out[f"hybrid_vs_cpu.{t}"] = s["cpu"] / s["hybrid"]
        out[f"hybrid_vs_dense_gpu.{t}"] = s["dense_gpu"] / s["hybrid"]
        for k in SETUPS:
            out[f"info.decode_tps_{k}.{t}"] = N_DECODE / s[k]
    return out


GOALS = {"hybrid_vs_cpu.*": 1.0, "hybrid_vs_dense_gpu.*": 1.0}
