"""The perf regression suite: run the pytest-benchmark benchmarks in ci/, turn them into ratios measured
side by side in this run, and compare with the stored baseline.

    python -m ci.perf                      # run all suites, compare, fail on a regression
    python -m ci.perf --suite kernels      # one suite
    python -m ci.perf --update             # store this run's ratios as the new baseline
    python -m ci.perf --report-only        # compare and print, never fail (noisy shared CI)

Only ratios are tracked, never absolute times: these machines are shared and noisy, but two
measurements taken in the same run move together. A tracked ratio fails when it drops more than
--tolerance (default 25%) below its baseline; keys starting with "info." are reported, not tracked. Each suite module defines `metrics(median, bytes_of)`
(or `metrics(median, bytes_of, extra)` to read what a benchmark recorded, e.g. per-round times of
engines run in alternation) and optionally `GOALS` (the issue's targets, reported alongside).
"""
from __future__ import annotations

import argparse
import fnmatch
import importlib
import inspect
import json
import os
import pathlib
import subprocess
import sys
import tempfile

CI = pathlib.Path(__file__).resolve().parent
ROOT = CI.parent
BASELINES = CI / "baselines"
SUITES = {"kernels": "bench_kernels", "engine": "bench_engine", "llamacpp": "bench_llamacpp",
          "placement": "bench_placement", "gpu": "bench_gpu", "gpu_model": "bench_gpu_model",
          "vllm": "bench_vllm", "device_host": "bench_device_host"}


def run_suite(module: str, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "pytest", str(CI / f"{module}.py"), "-q", "-p", "no:cacheprovider",
               "--benchmark-only", f"--benchmark-json={out}", "--benchmark-columns=median,min,rounds", *extra]
        print("+", " ".join(cmd), flush=True)
        # numpy's BLAS (OpenBLAS) threads spin ~0.1 s after each call before they sleep: on these 2-core
        # machines they would take the cores from whatever is timed next (the yardstick runs between
        # kernels). 2^4 cycles of spinning, then they park.
        env = {**os.environ, "OPENBLAS_THREAD_TIMEOUT": os.environ.get("OPENBLAS_THREAD_TIMEOUT", "4")}
        rc = subprocess.call(cmd, cwd=ROOT, env=env)
        if rc not in (0, 5):  # 5: nothing collected
            raise SystemExit(f"benchmark suite {module} failed (pytest exit {rc})")
        # every benchmark skipped (the GPU suites without a GPU): pytest-benchmark writes no file
        return json.loads(out.read_text()) if out.exists() else {"benchmarks": []}


def suite_metrics(module: str, results: dict) -> tuple[dict[str, float], dict[str, float]]:
    by_name = {b["name"]: b for b in results["benchmarks"]}

    def median(name: str) -> float:
        if name not in by_name:
            raise KeyError(f"benchmark {name!r} missing from the run")
        return by_name[name]["stats"]["median"]

    def bytes_of(name: str) -> float:
        return float(by_name[name]["extra_info"]["bytes"])

    def extra(name: str) -> dict:
        """What a benchmark recorded beside its timing (e.g. per-round times of an interleaved run)."""
        if name not in by_name:
            raise KeyError(f"benchmark {name!r} missing from the run")
        return by_name[name]["extra_info"]

    mod = importlib.import_module(f"ci.{module}")
    if len(inspect.signature(mod.metrics).parameters) == 3:
        return mod.metrics(median, bytes_of, extra), getattr(mod, "GOALS", {})
    return mod.metrics(median, bytes_of), getattr(mod, "GOALS", {})


def compare(name: str, current: dict[str, float], goals: dict[str, float], tolerance: float) -> list[str]:
    path = BASELINES / f"{name}.json"
    baseline = json.loads(path.read_text())["metrics"] if path.exists() else {}
    failures = []
    print(f"\n== {name}: ratio (higher is better) | baseline | goal")
    for key, value in sorted(current.items()):
        base = baseline.get(key)
        goal = next((g for pat, g in goals.items() if fnmatch.fnmatch(key, pat)), None)
        flag = ""
        if base is not None and not key.startswith("info.") and value < base * (1 - tolerance):
            flag = f"  REGRESSION (< {base * (1 - tolerance):.3f})"
            failures.append(f"{name}.{key}: {value:.3f} vs baseline {base:.3f}")
        goal_txt = "" if goal is None else f"{goal:g} ({'met' if value >= goal else 'NOT met'})"
        base_txt = "-" if base is None else f"{base:.3f}"
        print(f"  {key:45s} {value:8.3f} | {base_txt:>8s} | {goal_txt}{flag}")
    if not baseline:
        print(f"  (no baseline stored yet at {path.relative_to(ROOT)}: run with --update)")
    return failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=sorted(SUITES), action="append")
    ap.add_argument("--update", action="store_true", help="store this run as the baseline")
    ap.add_argument("--report-only", action="store_true", help="never fail")
    ap.add_argument("--tolerance", type=float, default=0.25)
    ap.add_argument("pytest_args", nargs="*", help="extra arguments for pytest (after --)")
    args = ap.parse_args(argv)
    failures = []
    for name in args.suite or [s for s, m in SUITES.items() if (CI / f"{m}.py").exists()]:
        module = SUITES[name]
        results = run_suite(module, args.pytest_args)
        if not results["benchmarks"]:  # e.g. the GPU suite on a machine without a GPU
            print(f"\n== {name}: no benchmark ran here (skipped)")
            continue
        current, goals = suite_metrics(module, results)
        failures += compare(name, current, goals, args.tolerance)
        if args.update:
            BASELINES.mkdir(exist_ok=True)
            (BASELINES / f"{name}.json").write_text(json.dumps({"metrics": current}, indent=1, sort_keys=True) + "\n")
            print(f"  baseline written: ci/baselines/{name}.json")
    if failures and not args.report_only and not args.update:
        print("\nperf regressions:\n  " + "\n  ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
