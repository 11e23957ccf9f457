"""Placement (issue 7): the solver's properties, the cache beside the model, PowerInfer's .gpuidx,
budgets that cannot hold the dense blocks, the report and the plot."""
from __future__ import annotations

import os
import shutil
import struct

import numpy as np
import pytest

import pi_backend
from pi_backend import native
from pi_backend.model.activation_stats import save_activation_tensor
from pi_backend.model.config import ModelConfig
from pi_backend.model.factory import write_llama_model, write_skewed_activation_stats
from pi_backend.model.gguf_file import GGUFFile
from pi_backend.placement import (
    CostModel, ModelSizes, PlacementError, cache_path, format_report, gpuidx_path, plan_for_model, plot_placement,
    read_gpuidx, read_placement_cache, solve_placement, write_gpuidx,
)

MiB = 1 << 20
# a GPU so fast that no layer reaches its GPU/CPU crossover: isolates the mass-per-byte greedy
FAST_GPU = CostModel(gpu_bytes_per_s=1e30, cpu_bytes_per_s=25e9, transfer_bytes_per_s=1e30, sync_s=0.0)


def skewed_stats(rng, n_layer, n_ff, zero_fraction=0.0):
    F = rng.beta(0.3, 3.0, size=(n_layer, n_ff)).astype(np.float32)
    if zero_fraction:
        F[rng.random(F.shape) < zero_fraction] = 0
    return F


def sizes_for(n_layer, n_ff, n_embd=256, wtype=native.TYPE_Q4_0, **kw):
    return ModelSizes.synthetic(n_layer, n_ff, n_embd, wtype, **kw)


# ---- the solver ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cost", [None, FAST_GPU, CostModel.cpu_standin()], ids=["gpu", "fast-gpu", "standin"])
@pytest.mark.parametrize("balance", [0.0, 0.2])
def test_budget_is_respected_and_hot_sets_are_valid(cost, balance):
    rng = np.random.default_rng(0)
    F = skewed_stats(rng, 6, 1000, zero_fraction=0.2)
    sizes = sizes_for(6, 1000, attention_bytes=50_000, output_bytes=120_000, kv_bytes=40_000)
    nb = sizes.neuron_bytes[0]
    for budget in [0, 1, 49_999, 50_000, 299_999, 300_001, 1_000_000, 3_000_000, 10**9, sizes.ffn_bytes + sizes.dense_bytes]:
        p = solve_placement(F, sizes, budget, cost, balance=balance)
        assert p.total_bytes <= budget
        assert p.total_bytes == p.dense_bytes + int(p.hot_counts.sum()) * nb
        for ids in p.hot:
            assert ids.dtype == np.int32 and np.all(np.diff(ids) > 0)
            assert ids.size == 0 or (ids[0] >= 0 and ids[-1] < 1000)


def test_hot_neurons_have_the_highest_mass_per_byte():
    """Every hot neuron is worth at least as much per byte as every cold one, across layers of different
    neuron sizes (F16 layers cost 3.6x a Q4_0 layer's bytes per neuron)."""
    rng = np.random.default_rng(1)
    F = skewed_stats(rng, 4, 2000)
    sizes = sizes_for(4, 2000, attention_bytes=0, norm_bytes=0)
    nb = np.array([native.row_bytes(t, 256) * 3 for t in (native.TYPE_Q4_0, native.TYPE_F16, native.TYPE_Q8_0,
                                                          native.TYPE_Q4_0)])
    sizes = ModelSizes(4, 2000, 256, nb, sizes.dense)
    budget = int(nb.sum() * 300)
    p = solve_placement(F, sizes, budget, FAST_GPU)
    value = F / nb[:, None]
    hot = np.zeros(F.shape, bool)
    for i, ids in enumerate(p.hot):
        hot[i, ids] = True
    assert value[hot].min() >= value[~hot].max()
    assert budget - p.total_bytes < nb.max()  # and the budget is used up to the last neuron that fits
    assert len(set(p.hot_counts.tolist())) > 1  # the layers really differ


