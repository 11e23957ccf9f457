"""Calibrate per-layer activation thresholds for SiLU models: training-free sparsity (TEAL / CATS).

    pi-backend calibrate-threshold -m llama.gguf --sparsity 0.5 -o llama.t50.gguf
    pi-backend calibrate-threshold -m llama.gguf --sparsity 0.4 --in-place
    pi-backend calibrate-threshold -m llama.gguf --curve 0.3,0.4,0.5,0.6        # report only

A SwiGLU FFN has no exact zeros, but most |silu(gate · x)| are small. In threshold mode the engine
skips, per token, the neurons whose |silu(gate · x)| is at most the layer's cut (their up and down
rows are never read). For a target sparsity s, each layer's cut is the s-quantile of |silu(gate)|
over calibration text, measured on the engine's own inputs:

1. a dense pass collects, per layer, a fine log-spaced histogram of |silu(gate)| (1000 bins per
   decade: quantiles to ~0.25% of the value, memory independent of the token count);
2. (refine, default on) a second pass in threshold mode with those cuts, where each layer sees the
   inputs that the earlier thresholded layers produce, recalibrates the cuts — so the sparsity reached
   while running sparse, not only on dense activations, is the target.

The cuts go into the file's `pi_backend.sparse_thresholds` (a new file with -o, or the same file
with --in-place); run it with `mode="threshold"` (`pi-backend generate --mode threshold`). The
report gives, per target, the sparsity reached per layer on held-out text and the perplexity against
dense (batched windows: threshold mode zeroes per token, so batching changes nothing).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf.constants import GGUFValueType

from pi_backend.model.config import SPARSE_THRESHOLDS_KEY
from pi_backend.model.gguf_write import TypedValue

TARGET_KEY = "pi_backend.threshold.target_sparsity"
DEFAULT_TOKENS = 16384
DEFAULT_CURVE = (0.3, 0.4, 0.5, 0.6)
# histogram of |activation|: [0, 1e-9) then 1000 log-spaced bins per decade up to 1e5
_EDGES = np.concatenate([[0.0], np.logspace(-9, 5, 14 * 1000 + 1)])


@dataclass
class Histograms:
    """Per layer: counts of |act(gate)| in _EDGES bins (values beyond the last edge in the last bin)."""

    counts: np.ndarray  # [n_layer, n_bins] int64
    n_tokens: int = 0

    @classmethod
    def zeros(cls, n_layer: int) -> "Histograms":
        return cls(np.zeros((n_layer, _EDGES.size - 1), np.int64))

    def add(self, layer: int, values: np.ndarray) -> None:
        v = np.abs(np.asarray(values, dtype=np.float64)).ravel()
        bins = np.clip(np.searchsorted(_EDGES, v, side="right") - 1, 0, _EDGES.size - 2)
        self.counts[layer] += np.bincount(bins, minlength=_EDGES.size - 1)

    def quantile(self, layer: int, q: float) -> float:
        """The value t with a fraction q of the layer's values <= t (linear within a bin)."""
        c = self.counts[layer]
        total = c.sum()
        if total == 0:
            raise ValueError(f"layer {layer}: no values collected")
        cum = np.cumsum(c)
        target = q * total
        b = int(np.searchsorted(cum, target, side="left"))
        b = min(b, c.size - 1)
        before = cum[b - 1] if b > 0 else 0
        frac = (target - before) / c[b] if c[b] else 1.0
        lo, hi = _EDGES[b], _EDGES[b + 1]
        return float(lo + frac * (hi - lo))


def check_model_for_thresholds(path) -> object:
    from pi_backend.model.config import load_config

    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file {os.fspath(path)!r} does not exist")
    cfg = load_config(path)
    if cfg.ffn_act != "swiglu":
        raise ValueError(f"{os.fspath(path)}: FFN activation {cfg.ffn_act!r}: threshold calibration is for SiLU "
                         "(swiglu) models; ReLU-family models are sparse by themselves — train a predictor with "
                         "`pi-backend train-predictor` instead")
    return cfg


def _check_targets(targets) -> list:
    out = [float(t) for t in targets]
    if not out or any(not 0.0 <= t < 1.0 for t in out):
        raise ValueError(f"target sparsity must be in [0, 1), got {targets}")
    return out


def collect_histograms(model, windows, show_progress: bool = True, desc: str = "calibrate") -> Histograms:
    """|act(gate)| histograms per layer over windows, on the engine as configured (dense or threshold)."""
    from pi_backend.tools.collect import run_windows

    h = Histograms.zeros(len(model.ffn))
    h.n_tokens = run_windows(model, windows, lambda call: h.add(call.layer, call.gate_activation()), desc, show_progress)
    return h


