"""The cost model the placement optimises: how long a layer's FFN takes on each side per token.

Decode is bandwidth-bound, so time = bytes read / throughput:
  GPU part  G_l(k) = (activation mass of the k hot neurons) x neuron bytes / gpu_bytes_per_s
                     + the hidden state's round trip (2 x n_embd f32) / transfer_bytes_per_s
  CPU part  C_l(k) = (activation mass of the cold neurons) x neuron bytes / cpu_bytes_per_s
  layer     T_l(k) = max(G_l, C_l) + sync_s when both parts have work (they run overlapped)

"Activation mass" is the expected number of neurons that fire per token (the sum of the
frequencies), so k hot neurons of high frequency serve much more than k/n_ff of the work.

The defaults describe a desktop GPU over PCIe 4 and one socket of DDR5; `measure_cpu_bytes_per_s`
measures this machine's streaming read. `cpu_standin` describes the CPU-only hybrid, where the "GPU"
partition is a second CPU thread: both sides then read at the same per-thread speed.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["CostModel", "measure_cpu_bytes_per_s"]


@dataclass(frozen=True)
class CostModel:
    gpu_bytes_per_s: float = 600e9       # effective sparse-kernel read rate of a consumer GPU
    cpu_bytes_per_s: float = 25e9        # this class of machine: ~24 GB/s streaming on one thread
    transfer_bytes_per_s: float = 25e9   # PCIe 4.0 x16
    sync_s: float = 20e-6                # one host<->device synchronisation (or thread hand-off) per layer

    def __post_init__(self):
        for name, value in asdict(self).items():
            if not (isinstance(value, (int, float)) and value >= 0 and not math.isnan(value)):
                raise ValueError(f"{name}: must be a number >= 0, got {value!r}")
        for name in ("gpu_bytes_per_s", "cpu_bytes_per_s", "transfer_bytes_per_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0")

    @classmethod
    def cpu_standin(cls, cpu_bytes_per_s: float = 20e9, sync_s: float = 20e-6) -> "CostModel":
        """The CPU-only hybrid: one thread per partition, nothing crosses a bus (the worker-thread
        hand-off measured ~16 us per layer on the 2-core CI machine)."""
        return cls(gpu_bytes_per_s=cpu_bytes_per_s, cpu_bytes_per_s=cpu_bytes_per_s,
                   transfer_bytes_per_s=math.inf, sync_s=sync_s)

    @classmethod
    def for_device(cls, gpu: bool) -> "CostModel":
        """The default for where the hot partition runs: a GPU, or the CPU stand-in."""
        return cls() if gpu else cls.cpu_standin()

    def transfer_s(self, n_embd: int) -> float:
        """The per-layer round trip of the hidden state (input to the device, partial sum back)."""
        return 2 * n_embd * 4 / self.transfer_bytes_per_s

    def key(self) -> str:
        """A stable text form (2 significant digits) for cache keys: a re-measured bandwidth that moved
        by noise must not invalidate a cached placement."""
        return ",".join(f"{k}={v:.2g}" for k, v in asdict(self).items())


def measure_cpu_bytes_per_s(nbytes: int = 64 << 20, repeats: int = 3) -> float:
    """Streaming read rate of one thread (numpy reduction over a buffer larger than the caches)."""
    a = np.ones(nbytes // 4, np.float32)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best
