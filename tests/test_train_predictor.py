"""Predictor training: threshold calibration semantics, learning a planted low-rank gate, rank choice,
numpy/torch parity, plumbing (collect_fn, save/load, GGUF names, ffn_mask), and — slow — the tiny-relu
model end to end (recall, density and the perplexity cost of computing only predicted neurons)."""
import numpy as np
import pytest

from pi_backend.model.numpy_reference import (ReferenceConfig, forward, load_tiny_relu, random_weights,
                                              tiny_relu_available)
from pi_backend.tools.perplexity_ref import default_corpus_dir, predictor_experiment
from pi_backend.tools.train_predictor import (CalibrationData, LayerPredictor, PredictorSet, TrainOptions,
                                              calibrate_threshold, collect_calibration_data, fit_predictor,
                                              prediction_metrics, reference_collector, train_predictors)


def recall_at(logits, active, t):
    return np.count_nonzero((logits >= t) & active) / np.count_nonzero(active)


@pytest.mark.parametrize("target", [0.5, 0.9, 0.99, 0.999, 1.0])
def test_threshold_is_the_largest_value_reaching_the_target_recall(target):
    rng = np.random.default_rng(0)
    active = rng.random((300, 50)) < 0.1
    logits = (rng.normal(size=active.shape) + 2 * active).round(2).astype(np.float32)  # rounding: many ties
    t = calibrate_threshold(logits, active, target)
    assert t.dtype == np.float32
    assert recall_at(logits, active, t) >= target
    assert recall_at(logits, active, np.nextafter(t, np.float32(np.inf))) < target


def test_threshold_when_nothing_is_active():
    t = calibrate_threshold(np.zeros((4, 3), np.float32), np.zeros((4, 3), bool), 0.99)
    assert not (np.zeros(3, np.float32) >= t).any()


# ----------------------------------------------------------------------------- a planted problem
def planted_problem(n_windows, gate_rank=6, dim=32, ffn_dim=96, tokens_per_window=40, seed=0):
    """x with a constant channel (like the residual stream's outlier dims, it lets a bias-free
    predictor shift its logits), truth = a rank-`gate_rank` linear gate firing for ~10% of pairs."""
    rng = np.random.default_rng(seed)
    model_rng = np.random.default_rng(1234)  # the same 'model' for every sample
    gate = model_rng.normal(size=(ffn_dim, gate_rank)) @ model_rng.normal(size=(gate_rank, dim))
    gate[:, 0] = -0.45 * np.linalg.norm(gate, axis=1)
    n = n_windows * tokens_per_window
    x = rng.normal(size=(n, dim)).astype(np.float32)
    x[:, 0] = 3.0
    active = x @ gate.T > 0
    return CalibrationData([x], [active], np.arange(n) // tokens_per_window)


FAST = TrainOptions(epochs=30, batch_size=128, lr=1e-2, backend="numpy")


def test_training_reaches_the_target_recall_on_held_out_data():
    data, fresh = planted_problem(150), planted_problem(50, seed=1)
    ps = train_predictors(data, ranks=(16,), target_recall=0.99, options=FAST)
    report = ps.reports[0]
    assert report.recall >= 0.99                               # on the held-out calibration split
    assert 0.05 < report.true_density < 0.2
    assert report.predicted_density < 1.3 * report.true_density
    test = ps.evaluate(fresh)[0]                                # on data never seen at all
    assert test.recall >= 0.98
    assert test.predicted_density < 1.35 * test.true_density


def test_rank_choice_takes_the_smallest_rank_that_is_good_enough():
    data = planted_problem(100)
    strict = train_predictors(data, ranks=(2, 16), density_slack=0.3, options=FAST)
    assert strict.layers[0].rank == 16 and set(strict.reports[0].candidates) == {2, 16}
    assert strict.reports[0].candidates[2] > 1.3 * strict.reports[0].true_density
    lenient = train_predictors(data, ranks=(16, 2), density_slack=100.0, options=FAST)
    assert lenient.layers[0].rank == 2 and set(lenient.reports[0].candidates) == {2}
    # nothing good enough: the candidate with the lowest predicted density
    impossible = train_predictors(data, ranks=(2, 16), density_slack=-0.5, options=FAST)
    assert impossible.layers[0].rank == 16


def test_per_layer_pairs_are_accepted_and_layers_can_be_skipped():
    a, b = planted_problem(40, seed=2), planted_problem(40, seed=3)
    pairs = [(a.inputs[0], a.active[0]), (b.inputs[0], b.active[0].astype(np.float32))]  # bool or float
    ps = train_predictors(pairs, ranks=(8,), options=FAST, layers=[1])
    assert ps.layers[0] is None and ps.layers[1].rank == 8 and len(ps.reports) == 1
    assert set(ps.tensors()) == {"blk.1.fc1.weight", "blk.1.fc2.weight"}
    assert ps.ffn_mask()(0, a.inputs[0]) is None                     # an untrained layer stays dense


def test_numpy_and_torch_backends_agree():
    pytest.importorskip("torch")
    data = planted_problem(60)
    x, y = data.inputs[0], data.active[0]
    results = {b: fit_predictor(x, y, 12, TrainOptions(epochs=3, batch_size=256, backend=b)) for b in ("numpy", "torch")}
    for a, b in zip(results["numpy"], results["torch"]):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * np.abs(a).max())
    logits = {b: LayerPredictor(fc1, fc2, 0.0).logits(x) for b, (fc1, fc2) in results.items()}
    agree = np.mean((logits["numpy"] > 0) == (logits["torch"] > 0))
    assert agree > 0.999


