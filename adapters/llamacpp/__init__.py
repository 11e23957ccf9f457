"""pi_backend as a backend of llama-cpp-python: `llama_cpp.Llama(model_path=..., backend="powerinfer")`.

    import pi_backend.adapters.llamacpp           # installs the `backend=` keyword on llama_cpp.Llama
    import llama_cpp
    llm = llama_cpp.Llama(model_path="model.powerinfer.gguf", backend="powerinfer", mode="sparse")
    llm.create_chat_completion(messages=[{"role": "user", "content": "Hi"}])

or, without touching `llama_cpp.Llama`: `from pi_backend.adapters.llamacpp import Llama` (the
`PowerInferLlama` subclass). The logits come from pi_backend; tokenization, chat formats, the sampler
chain, grammars, stop strings, logprobs, streaming, caches and save/load_state stay llama-cpp-python's.
`backend` omitted or "llama.cpp" keeps stock behaviour. Serving: `python -m
pi_backend.adapters.llamacpp.server --model ... --backend powerinfer` (see server.py).
"""
from __future__ import annotations

import inspect

try:
    import llama_cpp as _llama_cpp
except ImportError as e:  # pragma: no cover - the set-up installs it
    raise ImportError("pi_backend.adapters.llamacpp needs llama-cpp-python (>=0.3.36,<0.3.37): "
                      "scripts/install-llama-cpp-python.sh or `pip install 'pi_backend[llamacpp]'`") from e

from ._version import SUPPORTED, UnsupportedLlamaCppVersion, check_version

check_version(getattr(_llama_cpp, "__version__", "unknown"))

from .backend import (  # noqa: E402
    BACKEND,
    ENGINE_OPTIONS,
    PiContext,
    PowerInferLlama,
    UnsupportedFeatureError,
    default_options,
    engine_options,
    resolve_backend,
)

Llama = PowerInferLlama

__all__ = ["Llama", "PowerInferLlama", "UnsupportedFeatureError", "install", "uninstall", "is_installed",
           "default_options", "engine_options", "BACKEND", "SUPPORTED", "UnsupportedLlamaCppVersion", "PiContext"]

_StockLlama = _llama_cpp.Llama
_STOCK_PARAMS = frozenset(inspect.signature(_StockLlama.__init__).parameters)


def _passthrough_new(cls, *args, **kwargs):
    """What `Llama.__new__` is after uninstall(): object.__new__, as if never patched (a patched
    `__new__` must never be deleted: CPython's cached slot would then reject every later call)."""
    return object.__new__(cls)


_passthrough_new._pi_backend_hook = "passthrough"  # type: ignore[attr-defined]
_previous_new = None  # a foreign __new__ found on llama_cpp.Llama at install time, chained to


def _powerinfer_new(cls, *args, **kwargs):
    """`llama_cpp.Llama.__new__` while installed: backend="powerinfer" builds a PowerInferLlama."""
    backend = resolve_backend(kwargs)
    if backend == BACKEND:
        if cls is _StockLlama:
            cls = PowerInferLlama
        elif not issubclass(cls, PowerInferLlama):
            raise TypeError(f"backend='powerinfer' cannot be given to {cls.__module__}.{cls.__qualname__} (a "
                            "subclass of llama_cpp.Llama): derive it from pi_backend.adapters.llamacpp."
                            "PowerInferLlama instead")
    elif not issubclass(cls, PowerInferLlama):
        given = [k for k in ENGINE_OPTIONS if kwargs.get(k) is not None]
        if not given and any(k not in _STOCK_PARAMS for k in kwargs):
            given = [k for k in engine_options() if kwargs.get(k) is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: pi_backend engine option(s), which stock llama.cpp would "
                             "silently ignore; pass backend='powerinfer' to use them")
    if _previous_new is not None:
        return _previous_new(cls, *args, **kwargs)
    return object.__new__(cls)


_powerinfer_new._pi_backend_hook = "powerinfer"  # type: ignore[attr-defined]


def _current_new():
    cur = _StockLlama.__dict__.get("__new__")
    return getattr(cur, "__func__", cur)


def is_installed() -> bool:
    return getattr(_current_new(), "_pi_backend_hook", None) == "powerinfer"


def install() -> None:
    """Make `llama_cpp.Llama(..., backend="powerinfer")` build a PowerInferLlama (idempotent; done on import)."""
    global _previous_new
    cur = _current_new()
    if cur is not None and getattr(cur, "_pi_backend_hook", None) is None:
        _previous_new = cur  # someone else's hook: keep calling it
    _StockLlama.__new__ = staticmethod(_powerinfer_new)


def uninstall() -> None:
    """Back to stock dispatch (backend= is then ignored by llama_cpp.Llama, as stock does)."""
    if _previous_new is not None:
        _StockLlama.__new__ = staticmethod(_previous_new)
    else:
        _StockLlama.__new__ = staticmethod(_passthrough_new)


install()
