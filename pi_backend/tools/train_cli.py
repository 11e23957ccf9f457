"""Train activation predictors for a ReLU-family GGUF on the engine and write a PowerInfer GGUF.

    pi-backend train-predictor -m model.gguf -o model.powerinfer.gguf            # built-in corpus
    pi-backend train-predictor -m model.gguf -o out.powerinfer.gguf --text calib.txt --eval-text test.txt

1. Collect: the engine runs the model (oracle mode: exact) over calibration text; a hook on every FFN
   call records the predictor's input (`ffn_inp`, the residual stream before the FFN norm) and the true
   active set (h != 0, h = act(gate·x)·(up·x) over all neurons, via native.gemm) — pi_backend.tools.collect.
2. Train (pi_backend.tools.train_predictor): per layer, candidate ranks smallest first, each layer's
   threshold calibrated to the target recall on a held-out split, the smallest good-enough rank kept.
3. Write a PowerInfer GGUF: PWRI magic, the source's metadata and tensors, `ffn_down` replaced by
   `ffn_down_t`, `blk.N.fc1/fc2` at --predictor-type, per-layer thresholds in
   `pi_backend.sparse_thresholds`. When every layer's threshold has the same sign, fc2 is rescaled so
   that one threshold fits all layers (`powerinfer.sparse_threshold` = ±1): stock PowerInfer, which
   reads only the global threshold, then predicts exactly what pi_backend does.
4. Evaluate the written file on held-out text with the engine: per-layer recall, precision and
   predicted density (sparse mode, token by token, errors propagating), and perplexity sparse vs dense —
   both token by token (each token's FFN uses only its own predicted set, as in generation) and batched
   (pi_backend.tools.perplexity: the union over a window's tokens).

`--from-predictors p.npz` writes a file from predictors saved earlier with `--save-predictors`
(their shapes are checked against the model first).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf.constants import GGUFValueType

from pi_backend.model.config import FFN_ACT_KEY, SPARSE_THRESHOLD_KEY, SPARSE_THRESHOLDS_KEY, ModelConfig
from pi_backend.model.gguf_file import GGUFFile
from pi_backend.model.gguf_write import TypedValue, choose_tensor_type, encode_tensor
from pi_backend.tools.train_predictor import DEFAULT_RANKS, PredictorSet, TrainOptions

RELU_FAMILY = ("reglu", "drelu", "relu")
DEFAULT_PREDICTOR_TYPE = "f16"
DEFAULT_TOKENS = 40960
TARGET_RECALL_KEY = "pi_backend.predictor.target_recall"
CALIBRATION_KEY = "pi_backend.predictor.calibration"


# ----------------------------------------------------------------------------- checks
def check_model_for_predictors(path) -> ModelConfig:
    """The source must exist, be a model the engine runs, and have a ReLU-family FFN."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file {os.fspath(path)!r} does not exist")
    with GGUFFile.open(path) as g:
        cfg = ModelConfig.from_gguf(g)
    if cfg.ffn_act not in RELU_FAMILY:
        raise ValueError(f"{os.fspath(path)}: FFN activation {cfg.ffn_act!r} is not ReLU-family, so no neuron is "
                         "ever exactly inactive and there is nothing to predict; use `pi-backend calibrate-threshold` "
                         "(threshold mode), or pass the right activation if this is a ReLU model "
                         "(PowerInfer's dense files do not record it)")
    if cfg.arch not in ("llama", "bamboo"):
        raise ValueError(f"{os.fspath(path)}: architecture {cfg.arch!r} is not supported by the engine yet")
    return cfg


def check_predictors(cfg: ModelConfig, ps: PredictorSet, where: str = "predictors") -> None:
    """Every predictor must fit the model: one entry per layer, fc1 [r, n_embd], fc2 [n_ff, r]."""
    if len(ps.layers) != cfg.n_layer:
        raise ValueError(f"{where}: {len(ps.layers)} layers, the model has {cfg.n_layer}")
    for i, p in ps.trained():
        if p.fc1.ndim != 2 or p.fc1.shape[1] != cfg.n_embd:
            raise ValueError(f"{where}: layer {i} fc1 has shape {p.fc1.shape}, expected [rank, {cfg.n_embd}] (n_embd)")
        if p.fc2.shape != (cfg.n_ff, p.fc1.shape[0]):
            raise ValueError(f"{where}: layer {i} fc2 has shape {p.fc2.shape}, expected ({cfg.n_ff}, {p.fc1.shape[0]}) "
                             f"(n_ff, rank)")
        if not np.isfinite(p.fc1).all() or not np.isfinite(p.fc2).all() or np.isnan(p.threshold):
            raise ValueError(f"{where}: layer {i} holds NaN or infinite values")


