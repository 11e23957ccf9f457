"""Engine decode benchmark (issue: engine): a 7B-shaped ReLU-LLaMA (n_embd 4096, n_ff 11008, 32 heads,
vocab 32000) cut to a few layers, at ProSparse-level sparsity, F16 and Q4_0, against llama.cpp decoding
the same weights as a plain llama GGUF, in the same run.

The models are random but built by the fixture code to be genuinely sparse with a working predictor
(pi_backend/model/factory.py); they are written once per machine to ~/.cache/pi_backend/bench-models.
"""
from __future__ import annotations

import functools
import os
import time
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
    from pi_backend.model.gguf_file import GGUFFile

    path = models(wtype)[1]
    with GGUFFile.open(path) as g:  # the same page cache as pi_backend's file: resident, in huge pages
        g.prefetch()
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, n_threads_batch=2, verbose=False)


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


ROUNDS = int(os.environ.get("PI_BENCH_ROUNDS", "15"))


def _numpy_gemv():
    """The machine's read bandwidth yardstick (the kernels suite's: numpy's dense f32 GEMV over 180 MB,
    far larger than L3): (call, bytes)."""
    from ci.bench_kernels import _yardstick_data

    w, x = _yardstick_data()
    return (lambda: w @ x), w.nbytes


@pytest.mark.parametrize("wtype", TYPES)
def test_decode_side_by_side(benchmark, wtype):
    """N_DECODE decode steps of pi_backend (weights mapped, and read into memory) and of llama.cpp on
    the same weights, plus one pass of the bandwidth yardstick, in alternation, round after round (the
    order rotating): this shared machine's slow and fast phases then hit all of them alike, and every
    ratio is taken within a round before the median over rounds."""
    m = {load: pi_model(wtype, load) for load in LOADS}
    llm = llama_model(wtype)
    gemv, gemv_bytes = _numpy_gemv()

    def pi_round(model):
        model.reset()
        model.forward(PROMPT)
        for f in model.ffn:
            f.stats.reset()
        t0 = time.perf_counter()
        _decode_steps(lambda t: int(np.argmax(model.forward([t])[-1])))
        return time.perf_counter() - t0

    def llama_step(tok):
        llm.eval([tok])
        return 13  # which token is fed does not change the work; only speed is measured here

    def llama_round():
        llm.reset()
        llm.eval(PROMPT)
        t0 = time.perf_counter()
        _decode_steps(llama_step)
        return time.perf_counter() - t0

    def gemv_round():
        """The best of 3 back to back: the first pays for waking numpy's BLAS threads after a pause."""
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            gemv()
            best = min(best, time.perf_counter() - t0)
        return best

    runs = {f"pi_{load}": functools.partial(pi_round, m[load]) for load in LOADS}
    runs.update(llama_cpp=llama_round, numpy_gemv=gemv_round)
    times: dict[str, list[float]] = {k: [] for k in runs}

    def rounds():
        for run in runs.values():  # a warm-up round, not recorded: first touches, pools, page tables
            run()
        names = list(runs)
        for r in range(ROUNDS):
            for name in names[r % len(names):] + names[: r % len(names)]:
                times[name].append(runs[name]())

    benchmark.pedantic(rounds, rounds=1, iterations=1)
    benchmark.extra_info.update(
        times=times, gemv_bytes=gemv_bytes,
        sparse_bytes={load: bytes_per_token(m[load], True) * N_DECODE for load in LOADS},
        dense_bytes=bytes_per_token(m["mmap"], False) * N_DECODE,
        listed=float(np.mean([f.stats.listed_fraction for f in m["mmap"].ffn])),
        computed=float(np.mean([f.stats.computed_fraction for f in m["mmap"].ffn])))


PREFILL = [1] + [int(t) for t in np.random.default_rng(3).integers(100, 32000, 63)]
PREFILL_ROUNDS = int(os.environ.get("PI_BENCH_PREFILL_ROUNDS", "5"))


def _alternating(pi_round, llama_round, rounds: int = PREFILL_ROUNDS) -> dict[str, list[float]]:
    """A warm-up round of each (not recorded), then `rounds` rounds, the one that goes first alternating:
    {"pi": [seconds], "llama_cpp": [seconds]}."""
    times: dict[str, list[float]] = {"pi": [], "llama_cpp": []}
    pi_round(), llama_round()
    for r in range(rounds):
        for name, run in (("pi", pi_round), ("llama_cpp", llama_round))[:: 1 if r % 2 else -1]:
            times[name].append(run())
    return times


@pytest.mark.parametrize("wtype", TYPES)
def test_prefill_side_by_side(benchmark, wtype):
    """A 64-token prompt through pi_backend (sparse: each token over its own predicted neurons) and
    through llama.cpp (dense, its default batch) on the same weights, alternating, round after round."""
    m, llm = pi_model(wtype), llama_model(wtype)

    def pi_round():
        m.reset()
        t0 = time.perf_counter()
        m.forward(PREFILL)
        return time.perf_counter() - t0

    def llama_round():
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(PREFILL)
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {}
    benchmark.pedantic(lambda: times.update(_alternating(pi_round, llama_round)), rounds=1, iterations=1)
    benchmark.extra_info.update(times=times, tokens=len(PREFILL))


