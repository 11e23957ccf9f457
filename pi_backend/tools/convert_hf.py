"""PowerInfer GGUF <-> Hugging Face directory conversion (for the vLLM adapter, and back).

    pi-backend convert --to-hf MODEL.powerinfer.gguf OUT_DIR [--dtype auto|float32|bfloat16|float16]
    pi-backend convert --from-hf HF_DIR OUT.gguf [--weight-type f16] [--vocab VOCAB.gguf]

`to_hf` writes what `vllm serve OUT_DIR --model-impl powerinfer` (and transformers) load:
  config.json              LlamaForCausalLM; hidden_act "relu" for ReLU-family FFNs, "silu" for SwiGLU;
                           a "powerinfer" section: ffn_act (reglu | drelu | swiglu), sparse_threshold,
                           layer_thresholds, the predictor file
  model.safetensors        HF tensor names; attn_q/attn_k un-permuted back to HF's rotate-half layout;
                           ffn_down_t transposed back to down_proj
  predictor.safetensors    model.layers.{i}.mlp.fc1.weight / fc2.weight (PowerInfer's predictors)
  tokenizer.json, tokenizer_config.json, generation_config.json
                           built from the GGUF vocabulary with no sentencepiece model and no
                           transformers: SentencePiece ("llama") vocabularies become a byte-fallback
                           BPE (what transformers' own LlamaTokenizerFast conversion produces, with
                           llama.cpp's BOS and leading-space rules); byte-level BPE ("gpt2", pre
                           "default") vocabularies a ByteLevel BPE. Other pre-tokenizers (llama-bpe,
                           qwen2, ...) are not converted: the directory then has no tokenizer (a
                           warning says so) and `--tokenizer` must point vLLM at one.

Everything is plain numpy + json (safetensors is written and read by a 40-line codec here): the main
environment needs neither torch nor transformers. Bamboo (dReLU) converts with hidden_act "relu" plus
powerinfer.ffn_act "drelu": vLLM's adapter runs it exactly, stock transformers would compute ReGLU.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

__all__ = ["to_hf", "from_hf", "main", "read_safetensors", "write_safetensors", "gguf_tokenizer_json",
           "HF_CONFIG_KEY"]

HF_CONFIG_KEY = "powerinfer"  # the config.json section the vLLM adapter reads
MODEL_FILE = "model.safetensors"
PREDICTOR_FILE = "predictor.safetensors"

# ---- safetensors, in numpy --------------------------------------------------------------------------

_ST_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F64": np.dtype("<f8"),
              "I32": np.dtype("<i4"), "I64": np.dtype("<i8"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
              "U8": np.dtype("u1"), "BOOL": np.dtype("?")}


class BF16(np.ndarray):
    """Marker view: a uint16 array holding bfloat16 bits (numpy has no bfloat16)."""


def _st_dtype(a: np.ndarray) -> str:
    if isinstance(a, BF16):
        return "BF16"
    for name, dt in _ST_DTYPES.items():
        if name != "BF16" and a.dtype == dt:
            return name
    raise TypeError(f"safetensors: unsupported dtype {a.dtype}")


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write tensors (row-major numpy arrays; `BF16` views for bfloat16) as a .safetensors file."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name, a in tensors.items():
        a = a if isinstance(a, BF16) else np.ascontiguousarray(a)
        if not a.flags.c_contiguous:
            a = np.ascontiguousarray(a).view(BF16)
        header[name] = {"dtype": _st_dtype(a), "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path = Path(path)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in arrays:
            f.write(np.asarray(a).view(np.uint8).reshape(-1).data if a.size else b"")
    return path


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """name -> read-only memory-mapped array (bfloat16 as a `BF16` uint16 view)."""
    path = Path(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    if mm.size < 8:
        raise ValueError(f"{path}: not a safetensors file (too short)")
    n = struct.unpack("<Q", bytes(mm[:8]))[0]
    if n > mm.size - 8:
        raise ValueError(f"{path}: header length {n} exceeds the file")
    header = json.loads(bytes(mm[8 : 8 + n]))
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = _ST_DTYPES.get(info["dtype"])
        if dt is None:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        b, e = info["data_offsets"]
        if not 0 <= b <= e <= mm.size - base:
            raise ValueError(f"{path}: tensor {name!r} lies outside the file")
        a = mm[base + b : base + e].view(np.ndarray).view(dt).reshape(info["shape"])
        out[name] = a.view(BF16) if info["dtype"] == "BF16" else a
    return out


def to_bf16(a: np.ndarray) -> BF16:
    """float32 -> bfloat16 bits, round to nearest even (NaN stays NaN)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    r = np.where(np.isnan(a), np.uint16(0x7FC0), r)
    return r.view(BF16)


