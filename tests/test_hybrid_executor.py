"""The hybrid executor (issue 7): hot partition on the "GPU" executor -- on a CPU-only machine a worker
thread standing in for it -- overlapped with the cold partition on the CPU, one wait per layer; the
result equals the single-executor result."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import pi_backend
from pi_backend.engine import executors
from pi_backend.engine.executors import (
    CpuExecutor, CpuThreadExecutor, Executor, GpuUnavailableError, HotRows, gpu_available,
)
from pi_backend.model.factory import write_llama_model, write_skewed_activation_stats
from pi_backend.placement import CostModel

TOKENS = [1, 450, 4996, 17354, 1701, 29916, 432, 17204]
# no synchronisation cost in the model: the tiny fixture would otherwise (rightly) not be split at all
STANDIN = CostModel.cpu_standin(sync_s=0.0)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("hybrid")
    fm = write_llama_model(d / "m.powerinfer.gguf", n_embd=128, n_ff=512, n_layer=2, n_head=4, ffn_act="reglu",
                           powerinfer=True, predictor_rank=64, weight_type="f16", seed=2)
    write_skewed_activation_stats(d, n_layer=2, n_ff=512, seed=0)
    return fm


def load(fm, **kw):
    """The CPU stand-in of the hot partition, on any machine (device="cpu": with a GPU, or the emulator
    library as PI_BACKEND_DEVICE_LIB, "auto" would put the hot partition on the device instead)."""
    kw.setdefault("placement_cost", STANDIN)
    kw.setdefault("device", "cpu")
    return pi_backend.load(fm.path, **kw)


@pytest.mark.parametrize("mode", ["sparse", "oracle"])
def test_hybrid_equals_single_executor(model, mode):
    single = pi_backend.load(model.path, mode=mode)
    hybrid = load(model, mode=mode, vram_budget=0.5)
    assert isinstance(hybrid.hot_executor, CpuThreadExecutor) and hybrid.placement.has_split
    a = single.forward(TOKENS, all_logits=True)
    b = hybrid.forward(TOKENS, all_logits=True)
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-4 * np.abs(a).max())
    assert all(f.stats.hot_listed > 0 for f in hybrid.ffn)
    for t in (13, 29, 1):  # decode steps (one token) too
        np.testing.assert_allclose(hybrid.forward([t]), single.forward([t]), rtol=0, atol=1e-4 * np.abs(a).max())
    hybrid.close()


def test_overlapped_equals_sequential_split_exactly(model):
    """Same partitions, same arithmetic (each partition's partial sum, then one add): bit-identical."""
    over = load(model, vram_budget=0.5)
    seq = load(model, vram_budget=0.5, overlap=False)
    assert isinstance(seq.hot_executor, CpuExecutor)
    assert [h.tolist() for h in over.hot_neurons] == [h.tolist() for h in seq.hot_neurons]
    np.testing.assert_array_equal(over.forward(TOKENS, all_logits=True), seq.forward(TOKENS, all_logits=True))
    over.close()


def test_compact_stand_in_takes_the_gpu_data_path(model):
    """The stand-in computing from a compact copy of the hot rows with local ids (what a GPU executor
    uploads) gives the same partial sums as reading the model's rows in place."""
    m = load(model, vram_budget=0.5)
    lw, hot = m.weights.layers[0], m.hot_neurons[0]
    x = np.random.default_rng(3).standard_normal((3, 128)).astype(np.float32)
    idx = hot[::2].astype(np.int32)
    plain, compact = CpuThreadExecutor(1), CpuThreadExecutor(1, compact=True)
    compact.prepare(0, lw, hot)
    ys = []
    for ex in (plain, compact):
        y = np.zeros((3, 128), np.float32)
        assert ex.wait(ex.submit(0, lw, "reglu", idx, x, 0.0), y, False) >= 0
        ys.append(y)
    np.testing.assert_array_equal(ys[0], ys[1])
    rows = HotRows(lw, hot)
    assert rows.up.rows == hot.size and rows.up.nbytes == hot.size * lw.up.nbytes // lw.up.rows
    with pytest.raises(ValueError, match="not prepared"):  # a cold neuron sent to the hot executor
        cold = np.setdiff1d(np.arange(512), hot)[:1].astype(np.int32)
        compact.wait(compact.submit(0, lw, "reglu", cold, x, 0.0), y, False)
    y = np.zeros((3, 128), np.float32)  # the executor is usable after an error
    compact.wait(compact.submit(0, lw, "reglu", idx, x, 0.0), y, False)
    np.testing.assert_array_equal(y, ys[1])
    plain.close()
    compact.close()
    m.close()


def test_submit_returns_before_the_hot_work_is_done(model, monkeypatch):
    """The scheduling: the cold partition starts while the hot one is still running. The stand-in's
    work is held back until the caller -- after submit returned -- releases it; a synchronous submit
    would deadlock here (the timeout turns that into a failure)."""
    m = load(model, vram_budget=0.5)
    lw = m.weights.layers[0]
    ex = CpuThreadExecutor(1)
    release, started_after = threading.Event(), []
    real_kernel = executors._sparse_ffn

    def gated_kernel(*args):
        started_after.append(release.wait(timeout=10))
        return real_kernel(*args)

    monkeypatch.setattr(executors, "_sparse_ffn", gated_kernel)
    x = np.ones((1, 128), np.float32)
    h = ex.submit(0, lw, "reglu", m.hot_neurons[0], x, 0.0)
    release.set()  # reached only if submit did not wait for the work
    y = np.zeros((1, 128), np.float32)
    ex.wait(h, y, False)
    assert started_after == [True]
    ex.close()
    m.close()


def test_an_executor_nobody_closed_stops_its_thread(model):
    import gc
    import weakref

    m = load(model, vram_budget=0.5)
    ex = CpuThreadExecutor(1)
    ex.wait(ex.submit(0, m.weights.layers[0], "reglu", m.hot_neurons[0], np.ones((1, 128), np.float32), 0.0),
            np.zeros((1, 128), np.float32), False)
    thread, ref = ex._thread, weakref.ref(ex)
    del ex
    gc.collect()
    assert ref() is None
    thread.join(timeout=10)
    assert not thread.is_alive()
    m.close()


class CountingExecutor:
    """Wraps an executor and records what crosses per layer."""

    def __init__(self, inner):
        self.inner, self.name, self.n_threads = inner, "counting", inner.n_threads
        self.submits, self.waits, self.sent = 0, 0, []

    def prepare(self, layer, lw, neurons):
        self.inner.prepare(layer, lw, neurons)

    def submit(self, layer, lw, act, idx, x, skip, token_mask=None):
        self.submits += 1
        self.sent.append((idx.size, x.shape))
        return self.inner.submit(layer, lw, act, idx, x, skip, token_mask=token_mask)

    def wait(self, handle, out, accumulate):
        self.waits += 1
        return self.inner.wait(handle, out, accumulate)

    def run(self, *a, **kw):
        return self.inner.run(*a, **kw)

    def close(self):
        self.inner.close()


def test_one_wait_per_layer_and_no_n_ff_transfer(model):
    m = load(model, vram_budget=0.5)
    counting = CountingExecutor(m.hot_executor)
    assert isinstance(counting, Executor)
    for f in m.ffn:
        f.hot = counting
    m.forward(TOKENS)
    m.forward([13])
    n_layer, n_ff, hot_max = m.config.n_layer, m.config.n_ff, max(h.size for h in m.hot_neurons)
    assert counting.submits == counting.waits == 2 * n_layer
    for n_idx, x_shape in counting.sent:  # an index list within the hot set and the hidden state
        assert n_idx <= hot_max < n_ff and x_shape[-1] == m.config.n_embd
    m.close()


def test_worker_errors_reach_the_caller(model):
    m = load(model, vram_budget=0.5)
    ex = CpuThreadExecutor(1)
    lw = m.weights.layers[0]
    x = np.ones((1, 128), np.float32)
    with pytest.raises(ValueError, match="idx"):
        ex.wait(ex.submit(0, lw, "reglu", np.array([0, 0], np.int32), x, 0.0), np.zeros((1, 128), np.float32), False)
    with pytest.raises(RuntimeError, match="in flight"):
        ex.submit(0, lw, "reglu", m.hot_neurons[0], x, 0.0)
        ex.submit(0, lw, "reglu", m.hot_neurons[0], x, 0.0)
    ex.close()
    m.close()


@pytest.mark.skipif(gpu_available(), reason="a GPU is present")
def test_gpu_requested_without_one_is_a_clear_error(model):
    with pytest.raises(GpuUnavailableError, match="device='gpu' requested"):
        pi_backend.load(model.path, device="gpu", vram_budget=1.0)
    m = pi_backend.load(model.path, device="auto", vram_budget=1.0)  # auto falls back to the stand-in
    assert not m.use_gpu
    with pytest.raises(ValueError, match="device"):
        pi_backend.load(model.path, device="tpu")


def test_generate_with_the_hybrid_executor(model):
    single = pi_backend.load(model.path)
    hybrid = load(model, vram_budget=0.5, hot_threads=1)
    a = single.generate(TOKENS, max_tokens=12)
    b = hybrid.generate(TOKENS, max_tokens=12)
    assert a.tokens == b.tokens
    hybrid.close()


@pytest.fixture(scope="module")
def emu_device(tmp_path_factory):
    """The device kernels built for the CPU emulator (the same source as the CUDA library)."""
    import shutil

    from pi_backend.native import build_gpu, device

    if shutil.which("g++") is None:
        pytest.skip("no g++ for the emulator build")
    try:
        lib = build_gpu.build_emu(tmp_path_factory.mktemp("emu"), verbose=False)
    except build_gpu.BuildError as exc:  # the kernels' own tests (test_gpu_kernels.py) report this failure
        pytest.skip(f"the device kernels do not build for the emulator: {str(exc)[:200]}")
    return device.Device(lib)


def test_device_executor_takes_the_hot_partition(model, emu_device):
    """The GPU executor (device kernels, here on the emulator) in place of the CPU stand-in: the same
    logits, the hot rows uploaded once per layer, one copy back per layer."""
    m, standin = (load(model, vram_budget=0.5) for _ in range(2))
    ref = standin.forward(TOKENS, all_logits=True)
    standin.reset()
    dx = executors.DeviceExecutor(emu_device)
    for i, lw in enumerate(m.weights.layers):
        dx.prepare(i, lw, m.hot_neurons[i])
    assert isinstance(dx, Executor)
    for f in m.ffn:
        f.hot = dx
    tol = 1e-4 * np.abs(ref).max()
    # the prompt, each token over its own predicted neurons in both partitions (the device applies the
    # token masks): the batch's union would give other logits
    union = load(model, vram_budget=0.5, batch_neurons="union")
    assert not np.allclose(union.forward(TOKENS, all_logits=True), ref, rtol=0, atol=tol)
    union.close()
    np.testing.assert_allclose(m.forward(TOKENS, all_logits=True), ref, rtol=0, atol=tol)
    standin.forward(TOKENS)
    np.testing.assert_allclose(m.forward([13]), standin.forward([13]), rtol=0, atol=tol)  # a decode step
    lw, x = m.weights.layers[0], np.ones((1, 128), np.float32)
    y = np.full((1, 128), 7.0, np.float32)
    assert dx.wait(dx.submit(0, lw, "reglu", np.zeros(0, np.int32), x, 0.0), y, False) == 0 and not y.any()
    cold = np.setdiff1d(np.arange(512), m.hot_neurons[0])[:1].astype(np.int32)
    with pytest.raises(ValueError, match="not prepared"):
        dx.submit(0, lw, "reglu", cold, x, 0.0)
    dx.close()
    m.close()
    standin.close()


def test_engine_runs_the_hot_partition_on_the_device(model, emu_device, tmp_path):
    """pi_backend.load(device='gpu') end to end, with the emulator library as the process's device
    (PI_BACKEND_DEVICE_LIB is read once per process: hence a subprocess)."""
    import os
    import subprocess
    import sys

    script = (
        "import sys, numpy as np, pi_backend\n"
        "from pi_backend.placement import CostModel\n"
        "m = pi_backend.load(sys.argv[1], device='gpu', vram_budget=0.5, placement_cost=CostModel.cpu_standin(sync_s=0),\n"
        "                    kv_type='f32')\n"
        "assert type(m.hot_executor).__name__ == 'DeviceExecutor' and m.placement.has_split, m.hot_executor\n"
        f"np.save(sys.argv[2], m.forward({TOKENS!r}, all_logits=True))\n"
    )
    env = dict(os.environ, PI_BACKEND_DEVICE_LIB=emu_device.path)
    out = tmp_path / "logits.npy"
    subprocess.run([sys.executable, "-c", script, str(model.path), str(out)], env=env, check=True, timeout=300)
    ref = pi_backend.load(model.path, kv_type="f32").forward(TOKENS, all_logits=True)
    np.testing.assert_allclose(np.load(out), ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def _run_on_emulated_device(emu_device, tmp_path, model_path, script: str) -> None:
    import os
    import subprocess
    import sys

    env = dict(os.environ, PI_BACKEND_DEVICE_LIB=emu_device.path)
    subprocess.run([sys.executable, "-c", script, str(model_path), str(tmp_path)], env=env, check=True, timeout=600)


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    """A byte-vocabulary model with GQA: the emulated output head stays small (257 rows, not 32000)."""
    d = tmp_path_factory.mktemp("hybrid_byte")
    fm = write_llama_model(d / "b.powerinfer.gguf", n_embd=128, n_ff=512, n_layer=2, n_head=4, n_head_kv=2,
                           ffn_act="reglu", powerinfer=True, predictor_rank=64, weight_type="f16", seed=3,
                           vocab="byte")
    write_skewed_activation_stats(d, n_layer=2, n_ff=512, seed=1)
    return fm


BYTE_TOKENS = [1, 84, 104, 101, 32, 99, 97, 116]


@pytest.mark.parametrize("mode, kv_type", [("sparse", "f16"), ("oracle", "f16"), ("sparse", "f32")])
def test_dense_blocks_and_kv_cache_on_the_device(byte_model, emu_device, tmp_path, mode, kv_type):
    """A budget that holds every dense block and the KV cache: attention, norms, predictors, the output
    head and the KV cache of every layer live on the device (the residual never comes back between
    layers); the hot partition there, the cold one on the CPU. Same logits as the CPU-only engine for a
    prefill and decode steps, the same greedy tokens, and the KV cache survives save/load_state. sparse:
    the predictor and the hot/cold split run on the device; oracle: the active set comes from the host.
    The device cache holds the engine's KV type, f16 by default as on the host."""
    script = (
        "import sys, numpy as np, pi_backend\n"
        "from pi_backend.placement import CostModel\n"
        "m = pi_backend.load(sys.argv[1], device='gpu', vram_budget=0.5, n_ctx=64, mode=" + repr(mode) + ",\n"
        "                    kv_type=" + repr(kv_type) + ", placement_cost=CostModel.cpu_standin(sync_s=0))\n"
        "dl = m.device_layers\n"
        "assert all(L.k.dtype == np.dtype(" + repr(kv_type.replace("f", "float")) + ") for L in dl.layers.values())\n"
        "assert dl is not None and sorted(dl.layers) == [0, 1] and dl.output is not None, m.placement.dense_gpu\n"
        "assert all((L.fc1 is not None) == (m.mode == 'sparse') and L.hot is not None for L in dl.layers.values())\n"
        "out = [m.forward(" + repr(BYTE_TOKENS) + ", all_logits=True)] + [m.forward([t]) for t in (13, 29)]\n"
        "saved = m.save_state()\n"
        "out.append(m.forward([7]))\n"
        "m.load_state(saved)\n"
        "out.append(m.forward([7]))\n"
        "np.save(sys.argv[2] + '/dev.npy', np.concatenate(out))\n"
        "np.save(sys.argv[2] + '/gen.npy', np.array(m.generate(" + repr(BYTE_TOKENS) + ", max_tokens=3).tokens))\n"
        "assert all(f.stats.hot_listed > 0 for f in m.ffn)\n"
        "# one synchronisation per offloaded layer, plus the logits' copy back\n"
        "from pi_backend.native.device import Device\n"
        "syncs, sync = [], Device.sync\n"
        "Device.sync = lambda self, stream=None: (syncs.append(1), sync(self, stream))[1]\n"
        "m.forward([5])\n"
        "syncs.clear()\n"
        "m.forward([6])\n"
        "assert len(syncs) == 2 + 1, syncs\n"
    )
    _run_on_emulated_device(emu_device, tmp_path, byte_model.path, script)
    ref_model = pi_backend.load(byte_model.path, n_ctx=64, mode=mode, kv_type=kv_type)
    ref = [ref_model.forward(BYTE_TOKENS, all_logits=True)] + [ref_model.forward([t]) for t in (13, 29)]
    ref.append(ref_model.forward([7]))
    ref_model.truncate(ref_model.n_past - 1)
    ref.append(ref_model.forward([7]))
    ref = np.concatenate(ref)
    np.testing.assert_allclose(np.load(tmp_path / "dev.npy"), ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    assert np.load(tmp_path / "gen.npy").tolist() == ref_model.generate(BYTE_TOKENS, max_tokens=3).tokens


@pytest.mark.parametrize("cut", ["kv_cache", "attn.1"])
def test_partial_dense_offload(byte_model, emu_device, tmp_path, cut):
    """Budgets in PowerInfer's priority order that stop early. "kv_cache": every dense block but the KV
    cache, which stays on the host (attention computed there: a second sync per layer); "attn.1": only
    layer 0's attention fits, so the residual comes back to the CPU for layer 1 and the head. The
    budget left goes to hot neurons. Same logits as the CPU engine either way."""
    script = (
        "import sys, numpy as np, pi_backend\n"
        "from pi_backend.placement import CostModel, ModelSizes\n"
        "from pi_backend.model.gguf_file import GGUFFile\n"
        "from pi_backend.model.config import ModelConfig\n"
        "g = GGUFFile.open(sys.argv[1])\n"
        "sizes = ModelSizes.from_gguf(g, ModelConfig.from_gguf(g), n_ctx=64)\n"
        "names = [b.name for b in sizes.dense]\n"
        f"budget = sum(b.nbytes for b in sizes.dense[: names.index({cut!r})]) + 1000\n"
        "m = pi_backend.load(sys.argv[1], device='gpu', vram_budget=budget / 2**30, n_ctx=64, kv_type='f32',\n"
        "                    placement_cost=CostModel.cpu_standin(sync_s=0))\n"
        "dl, placed = m.device_layers, m.placement.dense_gpu\n"
        f"assert {cut!r} not in placed and dl is not None, placed\n"
        f"assert sorted(dl.layers) == ([0, 1] if {cut!r} == 'kv_cache' else [0]), placed\n"
        "assert all(L.k is None for L in dl.layers.values()) and dl.device_kv_layers() == []\n"
        "from pi_backend.native.device import Device\n"
        "syncs, sync = [], Device.sync\n"
        "Device.sync = lambda self, stream=None: (syncs.append(1), sync(self, stream))[1]\n"
        "out = [m.forward(" + repr(BYTE_TOKENS) + ", all_logits=True)]\n"
        "syncs.clear()\n"
        "out += [m.forward([t]) for t in (13, 29)]\n"
        "n_dev = len(dl.layers)\n"
        "assert len(syncs) == 2 * (2 * n_dev + 1), (syncs, n_dev)  # per step: 2 per layer + the copy back\n"
        "np.save(sys.argv[2] + '/dev.npy', np.concatenate(out))\n"
    )
    _run_on_emulated_device(emu_device, tmp_path, byte_model.path, script)
    ref_model = pi_backend.load(byte_model.path, n_ctx=64, kv_type="f32")
    ref = np.concatenate([ref_model.forward(BYTE_TOKENS, all_logits=True)] + [ref_model.forward([t]) for t in (13, 29)])
    np.testing.assert_allclose(np.load(tmp_path / "dev.npy"), ref, rtol=0, atol=1e-4 * np.abs(ref).max())
