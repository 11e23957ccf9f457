"""The llama-cpp-python versions this adapter is written against.

The adapter overrides private internals of `llama_cpp.Llama` (`eval`, `sample`, `_ctx`, `_candidates`,
`_init_sampler`, `scores`/`input_ids`/`n_tokens`): they change between releases without notice, so the
supported range is pinned (the same range as pyproject's `llamacpp` extra) and checked at import.
"""
from __future__ import annotations

import re

MIN_VERSION = (0, 3, 36)  # inclusive
MAX_VERSION = (0, 3, 37)  # exclusive
SUPPORTED = ">=0.3.36,<0.3.37"


class UnsupportedLlamaCppVersion(ImportError):
    pass


def parse_version(version: str) -> tuple[int, int, int]:
    m = re.match(r"^\s*v?(\d+)\.(\d+)\.(\d+)", str(version))
    if not m:
        raise UnsupportedLlamaCppVersion(f"pi_backend.adapters.llamacpp: cannot read the llama-cpp-python version "
                                         f"{version!r}; supported: llama-cpp-python{SUPPORTED}")
    return tuple(int(g) for g in m.groups())  # type: ignore[return-value]


def check_version(version: str) -> None:
    """Raise UnsupportedLlamaCppVersion (an ImportError) unless `version` is in the supported range."""
    v = parse_version(version)
    if not MIN_VERSION <= v < MAX_VERSION:
        raise UnsupportedLlamaCppVersion(
            f"pi_backend.adapters.llamacpp supports llama-cpp-python{SUPPORTED}, but {version} is installed. "
            "The adapter hooks private internals of llama_cpp.Llama that change between releases; install a "
            "supported version (scripts/install-llama-cpp-python.sh, or `pip install "
            f"'llama-cpp-python{SUPPORTED}'`) or use pi_backend's own API (pi_backend.load).")