def from_bf16(a: np.ndarray) -> np.ndarray:
    return (np.asarray(a).view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _as_float32(a: np.ndarray) -> np.ndarray:
    return from_bf16(a) if isinstance(a, BF16) else np.asarray(a, dtype=np.float32)


# ---- GGUF <-> HF names and layouts ---------------------------------------------------------------

_LAYER_NAMES = {  # GGUF blk.N.<key>.weight -> HF model.layers.N.<value>.weight
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}


def gguf_rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half layout -> GGUF adjacent-pair layout (llama.cpp's convert `permute`)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_rope_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """GGUF adjacent-pair layout -> HF rotate-half layout (inverse of `gguf_rope_permute`)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _encode(a: np.ndarray, dtype: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    if dtype == "float32":
        return np.ascontiguousarray(a)
    if dtype == "float16":
        return np.ascontiguousarray(a.astype(np.float16))
    if dtype == "bfloat16":
        return to_bf16(a)
    raise ValueError(f"dtype: expected one of {_DTYPES[1:]}, got {dtype!r}")


def _auto_dtype(gguf) -> str:
    from gguf.constants import GGMLQuantizationType as T

    types = {gguf.tensors[n].ggml_type for n in gguf.tensors if len(gguf.tensors[n].shape) == 2}
    if types <= {T.F32}:
        return "float32"
    if types <= {T.F32, T.BF16}:
        return "bfloat16"
    return "float16"  # F16 and quantized files (dequantized once)


def to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "auto",
          ffn_act: str | None = None, tokenizer: bool = True, chat_template: str | None = None,
          overwrite: bool = False) -> Path:
    """Convert a (PowerInfer) GGUF llama/bamboo model to an HF directory; returns out_dir.

    dtype: "auto" keeps F32 / BF16 files in their type and writes F16 and quantized files as float16.
    ffn_act: override the FFN activation (dense ReLU files from PowerInfer's convert-dense.py).
    chat_template: a Jinja template for tokenizer_config.json (the GGUF's own is used when present).
    """
    from pi_backend.model.config import ModelConfig
    from pi_backend.model.gguf_file import GGUFError, GGUFFile

    if dtype not in _DTYPES:
        raise ValueError(f"dtype: expected one of {_DTYPES}, got {dtype!r}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty (pass overwrite=True / --overwrite)")
    out.mkdir(parents=True, exist_ok=True)
    with GGUFFile.open(gguf_path) as g:
        cfg = ModelConfig.from_gguf(g, ffn_act=ffn_act)
        if cfg.arch not in ("llama", "bamboo"):
            raise GGUFError(g.path, f"architecture {cfg.arch!r} cannot be converted to an HF llama directory "
                                    "(supported: llama, bamboo)")
        if cfg.rope_dim != cfg.head_dim:
            raise GGUFError(g.path, f"partial rotary embeddings (rope dim {cfg.rope_dim} of head dim "
                                    f"{cfg.head_dim}) are not supported by the HF llama layout")
        wdtype = _auto_dtype(g) if dtype == "auto" else dtype
        model: dict[str, np.ndarray] = {}
        predictor: dict[str, np.ndarray] = {}
        for name in g.tensors:
            a = g.dequantize(name)
            if name in _GLOBAL_NAMES:
                model[_GLOBAL_NAMES[name]] = _encode(a, wdtype)
                continue
            parts = name.split(".")
            if len(parts) != 4 or parts[0] != "blk" or parts[3] != "weight":
                warnings.warn(f"{g.path}: tensor {name!r} has no HF counterpart; skipped")
                continue
            i, key = int(parts[1]), parts[2]
            hf = f"model.layers.{i}."
            if key in ("fc1", "fc2"):
                predictor[hf + f"mlp.{key}.weight"] = _encode(a, wdtype)
            elif key == "ffn_down_t":
                model[hf + "mlp.down_proj.weight"] = _encode(np.ascontiguousarray(a.T), wdtype)
            elif key in _LAYER_NAMES:
                if key == "attn_q":
                    a = gguf_rope_unpermute(a, cfg.n_head)
                elif key == "attn_k":
                    a = gguf_rope_unpermute(a, cfg.n_head_kv)
                model[hf + _LAYER_NAMES[key] + ".weight"] = _encode(a, wdtype)
            else:
                warnings.warn(f"{g.path}: tensor {name!r} has no HF counterpart; skipped")
        meta = g.metadata
        write_safetensors(out / MODEL_FILE, model)
        if predictor:
            write_safetensors(out / PREDICTOR_FILE, predictor)
        config = _hf_config(cfg, wdtype, meta, has_predictor=bool(predictor), source=Path(gguf_path).name)
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if tokenizer:
            tok = gguf_tokenizer_json(meta)
            if tok is None:
                warnings.warn(f"{g.path}: tokenizer model {meta.get('tokenizer.ggml.model')!r} / pre "
                              f"{meta.get('tokenizer.ggml.pre')!r} is not converted; the directory has no "
                              "tokenizer (pass --tokenizer to vLLM)")
            else:
                tokenizer_json, tokenizer_config = tok
                template = chat_template if chat_template is not None else meta.get("tokenizer.chat_template")
                if template:
                    tokenizer_config["chat_template"] = template
                (out / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False) + "\n")
                (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return out


def _hf_config(cfg, dtype: str, meta: Mapping[str, Any], *, has_predictor: bool, source: str) -> dict:
    section: dict[str, Any] = {"ffn_act": cfg.ffn_act, "sparse_threshold": cfg.sparse_threshold, "source": source}
    if cfg.layer_sparse_thresholds is not None:
        section["layer_thresholds"] = list(cfg.layer_sparse_thresholds)
    if has_predictor:
        section["predictor"] = PREDICTOR_FILE
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.n_ff,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_head_kv,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu" if cfg.ffn_act == "swiglu" else "relu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_freq_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_freq_base},
        "max_position_embeddings": cfg.n_ctx_train,
        "vocab_size": cfg.n_vocab,
        "tie_word_embeddings": cfg.tied_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "dtype": dtype,
        "torch_dtype": dtype,  # transformers < 5
        HF_CONFIG_KEY: section,
    }
    for key, hf in (("tokenizer.ggml.bos_token_id", "bos_token_id"), ("tokenizer.ggml.eos_token_id", "eos_token_id")):
        if key in meta:
            config[hf] = int(meta[key])
    return config


