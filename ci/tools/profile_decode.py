"""Where a decode step's time goes: the bench models of ci/bench_engine.py in one set-up of
ci/bench_gpu_model.py (cpu, hybrid, dense_gpu), timed plainly, then split into phases, then (--top N)
under cProfile.

    python ci/tools/profile_decode.py [--types Q4_0 F16] [--setups hybrid cpu] [--steps 32] [--top 30]

The phases (wall time a step, timers around the calls): waiting for the device (Device.sync and the
copies back, which wait for the stream), the CPU's cold partition, and the rest (Python and the
launches between them). A diagnosis tool, not a benchmark: cProfile slows Python down.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402


@contextlib.contextmanager
def phase_timers(m):
    """Accumulate the wall time spent in the device waits and the cold partition while inside."""
    from pi_backend.native import device

    spent = {"device_wait": 0.0, "cold_cpu": 0.0}

    def timed(obj, name, key):
        f = getattr(obj, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t
        setattr(obj, name, wrapper)
        return lambda: setattr(obj, name, f)

    undo = [timed(device.Device, "sync", "device_wait"), timed(device.DeviceArray, "copy_to_host", "device_wait"),
            timed(m.cold_executor, "run", "cold_cpu")]
    try:
        yield spent
    finally:
        for u in undo:
            u()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", nargs="+", default=["Q4_0", "F16"])
    ap.add_argument("--setups", nargs="+", default=["hybrid"])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--top", type=int, default=0, help="also print cProfile's top N functions")
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
            print(f"\n===== {wtype} {setup}: {wall * 1e3:.3f} ms a step ({1 / wall:.1f} tok/s), n_past {m.state.n_past}")
            with phase_timers(m) as spent:
                t0 = time.perf_counter()
                steps(args.steps)
                total = time.perf_counter() - t0
            rest = total - sum(spent.values())
            print("  phases, ms a step: " + ", ".join(f"{k} {v / args.steps * 1e3:.3f}" for k, v in spent.items())
                  + f", rest {rest / args.steps * 1e3:.3f}")
            if args.top:
                prof = cProfile.Profile()
                prof.enable()
                steps(args.steps)
                prof.disable()
                out = io.StringIO()
                pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.top)
                print(f"  cProfile of {args.steps} steps, by own time\n{out.getvalue()}")


if __name__ == "__main__":
    main()
