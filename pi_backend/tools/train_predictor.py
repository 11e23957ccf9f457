"""Train PowerInfer-shaped activation predictors, one per layer, and calibrate their thresholds.

PowerInfer never released its predictor training; this is ours. Per layer L:

    logits = fc2 · ReLU(fc1 · x)      fc1 [r, dim], fc2 [ffn_dim, r], no biases (PowerInfer's shapes)
    neuron i predicted active  iff  logits[i] >= threshold_L      (PowerInfer's rule, per layer here)

x is the layer's FFN input *before* the FFN RMSNorm (`ffn_inp`), the truth is `h != 0`.

Pipeline
1. Collect (ffn_inp, active) per layer from any model through a callback (`collect_fn(tokens)`); the
   reference forward pass provides one (`reference_collector`), an engine can provide another.
2. Split by *window* (adjacent tokens are correlated) into a training part and a held-out part.
3. Per layer and candidate rank: initialise from a low-rank least-squares fit (a ReLU pair (+v, -v)
   reproduces a linear direction exactly, and the true gate is linear in x up to a positive scale),
   then Adam on binary cross-entropy whose positive term is weighted (a missed active neuron costs
   output quality, a false positive only costs bandwidth).
4. Threshold: the largest value whose pooled recall on the held-out tokens is >= target_recall.
5. Rank: the smallest candidate whose predicted density at that threshold is at most
   (1 + density_slack) × the true density; if none is, the candidate with the lowest predicted
   density. Sparser / less skewed layers thus get a smaller rank (the paper's per-layer adaptation)
   and nothing is spent on ranks a layer does not need.

numpy only; torch is used when importable (`backend="auto"`) and runs the same algorithm (same
initialisation, batch order and update rule), so results agree within float32 rounding. Torch trains
on one thread by default (TrainOptions.torch_threads); on shared cores give numpy's OpenBLAS the same
(OPENBLAS_NUM_THREADS=1): two threads on busy cores were 4-5x slower here, not faster.

On the tiny-relu fixture (40k calibration tokens, target recall 0.99) every layer settles on rank 64
with a predicted density 1.14-1.20x the true one, and the perplexity of the predictor-restricted model
is within 0.01% of the dense one (python -m pi_backend.tools.perplexity_ref --predictors).
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np

DEFAULT_RANKS = (32, 64, 128, 256)


# ----------------------------------------------------------------------------- 1. calibration data
@dataclass
class CalibrationData:
    """Per layer: predictor inputs [N, dim] (float32) and the true active set [N, ffn_dim] (bool).
    window_id [N] says which token window each row came from, for held-out splitting."""

    inputs: list
    active: list
    window_id: np.ndarray

    @property
    def n_layers(self) -> int:
        return len(self.inputs)

    @property
    def n_tokens(self) -> int:
        return int(self.window_id.shape[0])

    def subset(self, rows: np.ndarray) -> "CalibrationData":
        return CalibrationData([x[rows] for x in self.inputs], [y[rows] for y in self.active], self.window_id[rows])


# collect_fn(tokens [T] int) -> one (ffn_inp [T, dim], h or active [T, ffn_dim]) pair per layer
CollectFn = Callable[[np.ndarray], Sequence[tuple]]


def reference_collector(cfg, weights, dtype=np.float32) -> CollectFn:
    """collect_fn over the plain-numpy reference model (pi_backend.model.numpy_reference)."""
    from pi_backend.model.numpy_reference import forward

    def collect(tokens):
        _, internals = forward(cfg, weights, tokens, return_internals=True, dtype=dtype)
        return [(li.ffn_inp, li.h) for li in internals]

    return collect


def collect_calibration_data(collect_fn: CollectFn, token_windows: Iterable) -> CalibrationData:
    """Run collect_fn over each window of tokens and stack the per-layer pairs.
    A float activation counts as active where it is != 0; a bool array is taken as is."""
    inputs, active, window_ids = None, None, []
    for wid, tokens in enumerate(token_windows):
        pairs = collect_fn(np.asarray(tokens))
        if inputs is None:
            inputs, active = [[] for _ in pairs], [[] for _ in pairs]
        for layer, (x, h) in enumerate(pairs):
            h = np.asarray(h)
            inputs[layer].append(np.asarray(x, dtype=np.float32))
            active[layer].append(h if h.dtype == bool else h != 0)
        window_ids.append(np.full(len(pairs[0][0]), wid, dtype=np.int64))
    if inputs is None:
        raise ValueError("no token windows")
    return CalibrationData([np.concatenate(x) for x in inputs], [np.concatenate(y) for y in active],
                           np.concatenate(window_ids))


def split_by_window(data: CalibrationData, holdout_fraction: float, seed: int) -> tuple:
    windows = np.unique(data.window_id)
    n_hold = max(1, int(round(holdout_fraction * len(windows))))
    if n_hold >= len(windows):
        raise ValueError("need at least two token windows to hold some out")
    held = np.random.default_rng(seed).choice(windows, size=n_hold, replace=False)
    is_held = np.isin(data.window_id, held)
    return data.subset(np.flatnonzero(~is_held)), data.subset(np.flatnonzero(is_held))


# ----------------------------------------------------------------------------- 2. threshold and metrics
def calibrate_threshold(logits: np.ndarray, active: np.ndarray, target_recall: float) -> np.float32:
    """Largest t such that recall(t) = #(active & logits >= t) / #active >= target_recall (pooled over
    all tokens and neurons). That t is the k-th largest logit among the truly active entries, with k the
    smallest count whose recall reaches the target (compared in float exactly as `recall` computes it)."""
    if not 0.0 < target_recall <= 1.0:
        raise ValueError("target_recall must be in (0, 1]")
    positive = np.sort(np.asarray(logits, dtype=np.float32)[np.asarray(active, dtype=bool)])[::-1]
    n = positive.shape[0]
    if n == 0:  # nothing ever fires: predict nothing
        return np.float32(np.inf)
    k = min(n, max(1, int(math.floor(target_recall * n))))
    while k < n and k / n < target_recall:
        k += 1
    while k > 1 and (k - 1) / n >= target_recall:
        k -= 1
    return np.float32(positive[k - 1])


@dataclass
class LayerReport:
    layer: int
    rank: int
    threshold: float
    recall: float             # of truly active (token, neuron) pairs, the fraction predicted active
    precision: float          # of predicted active pairs, the fraction truly active
    true_density: float       # fraction of (token, neuron) pairs truly active
    predicted_density: float  # fraction predicted active
    n_tokens: int
    candidates: dict = field(default_factory=dict)  # rank -> predicted density at the target recall
    train_seconds: float = 0.0


def prediction_metrics(predicted: np.ndarray, active: np.ndarray) -> dict:
    tp = int(np.count_nonzero(predicted & active))
    n_active, n_pred = int(np.count_nonzero(active)), int(np.count_nonzero(predicted))
    return dict(recall=tp / n_active if n_active else 1.0, precision=tp / n_pred if n_pred else 1.0,
                true_density=n_active / active.size, predicted_density=n_pred / active.size)


# ----------------------------------------------------------------------------- 3. the predictor
@dataclass
class LayerPredictor:
    fc1: np.ndarray  # [r, dim]
    fc2: np.ndarray  # [ffn_dim, r]
    threshold: float

    @property
    def rank(self) -> int:
        return int(self.fc1.shape[0])

    def logits(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        return np.maximum(x @ self.fc1.T, 0) @ self.fc2.T

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.logits(x) >= np.float32(self.threshold)


@dataclass
class PredictorSet:
    layers: list                      # per model layer: LayerPredictor, or None (that layer runs dense)
    reports: list = field(default_factory=list)  # LayerReport per trained layer (held-out calibration split)
    target_recall: float = 0.99
    info: dict = field(default_factory=dict)

    def trained(self):
        return [(i, p) for i, p in enumerate(self.layers) if p is not None]

    def predict(self, layer: int, x: np.ndarray) -> np.ndarray:
        return self.layers[layer].predict(x)

    def ffn_mask(self) -> Callable:
        """For numpy_reference.forward(ffn_mask=...): each layer computes only the predicted neurons, the
        predictor reading the residual stream of the masked run itself (as a sparse engine would)."""
        def mask(layer, ffn_inp):
            p = self.layers[layer]
            return None if p is None else p.predict(ffn_inp)
        return mask

    def tensors(self) -> dict:
        """PowerInfer GGUF tensor names -> row-major matrices (fc1 [r, dim], fc2 [ffn_dim, r])."""
        out = {}
        for i, p in self.trained():
            out[f"blk.{i}.fc1.weight"], out[f"blk.{i}.fc2.weight"] = p.fc1, p.fc2
        return out

    def with_common_threshold(self, value: float = 1.0) -> "PredictorSet":
        """Same predictions with one global threshold (stock PowerInfer reads only one): fc2 of each
        layer is scaled by value / threshold_L > 0, which needs every threshold to share value's sign."""
        layers = list(self.layers)
        for i, p in self.trained():
            if not (np.isfinite(p.threshold) and p.threshold * value > 0):
                raise ValueError(f"layer {i}: threshold {p.threshold} cannot be rescaled to {value}")
            scale = np.float32(value / p.threshold)
            layers[i] = LayerPredictor(p.fc1, (p.fc2 * scale).astype(np.float32), float(value))
        return PredictorSet(layers, self.reports, self.target_recall, dict(self.info))

    def evaluate(self, data: CalibrationData) -> list:
        """LayerReport per trained layer of these predictors on other data (e.g. a test split)."""
        reports = []
        for i, p in self.trained():
            m = prediction_metrics(p.predict(data.inputs[i]), data.active[i])
            reports.append(LayerReport(layer=i, rank=p.rank, threshold=float(p.threshold),
                                       n_tokens=data.n_tokens, **m))
        return reports

    def report_table(self, reports: Optional[list] = None) -> str:
        reports = self.reports if reports is None else reports
        head = f"{'layer':>5} {'rank':>5} {'threshold':>10} {'recall':>7} {'precision':>9} " \
               f"{'true dens':>9} {'pred dens':>9} {'pred/true':>9} {'train s':>7}  candidates (rank: pred dens)"
        rows = [head]
        for r in reports:
            cands = " ".join(f"{k}:{v:.3f}" for k, v in sorted(r.candidates.items()))
            ratio = r.predicted_density / r.true_density if r.true_density else float("nan")
            seconds = f"{r.train_seconds:.1f}" if r.train_seconds else "-"
            rows.append(f"{r.layer:>5} {r.rank:>5} {r.threshold:>10.4g} {r.recall:>7.4f} {r.precision:>9.4f} "
                        f"{r.true_density:>9.4f} {r.predicted_density:>9.4f} {ratio:>9.3f} {seconds:>7}  {cands}")
        return "\n".join(rows)

    def save(self, path: str) -> None:
        arrays = {}
        for i, p in self.trained():
            arrays[f"layers.{i}.fc1"], arrays[f"layers.{i}.fc2"] = p.fc1, p.fc2
            arrays[f"layers.{i}.threshold"] = np.float32(p.threshold)
        meta = dict(n_layers=len(self.layers), target_recall=self.target_recall, info=self.info,
                    reports=[asdict(r) for r in self.reports])
        np.savez(path, _meta=np.array(json.dumps(meta)), **arrays)

    @classmethod
    def load(cls, path: str) -> "PredictorSet":
        with np.load(path) as z:
            meta = json.loads(str(z["_meta"]))
            layers = [LayerPredictor(z[f"layers.{i}.fc1"], z[f"layers.{i}.fc2"], float(z[f"layers.{i}.threshold"]))
                      if f"layers.{i}.fc1" in z.files else None for i in range(meta["n_layers"])]
        reports = [LayerReport(**{**r, "candidates": {int(k): v for k, v in r["candidates"].items()}})
                   for r in meta["reports"]]
        return cls(layers, reports, meta["target_recall"], meta["info"])