# ---- tokenizer ----------------------------------------------------------------------------------

_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_UNKNOWN, _TOKEN_TYPE_USER = 3, 2, 4


def _spm_merges(tokens: list[str], scores: np.ndarray) -> list[list[str]]:
    """BPE merges equivalent to a SentencePiece unigram-scored vocabulary, exactly as transformers'
    SentencePieceExtractor derives them: every split of a piece into two known pieces, ranked by the
    piece's score (higher first), ties by the ids of the two halves."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in zip(tokens, scores):
        local = [(piece[:k], piece[k:], float(score)) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: m[2], reverse=True)
    return [[a, b] for a, b, _ in merges]


def gguf_tokenizer_json(meta: Mapping[str, Any]) -> tuple[dict, dict] | None:
    """(tokenizer.json, tokenizer_config.json) for a GGUF's `tokenizer.ggml.*` metadata, or None when the
    vocabulary kind is not supported (see the module docstring)."""
    kind = meta.get("tokenizer.ggml.model")
    pre = meta.get("tokenizer.ggml.pre", "default")
    tokens = list(meta.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        return None
    types = np.asarray(meta.get("tokenizer.ggml.token_type", np.ones(len(tokens), np.int32)))
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    specials = sorted({int(i) for i in np.flatnonzero((types == _TOKEN_TYPE_CONTROL) | (types == _TOKEN_TYPE_UNKNOWN))}
                      | {int(i) for i in (bos, eos, unk) if i is not None})
    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i in specials]
    added += [{"id": int(i), "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
               "normalized": True, "special": False} for i in np.flatnonzero(types == _TOKEN_TYPE_USER)]

    if kind == "llama":  # SentencePiece: byte-fallback BPE, llama.cpp's "add a space prefix" rule
        scores = np.asarray(meta.get("tokenizer.ggml.scores", np.zeros(len(tokens))), dtype=np.float64)
        model = {"type": "BPE", "dropout": None, "unk_token": tokens[unk] if unk is not None else None,
                 "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                 "byte_fallback": True, "ignore_merges": False,
                 "vocab": {t: i for i, t in enumerate(tokens)}, "merges": _spm_merges(tokens, scores)}
        normalizer = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
        pre_tokenizer = None
        decoder = {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    elif kind == "gpt2" and pre == "default":  # byte-level BPE with GPT-2's pre-tokenizer
        merges = [m.split(" ", 1) for m in meta.get("tokenizer.ggml.merges") or []]
        model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                 "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                 "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges}
        normalizer = None
        pre_tokenizer = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
        decoder = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    else:
        return None

    single: list[dict] = []
    pair: list[dict] = []
    special_tokens: dict[str, dict] = {}
    for flag, tid in ((add_bos, bos), (add_eos, eos)):
        if flag and tid is not None:
            special_tokens[tokens[tid]] = {"id": tokens[tid], "ids": [int(tid)], "tokens": [tokens[tid]]}
    if add_bos and bos is not None:
        single.append({"SpecialToken": {"id": tokens[bos], "type_id": 0}})
    single.append({"Sequence": {"id": "A", "type_id": 0}})
    if add_eos and eos is not None:
        single.append({"SpecialToken": {"id": tokens[eos], "type_id": 0}})
    pair = single + [dict(s) for s in single]
    pair = [({"Sequence": {"id": "B", "type_id": 1}} if "Sequence" in p and i >= len(single) else p)
            for i, p in enumerate(pair)]
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": normalizer, "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "TemplateProcessing", "single": single, "pair": pair,
                           "special_tokens": special_tokens},
        "decoder": decoder, "model": model,
    }
    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos, "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False, "model_max_length": 1 << 30, "legacy": True,
    }
    for key, tid in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk)):
        if tid is not None:
            tokenizer_config[key] = tokens[tid]
    return tokenizer_json, tokenizer_config


# ---- HF -> GGUF ---------------------------------------------------------------------------------

def _load_predictor_dir(path: Path, n_layer: int) -> dict[str, np.ndarray]:
    """PowerInfer's predictor directory (model_{i}.pt state dicts with fc1.weight / fc2.weight)."""
    try:
        import torch
    except ImportError:
        raise ImportError(f"{path}: reading PowerInfer's model_{{i}}.pt predictors needs torch; convert them to "
                          f"{PREDICTOR_FILE} first, or run in the vLLM environment") from None
    out = {}
    for i in range(n_layer):
        f = path / f"model_{i}.pt"
        if not f.is_file():
            raise FileNotFoundError(f"{path}: no {f.name} for layer {i}")
        sd = torch.load(f, map_location="cpu", weights_only=True)
        fc1, fc2 = predictor_pair(sd, f)
        out[f"model.layers.{i}.mlp.fc1.weight"] = fc1.float().numpy()
        out[f"model.layers.{i}.mlp.fc2.weight"] = fc2.float().numpy()
    return out


