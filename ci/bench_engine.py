"""Engine decode benchmark (issue: engine): a 7B-shaped ReLU-LLaMA (n_embd 4096, n_ff 11008, 32 heads,
vocab 32000) cut to a few layers, at ProSparse-level sparsity, F16 and Q4_0, against llama.cpp decoding
the same weights as a plain llama GGUF, in the same run.

The models are random but built by the fixture code to be genuinely sparse with a working predictor
(pi_backend/model/factory.py); they are written once per machine to ~/.cache/pi_backend/bench-models.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest

N_LAYER = int(os.environ.get("PI_BENCH_LAYERS", "4"))
SHAPE = dict(n_embd=4096, n_ff=11008, n_layer=N_LAYER, n_head=32, n_ctx=512)
RANK = 1024
SPARSITY = 0.90
PROMPT = [1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278]
N_DECODE = 8
CACHE = Path(os.environ.get("PI_BENCH_CACHE", Path.home() / ".cache" / "pi_backend" / "bench-models"))
TYPES = ("F16", "Q4_0")


@functools.lru_cache(maxsize=None)
def models(wtype: str) -> tuple[Path, Path]:
    """(PowerInfer GGUF for pi_backend, plain llama GGUF of the same weights for llama.cpp).

    The fixture's calibration (sparsity and predictor) runs once, for the F16 PowerInfer file; every
    other file is derived from that file's values, so all of them share the same weights."""
    CACHE.mkdir(parents=True, exist_ok=True)
    tag = f"7bshape-l{N_LAYER}-r{RANK}-s{int(SPARSITY * 100)}"
    source = CACHE / f"{tag}-f16.powerinfer.gguf"
    if not source.exists():
        from pi_backend.model.factory import write_llama_model

        write_llama_model(source.with_suffix(".tmp"), **SHAPE, ffn_act="reglu", powerinfer=True,
                          predictor_rank=RANK, target_sparsity=SPARSITY, target_recall=0.95,
                          weight_type="f16", seed=7)
        os.replace(source.with_suffix(".tmp"), source)
    pwri = CACHE / f"{tag}-{wtype.lower()}.powerinfer.gguf"
    plain = CACHE / f"{tag}-{wtype.lower()}.plain.gguf"
    if not pwri.exists():
        _derive(source, pwri, wtype, powerinfer=True)
    if not plain.exists():
        _derive(source, plain, wtype, powerinfer=False)
    return pwri, plain


def _derive(source: Path, out: Path, wtype: str, powerinfer: bool) -> None:
    """Rewrite `source` in another weight type; as a plain llama GGUF (no predictor, W_down in llama's
    [n_embd, n_ff] layout, SiLU by default: llama.cpp reads the same bytes per token) unless powerinfer."""
    from pi_backend.model.gguf_file import GGUFFile
    from pi_backend.model.gguf_write import typed_metadata, write_model

    with GGUFFile.open(source) as g:
        metadata = {k: v for k, v in typed_metadata(g).items()
                    if k not in ("general.architecture", "general.file_type", "general.quantization_version")}
        weights = {}
        for name in g.tensors:
            if not powerinfer and (".fc1." in name or ".fc2." in name):
                continue
            values = g.dequantize(name)
            if not powerinfer and name.endswith("ffn_down_t.weight"):
                name, values = name.replace("ffn_down_t", "ffn_down"), np.ascontiguousarray(values.T)
            weights[name] = values
    if not powerinfer:
        metadata.pop("pi_backend.ffn_act", None)
        metadata.pop("powerinfer.sparse_threshold", None)
    write_model(out.with_suffix(".tmp"), "llama", metadata, weights, weight_type=wtype.lower(),
                powerinfer=powerinfer)
    os.replace(out.with_suffix(".tmp"), out)


def _decode_steps(step, n=N_DECODE):
    tok = 13
    for _ in range(n):
        tok = step(tok)


# how pi_backend holds the weights: the file mapped (its default), or read into private memory
# (use_mmap=False, llama.cpp's --no-mmap). llama.cpp itself, in its default, runs Q4_0 from its own
# repacked copy in private memory (its CPU "repack" buffers), not from the mapping.
LOADS = ("mmap", "no_mmap")


@functools.lru_cache(maxsize=None)
def pi_model(wtype: str, load: str = "mmap"):
    import pi_backend

    return pi_backend.load(models(wtype)[0], n_ctx=512, n_threads=2, use_mmap=load == "mmap")


@functools.lru_cache(maxsize=None)
def llama_model(wtype: str):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(models(wtype)[1]), n_ctx=512, n_threads=2, n_threads_batch=2,
                           verbose=False)


