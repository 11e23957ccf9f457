"""llama_cpp.Llama(..., backend="powerinfer"): a drop-in whose logits are pi_backend's.

The contract is checked against stock llama-cpp-python on the same plain llama GGUF (SiLU, F32, dense
mode): completions, sampling with the whole chain, grammar, chat, logprobs, streaming and stop strings
must give the same output. With llama.cpp's KV cache in F32 the two forward passes agree to ~1e-6 of
the logits' spread, so even sampling from the full distribution is identical; with its default F16 KV
cache on both sides (type_k / type_v unset: pi_backend's default is F16 too) greedy and the default
sampler chain still are.
"""
from __future__ import annotations

import json
import pickle
import struct
import tomllib
from pathlib import Path

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

import pi_backend  # noqa: E402
import pi_backend.adapters.llamacpp as adapter  # noqa: E402
from pi_backend.adapters.llamacpp import PowerInferLlama, UnsupportedFeatureError  # noqa: E402
from pi_backend.adapters.llamacpp._version import SUPPORTED, UnsupportedLlamaCppVersion, check_version  # noqa: E402
from pi_backend.model.factory import write_llama_model  # noqa: E402

N_CTX = 256
PROMPT = "The quick brown fox jumps over the lazy dog because"
F32 = llama_cpp.GGML_TYPE_F32


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("llamacpp_adapter")
    silu = write_llama_model(d / "silu-f32.gguf", n_embd=128, n_ff=320, n_layer=2, n_head=4, n_head_kv=2,
                             ffn_act="swiglu", weight_type="f32", record_ffn_act=False, seed=1, n_ctx=512)
    pwri = write_llama_model(d / "relu.powerinfer.gguf", n_embd=128, n_ff=512, n_layer=2, n_head=4,
                             ffn_act="reglu", powerinfer=True, predictor_rank=64, weight_type="f16", seed=2,
                             n_ctx=512)
    return {"silu": str(silu.path), "pwri": str(pwri.path)}


def _pi(path, f32_kv=True, **kw):
    kw = {"n_ctx": N_CTX, "n_threads": 1, "verbose": False, **kw}
    if f32_kv:  # as _stock: both caches in F32, so the two forward passes agree to ~1e-6
        kw.update(type_k=F32, type_v=F32)
    return llama_cpp.Llama(model_path=path, backend="powerinfer", **kw)


def _stock(path, f32_kv=True, **kw):
    kw = {"n_ctx": N_CTX, "n_threads": 1, "n_threads_batch": 1, "verbose": False, **kw}
    if f32_kv:
        kw.update(type_k=F32, type_v=F32)
    return llama_cpp.Llama(model_path=path, **kw)


@pytest.fixture(scope="module")
def pi_dense(files):
    return _pi(files["silu"], mode="dense")


@pytest.fixture(scope="module")
def stock(files):
    return _stock(files["silu"])


def _text(out) -> str:
    return out["choices"][0]["text"]


# ---------------------------------------------------------------------------------------------- dispatch
def test_backend_keyword_selects_pi_backend(files, pi_dense, stock):
    assert type(pi_dense) is PowerInferLlama and isinstance(pi_dense, llama_cpp.Llama)
    assert pi_dense._pi.mode == "dense" and pi_dense._pi.n_threads == 1
    assert type(stock) is llama_cpp.Llama and not hasattr(stock, "_pi")
    default = _stock(files["silu"], f32_kv=False, backend="llama.cpp")
    assert type(default) is llama_cpp.Llama
    # the same vocabulary, metadata, chat format and context as stock
    assert pi_dense.n_vocab() == stock.n_vocab() == 32000
    assert pi_dense.n_ctx() == stock.n_ctx() == N_CTX
    assert pi_dense.n_embd() == stock.n_embd() == 128
    assert pi_dense.metadata == stock.metadata and pi_dense.chat_format == stock.chat_format
    assert pi_dense.tokenize(PROMPT.encode()) == stock.tokenize(PROMPT.encode())
    assert pi_dense.model_path == files["silu"]
    # the adapter's own class, and engine options
    sub = adapter.Llama(files["pwri"], n_ctx=N_CTX, verbose=False, threshold=0.5)
    assert isinstance(sub, llama_cpp.Llama) and sub._pi.mode == "sparse"
    assert all(f.threshold == 0.5 for f in sub._pi.ffn)
    with pytest.raises(ValueError, match="backend"):
        llama_cpp.Llama(model_path=files["silu"], backend="vllm", verbose=False)
    with pytest.raises(ValueError, match="mode.*backend='powerinfer'"):
        llama_cpp.Llama(model_path=files["silu"], mode="sparse", verbose=False)  # stock would ignore it
    with pytest.raises(ValueError, match="mode"):
        _pi(files["silu"], mode="fast")
    with pytest.raises(ValueError, match="does not exist"):
        _pi(files["silu"] + ".missing")
    assert _pi(files["silu"], n_ctx=0).n_ctx() == 512  # 0: the model's training context, as stock
    # use_mmap is llama.cpp's own option: both backends take it, ours reads the weights into memory
    in_memory = _pi(files["silu"], mode="dense", use_mmap=False)
    assert in_memory._pi.options.use_mmap is False and pi_dense._pi.options.use_mmap is True
    assert in_memory.tokenize(b"Hello") == pi_dense.tokenize(b"Hello")
    assert type(_stock(files["silu"], use_mmap=False)) is llama_cpp.Llama


