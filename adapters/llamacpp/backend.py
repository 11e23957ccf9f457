"""`llama_cpp.Llama` with pi_backend computing the logits.

How it fits together (llama-cpp-python 0.3.36, see ecosystem-notes.md):

* llama.cpp keeps everything but the forward pass: it loads the file's vocabulary only (`vocab_only`;
  for PowerInfer files, which llama.cpp cannot open, a tensor-less copy of the metadata), which gives
  tokenization, chat templates, grammars and the sampler chain.
* `eval` runs pi_backend's forward pass and fills `input_ids`, `scores` (all rows with `logits_all`)
  and `n_tokens` exactly as the stock `eval` does.
* `sample` builds the candidate array from *our* logits and runs llama.cpp's sampler chain on it with
  `llama_sampler_apply` + `llama_sampler_accept` -- what `llama_sampler_sample` does with the context's
  logits -- so Python logits processors, `logit_bias`, penalties, grammar, mirostat, top-k/typical/
  top-p/min-p, temperature and the seeded distribution are llama.cpp's own code.
* `self._ctx` is a small shim (`PiContext`): `generate`'s prefix reuse and rollback
  (`kv_cache_seq_rm`), `n_ctx`, `reset` and the timings route to our engine, and `decode` is never
  reached. Its `.ctx` is the (vocab-only) llama.cpp context, so the few C calls stock code makes with
  it (`llama_n_ctx` in an error message, perf counters) stay valid.
* `save_state` / `load_state` snapshot our KV cache into `LlamaState.llama_state` (bytes), so
  `LlamaRAMCache` / `LlamaDiskCache` and exact-prompt reuse work unchanged.
"""
from __future__ import annotations

import contextlib
import contextvars
import ctypes
import dataclasses
import functools
import json
import os
import struct
import sys
import tempfile
import time
from typing import Any, Optional

import numpy as np

import llama_cpp
import llama_cpp.llama_cpp as llama_lib
from llama_cpp import llama_chat_format
from llama_cpp.llama import LlamaState

BACKEND = "powerinfer"
STOCK_BACKENDS = ("llama.cpp", "llama_cpp", "llamacpp")
POWERINFER_BACKENDS = ("powerinfer", "pi_backend")
# pi_backend engine options accepted as keyword arguments (besides SHARED_OPTIONS, which stock takes too);
# engine_options() adds whatever else pi_backend.engine.model.EngineOptions grows
ENGINE_OPTIONS = ("mode", "threshold", "thresholds", "vram_budget", "hot_neurons", "ffn_act", "activation_dir",
                  "reset_gpu_index", "disable_gpu_index", "device", "overlap", "hot_threads", "placement_cost")
# Llama(...) arguments both backends understand: taken by the engine too, never refused for stock llama.cpp
SHARED_OPTIONS = ("n_ctx", "n_threads", "use_mmap")
CTX_PAD = 256  # llama.cpp rounds n_ctx up to a multiple of 256; so do we, to report the same n_ctx()
STATE_MAGIC = b"PIKV"
# 2: K and V in the engine's KV type (f16 by default: half the bytes of version 1's f32); 1 still loads
STATE_VERSION = 2
_STATE_KV = {"f16": np.float16, "f32": np.float32}

# Keyword defaults set by a caller that cannot pass keywords through (the server's model loader).
_DEFAULTS: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("pi_backend_llama_defaults",
                                                                         default=None)


class UnsupportedFeatureError(NotImplementedError):
    """A llama-cpp-python feature that backend="powerinfer" cannot provide (rather than run it wrong)."""


def _unsupported(what: str, hint: str = "") -> UnsupportedFeatureError:
    return UnsupportedFeatureError(
        f"backend='powerinfer' does not support {what}{': ' + hint if hint else ''} "
        "(use backend='llama.cpp' for it)")


@contextlib.contextmanager
def default_options(**options):
    """Within the block, `llama_cpp.Llama(...)` calls in this thread / task get these keywords unless
    they pass them themselves (the server launcher uses it to add `backend=` and engine options)."""
    merged = {**(_DEFAULTS.get() or {}), **options}
    token = _DEFAULTS.set(merged)
    try:
        yield
    finally:
        _DEFAULTS.reset(token)