# ----------------------------------------------------------------------------- writing
def powerinfer_tensors(src: GGUFFile, cfg: ModelConfig, ps: PredictorSet, predictor_type: str) -> tuple[dict, list]:
    """(replaced/added tensors, file order): ffn_down -> ffn_down_t at the same type, fc1/fc2 per layer."""
    new, order = {}, []
    predicted = dict(ps.trained())
    for name in src.tensors:
        if name.endswith(".fc1.weight") or name.endswith(".fc2.weight"):
            continue  # a PWRI source's old predictor: replaced
        if name.endswith(".ffn_down.weight"):
            info = src.tensor(name)
            down_t = np.ascontiguousarray(src.dequantize(name).T)
            tname = name.replace(".ffn_down.weight", ".ffn_down_t.weight")
            new[tname] = encode_tensor(down_t, choose_tensor_type(down_t.shape, info.ggml_type))
            name = tname
        order.append(name)
        if name.endswith(".ffn_down_t.weight"):
            layer = int(name.split(".")[1])
            if layer in predicted:
                p = predicted[layer]
                for kind, array in (("fc1", p.fc1), ("fc2", p.fc2)):
                    pname = f"blk.{layer}.{kind}.weight"
                    new[pname] = encode_tensor(array, choose_tensor_type(array.shape, predictor_type))
                    order.append(pname)
    return new, order


def common_threshold(ps: PredictorSet) -> PredictorSet | None:
    """The same predictions with one threshold (±1) for every layer, if the thresholds' signs allow."""
    ts = np.array([p.threshold for _, p in ps.trained()], dtype=np.float64)
    if ts.size == 0 or not np.isfinite(ts).all() or (ts == 0).any():
        return None
    if (ts > 0).all():
        return ps.with_common_threshold(1.0)
    if (ts < 0).all():
        return ps.with_common_threshold(-1.0)
    return None


def write_powerinfer(src_path, out_path, ps: PredictorSet, *, predictor_type: str = DEFAULT_PREDICTOR_TYPE,
                     one_threshold: bool = True, calibration: str = "") -> tuple[Path, list]:
    """Write src with predictors as a PowerInfer GGUF; returns (path, per-layer thresholds written)."""
    from pi_backend.tools.quantize import check_output_path, rewrite_model

    check_output_path(src_path, out_path)
    with GGUFFile.open(src_path) as src:
        cfg = ModelConfig.from_gguf(src)
        check_predictors(cfg, ps)
        if one_threshold:
            ps = common_threshold(ps) or ps
        thresholds = [p.threshold if p is not None else 0.0 for p in ps.layers]
        ts = np.array(thresholds, dtype=np.float32)
        global_t = float(ts[0]) if (ts == ts[0]).all() else float(np.median(ts))
        tensors, order = powerinfer_tensors(src, cfg, ps, predictor_type)
        meta = {
            SPARSE_THRESHOLD_KEY: TypedValue(global_t, GGUFValueType.FLOAT32),
            SPARSE_THRESHOLDS_KEY: ts,
            FFN_ACT_KEY: cfg.ffn_act,
            TARGET_RECALL_KEY: TypedValue(float(ps.target_recall), GGUFValueType.FLOAT32),
        }
        if calibration:
            meta[CALIBRATION_KEY] = calibration
        path = rewrite_model(src, out_path, tensors=tensors, metadata=meta, order=order, powerinfer=True)
    return path, thresholds


# ----------------------------------------------------------------------------- evaluation
@dataclass
class Evaluation:
    recall: list
    precision: list
    true_density: list
    predicted_density: list
    decode_ppl: dict          # mode -> perplexity, token by token
    batched: list = field(default_factory=list)  # perplexity.PerplexityResult per mode (union over a window)
    n_tokens: int = 0

    @property
    def ppl_increase(self) -> float:
        return self.decode_ppl["sparse"] / self.decode_ppl["dense"] - 1.0

    def table(self) -> str:
        rows = [f"{'layer':>5} {'recall':>7} {'precision':>9} {'true dens':>9} {'pred dens':>9} {'pred/true':>9}"]
        for i, (r, p, t, d) in enumerate(zip(self.recall, self.precision, self.true_density, self.predicted_density)):
            rows.append(f"{i:5d} {r:7.4f} {p:9.4f} {t:9.4f} {d:9.4f} {d / t if t else float('nan'):9.3f}")
        rows.append(f"token by token ({self.n_tokens} tokens): dense ppl {self.decode_ppl['dense']:.4f}, "
                    f"sparse ppl {self.decode_ppl['sparse']:.4f} ({self.ppl_increase:+.3%})")
        if self.batched:
            base = self.batched[0].ppl
            rows.append("batched windows (pi_backend.tools.perplexity, active set = union over the window): " +
                        ", ".join(f"{r.mode} ppl {r.ppl:.4f} ({r.ppl / base - 1:+.3%}, computed {r.computed_fraction:.1%})"
                                  for r in self.batched))
        return "\n".join(rows)


