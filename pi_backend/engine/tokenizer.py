"""llama.cpp's own tokenizer, through llama-cpp-python with vocab_only=True, so token ids are exactly
what llama.cpp users get.

llama.cpp cannot open a PowerInfer GGUF (magic PWRI) or an architecture it does not know (bamboo), so
for those the file's metadata, minus tensors, is written to a temporary vocab-only GGUF as arch llama.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile

from pi_backend.model.gguf_file import GGUFFile

LLAMA_CPP_ARCHS = ("llama", "falcon")


class Tokenizer:
    def __init__(self, llama):
        self._llama = llama
        self.n_vocab = llama.n_vocab()
        self.bos = llama.token_bos()
        self.eos = llama.token_eos()

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> "Tokenizer":
        try:
            import llama_cpp
        except ImportError as e:  # pragma: no cover - the README's set-up installs it
            raise ImportError("pi_backend's tokenizer is llama.cpp's: install llama-cpp-python "
                              "(scripts/install-llama-cpp-python.sh)") from e
        if not gguf.is_powerinfer and gguf.arch in LLAMA_CPP_ARCHS:
            with _quiet_stderr():
                return cls(llama_cpp.Llama(model_path=str(gguf.path), vocab_only=True, verbose=False))
        with tempfile.TemporaryDirectory(prefix="pi_backend_vocab_") as tmp:
            path = os.path.join(tmp, "vocab.gguf")
            write_vocab_only(gguf, path)
            with _quiet_stderr():
                return cls(llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False))

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return self._llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)

    def decode_bytes(self, tokens: list[int]) -> bytes:
        return self._llama.detokenize(tokens)

    def decode(self, tokens: list[int]) -> str:
        return self.decode_bytes(tokens).decode("utf-8", errors="replace")


@contextlib.contextmanager
def _quiet_stderr():
    """llama.cpp logs context warnings from C even with verbose=False (for a vocab-only load they are
    meaningless, e.g. a training context of 0): silence file descriptor 2 while it loads."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):  # no real stderr (embedded, captured): nothing to do
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def write_vocab_only(gguf: GGUFFile, path: str) -> None:
    """A tensor-less copy of the file's metadata under arch llama: enough for llama.cpp's vocab_only."""
    from pi_backend.model.gguf_write import TypedValue, typed_metadata, write_gguf

    arch = gguf.arch or "llama"
    metadata: dict[str, TypedValue] = {}
    for key, value in typed_metadata(gguf).items():
        if key == "general.architecture":
            continue
        if key.startswith(arch + "."):  # hparams move to the llama namespace
            key = "llama." + key[len(arch) + 1:]
        metadata[key] = value
    write_gguf(path, "llama", metadata, {})