LONG_CONTEXT = 448  # cached positions before the timed steps (the bench models' n_ctx is 512)


@pytest.mark.parametrize("wtype", TYPES)
def test_decode_long_context_side_by_side(benchmark, wtype):
    """N_DECODE decode steps after LONG_CONTEXT cached positions, pi_backend and llama.cpp alternating:
    attention, which reads the whole cache every step, weighs here as it does not after the short
    PROMPT. The context is filled once per engine; each round rolls back to it and decodes on."""
    m, llm = pi_model(wtype), llama_model(wtype)
    context = [1] + [int(t) for t in np.random.default_rng(5).integers(100, 32000, LONG_CONTEXT - 1)]
    m.reset()
    for i in range(0, LONG_CONTEXT, 64):
        m.forward(context[i:i + 64])
    llm.reset()
    llm.eval(context)

    def pi_round():
        m.truncate(LONG_CONTEXT)
        t0 = time.perf_counter()
        _decode_steps(lambda t: int(np.argmax(m.forward([t])[-1])))
        return time.perf_counter() - t0

    def llama_round():
        llm.n_tokens = LONG_CONTEXT  # eval() drops the cache past n_tokens before it runs
        t0 = time.perf_counter()
        _decode_steps(lambda t: (llm.eval([t]), 13)[1])
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {}
    benchmark.pedantic(lambda: times.update(_alternating(pi_round, llama_round)), rounds=1, iterations=1)
    benchmark.extra_info.update(times=times)


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


def metrics(median, bytes_of, extra) -> dict[str, float]:
    """Per-round ratios of the side-by-side runs, then their medians over the rounds."""
    out = {}
    for t in TYPES:
        try:
            ex = extra(f"test_decode_side_by_side[{t}]")
        except KeyError:  # a run selected with -k
            continue
        times = {k: np.asarray(v) for k, v in ex["times"].items()}
        machine = ex["gemv_bytes"] / times["numpy_gemv"]  # bytes/s, per round
        dense = ex["dense_bytes"]
        out[f"info.machine_read_gbps.{t}"] = float(np.median(machine)) / 1e9
        out[f"info.llama_cpp_gbps.{t}"] = float(np.median(dense / times["llama_cpp"])) / 1e9
        out[f"info.llama_cpp_fraction_of_machine_bw.{t}"] = float(np.median(dense / times["llama_cpp"] / machine))
        for load in LOADS:
            pi, sparse = times[f"pi_{load}"], ex["sparse_bytes"][load]
            key = t if load == "mmap" else f"{t}-{load}"
            ceiling = dense / sparse  # dense bytes / sparse bytes (predictor included)
            speedup = float(np.median(times["llama_cpp"] / pi))
            out[f"decode_speedup_vs_llama_cpp.{key}"] = speedup
            out[f"decode_fraction_of_ceiling.{key}"] = speedup / ceiling
            out[f"info.ceiling_ratio.{key}"] = ceiling
            out[f"info.decode_gbps_on_bytes_touched.{key}"] = float(np.median(sparse / pi)) / 1e9
            out[f"decode_fraction_of_machine_bw.{key}"] = float(np.median(sparse / pi / machine))
            out[f"info.predictor_share_of_decode.{key}"] = (median(f"test_predictors_alone[{t}]")
                                                             / float(np.median(pi)))
    def alternated(name: str):
        """(pi seconds, llama.cpp seconds) per round of an _alternating benchmark, or None if not run"""
        try:
            ex = extra(name)
        except KeyError:
            return None
        return np.asarray(ex["times"]["pi"]), np.asarray(ex["times"]["llama_cpp"])

    for t in TYPES:
        if (run := alternated(f"test_prefill_side_by_side[{t}]")) is not None:
            pi, llama = run
            n = len(PREFILL)
            out[f"prefill_speedup_vs_llama_cpp.{t}"] = float(np.median(llama / pi))
            out[f"info.prefill_tokens_per_s.{t}"] = float(np.median(n / pi))
            out[f"info.llama_cpp_prefill_tokens_per_s.{t}"] = float(np.median(n / llama))
        if (run := alternated(f"test_decode_long_context_side_by_side[{t}]")) is not None:
            pi, llama = run
            out[f"decode_speedup_vs_llama_cpp_at_{LONG_CONTEXT}.{t}"] = float(np.median(llama / pi))
            out[f"info.decode_ms_at_{LONG_CONTEXT}.{t}"] = float(np.median(pi)) / N_DECODE * 1e3
            out[f"info.llama_cpp_decode_ms_at_{LONG_CONTEXT}.{t}"] = float(np.median(llama)) / N_DECODE * 1e3
    return out


GOALS = {"decode_fraction_of_ceiling.*": 0.9, "decode_fraction_of_machine_bw.*": 0.85}