# ----------------------------------------------------------------------------- 4. training
@dataclass
class TrainOptions:
    epochs: int = 16
    batch_size: int = 256
    lr: float = 1e-2
    pos_weight: float = 4.0   # weight of the active (positive) term of the cross-entropy
    seed: int = 0
    backend: str = "auto"     # "auto" (torch if importable), "torch" or "numpy"
    # torch threads while training (restored after). The matrices are small (batch × ≤ ffn_dim), so
    # a second thread buys little, and on shared cores OpenMP's spinning made it 5× slower here
    # (performance-notes.md). None leaves torch's setting alone.
    torch_threads: Optional[int] = 1


class _NumpyOps:
    name = "numpy"
    asarray = staticmethod(lambda a: np.asarray(a, dtype=np.float32))
    labels = staticmethod(lambda a: np.asarray(a, dtype=bool))
    numpy = staticmethod(lambda a: a)
    sqrt = staticmethod(np.sqrt)
    # tanh form: no overflow for large |z|
    sigmoid = staticmethod(lambda z: np.float32(0.5) * (np.float32(1) + np.tanh(np.float32(0.5) * z)))
    relu = staticmethod(lambda z: np.maximum(z, np.float32(0)))
    take = staticmethod(lambda a, rows: a[rows])
    threads = staticmethod(lambda n: contextlib.nullcontext())  # OpenBLAS: left as configured