@dataclass
class LayerSparsity:
    sparsity: list  # per layer: fraction of (token, neuron) pairs with |act(gate)| <= cut, on the thresholded run
    nll: float
    n_tokens: int

    @property
    def ppl(self) -> float:
        return float(np.exp(self.nll))


def measure(model_path, thresholds, windows, n_threads: int = 0, show_progress: bool = True,
            desc: str = "measure") -> LayerSparsity:
    """Run in threshold mode with these cuts: the sparsity each layer reaches (per token, on its own
    inputs) and the perplexity of the windows."""
    from pi_backend.engine.model import load
    from pi_backend.tools.collect import run_windows
    from pi_backend.tools.perplexity import perplexity

    m = load(model_path, mode="threshold", thresholds=list(thresholds), n_threads=n_threads)
    try:
        below = np.zeros(len(m.ffn))
        pairs = np.zeros(len(m.ffn))

        def record(call):
            a = np.abs(call.gate_activation())
            below[call.layer] += np.count_nonzero(a <= call.threshold)
            pairs[call.layer] += a.size

        run_windows(m, windows, record, desc, show_progress)
        nll, n = perplexity(m, windows)
    finally:
        m.close()
    return LayerSparsity((below / np.maximum(pairs, 1)).tolist(), nll, n)


def dense_nll(model_path, windows, n_threads: int = 0) -> tuple[float, int]:
    from pi_backend.engine.model import load
    from pi_backend.tools.perplexity import perplexity

    m = load(model_path, mode="dense", n_threads=n_threads)
    try:
        return perplexity(m, windows)
    finally:
        m.close()


@dataclass
class CurvePoint:
    target: float
    thresholds: list
    heldout: LayerSparsity | None = None


@dataclass
class Calibration:
    points: list                  # CurvePoint per target
    calibration_tokens: int
    dense_nll: float = float("nan")
    eval_tokens: int = 0
    info: dict = field(default_factory=dict)

    def table(self) -> str:
        rows = [f"{'target':>6} {'reached (mean)':>14} {'per layer':>30} {'ppl':>9} {'vs dense':>9}  thresholds"]
        dense_ppl = float(np.exp(self.dense_nll))
        rows.append(f"{'dense':>6} {'0.0%':>14} {'':>30} {dense_ppl:9.4f} {'':>9}")
        for p in self.points:
            ts = " ".join(f"{t:.4g}" for t in p.thresholds)
            if p.heldout is None:
                rows.append(f"{p.target:6.0%} {'-':>14} {'':>30} {'-':>9} {'-':>9}  {ts}")
                continue
            per = " ".join(f"{s:.1%}" for s in p.heldout.sparsity)
            rows.append(f"{p.target:6.0%} {np.mean(p.heldout.sparsity):14.1%} {per:>30} {p.heldout.ppl:9.4f} "
                        f"{p.heldout.ppl / dense_ppl - 1:+9.2%}  {ts}")
        return "\n".join(rows)