def test_verbose_timings_and_context_overflow(files, capsys):
    llm = _pi(files["pwri"], verbose=True)
    llm.create_completion("Hello", max_tokens=3, temperature=0.0)
    assert "pi_backend: eval 4 tokens" in capsys.readouterr().err  # 2 prompt tokens + 2 decode steps
    # stock's own check, whose message the server turns into an OpenAI context_length_exceeded error
    with pytest.raises(ValueError, match=r"Requested tokens \(\d+\) exceed context window of 256"):
        llm.create_completion("word " * 300, max_tokens=3)


def test_install_is_idempotent_and_uninstall_restores_stock(files):
    adapter.install()
    adapter.install()
    assert adapter.is_installed()
    try:
        adapter.uninstall()
        assert not adapter.is_installed()
        plain = _stock(files["silu"], f32_kv=False, backend="powerinfer")  # stock ignores unknown keywords
        assert type(plain) is llama_cpp.Llama
        plain.close()
    finally:
        adapter.install()
    assert type(_pi(files["silu"], mode="dense")) is PowerInferLlama


# ---------------------------------------------------------------------------------------------- contract
SAMPLING = {
    "greedy": dict(temperature=0.0),
    "default-chain": dict(temperature=0.8, seed=1234),
    "full-distribution": dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7),
    "top-k-top-p-min-p": dict(temperature=1.3, top_k=20, top_p=0.9, min_p=0.02, seed=99),
    "typical": dict(temperature=0.9, typical_p=0.6, seed=5),
    "penalties": dict(temperature=0.7, repeat_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.3, seed=11),
    "mirostat-v1": dict(temperature=0.8, mirostat_mode=1, mirostat_tau=4.0, seed=3),
    "mirostat-v2": dict(temperature=0.8, mirostat_mode=2, mirostat_tau=4.0, mirostat_eta=0.2, seed=3),
    "logit-bias": dict(temperature=0.0, logit_bias={450: 50.0}),
}


@pytest.mark.parametrize("name", SAMPLING)
def test_create_completion_matches_stock_llama_cpp(pi_dense, stock, name):
    kw = dict(max_tokens=40, **SAMPLING[name])
    ours, ref = pi_dense.create_completion(PROMPT, **kw), stock.create_completion(PROMPT, **kw)
    assert _text(ours) == _text(ref)
    assert ours["usage"] == ref["usage"] and ours["choices"][0]["finish_reason"] == ref["choices"][0]["finish_reason"]
    assert ours["usage"]["completion_tokens"] > 0
    if name == "logit-bias":
        assert _text(ours).split() == ["The"] * 40  # +50 on token 450 (" The") wins every step


