"""vLLM adapter (`vllm serve MODEL --model-impl powerinfer`), end to end on a small ReLU llama.

Runs in the vLLM environment (scripts/setup-vllm.sh, then `.venv-vllm/bin/python -m pytest
tests/test_vllm_adapter.py`); skips cleanly where vLLM is not importable (the main .venv).

The model: a PowerInfer GGUF from the fixture factory (LLaMA-2 vocabulary, ReGLU, calibrated ~85%
sparsity, a fitted predictor, float32, weights scaled so the FFN changes the greedy tokens), converted
with `pi-backend convert --to-hf`. The reference is HF transformers on the same directory.

Few, purposeful engine start-ups: one in-process engine (torch.compile on) for the offline checks, one
`vllm serve`, one tensor-parallel engine in a subprocess.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed here (scripts/setup-vllm.sh makes .venv-vllm)")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
ARCH = "PowerInferForCausalLM"
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                 "{% else %} {{ m['content'] }}{% endif %}{% endfor %}")
PROMPTS = ["Hello world", "The Python interpreter is", "In 1492, Columbus sailed"]
N_NEW = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from pi_backend.model.factory import write_llama_model
    from pi_backend.tools.convert_hf import main as convert_main

    tmp = tmp_path_factory.mktemp("vllm_model")
    fx = write_llama_model(tmp / "tiny.powerinfer.gguf", n_embd=128, n_ff=512, n_layer=2, n_head=2, n_ctx=512,
                           weight_type="f32", powerinfer=True, predictor_rank=32, vocab="llama-spm", seed=3)
    (tmp / "chat.jinja").write_text(CHAT_TEMPLATE)
    out = tmp / "hf"
    assert convert_main(["--to-hf", str(fx.path), str(out), "--chat-template", str(tmp / "chat.jinja")]) == 0
    return out, fx


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, _ = model_dir
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def hf_greedy(hf_model, prompt: str, predictor=None) -> list[int]:
    """HF transformers greedy tokens; with `predictor` (per-layer (fc1, fc2, threshold)), each token's
    FFN computes only the neurons its own predictor logits select, i.e. exactly what the adapter's
    sparse mode computes (a prompt's tokens each over their own set, as decoding them one by one)."""
    model, tok = hf_model
    hooks = []
    if predictor is not None:
        for i, layer in enumerate(model.model.layers):
            fc1, fc2, thr = predictor[i]
            seen = {}
            hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(
                lambda mod, args, seen=seen: seen.__setitem__("ffn_inp", args[0])))

            def masked(mod, args, out, seen=seen, fc1=fc1, fc2=fc2, thr=thr):
                x = args[0]
                inp = seen["ffn_inp"].reshape(-1, x.shape[-1])
                active = ((torch.relu(inp @ fc1.T) @ fc2.T) >= thr).reshape(x.shape[:-1] + (-1,))
                h = torch.relu(mod.gate_proj(x)) * mod.up_proj(x) * active
                return mod.down_proj(h)

            hooks.append(layer.mlp.register_forward_hook(masked))
    try:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=N_NEW, do_sample=False, pad_token_id=tok.eos_token_id)
        return out[0, ids.shape[1]:].tolist()
    finally:
        for h in hooks:
            h.remove()


# ---- conversion and routing (no engine) -----------------------------------------------------------

def test_convert_to_hf_is_exact_and_round_trips(model_dir, hf_model, tmp_path):
    from pi_backend.model.gguf_file import GGUFFile
    from pi_backend.model.numpy_reference import forward_from_config
    from pi_backend.tools.convert_hf import from_hf

    path, fx = model_dir
    model, tok = hf_model
    # llama.cpp's SentencePiece rules: BOS, a space prefix, byte fallback
    assert tok("Hello world").input_ids == [1, 15043, 3186]
    assert tok(" leading space").input_ids == [1, 29871, 8236, 2913]
    text = "The Python interpreter\n\nis 42 ünïcode 日本語 🙂"
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    ids = tok(text).input_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].numpy()
    ref = forward_from_config(fx.weights, np.array(ids), fx.config)
    assert np.abs(logits - ref).max() < 1e-3 * np.abs(ref).max()
    config = json.loads((path / "config.json").read_text())
    assert config["hidden_act"] == "relu" and config["powerinfer"]["ffn_act"] == "reglu"
    assert (path / "predictor.safetensors").is_file()

    back = from_hf(path, tmp_path / "back.gguf", weight_type="f32")
    with GGUFFile.open(back) as g, GGUFFile.open(fx.path) as g0:
        assert g.is_powerinfer and set(g.tensors) == set(g0.tensors)
        for name in g0.tensors:
            np.testing.assert_array_equal(g.dequantize(name), g0.dequantize(name), err_msg=name)