def evaluate_powerinfer(path, windows, *, n_threads: int = 0, show_progress: bool = True,
                        batched: bool = True) -> Evaluation:
    """Recall etc. per layer (sparse mode, token by token) and perplexity sparse vs dense on windows."""
    from pi_backend.engine.model import load
    from pi_backend.tools.collect import decode_nll, predictor_confusion

    ppl = {}
    m = load(path, mode="sparse", n_threads=n_threads)
    try:
        c = predictor_confusion(m, windows, show_progress, desc="held-out recall")
        nll, n = decode_nll(m, windows, show_progress, desc="perplexity sparse")
        ppl["sparse"] = float(np.exp(nll))
    finally:
        m.close()
    m = load(path, mode="dense", n_threads=n_threads)
    try:
        nll, _ = decode_nll(m, windows, show_progress, desc="perplexity dense")
        ppl["dense"] = float(np.exp(nll))
    finally:
        m.close()
    results = []
    if batched:
        from pi_backend.tools.perplexity import evaluate_modes

        results = evaluate_modes(path, windows, ("dense", "sparse"), n_threads=n_threads)
    return Evaluation(c.recall.tolist(), c.precision.tolist(), c.true_density.tolist(),
                      c.predicted_density.tolist(), ppl, results, n)


# ----------------------------------------------------------------------------- the whole pipeline
@dataclass
class TrainResult:
    path: Path
    predictors: PredictorSet
    thresholds: list
    calibration_tokens: int
    collect_seconds: float
    train_seconds: float
    evaluation: Evaluation | None = None