def test_default_f16_kv_agrees_with_stock_as_users_run_it(files, pi_dense):
    """Both as users run them, with the default F16 KV cache (type_k / type_v unset): greedy and the
    default seeded chain give the same text, and the logits sit closer to stock's than with our cache in
    F32 (llama.cpp also rounds q and the attention weights to F16 on this path, so not to ~1e-6)."""
    ours = _pi(files["silu"], f32_kv=False, mode="dense", logits_all=True)
    ref = _stock(files["silu"], f32_kv=False, logits_all=True)
    ours32 = _pi(files["silu"], mode="dense", logits_all=True)
    assert ours._pi.options.kv_type == "f16" and ours32._pi.options.kv_type == "f32"
    assert ours._pi.state.k.dtype == np.float16 and ours32._pi.state.k.dtype == np.float32
    tokens = ref.tokenize(PROMPT.encode())

    def logits(m):
        m.reset()
        m.eval(tokens)
        return np.array(m.scores[: m.n_tokens], np.float64)

    f16, f32, stock16 = logits(ours), logits(ours32), logits(ref)
    err16, err32 = (np.abs(a - stock16).max() / stock16.std() for a in (f16, f32))
    assert err16 < 2e-3 and err16 < err32  # measured: 1.2e-3 and 1.9e-3
    for kw in (dict(temperature=0.0), dict(temperature=0.8, seed=42), dict(temperature=0.8, seed=43)):
        assert _text(ours.create_completion(PROMPT, max_tokens=48, **kw)) == \
               _text(ref.create_completion(PROMPT, max_tokens=48, **kw))


def test_grammar_and_chat_match_stock(pi_dense, stock):
    grammar = llama_cpp.LlamaGrammar.from_string('root ::= ("yes" | "no" | "maybe") " " [a-z]+ "."')
    kw = dict(max_tokens=24, temperature=0.9, seed=8, grammar=grammar)
    ours = _text(pi_dense.create_completion("Answer:", **kw))
    assert ours == _text(stock.create_completion("Answer:", **kw))
    assert ours.split(" ")[0] in ("yes", "no", "maybe")
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    for fmt in (None, "chatml"):
        pi_dense.chat_format = stock.chat_format = fmt or "llama-2"
        a = pi_dense.create_chat_completion(messages=messages, max_tokens=16, temperature=0.0)
        b = stock.create_chat_completion(messages=messages, max_tokens=16, temperature=0.0)
        assert a["choices"][0]["message"] == b["choices"][0]["message"] and a["usage"] == b["usage"]
    pi_dense.chat_format = stock.chat_format = "llama-2"
    # JSON mode: the JSON grammar is applied to our logits just as to llama.cpp's
    kw = dict(messages=messages, max_tokens=24, temperature=0.0, response_format={"type": "json_object"})
    a, b = pi_dense.create_chat_completion(**kw), stock.create_chat_completion(**kw)
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
    assert a["choices"][0]["message"]["content"].lstrip()[:1] in ("{", "")


def test_logprobs_echo_streaming_and_stop_strings_match_stock(files):
    ours, ref = _pi(files["silu"], mode="dense", logits_all=True), _stock(files["silu"], logits_all=True)
    a = ours.create_completion(PROMPT, max_tokens=12, temperature=0.0, logprobs=3, echo=True)
    b = ref.create_completion(PROMPT, max_tokens=12, temperature=0.0, logprobs=3, echo=True)
    la, lb = a["choices"][0]["logprobs"], b["choices"][0]["logprobs"]
    assert _text(a) == _text(b) and la["tokens"] == lb["tokens"] and la["text_offset"] == lb["text_offset"]
    np.testing.assert_allclose([x for x in la["token_logprobs"] if x is not None],
                               [x for x in lb["token_logprobs"] if x is not None], atol=1e-4)
    assert [sorted(t) for t in la["top_logprobs"] if t] == [sorted(t) for t in lb["top_logprobs"] if t]
    # streaming yields the same text, chunk by chunk
    full = _text(ours.create_completion(PROMPT, max_tokens=24, temperature=0.0))
    chunks = list(ours.create_completion(PROMPT, max_tokens=24, temperature=0.0, stream=True))
    assert "".join(c["choices"][0]["text"] for c in chunks) == full and len(chunks) > 3
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    ref_chunks = list(ref.create_completion(PROMPT, max_tokens=24, temperature=0.0, stream=True))
    assert [c["choices"][0]["text"] for c in chunks] == [c["choices"][0]["text"] for c in ref_chunks]
    # a stop string cuts the text before it, streaming or not
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = ours.create_completion(PROMPT, max_tokens=24, temperature=0.0, stop=[stop])
    assert _text(cut) == full[: full.index(stop)] and cut["choices"][0]["finish_reason"] == "stop"
    streamed = ours.create_completion(PROMPT, max_tokens=24, temperature=0.0, stop=[stop], stream=True)
    assert "".join(c["choices"][0]["text"] for c in streamed) == _text(cut)