def test_tokenizer_matches_transformers_gguf_conversion(model_dir, tmp_path):
    """Our tokenizer.json (no transformers, no sentencepiece needed to write it) against transformers'
    own GGUF -> tokenizer conversion of the same vocabulary."""
    import shutil

    from transformers import AutoTokenizer

    from pi_backend.model.vocab import VOCAB_DIR

    path, _ = model_dir
    ours = AutoTokenizer.from_pretrained(path)
    shutil.copy(VOCAB_DIR / "ggml-vocab-llama-spm.gguf", tmp_path / "vocab.gguf")
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="vocab.gguf")
    for text in ["Hello world", "The Python interpreter", "naïve café, 1234567 tokens!\n\tTabs", "日本語のテキスト",
                 "def f(x):\n    return x ** 2  # comment", "emoji 🙂🚀 and tags"]:
        assert ours(text, add_special_tokens=False).input_ids == theirs(text, add_special_tokens=False).input_ids, text


def test_plugin_routes_model_impl_powerinfer_and_rejects_others(model_dir, tmp_path):
    from vllm.config import ModelConfig
    from vllm.model_executor.model_loader.utils import get_model_architecture

    from pi_backend.adapters.vllm import plugin
    from pi_backend.adapters.vllm.model import PowerInferForCausalLM

    plugin.register()
    plugin.register()  # idempotent: one wrapper, not two
    from vllm.model_executor.models.registry import _ModelRegistry

    assert getattr(_ModelRegistry.inspect_model_cls, "_pi_backend_powerinfer", False)
    assert not getattr(_ModelRegistry.inspect_model_cls.__wrapped__, "_pi_backend_powerinfer", False)

    path, _ = model_dir
    cfg = ModelConfig(model=str(path), model_impl="powerinfer", dtype="float32")
    assert cfg.architecture == ARCH
    cls, arch = get_model_architecture(cfg)
    assert cls is PowerInferForCausalLM and arch == ARCH
    assert ModelConfig(model=str(path), dtype="float32").architecture == "LlamaForCausalLM"  # stock path untouched

    def variant(name: str, **changes) -> Path:
        d = tmp_path / name
        d.mkdir()
        config = json.loads((path / "config.json").read_text())
        config.update(changes)
        (d / "config.json").write_text(json.dumps(config))
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (d / f).write_text((path / f).read_text())
        return d

    with pytest.raises(Exception, match="not supported"):
        ModelConfig(model=str(variant("gelu", hidden_act="gelu")), model_impl="powerinfer")
    with pytest.raises(Exception, match=r"not supported.*llama-family"):
        ModelConfig(model=str(variant("qwen", architectures=["Qwen2ForCausalLM"], model_type="qwen2")),
                    model_impl="powerinfer")
    silu = ModelConfig(model=str(variant("silu", hidden_act="silu", powerinfer={"sparse_threshold": 0.01})),
                       model_impl="powerinfer")
    assert silu.architecture == ARCH
    from pi_backend.adapters.vllm.options import resolve_options

    opts = resolve_options(silu.hf_config)
    assert (opts.ffn_act, opts.mode) == ("swiglu", "threshold")
    with pytest.raises(Exception, match="needs a ReLU-family FFN"):
        ModelConfig(model=str(variant("silu_sparse", hidden_act="silu", powerinfer={"mode": "sparse"})),
                    model_impl="powerinfer")


# ---- offline engine: torch.compile, oracle == transformers, sparse == masked transformers, unions --

