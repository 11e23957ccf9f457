"""The one-call native decode step (pi_decode_step) against the engine's Python pass, its reference: the
same ops in the same order, so the same bits, step after step, with the same FFN counts; used exactly
where it computes the same; bad descriptions refused on both sides of the boundary."""
from __future__ import annotations

import numpy as np
import pytest

import pi_backend
from pi_backend import native
from pi_backend.model.factory import write_llama_model
from pi_backend.native import ffi, lib
from pi_backend.native.decode import DecodeLayer, DecodeStep

TOKENS = [1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Small ReGLU PowerInfer files (GQA; rows of 512 so Q4_0 is regrouped as Q4_0X16) and a SiLU one with
    W_down stored transposed (threshold mode on the fused kernel)."""
    d = tmp_path_factory.mktemp("decode")
    out = {}
    for wtype in ("f32", "f16", "bf16", "q8_0", "q4_0"):
        out[wtype] = write_llama_model(d / f"relu-{wtype}.powerinfer.gguf", n_embd=512, n_ff=768, n_layer=2, n_head=8,
                                       n_head_kv=2, ffn_act="reglu", powerinfer=True, predictor_rank=32,
                                       weight_type=wtype, seed=3).path
    out["silu"] = write_llama_model(d / "silu.powerinfer.gguf", n_embd=128, n_ff=320, n_layer=2, n_head=4,
                                    ffn_act="swiglu", powerinfer=True,
                                    weight_type="f16", layer_thresholds=[0.02, 0.05], seed=4).path
    return out


def decode_both(path, prompt=TOKENS[:4], steps=TOKENS[4:], **options):
    """Greedy-free decode of the same tokens on the native step and on the Python pass: logits, stats."""
    results = []
    for native_decode in (True, False):
        m = pi_backend.load(path, n_ctx=64, native_decode=native_decode, **options)
        m.forward(prompt)
        for f in m.ffn:
            f.stats.reset()
        logits = np.concatenate([m.forward([t]) for t in steps])
        results.append((m, logits, [(f.stats.calls, f.stats.listed, f.stats.computed) for f in m.ffn]))
    return results


@pytest.mark.parametrize("wtype", ["f32", "f16", "bf16", "q8_0", "q4_0"])
@pytest.mark.parametrize("mode", ["sparse", "oracle"])
def test_native_step_is_the_python_pass_bit_for_bit(models, wtype, mode, isa):
    (fast, a, stats_a), (slow, b, stats_b) = decode_both(models[wtype], mode=mode)
    assert fast._decode_step() is not None and slow._decode_step() is None
    assert np.array_equal(a, b)
    assert stats_a == stats_b and stats_a[0][0] == len(TOKENS) - 4
    assert np.array_equal(fast.state.k[:, :, :fast.n_past], slow.state.k[:, :, :slow.n_past])
    assert np.array_equal(fast.state.v[:, :, :fast.n_past], slow.state.v[:, :, :slow.n_past])
    if mode == "sparse":  # the predictor listed a part of the neurons, the kernel skipped some of those
        assert 0 < stats_a[0][2] <= stats_a[0][1] < stats_a[0][0] * 768


@pytest.mark.parametrize("kv_type", ["f16", "f32"])
def test_threshold_mode_and_kv_types(models, kv_type):
    (fast, a, stats_a), (_, b, stats_b) = decode_both(models["silu"], mode="threshold", kv_type=kv_type)
    assert fast._decode_step() is not None
    assert np.array_equal(a, b) and stats_a == stats_b
    assert stats_a[1][2] < stats_a[1][1]  # the cut skipped neurons


def test_greedy_generation_is_unchanged(models):
    texts = [pi_backend.load(models["q4_0"], native_decode=nd).generate(TOKENS[:5], max_tokens=12).tokens
             for nd in (True, False)]
    assert texts[0] == texts[1]


def test_used_only_where_it_computes_the_same(models):
    path = models["f16"]
    assert pi_backend.load(path, mode="dense")._decode_step() is None  # dense: the explicit check path
    n_ff = 768
    hot = [np.arange(0, n_ff, 3)] * 2
    assert pi_backend.load(path, hot_neurons=hot)._decode_step() is None  # a hot partition
    m = pi_backend.load(path)
    step = m._decode_step()
    assert step is not None and m._decode_step() is step  # built once
    original = m.ffn
    m.ffn = [f for f in original]  # a replaced FFN list (the tools wrap the layers this way): rebuilt
    assert m._decode_step() is not step
    m.ffn = [type("Observed", (), {"__call__": lambda self, *a: None})()] + original[1:]
    assert m._decode_step() is None


def test_a_changed_threshold_is_taken(models):
    """Assigning a layer's threshold after decoding has started rebuilds the step with it."""
    runs = []
    for native_decode in (True, False):
        m = pi_backend.load(models["f16"], n_ctx=64, native_decode=native_decode)
        m.forward(TOKENS[:4])
        first = m.forward([TOKENS[4]])
        for f in m.ffn:
            f.threshold += 2.0
        runs.append((first, m.forward([TOKENS[5]]), [f.stats.listed for f in m.ffn]))
    assert np.array_equal(runs[0][0], runs[1][0]) and np.array_equal(runs[0][1], runs[1][1])
    assert runs[0][2] == runs[1][2]
    fresh = pi_backend.load(models["f16"], n_ctx=64)
    fresh.forward(TOKENS[:5])
    assert not np.array_equal(fresh.forward([TOKENS[5]]), runs[0][1])  # the new threshold changed the step


def _layer(m, i=0, **change):
    lw, f = m.weights.layers[i], m.ffn[i]
    args = dict(attn_norm=lw.attn_norm, wq=lw.wq, wk=lw.wk, wv=lw.wv, wo=lw.wo, ffn_norm=lw.ffn_norm, gate=lw.gate,
                up=lw.up, down_t=lw.down_t, k_cache=m.state.k[i], v_cache=m.state.v[i], fc1=lw.fc1, fc2=lw.fc2,
                threshold=f.threshold)
    args.update(change)
    return DecodeLayer(**args)


def _step(m, layers=None, **change):
    cfg, w = m.config, m.weights
    args = dict(token_embd=w.token_embd, output=w.output, output_norm=w.output_norm, layers=[_layer(m)] if layers is None else layers,
                n_head=cfg.n_head, n_head_kv=cfg.n_head_kv, n_rot=cfg.rope_dim, rope_freq_base=cfg.rope_freq_base,
                norm_eps=cfg.norm_eps, act=cfg.ffn_act)
    args.update(change)
    return DecodeStep(**args)


def test_bad_descriptions_are_refused_in_python(models):
    m = pi_backend.load(models["f16"], n_ctx=32)
    lw = m.weights.layers[0]
    _step(m, [_layer(m)])  # the good one builds
    cases = [
        (dict(layers=[_layer(m, wk=lw.wq)]), ValueError, r"layers\[0\]\.wk: shape"),
        (dict(layers=[_layer(m, gate=None)]), TypeError, r"layers\[0\]\.gate"),
        (dict(layers=[_layer(m, fc2=None)]), ValueError, "predictor needs both"),
        (dict(layers=[_layer(m, attn_norm=lw.attn_norm[:-1])]), ValueError, "attn_norm"),
        (dict(layers=[_layer(m, k_cache=m.state.k[0, :1])]), ValueError, "k_cache: shape"),
        (dict(layers=[_layer(m, v_cache=m.state.v[0].astype(np.float32))]), TypeError, "v_cache"),
        (dict(layers=[_layer(m, threshold=float("nan"))]), ValueError, "threshold: NaN"),
        (dict(layers=[_layer(m, skip_threshold=-1.0)]), ValueError, "skip_threshold"),
        (dict(n_head_kv=3), ValueError, "n_head_kv"),
        (dict(n_rot=3), ValueError, "n_rot"),
        (dict(act="swish"), ValueError, "act"),
        (dict(layers=()), ValueError, "layers"),
    ]
    for change, err, match in cases:
        with pytest.raises(err, match=match):
            _step(m, **change)
    step = _step(m, [_layer(m)])
    with pytest.raises(ValueError, match="token"):
        step(m.weights.token_embd.rows, 0)
    with pytest.raises(ValueError, match="n_past"):
        step(1, 32)


def test_bad_descriptions_are_refused_in_c(models):
    """The C side checks the model on its own: a description Python never builds gets an error code."""
    m = pi_backend.load(models["f16"], n_ctx=32)
    step = _step(m, [_layer(m, i) for i in range(2)])
    logits = np.empty((1, step.n_vocab), np.float32)
    counts = np.zeros(4, np.int64)

    def call(token=1, n_past=0):
        return lib.pi_decode_step(step._c, token, n_past, ffi.from_buffer("float *", logits),
                                  ffi.from_buffer("int64_t *", counts), 1)

    assert call() == lib.PI_OK
    assert call(token=-1) == lib.PI_ERR_INDEX
    assert call(n_past=32) == lib.PI_ERR_SHAPE
    layer = step._c_layers[1]
    for field, value, code in (("wk", layer.wq, lib.PI_ERR_SHAPE), ("up", ffi.NULL, lib.PI_ERR_NULL),
                               ("fc2", ffi.NULL, lib.PI_ERR_NULL), ("fc2", layer.fc1, lib.PI_ERR_SHAPE),
                               ("k_cache", ffi.NULL, lib.PI_ERR_NULL)):
        saved = getattr(layer, field)
        setattr(layer, field, value)
        assert call() == code, field
        setattr(layer, field, saved)
    for field, value, code in (("n_head_kv", 3, lib.PI_ERR_SHAPE), ("n_rot", 0, lib.PI_ERR_SHAPE),
                               ("kv_type", native.TYPE_Q4_0, lib.PI_ERR_TYPE), ("act", 99, lib.PI_ERR_TYPE),
                               ("n_ff", 1000, lib.PI_ERR_SHAPE)):
        saved = getattr(step._c, field)
        setattr(step._c, field, value)
        assert call() == code, field
        setattr(step._c, field, saved)
    assert call() == lib.PI_OK


def test_a_failed_step_loses_nothing(models):
    m = pi_backend.load(models["f16"], n_ctx=8)
    m.forward(TOKENS[:7])
    before = m.forward([TOKENS[7]])
    m.truncate(7)
    with pytest.raises(ValueError, match="tokens"):
        m.forward([10**7])
    assert m.n_past == 7
    assert np.array_equal(m.forward([TOKENS[7]]), before)
    with pytest.raises(ValueError, match="exceeds the context"):
        m.forward([TOKENS[8]])