# ------------------------------------------------------------------------ the logits are pi_backend's
def test_sampler_sees_exactly_the_logits_pi_backend_computed(files):
    llm = _pi(files["pwri"])
    produced, seen = [], []
    forward = llm._pi.forward

    def spy(tokens, all_logits=False):
        out = forward(tokens, all_logits)
        produced.append(out[-1].copy())
        return out

    llm._pi.forward = spy

    def processor(input_ids, scores):
        seen.append(np.array(scores, copy=True))
        return scores

    prompt = llm.tokenize(b"Hello world")
    out = llm.create_completion(prompt, max_tokens=10, temperature=0.0,
                                logits_processor=llama_cpp.LogitsProcessorList([processor]))
    n = out["usage"]["completion_tokens"]
    assert n == 10 and len(seen) == n and len(produced) == n  # prefill + 9 decode steps, one sample each
    for s, p in zip(seen, produced):
        assert np.array_equal(s, p)
    # and the greedy chain picked the argmax of exactly those logits
    picked = [int(np.argmax(p)) for p in produced]
    assert llm.input_ids[len(prompt): llm.n_tokens].tolist() == picked[:-1]
    assert llm.detokenize(picked, prev_tokens=prompt).decode("utf-8", errors="ignore") == _text(out)


def test_powerinfer_file_runs_where_llama_cpp_cannot(files):
    with pytest.raises(ValueError):
        llama_cpp.Llama(model_path=files["pwri"], verbose=False)  # llama.cpp cannot open PWRI files
    llm = _pi(files["pwri"])
    assert llm._pi.mode == "sparse" and llm._pi.config.is_powerinfer
    engine = pi_backend.load(files["pwri"], n_ctx=N_CTX, n_threads=1)
    prompt = llm.tokenize(PROMPT.encode())
    out = llm.create_completion(prompt, max_tokens=24, temperature=0.0)
    toks = list(engine.stream(prompt, max_tokens=24, stop_at_eos=True))
    assert _text(out) == llm.detokenize(toks, prev_tokens=prompt).decode("utf-8", errors="ignore")
    listed = np.mean([f.stats.listed_fraction for f in llm._pi.ffn])
    assert 0 < listed < 0.6  # the predictor chose a minority of neurons, inside create_completion


def test_tokens_follow_our_ffn_where_llama_cpp_would_differ(files, stock):
    """The SiLU file run as ReGLU (ffn_act override): llama.cpp's forward would pick other tokens."""
    relu = _pi(files["silu"], ffn_act="reglu", mode="dense")
    prompt = relu.tokenize(PROMPT.encode())
    ours = relu.create_completion(prompt, max_tokens=24, temperature=0.0)
    engine = pi_backend.load(files["silu"], n_ctx=N_CTX, n_threads=1, ffn_act="reglu", mode="dense")
    expect = list(engine.stream(prompt, max_tokens=24))
    assert _text(ours) == relu.detokenize(expect, prev_tokens=prompt).decode("utf-8", errors="ignore")
    assert _text(ours) != _text(stock.create_completion(prompt, max_tokens=24, temperature=0.0))


# ------------------------------------------------------------------------- KV cache: reuse, state, caches
def _count_forwarded(llm):
    counts = []
    forward = llm._pi.forward

    def spy(tokens, all_logits=False):
        counts.append(len(tokens))
        return forward(tokens, all_logits)

    llm._pi.forward = spy
    return counts


