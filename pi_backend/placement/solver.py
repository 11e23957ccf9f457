"""The placement solver: which dense blocks and which FFN neurons live on the GPU, under a byte budget.

1. Dense blocks, in PowerInfer's priority order (attention of layers 0..L-1, predictors, norms, output
   head, then the KV cache -- the cache only when every other dense block is already on the GPU), as a
   prefix: the first block that does not fit stops the dense offload.
2. The rest of the budget goes to hot neurons. Within a layer all neurons cost the same bytes, so the
   hot set of a layer is always its k most frequent neurons; the solver picks the k_l. It minimises
   the modelled per-token FFN time sum_l T_l(k_l) (cost.py) subject to sum_l k_l * bytes_l <= budget:
   - while a layer is CPU-bound (C_l > G_l), each hot neuron saves freq * bytes / cpu_rate, so the
     greedy takes neurons globally by activation mass per byte. The optimum of this (separable,
     concave-gain) knapsack is a threshold lambda on mass-per-byte: every layer stops at the same
     marginal value, which is the cross-layer balance that minimises the sum;
   - a layer stops at its GPU/CPU crossover, where the overlapped GPU part would become the slower
     one: past it a hot neuron makes the layer slower (the per-layer balance term);
   - neurons of equal value are shared out evenly, layers with the most cold time first (a plain sort
     would hand a tie to whichever layer comes first);
   - a layer whose split would not save more than the synchronisation costs is left whole on the CPU;
   - spare budget completes whole layers when that beats the overlapped split (no CPU part, no sync);
   - balance > 0 adds balance * n_layer * max_l T_l to the objective: an explicit minimax on the
     slowest layer, solved by scanning a cap tau on every layer's time (off by default: with layers
     run one after another, the sum is what a token costs).
   lambda is found by bisection over its float bit pattern (exact in <= 64 steps), each step one
   numpy searchsorted over all layers at once; the only O(N log N) work is one sort of the statistics.
3. sum of placed bytes <= budget is asserted, and any budget -- even zero -- yields a plan with
   messages, never an exception.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from pi_backend.placement.cost import CostModel
from pi_backend.placement.sizes import ModelSizes

__all__ = ["Placement", "PlacementError", "solve_placement", "stats_matrix", "KV_POLICIES"]

log = logging.getLogger("pi_backend.placement")
KV_POLICIES = ("auto", "cpu")
GiB = float(1 << 30)
MiB = float(1 << 20)


class PlacementError(ValueError):
    """Statistics or a cache that do not fit the model."""


@dataclass
class Placement:
    """Where everything goes. `hot[l]`: sorted int32 neuron ids of layer l held by the GPU partition."""

    budget_bytes: int
    n_ff: int
    neuron_bytes: np.ndarray              # int64 [n_layer]
    hot: list[np.ndarray]
    dense_gpu: tuple[str, ...] = ()       # DenseBlock names offloaded
    dense_bytes: int = 0
    layer_mass: np.ndarray | None = None  # float64 [n_layer]: expected active neurons per token
    hot_mass: np.ndarray | None = None    # float64 [n_layer]: the part of it on the GPU
    gpu_seconds: np.ndarray | None = None  # modelled per-token time of each partition
    cpu_seconds: np.ndarray | None = None
    cpu_only_seconds: np.ndarray | None = None
    messages: list[str] = field(default_factory=list)
    source: str = "solver"                # solver | cache | powerinfer-gpuidx | none
    solve_seconds: float = 0.0
    meta: dict = field(default_factory=dict)  # provenance (hashes, threshold, parameters)

    @property
    def n_layer(self) -> int:
        return len(self.hot)

    @property
    def hot_counts(self) -> np.ndarray:
        return np.array([h.size for h in self.hot], np.int64)

    @property
    def hot_bytes(self) -> np.ndarray:
        return self.hot_counts * self.neuron_bytes

    @property
    def total_bytes(self) -> int:
        return int(self.dense_bytes + self.hot_bytes.sum())

    @property
    def has_split(self) -> bool:
        return bool(self.hot_counts.any())

    @property
    def served_fraction(self) -> float:
        """Share of all activation mass (fired neurons per token) served by the GPU partition."""
        if self.layer_mass is None or self.hot_mass is None or self.layer_mass.sum() == 0:
            return float("nan")
        return float(self.hot_mass.sum() / self.layer_mass.sum())

    def masks(self) -> list[np.ndarray]:
        out = []
        for h in self.hot:
            m = np.zeros(self.n_ff, bool)
            m[h] = True
            out.append(m)
        return out

    def check_budget(self) -> None:
        """The invariant, checked on every plan (also under python -O)."""
        if self.total_bytes > self.budget_bytes:
            raise AssertionError(f"placement uses {self.total_bytes} bytes of a {self.budget_bytes}-byte budget")


def stats_matrix(stats, n_layer: int, n_ff: int) -> np.ndarray:
    """Per-layer activation statistics as float32 [n_layer, n_ff] frequencies in [0, 1].

    Counts (any value > 1) are scaled by the largest one: only the ratios matter to the ranking, and
    the cost model reads the scaled values as firing probabilities."""
    rows = list(stats)  # an [n_layer, n_ff] array or a sequence of per-layer arrays
    if len(rows) != n_layer:
        raise PlacementError(f"statistics: {len(rows)} layers for a model of {n_layer}")
    F = np.empty((n_layer, n_ff), np.float32)
    for i, r in enumerate(rows):
        r = np.asarray(r, dtype=np.float32).reshape(-1)
        if r.shape != (n_ff,):
            raise PlacementError(f"statistics: layer {i} has {r.size} values, the model has n_ff = {n_ff}")
        F[i] = r
    if not np.isfinite(F).all() or (F < 0).any():
        raise PlacementError("statistics: values must be finite and >= 0")
    top = float(F.max()) if F.size else 0.0
    if top > 1.0:
        F /= top
    return F


def solve_placement(stats, sizes: ModelSizes, budget_bytes: int, cost: CostModel | None = None, *,
                    balance: float = 0.0, kv_cache: str = "auto", split_ffn: bool = True) -> Placement:
    """Place dense blocks and hot neurons under `budget_bytes` (see the module docstring).

    stats: per-layer activation frequencies (a list of n_layer arrays of n_ff, numeric layer order, or
    an [n_layer, n_ff] array); sizes: ModelSizes; cost: CostModel (default: a consumer GPU);
    kv_cache: "auto" (PowerInfer: only if every other dense block is offloaded, before the neurons) or
    "cpu" (never); split_ffn: False places dense blocks only (--disable-gpu-index)."""
    t0 = time.perf_counter()
    cost = cost or CostModel()
    if kv_cache not in KV_POLICIES:
        raise ValueError(f"kv_cache: expected one of {KV_POLICIES}, got {kv_cache!r}")
    if not (isinstance(balance, (int, float)) and balance >= 0):
        raise ValueError(f"balance: must be a number >= 0, got {balance!r}")
    budget = int(budget_bytes)
    if budget < 0:
        raise ValueError(f"budget_bytes: must be >= 0, got {budget_bytes!r}")
    F = stats_matrix(stats, sizes.n_layer, sizes.n_ff)

    dense, dense_bytes, messages = _place_dense(sizes, budget, kv_cache)
    remaining = budget - dense_bytes
    b = sizes.neuron_bytes
    model = _LayerModel(F, b, cost, sizes.n_embd)
    if split_ffn and remaining >= b.min():
        counts = model.solve(remaining, balance)
    else:
        counts = np.zeros(sizes.n_layer, np.int64)
        if not split_ffn:
            messages.append("FFN split disabled: every neuron runs on the CPU, only dense blocks are offloaded")
        elif remaining < b.min():
            messages.append(f"no room left for hot neurons ({remaining / MiB:.1f} MiB after the dense blocks, "
                            f"one neuron takes {b.min()} bytes): the FFN runs on the CPU")
    hot = _hot_ids(F, model.s_asc, counts)
    p = Placement(budget_bytes=budget, n_ff=sizes.n_ff, neuron_bytes=b.copy(), hot=hot, dense_gpu=dense,
                  dense_bytes=dense_bytes, messages=messages, source="solver")
    model.annotate(p, counts)
    p.check_budget()
    p.solve_seconds = time.perf_counter() - t0
    for m in messages:
        log.debug("placement: %s", m)
    return p


def _place_dense(sizes: ModelSizes, budget: int, kv_cache: str) -> tuple[tuple[str, ...], int, list[str]]:
    placed: list[str] = []
    used = 0
    messages: list[str] = []
    others = [blk for blk in sizes.dense if blk.kind != "kv_cache"]
    kv = [blk for blk in sizes.dense if blk.kind == "kv_cache"]
    stopped = None
    for blk in others:
        if used + blk.nbytes > budget:
            stopped = blk
            break
        placed.append(blk.name)
        used += blk.nbytes
    if stopped is None:
        for blk in kv:
            if kv_cache == "cpu":
                messages.append("KV cache kept on the CPU (kv_cache='cpu')")
            elif used + blk.nbytes <= budget:
                placed.append(blk.name)
                used += blk.nbytes
            else:
                messages.append(f"KV cache ({blk.nbytes / MiB:.0f} MiB) does not fit beside the dense blocks: kept on the CPU")
    else:
        need = sum(blk.nbytes for blk in others)
        done = {k: sum(1 for blk in others if blk.kind == k and blk.name in placed) for k in ("attention", "predictor")}
        total = {k: sum(1 for blk in others if blk.kind == k) for k in ("attention", "predictor")}
        what = ", ".join(f"{k} {done[k]}/{total[k]} layers" for k in total if total[k])
        if not placed:
            messages.append(f"VRAM budget {budget / GiB:.3g} GiB cannot hold even the first dense block "
                            f"({stopped.name}, {stopped.nbytes / MiB:.1f} MiB; all dense blocks: {need / GiB:.3g} GiB): "
                            "CPU-only plan for the dense part (what is left may still hold hot neurons)")
        else:
            messages.append(f"VRAM budget {budget / GiB:.3g} GiB cannot hold the dense blocks ({need / GiB:.3g} GiB): "
                            f"partly offloaded ({what}; stopped at {stopped.name}), KV cache on the CPU")
    return tuple(placed), used, messages


def _hot_ids(F: np.ndarray, s_asc: np.ndarray, k: np.ndarray) -> list[np.ndarray]:
    """The k[l] most frequent neurons of each layer, as sorted ids (ties at the boundary: lowest ids)."""
    L, n = F.shape
    out: list[np.ndarray] = [np.zeros(0, np.int32)] * L
    rows = np.flatnonzero((k > 0) & (k < n))
    for l in np.flatnonzero(k >= n):
        out[l] = np.arange(n, dtype=np.int32)
    if rows.size:
        kth = s_asc[rows, n - k[rows]]  # the k-th largest value of each row (rows sorted ascending)
        for j, l in enumerate(rows):
            mask = F[l] > kth[j]
            need = k[l] - np.count_nonzero(mask)
            if need:
                mask[np.flatnonzero(F[l] == kth[j])[:need]] = True
            out[l] = np.flatnonzero(mask).astype(np.int32)
    return out


class _LayerModel:
    """Sorted statistics, prefix masses and the per-layer time model, shared by every solve step.

    A neuron's value is its mass per byte, freq / bytes_l; "value > lambda" is evaluated as
    freq > lambda * bytes_l on the float32 frequencies, with every layer's sorted row packed into one
    int64 array (layer << 32 | float32 bits, monotone for values >= 0) so that one searchsorted call
    counts all layers at once, exactly."""

    def __init__(self, F: np.ndarray, neuron_bytes: np.ndarray, cost: CostModel, n_embd: int):
        L, n = F.shape
        self.L, self.n = L, n
        self.b = neuron_bytes.astype(np.int64)
        bf = self.b.astype(np.float64)
        self.bf = bf
        s = np.sort(F, axis=1)  # ascending
        self.s_asc = s
        self.P = np.zeros((L, n + 1))  # P[l, k]: mass of the k most frequent neurons
        np.cumsum(s[:, ::-1], axis=1, dtype=np.float64, out=self.P[:, 1:])
        self.M = self.P[:, -1].copy()
        self.row0 = np.arange(L, dtype=np.int64) << 32
        self.keys = (s.view(np.uint32).astype(np.int64) | self.row0[:, None]).reshape(-1)
        self.npos = self._count_gt(np.zeros(L))
        self.c_rate = bf / cost.cpu_bytes_per_s   # seconds per unit of mass
        self.g_rate = bf / cost.gpu_bytes_per_s
        self.x_t = cost.transfer_s(n_embd)
        self.sync = cost.sync_s
        # the GPU/CPU crossover: first k with G_l(k) >= C_l(k)
        target = (self.M * self.c_rate - self.x_t) / (self.c_rate + self.g_rate)
        self.cap = np.minimum(np.where(target > 0, self._prefix_at_least(target), 0), self.npos)

    def _prefix_at_least(self, mass: np.ndarray) -> np.ndarray:
        """Per layer, the smallest k with P[l, k] >= mass[l]."""
        return np.array([np.searchsorted(self.P[l], mass[l], "left") for l in range(self.L)], np.int64)

    def _count_gt(self, t: np.ndarray) -> np.ndarray:
        """Per layer, #{freq > t[l]} (t float64 >= 0): freq > t  <=>  freq > the largest float32 <= t."""
        t32 = t.astype(np.float32)
        t32 = np.where(t32.astype(np.float64) > t, np.nextafter(t32, np.float32(-1)), t32)
        q = self.row0 | np.maximum(t32, 0).view(np.uint32).astype(np.int64)
        return self.n - (np.searchsorted(self.keys, q, "right") - self.row0 // (1 << 32) * self.n)

    def _count_ge(self, t: np.ndarray) -> np.ndarray:
        """Per layer, #{freq >= t[l]}: freq >= t  <=>  freq >= the smallest float32 >= t."""
        t32 = t.astype(np.float32)
        t32 = np.where(t32.astype(np.float64) < t, np.nextafter(t32, np.float32(np.inf)), t32)
        q = self.row0 | t32.view(np.uint32).astype(np.int64)
        return self.n - (np.searchsorted(self.keys, q, "left") - self.row0 // (1 << 32) * self.n)

    # ---- time model
    def times(self, k: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        Pk = self.P[np.arange(self.L), k]
        g = Pk * self.g_rate + np.where(k > 0, self.x_t, 0.0)
        c = (self.M - Pk) * self.c_rate
        t = np.maximum(g, c) + np.where((k > 0) & (k < self.n), self.sync, 0.0)
        return g, c, t

    # ---- greedy by mass per byte above per-layer floors `lo`, below the crossover caps
    def greedy(self, budget: int, lo: np.ndarray) -> np.ndarray:
        lo = np.minimum(lo, self.cap)
        clip = lambda c: np.clip(c, lo, self.cap)  # noqa: E731
        spend = lambda k: int((k * self.b).sum())  # noqa: E731
        k0 = clip(self.npos)  # every neuron that ever fires, up to the caps
        if spend(k0) <= budget:
            return k0
        # bisection on the bit pattern of lambda >= 0: spend(lambda) is non-increasing in lambda
        lo_bits = 0                                                      # spend(0) > budget
        vmax = float((self.s_asc[:, -1] / self.bf).max()) * (1 + 1e-12)
        hi_bits = int(np.float64(vmax).view(np.int64))                  # nothing above: spend = spend(lo)
        while hi_bits - lo_bits > 1:
            mid = (lo_bits + hi_bits) // 2
            if spend(clip(self._count_gt(float(np.int64(mid).view(np.float64)) * self.bf))) <= budget:
                hi_bits = mid
            else:
                lo_bits = mid
        t = float(np.int64(hi_bits).view(np.float64)) * self.bf
        k = clip(self._count_gt(t))               # strictly above lambda: fits
        ties = clip(self._count_ge(t)) - k        # exactly lambda: share what is left evenly
        return k + self._share(ties, budget - spend(k), k)

    def _share(self, ties: np.ndarray, left: int, k: np.ndarray) -> np.ndarray:
        """Water-fill `left` bytes over the tied neurons of each layer: equal counts, then one more to
        the layers with the most cold time."""
        add = np.zeros(self.L, np.int64)
        if left <= 0 or not ties.any():
            return add
        lo, hi = 0, int(ties.max())
        while lo < hi:  # the largest level q with sum(min(ties, q) * b) <= left
            q = (lo + hi + 1) // 2
            if int((np.minimum(ties, q) * self.b).sum()) <= left:
                lo = q
            else:
                hi = q - 1
        add = np.minimum(ties, lo)
        left -= int((add * self.b).sum())
        _, cold, _ = self.times(k + add)
        for l in np.argsort(-cold, kind="stable"):
            if add[l] < ties[l] and self.b[l] <= left:
                add[l] += 1
                left -= int(self.b[l])
        return add

    def complete_layers(self, k: np.ndarray, budget: int) -> np.ndarray:
        """Spare budget: move whole layers to the GPU where that is faster than the split."""
        k = k.copy()
        left = budget - int((k * self.b).sum())
        full = np.full(self.L, self.n, np.int64)
        _, _, t_now = self.times(k)
        _, _, t_full = self.times(full)
        extra = (self.n - k) * self.b
        gain = (t_now - t_full) / np.maximum(extra, 1)
        for l in np.argsort(-gain, kind="stable"):
            if gain[l] > 0 and k[l] < self.n and extra[l] <= left:
                k[l] = self.n
                left -= int(extra[l])
        return k

    def solve(self, budget: int, balance: float) -> np.ndarray:
        zero = np.zeros(self.L, np.int64)
        k = self.greedy(budget, zero)
        for _ in range(4):  # a split that does not beat the layer's CPU-only time by the sync: undo it
            worse = (k > 0) & (k < self.n) & (self.times(k)[2] >= self.M * self.c_rate)
            if not worse.any():
                break
            self.cap[worse] = 0
            k = self.greedy(budget, zero)
        best = self.complete_layers(k, budget)
        if balance > 0:
            best = self._minimax(budget, balance, best)
        return best

    def objective(self, k: np.ndarray, balance: float) -> float:
        t = self.times(k)[2]
        return float(t.sum() + balance * self.L * t.max())

    def _minimax(self, budget: int, balance: float, start: np.ndarray) -> np.ndarray:
        """Scan a cap tau on every layer's CPU time: force each layer down to tau, spend the rest greedily."""
        best, best_j = start, self.objective(start, balance)
        t_start = self.times(start)[2]
        t_floor = self.times(self.cap)[2].max()  # no layer can go below its crossover time
        hi = float(t_start.max())
        if not hi > t_floor:
            return best
        for tau in np.linspace(t_floor, hi, 25)[:-1]:
            # smallest k with C_l(k) <= tau: mass left on the CPU <= tau / c_rate
            need = self.M - tau / self.c_rate
            lo = np.minimum(self._prefix_at_least(need), self.cap)
            if int((lo * self.b).sum()) > budget:
                continue
            k = self.complete_layers(self.greedy(budget, lo), budget)
            j = self.objective(k, balance)
            if j < best_j:
                best, best_j = k, j
        return best

    def annotate(self, p: Placement, k: np.ndarray) -> None:
        g, c, _ = self.times(k)
        p.layer_mass = self.M.copy()
        p.hot_mass = self.P[np.arange(self.L), k]
        p.gpu_seconds = np.where(k > 0, g, 0.0)
        p.cpu_seconds = c
        p.cpu_only_seconds = self.M * self.c_rate
