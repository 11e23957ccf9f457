"""vLLM suite ("vllm"): decode throughput of `--model-impl powerinfer` against vLLM's own dense Llama,
same shapes, same engine settings, in the same run. Runs in the vLLM environment:

    .venv-vllm/bin/python -m ci.perf --suite vllm        (skips cleanly where vLLM is not installed)

The two models (bfloat16, n_embd 2048, n_ff 5504, 8 layers, 16 heads, a 257-token byte vocabulary so
that, as in a 7B model, the layers and not the LM head carry the bytes of a token):
  - powerinfer: ReGLU, ~90% of neurons silent per token. The gate is rank 128 plus a per-neuron bias
    (a constant residual channel, as in the fixture factory), so a rank-256 predictor (fc1/fc2,
    ~6% of the FFN's bytes) is exact: the active set is the true one and only speed is measured.
  - dense: the same shapes with hidden_act silu, run by vLLM's LlamaForCausalLM.
Both are generated once into ~/.cache/pi_backend/bench_vllm (seconds) and served from the engine in
its default (multiprocess) mode with torch.compile; one engine is alive at a time.
Each round decodes N_DECODE tokens for a batch of 1 or 16 sequences after an 8-token prompt.
"""
from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("vllm", reason="the vLLM suite runs in .venv-vllm (scripts/setup-vllm.sh)")

N_EMBD, N_FF, N_LAYER, N_HEAD, RANK, VOCAB = 2048, 5504, 8, 16, 128, 257
SPARSITY = 0.90
N_DECODE = 32
PROMPT_LEN = 8
BATCHES = (1, 16)
CACHE = Path(os.environ.get("PI_BACKEND_BENCH_CACHE", Path.home() / ".cache" / "pi_backend" / "bench_vllm"))
VERSION = 2  # bump when the generator changes


def _model(kind: str) -> Path:
    """Write (once) an HF directory: config.json + model.safetensors (+ predictor.safetensors)."""
    from pi_backend.tools.convert_hf import to_bf16, write_safetensors

    out = CACHE / f"{kind}-v{VERSION}-{N_EMBD}x{N_FF}x{N_LAYER}"
    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    c = N_EMBD - 1  # constant channel: the gate's bias (see the fixture factory)

    def mat(rows, cols, gain=1.0):
        return (rng.standard_normal((rows, cols), dtype=np.float32) * (gain / np.sqrt(cols))).astype(np.float32)

    t: dict[str, np.ndarray] = {}
    pred: dict[str, np.ndarray] = {}
    embd = rng.standard_normal((VOCAB, N_EMBD), dtype=np.float32)
    embd[:, c] = 1.0
    t["model.embed_tokens.weight"] = embd
    # Skewed per-neuron firing rates with mean 1 - SPARSITY (a few hot neurons, many cold ones, as in real
    # ReLU models): neuron i fires when its pre-activation exceeds its z_i-sigma quantile.
    from statistics import NormalDist

    density = 1.0 - SPARSITY
    for i in range(N_LAYER):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = np.ones(N_EMBD, np.float32)
        t[p + "post_attention_layernorm.weight"] = np.ones(N_EMBD, np.float32)
        for name, rows in (("q_proj", N_EMBD), ("k_proj", N_EMBD), ("v_proj", N_EMBD)):
            w = mat(rows, N_EMBD)
            w[:, c] = 0
            t[p + f"self_attn.{name}.weight"] = w
        o = mat(N_EMBD, N_EMBD, gain=0.3)  # small writes keep the residual's RMS ~1 in every layer, so the
        o[c, :] = 0                        # constant channel's bias means the same everywhere
        t[p + "self_attn.o_proj.weight"] = o
        up = mat(N_FF, N_EMBD)
        up[:, c] = 0
        down = mat(N_EMBD, N_FF, gain=0.3)
        down[c, :] = 0
        if kind == "powerinfer":
            a = rng.standard_normal((N_FF, RANK), dtype=np.float32) / np.sqrt(RANK)
            b = rng.standard_normal((RANK, N_EMBD), dtype=np.float32) / np.sqrt(N_EMBD)
            b[:, c] = 0
            gate = a @ b
            # normed inputs have ~unit RMS per channel: gate . x ~ N(0, |row|^2); cut at z sigma, via channel c
            rates = np.clip(rng.beta(0.6, 0.6 * SPARSITY / density, size=N_FF), 1e-4, 0.95)
            z = np.array([NormalDist().inv_cdf(1.0 - r) for r in rates], np.float32)
            gate[:, c] = -z * np.linalg.norm(gate, axis=1)
            fc1 = np.zeros((2 * RANK + 1, N_EMBD), np.float32)
            fc1[:RANK], fc1[RANK : 2 * RANK], fc1[2 * RANK, c] = b, -b, 1.0
            fc2 = np.concatenate([a, -a, gate[:, c : c + 1]], axis=1)  # relu(K)=K for the constant channel (K=1)
            pred[p + "mlp.fc1.weight"], pred[p + "mlp.fc2.weight"] = fc1, fc2
        else:
            gate = mat(N_FF, N_EMBD)
        t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"], t[p + "mlp.down_proj.weight"] = gate, up, down
    t["model.norm.weight"] = np.ones(N_EMBD, np.float32)
    t["lm_head.weight"] = mat(VOCAB, N_EMBD)
    write_safetensors(tmp / "model.safetensors", {k: to_bf16(v) for k, v in t.items()})
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": N_EMBD,
        "intermediate_size": N_FF, "num_hidden_layers": N_LAYER, "num_attention_heads": N_HEAD,
        "num_key_value_heads": N_HEAD, "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 512, "vocab_size": VOCAB, "tie_word_embeddings": False,
        "dtype": "bfloat16", "torch_dtype": "bfloat16", "bos_token_id": 0, "eos_token_id": 256,
    }
    if kind == "powerinfer":
        write_safetensors(tmp / "predictor.safetensors", {k: to_bf16(v) for k, v in pred.items()})
        config["hidden_act"] = "relu"
        config["powerinfer"] = {"ffn_act": "reglu", "sparse_threshold": 0.0, "predictor": "predictor.safetensors"}
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    tmp.rename(out)
    return out