# The KV-cache tests run the PowerInfer file in oracle mode (exact). In sparse mode a batch of tokens shares
# one predicted active set (the union), so re-evaluating a suffix, or drafts in a batch, legitimately gives
# slightly different logits from evaluating the same tokens in other batches.
def test_prefix_reuse_and_speculative_rollback(files):
    llm, fresh = _pi(files["pwri"], mode="oracle"), _pi(files["pwri"], mode="oracle")
    counts = _count_forwarded(llm)
    a = llm.create_completion(PROMPT, max_tokens=8, temperature=0.0)
    n_prompt = a["usage"]["prompt_tokens"]
    assert counts[0] == n_prompt
    counts.clear()
    b = llm.create_completion(PROMPT + " the sun", max_tokens=8, temperature=0.0)
    assert counts[0] < b["usage"]["prompt_tokens"] - n_prompt + 2  # only the new suffix was evaluated
    assert _text(b) == _text(fresh.create_completion(PROMPT + " the sun", max_tokens=8, temperature=0.0))
    # prompt-lookup decoding: drafts evaluated in one batch (logits_all), mismatches rolled back through
    # kv_cache_seq_rm. A bias towards " one" / " two" makes the drafts (copied from the prompt) partly right.
    draft = llama_cpp.llama_speculative.LlamaPromptLookupDecoding(num_pred_tokens=4)
    spec = _pi(files["pwri"], draft_model=draft, mode="oracle")
    counts = _count_forwarded(spec)
    rep = "one two three four one two three four one two three four one two"
    one, two = spec.tokenize(b"one two", add_bos=False)[-2:]
    kw = dict(max_tokens=24, temperature=0.0, logit_bias={one: 8.0, two: 8.0})
    s = spec.create_completion(rep, **kw)
    assert max(counts[1:]) > 1  # drafts were batched
    assert sum(counts) > spec.n_tokens  # and some were rolled back
    assert _text(s) == _text(fresh.create_completion(rep, **kw))
    assert "one two" in _text(s) and _text(s).split() != ["one", "two"] * 12
    # after the rollbacks the KV cache is the one a straight evaluation of the same tokens gives
    ids = spec.input_ids[: spec.n_tokens].tolist()
    straight = _pi(files["pwri"], logits_all=True, mode="oracle")
    straight.eval(ids)
    ours = spec.scores[: len(ids)]
    np.testing.assert_allclose(ours, straight.scores[: len(ids)], rtol=0, atol=1e-3 * np.abs(ours).max())


def test_save_state_load_state_and_ram_cache(files):
    llm, fresh = _pi(files["pwri"], mode="oracle"), _pi(files["pwri"], mode="oracle")
    prompt = llm.tokenize(PROMPT.encode())
    llm.reset()
    llm.eval(prompt)
    state = llm.save_state()
    assert state.n_tokens == len(prompt) and state.llama_state_size == len(state.llama_state) > 0
    first = [llm.sample(temp=0.0)]
    llm.eval(first)
    first.append(llm.sample(temp=0.0))
    llm.load_state(pickle.loads(pickle.dumps(state)))  # LlamaDiskCache pickles states
    assert llm.n_tokens == len(prompt) and llm._pi.n_past == len(prompt)
    again = [llm.sample(temp=0.0)]
    llm.eval(again)
    again.append(llm.sample(temp=0.0))
    assert again == first
    # generate after load_state (exact prompt cached): same as a fresh model
    llm.load_state(state)
    out = llm.create_completion(prompt, max_tokens=8, temperature=0.0)
    assert _text(out) == _text(fresh.create_completion(prompt, max_tokens=8, temperature=0.0))
    # the cache in its own type, not widened (an F16 cache: half the bytes); a truncated state is refused
    def kv_bytes(st):  # (the cache's type, bytes per value in the blob)
        hlen = struct.unpack_from("<I", st.llama_state, 4)[0]
        h = json.loads(st.llama_state[8:8 + hlen])
        rest = len(st.llama_state) - 8 - hlen - (4 * llm.n_vocab() if h["last_logits"] else 0)
        return h["kv"], rest / (2 * np.prod(h["shape"]))
    assert kv_bytes(state) == ("f32", 4)  # type_k / type_v F32 here
    half = _pi(files["pwri"], f32_kv=False, mode="oracle")
    half.eval(prompt)
    tok = half.sample(temp=0.0)
    half_state = half.save_state()
    assert kv_bytes(half_state) == ("f16", 2)
    half.reset()
    half.load_state(half_state)
    assert half.sample(temp=0.0) == tok
    # a version-1 state (before the KV type was recorded: always f32) still loads
    hlen = struct.unpack_from("<I", state.llama_state, 4)[0]
    h = json.loads(state.llama_state[8:8 + hlen])
    del h["kv"]
    h1 = json.dumps({**h, "version": 1}).encode()
    v1 = b"PIKV" + struct.pack("<I", len(h1)) + h1 + state.llama_state[8 + hlen:]
    llm.load_state(llama_cpp.LlamaState(state.input_ids, state.scores, state.n_tokens, v1, len(v1), state.seed))
    assert llm.sample(temp=0.0) == first[0]
    with pytest.raises(ValueError, match="truncated"):
        llm.load_state(llama_cpp.LlamaState(state.input_ids, state.scores, state.n_tokens, state.llama_state[:-100],
                                            state.llama_state_size - 100, state.seed))
    # a state from another model is refused, not loaded
    other = _pi(files["silu"], mode="dense")
    with pytest.raises(ValueError, match="load_state"):
        other.load_state(state)
    # LlamaRAMCache: a cache hit restores our KV cache
    cached = _pi(files["pwri"], mode="oracle")
    cached.set_cache(llama_cpp.LlamaRAMCache(capacity_bytes=1 << 30))
    counts = _count_forwarded(cached)
    p1, p2 = PROMPT, "Completely different words here"
    r1 = cached.create_completion(p1, max_tokens=6, temperature=0.0)
    cached.create_completion(p2, max_tokens=6, temperature=0.0)
    counts.clear()
    r3 = cached.create_completion(p1 + _text(r1), max_tokens=6, temperature=0.0)
    assert sum(counts) < r3["usage"]["prompt_tokens"]  # restored from the cache, not recomputed
    assert _text(r3) == _text(fresh.create_completion(p1 + _text(r1), max_tokens=6, temperature=0.0))


