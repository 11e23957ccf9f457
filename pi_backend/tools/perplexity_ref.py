"""Byte-level text windows and reference cross-entropy / sparsity measurements for byte-vocab models.

The tiny-relu fixture reads raw UTF-8 bytes (vocab 256), so a "corpus" is just the bytes of some
text files. Default corpus on these machines: CMake's reStructuredText help
(/usr/share/cmake-*/Help, ~1,900 files, ~9 MB) — English technical prose in the same markup as the
Python docs the model was trained on, but text the model has never seen.

It also runs the predictor experiment: train predictors on one half of the corpus files, then compare
recall, density and perplexity of the predictor-restricted model with the dense one on the other half.

    python -m pi_backend.tools.perplexity_ref [--corpus DIR] [--windows N]            # dense only
    python -m pi_backend.tools.perplexity_ref --predictors [--calib-tokens N] [--save out.npz]
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from pi_backend.model.numpy_reference import FfnMask, ReferenceConfig, ReferenceWeights, cross_entropy, forward

WINDOW = 128  # the tiny model's training context


CORPUS_CANDIDATES = ("/usr/share/cmake-*/Help", "/usr/share/doc/python3*/html/_sources")


def default_corpus_dir() -> Optional[str]:
    """The first English reStructuredText tree found on this machine, or None."""
    for pattern in CORPUS_CANDIDATES:
        found = sorted(glob.glob(pattern))
        if found:
            return found[-1]
    return None


def corpus_files(path: str, patterns=("*.rst", "*.txt", "*.md")) -> list[str]:
    """Files under `path` (or `path` itself), sorted so every machine sees the same order."""
    if os.path.isfile(path):
        return [path]
    files = set()
    for pattern in patterns:
        files.update(glob.glob(os.path.join(path, "**", pattern), recursive=True))
    return sorted(files)


def read_bytes(files: list[str]) -> np.ndarray:
    return np.frombuffer(b"\n".join(open(f, "rb").read() for f in files), dtype=np.uint8)


def split_corpus(path: str, n_parts: int, seed: int = 0) -> list[np.ndarray]:
    """Byte streams from disjoint sets of files (a shuffled round-robin split), so a predictor
    calibrated on one part is evaluated on text it has not seen."""
    files = corpus_files(path)
    if len(files) < n_parts:
        raise ValueError(f"{path}: {len(files)} files, need at least {n_parts}")
    order = np.random.default_rng(seed).permutation(len(files))
    return [read_bytes([files[i] for i in order[p::n_parts]]) for p in range(n_parts)]


def byte_windows(data: np.ndarray, n_windows: int, window: int = WINDOW, seed: int = 0) -> np.ndarray:
    """[n, window + 1] token windows at non-overlapping random offsets: inputs w[:-1], targets w[1:]."""
    n_slots = (len(data) - 1) // window
    if n_slots < 1:
        raise ValueError("corpus shorter than one window")
    slots = np.random.default_rng(seed).choice(n_slots, size=min(n_windows, n_slots), replace=False)
    return np.stack([data[s * window: s * window + window + 1] for s in np.sort(slots)]).astype(np.int64)


@dataclass
class EvalResult:
    nats_per_byte: float
    n_tokens: int
    density: list  # per layer: fraction of (token, neuron) pairs with h != 0 (of the run evaluated)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats_per_byte)

    @property
    def sparsity(self) -> list:
        return [1.0 - d for d in self.density]


def evaluate(cfg: ReferenceConfig, w: ReferenceWeights, windows: np.ndarray, ffn_mask: FfnMask = None,
             dtype=np.float32) -> EvalResult:
    """Mean next-byte cross-entropy over all positions of all windows (each window starts at position
    0, as in training), and the per-layer activation density of that run."""
    total, count = 0.0, 0
    active = np.zeros(cfg.n_layers)
    for win in windows:
        logits, internals = forward(cfg, w, win[:-1], return_internals=True, ffn_mask=ffn_mask, dtype=dtype)
        total += float(cross_entropy(logits, win[1:]).sum())
        count += len(win) - 1
        active += [float(li.active.mean()) for li in internals]
    return EvalResult(nats_per_byte=total / count, n_tokens=count, density=list(active / len(windows)))


@dataclass
class PredictorExperiment:
    predictors: object        # train_predictor.PredictorSet (reports: held-out calibration split)
    test_reports: list        # LayerReport per layer on the test text
    dense: EvalResult
    predicted: EvalResult     # the model with each FFN restricted to the predicted neurons
    collect_seconds: float
    train_seconds: float
    corpus: str
    calib_tokens: int

    @property
    def perplexity_increase(self) -> float:
        """Relative perplexity increase of predicted over dense (0.01 = 1%)."""
        return self.predicted.perplexity / self.dense.perplexity - 1.0

    def summary(self) -> str:
        p = self.predictors
        return "\n".join([
            f"corpus {self.corpus}: {self.calib_tokens} calibration tokens "
            f"({p.info['train_tokens']} train / {p.info['heldout_tokens']} held out), "
            f"{self.dense.n_tokens} test tokens from other files",
            f"collect {self.collect_seconds:.1f} s, train {self.train_seconds:.1f} s ({p.info['backend']})",
            f"held-out calibration split (threshold set here to recall >= {p.target_recall}):",
            p.report_table(),
            "test text:",
            p.report_table(self.test_reports),
            f"dense     {self.dense.nats_per_byte:.4f} nats/byte, ppl {self.dense.perplexity:.4f}",
            f"predicted {self.predicted.nats_per_byte:.4f} nats/byte, ppl {self.predicted.perplexity:.4f} "
            f"({100 * self.perplexity_increase:+.3f}%)"])


def predictor_experiment(cfg: ReferenceConfig, w: ReferenceWeights, corpus: str, calib_tokens: int = 40960,
                         test_windows: int = 64, seed: int = 0, log=None, **train_kwargs) -> PredictorExperiment:
    """Train predictors on `calib_tokens` tokens from half of the corpus files, evaluate on the other half."""
    from pi_backend.tools.train_predictor import collect_calibration_data, reference_collector, train_predictors

    calib_text, test_text = split_corpus(corpus, 2, seed=seed)
    calib = byte_windows(calib_text, max(2, calib_tokens // WINDOW), seed=seed + 1)
    test = byte_windows(test_text, test_windows, seed=seed + 2)
    collect = reference_collector(cfg, w)
    t0 = time.time()
    data = collect_calibration_data(collect, (win[:-1] for win in calib))
    t1 = time.time()
    predictors = train_predictors(data, log=log, **train_kwargs)
    t2 = time.time()
    test_data = collect_calibration_data(collect, (win[:-1] for win in test))
    return PredictorExperiment(predictors=predictors, test_reports=predictors.evaluate(test_data),
                               dense=evaluate(cfg, w, test), predicted=evaluate(cfg, w, test, predictors.ffn_mask()),
                               collect_seconds=t1 - t0, train_seconds=t2 - t1, corpus=corpus,
                               calib_tokens=data.n_tokens)


def main(argv=None):
    from pi_backend.model.numpy_reference import TINY_RELU_NPZ, load_tiny_relu

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=TINY_RELU_NPZ)
    ap.add_argument("--corpus", default=default_corpus_dir())
    ap.add_argument("--windows", type=int, default=128, help="test windows of %d bytes" % WINDOW)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--predictors", action="store_true", help="train predictors and compare with dense")
    ap.add_argument("--calib-tokens", type=int, default=40960)
    ap.add_argument("--target-recall", type=float, default=0.99)
    ap.add_argument("--backend", default="auto", choices=["auto", "numpy", "torch"])
    ap.add_argument("--save", help="write the PredictorSet here (.npz)")
    a = ap.parse_args(argv)
    if a.corpus is None:
        ap.error("no corpus found on this machine: pass --corpus DIR")
    cfg, w = load_tiny_relu(a.model)
    if a.predictors:
        from pi_backend.tools.train_predictor import TrainOptions

        exp = predictor_experiment(cfg, w, a.corpus, a.calib_tokens, a.windows, a.seed, log=print,
                                   target_recall=a.target_recall, options=TrainOptions(backend=a.backend))
        print(exp.summary())
        if a.save:
            exp.predictors.save(a.save)
        return
    data = read_bytes(corpus_files(a.corpus))
    t0 = time.time()
    r = evaluate(cfg, w, byte_windows(data, a.windows, seed=a.seed), dtype=np.float32)
    print(f"corpus {a.corpus}: {len(data)/1e6:.2f} MB; {r.n_tokens} tokens in {time.time()-t0:.1f} s")
    print(f"loss {r.nats_per_byte:.4f} nats/byte ({r.nats_per_byte/math.log(2):.3f} bits/byte), ppl {r.perplexity:.3f}")
    print("sparsity per layer: " + " ".join(f"{s:.3f}" for s in r.sparsity))


if __name__ == "__main__":
    main()