def calibrate(model_path, targets=DEFAULT_CURVE, *, text: str | None = None, eval_text: str | None = None,
              windows=None, eval_windows=None, tokens: int = DEFAULT_TOKENS, n_eval_windows: int = 16,
              window: int | None = None, refine: bool = True, evaluate: bool = True, n_threads: int = 0,
              show_progress: bool = True) -> Calibration:
    """Per-layer cuts for each target sparsity; with evaluate, the reached sparsity and perplexity on
    held-out text (default texts: the built-in corpus's calibration and held-out parts)."""
    from pi_backend.engine.model import load
    from pi_backend.tools import corpus
    from pi_backend.tools.collect import check_windows

    check_model_for_thresholds(model_path)
    targets = _check_targets(targets)
    model = load(model_path, mode="dense", n_threads=n_threads)
    try:
        w = window or min(model.n_ctx, 512)
        if windows is None:
            windows = corpus.token_windows(model.tokenizer, corpus.calibration_text() if text is None else text,
                                           w, max(1, tokens // w))
        if evaluate and eval_windows is None:
            eval_windows = corpus.token_windows(model.tokenizer, corpus.heldout_text() if eval_text is None else eval_text,
                                                w, n_eval_windows)
        check_windows(model, windows)
        if evaluate:
            check_windows(model, eval_windows)
        hist = collect_histograms(model, windows, show_progress, "calibrate (dense)")
    finally:
        model.close()
    cal = Calibration([], hist.n_tokens, info={"refine": refine})
    for target in targets:
        cuts = [hist.quantile(i, target) for i in range(hist.counts.shape[0])]
        if refine and target > 0:
            m = load(model_path, mode="threshold", thresholds=cuts, n_threads=n_threads)
            try:
                h2 = collect_histograms(m, windows, show_progress, f"refine {target:.0%}")
            finally:
                m.close()
            cuts = [h2.quantile(i, target) for i in range(h2.counts.shape[0])]
        cal.points.append(CurvePoint(target, cuts))
    if evaluate:
        cal.dense_nll, cal.eval_tokens = dense_nll(model_path, eval_windows, n_threads)
        for p in cal.points:
            p.heldout = measure(model_path, p.thresholds, eval_windows, n_threads, show_progress, f"held-out {p.target:.0%}")
    return cal


def write_thresholds(model_path, out_path, thresholds, target: float | None = None) -> Path:
    """Copy the model with `pi_backend.sparse_thresholds` set (out_path may be model_path: atomic replace)."""
    from pi_backend.model.config import load_config
    from pi_backend.model.gguf_file import GGUFFile
    from pi_backend.tools.quantize import rewrite_model

    cfg = load_config(model_path)
    ts = np.asarray(thresholds, dtype=np.float32)
    if ts.shape != (cfg.n_layer,):
        raise ValueError(f"thresholds: {ts.size} values for a model of {cfg.n_layer} layers")
    if not np.isfinite(ts).all() or (ts < 0).any():
        raise ValueError("thresholds must be finite and >= 0")
    meta = {SPARSE_THRESHOLDS_KEY: ts}
    if target is not None:
        meta[TARGET_KEY] = TypedValue(float(target), GGUFValueType.FLOAT32)
    with GGUFFile.open(model_path) as src:
        return rewrite_model(src, out_path, metadata=meta)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="pi-backend calibrate-threshold", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True, help="SiLU (swiglu) GGUF")
    ap.add_argument("--sparsity", type=float, help="target sparsity to write (e.g. 0.5)")
    ap.add_argument("-o", "--output", help="write a new file with the thresholds")
    ap.add_argument("--in-place", action="store_true", help="write the thresholds into the model file itself")
    ap.add_argument("--curve", default=None,
                    help=f"target sparsities to report (default {','.join(map(str, DEFAULT_CURVE))} plus --sparsity)")
    ap.add_argument("--text", help="calibration text (default: the built-in corpus, calibration part)")
    ap.add_argument("--eval-text", help="held-out text (default: the built-in corpus, held-out part)")
    ap.add_argument("--tokens", type=int, default=DEFAULT_TOKENS)
    ap.add_argument("--window", type=int)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--no-refine", action="store_true", help="calibrate on dense activations only (one pass)")
    ap.add_argument("--no-eval", action="store_true", help="skip the held-out sparsity / perplexity report")
    ap.add_argument("-t", "--threads", type=int, default=0)
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    from pi_backend.tools.corpus import load_text

    if (args.output or args.in_place) and args.sparsity is None:
        ap.error("writing thresholds needs --sparsity")
    if args.output and args.in_place:
        ap.error("-o and --in-place exclude each other")
    check_model_for_thresholds(args.model)
    if args.output:
        from pi_backend.tools.quantize import check_output_path

        check_output_path(args.model, args.output)
    text = load_text(args.text) if args.text else None
    eval_text = load_text(args.eval_text) if args.eval_text else None
    curve = [float(x) for x in args.curve.split(",") if x.strip()] if args.curve else list(DEFAULT_CURVE)
    if args.sparsity is not None and args.sparsity not in curve:
        curve.append(args.sparsity)
    curve = sorted(_check_targets(curve))
    cal = calibrate(args.model, curve, text=text, eval_text=eval_text, tokens=args.tokens,
                    n_eval_windows=args.eval_windows, window=args.window, refine=not args.no_refine,
                    evaluate=not args.no_eval, n_threads=args.threads, show_progress=not args.quiet)
    print(f"{cal.calibration_tokens} calibration tokens" +
          (f", {cal.eval_tokens} held-out tokens (sparsity reached per layer, perplexity in threshold mode)"
           if not args.no_eval else ""))
    print(cal.table())
    if args.sparsity is not None and (args.output or args.in_place):
        point = next(p for p in cal.points if p.target == args.sparsity)
        out = write_thresholds(args.model, args.model if args.in_place else args.output, point.thresholds, args.sparsity)
        print(f"wrote thresholds for {args.sparsity:.0%} sparsity into {out} (run it with mode='threshold')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
