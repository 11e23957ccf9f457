"""Where a decode step's time goes: the bench models of ci/bench_engine.py in one set-up of
ci/bench_gpu_model.py (cpu, hybrid, dense_gpu), timed plainly and then under cProfile.

    python ci/tools/profile_decode.py [--types Q4_0 F16] [--setups hybrid cpu] [--steps 32] [--top 30]

A diagnosis tool, not a benchmark: cProfile slows Python down, so read its table for the shares of
waiting (Device.sync), the CPU's cold partition (the executor) and the Python between calls.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", nargs="+", default=["Q4_0", "F16"])
    ap.add_argument("--setups", nargs="+", default=["hybrid"])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()

    from ci.bench_engine import PROMPT
    from ci.bench_gpu_model import model

    for wtype in args.types:
        for setup in args.setups:
            m = model(wtype, setup)
            m.reset()
            m.forward(PROMPT)
            tok = 13

            def steps(n: int) -> None:
                nonlocal tok
                for _ in range(n):
                    tok = int(np.argmax(m.forward([tok])[-1]))

            steps(4)
            t0 = time.perf_counter()
            steps(args.steps)
            wall = (time.perf_counter() - t0) / args.steps
            prof = cProfile.Profile()
            prof.enable()
            steps(args.steps)
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.top)
            print(f"\n===== {wtype} {setup}: {wall * 1e3:.3f} ms a step ({1 / wall:.1f} tok/s), "
                  f"n_past {m.state.n_past}; cProfile of {args.steps} steps, by own time")
            print(out.getvalue())


if __name__ == "__main__":
    main()