class _TorchOps:
    name = "torch"

    def __init__(self):
        import torch
        self.torch = torch

    @contextlib.contextmanager
    def threads(self, n: Optional[int]):
        before = self.torch.get_num_threads()
        if n:
            self.torch.set_num_threads(n)
        try:
            yield
        finally:
            self.torch.set_num_threads(before)

    def asarray(self, a):
        if isinstance(a, self.torch.Tensor):
            return a.to(self.torch.float32)
        return self.torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    def labels(self, a):
        return self.torch.from_numpy(np.ascontiguousarray(a, dtype=bool))

    def numpy(self, a):
        return a.numpy()

    def sqrt(self, a):
        return self.torch.sqrt(a)

    def sigmoid(self, z):
        return self.torch.sigmoid(z)

    def relu(self, z):
        return self.torch.relu(z)

    def take(self, a, rows):
        return a[self.torch.from_numpy(rows)]


def _ops(backend: str):
    if backend in ("auto", "torch"):
        try:
            return _TorchOps()
        except ImportError:
            if backend == "torch":
                raise
    if backend not in ("auto", "numpy", "torch"):
        raise ValueError(f"unknown backend {backend!r}")
    return _NumpyOps()


def least_squares_init(x: np.ndarray, active: np.ndarray, rank: int, ridge: float = 1e-3) -> tuple:
    """fc1, fc2 whose product reproduces the best rank-(rank/2) linear fit of ±1 labels:
    ReLU(v·x) - ReLU(-v·x) = v·x, so a pair of hidden units (+v, -v) carries one linear direction."""
    gram = np.zeros((x.shape[1], x.shape[1]))
    xty = np.zeros((x.shape[1], active.shape[1]))
    for start in range(0, x.shape[0], 8192):  # in blocks: [N, ffn_dim] float targets may not fit in memory
        xb, yb = x[start:start + 8192].astype(np.float64), active[start:start + 8192]
        gram += xb.T @ xb
        xty += 2.0 * (xb.T @ yb.astype(np.float64)) - xb.sum(axis=0)[:, None]   # X^T (2y - 1)
    gram += ridge * np.trace(gram) / gram.shape[0] * np.eye(gram.shape[0])
    linear = np.linalg.solve(gram, xty).T                      # [ffn_dim, dim]
    u, s, vt = np.linalg.svd(linear, full_matrices=False)
    k = min(rank // 2, len(s))
    root = np.sqrt(s[:k])
    v = vt[:k] * root[:, None]                                 # [k, dim]
    us = u[:, :k] * root[None, :]                              # [ffn_dim, k]
    fc1 = np.zeros((rank, x.shape[1])); fc2 = np.zeros((active.shape[1], rank))
    fc1[:k], fc1[k:2 * k], fc2[:, :k], fc2[:, k:2 * k] = v, -v, us, -us
    if rank > 2 * k:  # odd rank or rank > 2·dim: small random extra units
        rng = np.random.default_rng(rank)
        fc1[2 * k:] = rng.normal(0, 1 / math.sqrt(x.shape[1]), (rank - 2 * k, x.shape[1]))
    return fc1.astype(np.float32), fc2.astype(np.float32)


def fit_predictor(x: np.ndarray, active: np.ndarray, rank: int, opts: Optional[TrainOptions] = None) -> tuple:
    """Train fc1 [rank, dim], fc2 [ffn_dim, rank] on inputs x [N, dim] and labels active [N, ffn_dim].

    Loss per token: sum over neurons of pos_weight·y·softplus(-z) + (1-y)·softplus(z), averaged over
    the batch; plain Adam with a cosine-decayed learning rate. Gradients are written out by hand so the
    numpy and torch paths run the very same arithmetic."""
    opts = opts or TrainOptions()
    ops = _ops(opts.backend)
    with ops.threads(opts.torch_threads):
        return _fit(ops, x, active, rank, opts)


def _fit(ops, x: np.ndarray, active: np.ndarray, rank: int, opts: TrainOptions) -> tuple:
    # The sign of the true gate does not depend on the scale of x (RMSNorm): train on x / s, fold 1/s
    # into fc1 afterwards, so one learning rate suits every layer.
    scale = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) or 1.0
    xs = (x / scale).astype(np.float32)
    fc1, fc2 = least_squares_init(xs, active, rank)
    params = [ops.asarray(fc1), ops.asarray(fc2)]
    m1 = [p * 0 for p in params]; m2 = [p * 0 for p in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    n = xs.shape[0]
    steps_per_epoch = max(1, n // opts.batch_size)
    total, step = opts.epochs * steps_per_epoch, 0
    rng = np.random.default_rng(opts.seed)
    xt, yt = ops.asarray(xs), ops.labels(active)  # labels stay bool until a batch is taken
    pw = float(opts.pos_weight)
    for _ in range(opts.epochs):
        order = rng.permutation(n)
        for b in range(steps_per_epoch):
            rows = order[b * opts.batch_size:(b + 1) * opts.batch_size]
            xb, yb = ops.take(xt, rows), ops.asarray(ops.take(yt, rows))
            w1, w2 = params
            z1 = xb @ w1.T
            a1 = ops.relu(z1)
            z2 = a1 @ w2.T
            p = ops.sigmoid(z2)
            # d loss / d z2 = -pw·y·(1-p) + (1-y)·p, averaged over the batch
            dz2 = (p * (1 - yb) - pw * yb * (1 - p)) * (1.0 / len(rows))
            g2 = dz2.T @ a1
            dz1 = (dz2 @ w2) * (z1 > 0)
            g1 = dz1.T @ xb
            step += 1
            lr = opts.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / total)))
            c1, c2 = 1 - beta1 ** step, 1 - beta2 ** step
            for i, g in enumerate((g1, g2)):
                m1[i] = beta1 * m1[i] + (1 - beta1) * g
                m2[i] = beta2 * m2[i] + (1 - beta2) * g * g
                params[i] = params[i] - (lr / c1) * m1[i] / (ops.sqrt(m2[i] / c2) + eps)
    fc1, fc2 = (np.asarray(ops.numpy(p), dtype=np.float32) for p in params)
    return (fc1 / np.float32(scale)).astype(np.float32), fc2