# ----------------------------------------------------------------------------- plumbing
def small_model(act="reglu"):
    cfg = ReferenceConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=48, vocab=40, ffn_act=act)
    return cfg, random_weights(cfg, seed=11)


def test_collect_from_the_reference_counts_negative_activations_as_active():
    cfg, w = small_model("reglu")
    windows = [np.random.default_rng(i).integers(0, cfg.vocab, 10) for i in range(3)]
    data = collect_calibration_data(reference_collector(cfg, w), windows)
    assert data.n_layers == cfg.n_layers and data.n_tokens == 30
    assert data.inputs[0].shape == (30, cfg.dim) and data.inputs[0].dtype == np.float32
    _, internals = forward(cfg, w, windows[1], return_internals=True, dtype=np.float32)
    np.testing.assert_array_equal(data.active[1][10:20], internals[1].h != 0)
    assert (internals[1].h[internals[1].active] < 0).any()
    np.testing.assert_array_equal(data.window_id, np.repeat([0, 1, 2], 10))


def test_save_load_common_threshold_and_gguf_names(tmp_path):
    data = planted_problem(40)
    ps = train_predictors(data, ranks=(8,), options=FAST)
    x = data.inputs[0]
    path = str(tmp_path / "pred.npz")
    ps.save(path)
    loaded = PredictorSet.load(path)
    np.testing.assert_array_equal(loaded.predict(0, x), ps.predict(0, x))
    assert loaded.layers[0].threshold == ps.layers[0].threshold
    assert loaded.reports[0] == ps.reports[0] and "layer" in loaded.report_table()
    # one global threshold (stock PowerInfer) via rescaled fc2: same predictions up to float rounding
    t = ps.layers[0].threshold
    common = ps.with_common_threshold(np.sign(t) * 1.0)
    assert np.mean(common.predict(0, x) == ps.predict(0, x)) > 0.9999
    with pytest.raises(ValueError):
        ps.with_common_threshold(-np.sign(t))
    tensors = ps.tensors()
    assert tensors["blk.0.fc1.weight"].shape == (8, x.shape[1])
    assert tensors["blk.0.fc2.weight"].shape == (data.active[0].shape[1], 8)


def test_predictor_mask_that_keeps_everything_equals_dense():
    cfg, w = small_model()
    rng = np.random.default_rng(0)
    keep_all = PredictorSet([LayerPredictor(rng.normal(size=(4, cfg.dim)).astype(np.float32),
                                            rng.normal(size=(cfg.ffn_dim, 4)).astype(np.float32), -np.inf)
                             for _ in range(cfg.n_layers)])
    toks = rng.integers(0, cfg.vocab, 12)
    np.testing.assert_array_equal(forward(cfg, w, toks, ffn_mask=keep_all.ffn_mask()), forward(cfg, w, toks))


def test_prediction_metrics():
    active = np.array([[1, 1, 0, 0]], bool)
    m = prediction_metrics(np.array([[1, 0, 1, 1]], bool), active)
    assert m == dict(recall=0.5, precision=1 / 3, true_density=0.5, predicted_density=0.75)


# ----------------------------------------------------------------------------- the tiny model, end to end
@pytest.mark.slow
@pytest.mark.skipif(not tiny_relu_available() or default_corpus_dir() is None,
                    reason="needs the tiny-relu fixture and a text corpus")
def test_tiny_relu_predictors_end_to_end():
    """~1-3 minutes on 2 cores: 40k calibration tokens, ranks 32..256, recall target 0.99."""
    cfg, w = load_tiny_relu()
    exp = predictor_experiment(cfg, w, default_corpus_dir(), calib_tokens=40960, test_windows=64,
                               target_recall=0.99)
    print("\n" + exp.summary())
    for held, test in zip(exp.predictors.reports, exp.test_reports):
        assert held.recall >= 0.99                                        # by construction of the threshold
        assert test.recall >= 0.98                                        # on files never seen
        assert test.predicted_density <= 1.35 * test.true_density         # close to the natural sparsity
        assert test.true_density < 0.3
    assert exp.perplexity_increase <= 0.01
    assert exp.dense.nats_per_byte < 2.5
