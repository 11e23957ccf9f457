"""The C programs and libraries in ci/tools, built with this machine's C compiler for a suite's run."""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

TOOLS = Path(__file__).resolve().parent / "tools"


def build(source: str, output: str, flags: list[str]) -> Path | None:
    """ci/tools/<source> compiled with `flags` into a fresh temporary directory; None without a compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    out = Path(tempfile.mkdtemp(prefix="pi_ci_tool_")) / output
    subprocess.run([cc, *flags, "-o", str(out), str(TOOLS / source)], check=True)
    return out
