"""The one cffi build (API / out-of-line mode) of pi_backend's CPU kernels.

The declarations come from include/pi_backend.h between its PI_CDEF markers, so the C API and the
Python binding cannot disagree: `#define NAME value` lines become `#define NAME ...`, which makes cffi
take each value from the compiled header. Set PI_BACKEND_SANITIZE=1 for an ASan + UBSan build.
"""
from __future__ import annotations

import os
import pathlib
import re
import sys

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
INCLUDE = HERE / "include"
HEADER = INCLUDE / "pi_backend.h"
CPU_SOURCES = ["ops.c", "decode.c", "pool.c", "kernels_scalar.c", "kernels_avx2.c", "kernels_avx512.c"]


def read_cdef(text: str, begin: str = "PI_CDEF_BEGIN", end: str = "PI_CDEF_END") -> str:
    """The declarations between two marker comments, with preprocessor lines made cffi-readable."""
    start = text.index(begin)
    block = text[text.index("\n", start) + 1 : text.index(end, start + len(begin))]
    block = block[: block.rfind("\n") + 1]  # drop the comment opener of the end marker's line
    out = []
    for line in block.splitlines():
        define = re.match(r"\s*#define\s+(\w+)\s+\S", line)
        if define:
            out.append(f"#define {define.group(1)} ...")
        elif not line.lstrip().startswith("#"):
            out.append(line)
    return "\n".join(out)


def _flags() -> tuple[list[str], list[str]]:
    compile_args = ["-O3", "-std=gnu11", "-fno-math-errno", "-Wall", "-Wno-unused-function"]
    link_args: list[str] = []
    if os.environ.get("PI_BACKEND_SANITIZE") == "1":
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
        compile_args = ["-O1", "-g", "-std=gnu11", "-fno-math-errno"] + san
        link_args += san
    return compile_args, link_args


ffibuilder = FFI()
ffibuilder.cdef(read_cdef(HEADER.read_text()))
_compile_args, _link_args = _flags()
ffibuilder.set_source(
    "pi_backend.native._pi_native",
    '#include "pi_backend.h"',
    sources=[os.path.relpath(HERE / "cpu" / s) for s in CPU_SOURCES],  # setuptools wants relative paths
    include_dirs=[str(INCLUDE)],
    extra_compile_args=_compile_args,
    extra_link_args=_link_args,
    libraries=["m"] if sys.platform != "win32" else [],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(HERE.parent.parent), verbose=True)