def resolve_backend(kwargs: dict) -> str:
    """'powerinfer' or 'llama.cpp' for a Llama(...) call's keywords (and the active defaults)."""
    defaults = _DEFAULTS.get() or {}
    backend = kwargs.get("backend", defaults.get("backend"))
    if backend is None or backend in STOCK_BACKENDS:
        return "llama.cpp"
    if backend in POWERINFER_BACKENDS:
        return BACKEND
    raise ValueError(f"backend: unknown backend {backend!r}; expected 'powerinfer' (pi_backend) or "
                     "'llama.cpp' (stock llama-cpp-python)")


@functools.lru_cache(maxsize=None)
def engine_options() -> tuple[str, ...]:
    """Every pi_backend engine option a Llama(...) call may pass (EngineOptions' fields but the shared
    n_ctx / n_threads / use_mmap)."""
    from pi_backend.engine.model import EngineOptions

    names = [f.name for f in dataclasses.fields(EngineOptions) if f.name not in SHARED_OPTIONS]
    return tuple(dict.fromkeys([*ENGINE_OPTIONS, *names]))


def _ctx_size(n_ctx: int) -> int:
    return -(-n_ctx // CTX_PAD) * CTX_PAD


_KV_TYPES = {llama_cpp.GGML_TYPE_F32: "f32", llama_cpp.GGML_TYPE_F16: "f16"}


def _kv_type(type_k: Optional[int], type_v: Optional[int]) -> Optional[str]:
    """llama.cpp's KV cache types (type_k / type_v, GGML type ids) as the engine's kv_type; None: its
    default (f16, as llama.cpp's)."""
    if type_k is None and type_v is None:
        return None
    names = {_KV_TYPES.get(t, t) if t is not None else "f16" for t in (type_k, type_v)}  # unset: f16, as llama.cpp
    bad = [t for t in names if t not in _KV_TYPES.values()]
    if bad:
        raise _unsupported(f"KV cache type {bad[0]!r}", "the KV cache is F16 (type_k / type_v = GGML_TYPE_F16, the "
                           "default) or F32 (GGML_TYPE_F32)")
    if len(names) > 1:
        raise _unsupported(f"type_k={type_k!r} with type_v={type_v!r}", "K and V share one type")
    return names.pop()


def _check_supported(kw: dict) -> None:
    """Refuse what cannot be served from our logits, before anything is loaded."""
    if kw.get("vocab_only"):
        raise _unsupported("vocab_only=True", "a vocabulary-only model has no forward pass")
    if kw.get("lora_path") or kw.get("lora_base"):
        raise _unsupported("LoRA adapters (lora_path / lora_base)", "pi_backend runs the file's weights as they are")
    if kw.get("embedding"):
        raise _unsupported("embedding=True", "pi_backend's forward pass returns logits, not hidden states")
    handler = kw.get("chat_handler")
    if handler is not None and _is_multimodal_handler(handler):
        raise _unsupported(f"multimodal chat handlers ({type(handler).__name__})",
                           "image embeddings are decoded by llama.cpp's own context")
    defaults = {"rope_freq_base": 0.0, "rope_freq_scale": 0.0, "yarn_ext_factor": -1.0, "yarn_attn_factor": 1.0,
                "yarn_beta_fast": 32.0, "yarn_beta_slow": 1.0, "yarn_orig_ctx": 0}
    for key, default in defaults.items():
        if key in kw and kw[key] is not None and float(kw[key]) != default:
            raise _unsupported(f"{key}={kw[key]!r}", "pi_backend uses the RoPE settings of the file")
    rst = kw.get("rope_scaling_type")
    if rst not in (None, llama_lib.LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED, llama_lib.LLAMA_ROPE_SCALING_TYPE_NONE):
        raise _unsupported(f"rope_scaling_type={rst!r}", "pi_backend uses the RoPE settings of the file")
    att = kw.get("attention_type")
    if att not in (None, llama_lib.LLAMA_ATTENTION_TYPE_UNSPECIFIED, llama_lib.LLAMA_ATTENTION_TYPE_CAUSAL):
        raise _unsupported(f"attention_type={att!r}", "pi_backend's attention is causal")
    kvo = kw.get("kv_overrides") or {}
    bad = [k for k in kvo if not str(k).startswith("tokenizer.")]
    if bad:
        raise _unsupported(f"kv_overrides of model hyperparameters ({', '.join(map(str, bad))})",
                           "only tokenizer.* keys (applied to the vocabulary) are")


def _is_multimodal_handler(handler) -> bool:
    multimodal = tuple(c for c in (getattr(llama_chat_format, "Llava15ChatHandler", None),
                                   getattr(llama_chat_format, "MTMDChatHandler", None)) if c is not None)
    return isinstance(handler, multimodal) or hasattr(handler, "clip_model_path")


class PiContext:
    """Stands in for llama-cpp-python's `LlamaContext` (`Llama._ctx`): the KV cache is pi_backend's.

    `ctx` is the vocab-only llama.cpp context (valid for the C calls stock code makes with it: n_ctx,
    perf counters); decoding through it is never done."""

    def __init__(self, llama: "PowerInferLlama", vocab_ctx):
        self._llama = llama
        self._vocab_ctx = vocab_ctx
        self.ctx = vocab_ctx.ctx
        self.model = vocab_ctx.model
        self.params = vocab_ctx.params
        self.verbose = vocab_ctx.verbose
        self.memory = None
        self.sampler = None
        self.reset_timings()

    @property
    def engine(self):
        return self._llama._pi

    def n_ctx(self) -> int:
        return self.engine.n_ctx

    def pooling_type(self) -> int:
        return self._vocab_ctx.pooling_type()

    def kv_cache_clear(self) -> None:
        self.engine.reset()

    def kv_cache_seq_rm(self, seq_id: int, p0: int, p1: int) -> bool:
        """Remove positions [p0, p1) of sequence seq_id (-1: any); only a suffix can be removed."""
        eng = self.engine
        if seq_id not in (-1, 0):
            return False
        p0 = max(int(p0), 0)
        if p1 is not None and 0 <= int(p1) < eng.n_past:
            return False  # a hole in the middle: not supported (generate then re-evaluates the prompt)
        if p0 < eng.n_past:
            eng.truncate(p0)
        return True

    def kv_cache_seq_cp(self, *args):
        raise _unsupported("multiple KV cache sequences (kv_cache_seq_cp)")

    def kv_cache_seq_keep(self, *args):
        raise _unsupported("multiple KV cache sequences (kv_cache_seq_keep)")

    def kv_cache_seq_shift(self, *args):
        raise _unsupported("KV cache shifting (kv_cache_seq_shift)")

    def decode(self, batch):
        raise RuntimeError("pi_backend adapter: llama_decode must not be reached with backend='powerinfer' "
                           "(the forward pass is pi_backend's; this is a bug in the adapter)")

    encode = decode

    def get_logits(self):
        raise RuntimeError("pi_backend adapter: logits live in Llama.scores / are produced by pi_backend")

    get_logits_ith = get_logits

    def set_n_threads(self, n_threads: int, n_threads_batch: int) -> None:
        pass  # the engine's thread pool is sized at load time (n_threads=)

    def get_state_size(self) -> int:
        return 0

    def reset_timings(self) -> None:
        self.t_eval = 0.0
        self.n_eval_calls = 0
        self.n_eval_tokens = 0

    def print_timings(self) -> None:
        tps = self.n_eval_tokens / self.t_eval if self.t_eval else float("nan")
        print(f"pi_backend: eval {self.n_eval_tokens} tokens in {self.n_eval_calls} calls, "
              f"{self.t_eval * 1e3:.1f} ms ({tps:.1f} tokens/s), mode {self.engine.mode}", file=sys.stderr)

    def close(self) -> None:
        pass  # the vocab-only context is closed by Llama's exit stack


class PowerInferLlama(llama_cpp.Llama):
    """`llama_cpp.Llama` whose forward pass is pi_backend's (see the module docstring).

    Takes every `llama_cpp.Llama` argument, plus pi_backend's engine options: `mode` ("sparse" |
    "oracle" | "dense" | "threshold"), `threshold`, `thresholds`, `vram_budget`, `hot_neurons`, `ffn_act`,
    and the rest of `pi_backend.engine.model.EngineOptions` (engine_options()). `n_ctx` and `n_threads`
    size the engine's KV cache and thread pool; `use_mmap=False` reads the weights into memory, as it
    does for llama.cpp.
    """

    backend = BACKEND

    def __init__(self, model_path: str, *, backend: str = BACKEND, **kwargs: Any):
        self._pi = None
        defaults = dict(_DEFAULTS.get() or {})
        defaults.pop("backend", None)
        kwargs = {**defaults, **kwargs}
        if resolve_backend({"backend": backend}) != BACKEND:
            raise ValueError(f"backend: {type(self).__name__} runs backend='powerinfer' only; use llama_cpp.Llama "
                             f"for backend={backend!r}")
        names = engine_options()
        engine_opts = {k: kwargs.pop(k) for k in names if k in kwargs and kwargs[k] is not None}
        for k in names:
            kwargs.pop(k, None)
        _check_supported(kwargs)
        kwargs.pop("vocab_only", None)
        model_path = os.fspath(model_path)
        if not os.path.exists(model_path):
            raise ValueError(f"Model path does not exist: {model_path}")

        import pi_backend
        from pi_backend.engine.tokenizer import LLAMA_CPP_ARCHS, write_vocab_only

        n_ctx = int(kwargs.pop("n_ctx", 512))
        n_threads = kwargs.get("n_threads")
        kv_type = _kv_type(kwargs.get("type_k"), kwargs.get("type_v"))
        if kv_type is not None and engine_opts.setdefault("kv_type", kv_type) != kv_type:
            raise ValueError(f"kv_type={engine_opts['kv_type']!r} contradicts type_k / type_v ({kv_type})")
        engine = pi_backend.load(model_path, n_ctx=_ctx_size(n_ctx) if n_ctx > 0 else 1 << 30,
                                 n_threads=int(n_threads or 0), use_mmap=bool(kwargs.get("use_mmap", True)),
                                 **engine_opts)
        if n_ctx > 0 and engine.n_ctx < n_ctx and kwargs.get("verbose", True):
            print(f"pi_backend: n_ctx {n_ctx} capped to the model's training context {engine.n_ctx}",
                  file=sys.stderr)

        gguf = engine.gguf
        with contextlib.ExitStack() as tmp:
            if not gguf.is_powerinfer and gguf.arch in LLAMA_CPP_ARCHS:
                vocab_path = model_path  # llama.cpp reads the vocabulary of the file itself
            else:  # PowerInfer GGUF (or an arch llama.cpp does not know): a tensor-less copy of the metadata
                d = tmp.enter_context(tempfile.TemporaryDirectory(prefix="pi_backend_vocab_"))
                vocab_path = os.path.join(d, "vocab.gguf")
                write_vocab_only(gguf, vocab_path)
            super().__init__(vocab_path, vocab_only=True, n_ctx=engine.n_ctx, **kwargs)
        self.model_path = model_path
        self._pi = engine
        self._pi_options = {"backend": BACKEND, **engine_opts}
        if self._model.n_vocab() != engine.n_vocab:
            raise ValueError(f"{model_path}: the vocabulary has {self._model.n_vocab()} tokens but the output "
                             f"layer {engine.n_vocab} rows")
        self._ctx = PiContext(self, self._ctx)
        self._n_ctx = self.n_ctx()
        self._is_recurrent = False
        self._is_hybrid = False
        self._pi_last_logits: Optional[np.ndarray] = None

    # ---- the forward pass
    def eval(self, tokens):
        """Evaluate tokens with pi_backend at positions n_tokens.. (stock semantics: input_ids, scores,
        n_tokens; all logits rows with logits_all)."""
        tokens = [int(t) for t in tokens]
        self._ctx.kv_cache_seq_rm(-1, self.n_tokens, -1)
        eng = self._pi
        if eng.n_past != self.n_tokens:
            raise RuntimeError(f"pi_backend adapter: the KV cache holds {eng.n_past} positions but n_tokens is "
                               f"{self.n_tokens} (state restored from elsewhere?)")
        t0 = time.perf_counter()
        for i in range(0, len(tokens), self.n_batch):
            batch = tokens[i: i + self.n_batch]
            n_past, n = self.n_tokens, len(batch)
            logits = eng.forward(batch, all_logits=self._logits_all)
            self.input_ids[n_past: n_past + n] = batch
            if self._logits_all:
                self.scores[n_past: n_past + n, :] = logits
            else:  # the last row, where stopping criteria look (_scores[-1])
                self.scores[min(n_past + n, self.scores.shape[0]) - 1, :] = logits[-1]
            self._pi_last_logits = logits[-1]
            self.n_tokens += n
            self._requires_eval = False
        c = self._ctx
        c.t_eval += time.perf_counter() - t0
        c.n_eval_calls += 1
        c.n_eval_tokens += len(tokens)

    def _pi_logits(self, idx: Optional[int]) -> np.ndarray:
        """Our logits for absolute position idx (None: the last evaluated token)."""
        last = self.n_tokens - 1
        i = last if idx is None else int(idx)
        if not 0 <= i <= last:
            raise IndexError(f"sample: position {i} has not been evaluated (n_tokens {self.n_tokens})")
        if self._logits_all:
            return self.scores[i]
        if i != last or self._pi_last_logits is None:
            raise RuntimeError(f"sample: logits for position {i} are not kept without logits_all=True")
        return self._pi_last_logits

    def _pi_sample_with(self, sampler, logits: np.ndarray) -> int:
        """llama_sampler_sample on our logits: fill the candidates, apply the chain, accept."""
        cand = self._candidates
        views = self.__dict__.get("_pi_cand_views")
        if views is None or views[0] is not cand:  # plain field views of the candidate buffer
            data = cand.candidates_data.view(np.ndarray)
            views = self._pi_cand_views = (cand, data["id"], data["logit"], data["p"])
        _, ids, logit, p = views
        ids[:] = cand.default_candidates_data_id
        logit[:] = logits
        p.fill(0.0)
        arr = cand.candidates
        arr.size = cand.n_vocab
        arr.sorted = False
        arr.selected = -1
        llama_lib.llama_sampler_apply(sampler.sampler, ctypes.byref(arr))
        sel = arr.selected
        if not 0 <= sel < arr.size:
            raise RuntimeError(f"sampler chain selected no token (selected {sel}, size {arr.size})")
        token = int(arr.data[sel].id)
        llama_lib.llama_sampler_accept(sampler.sampler, token)
        return token

    def sample(self, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, typical_p: float = 1.0,
               temp: float = 0.80, repeat_penalty: float = 1.0, frequency_penalty: float = 0.0,
               presence_penalty: float = 0.0, tfs_z: float = 1.0, mirostat_mode: int = 0,
               mirostat_eta: float = 0.1, mirostat_tau: float = 5.0, penalize_nl: bool = True,
               logits_processor=None, grammar=None, idx: Optional[int] = None):
        """Stock `Llama.sample`, with the candidates built from pi_backend's logits."""
        assert self.n_tokens > 0
        tmp_sampler = self._sampler is None
        if tmp_sampler:
            self._sampler = self._init_sampler(
                top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p, temp=temp,
                repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty,
                presence_penalty=presence_penalty, tfs_z=tfs_z, mirostat_mode=mirostat_mode,
                mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, penalize_nl=penalize_nl,
                logits_processor=logits_processor, grammar=grammar)
        try:
            return self._pi_sample_with(self._sampler, self._pi_logits(idx))
        finally:
            if tmp_sampler:
                self._sampler = None

    # ---- state
    def reset(self):
        super().reset()
        if self._pi is not None:
            self._pi.reset()

    def _pi_fingerprint(self) -> str:
        st = os.stat(self.model_path)
        cfg = self._pi.config
        return (f"{os.path.realpath(self.model_path)}|{st.st_size}|{cfg.n_layer}x{cfg.n_head_kv}x{cfg.head_dim}"
                f"|{self._pi.n_vocab}")

    def _pi_state_bytes(self) -> bytes:
        eng = self._pi
        if eng.n_past > self.n_tokens:  # positions past n_tokens are dead (the next eval drops them)
            eng.truncate(self.n_tokens)
        if eng.n_past != self.n_tokens:
            raise RuntimeError(f"pi_backend adapter: the KV cache holds {eng.n_past} positions but n_tokens is "
                               f"{self.n_tokens}")
        saved = eng.save_state()
        kv = "f16" if saved["k"].dtype == np.float16 else "f32"  # the cache's own type: nothing rounded
        k = np.ascontiguousarray(saved["k"], dtype=_STATE_KV[kv])
        v = np.ascontiguousarray(saved["v"], dtype=_STATE_KV[kv])
        last = self._pi_last_logits
        header = json.dumps({"version": STATE_VERSION, "model": self._pi_fingerprint(), "n_past": int(saved["n_past"]),
                             "shape": list(k.shape), "kv": kv,
                             "last_logits": last is not None and not self._requires_eval}).encode()
        parts = [STATE_MAGIC, struct.pack("<I", len(header)), header, k.tobytes(), v.tobytes()]
        if last is not None and not self._requires_eval:
            parts.append(np.ascontiguousarray(last, dtype=np.float32).tobytes())
        return b"".join(parts)

    def _pi_restore_bytes(self, blob: bytes) -> None:
        if not isinstance(blob, (bytes, bytearray, memoryview)) or bytes(blob[:4]) != STATE_MAGIC:
            raise ValueError("load_state: not a pi_backend state (a LlamaState saved by stock llama.cpp cannot be "
                             "loaded into backend='powerinfer')")
        (hlen,) = struct.unpack_from("<I", blob, 4)
        header = json.loads(bytes(blob[8: 8 + hlen]))
        version, kv = header.get("version"), header.get("kv", "f32")
        if version not in (1, STATE_VERSION) or kv not in _STATE_KV or header.get("model") != self._pi_fingerprint():
            raise ValueError(f"load_state: the state was saved from another model or format "
                             f"({header.get('model')!r}, version {version}, kv {kv!r})")
        shape = tuple(header["shape"])
        count, size = int(np.prod(shape)), np.dtype(_STATE_KV[kv]).itemsize
        off = 8 + hlen
        need = off + 2 * count * size + (4 * self._n_vocab if header.get("last_logits") else 0)
        if len(blob) < need:
            raise ValueError(f"load_state: the state is truncated ({len(blob)} bytes, its header needs {need})")
        k = np.frombuffer(blob, _STATE_KV[kv], count, off).reshape(shape)
        v = np.frombuffer(blob, _STATE_KV[kv], count, off + size * count).reshape(shape)
        self._pi.load_state({"n_past": header["n_past"], "k": k, "v": v})
        if header.get("last_logits"):
            self._pi_last_logits = np.frombuffer(blob, np.float32, self._n_vocab, off + 2 * size * count).copy()
        else:
            self._pi_last_logits = None

    def save_state(self) -> LlamaState:
        data = self._pi_state_bytes()
        return LlamaState(scores=self._scores.copy(), input_ids=self.input_ids.copy(), n_tokens=self.n_tokens,
                          llama_state=data, llama_state_size=len(data), seed=self._seed)

    def load_state(self, state: LlamaState) -> None:
        self._pi_restore_bytes(state.llama_state)
        # the rest as stock load_state does it
        self.scores[: state.n_tokens, :] = state.scores.copy()
        rest = self.scores[state.n_tokens:, :]
        rest[rest > 0] = 0.0
        self.input_ids = state.input_ids.copy()
        self.n_tokens = state.n_tokens
        self._requires_eval = True
        self._seed = state.seed

    # ---- what reads the llama.cpp context in stock code
    def n_embd(self) -> int:
        return self._pi.config.n_embd

    def embed(self, input, normalize: bool = False, truncate: bool = True, return_count: bool = False):
        raise _unsupported("embeddings (embed / create_embedding)",
                           "pi_backend's forward pass returns logits, not hidden states")

    def create_chat_completion(self, *args, **kwargs):
        if self.chat_handler is not None and _is_multimodal_handler(self.chat_handler):
            raise _unsupported(f"multimodal chat handlers ({type(self.chat_handler).__name__})")
        return super().create_chat_completion(*args, **kwargs)

    def set_lora(self, *args, **kwargs):  # pragma: no cover - not in 0.3.36, guarded in case
        raise _unsupported("LoRA adapters")

    def __getstate__(self):
        state = super().__getstate__()
        state.update(model_path=self.model_path, vocab_only=False, **self._pi_options)
        return state

    def close(self) -> None:
        with contextlib.suppress(AttributeError):
            super().close()
        eng = getattr(self, "_pi", None)
        if eng is not None:
            eng.close()
            self._pi = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        mode = self._pi.mode if getattr(self, "_pi", None) is not None else "closed"
        return f"<PowerInferLlama {getattr(self, 'model_path', '?')!r} mode={mode}>"