def _train_layer(layer: int, train: CalibrationData, held: CalibrationData, ranks: Sequence[int],
                 target_recall: float, density_slack: float, opts: TrainOptions, log) -> tuple:
    x, y = train.inputs[layer], train.active[layer]
    hx, hy = held.inputs[layer], held.active[layer]
    true_density = float(hy.mean())
    best, candidates, t0 = None, {}, time.time()
    for rank in sorted(ranks):
        fc1, fc2 = fit_predictor(x, y, rank, opts)
        p = LayerPredictor(fc1, fc2, 0.0)
        logits = p.logits(hx)
        p.threshold = float(calibrate_threshold(logits, hy, target_recall))
        metrics = prediction_metrics(logits >= np.float32(p.threshold), hy)
        candidates[rank] = metrics["predicted_density"]
        if log:
            log(f"layer {layer} rank {rank}: recall {metrics['recall']:.4f} density {true_density:.4f} -> "
                f"{metrics['predicted_density']:.4f} ({time.time() - t0:.1f} s)")
        if best is None or metrics["predicted_density"] < best[1]["predicted_density"]:
            best = (p, metrics)
        if metrics["predicted_density"] <= (1 + density_slack) * true_density:
            best = (p, metrics)  # the smallest rank that is good enough
            break
    p, metrics = best
    report = LayerReport(layer=layer, rank=p.rank, threshold=p.threshold, n_tokens=held.n_tokens,
                         candidates=candidates, train_seconds=time.time() - t0, **metrics)
    return p, report