def bytes_per_token(m, sparse: bool) -> float:
    """Weight bytes one decoded token reads: attention + output head always, FFN per the measured
    fractions (gate rows of listed neurons; up and down rows of neurons that fired) and predictors."""
    from pi_backend import native

    w = m.weights
    total = w.output.nbytes + native.row_bytes(w.token_embd.wtype, w.token_embd.cols)
    for lw, f in zip(w.layers, m.ffn):
        total += lw.wq.nbytes + lw.wk.nbytes + lw.wv.nbytes + lw.wo.nbytes
        row = native.row_bytes(lw.up.wtype, lw.up.cols)
        n_ff = lw.up.rows
        if sparse:
            total += lw.fc1.nbytes + lw.fc2.nbytes
            total += row * n_ff * (f.stats.listed_fraction + 2 * f.stats.computed_fraction)
        else:
            total += 3 * row * n_ff
    return total


@pytest.mark.parametrize("load", LOADS)
@pytest.mark.parametrize("wtype", TYPES)
def test_decode_pi_backend(benchmark, wtype, load):
    m = pi_model(wtype, load)

    def setup():
        m.reset()
        m.forward(PROMPT)
        for f in m.ffn:
            f.stats.reset()

    benchmark.pedantic(lambda: _decode_steps(lambda t: int(np.argmax(m.forward([t])[-1]))),
                       setup=setup, rounds=5, warmup_rounds=1)
    benchmark.extra_info.update(bytes=bytes_per_token(m, True) * N_DECODE,
                                dense_bytes=bytes_per_token(m, False) * N_DECODE,
                                listed=float(np.mean([f.stats.listed_fraction for f in m.ffn])),
                                computed=float(np.mean([f.stats.computed_fraction for f in m.ffn])))


@pytest.mark.parametrize("wtype", TYPES)
def test_decode_llama_cpp(benchmark, wtype):
    llm = llama_model(wtype)

    def setup():
        llm.reset()
        llm.eval(PROMPT)

    def step(tok):
        llm.eval([tok])
        return 13  # which token is fed does not change the work; only speed is measured here

    benchmark.pedantic(lambda: _decode_steps(step), setup=setup, rounds=5, warmup_rounds=1)
    benchmark.extra_info.update(bytes=bytes_per_token(pi_model(wtype), False) * N_DECODE)


@pytest.mark.parametrize("wtype", TYPES)
def test_predictors_alone(benchmark, wtype):
    """The predictors' share of a decode step."""
    from pi_backend import native

    m = pi_model(wtype)
    x = np.random.default_rng(0).standard_normal((1, m.config.n_embd)).astype(np.float32)
    layers = m.weights.layers
    benchmark.pedantic(lambda: [native.predict(lw.fc1, lw.fc2, x, 0.0, n_threads=2) for lw in layers for _ in
                                range(N_DECODE)], rounds=5, warmup_rounds=1)
    benchmark.extra_info.update(bytes=sum(lw.fc1.nbytes + lw.fc2.nbytes for lw in layers) * N_DECODE)


def test_machine_read_bandwidth(benchmark):
    """This machine's read bandwidth, in this run: the kernels suite's yardstick (numpy's dense f32
    GEMV over 180 MB, far larger than L3)."""
    from ci.bench_kernels import test_numpy_dense_gemv_f32

    test_numpy_dense_gemv_f32(benchmark)


def metrics(median, bytes_of) -> dict[str, float]:
    out = {}
    machine = bytes_of("test_machine_read_bandwidth") / median("test_machine_read_bandwidth")
    out["info.machine_read_gbps"] = machine / 1e9
    for t in TYPES:
        ll = f"test_decode_llama_cpp[{t}]"
        for load in LOADS:
            pi = f"test_decode_pi_backend[{t}-{load}]"
            key = t if load == "mmap" else f"{t}-{load}"
            try:
                ratio = median(ll) / median(pi)
            except KeyError:  # a run selected with -k
                continue
            ceiling = bytes_of(ll) / bytes_of(pi)  # dense bytes / sparse bytes (predictor included)
            out[f"decode_speedup_vs_llama_cpp.{key}"] = ratio
            out[f"decode_fraction_of_ceiling.{key}"] = ratio / ceiling
            out[f"info.ceiling_ratio.{key}"] = ceiling
            out[f"decode_gbps_on_bytes_touched.{key}"] = bytes_of(pi) / median(pi) / 1e9
            out[f"decode_fraction_of_machine_bw.{key}"] = bytes_of(pi) / median(pi) / machine
            out[f"info.predictor_share_of_decode.{key}"] = median(f"test_predictors_alone[{t}]") / median(pi)
        try:
            out[f"info.llama_cpp_gbps.{t}"] = bytes_of(ll) / median(ll) / 1e9
        except KeyError:
            pass
    return out


GOALS = {"decode_fraction_of_ceiling.*": 0.9, "decode_fraction_of_machine_bw.*": 0.85}