@pytest.fixture(scope="module")
def llm(model_dir):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # one process: the test reaches the layers
    from vllm import LLM

    path, _ = model_dir
    # dense_crossover 1.0: the sparse kernel for every batch (on this tiny layer torch's dense GEMM wins
    # above ~40% density, and the measured crossover would send most calls dense)
    engine = LLM(model=str(path), model_impl="powerinfer", dtype="float32", max_model_len=512,
                 max_num_batched_tokens=64, max_num_seqs=8, seed=0, hf_overrides={"powerinfer_dense_crossover": 1.0})
    yield engine
    del engine


def _layers():
    from pi_backend.adapters.vllm.ffn import all_layers

    return all_layers()


def _generate(engine, prompts, n=N_NEW):
    from vllm import SamplingParams

    outs = engine.generate(prompts, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def test_offline_greedy_matches_transformers(llm, hf_model):
    assert llm.llm_engine.model_config.architecture == ARCH
    assert llm.llm_engine.vllm_config.compilation_config.mode != 0  # torch.compile on (not eager)
    layers = _layers()
    assert [m.layer_idx for m in layers] == [0, 1] and all(m.mode == "sparse" for m in layers)
    try:
        for m in layers:
            m.mode = "oracle"  # every neuron listed, the kernel skips silent ones: exact
        assert _generate(llm, PROMPTS) == [hf_greedy(hf_model, p) for p in PROMPTS]

        for m in layers:
            m.mode = "sparse"
            m.stats.__init__()
        predictor = [(m.fc1.float(), m.fc2.float(), m.threshold) for m in layers]
        for p in PROMPTS:  # one sequence at a time: prefill = the prompt's union, then one token a step
            assert _generate(llm, [p]) == [hf_greedy(hf_model, p, predictor)], p
        assert all(m.stats.sparse_calls > 0 and m.stats.density < 0.8 for m in layers), [m.stats for m in layers]
        # ... and the predictor matters: unmasked transformers differs somewhere
        assert any(hf_greedy(hf_model, p) != hf_greedy(hf_model, p, predictor) for p in PROMPTS)
    finally:
        for m in layers:
            m.mode = "sparse"


def test_mixed_prefill_decode_batches_read_the_union_once(llm, monkeypatch):
    """Chunked prefill (64-token budget) puts decode tokens of short requests beside prefill chunks of
    long ones. Every FFN call must list exactly the union of the per-token predicted sets, read it in
    one kernel call, and give each token its own set within it."""
    from vllm.forward_context import get_forward_context

    from pi_backend.adapters.vllm import ffn

    kernel_calls = []
    real = ffn.run_kernel
    monkeypatch.setattr(ffn, "run_kernel", lambda layer, x, idx, out, skip, mask=None: (
        kernel_calls.append(idx), real(layer, x, idx, out, skip, mask))[1])
    seen = {"calls": 0, "mixed": 0, "checked_neurons": 0}

    def observe(layer, info):
        assert len(kernel_calls) == 1, "one kernel call per FFN call"
        assert kernel_calls.pop() is info["idx"]
        seen["calls"] += 1
        inp = info["ffn_inp"].double().numpy()
        logits = np.maximum(inp @ layer.fc1.double().numpy().T, 0) @ layer.fc2.double().numpy().T
        union = set(np.flatnonzero((logits >= layer.threshold).any(0)))
        ambiguous = set(np.flatnonzero((np.abs(logits - layer.threshold) < 1e-4).any(0)))
        assert set(info["idx"].tolist()) ^ union <= ambiguous
        assert list(info["idx"]) == sorted(info["idx"])
        if info["tokens"] > 1:  # each token over its own predicted set within the union
            own = logits[:, info["idx"]] >= layer.threshold
            unsure = np.abs(logits[:, info["idx"]] - layer.threshold) < 1e-4
            assert not ((info["mask"] != own) & ~unsure).any()
        seen["checked_neurons"] += len(union)
        md = next(iter(get_forward_context().attn_metadata.values()))
        q = np.diff(md.query_start_loc.cpu().numpy()[: len(md.seq_lens) + 1])
        if (q == 1).any() and (q > 1).any():
            seen["mixed"] += 1

    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": [1] + rng.integers(100, 32000, size=n).tolist()} for n in (4, 6, 5, 150, 120)]
    monkeypatch.setattr(ffn, "OBSERVERS", [observe])
    outs = _generate(llm, prompts, n=8)
    assert all(len(o) == 8 for o in outs)
    assert seen["calls"] > 0 and seen["checked_neurons"] > 0
    assert seen["mixed"] > 0, "no batch mixed prefill and decode"


# ---- vllm serve + openai --------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(model_dir, tmp_path):
    """`vllm serve` in its own process group, stopped (SIGTERM, then SIGKILL) when the test ends."""
    import urllib.request

    path, _ = model_dir
    port = _free_port()
    log = tmp_path / "serve.log"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    vllm_bin = Path(sys.executable).with_name("vllm")
    cmd = [str(vllm_bin), "serve", str(path), "--model-impl", "powerinfer", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "16", "--enforce-eager",
           "--served-model-name", "tiny"]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"vllm serve not healthy after 300 s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1", log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def test_vllm_serve_openai(server, hf_model):
    import openai

    base_url, log = server
    text = log.read_text()
    assert f"Resolved architecture: {ARCH}" in text
    assert "--model-impl powerinfer: ['LlamaForCausalLM'] -> PowerInferForCausalLM" in text
    client = openai.OpenAI(base_url=base_url, api_key="none", timeout=60, max_retries=0)

    comp = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=N_NEW, temperature=0)
    _, tok = hf_model
    assert comp.choices[0].text and comp.usage.completion_tokens > 0

    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Say hi"}],
                                          max_tokens=12, temperature=0)
    assert chat.choices[0].message.content is not None and chat.usage.completion_tokens > 0

    pieces = [c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=N_NEW, temperature=0, stream=True)]
    assert len(pieces) > 1 and "".join(pieces) == comp.choices[0].text  # streamed == non-streamed, greedy

    def one(i: int) -> int:
        r = client.completions.create(model="tiny", prompt=f"{PROMPTS[i % 3]} {i}", max_tokens=24,
                                      temperature=0.8, seed=i)
        return r.usage.completion_tokens

    with ThreadPoolExecutor(16) as pool:
        counts = list(pool.map(one, range(16)))
    assert len(counts) == 16 and all(c > 0 for c in counts)


