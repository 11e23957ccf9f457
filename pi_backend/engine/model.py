"""The transformer, in one readable pass (llama2.c's shape: config, weights, run state, forward).

Weights are zero-copy views of the GGUF file; every op (matrix products, attention over the KV cache,
norms, RoPE) runs in the native kernels. The FFN of each layer is a SparseFFN (ffn.py): active-set rule,
hot and cold partitions, executors. A one-token step on the CPU is the same ops chained in C
(pi_backend.native.decode) where that computes the same: the pass here is their reference.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from pi_backend import native
from pi_backend.engine.executors import CpuExecutor, CpuThreadExecutor, gpu_available, gpu_executor, gpu_free_bytes
from pi_backend.engine.falcon import forward_falcon
from pi_backend.engine.ffn import MODES, RELU_FAMILY, SparseFFN
from pi_backend.engine.weights import Weights, load_weights, regroup_q4_0
from pi_backend.model.config import ModelConfig
from pi_backend.model.gguf_file import GGUFFile
from pi_backend.native.decode import DecodeLayer, DecodeStep

if TYPE_CHECKING:
    from pi_backend.placement import CostModel

DEVICES = ("auto", "gpu", "cpu")
KV_TYPES = {"f16": np.float16, "f32": np.float32}


@dataclass
class EngineOptions:
    mode: str | None = None            # sparse | dense | oracle | threshold; None: the file's natural mode
    n_threads: int = 0                 # 0: pi_backend's default (the CPUs this process may use)
    n_ctx: int = 2048                  # KV cache length
    ffn_act: str | None = None         # override the FFN activation (dense ReLU files from PowerInfer's tools)
    threshold: float | None = None     # override every layer's predictor / threshold-mode cut
    thresholds: Sequence[float] | None = None  # per-layer override
    hot_neurons: Sequence[np.ndarray] | None = None  # per-layer hot index sets (placement output)
    vram_budget: float | None = None   # GiB for the GPU partition; on a CPU-only machine: for its stand-in
    activation_dir: str | None = None  # activation statistics to place by (default <model dir>/activation)
    reset_gpu_index: bool = False      # re-solve the placement instead of reading its cache
    disable_gpu_index: bool = False    # no FFN split: only dense blocks offloaded
    device: str = "auto"               # hot partition on: auto (GPU if any, else CPU stand-in) | gpu | cpu
    overlap: bool = True               # CPU stand-in: run the hot partition concurrently with the cold one
    hot_threads: int = 1               # threads of the CPU stand-in (the cold partition gets the rest)
    placement_cost: CostModel | None = None  # the placement's cost model (default: GPU, or the CPU stand-in)
    use_mmap: bool = True              # False: weights read into private memory (llama.cpp's --no-mmap)
    kv_type: str = "f16"               # KV cache element type: f16 (llama.cpp's default) | f32
    repack: bool = True                # Q4_0 matrices read by dot products regrouped as Q4_0X16 where faster
    batch_neurons: str = "token"       # sparse batches: each token its own predicted set | the batch's union
    native_decode: bool = True         # one-token steps as one native call where it computes the same (decode.py)

    def __post_init__(self):
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"mode: unknown mode {self.mode!r}; expected one of {MODES}")
        if self.n_ctx < 1:
            raise ValueError(f"n_ctx: must be >= 1, got {self.n_ctx}")
        if self.device not in DEVICES:
            raise ValueError(f"device: unknown device {self.device!r}; expected one of {DEVICES}")
        if self.batch_neurons not in ("token", "union"):
            raise ValueError(f"batch_neurons: expected 'token' or 'union', got {self.batch_neurons!r}")
        if self.kv_type not in KV_TYPES:
            raise ValueError(f"kv_type: unknown KV cache type {self.kv_type!r}; expected one of {sorted(KV_TYPES)}")
        if not 1 <= self.hot_threads <= native.lib.PI_MAX_THREADS:
            raise ValueError(f"hot_threads: must be in [1, {native.lib.PI_MAX_THREADS}], got {self.hot_threads}")


def default_mode(cfg: ModelConfig) -> str:
    if cfg.has_predictors and cfg.ffn_act in RELU_FAMILY:
        return "sparse"
    if cfg.ffn_act in RELU_FAMILY:
        return "oracle"  # exact and free for ReLU models: silent neurons are skipped in the kernel
    if cfg.layer_sparse_thresholds is not None:
        return "threshold"  # a SiLU file calibrated by `pi-backend calibrate-threshold`
    return "dense"


@dataclass
class RunState:
    """The KV cache and how much of it is filled.

    Head-major, [n_layer, n_head_kv, n_ctx, head_dim] (pi_attention's layout): a decode step reads each
    head's positions as one contiguous run. Position-major rows put a head's consecutive positions a
    whole row (n_head_kv * head_dim elements) apart, and at long contexts those strided reads cost
    more than the attention's arithmetic. Outside this class (saved states, the device) the cache
    travels position-major, [n_layer, n_pos, n_head_kv, head_dim]."""

    k: np.ndarray  # float16 or float32 (EngineOptions.kv_type)
    v: np.ndarray
    n_past: int = 0

    def write(self, li: int, p0: int, k: np.ndarray, v: np.ndarray) -> None:
        """k, v [T, n_head_kv, head_dim] (float32) into layer li's positions p0 .. p0 + T - 1"""
        native.kv_store(self.k[li], p0, np.ascontiguousarray(k, np.float32))
        native.kv_store(self.v[li], p0, np.ascontiguousarray(v, np.float32))

    def positions(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of positions 0 .. n - 1 of every layer, position-major"""
        return (np.ascontiguousarray(self.k[:, :, :n].transpose(0, 2, 1, 3)),
                np.ascontiguousarray(self.v[:, :, :n].transpose(0, 2, 1, 3)))

    def positions_shape(self, n: int) -> tuple[int, ...]:
        n_layer, n_head_kv, _, d = self.k.shape
        return (n_layer, n, n_head_kv, d)

    def set_positions(self, k: np.ndarray, v: np.ndarray) -> None:
        """The inverse of positions(): k, v [n_layer, n, n_head_kv, head_dim]"""
        n = k.shape[1]
        self.k[:, :, :n] = k.transpose(0, 2, 1, 3)
        self.v[:, :, :n] = v.transpose(0, 2, 1, 3)


@dataclass
class GenerationResult:
    tokens: list[int]
    text: str
    n_prompt: int
    prefill_seconds: float
    decode_seconds: float
    ffn_computed_fraction: float
    ffn_listed_fraction: float
    per_layer_computed: list[float] = field(default_factory=list)

    @property
    def prefill_tps(self) -> float:
        return self.n_prompt / self.prefill_seconds if self.prefill_seconds else float("nan")

    @property
    def decode_tps(self) -> float:
        n = len(self.tokens) - 1  # the first generated token comes from the prefill's logits
        return n / self.decode_seconds if n > 0 and self.decode_seconds else float("nan")


class Model:
    def __init__(self, path: str | os.PathLike, **options):
        self.options = EngineOptions(**options)
        self.path = os.fspath(path)
        self.gguf = GGUFFile.open(self.path)
        try:
            if self.options.use_mmap:
                self.gguf.prefetch()
            else:
                self.gguf.read_into_memory()
            self.config = ModelConfig.from_gguf(self.gguf, ffn_act=self.options.ffn_act)
            self.weights: Weights = load_weights(self.gguf, self.config)
            if self.options.repack:
                regroup_q4_0(self.gguf, self.weights, self.options.n_threads)
        except Exception:
            self.gguf.close()
            raise
        cfg = self.config
        self.mode = self.options.mode or default_mode(cfg)
        self.n_ctx = min(self.options.n_ctx, cfg.n_ctx_train) if cfg.n_ctx_train else self.options.n_ctx
        self.n_threads = self.options.n_threads
        self.use_gpu = self.options.device == "gpu" or (self.options.device == "auto" and gpu_available())
        if self.options.device == "gpu" and not gpu_available():
            gpu_executor()  # raises GpuUnavailableError saying why
        self.placement = None  # pi_backend.placement.Placement, when a budget (or a GPU) asks for one
        self.hot_neurons = self.options.hot_neurons
        if self.hot_neurons is None:
            self.placement = self._place()
            if self.placement is not None and self.placement.has_split:
                self.hot_neurons = self.placement.hot
        self.hot_executor, self.cold_executor = self._executors()
        self.device_layers = None  # DeviceLayers: the dense blocks the placement put on the GPU
        per_token = self.options.batch_neurons == "token"
        self.ffn = [SparseFFN(i, lw, cfg.ffn_act, self.mode, self._layer_threshold(i),
                              self._hot_mask(i), self.hot_executor, self.cold_executor, self.n_threads,
                              per_token=per_token)
                    for i, lw in enumerate(self.weights.layers)]
        shape = (cfg.n_layer, cfg.n_head_kv, self.n_ctx, cfg.head_dim)  # head-major: RunState
        kv = KV_TYPES[self.options.kv_type]
        self.state = RunState(np.zeros(shape, kv), np.zeros(shape, kv))
        self._tokenizer = None
        self._decode = None  # (the FFN list and caches it was built from, their rules, DecodeStep or None)
        if self.use_gpu and self.placement is not None and cfg.arch != "falcon":
            self.device_layers = self._offload_dense()

    def _offload_dense(self):
        from pi_backend.engine.device_layers import DeviceLayers, offloaded_layers
        from pi_backend.engine.executors import DeviceExecutor

        layers, preds, output, kv = offloaded_layers(self.placement.dense_gpu, self.config.n_layer)
        if not layers:
            return None
        hot = self.hot_executor if isinstance(self.hot_executor, DeviceExecutor) else None
        dev = hot.dev if hot is not None else gpu_executor().dev
        return DeviceLayers(self, dev, layers, preds, output, kv_on_device=kv, hot_rows=hot._layers if hot else None)

    # ---- set-up helpers
    def _layer_threshold(self, i: int) -> float:
        o = self.options
        if o.thresholds is not None:
            if len(o.thresholds) != self.config.n_layer:
                raise ValueError(f"thresholds: {len(o.thresholds)} values for {self.config.n_layer} layers")
            return float(o.thresholds[i])
        if o.threshold is not None:
            return float(o.threshold)
        if self.mode == "threshold" and self.config.layer_sparse_thresholds is None:
            raise ValueError("mode 'threshold' needs per-layer thresholds: pass threshold= / thresholds=, or "
                             "calibrate them with `pi-backend calibrate-threshold`")
        return self.config.threshold(i)

    def _place(self):
        """The placement: on a GPU machine always, on a CPU-only one when vram_budget is given."""
        o = self.options
        if o.vram_budget is None and not self.use_gpu:
            return None
        from pi_backend.placement import CostModel, plan_for_model

        if o.vram_budget is not None:
            budget = int(o.vram_budget * (1 << 30))
        else:  # PowerInfer's default: free VRAM - 256 MiB
            budget = max(0, (gpu_free_bytes() or 0) - (256 << 20))
        return plan_for_model(self.gguf, self.config, budget_bytes=budget, activation_dir=o.activation_dir,
                              reset=o.reset_gpu_index, disable_split=o.disable_gpu_index, n_ctx=self.n_ctx,
                              thresholds=[self._layer_threshold(i) for i in range(self.config.n_layer)],
                              cost=o.placement_cost or CostModel.for_device(self.use_gpu),
                              kv_bytes_per_value=np.dtype(KV_TYPES[o.kv_type]).itemsize)

    def _executors(self):
        """(hot, cold): the GPU executor or its CPU stand-in for the hot partition, the CPU pool for the cold."""
        o = self.options
        if self.hot_neurons is None:
            cold = CpuExecutor(self.n_threads)
            return cold, cold
        if self.use_gpu:
            hot, cold = gpu_executor(), CpuExecutor(self.n_threads)
        elif o.overlap:
            total = self.n_threads or native.get_num_threads()
            hot, cold = CpuThreadExecutor(o.hot_threads), CpuExecutor(max(1, total - o.hot_threads))
        else:
            hot = cold = CpuExecutor(self.n_threads)
        for i, lw in enumerate(self.weights.layers):
            hot.prepare(i, lw, self._hot_ids(i))
        return hot, cold

    def _hot_ids(self, i: int) -> np.ndarray:
        idx = np.asarray(self.hot_neurons[i], dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.config.n_ff):
            raise ValueError(f"hot_neurons: layer {i} names a neuron outside [0, {self.config.n_ff})")
        return np.unique(idx).astype(np.int32)

    def _hot_mask(self, i: int) -> np.ndarray | None:
        if self.hot_neurons is None:
            return None
        mask = np.zeros(self.config.n_ff, bool)
        mask[self._hot_ids(i)] = True
        return mask

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from pi_backend.engine.tokenizer import Tokenizer

            self._tokenizer = Tokenizer.from_gguf(self.gguf)
        return self._tokenizer

    @property
    def n_vocab(self) -> int:
        return self.weights.output.rows

    @property
    def n_past(self) -> int:
        return self.state.n_past

    def reset(self) -> None:
        self.state.n_past = 0

    def truncate(self, n: int) -> None:
        """Keep the first n positions of the KV cache (prefix reuse, rollback)."""
        if not 0 <= n <= self.state.n_past:
            raise ValueError(f"n: cannot keep {n} of {self.state.n_past} cached positions")
        self.state.n_past = n

    def save_state(self) -> dict:
        """A copy of the filled part of the KV cache (llama-cpp-python's save_state)."""
        n = self.state.n_past
        k, v = self.state.positions(n)
        for li in self.device_layers.device_kv_layers() if self.device_layers else ():
            k[li], v[li] = self.device_layers.kv(li, n)
        return {"n_past": n, "k": k, "v": v}

    def load_state(self, saved: dict) -> None:
        n = int(saved["n_past"])
        k, v = saved["k"], saved["v"]
        if not 0 <= n <= self.n_ctx or getattr(k, "shape", None) != self.state.positions_shape(n) \
                or getattr(v, "shape", None) != k.shape:
            raise ValueError(f"state: does not fit this model (n_past {n}, k {getattr(k, 'shape', None)})")
        self.state.set_positions(k, v)
        for li in self.device_layers.device_kv_layers() if self.device_layers else ():
            self.device_layers.set_kv(li, k[li], v[li])
        self.state.n_past = n

    def close(self) -> None:
        if self.device_layers is not None:
            self.device_layers.close()
        self.hot_executor.close()
        self.cold_executor.close()
        self.gguf.close()

    # ---- the forward pass
    def forward(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Run tokens at positions n_past.. and append them to the KV cache.
        Returns logits [len(tokens), n_vocab] if all_logits else [1, n_vocab] for the last token."""
        cfg, w, st = self.config, self.weights, self.state
        ids = np.asarray(tokens, dtype=np.int32).reshape(-1)
        T = ids.size
        if T == 0:
            raise ValueError("tokens: empty")
        if ids.min() < 0 or ids.max() >= w.token_embd.rows:
            raise ValueError(f"tokens: id outside [0, {w.token_embd.rows})")
        if st.n_past + T > self.n_ctx:
            raise ValueError(f"tokens: {st.n_past} cached + {T} new exceeds the context of {self.n_ctx}")
        if T == 1 and (step := self._decode_step()) is not None:
            logits, counts = step(int(ids[0]), st.n_past, n_threads=self.n_threads)
            st.n_past += 1
            for f, (listed, skipped) in zip(self.ffn, counts.tolist()):
                f.stats.record(listed, listed - skipped)
            return logits
        pos = np.arange(st.n_past, st.n_past + T, dtype=np.int32)
        if cfg.arch == "falcon":  # LayerNorm, fused QKV, parallel attention + FFN, NeoX RoPE
            return forward_falcon(self, ids, pos, all_logits)
        nt = self.n_threads
        x = native.dequantize_rows(w.token_embd, ids)  # the residual stream [T, n_embd]
        dl = self.device_layers
        xd = None  # the residual stream while it is on the device (offloaded layers)
        for li, lw in enumerate(w.layers):
            if dl is not None and li in dl.layers:
                xd = dl.upload(x) if xd is None else xd
                dl.attention(li, xd, st.n_past)
                dl.ffn(li, xd)
                continue
            if xd is not None:
                x, xd = dl.download(xd), None
            h = native.rmsnorm(x, lw.attn_norm, cfg.norm_eps)
            q = native.gemm(lw.wq, h, n_threads=nt).reshape(T, cfg.n_head, cfg.head_dim)
            k = native.gemm(lw.wk, h, n_threads=nt).reshape(T, cfg.n_head_kv, cfg.head_dim)
            v = native.gemm(lw.wv, h, n_threads=nt).reshape(T, cfg.n_head_kv, cfg.head_dim)
            native.rope(q, pos, cfg.rope_dim, cfg.rope_freq_base)
            native.rope(k, pos, cfg.rope_dim, cfg.rope_freq_base)
            st.write(li, st.n_past, k, v)
            att = self._attention(q, li, st.n_past)
            x = x + native.gemm(lw.wo, att, n_threads=nt)
            ffn_in = native.rmsnorm(x, lw.ffn_norm, cfg.norm_eps)
            x = x + self.ffn[li](x, ffn_in)
        st.n_past += T
        if xd is not None:
            if dl.output is not None:
                return dl.logits(xd if all_logits else xd.rows(T - 1, T))
            x = dl.download(xd)
        last = x if all_logits else x[-1:]
        return native.gemm(w.output, native.rmsnorm(np.ascontiguousarray(last), w.output_norm, cfg.norm_eps),
                           n_threads=nt)

    def _decode_step(self) -> DecodeStep | None:
        """The one-call native decode step, where it computes exactly what the pass below does for one
        token: llama layers all on the CPU, every FFN a plain SparseFFN on the fused kernel (no hot
        partition, not dense mode's explicit path, not wrapped by the tools that observe FFN calls).
        Built on first use from the FFN list and caches of the moment; rebuilt if either is replaced or
        a layer's mode, threshold or partition changes (a few us a step, against ~15 crossings a layer)."""
        key = (self.ffn, self.state.k, self.state.v)
        rules = [(f.mode, f.threshold, f.hot_mask is None) if type(f) is SparseFFN else None for f in self.ffn]
        if self._decode is not None and all(a is b for a, b in zip(self._decode[0], key)) \
                and self._decode[1] == rules:
            return self._decode[2]
        step = None
        if self.options.native_decode and self.config.arch != "falcon" and self.device_layers is None and all(
                type(f) is SparseFFN and f.hot_mask is None and f.mode != "dense" and f.weights.down_t is not None
                for f in self.ffn):
            step = self._build_decode_step()
        self._decode = (key, rules, step)
        return step

    def _build_decode_step(self) -> DecodeStep:
        cfg, w, st = self.config, self.weights, self.state
        layers = []
        for i, (lw, f) in enumerate(zip(w.layers, self.ffn)):
            sparse = f.mode == "sparse"
            layers.append(DecodeLayer(
                lw.attn_norm, lw.wq, lw.wk, lw.wv, lw.wo, lw.ffn_norm, lw.gate, lw.up, lw.down_t, st.k[i], st.v[i],
                fc1=lw.fc1 if sparse else None, fc2=lw.fc2 if sparse else None,
                threshold=f.threshold if sparse else 0.0,
                skip_threshold=f.threshold if f.mode == "threshold" else 0.0))
        return DecodeStep(w.token_embd, w.output, w.output_norm, layers, n_head=cfg.n_head, n_head_kv=cfg.n_head_kv,
                          n_rot=cfg.rope_dim, rope_freq_base=cfg.rope_freq_base, norm_eps=cfg.norm_eps,
                          act=cfg.ffn_act)

    def _attention(self, q: np.ndarray, li: int, n_past: int) -> np.ndarray:
        """Causal grouped-query attention of q [T, n_head, d] at positions n_past .. over layer li's
        cache (its positions up to n_past + T - 1 written): the native op."""
        return native.attention(np.ascontiguousarray(q), self.state.k[li], self.state.v[li], n_past,
                                n_threads=self.n_threads)

    # ---- generation
    def stream(self, prompt: str | Sequence[int], max_tokens: int = 64, temperature: float = 0.0,
               top_k: int = 40, top_p: float = 0.95, seed: int | None = None,
               stop_at_eos: bool = True) -> Iterator[int]:
        """Yield generated token ids (greedy at temperature 0). Starts from an empty cache."""
        tokens = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        rng = np.random.default_rng(seed)
        self.reset()
        logits = self.forward(tokens)[-1]
        for _ in range(max_tokens):
            tok = sample(logits, temperature, top_k, top_p, rng)
            yield tok
            if stop_at_eos and self._tokenizer is not None and tok == self._tokenizer.eos:
                return
            if self.state.n_past >= self.n_ctx:
                return
            logits = self.forward([tok])[-1]

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 64,
                 on_text: Callable[[str], None] | None = None, **sampling) -> GenerationResult:
        """Generate, timing prefill and decode separately and measuring the FFN's sparsity."""
        prompt_tokens = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        for f in self.ffn:
            f.stats.reset()
        out: list[int] = []
        t0 = time.perf_counter()
        t_first = None
        printed = b""
        for tok in self.stream(prompt_tokens, max_tokens, **sampling):
            if t_first is None:
                t_first = time.perf_counter()
            out.append(tok)
            if on_text is not None:  # emit only whole UTF-8 characters
                data = self.tokenizer.decode_bytes(out)
                try:
                    text = data.decode("utf-8")
                    on_text(text[len(printed.decode("utf-8")):])
                    printed = data
                except UnicodeDecodeError:
                    pass
        t_end = time.perf_counter()
        t_first = t_first or t_end
        stats = [f.stats for f in self.ffn]
        total = sum(s.calls * s.n_ff for s in stats) or 1
        return GenerationResult(
            tokens=out, text=self.tokenizer.decode(out), n_prompt=len(prompt_tokens),
            prefill_seconds=t_first - t0, decode_seconds=t_end - t_first,
            ffn_computed_fraction=sum(s.computed for s in stats) / total,
            ffn_listed_fraction=sum(s.listed for s in stats) / total,
            per_layer_computed=[s.computed_fraction for s in stats])


def sample(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if 0 < top_k < z.size:
        z[z < np.partition(z, -top_k)[-top_k]] = -np.inf
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        keep = np.cumsum(p[order]) - p[order] < top_p
        mask = np.zeros_like(p, bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0)
        p /= p.sum()
    return int(rng.choice(p.size, p=p))


def load(path: str | os.PathLike, **options) -> Model:
    """Open a GGUF or PowerInfer GGUF model. Options: see EngineOptions."""
    return Model(path, **options)