def test_capacity_comes_from_real_bytes_not_n_ff():
    """n_ff/n_embd = 14336/4096 (Mistral/Llama-3 shape), Q4_0: a neuron is 3 rows of 4096 Q4_0 values =
    3 * 2304 bytes. The number of neurons placed is what the real byte budget holds -- PowerInfer's
    n_ff-based formula leaves about a quarter of the budget unused for this shape."""
    n_layer, n_ff, n_embd = 32, 14336, 4096
    sizes = ModelSizes.synthetic(n_layer, n_ff, n_embd, native.TYPE_Q4_0)
    assert sizes.neuron_bytes[0] == 3 * native.row_bytes(native.TYPE_Q4_0, n_embd) == 6912
    F = np.random.default_rng(2).uniform(0.01, 1.0, (n_layer, n_ff)).astype(np.float32)
    room = 1 << 30
    p = solve_placement(F, sizes, sizes.dense_bytes + room, FAST_GPU)
    assert len(p.dense_gpu) == len(sizes.dense)
    assert int(p.hot_counts.sum()) == room // 6912
    assert p.budget_bytes - p.total_bytes < 6912


def test_numeric_layer_order(tmp_path):
    """activation_10.pt goes with layer 10 (PowerInfer sorts the names as strings: 0, 1, 10, 11, 2, ...)."""
    n_layer, n_ff = 12, 128
    model = write_llama_model(tmp_path / "m.powerinfer.gguf", n_embd=64, n_ff=n_ff, n_layer=n_layer, n_head=4,
                              powerinfer=True, predictor_rank=16, vocab="byte", seed=3)
    (tmp_path / "activation").mkdir()
    for i in range(n_layer):
        f = np.full(n_ff, 0.01, np.float32)
        f[i * 7: i * 7 + 5] = 0.9  # layer i's hot neurons: 7i .. 7i+4
        save_activation_tensor(tmp_path / "activation" / f"activation_{i}.pt", f)
    with GGUFFile.open(model.path) as g:
        cfg = ModelConfig.from_gguf(g)
        sizes = ModelSizes.from_gguf(g, cfg)
        nb, dense = sizes.neuron_bytes[0], sum(b.nbytes for b in sizes.dense if b.kind != "kv_cache")
        p = plan_for_model(g, cfg, budget_bytes=dense + 5 * n_layer * nb, cost=FAST_GPU, kv_cache="cpu",
                           write_cache=False)
    for i in range(n_layer):
        assert p.hot[i].tolist() == list(range(7 * i, 7 * i + 5)), f"layer {i}"


def test_ties_are_shared_evenly_across_layers():
    """Identical statistics in every layer: a plain stable sort would fill layer 0 first; the solver
    gives every layer the same number of neurons (+-1)."""
    F = np.tile(np.linspace(1.0, 0.5, 500, dtype=np.float32)[None], (8, 1))
    F[:, 100:] = 0.25  # a big block of ties
    sizes = sizes_for(8, 500, attention_bytes=0, norm_bytes=0)
    nb = int(sizes.neuron_bytes[0])
    p = solve_placement(F, sizes, nb * (8 * 100 + 8 * 37 + 5), FAST_GPU)
    assert p.hot_counts.max() - p.hot_counts.min() <= 1
    assert int(p.hot_counts.sum()) == 8 * 137 + 5


def test_layers_stop_at_their_gpu_cpu_crossover():
    """With the CPU stand-in (both partitions read at the same speed, overlapped), a hot partition
    beyond half of a layer's activation mass would make the layer slower: budget beyond that stays
    unused instead of being poured into one layer."""
    rng = np.random.default_rng(3)
    F = skewed_stats(rng, 4, 1000)
    sizes = sizes_for(4, 1000, attention_bytes=0, norm_bytes=0)
    p = solve_placement(F, sizes, sizes.ffn_bytes, CostModel.cpu_standin(sync_s=0.0))
    share = p.hot_mass / p.layer_mass
    top = np.sort(F, axis=1)[:, ::-1]
    assert np.all(share >= 0.5 - top[:, 0] / p.layer_mass) and np.all(share <= 0.5 + top[:, 0] / p.layer_mass)
    np.testing.assert_allclose(p.gpu_seconds, p.cpu_seconds, rtol=0.05)
    assert p.total_bytes < sizes.ffn_bytes // 2


