"""Model files: the writer, the fixture factory, ModelConfig, the tiny-relu conversion, llama.cpp loading."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.constants import GGMLQuantizationType as QT
from gguf.quants import quantize

from pi_backend.model.config import ModelConfig, load_config
from pi_backend.model.factory import write_llama_model
from pi_backend.model.gguf_file import GGUFError, GGUFFile
from pi_backend.model.gguf_write import choose_tensor_type, set_magic, write_gguf, write_model
from pi_backend.model.numpy_reference import forward_from_config, read_float_weights, rms_norm
from pi_backend.model.tiny_relu import PACKAGED_TINY_RELU, convert_tiny_relu
from pi_backend.model.vocab import VOCAB_DIR, gpt2_bytes_to_unicode

SPM_VOCAB = VOCAB_DIR / "ggml-vocab-llama-spm.gguf"
SHARED_NPZ = Path(__file__).resolve().parents[2] / "shared/fixtures/tiny-relu/tiny_relu_C_l1.npz"
SMALL = dict(n_embd=64, n_ff=128, n_layer=2, n_head=4, vocab="byte")
ENGLISH = (
    "The Python interpreter is easily extended with new functions and data types implemented in C or C++. "
    "Python is also suitable as an extension language for customizable applications."
)


def _gguf_reader_copy(path: Path, tmp_path: Path) -> GGUFReader:
    """gguf.GGUFReader on a PWRI file: read a copy with the magic switched back."""
    copy = tmp_path / ("plain-" + path.name)
    shutil.copy(path, copy)
    set_magic(copy, powerinfer=False)
    return GGUFReader(copy)


def _ffn_stats(model_path: Path, tokens: np.ndarray):
    """Per layer: gate>0 mask, true FFN-active mask (the activation is non-zero), and FFN inputs."""
    with GGUFFile.open(model_path) as gguf:
        config = ModelConfig.from_gguf(gguf)
        weights = read_float_weights(gguf)
    layers = []

    def record(layer, ffn_inp):
        h = rms_norm(ffn_inp, weights[f"blk.{layer}.ffn_norm.weight"], config.norm_eps)
        gate = h @ weights[f"blk.{layer}.ffn_gate.weight"].T
        up = h @ weights[f"blk.{layer}.ffn_up.weight"].T
        active = (gate > 0) & (up > 0) if config.ffn_act == "drelu" else gate > 0
        layers.append((gate > 0, active, ffn_inp))

    logits = forward_from_config(weights, tokens, config, before_ffn=record)
    return config, weights, layers, logits


# ---- writer ------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight_type", ["f32", "f16", "bf16", "q8_0", "q4_0"])
def test_written_bytes_are_gguf_quantize_output(tmp_path, weight_type):
    model = write_llama_model(tmp_path / "m.gguf", weight_type=weight_type, **SMALL)
    reader = GGUFReader(model.path)
    assert [t.name for t in reader.tensors] == list(model.weights)
    wanted = {"f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16, "q8_0": QT.Q8_0, "q4_0": QT.Q4_0}[weight_type]
    for tensor in reader.tensors:
        original = model.weights[tensor.name]
        expected_type = QT.F32 if original.ndim == 1 else wanted
        assert tensor.tensor_type == expected_type, tensor.name
        assert tuple(reversed(tensor.shape.tolist())) == original.shape
        assert tensor.data.tobytes() == quantize(original, expected_type).tobytes(), tensor.name
    assert reader.fields["general.file_type"].contents() == {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2}[weight_type]


def test_quantized_type_falls_back_to_f16_when_rows_do_not_fit_blocks():
    assert choose_tensor_type((10, 64), "q4_0") == QT.Q4_0
    assert choose_tensor_type((10, 48), "q4_0") == QT.F16
    assert choose_tensor_type((64,), "q8_0") == QT.F32


def test_write_gguf_metadata_types(tmp_path):
    path = write_gguf(
        tmp_path / "m.gguf", "llama",
        {"a.u32": 7, "a.neg": -3, "a.big": 2**40, "a.f": 0.5, "a.s": "x", "a.b": True,
         "a.ints": [1, 2], "a.floats": np.array([0.5, 1.5], dtype=np.float32), "a.strs": ["p", "q"]},
        {"w": np.ones((2, 3), dtype=np.float32)},
    )
    reader = GGUFReader(path)
    types = {k: [t.name for t in f.types] for k, f in reader.fields.items()}
    assert types["a.u32"] == ["UINT32"] and types["a.neg"] == ["INT32"] and types["a.big"] == ["UINT64"]
    assert types["a.f"] == ["FLOAT32"] and types["a.b"] == ["BOOL"] and types["a.s"] == ["STRING"]
    assert types["a.ints"] == ["ARRAY", "INT32"] and types["a.floats"] == ["ARRAY", "FLOAT32"]
    assert reader.fields["a.strs"].contents() == ["p", "q"]


# ---- vocabularies ------------------------------------------------------------------------------


def test_llama_spm_vocab_is_copied_with_types(tmp_path):
    model = write_llama_model(tmp_path / "m.gguf", n_embd=32, n_ff=64, n_layer=1, vocab="llama-spm", ffn_act="swiglu")
    source, written = GGUFReader(SPM_VOCAB), GGUFReader(model.path)
    keys = [k for k in source.fields if k.startswith("tokenizer.ggml.")]
    assert len(keys) >= 8
    for key in keys:
        assert written.fields[key].types == source.fields[key].types, key
        assert written.fields[key].contents() == source.fields[key].contents(), key
    assert model.config.n_vocab == 32000 == len(source.fields["tokenizer.ggml.tokens"].contents())
    assert model.weights["token_embd.weight"].shape == (32000, 32)


def test_byte_vocab(tmp_path):
    model = write_llama_model(tmp_path / "m.gguf", **SMALL)
    reader = GGUFReader(model.path)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 257 == model.config.n_vocab
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    decode = {ch: b for b, ch in enumerate(gpt2_bytes_to_unicode())}
    assert len(decode) == 256
    assert [decode[t] for t in tokens[:256]] == list(range(256))  # id = byte value
    for b in (ord("A"), ord(" "), 0x0A, 0xC3, 0x00):
        assert len(tokens[b]) == 1 and tokens[b].isprintable()
    (merge,) = reader.fields["tokenizer.ggml.merges"].contents()
    left, right = merge.split(" ")
    assert left in tokens and right in tokens and tokens[256] == left + right
    assert decode[left] == 0xFF  # never occurs in UTF-8: the merge never fires


# ---- random fixtures behave like sparse models ---------------------------------------------------


@pytest.mark.parametrize("ffn_act", ["reglu", "drelu"])
def test_random_relu_model_is_sparse_with_hot_and_cold_neurons(tmp_path, ffn_act):
    model = write_llama_model(tmp_path / "m.gguf", n_embd=64, n_ff=256, n_layer=3, vocab="byte", ffn_act=ffn_act, seed=3)
    held_out = np.random.default_rng(123).integers(0, 256, size=(4, 48))  # not the calibration tokens
    config, _, layers, _ = _ffn_stats(model.path, held_out)
    assert config.ffn_act == ffn_act
    for layer, (_, active, _) in enumerate(layers):
        density = active.mean()
        assert 0.05 <= density <= 0.25, (layer, density)
        freq = active.reshape(-1, active.shape[-1]).mean(axis=0)
        top = np.sort(freq)[::-1][: len(freq) // 5]
        assert top.sum() / freq.sum() > 0.4, "the hottest 20% of neurons should carry well over 20% of activations"


def test_random_model_ffn_changes_the_output(tmp_path):
    model = write_llama_model(tmp_path / "m.gguf", n_layer=3, **{k: v for k, v in SMALL.items() if k != "n_layer"})
    tokens = np.random.default_rng(5).integers(0, 256, size=(2, 40))
    config, weights, _, logits = _ffn_stats(model.path, tokens)
    no_ffn = dict(weights)
    for i in range(config.n_layer):
        no_ffn[f"blk.{i}.ffn_down.weight"] = np.zeros_like(weights[f"blk.{i}.ffn_down.weight"])
    assert (forward_from_config(no_ffn, tokens, config).argmax(-1) != logits.argmax(-1)).mean() > 0.3
    as_swiglu = forward_from_config(weights, tokens, dataclasses.replace(config, ffn_act="swiglu"))
    assert (as_swiglu.argmax(-1) != logits.argmax(-1)).mean() > 0.3  # the activation choice matters too
    assert 0.5 < logits.std() < 20


def test_seed_reproducible(tmp_path):
    a = write_llama_model(tmp_path / "a.gguf", seed=7, **SMALL)
    b = write_llama_model(tmp_path / "b.gguf", seed=7, **SMALL)
    c = write_llama_model(tmp_path / "c.gguf", seed=8, **SMALL)
    assert a.path.read_bytes() == b.path.read_bytes() != c.path.read_bytes()


# ---- PowerInfer files ----------------------------------------------------------------------------


def test_powerinfer_file_layout(tmp_path):
    plain = write_llama_model(tmp_path / "plain.gguf", seed=4, **SMALL)
    sparse = write_llama_model(tmp_path / "m.powerinfer.gguf", seed=4, powerinfer=True, sparse_threshold=0.25, **SMALL)
    assert sparse.path.read_bytes()[:4] == b"PWRI"
    with pytest.raises(ValueError):
        GGUFReader(sparse.path)
    config = sparse.config
    assert config.is_powerinfer and config.ffn_down_transposed and config.ffn_act == "reglu"
    assert config.sparse_threshold == 0.25 and config.predictor_ranks == (64, 64)
    e, f, r = 64, 128, 64
    reader = _gguf_reader_copy(sparse.path, tmp_path)
    ne = {t.name: t.shape.tolist() for t in reader.tensors}
    by_name = {t.name: t for t in reader.tensors}
    plain_reader = GGUFReader(plain.path)
    for i in range(2):
        assert ne[f"blk.{i}.fc1.weight"] == [e, r]
        assert ne[f"blk.{i}.fc2.weight"] == [r, f]
        assert ne[f"blk.{i}.ffn_down_t.weight"] == [e, f]
        assert f"blk.{i}.ffn_down.weight" not in ne
        down = next(t for t in plain_reader.tensors if t.name == f"blk.{i}.ffn_down.weight").data
        np.testing.assert_array_equal(by_name[f"blk.{i}.ffn_down_t.weight"].data, down.T)
    for t in plain_reader.tensors:  # everything else is the same model
        if "ffn_down" not in t.name:
            assert by_name[t.name].data.tobytes() == t.data.tobytes(), t.name


def test_powerinfer_predictor_predicts(tmp_path):
    model = write_llama_model(tmp_path / "m.gguf", n_embd=64, n_ff=256, n_layer=3, vocab="byte", powerinfer=True, seed=2)
    _, weights, layers, _ = _ffn_stats(model.path, np.random.default_rng(77).integers(0, 256, size=(4, 48)))
    for layer, (gate_on, _, ffn_inp) in enumerate(layers):
        hidden = np.maximum(ffn_inp @ weights[f"blk.{layer}.fc1.weight"].T, 0)
        predicted = hidden @ weights[f"blk.{layer}.fc2.weight"].T >= model.config.threshold(layer)
        recall = (predicted & gate_on).sum() / gate_on.sum()
        assert recall > 0.85, (layer, recall)
        assert predicted.mean() < 0.5, "a predictor that predicts everything is useless"


def test_per_layer_predictor_ranks_and_thresholds(tmp_path):
    model = write_llama_model(
        tmp_path / "m.gguf", powerinfer=True, predictor_rank=[32, None], layer_thresholds=[0.5, -1.0], **SMALL
    )
    assert model.config.predictor_ranks == (32, None)
    assert "blk.1.fc1.weight" not in model.weights and model.weights["blk.0.fc1.weight"].shape == (32, 64)
    assert model.config.threshold(0) == 0.5 and model.config.threshold(1) == -1.0
    with pytest.raises(ValueError, match="predictor_rank"):
        write_llama_model(tmp_path / "bad.gguf", powerinfer=True, predictor_rank=[32], **SMALL)


def test_predictors_from_supplied_weights_and_quantized_powerinfer(tmp_path):
    base = write_llama_model(tmp_path / "base.gguf", **SMALL)
    model = write_llama_model(tmp_path / "q.gguf", weights=base.weights, powerinfer=True, predictor_rank=20,
                              weight_type="q4_0", **SMALL)
    with GGUFFile.open(model.path) as gguf:
        assert gguf.tensors["blk.0.ffn_down_t.weight"].ggml_type == QT.Q4_0
        assert gguf.tensors["blk.0.fc1.weight"].ggml_type == QT.Q4_0  # rows of n_embd = 64
        assert gguf.tensors["blk.0.fc2.weight"].ggml_type == QT.F16  # rows of rank 20: not whole blocks
        np.testing.assert_allclose(gguf.dequantize("blk.1.ffn_down_t.weight"), base.weights["blk.1.ffn_down.weight"].T, atol=0.2)


# ---- ModelConfig ---------------------------------------------------------------------------------


def test_config_reads_what_was_written(tmp_path):
    model = write_llama_model(tmp_path / "m.gguf", n_embd=96, n_ff=160, n_layer=3, n_head=6, n_head_kv=2, n_ctx=77,
                              norm_eps=1e-6, rope_freq_base=5e5, vocab="byte")
    c = model.config
    assert (c.arch, c.n_vocab, c.n_embd, c.n_ff, c.n_layer, c.n_head, c.n_head_kv, c.head_dim) == ("llama", 257, 96, 160, 3, 6, 2, 16)
    assert (c.rope_dim, c.n_ctx_train, c.rope_freq_base) == (16, 77, 5e5)
    assert c.norm_eps == pytest.approx(1e-6)
    assert not c.is_powerinfer and not c.has_predictors and not c.tied_embeddings and c.sparse_threshold == 0.0


def test_ffn_activation_sources(tmp_path):
    recorded = write_llama_model(tmp_path / "a.gguf", ffn_act="reglu", **SMALL)
    assert (recorded.config.ffn_act, recorded.config.ffn_act_source) == ("reglu", "metadata")
    dense = write_llama_model(tmp_path / "b.gguf", ffn_act="reglu", record_ffn_act=False, **SMALL)  # convert-dense.py style
    assert (dense.config.ffn_act, dense.config.ffn_act_source) == ("swiglu", "arch-default")
    overridden = load_config(dense.path, ffn_act="reglu")
    assert (overridden.ffn_act, overridden.ffn_act_source) == ("reglu", "override")
    pwri = write_llama_model(tmp_path / "c.gguf", ffn_act="reglu", record_ffn_act=False, powerinfer=True, **SMALL)
    assert (pwri.config.ffn_act, pwri.config.ffn_act_source) == ("reglu", "arch-default")
    bamboo = write_llama_model(tmp_path / "d.gguf", arch="bamboo", ffn_act="drelu", record_ffn_act=False, **SMALL)
    assert (bamboo.config.arch, bamboo.config.ffn_act, bamboo.config.ffn_act_source) == ("bamboo", "drelu", "arch-default")
    with pytest.raises(GGUFError, match="unknown FFN activation 'silu'"):
        load_config(dense.path, ffn_act="silu")
    for ungated in ("relu", "gelu"):
        with pytest.raises(GGUFError, match="does not fit arch 'llama'"):
            load_config(dense.path, ffn_act=ungated)


def _falcon_file(path: Path, *, qkv_rows: int = 3 * 32) -> Path:
    e, f, v = 32, 128, 10
    rng = np.random.default_rng(0)
    tensors = {
        "token_embd.weight": rng.normal(size=(v, e)), "output_norm.weight": np.ones(e), "output_norm.bias": np.zeros(e),
        "output.weight": rng.normal(size=(v, e)), "blk.0.attn_norm.weight": np.ones(e), "blk.0.attn_norm.bias": np.zeros(e),
        "blk.0.attn_qkv.weight": rng.normal(size=(qkv_rows, e)), "blk.0.attn_output.weight": rng.normal(size=(e, e)),
        "blk.0.ffn_up.weight": rng.normal(size=(f, e)), "blk.0.ffn_down.weight": rng.normal(size=(e, f)),
    }
    metadata = {
        "falcon.context_length": 64, "falcon.embedding_length": e, "falcon.block_count": 1,
        "falcon.attention.head_count": 2, "falcon.attention.head_count_kv": 2, "falcon.attention.layer_norm_epsilon": 1e-5,
        "tokenizer.ggml.tokens": [f"t{i}" for i in range(v)],
    }
    return write_model(path, "falcon", metadata, tensors, weight_type="f16")


def test_falcon_config(tmp_path):
    config = load_config(_falcon_file(tmp_path / "falcon.gguf"))
    assert (config.arch, config.ffn_act, config.ffn_act_source, config.n_ff) == ("falcon", "gelu", "arch-default", 128)  # stock Falcon
    assert config.norm_eps == pytest.approx(1e-5) and not config.is_gated
    with pytest.raises(GGUFError, match="does not fit arch 'falcon'"):
        load_config(tmp_path / "falcon.gguf", ffn_act="reglu")
    with pytest.raises(GGUFError, match=r"'blk.0.attn_qkv.weight' has shape \(64, 32\), expected \(96, 32\)"):
        load_config(_falcon_file(tmp_path / "bad.gguf", qkv_rows=64))


def test_validation_names_tensor_and_shapes(tmp_path):
    base = write_llama_model(tmp_path / "base.gguf", **SMALL)
    meta = {k: v for k, v in GGUFFile.open(base.path).metadata.items() if k != "general.architecture"}

    def write(weights, name="x.gguf", **kw):
        return write_model(tmp_path / name, "llama", meta, weights, **kw)

    missing = {k: v for k, v in base.weights.items() if k != "blk.1.attn_k.weight"}
    with pytest.raises(GGUFError, match=r"missing tensor 'blk.1.attn_k.weight' \(expected shape \(64, 64\)\)") as info:
        load_config(write(missing))
    assert str(tmp_path / "x.gguf") in str(info.value)
    wrong = dict(base.weights, **{"blk.0.ffn_up.weight": np.zeros((96, 64), dtype=np.float32)})
    with pytest.raises(GGUFError, match=r"'blk.0.ffn_up.weight' has shape \(96, 64\), expected \(128, 64\)"):
        load_config(write(wrong))
    half_predictor = dict(base.weights, **{"blk.0.fc1.weight": np.zeros((8, 64), dtype=np.float32)})
    with pytest.raises(GGUFError, match="blk.0.fc1.weight but no blk.0.fc2.weight"):
        load_config(write(half_predictor))
    mixed = dict(base.weights)
    mixed["blk.1.ffn_down_t.weight"] = mixed.pop("blk.1.ffn_down.weight").T.copy()
    with pytest.raises(GGUFError, match="mixes ffn_down and ffn_down_t"):
        load_config(write(mixed))
    tied = {k: v for k, v in base.weights.items() if k != "output.weight"}
    assert load_config(write(tied)).tied_embeddings
    with pytest.raises(GGUFError, match="unsupported architecture 'gpt2'"):
        load_config(write_model(tmp_path / "g.gguf", "gpt2", {}, {"w": np.ones((2, 32))}))
    bad_thresholds = dict(meta, **{"pi_backend.sparse_thresholds": np.zeros(5, dtype=np.float32)})
    with pytest.raises(GGUFError, match="pi_backend.sparse_thresholds"):
        load_config(write_model(tmp_path / "t.gguf", "llama", bad_thresholds, base.weights))
    no_heads = {k: v for k, v in meta.items() if k != "llama.attention.head_count"}
    with pytest.raises(GGUFError, match="missing metadata key 'llama.attention.head_count'"):
        load_config(write_model(tmp_path / "h.gguf", "llama", no_heads, base.weights))


# ---- tiny-relu -----------------------------------------------------------------------------------


def test_packaged_tiny_relu_is_the_trained_model():
    """Wrong names, RoPE layout or padding would ruin the loss; the trained model reaches ~1.5 nats/byte."""
    config = load_config(PACKAGED_TINY_RELU)
    assert (config.arch, config.n_vocab, config.n_embd, config.n_ff, config.n_layer, config.n_head) == ("llama", 257, 256, 704, 4, 4)
    assert (config.ffn_act, config.ffn_act_source, config.n_ctx_train) == ("reglu", "metadata", 128)
    assert PACKAGED_TINY_RELU.stat().st_size < 8_000_000
    tokens = np.frombuffer(ENGLISH.encode(), dtype=np.uint8).astype(np.int64)[:128]
    _, weights, layers, logits = _ffn_stats(PACKAGED_TINY_RELU, tokens)
    assert not weights["token_embd.weight"][256].any() and not weights["output.weight"][256].any()
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    nll = -log_probs[np.arange(len(tokens) - 1), tokens[1:]].mean()
    assert nll < 1.6, nll
    for layer, (_, active, _) in enumerate(layers):
        assert active.mean() < 0.3, (layer, active.mean())  # learned sparsity: 79-93% zeros


@pytest.mark.skipif(not SHARED_NPZ.exists(), reason="shared/fixtures not present")
def test_tiny_relu_conversion_reproduces_packaged_file(tmp_path):
    out = convert_tiny_relu(SHARED_NPZ, tmp_path / "tiny.gguf")
    assert out.read_bytes() == PACKAGED_TINY_RELU.read_bytes()
    q8 = convert_tiny_relu(SHARED_NPZ, tmp_path / "tiny-q8.gguf", weight_type="q8_0")
    assert GGUFFile.open(q8).tensors["blk.0.ffn_gate.weight"].ggml_type == QT.Q8_0


# ---- llama.cpp loads what we write ------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


@pytest.mark.parametrize("vocab", ["byte", "llama-spm"])
def test_llama_cpp_runs_written_model_and_matches_reference(tmp_path, llama_cpp, vocab):
    # llama.cpp's llama arch is SwiGLU, so a swiglu fixture must give the numpy reference's logits
    model = write_llama_model(tmp_path / "m.gguf", n_embd=64, n_ff=128, n_layer=2, n_head=4, n_head_kv=2,
                              vocab=vocab, ffn_act="swiglu", weight_type="f16")
    llm = llama_cpp.Llama(model_path=str(model.path), vocab_only=False, n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    tokens = llm.tokenize(b"Hello world, this is a test", add_bos=vocab != "byte")
    llm.eval(tokens)
    theirs = np.array(llm.scores[: len(tokens)])
    with GGUFFile.open(model.path) as gguf:
        ours = forward_from_config(read_float_weights(gguf), np.array(tokens), model.config)
    assert np.isfinite(theirs).all()
    assert np.abs(theirs - ours).max() < 0.02 * np.abs(ours).max()
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()


def test_llama_cpp_loads_quantized_and_tiny_relu(tmp_path, llama_cpp):
    q4 = write_llama_model(tmp_path / "q4.gguf", weight_type="q4_0", **SMALL)
    # logits_all: without it Llama.eval leaves `scores` unwritten (uninitialised memory)
    llm = llama_cpp.Llama(model_path=str(q4.path), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    llm.eval([1, 2, 3])
    logits = np.array(llm.scores[:3])
    assert np.isfinite(logits).all() and logits.std() > 0.1
    tiny = llama_cpp.Llama(model_path=str(PACKAGED_TINY_RELU), n_ctx=64, n_threads=1, verbose=False)
    text = "Hello, wörld".encode()
    tokens = tiny.tokenize(text, add_bos=False)
    assert tokens == list(text)  # byte vocabulary: token id = byte value
    assert tiny.detokenize(tokens) == text