_ENGINE: dict = {}


def engine(kind: str):
    """The vLLM engine for `kind`, shutting the other one down first (one engine at a time)."""
    if _ENGINE.get("kind") == kind:
        return _ENGINE["llm"]
    old = _ENGINE.pop("llm", None)
    if old is not None:
        try:
            old.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001 - best effort; the process ends with the session anyway
            pass
        del old
        gc.collect()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    path = _model(kind)
    llm = LLM(model=str(path), model_impl="powerinfer" if kind == "powerinfer" else "auto", dtype="bfloat16",
              skip_tokenizer_init=True, max_model_len=512, max_num_seqs=max(BATCHES), seed=0)
    assert llm.llm_engine.model_config.architecture == ("PowerInferForCausalLM" if kind == "powerinfer"
                                                         else "LlamaForCausalLM")
    _ENGINE.update(kind=kind, llm=llm)
    return llm


def _decode(llm, batch: int) -> int:
    from vllm import SamplingParams

    prompts = [{"prompt_token_ids": [0] + [(7 * s + j) % 250 + 1 for j in range(PROMPT_LEN - 1)]} for s in range(batch)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=N_DECODE, temperature=0.0, ignore_eos=True,
                                                detokenize=False), use_tqdm=False)
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    assert n == batch * N_DECODE
    return n


@pytest.mark.parametrize("kind,batch", [(k, b) for k in ("powerinfer", "dense") for b in BATCHES],
                         ids=[f"{b}-{k}" for k in ("powerinfer", "dense") for b in BATCHES])
def test_vllm_decode(benchmark, kind, batch):
    llm = engine(kind)
    benchmark.pedantic(lambda: _decode(llm, batch), rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(bytes=float(batch * N_DECODE), tokens=batch * N_DECODE)


def metrics(median, bytes_of) -> dict[str, float]:
    """Decode speedups of --model-impl powerinfer over vLLM's dense Llama (time ratios, same run), and
    the absolute throughputs as info.* (reported, not tracked)."""
    out = {}
    for b in BATCHES:
        pi, dense = f"test_vllm_decode[{b}-powerinfer]", f"test_vllm_decode[{b}-dense]"
        out[f"decode_speedup_batch{b}"] = median(dense) / median(pi)
        out[f"info.powerinfer_tok_s_batch{b}"] = bytes_of(pi) / median(pi)
        out[f"info.dense_tok_s_batch{b}"] = bytes_of(dense) / median(dense)
    return out


GOALS = {"decode_speedup_batch1": 1.5}