# ---- tensor parallelism ---------------------------------------------------------------------------

TP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from vllm import LLM, SamplingParams
    if __name__ == "__main__":
        llm = LLM(model=sys.argv[1], model_impl="powerinfer", dtype="float32", max_model_len=512, seed=0,
                  enforce_eager=True, tensor_parallel_size=2, distributed_executor_backend="mp",
                  hf_overrides={"powerinfer_mode": "oracle"})
        outs = llm.generate(json.loads(sys.argv[2]), SamplingParams(max_tokens=int(sys.argv[3]), temperature=0),
                            use_tqdm=False)
        print("TOKENS " + json.dumps([list(o.outputs[0].token_ids) for o in outs]), flush=True)
""")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="tensor parallelism needs 2 CPUs to bind")
def test_tensor_parallel_2_matches_transformers(model_dir, hf_model, tmp_path):
    """TP=2 on vLLM's CPU build: each rank owns half the neurons (and half of every predictor's rows);
    partial FFN outputs are all-reduced. vLLM's automatic thread binding needs one NUMA node per rank,
    so each rank is bound to one core by hand."""
    path, _ = model_dir
    script = tmp_path / "tp2.py"
    script.write_text(TP_SCRIPT)
    cpus = sorted(os.sched_getaffinity(0))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND=f"{cpus[0]}|{cpus[1]}",
               PI_BACKEND_THREADS="1")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    r = subprocess.run([sys.executable, str(script), str(path), json.dumps(PROMPTS), str(N_NEW)], env=env,
                       capture_output=True, text=True, timeout=400)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("TOKENS ")]
    assert r.returncode == 0 and lines, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads(lines[0][7:]) == [hf_greedy(hf_model, p) for p in PROMPTS]