def test_pickle_round_trip_keeps_backend_and_options(files):
    llm = _pi(files["pwri"], threshold=0.25)
    copy = pickle.loads(pickle.dumps(llm))
    assert type(copy) is PowerInferLlama and copy.model_path == files["pwri"]
    assert copy._pi.mode == "sparse" and all(f.threshold == 0.25 for f in copy._pi.ffn)
    kw = dict(max_tokens=8, temperature=0.0)
    assert _text(copy.create_completion(PROMPT, **kw)) == _text(llm.create_completion(PROMPT, **kw))


# ---------------------------------------------------------------------------------------- refusals
def test_unsupported_features_raise_clearly(files, pi_dense):
    path = files["silu"]
    with pytest.raises(UnsupportedFeatureError, match="LoRA"):
        _pi(path, lora_path=path)
    with pytest.raises(UnsupportedFeatureError, match="embedding"):
        _pi(path, embedding=True)
    llava = object.__new__(llama_cpp.llama_chat_format.Llava15ChatHandler)
    with pytest.raises(UnsupportedFeatureError, match="multimodal"):
        _pi(path, chat_handler=llava)
    with pytest.raises(UnsupportedFeatureError, match="kv_overrides"):
        _pi(path, kv_overrides={"llama.context_length": 64})
    with pytest.raises(UnsupportedFeatureError, match="rope_freq_base"):
        _pi(path, rope_freq_base=50000.0)
    with pytest.raises(UnsupportedFeatureError, match="vocab_only"):
        _pi(path, vocab_only=True)
    with pytest.raises(UnsupportedFeatureError, match="KV cache type"):
        _pi(path, f32_kv=False, type_k=llama_cpp.GGML_TYPE_Q8_0, type_v=llama_cpp.GGML_TYPE_Q8_0)
    with pytest.raises(UnsupportedFeatureError, match="share one type"):
        _pi(path, f32_kv=False, type_k=F32)  # V stays at llama.cpp's default, F16
    with pytest.raises(UnsupportedFeatureError, match="embeddings"):
        pi_dense.create_embedding("hello")
    # tokenizer-only kv_overrides are applied to the vocabulary, as stock does
    ok = _pi(path, kv_overrides={"tokenizer.ggml.add_bos_token": False})
    assert ok.tokenize(b"Hello")[0] != ok.token_bos()

    class MyLlama(llama_cpp.Llama):
        pass

    with pytest.raises(TypeError, match="PowerInferLlama"):
        MyLlama(model_path=path, backend="powerinfer", verbose=False)


def test_version_pin_is_checked():
    check_version(llama_cpp.__version__)
    check_version("0.3.36")
    for bad in ("0.3.35", "0.3.37", "0.4.0", "1.0.0", "garbage"):
        with pytest.raises(UnsupportedLlamaCppVersion, match=r">=0\.3\.36,<0\.3\.37"):
            check_version(bad)
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert f"llama-cpp-python{SUPPORTED}" in pyproject["project"]["optional-dependencies"]["llamacpp"]


def test_json_mode_output_is_json_when_complete(files):
    """With enough tokens the JSON grammar closes the object: the text parses."""
    llm = _pi(files["pwri"])
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    out = llm.create_chat_completion(messages=[{"role": "user", "content": "Reply in JSON."}], max_tokens=96,
                                     temperature=0.0, response_format={"type": "json_object", "schema": schema})
    assert isinstance(json.loads(out["choices"][0]["message"]["content"])["ok"], bool)
