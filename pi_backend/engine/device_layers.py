"""The dense blocks of offloaded layers on the GPU (issue 7, PowerInfer's dense offload).

For each layer the placement puts on the device (its attention block, with the norms and the KV cache;
its predictor when that fits too), the residual stream stays in device memory from one such layer to
the next. Per layer and step:

    device:  RMSNorm -> Q, K, V -> RoPE -> K and V into the layer's device KV cache (an f32 cache takes
             them straight from the GEMMs; an f16 one, the default, rounded by pi_dev_to_f16) ->
             attention -> Wo, added into the residual -> FFN norm -> predictor logits -> pi_dev_select:
             the active set split into hot local ids (stay on the device) and cold neuron ids
    copy back, then the layer's one synchronisation: the FFN input (n_embd floats per token), two
             counts and the cold index list (a compact list, never an n_ff-sized vector)
    then, overlapped: the hot partition's fused sparse FFN on the device (accumulating into the
             residual) while the CPU pool computes the cold partition; the cold partial sum is copied
             up and added on the stream, with no wait.

A batch (a prompt) under the per-token rule copies the predictor's logits back instead and thresholds
them on the host: the union is listed, and each token's own set goes with each partition as a mask
(pi_dev_sparse_ffn applies the hot one), so a prompt gives the logits of decoding it token by token,
as on the CPU.

When the KV cache did not fit (the placement puts it last, as PowerInfer), an offloaded layer keeps its
cache on the host: Q, K and V come back after RoPE, the attention runs on the CPU and its output goes
up again for Wo -- a second synchronisation per layer, the price of a model whose cache is larger than
what is left of the VRAM (llama.cpp also computes attention where the cache is).
The output head runs on the device too when it is placed there and the last layer is offloaded; then
only the logits come back. Layers not offloaded run on the CPU as before (the residual crosses over
once at each boundary). Without a device predictor (sparse mode whose predictor did not fit), or in the
dense / oracle / threshold modes, the active set comes from the host (the same one sync: the residual
comes back with the FFN input). Plain GGUF layers (W_down not neuron-major) compute their FFN on the
CPU from the copied-back input.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np


if TYPE_CHECKING:
    from pi_backend.engine.model import Model
    from pi_backend.native.device import Device, DeviceArray, DeviceMatrix

__all__ = ["DeviceLayers", "offloaded_layers"]


def offloaded_layers(placed: set[str] | tuple[str, ...], n_layer: int) -> tuple[list[int], set[int], bool, bool]:
    """From a placement's dense_gpu: (layers whose attention block runs on the device, those with a
    device predictor, whether the output head does, whether the KV cache lives there). The norm vectors
    of offloaded layers go with them (2 n_embd floats a layer, next to megabytes of attention)."""
    placed = set(placed)
    layers = [i for i in range(n_layer) if f"attn.{i}" in placed]
    preds = {i for i in layers if f"pred.{i}" in placed}
    output = "output" in placed and bool(layers) and layers[-1] == n_layer - 1
    return layers, preds, output, "kv_cache" in placed


@dataclass
class _Layer:
    attn_norm: Any
    ffn_norm: Any
    wq: DeviceMatrix
    wk: DeviceMatrix
    wv: DeviceMatrix
    wo: DeviceMatrix
    k: DeviceArray | None           # KV cache [n_ctx, n_head_kv, head_dim] in the host cache's type (None: on the host)
    v: DeviceArray | None
    fc1: DeviceMatrix | None = None
    fc2: DeviceMatrix | None = None
    part: DeviceArray | None = None  # int32 [n_ff]: local hot id or -1
    local: np.ndarray | None = None  # the same map on the host
    n_local: int = 0
    hot: tuple | None = None         # (gate, up, down_t) DeviceMatrix of the hot rows
    cold_cap: int = 256              # cold ids copied back with the counts (grows when exceeded)


class DeviceLayers:
    def __init__(self, model: Model, dev: Device, layers: list[int], predictors: set[int], output: bool,
                 kv_on_device: bool = True, hot_rows: dict[int, tuple] | None = None, stream=None):
        self.model, self.dev, self.stream = model, dev, stream
        cfg = model.config
        self.cfg = cfg
        self.layers: dict[int, _Layer] = {}
        kv_shape = (model.n_ctx, cfg.n_head_kv, cfg.head_dim)  # position-major on the device (pi_dev_attention)
        kv_dtype = model.state.k.dtype  # kv_type: f16 (default) or f32, as the host cache
        hot_rows = hot_rows or {}
        for li in layers:
            lw = model.weights.layers[li]
            L = _Layer(attn_norm=dev.to_device(lw.attn_norm.astype(np.float32)),
                       ffn_norm=dev.to_device(lw.ffn_norm.astype(np.float32)),
                       wq=dev.matrix(lw.wq), wk=dev.matrix(lw.wk), wv=dev.matrix(lw.wv), wo=dev.matrix(lw.wo),
                       k=dev.zeros(kv_shape, kv_dtype) if kv_on_device else None,
                       v=dev.zeros(kv_shape, kv_dtype) if kv_on_device else None)
            if li in predictors and lw.fc1 is not None and model.mode == "sparse":
                L.fc1, L.fc2 = dev.matrix(lw.fc1), dev.matrix(lw.fc2)
            rows = hot_rows.get(li)
            if rows is not None and rows[2] is not None:  # (local map, gate, up, down_t)
                L.local = np.asarray(rows[0], np.int32)
                L.part = dev.to_device(L.local)
                L.n_local = int((L.local >= 0).sum())
                L.hot = rows[1:]
            self.layers[li] = L
        w = model.weights
        self.output = (dev.to_device(w.output_norm.astype(np.float32)), dev.matrix(w.output)) if output else None
        self._bufs: dict[str, DeviceArray] = {}
        self._views: dict[tuple, DeviceArray] = {}
        self._host: dict[tuple, np.ndarray] = {}
        self._plans: dict[tuple, list] = {}

    # ---- plumbing
    def _buf(self, name: str, rows: int, width: int, dtype=np.float32, shape: tuple | None = None) -> DeviceArray:
        """Scratch [rows, width] (or reshaped to `shape`): a view of a buffer that only grows. The views
        are kept, since a decode step asks for the same ones at every layer."""
        key = (name, rows, width, shape)
        v = self._views.get(key)
        if v is not None:
            return v
        b = self._bufs.get(name)
        if b is None or b.shape[0] < rows or b.shape[1] != width:
            b = self._bufs[name] = self.dev.empty((max(rows, 1), width), dtype)
            self._views = {k: w for k, w in self._views.items() if k[0] != name}
            self._plans.clear()  # they hold pointers into the buffer this one replaces
        v = b.rows(0, rows)
        v = self._views[key] = v if shape is None else v.reshape(shape)
        return v

    def _host_buf(self, name: str, shape: tuple, dtype) -> np.ndarray:
        """A host array kept for recorded copies (they write where they wrote the first time)."""
        a = self._host.get((name, shape))
        if a is None:
            a = self._host[(name, shape)] = np.empty(shape, dtype)
        return a

    def _segment(self, key: tuple | None, ops) -> None:
        """ops() -- device ops only, every argument fixed by `key` and by the scratch buffers -- run the
        first time with the usual checks and recorded; then replayed as the bare C calls. A decode step
        repeats the same ops on the same buffers at every token, and at that size the Python of the
        checks, not the GPU, was what a step waited for. key None (a prompt): just run them."""
        if key is None:
            ops()
            return
        calls = self._plans.get(key)
        if calls is not None:
            self.dev.replay(calls)
            return
        with self.dev.recording() as calls:
            ops()
        self._plans[key] = calls

    def upload(self, x: np.ndarray) -> DeviceArray:
        T = x.shape[0]
        return self._buf("x", T, x.shape[1]).copy_from(np.ascontiguousarray(x, np.float32), self.stream)

    def download(self, a: DeviceArray) -> np.ndarray:
        return a.to_host(self.stream)

    # ---- one layer
    def attention(self, li: int, x: DeviceArray, pos0: int) -> None:
        """x [T, n_embd] += attention block of layer li, for the tokens at positions pos0 .."""
        cfg, dev, L, st = self.cfg, self.dev, self.layers[li], self.stream
        T, d, kv_w = x.shape[0], cfg.head_dim, cfg.n_head_kv * cfg.head_dim
        q = self._buf("q", T, cfg.n_head * d)
        q3 = self._buf("q", T, cfg.n_head * d, shape=(T, cfg.n_head, d))
        # K and V straight into the device cache rows of these positions when it holds f32; else into
        # scratch, then rounded into an f16 cache (or copied back to the host's)
        direct = L.k is not None and L.k.dtype == np.float32
        if direct:
            k, v = L.k.rows(pos0, pos0 + T), L.v.rows(pos0, pos0 + T)
            k2, v2 = k.reshape(T, kv_w), v.reshape(T, kv_w)
        else:
            k2, v2 = self._buf("k", T, kv_w), self._buf("v", T, kv_w)
            k, v = (self._buf(n, T, kv_w, shape=(T, cfg.n_head_kv, d)) for n in ("k", "v"))

        def qkv():
            h = dev.rmsnorm(x, L.attn_norm, cfg.norm_eps, out=self._buf("h", T, cfg.n_embd), stream=st)
            dev.gemm(L.wq, h, out=q, stream=st)
            dev.gemm(L.wk, h, out=k2, stream=st)
            dev.gemm(L.wv, h, out=v2, stream=st)

        # a decode step makes the same calls on the same buffers every token (not so with K/V written
        # straight into the cache rows of the position)
        self._segment((li, "qkv", x._ptr) if T == 1 and not direct else None, qkv)
        dev.rope(q3, pos0, cfg.rope_dim, cfg.rope_freq_base, stream=st)
        dev.rope(k, pos0, cfg.rope_dim, cfg.rope_freq_base, stream=st)
        att = self._buf("att", T, cfg.n_head * d)
        if L.k is not None:
            if not direct:
                dev.to_f16(k, L.k.rows(pos0, pos0 + T), stream=st)
                dev.to_f16(v, L.v.rows(pos0, pos0 + T), stream=st)
            dev.attention(q3, L.k, L.v, pos0, out=att, stream=st)
        else:  # the cache is on the host: attention there
            s = self.model.state
            q_h = np.empty((T, cfg.n_head, d), np.float32)
            k_h, v_h = np.empty((T, cfg.n_head_kv, d), np.float32), np.empty((T, cfg.n_head_kv, d), np.float32)
            q.copy_to_host(q_h, st)
            k.copy_to_host(k_h, st)
            v.copy_to_host(v_h, st)
            dev.sync(st)
            s.write(li, pos0, k_h, v_h)  # in the host cache's type
            a = self.model._attention(q_h, li, pos0)
            att.copy_from(a, st)

        def out():
            dev.add(x, dev.gemm(L.wo, att, out=self._buf("o", T, cfg.n_embd), stream=st), stream=st)

        self._segment((li, "wo", x._ptr) if T == 1 else None, out)

    def ffn(self, li: int, x: DeviceArray) -> None:
        """x += the layer's FFN: hot partition on the device, cold on the CPU, one synchronisation."""
        cfg, dev, L, st, f = self.cfg, self.dev, self.layers[li], self.stream, self.model.ffn[li]
        T = x.shape[0]
        lw = f.weights
        ffn_in = self._buf("f", T, cfg.n_embd)
        if lw.down_t is None:  # plain GGUF: the FFN on the CPU
            dev.rmsnorm(x, L.ffn_norm, cfg.norm_eps, out=ffn_in, stream=st)
            ffn_in_h = np.empty((T, cfg.n_embd), np.float32)
            x_h = np.empty_like(ffn_in_h)
            x.copy_to_host(x_h, st)
            ffn_in.copy_to_host(ffn_in_h, st)
            dev.sync(st)
            y = f(x_h, ffn_in_h)
            dev.add(x, self._buf("y", T, cfg.n_embd).copy_from(y, st), stream=st)
            return
        skip = f.threshold if f.mode == "threshold" else 0.0
        # a batch under the per-token rule: each token over its own predicted set (the neurons' rows
        # still read once), in both partitions, as on the CPU and as decoding each token alone
        per_token = f.takes_token_masks(T)
        hot_mask = cold_mask = None
        # the predictor on the device, where it was placed there
        logits = self._buf("logits", T, cfg.n_ff) if L.fc1 is not None else None
        if logits is not None and not per_token:  # the split on the device too
            hot_ids = self._buf("hot_ids", 1, cfg.n_ff, np.int32, shape=(cfg.n_ff,))
            # the counts and the cold ids side by side, so that one copy brings both back
            sel = self._buf("select", 1, 2 + cfg.n_ff, np.int32, shape=(2 + cfg.n_ff,))
            counts, cold_ids = sel.rows(0, 2), sel.rows(2, 2 + cfg.n_ff)
            cap = min(L.cold_cap, cfg.n_ff)
            # host arrays the copies land in: kept for a decode step's recorded copies
            sel_h, ffn_in_h = (self._host_buf("select", (2 + cap,), np.int32),
                               self._host_buf("ffn_in", (T, cfg.n_embd), np.float32)) if T == 1 else \
                (np.empty(2 + cap, np.int32), np.empty((T, cfg.n_embd), np.float32))
            n, cold = sel_h[:2], sel_h[2:]

            def split():
                dev.rmsnorm(x, L.ffn_norm, cfg.norm_eps, out=ffn_in, stream=st)
                dev.predict_logits(L.fc1, L.fc2, x, out=logits, stream=st)
                dev.select(logits, f.threshold, L.part, L.n_local, hot_ids, cold_ids, counts, stream=st)
                sel.rows(0, 2 + cap).copy_to_host(sel_h, st)
                ffn_in.copy_to_host(ffn_in_h, st)

            self._segment((li, "split", x._ptr, cap, f.threshold) if T == 1 else None, split)
            dev.sync(st)  # the layer's synchronisation
            n_hot, n_cold = int(n[0]), int(n[1])
            if n_cold > cold.size:  # more cold neurons than ever before: fetch the rest, remember the size
                rest = np.empty(n_cold - cold.size, np.int32)
                cold_ids.rows(cold.size, n_cold).copy_to_host(rest, st)
                dev.sync(st)
                cold = np.concatenate([cold, rest])
                L.cold_cap = min(cfg.n_ff, 1 << int(2 * n_cold - 1).bit_length())
            cold = cold[:n_cold]
            hot_dev = hot_ids.rows(0, n_hot)
        else:  # the active set from the host (per-token batches: thresholded there, from device logits)
            dev.rmsnorm(x, L.ffn_norm, cfg.norm_eps, out=ffn_in, stream=st)
            ffn_in_h = np.empty((T, cfg.n_embd), np.float32)
            if logits is not None:
                dev.predict_logits(L.fc1, L.fc2, x, out=logits, stream=st)
                logits_h = logits.copy_to_host(np.empty((T, cfg.n_ff), np.float32), st)
            x_h = None
            if f.mode == "sparse" and logits is None:
                x_h = np.empty_like(ffn_in_h)
                x.copy_to_host(x_h, st)
            ffn_in.copy_to_host(ffn_in_h, st)
            dev.sync(st)
            mask = None
            if logits is not None:  # pi_predict's rule: logit >= threshold, per token; the union listed
                on = logits_h >= f.threshold
                idx = np.flatnonzero(on.any(axis=0)).astype(np.int32)
                mask = on[:, idx]
            else:
                idx, mask = f.predicted(x_h)
            in_hot = L.local[idx] >= 0 if L.local is not None else np.zeros(idx.size, bool)
            hot_local, cold = L.local[idx[in_hot]] if in_hot.any() else np.zeros(0, np.int32), idx[~in_hot]
            n_hot = hot_local.size
            hot_dev = self._buf("hot_ids", 1, cfg.n_ff, np.int32).reshape(cfg.n_ff).rows(0, n_hot)
            if n_hot:
                hot_dev.copy_from(hot_local.astype(np.int32), st)
            if mask is not None:
                cold_mask = np.ascontiguousarray(mask[:, ~in_hot])
                if n_hot:
                    hot_mask = self._buf("hot_mask", T, cfg.n_ff, np.uint8).reshape(T * cfg.n_ff).rows(
                        0, T * n_hot).reshape(T, n_hot).copy_from(mask[:, in_hot].astype(np.uint8), st)
        if n_hot:  # launched, not waited for: runs while the CPU computes the cold partition
            gate, up, down_t = L.hot
            dev.sparse_ffn(gate, up, down_t, ffn_in, hot_dev, act=f.act, out=x, accumulate=True,
                           skip_threshold=skip, token_mask=hot_mask, stream=st)
        skipped = 0
        if cold.size:
            y = self._host_buf("y", (T, cfg.n_embd), np.float32) if T == 1 else np.empty_like(ffn_in_h)
            skipped = self.model.cold_executor.run(lw, f.act, np.ascontiguousarray(cold, np.int32), ffn_in_h, y,
                                                   False, skip, token_mask=cold_mask)

            def add_cold():  # the copy up reads y before it returns (pageable memory): y may change after
                dev.add(x, self._buf("y", T, cfg.n_embd).copy_from(y, st), stream=st)

            self._segment((li, "cold", x._ptr) if T == 1 else None, add_cold)
        f.stats.record(n_hot + cold.size, n_hot + cold.size - skipped, n_hot)

    def logits(self, x: DeviceArray) -> np.ndarray:
        """The output head on the device for the rows of x; the logits come back (a sync)."""
        norm, W = self.output
        T = x.shape[0]
        out = self._buf("logits_out", T, W.rows)

        def head():
            h = self.dev.rmsnorm(x, norm, self.cfg.norm_eps, out=self._buf("h", T, self.cfg.n_embd), stream=self.stream)
            self.dev.gemm(W, h, out=out, stream=self.stream)

        self._segment(("output", x._ptr) if T == 1 else None, head)
        return out.to_host(self.stream)

    # ---- KV cache state (save_state / load_state)
    def device_kv_layers(self) -> list[int]:
        return [li for li, L in self.layers.items() if L.k is not None]

    def kv(self, li: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        L = self.layers[li]
        return L.k.rows(0, n).to_host(self.stream), L.v.rows(0, n).to_host(self.stream)

    def set_kv(self, li: int, k: np.ndarray, v: np.ndarray) -> None:
        L, n = self.layers[li], k.shape[0]
        L.k.rows(0, n).copy_from(np.ascontiguousarray(k, L.k.dtype), self.stream)
        L.v.rows(0, n).copy_from(np.ascontiguousarray(v, L.v.dtype), self.stream)

    def close(self) -> None:
        self.layers.clear()
        self._bufs.clear()
        self.output = None
