"""pi_backend: a PowerInfer-style sparse-FFN inference backend.

Importing the package is cheap: the native module, the engine and the adapters load on first use, and
nothing here ever imports torch or vLLM.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["load", "__version__"]


def load(path, **options):
    """Load a GGUF or PowerInfer GGUF model: see pi_backend.engine.model.load."""
    from pi_backend.engine.model import load as _load

    return _load(path, **options)
