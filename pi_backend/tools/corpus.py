"""A calibration corpus that exists on every machine: English prose from the Python standard library.

Profiling, predictor training and threshold calibration need a few tens of thousands of tokens of
ordinary text. Downloading C4 is not an option on CI machines, and /usr/share/doc trees differ from
one machine to the next, so the built-in corpus is made from what every CPython installation ships:

1. `pydoc_data.topics` — the language reference topics `help()` shows (~465 KB of English prose with
   some grammar and code, generated from the same reStructuredText docs the tiny-relu model learned
   from);
2. the docstrings (`inspect.getdoc`) of a fixed list of pure-Python standard-library modules, their
   public classes, functions and methods, in sorted order.

The text is deterministic for a given Python version (not across versions, and under `python -OO`,
which strips docstrings, only part 1 remains). Documents (one per topic, one per module) are split
round-robin: every `HOLDOUT_EVERY`-th document is held out, so calibration and evaluation never
share a document.

    pi-backend corpus --part calibration -o calib.txt      # write it out; prints its size
    from pi_backend.tools.corpus import calibration_text, heldout_text, token_windows
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
import warnings
from dataclasses import dataclass
from functools import lru_cache

PARTS = ("calibration", "heldout", "all")
HOLDOUT_EVERY = 5

# Pure-Python modules present in every CPython 3.10-3.13 installation (no deprecation warnings on
# import, no side effects). Missing ones are skipped, which keeps the corpus usable on trimmed builds.
STDLIB_MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs", "collections",
    "colorsys", "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "dis", "email.message", "email.utils", "enum", "filecmp",
    "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "graphlib",
    "gzip", "hashlib", "heapq", "hmac", "html", "html.parser", "http.client", "http.cookies",
    "http.server", "imaplib", "inspect", "io", "ipaddress", "json", "keyword", "linecache", "locale",
    "logging", "logging.handlers", "lzma", "mailbox", "mimetypes", "numbers", "operator", "optparse",
    "os", "pathlib", "pickle", "pickletools", "pkgutil", "platform", "plistlib", "poplib", "pprint",
    "pydoc", "queue", "quopri", "random", "re", "reprlib", "rlcompleter", "sched", "secrets",
    "selectors", "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver", "statistics",
    "string", "stringprep", "struct", "subprocess", "symtable", "tabnanny", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "token", "tokenize", "trace", "traceback", "tracemalloc",
    "types", "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "wave",
    "weakref", "webbrowser", "wsgiref.simple_server", "xml.dom.minidom", "xml.etree.ElementTree",
    "zipfile", "zipimport", "zoneinfo",
)


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def _topic_documents() -> list[Document]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # a trimmed Python without pydoc_data
        return []
    return [Document(f"topic:{name}", topics[name].strip() + "\n") for name in sorted(topics)]


def _module_document(modname: str) -> Document | None:
    with warnings.catch_warnings():  # deprecated names (typing.io, ...) warn when touched
        warnings.simplefilter("ignore")
        return _module_text(modname)


def _module_text(modname: str) -> Document | None:
    try:
        module = importlib.import_module(modname)
    except Exception:  # absent on this build (e.g. lzma without liblzma)
        return None
    parts = []
    doc = inspect.getdoc(module)
    if doc:
        parts.append(doc)
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if not getattr(obj, "__module__", "").startswith(modname):
            continue  # imported from elsewhere: documented there
        doc = inspect.getdoc(obj)
        if doc:
            parts.append(f"{name}\n{doc}")
        if inspect.isclass(obj):
            for mname, member in sorted(vars(obj).items()):
                if mname.startswith("_") or not inspect.isfunction(member):
                    continue
                mdoc = member.__doc__  # its own docstring only (getdoc would inherit the base class's)
                if mdoc:
                    parts.append(f"{name}.{mname}\n{inspect.cleandoc(mdoc)}")
    if not parts:
        return None
    return Document(f"module:{modname}", "\n\n".join(parts) + "\n")


@lru_cache(maxsize=1)
def documents() -> tuple[Document, ...]:
    """Every document of the corpus, in a fixed order: the topics, then the modules."""
    docs = _topic_documents()
    docs += [d for d in (_module_document(m) for m in STDLIB_MODULES) if d is not None]
    if not docs:
        raise RuntimeError("the built-in corpus is empty (no pydoc_data and no docstrings: python -OO?); "
                           "pass a text file instead")
    return tuple(docs)


def part_documents(part: str = "calibration") -> list[Document]:
    if part not in PARTS:
        raise ValueError(f"part: expected one of {PARTS}, got {part!r}")
    docs = documents()
    if part == "all":
        return list(docs)
    held = part == "heldout"
    return [d for i, d in enumerate(docs) if (i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1) == held]


def corpus_text(part: str = "calibration") -> str:
    """The text of one part: 'calibration' (4/5 of the documents), 'heldout' (the rest) or 'all'."""
    return "\n".join(d.text for d in part_documents(part))


def calibration_text() -> str:
    return corpus_text("calibration")


def heldout_text() -> str:
    return corpus_text("heldout")


def load_text(path: str | os.PathLike | None = None, part: str = "calibration") -> str:
    """A user's text file when `path` is given (checked now, before any long computation), else the
    built-in corpus part."""
    if path is None:
        return corpus_text(part)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text file {path!r} does not exist")
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if not text.strip():
        raise ValueError(f"text file {path!r} is empty")
    return text


def token_windows(tokenizer, text: str, window: int, max_windows: int | None = None,
                  min_tokens: int = 2) -> list[list[int]]:
    """Non-overlapping windows of `window` tokens (a BOS first where the vocabulary uses one).

    The whole text is tokenized once; a trailing window shorter than `min_tokens` is dropped. With
    `max_windows`, the windows are spread evenly over the text (deterministically), so a small budget
    still samples every part of it; when the budget is small next to the text, only a snippet at each
    of those places is tokenized."""
    if window < 2:
        raise ValueError(f"window: need at least 2 tokens, got {window}")
    bos = _bos(tokenizer)
    body = window - (1 if bos is not None else 0)
    prefix = [bos] if bos is not None else []
    if max_windows is not None and max_windows >= 1:
        # a small budget from a long text: tokenize only a snippet at each of max_windows evenly spaced
        # places (16 characters per token is far more than any vocabulary needs)
        seg, span = len(text) // max_windows, 16 * body
        if span < seg:
            out = []
            for k in range(max_windows):
                ids = tokenizer.encode(text[k * seg: k * seg + span], add_bos=False)
                if len(ids) < body:
                    break
                out.append(prefix + ids[:body])
            else:
                return out
    ids = tokenizer.encode(text, add_bos=False)
    chunks = [ids[i:i + body] for i in range(0, len(ids), body)]
    chunks = [c for c in chunks if len(c) + (bos is not None) >= min_tokens]
    if max_windows is not None and len(chunks) > max_windows:
        step = len(chunks) / max_windows
        chunks = [chunks[int(k * step)] for k in range(max_windows)]
    return [prefix + c for c in chunks]


def _bos(tokenizer) -> int | None:
    """The BOS id when the tokenizer adds one (llama-spm does, byte-level BPE vocabularies do not)."""
    with_bos = tokenizer.encode("a", add_bos=True)
    without = tokenizer.encode("a", add_bos=False)
    return with_bos[0] if len(with_bos) > len(without) else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="pi-backend corpus", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=PARTS, default="calibration")
    ap.add_argument("-o", "--output", help="write the text here (default: only print its size)")
    ap.add_argument("--list", action="store_true", help="list the documents of the part")
    args = ap.parse_args(argv)
    docs = part_documents(args.part)
    text = "\n".join(d.text for d in docs)
    if args.list:
        for d in docs:
            print(f"{len(d.text):8d}  {d.name}")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    print(f"{args.part}: {len(docs)} documents, {len(text.encode('utf-8'))} bytes "
          f"(Python {sys.version_info.major}.{sys.version_info.minor})" + (f" -> {args.output}" if args.output else ""),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