def train_powerinfer(model_path, out_path, *, text: str | None = None, eval_text: str | None = None,
                     tokens: int = DEFAULT_TOKENS, window: int | None = None, ranks=DEFAULT_RANKS,
                     target_recall: float = 0.99, density_slack: float = 0.25,
                     options: TrainOptions | None = None, predictor_type: str = DEFAULT_PREDICTOR_TYPE,
                     one_threshold: bool = True, evaluate: bool = True, eval_windows: int = 32,
                     n_threads: int = 0, show_progress: bool = True, log=None,
                     calibration_name: str | None = None) -> TrainResult:
    """Collect on the engine, train, write a PowerInfer GGUF and (optionally) evaluate it.

    text / eval_text: calibration and evaluation text (default: the built-in corpus's calibration and
    held-out parts). tokens: calibration budget (windows of `window` tokens, default the model's
    context up to 128 ... 512)."""
    from pi_backend.engine.model import load
    from pi_backend.tools import corpus
    from pi_backend.tools.collect import check_windows, engine_collector, progress
    from pi_backend.tools.quantize import check_output_path
    from pi_backend.tools.train_predictor import collect_calibration_data, train_predictors

    # every check that can fail does so before the long part
    check_model_for_predictors(model_path)
    check_output_path(model_path, out_path)
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    if not ranks or any(int(r) < 1 for r in ranks):
        raise ValueError(f"ranks must be positive, got {list(ranks)}")
    from pi_backend.model.gguf_write import parse_weight_type

    parse_weight_type(predictor_type)
    calibration_name = calibration_name or ("built-in corpus (Python standard library docs), calibration part"
                                            if text is None else "user text")
    text = corpus.calibration_text() if text is None else text
    eval_text = corpus.heldout_text() if eval_text is None else eval_text
    model = load(model_path, mode="oracle", n_threads=n_threads)
    try:
        window = window or min(model.n_ctx, 512)
        n_windows = max(2, tokens // window)
        windows = corpus.token_windows(model.tokenizer, text, window, n_windows)
        check_windows(model, windows)
        if len(windows) < 2:
            raise ValueError("the calibration text gives fewer than 2 token windows; pass a longer text")
        test_windows = corpus.token_windows(model.tokenizer, eval_text, window, eval_windows) if evaluate else []
        if evaluate:
            check_windows(model, test_windows)
        t0 = time.time()
        data = collect_calibration_data(engine_collector(model), progress(windows, "collect", show_progress))
    finally:
        model.close()
    t1 = time.time()
    if log:
        log(f"collected {data.n_tokens} tokens in {len(windows)} windows ({t1 - t0:.1f} s)")
    ps = train_predictors(data, ranks=tuple(int(r) for r in ranks), target_recall=target_recall,
                          density_slack=density_slack, options=options, log=log)
    del data
    t2 = time.time()
    path, thresholds = write_powerinfer(model_path, out_path, ps, predictor_type=predictor_type,
                                        one_threshold=one_threshold,
                                        calibration=f"{calibration_name}, {len(windows)} windows of {window} tokens")
    result = TrainResult(path, ps, thresholds, sum(len(w) for w in windows), t1 - t0, t2 - t1)
    if evaluate:
        result.evaluation = evaluate_powerinfer(path, test_windows, n_threads=n_threads, show_progress=show_progress)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="pi-backend train-predictor", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True, help="source GGUF (dense ReLU-family model, or a PowerInfer GGUF)")
    ap.add_argument("-o", "--output", required=True, help="PowerInfer GGUF to write")
    ap.add_argument("--text", help="calibration text file (default: the built-in corpus, calibration part)")
    ap.add_argument("--eval-text", help="held-out text file (default: the built-in corpus, held-out part)")
    ap.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help=f"calibration tokens (default {DEFAULT_TOKENS})")
    ap.add_argument("--window", type=int, help="tokens per window (default: the model's context, at most 512)")
    ap.add_argument("--ranks", default=",".join(map(str, DEFAULT_RANKS)), help="candidate predictor ranks")
    ap.add_argument("--target-recall", type=float, default=0.99)
    ap.add_argument("--density-slack", type=float, default=0.25,
                    help="a rank is good enough at predicted density <= (1 + slack) x the true density")
    ap.add_argument("--epochs", type=int, default=TrainOptions.epochs)
    ap.add_argument("--backend", default="auto", choices=("auto", "numpy", "torch"))
    ap.add_argument("--predictor-type", default=DEFAULT_PREDICTOR_TYPE, choices=("f32", "f16", "bf16", "q8_0", "q4_0"))
    ap.add_argument("--per-layer-thresholds", action="store_true",
                    help="keep each layer's own threshold instead of rescaling fc2 to one common threshold")
    ap.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--save-predictors", help="also save the trained predictors (.npz)")
    ap.add_argument("--from-predictors", help="write the file from predictors saved earlier (.npz): no training")
    ap.add_argument("-t", "--threads", type=int, default=0)
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    from pi_backend.tools.corpus import load_text

    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    if args.from_predictors:
        check_model_for_predictors(args.model)
        if not os.path.isfile(args.from_predictors):
            raise FileNotFoundError(f"predictor file {args.from_predictors!r} does not exist")
        ps = PredictorSet.load(args.from_predictors)
        path, thresholds = write_powerinfer(args.model, args.output, ps, predictor_type=args.predictor_type,
                                            one_threshold=not args.per_layer_thresholds,
                                            calibration=f"predictors from {Path(args.from_predictors).name}")
        print(f"wrote {path}: thresholds {[round(t, 4) for t in thresholds]}")
        return 0
    text = load_text(args.text) if args.text else None
    eval_text = load_text(args.eval_text) if args.eval_text else None
    ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
    res = train_powerinfer(args.model, args.output, text=text, eval_text=eval_text, tokens=args.tokens,
                           window=args.window, ranks=ranks, target_recall=args.target_recall,
                           density_slack=args.density_slack,
                           options=TrainOptions(epochs=args.epochs, backend=args.backend),
                           predictor_type=args.predictor_type, one_threshold=not args.per_layer_thresholds,
                           evaluate=not args.no_eval, eval_windows=args.eval_windows, n_threads=args.threads,
                           show_progress=not args.quiet, log=log,
                           calibration_name=Path(args.text).name if args.text else None)
    if args.save_predictors:
        res.predictors.save(args.save_predictors)
    ps = res.predictors
    print(f"wrote {res.path} ({os.path.getsize(res.path) / 2**20:.2f} MiB): {res.calibration_tokens} calibration "
          f"tokens, collect {res.collect_seconds:.1f} s, train {res.train_seconds:.1f} s ({ps.info.get('backend')})")
    print(f"held-out calibration split (thresholds set here to recall >= {ps.target_recall}):")
    print(ps.report_table())
    print(f"thresholds written: {[round(t, 4) for t in res.thresholds]}")
    if res.evaluation is not None:
        print("held-out text, engine, sparse mode:")
        print(res.evaluation.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
