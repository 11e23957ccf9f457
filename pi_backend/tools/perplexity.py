"""Perplexity and predictor quality of a model as the engine runs it, one command away:

    pi-backend perplexity -m model.powerinfer.gguf -f text.txt --modes dense,oracle,sparse

Each mode is a fresh engine on the same file and the same token windows, so the accuracy cost of
sparsity is read side by side. Predictor recall is measured against the exact active set (the ReLU
gate's sign) on the same inputs the predictor sees.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np

from pi_backend import native


@dataclass
class PerplexityResult:
    mode: str
    n_tokens: int
    nll: float  # mean negative log-likelihood, nats per token
    computed_fraction: float
    listed_fraction: float

    @property
    def ppl(self) -> float:
        return float(np.exp(self.nll))


def windows(tokens: list[int], window: int, max_windows: int | None = None) -> list[list[int]]:
    out = [tokens[i: i + window] for i in range(0, len(tokens) - 1, window)]
    out = [w for w in out if len(w) > 1]
    return out[:max_windows] if max_windows else out


def perplexity(model, token_windows: list[list[int]]) -> tuple[float, int]:
    """Mean NLL (nats/token) of predicting each window's next tokens, each window from an empty cache."""
    total, count = 0.0, 0
    for w in token_windows:
        model.reset()
        logits = model.forward(w[:-1], all_logits=True).astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        total -= logp[np.arange(len(w) - 1), w[1:]].sum()
        count += len(w) - 1
    return total / max(count, 1), count


def evaluate_modes(path, token_windows, modes=("dense", "oracle", "sparse"), **options) -> list[PerplexityResult]:
    from pi_backend.engine.model import load

    results = []
    for mode in modes:
        m = load(path, mode=mode, **options)
        nll, n = perplexity(m, token_windows)
        stats = [f.stats for f in m.ffn]
        total = sum(s.calls * s.n_ff for s in stats) or 1
        results.append(PerplexityResult(mode, n, nll, sum(s.computed for s in stats) / total,
                                        sum(s.listed for s in stats) / total))
        m.close()
    return results


@dataclass
class RecallResult:
    layer: int
    recall: float     # truly active neurons that were predicted
    precision: float  # predicted neurons that were truly active
    true_density: float
    predicted_density: float


def predictor_recall(model, token_windows) -> list[RecallResult]:
    """Per layer, per token: the predictor's set vs the exact active set, on the engine's own inputs.

    Runs the model in its configured mode; each layer's FFN is observed, not changed."""
    counts = np.zeros((len(model.ffn), 4))  # predicted & true, true, predicted, tokens * n_ff
    model.ffn = [_Observed(f, counts[i]) for i, f in enumerate(model.ffn)]
    try:
        for w in token_windows:
            model.reset()
            model.forward(w)
    finally:
        model.ffn = [o.inner for o in model.ffn]
    return [RecallResult(i, c[0] / max(c[1], 1), c[0] / max(c[2], 1), c[1] / c[3], c[2] / c[3])
            for i, c in enumerate(counts)]


class _Observed:
    """A SparseFFN wrapper that counts its predictor's hits against the exact (ReLU gate) active set."""

    def __init__(self, inner, counts: np.ndarray):
        self.inner, self.counts = inner, counts
        if inner.weights.fc1 is None:
            raise ValueError(f"layer {inner.layer} has no predictor")

    def __call__(self, ffn_inp, x):
        lw = self.inner.weights
        true = native.gemm(lw.gate if lw.gate is not None else lw.up, x) > 0
        z = np.maximum(native.gemm(lw.fc1, ffn_inp), 0)
        pred = native.gemm(lw.fc2, np.ascontiguousarray(z)) >= self.inner.threshold
        self.counts += [np.sum(true & pred), true.sum(), pred.sum(), true.size]
        return self.inner(ffn_inp, x)


def main(argv=None) -> int:
    from pi_backend.engine.model import load

    ap = argparse.ArgumentParser(prog="pi-backend perplexity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-f", "--file", required=True, help="text file")
    ap.add_argument("--modes", default="dense,oracle,sparse")
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--max-windows", type=int, default=32)
    ap.add_argument("-t", "--threads", type=int, default=0)
    ap.add_argument("--threshold", type=float)
    ap.add_argument("--recall", action="store_true", help="also measure predictor recall per layer")
    args = ap.parse_args(argv)
    opts = {"n_threads": args.threads}
    if args.threshold is not None:
        opts["threshold"] = args.threshold
    probe = load(args.model, **opts)
    text = open(args.file, encoding="utf-8", errors="replace").read()
    tokens = probe.tokenizer.encode(text)
    wins = windows(tokens, args.window, args.max_windows)
    if not wins:
        print("pi-backend perplexity: the text is too short", file=sys.stderr)
        return 2
    modes = [m for m in args.modes.split(",") if m]
    if not probe.config.has_predictors and "sparse" in modes:
        modes.remove("sparse")
        print("(no predictors in this file: skipping mode sparse)", file=sys.stderr)
    print(f"{len(wins)} windows of {args.window} tokens from {args.file}")
    print(f"{'mode':10s} {'ppl':>9s} {'nll':>8s} {'computed':>9s} {'listed':>7s}")
    base = None
    for r in evaluate_modes(args.model, wins, modes, **opts):
        base = base if base is not None else r.ppl
        print(f"{r.mode:10s} {r.ppl:9.4f} {r.nll:8.4f} {r.computed_fraction:9.1%} {r.listed_fraction:7.1%}"
              f"  ({(r.ppl / base - 1):+.2%} vs {modes[0]})")
    if args.recall and probe.config.has_predictors:
        print(f"\n{'layer':>5s} {'recall':>7s} {'precision':>9s} {'true dens':>9s} {'pred dens':>9s}")
        for r in predictor_recall(load(args.model, mode="sparse", **opts), wins):
            print(f"{r.layer:5d} {r.recall:7.4f} {r.precision:9.4f} {r.true_density:9.1%} {r.predicted_density:9.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