def test_split_not_worth_its_sync_is_not_made():
    """A layer whose whole CPU time is below the per-layer synchronisation gains nothing from a split."""
    F = np.full((2, 100), 0.01, np.float32)
    sizes = sizes_for(2, 100, attention_bytes=0, norm_bytes=0)
    p = solve_placement(F, sizes, sizes.ffn_bytes // 4, CostModel.cpu_standin(sync_s=1.0))
    assert not p.has_split


def test_balance_term_lowers_the_slowest_layer():
    """balance > 0 trades a little total mass for a lower worst-layer CPU time."""
    rng = np.random.default_rng(4)
    flat = rng.uniform(0.05, 0.15, (2, 2000))
    skew = rng.beta(0.1, 3.0, (2, 2000))
    F = np.concatenate([flat, skew]).astype(np.float32)
    sizes = sizes_for(4, 2000, attention_bytes=0, norm_bytes=0)
    budget = sizes.ffn_bytes // 8
    p0 = solve_placement(F, sizes, budget, FAST_GPU)
    p1 = solve_placement(F, sizes, budget, FAST_GPU, balance=0.5)
    assert p1.cpu_seconds.max() < p0.cpu_seconds.max()
    assert p1.served_fraction <= p0.served_fraction
    assert p1.total_bytes <= budget


def test_70b_shape_solves_with_sane_properties():
    """80 layers x 28672 neurons (timed in ci/bench_placement.py; here only the result's properties)."""
    rng = np.random.default_rng(5)
    F = rng.beta(0.2, 3.0, (80, 28672)).astype(np.float32)
    sizes = ModelSizes.synthetic(80, 28672, 8192, native.TYPE_Q4_0)
    served = []
    for gib in (16, 24):
        p = solve_placement(F, sizes, gib << 30)
        assert p.total_bytes <= gib << 30 and p.has_split
        served.append(p.served_fraction)
    assert served[0] < served[1]


# ---- budgets that cannot hold the dense blocks ----------------------------------------------------

def test_impossible_budget_gives_a_cpu_only_plan_with_a_message():
    F = skewed_stats(np.random.default_rng(6), 3, 400)
    sizes = sizes_for(3, 400, attention_bytes=1 * MiB)
    for budget in (0, 1000, MiB - 1):
        p = solve_placement(F, sizes, budget)
        assert p.dense_gpu == ()
        assert any("CPU-only plan" in m for m in p.messages)
        assert p.total_bytes <= budget
    p = solve_placement(F, sizes, int(2.5 * MiB))  # two attention blocks, then the rest as neurons
    assert p.dense_gpu == ("attn.0", "attn.1")
    assert any("partly offloaded" in m for m in p.messages)
    assert p.has_split and p.total_bytes <= 2.5 * MiB


def test_kv_cache_only_when_every_dense_block_fits():
    F = skewed_stats(np.random.default_rng(7), 2, 400)
    sizes = sizes_for(2, 400, attention_bytes=1000, output_bytes=5000, kv_bytes=100_000)
    p = solve_placement(F, sizes, sizes.dense_bytes - 1)
    assert "kv_cache" not in p.dense_gpu and "output" in p.dense_gpu
    p = solve_placement(F, sizes, sizes.dense_bytes)
    assert "kv_cache" in p.dense_gpu
    p = solve_placement(F, sizes, sizes.dense_bytes, FAST_GPU, kv_cache="cpu")
    assert "kv_cache" not in p.dense_gpu and p.has_split


def test_disabled_split_offloads_dense_blocks_only():
    F = skewed_stats(np.random.default_rng(8), 2, 400)
    sizes = sizes_for(2, 400)
    p = solve_placement(F, sizes, 10**9, split_ffn=False)
    assert not p.has_split and len(p.dense_gpu) == len(sizes.dense)


def test_statistics_that_do_not_fit_the_model_are_refused():
    sizes = sizes_for(2, 400)
    with pytest.raises(PlacementError, match="n_ff"):
        solve_placement(np.ones((2, 300), np.float32), sizes, 10**6)
    with pytest.raises(PlacementError, match="layers"):
        solve_placement(np.ones((3, 400), np.float32), sizes, 10**6)


# ---- the model: cache, PowerInfer's index, engine options ----------------------------------------

@pytest.fixture(scope="module")
def source_models(tmp_path_factory):
    """Two models of the same shapes and types (seeds 2 and 9), written once."""
    d = tmp_path_factory.mktemp("models")
    return [write_llama_model(d / f"s{seed}.gguf", n_embd=128, n_ff=512, n_layer=2, n_head=4, ffn_act="reglu",
                              powerinfer=True, predictor_rank=64, weight_type="f16", vocab="byte", seed=seed).path
            for seed in (2, 9)]


@pytest.fixture()
def model_dir(tmp_path, source_models):
    """A model in its own folder, with activation statistics beside it; returns its path."""
    path = tmp_path / "m.powerinfer.gguf"
    shutil.copyfile(source_models[0], path)
    write_stats(tmp_path, seed=0)
    return path


def write_stats(d, seed, n_layer=2, n_ff=512):
    write_skewed_activation_stats(d, n_layer=n_layer, n_ff=n_ff, seed=seed)


def place(path, budget=4 * MiB, **kw):
    with GGUFFile.open(path) as g:
        cfg = ModelConfig.from_gguf(g)
        kw.setdefault("cost", FAST_GPU)
        return plan_for_model(g, cfg, budget_bytes=budget, **kw)


def test_cache_hit_miss_and_stale_rebuild(model_dir, tmp_path, source_models):
    path = model_dir
    first = place(path)
    assert first.source == "solver" and first.has_split
    assert cache_path(path).exists()
    hit = place(path)
    assert hit.source == "cache"
    assert [h.tolist() for h in hit.hot] == [h.tolist() for h in first.hot]
    assert hit.dense_gpu == first.dense_gpu and hit.budget_bytes == first.budget_bytes

    def rebuilt(reason, **kw):
        p = place(path, **kw)
        assert p.source == "solver", reason
        assert any("stale placement" in m and reason in m for m in p.messages), p.messages
        return p

    rebuilt("budget", budget=3 * MiB)
    place(path, budget=3 * MiB)
    write_stats(tmp_path, seed=1)
    rebuilt("statistics changed", budget=3 * MiB)
    rebuilt("thresholds changed", budget=3 * MiB, thresholds=[0.5, 0.5])
    rebuilt("parameters changed", budget=3 * MiB, thresholds=[0.5, 0.5], balance=0.3)
    assert place(path, budget=3 * MiB, thresholds=[0.5, 0.5], balance=0.3).source == "cache"
    p = place(path, budget=3 * MiB, thresholds=[0.5, 0.5], balance=0.3, reset=True)
    assert p.source == "solver" and not any("stale placement" in m for m in p.messages), p.messages

    # a different model with the same shapes and types at the same path
    shutil.copyfile(source_models[1], path)
    rebuilt("model file changed", budget=3 * MiB, thresholds=[0.5, 0.5], balance=0.3)

    # a damaged cache is rebuilt, never trusted
    cache_path(path).write_bytes(b"GGUF" + b"\0" * 40)
    rebuilt("unreadable", budget=3 * MiB, thresholds=[0.5, 0.5], balance=0.3)
    assert read_placement_cache(cache_path(path)).meta["model_hash"]


def write_powerinfer_gpuidx(path, hot, n_ff, capacity):
    """Writes a GPU index the way PowerInfer's powerinfer-py `export_split` does (not our writer): GGUFWriter
    with arch generic.gpu_index, per layer gpu_idx (I32 0/1 mask) and gpu_bucket (I32 sorted ids),
    block_count and split.vram_capacity, then the first 8 bytes patched to magic PWRI + version 3."""
    from gguf import GGUFWriter
    from gguf.constants import GGMLQuantizationType

    w = GGUFWriter(str(path), "generic.gpu_index")
    for i, ids in enumerate(hot):
        mask = np.zeros(n_ff, np.int32)
        mask[ids] = 1
        w.add_tensor(f"blk.{i}.gpu_idx", mask, raw_shape=mask.shape[::-1], raw_dtype=GGMLQuantizationType.I32)
        bucket = np.sort(np.asarray(ids, np.int32))
        w.add_tensor(f"blk.{i}.gpu_bucket", bucket, raw_shape=bucket.shape[::-1], raw_dtype=GGMLQuantizationType.I32)
    w.add_block_count(len(hot))
    w.add_uint64("split.vram_capacity", capacity)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(path, "r+b") as f:
        f.write(struct.pack("<I", int.from_bytes(b"PWRI", "little")))
        f.write(struct.pack("<I", 3))


def test_reads_powerinfer_gpuidx(tmp_path):
    rng = np.random.default_rng(10)
    hot = [np.sort(rng.choice(512, k, replace=False)) for k in (37, 200, 1)]
    write_powerinfer_gpuidx(tmp_path / "x.generated.gpuidx", hot, 512, 123456789)
    idx = read_gpuidx(tmp_path / "x.generated.gpuidx", n_layer=3, n_ff=512)
    assert idx.magic == "PWRI" and idx.vram_capacity == 123456789 and idx.n_ff == 512
    assert [h.tolist() for h in idx.hot] == [h.tolist() for h in hot]
    with pytest.raises(PlacementError, match="n_ff"):
        read_gpuidx(tmp_path / "x.generated.gpuidx", n_ff=1024)
    with pytest.raises(PlacementError, match="layers"):
        read_gpuidx(tmp_path / "x.generated.gpuidx", n_layer=32)
    # our writer produces the same layout, readable by the same reader
    write_gpuidx(tmp_path / "ours.gpuidx", hot, 512, 99)
    again = read_gpuidx(tmp_path / "ours.gpuidx")
    assert again.magic == "PWRI" and [h.tolist() for h in again.hot] == [h.tolist() for h in hot]


def test_inconsistent_gpuidx_is_refused(tmp_path):
    from gguf.constants import GGUFValueType
    from pi_backend.model.gguf_write import TypedValue, write_gguf

    mask = np.zeros(64, np.int32)
    mask[[1, 2, 3]] = 1
    write_gguf(tmp_path / "bad.gpuidx", "generic.gpu_index",
               {"generic.gpu_index.block_count": TypedValue(1, GGUFValueType.UINT32)},
               {"blk.0.gpu_idx": mask, "blk.0.gpu_bucket": np.array([1, 2, 4], np.int32)}, powerinfer=True)
    with pytest.raises(PlacementError, match="disagrees"):
        read_gpuidx(tmp_path / "bad.gpuidx")


def test_engine_uses_powerinfer_gpuidx_without_statistics(model_dir, tmp_path):
    path = model_dir
    for f in (tmp_path / "activation").iterdir():
        f.unlink()
    hot = [np.arange(0, 512, 4), np.arange(1, 512, 8)]
    write_powerinfer_gpuidx(gpuidx_path(path), hot, 512, 10**6)
    m = pi_backend.load(path, vram_budget=0.5)
    assert m.placement.source == "powerinfer-gpuidx"
    assert [h.tolist() for h in m.placement.hot] == [h.tolist() for h in hot]
    assert m.hot_neurons is m.placement.hot
    # too small a budget for what the index asks: ignored with a message, never overrun
    m = pi_backend.load(path, vram_budget=1e-4)
    assert m.placement.source == "none" and not m.placement.has_split
    assert any("ignored" in msg for msg in m.placement.messages)
    # reset with nothing to rebuild from: no split
    m = pi_backend.load(path, vram_budget=0.5, reset_gpu_index=True)
    assert not m.placement.has_split


def test_engine_options(model_dir):
    path = model_dir
    m = pi_backend.load(path)  # no budget, no GPU: no placement at all
    assert m.placement is None and m.hot_neurons is None
    m = pi_backend.load(path, vram_budget=0.0)  # impossible budget: CPU-only, still runs
    assert not m.placement.has_split and any("CPU-only" in s for s in m.placement.messages)
    m.forward([1, 2, 3])
    m = pi_backend.load(path, vram_budget=1.0, disable_gpu_index=True)
    assert not m.placement.has_split and m.placement.dense_gpu
    assert any("disable_gpu_index" in s for s in m.placement.messages)
    with pytest.raises(PlacementError, match="not a directory"):
        pi_backend.load(path, vram_budget=1.0, activation_dir=str(path) + ".nope")


def test_report_and_plot(model_dir, tmp_path, monkeypatch):
    p = place(model_dir)
    text = format_report(p, "m")
    assert "hot neurons" in text and "mass on GPU" in text
    assert len([ln for ln in text.splitlines() if ln.strip().split(" ")[0] in ("0", "1")]) == 2
    pytest.importorskip("matplotlib")
    out = plot_placement(p, tmp_path / "p.png")
    assert out is not None and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_so(model_dir, tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *a, **kw):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert plot_placement(place(model_dir), tmp_path / "p.png") is None
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "p.png")