def train_predictors(source: Union[CalibrationData, CollectFn, Sequence[tuple]], windows: Optional[Iterable] = None,
                     *, ranks: Sequence[int] = DEFAULT_RANKS, target_recall: float = 0.99,
                     density_slack: float = 0.25, holdout_fraction: float = 0.2,
                     options: Optional[TrainOptions] = None, layers: Optional[Sequence[int]] = None,
                     log: Optional[Callable[[str], None]] = None) -> PredictorSet:
    """Train and calibrate one predictor per layer.

    source: CalibrationData; or a collect_fn with `windows` (iterable of token arrays); or a sequence
      of per-layer (inputs [N, dim], active [N, ffn_dim]) pairs (rows then split into 10 pseudo-windows
      in order; pass CalibrationData to control the split).
    ranks: candidate ranks, tried smallest first (a single-element tuple fixes the rank).
    density_slack: a rank is good enough once its predicted density at target_recall is at most
      (1 + density_slack) × the true density on the held-out split.
    layers: train only these layers (others get no predictor: None in the returned list).
    """
    opts = options or TrainOptions()
    if isinstance(source, CalibrationData):
        data = source
    elif callable(source):
        if windows is None:
            raise ValueError("a collect_fn needs token windows")
        data = collect_calibration_data(source, windows)
    else:
        pairs = list(source)
        n = len(pairs[0][0])
        data = CalibrationData([np.asarray(x, np.float32) for x, _ in pairs],
                               [np.asarray(y) if np.asarray(y).dtype == bool else np.asarray(y) != 0 for _, y in pairs],
                               np.arange(n) * 10 // max(n, 1))
    train, held = split_by_window(data, holdout_fraction, opts.seed)
    todo = range(data.n_layers) if layers is None else layers
    predictors, reports = [None] * data.n_layers, []
    t0 = time.time()
    for layer in todo:
        predictors[layer], report = _train_layer(layer, train, held, ranks, target_recall, density_slack, opts, log)
        reports.append(report)
    info = dict(backend=_ops(opts.backend).name, train_tokens=train.n_tokens, heldout_tokens=held.n_tokens,
                seconds=round(time.time() - t0, 1), ranks=list(ranks), density_slack=density_slack,
                options=asdict(opts))
    return PredictorSet(predictors, reports, target_recall, info)