def predictor_pair(state_dict: Mapping[str, Any], where: Any) -> tuple[Any, Any]:
    """(fc1, fc2) weights of one layer's predictor state dict: keys ending in fc1.weight / fc2.weight, or
    an nn.Sequential(Linear, ReLU, Linear)'s 0.weight / 2.weight."""
    keys = {k.split(".", k.count(".") - 1)[-1] if k.count(".") >= 1 else k: k for k in state_dict}
    for a, b in (("fc1.weight", "fc2.weight"), ("0.weight", "2.weight")):
        if a in keys and b in keys:
            return state_dict[keys[a]], state_dict[keys[b]]
    raise ValueError(f"{where}: no predictor weights (expected fc1.weight and fc2.weight), found {sorted(state_dict)}")


def from_hf(hf_dir: str | os.PathLike, out_path: str | os.PathLike, *, weight_type: str = "f16",
            vocab: str | os.PathLike | None = None, predictor: str | os.PathLike | None = None,
            powerinfer: bool | None = None) -> Path:
    """Write a llama HF directory (config.json + *.safetensors) as GGUF; a PowerInfer (PWRI) file with
    ffn_down_t and the predictors when the directory has them (predictor.safetensors, or PowerInfer's
    predictor directory of model_{i}.pt given as `predictor`).

    vocab: the tokenizer metadata's source, a GGUF file or "llama-spm"; default: the directory's
    tokenizer.json when it is a vocabulary `to_hf` wrote (SentencePiece llama), else "llama-spm" if the
    vocab matches LLaMA-2's."""
    from gguf.constants import GGUFValueType

    from pi_backend.model.config import FFN_ACT_KEY, SPARSE_THRESHOLD_KEY, SPARSE_THRESHOLDS_KEY
    from pi_backend.model.gguf_write import TypedValue, write_model
    from pi_backend.model.vocab import vocab_metadata

    src = Path(hf_dir)
    config = json.loads((src / "config.json").read_text())
    archs = config.get("architectures") or []
    if config.get("model_type", "llama") not in ("llama", "mistral", "bamboo") or \
            not all(a in ("LlamaForCausalLM", "MistralForCausalLM", "BambooForCausalLM") for a in archs):
        raise ValueError(f"{src}: architectures {archs} / model_type {config.get('model_type')!r} are not llama-family")
    section = dict(config.get(HF_CONFIG_KEY) or {})
    act = section.get("ffn_act") or {"relu": "reglu", "silu": "swiglu", "drelu": "drelu"}.get(config.get("hidden_act"))
    if act not in ("reglu", "drelu", "swiglu"):
        raise ValueError(f"{src}: hidden_act {config.get('hidden_act')!r} is not relu / silu")
    n_embd, n_head = int(config["hidden_size"]), int(config["num_attention_heads"])
    n_head_kv = int(config.get("num_key_value_heads") or n_head)
    n_layer = int(config["num_hidden_layers"])
    head_dim = int(config.get("head_dim") or n_embd // n_head)

    weights: dict[str, np.ndarray] = {}
    pred_names = set()
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{src}: no *.safetensors files")
    for f in files:
        for name, a in read_safetensors(f).items():
            weights[name] = a
            if f.name == PREDICTOR_FILE:
                pred_names.add(name)
    if predictor is not None:
        p = Path(predictor)
        weights.update(read_safetensors(p) if p.is_file() else _load_predictor_dir(p, n_layer))
    inv = {v: k for k, v in _GLOBAL_NAMES.items()}
    has_pred = any(n.endswith(".mlp.fc1.weight") for n in weights)
    pwri = has_pred if powerinfer is None else bool(powerinfer)
    if pwri and not has_pred:
        raise ValueError(f"{src}: a PowerInfer file needs predictors (predictor.safetensors or predictor=DIR)")
    out_w: dict[str, np.ndarray] = {}
    for name, a in weights.items():
        a32 = _as_float32(a)
        if name in inv:
            out_w[inv[name]] = a32
            continue
        parts = name.split(".")
        if len(parts) < 5 or parts[:2] != ["model", "layers"]:
            warnings.warn(f"{src}: tensor {name!r} is not a llama weight; skipped")
            continue
        i, rest = int(parts[2]), ".".join(parts[3:-1])
        p = f"blk.{i}."
        if rest in ("mlp.fc1", "mlp.fc2"):
            if pwri:
                out_w[p + rest[4:] + ".weight"] = a32
            continue
        key = {v: k for k, v in _LAYER_NAMES.items()}.get(rest)
        if key is None:
            warnings.warn(f"{src}: tensor {name!r} has no GGUF counterpart; skipped")
            continue
        if key == "attn_q":
            a32 = gguf_rope_permute(a32, n_head)
        elif key == "attn_k":
            a32 = gguf_rope_permute(a32, n_head_kv)
        if key == "ffn_down" and pwri:
            out_w[p + "ffn_down_t.weight"] = np.ascontiguousarray(a32.T)
        else:
            out_w[p + key + ".weight"] = a32
    if config.get("tie_word_embeddings") and "output.weight" in out_w:
        del out_w["output.weight"]

    if vocab is None:
        vocab = _guess_vocab(src)
    tok_meta = vocab_metadata(vocab)
    theta = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta", 10000.0))
    metadata: dict[str, Any] = {
        "general.name": src.name,
        "llama.context_length": int(config.get("max_position_embeddings", 2048)),
        "llama.embedding_length": n_embd,
        "llama.block_count": n_layer,
        "llama.feed_forward_length": int(config["intermediate_size"]),
        "llama.attention.head_count": n_head,
        "llama.attention.head_count_kv": n_head_kv,
        "llama.attention.layer_norm_rms_epsilon": TypedValue(float(config.get("rms_norm_eps", 1e-6)), GGUFValueType.FLOAT32),
        "llama.rope.freq_base": TypedValue(float(theta), GGUFValueType.FLOAT32),
        "llama.rope.dimension_count": head_dim,
        FFN_ACT_KEY: act,
        **tok_meta,
    }
    if pwri:
        metadata[SPARSE_THRESHOLD_KEY] = TypedValue(float(section.get("sparse_threshold", 0.0)), GGUFValueType.FLOAT32)
    if section.get("layer_thresholds") is not None:
        metadata[SPARSE_THRESHOLDS_KEY] = np.asarray(section["layer_thresholds"], dtype=np.float32)
    arch = "bamboo" if act == "drelu" else "llama"
    if arch != "llama":
        metadata = {(k.replace("llama.", arch + ".", 1) if k.startswith("llama.") else k): v for k, v in metadata.items()}
    return write_model(out_path, arch, metadata, out_w, weight_type=weight_type, powerinfer=pwri)


def _guess_vocab(src: Path) -> str:
    from pi_backend.model.vocab import vocab_metadata

    tj = src / "tokenizer.json"
    if tj.is_file():
        model = json.loads(tj.read_text()).get("model", {})
        ref = vocab_metadata("llama-spm")["tokenizer.ggml.tokens"].value
        vocab = model.get("vocab") or {}
        if len(vocab) == len(ref) and all(vocab.get(t) == i for i, t in enumerate(ref)):
            return "llama-spm"
    raise ValueError(f"{src}: cannot tell the vocabulary; pass vocab= (a GGUF file holding the tokenizer, "
                     "or 'llama-spm')")


# ---- command line -------------------------------------------------------------------------------

def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pi-backend convert", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    way = ap.add_mutually_exclusive_group(required=True)
    way.add_argument("--to-hf", nargs=2, metavar=("GGUF", "OUT_DIR"), help="GGUF / PowerInfer GGUF -> HF directory")
    way.add_argument("--from-hf", nargs=2, metavar=("HF_DIR", "OUT_GGUF"), help="HF directory -> (PowerInfer) GGUF")
    ap.add_argument("--dtype", default="auto", choices=_DTYPES, help="--to-hf: tensor dtype (default: from the file)")
    ap.add_argument("--ffn-act", choices=("reglu", "drelu", "swiglu"), help="--to-hf: override the FFN activation")
    ap.add_argument("--chat-template", metavar="FILE", help="--to-hf: a Jinja chat template file")
    ap.add_argument("--no-tokenizer", action="store_true", help="--to-hf: do not write tokenizer files")
    ap.add_argument("--overwrite", action="store_true", help="--to-hf: write into a non-empty directory")
    ap.add_argument("--weight-type", default="f16", help="--from-hf: f32 | f16 | bf16 | q8_0 | q4_0")
    ap.add_argument("--vocab", help="--from-hf: GGUF file (or 'llama-spm') to take the tokenizer from")
    ap.add_argument("--predictor", help="--from-hf: predictor.safetensors or PowerInfer's predictor directory")
    args = ap.parse_args(list(argv) if argv is not None else None)
    try:
        if args.to_hf:
            template = Path(args.chat_template).read_text() if args.chat_template else None
            out = to_hf(args.to_hf[0], args.to_hf[1], dtype=args.dtype, ffn_act=args.ffn_act,
                        tokenizer=not args.no_tokenizer, chat_template=template, overwrite=args.overwrite)
            print(f"wrote {out} (serve it with: vllm serve {out} --model-impl powerinfer)")
        else:
            out = from_hf(args.from_hf[0], args.from_hf[1], weight_type=args.weight_type, vocab=args.vocab,
                          predictor=args.predictor)
            print(f"wrote {out}")
    except (OSError, ValueError) as e:
        print(f"pi-backend convert: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
