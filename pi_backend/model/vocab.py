"""Tokenizer metadata for fixture models: a real LLaMA-2 vocabulary, or a byte-level one.

Both are returned as `tokenizer.ggml.*` metadata with explicit GGUF types, ready for `write_gguf`.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
from gguf.constants import GGUFValueType

from .gguf_file import GGUFFile
from .gguf_write import TypedValue, typed_metadata

__all__ = ["VOCAB_DIR", "vocab_metadata", "byte_vocab_metadata", "gpt2_bytes_to_unicode", "BYTE_VOCAB_SIZE"]

VOCAB_DIR = Path(__file__).resolve().parent.parent / "data" / "vocab"
_NAMED_VOCABS = {"llama-spm": "ggml-vocab-llama-spm.gguf"}
BYTE_VOCAB_SIZE = 257  # 256 byte tokens + the result of the one merge llama.cpp insists on


def vocab_metadata(vocab: str | os.PathLike) -> dict[str, TypedValue]:
    """`"byte"`, a named vocabulary (`"llama-spm"`), or the path of any GGUF file: its tokenizer keys."""
    if vocab == "byte":
        return byte_vocab_metadata()
    path = VOCAB_DIR / _NAMED_VOCABS[vocab] if vocab in _NAMED_VOCABS else Path(vocab)
    if not path.is_file():
        raise ValueError(f"unknown vocabulary {vocab!r}: not 'byte', one of {sorted(_NAMED_VOCABS)}, or a GGUF file")
    return dict(_gguf_tokenizer(str(path.resolve())))


@lru_cache(maxsize=4)
def _gguf_tokenizer(path: str) -> tuple[tuple[str, TypedValue], ...]:
    with GGUFFile.open(path) as gguf:
        metadata = typed_metadata(gguf, "tokenizer.ggml.")
    if "tokenizer.ggml.tokens" not in metadata:
        raise ValueError(f"{path}: has no tokenizer.ggml.tokens")
    return tuple(metadata.items())


@lru_cache(maxsize=1)
def gpt2_bytes_to_unicode() -> tuple[str, ...]:
    """GPT-2's printable spelling of each byte value (index = byte)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in spelling:
            spelling[b] = chr(256 + extra)
            extra += 1
    return tuple(spelling[b] for b in range(256))


def byte_vocab_metadata() -> dict[str, TypedValue]:
    """A byte-level BPE vocabulary where token id = byte value (as the tiny-relu model was trained).

    llama.cpp refuses an empty merge list, so there is one merge, of two 0xFF bytes: 0xFF never
    occurs in UTF-8, so the merge never fires on text and its result (token 256) is never produced
    by the tokenizer. Token 256 doubles as BOS/EOS, which nothing adds automatically."""
    byte_tokens = list(gpt2_bytes_to_unicode())
    ff = byte_tokens[0xFF]
    tokens = byte_tokens + [ff + ff]
    return {
        "tokenizer.ggml.model": TypedValue("gpt2", GGUFValueType.STRING),
        "tokenizer.ggml.pre": TypedValue("default", GGUFValueType.STRING),
        "tokenizer.ggml.tokens": TypedValue(tokens, GGUFValueType.ARRAY, GGUFValueType.STRING),
        "tokenizer.ggml.token_type": TypedValue(np.ones(len(tokens), dtype=np.int32), GGUFValueType.ARRAY, GGUFValueType.INT32),
        "tokenizer.ggml.merges": TypedValue([f"{ff} {ff}"], GGUFValueType.ARRAY, GGUFValueType.STRING),
        "tokenizer.ggml.bos_token_id": TypedValue(256, GGUFValueType.UINT32),
        "tokenizer.ggml.eos_token_id": TypedValue(256, GGUFValueType.UINT32),
        "tokenizer.ggml.add_bos_token": TypedValue(False, GGUFValueType.BOOL),
        "tokenizer.ggml.add_eos_token": TypedValue(False, GGUFValueType.BOOL),
    }
