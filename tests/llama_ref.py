"""llama.cpp (through llama-cpp-python) as the independent reference: its logits on the same file, and
its own quantizer to make quantized fixtures."""
from __future__ import annotations

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

FTYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7}


def quantize(src, dst, ftype: str) -> str:
    """Quantize with llama.cpp itself; `pure` keeps every matrix (output and embeddings too) in the
    one type instead of llama.cpp's k-quant mixtures."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.pure = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    assert rc == 0, f"llama_model_quantize failed ({rc})"
    return str(dst)


def llama_logits(path, tokens, n_ctx=256) -> np.ndarray:
    """llama.cpp's logits for every token of one batch."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2,
                          n_batch=max(32, len(tokens)))
    llm.eval(list(tokens))
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def llama_greedy(path, prompt_tokens, n: int, n_ctx=256) -> list[int]:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, verbose=False, n_threads=2)
    out = []
    for tok in llm.generate(list(prompt_tokens), temp=0.0, top_k=1, reset=True):
        out.append(tok)
        if len(out) == n:
            break
    return out
