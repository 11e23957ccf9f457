"""Quantize a GGUF or PowerInfer GGUF to F16 / BF16 / Q8_0 / Q4_0, keeping the PWRI magic and all metadata.

    pi-backend quantize -m model.powerinfer.gguf -o model.q4_0.powerinfer.gguf --type q4_0
    pi-backend quantize -m model.powerinfer.gguf -o out.gguf --type q4_0 --predictor-type q4_0 --check

Every tensor is re-encoded from the source file's own values (`GGUFFile.dequantize`, then
`gguf.quants` through `encode_tensor`); a tensor already of the target type is copied byte for byte.
1-D tensors (norms) stay F32, and a matrix whose rows do not divide into the type's blocks falls back
to F16 (as llama.cpp's quantizer does).

The predictor (`blk.N.fc1/fc2`) gets its own type, `--predictor-type`: by default Q8_0 for Q8_0 /
Q4_0 files and the weight type for F16 / BF16 / F32 ones. Measured on tiny-relu (pi_backend/data/
README.md): a Q8_0 predictor keeps the F16 predictor's recall (0.9916 vs 0.9918 at the same
density); a Q4_0 one drops to 0.959. Quantizing the *weights* moves the true active set too (Q4_0
weights: recall 0.983 with an unchanged predictor), so after a lossy re-encoding of a file with
predictors the per-layer thresholds are recalibrated on the quantized model (calibration corpus,
engine, exact active sets) to the file's target recall (`--no-recalibrate` keeps them).
`--check` measures recall and token-by-token perplexity of source and output on the held-out corpus.

This module also holds the small file-rewriting helpers the other tools share (`rewrite_model`,
`raw_tensor`, `source_metadata`): copy a model with some tensors or metadata replaced, atomically.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
from gguf.constants import GGMLQuantizationType as QT
from gguf.constants import GGUFValueType

from pi_backend.model.gguf_file import GGUFFile
from pi_backend.model.gguf_write import (EncodedTensor, TypedValue, choose_tensor_type, encode_tensor,
                                         parse_weight_type, typed_metadata, write_gguf)

QUANT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
DEFAULT_PREDICTOR_TYPE = "q8_0"
RECALIBRATE_TOKENS = 8192
_FILE_TYPES = {QT.F32: 0, QT.F16: 1, QT.Q4_0: 2, QT.Q8_0: 7, QT.BF16: 32}  # llama_ftype values


# ----------------------------------------------------------------------------- file rewriting helpers
def raw_tensor(gguf: GGUFFile, name: str) -> EncodedTensor:
    """A tensor exactly as stored (no re-encoding), ready for write_gguf."""
    info = gguf.tensor(name)
    t = QT(info.ggml_type)
    if t == QT.F32:
        return EncodedTensor(np.asarray(gguf.array(name), dtype=np.float32), t)
    if t == QT.F16:
        return EncodedTensor(np.asarray(gguf.array(name), dtype=np.float16), t)
    return EncodedTensor(info.raw.reshape(*info.shape[:-1], -1), t)  # bytes, row by row


def source_metadata(gguf: GGUFFile) -> tuple[dict, int | None]:
    """The file's metadata with its types, minus general.architecture (write_gguf sets it) and
    general.alignment (returned separately: it must reach the writer, not only the header)."""
    meta = typed_metadata(gguf)
    meta.pop("general.architecture", None)
    align = meta.pop("general.alignment", None)
    return meta, (int(align.value) if align is not None else None)


def rewrite_model(src: GGUFFile, out_path: str | os.PathLike, *, tensors: Mapping[str, EncodedTensor] | None = None,
                  metadata: Mapping[str, object] | None = None, drop_metadata=(), powerinfer: bool | None = None,
                  order: list[str] | None = None) -> Path:
    """Write a copy of `src` to out_path: `tensors` replace (or add) tensors, `metadata` sets keys,
    `drop_metadata` removes keys; everything else is copied as stored. Written to a temporary file
    beside out_path and renamed over it, so out_path may be src's own path."""
    out_path = Path(out_path)
    meta, alignment = source_metadata(src)
    for key in drop_metadata:
        meta.pop(key, None)
    meta.update(metadata or {})
    replaced = dict(tensors or {})
    names = order if order is not None else list(src.tensors) + [n for n in replaced if n not in src.tensors]
    out = {n: replaced[n] if n in replaced else raw_tensor(src, n) for n in names}
    fd, tmp = tempfile.mkstemp(prefix=out_path.name + ".", suffix=".tmp", dir=out_path.parent)
    os.close(fd)
    try:
        write_gguf(tmp, src.arch, meta, out, powerinfer=src.is_powerinfer if powerinfer is None else powerinfer,
                   alignment=alignment)
        # mkstemp made it 0600: give it the replaced file's mode, or what a plain open() would
        if out_path.exists():
            mode = out_path.stat().st_mode & 0o777
        else:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return out_path


def check_output_path(src: str | os.PathLike, out: str | os.PathLike, allow_same: bool = False) -> None:
    if not os.path.isfile(src):
        raise FileNotFoundError(f"model file {os.fspath(src)!r} does not exist")
    out = Path(out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"output directory {os.fspath(out.parent)!r} does not exist")
    if not allow_same and out.exists() and os.path.samefile(src, out):
        raise ValueError(f"output {os.fspath(out)!r} is the input file; write to another path")


# ----------------------------------------------------------------------------- quantization
def is_predictor(name: str) -> bool:
    return name.endswith(".fc1.weight") or name.endswith(".fc2.weight")


@dataclass
class TensorChange:
    name: str
    shape: tuple
    src_type: str
    dst_type: str
    rel_rms_error: float  # ||dst - src|| / ||src|| (0 when copied)
    copied: bool


@dataclass
class QuantizeReport:
    src: str
    dst: str
    weight_type: str
    predictor_type: str
    src_bytes: int
    dst_bytes: int
    tensors: list = field(default_factory=list)
    thresholds: tuple | None = None  # (old, new) per-layer predictor thresholds when recalibrated

    def summary(self) -> str:
        by_type: dict = {}
        for t in self.tensors:
            by_type.setdefault(t.dst_type, []).append(t)
        lines = [f"{self.src} ({self.src_bytes / 2**20:.2f} MiB) -> {self.dst} ({self.dst_bytes / 2**20:.2f} MiB), "
                 f"weights {self.weight_type}, predictor {self.predictor_type}"]
        for t, items in sorted(by_type.items()):
            worst = max(items, key=lambda c: c.rel_rms_error)
            lines.append(f"  {t:5s} {len(items):4d} tensors, worst relative RMS error {worst.rel_rms_error:.2e} ({worst.name})")
        fallback = [t for t in self.tensors if t.dst_type == "F16" and self.weight_type in ("q8_0", "q4_0")
                    and len(t.shape) > 1 and not is_predictor(t.name)]
        if fallback:
            lines.append(f"  ({len(fallback)} matrices kept at F16: their rows do not divide into {self.weight_type} blocks)")
        return "\n".join(lines)


def target_type(name: str, shape: tuple, weight_type: QT, predictor_type: QT) -> QT:
    return choose_tensor_type(shape, predictor_type if is_predictor(name) else weight_type)


def quantize_model(src_path: str | os.PathLike, dst_path: str | os.PathLike, weight_type: str = "q4_0", *,
                   predictor_type: str | None = None, show_progress: bool = True) -> QuantizeReport:
    """Re-encode every matrix of src to weight_type (predictor matrices to predictor_type, default
    DEFAULT_PREDICTOR_TYPE, or the weight type when that is more precise); metadata and magic kept."""
    from pi_backend.tools.collect import Progress

    wt = parse_weight_type(weight_type)
    pt = parse_weight_type(predictor_type or _default_predictor_type(weight_type))
    check_output_path(src_path, dst_path)
    with GGUFFile.open(src_path) as src:
        from pi_backend.model.config import ModelConfig

        ModelConfig.from_gguf(src)  # a model we can describe, with consistent shapes, before any work
        report = QuantizeReport(os.fspath(src_path), os.fspath(dst_path), QT(wt).name.lower(), QT(pt).name.lower(),
                                os.path.getsize(src_path), 0)
        encoded = {}
        bar = Progress(len(src.tensors), "quantize", show_progress)
        for name, info in src.tensors.items():
            dst_t = target_type(name, info.shape, wt, pt)
            if info.ggml_type == dst_t:
                encoded[name] = raw_tensor(src, name)
                err, copied = 0.0, True
            else:
                values = src.dequantize(name)
                encoded[name] = encode_tensor(values, dst_t)
                err, copied = _rel_error(values, encoded[name]), False
            report.tensors.append(TensorChange(name, info.shape, info.type_name, dst_t.name, err, copied))
            bar.update()
        file_type = TypedValue(_FILE_TYPES[wt], GGUFValueType.UINT32)
        extra = {"general.file_type": file_type}
        if wt in (QT.Q8_0, QT.Q4_0):
            extra["general.quantization_version"] = TypedValue(2, GGUFValueType.UINT32)
        rewrite_model(src, dst_path, tensors=encoded, metadata=extra,
                      drop_metadata=() if wt in (QT.Q8_0, QT.Q4_0) else ("general.quantization_version",))
    report.dst_bytes = os.path.getsize(dst_path)
    return report


def _default_predictor_type(weight_type: str) -> str:
    order = ["q4_0", "q8_0", "bf16", "f16", "f32"]  # least to most precise
    wt, dp = weight_type.lower(), DEFAULT_PREDICTOR_TYPE
    return wt if order.index(wt) > order.index(dp) else dp


def _rel_error(values: np.ndarray, enc: EncodedTensor) -> float:
    from gguf.quants import dequantize

    if enc.ggml_type in (QT.F32, QT.F16):
        back = enc.data.astype(np.float32)
    else:
        back = dequantize(enc.data, enc.ggml_type).reshape(values.shape)
    norm = float(np.linalg.norm(values))
    return float(np.linalg.norm(back - values) / norm) if norm else 0.0


# ----------------------------------------------------------------------------- thresholds for the quantized model
def recalibrate_thresholds(path, windows, target_recall: float | None = None, *, n_threads: int = 0,
                           show_progress: bool = True) -> tuple[list, list]:
    """Re-set each layer's predictor threshold so the predictor reaches target_recall on the model *as
    stored in path* (quantized weights shift the true active set; quantized predictors shift the logits).

    Runs the engine (oracle mode, exact) over windows, keeps the predictor logits of the truly active
    (token, neuron) pairs per layer, and takes the largest threshold reaching the recall; rewrites the
    file's `pi_backend.sparse_thresholds` in place. target_recall: the file's
    `pi_backend.predictor.target_recall` (written by train-predictor), else 0.99.
    Returns (old thresholds, new thresholds)."""
    from pi_backend.engine.model import load
    from pi_backend.model.config import SPARSE_THRESHOLD_KEY, SPARSE_THRESHOLDS_KEY
    from pi_backend.tools.collect import run_windows
    from pi_backend.tools.train_predictor import calibrate_threshold

    m = load(path, mode="oracle", n_threads=n_threads)
    try:
        if not m.config.has_predictors:
            raise ValueError(f"{os.fspath(path)}: no predictor to recalibrate")
        if target_recall is None:
            target_recall = float(m.gguf.metadata.get("pi_backend.predictor.target_recall", 0.99))
        old = [f.threshold for f in m.ffn]
        positives: list = [[] for _ in m.ffn]

        def record(call) -> None:
            if call.weights.fc1 is not None:
                positives[call.layer].append(call.predictor_logits()[call.activation() != 0])

        run_windows(m, windows, record, "recalibrate", show_progress)
    finally:
        m.close()
    new = []
    for i, pos in enumerate(positives):
        if not pos:
            new.append(old[i])
            continue
        logits = np.concatenate(pos)
        new.append(float(calibrate_threshold(logits, np.ones(logits.shape, bool), target_recall)))
    ts = np.asarray(new, dtype=np.float32)
    with GGUFFile.open(path) as g:
        rewrite_model(g, path, metadata={SPARSE_THRESHOLDS_KEY: ts,
                                         SPARSE_THRESHOLD_KEY: TypedValue(float(np.median(ts)), GGUFValueType.FLOAT32)})
    return old, new


# ----------------------------------------------------------------------------- the predictor's recall per type
@dataclass
class RecallCheck:
    label: str
    recall: list
    predicted_density: list
    true_density: list
    nll: float
    n_tokens: int

    @property
    def ppl(self) -> float:
        return float(np.exp(self.nll))


def check_model(path, windows, label: str = "", mode: str = "sparse", n_threads: int = 0,
                show_progress: bool = True, perplexity: bool = True) -> RecallCheck:
    """Predictor recall / density per layer (sparse mode, per token) and token-by-token perplexity."""
    from pi_backend.engine.model import load
    from pi_backend.tools.collect import decode_nll, predictor_confusion

    m = load(path, mode=mode, n_threads=n_threads)
    try:
        c = predictor_confusion(m, windows, show_progress, desc=f"recall {label}")
        nll, n = decode_nll(m, windows, show_progress, desc=f"perplexity {label}") if perplexity else (float("nan"), 0)
    finally:
        m.close()
    return RecallCheck(label, c.recall.tolist(), c.predicted_density.tolist(), c.true_density.tolist(), nll, n)


def format_checks(checks: list) -> str:
    rows = [f"{'file':28s} {'recall/layer':>32s} {'min recall':>10s} {'pred dens':>9s} {'ppl':>9s}"]
    base = checks[0].ppl if checks else float("nan")
    for c in checks:
        rec = " ".join(f"{r:.4f}" for r in c.recall)
        rows.append(f"{c.label:28s} {rec:>32s} {min(c.recall):10.4f} {np.mean(c.predicted_density):9.4f} "
                    f"{c.ppl:9.4f} ({c.ppl / base - 1:+.2%})")
    return "\n".join(rows)


def quantize(src_path, dst_path, weight_type: str = "q4_0", *, predictor_type: str | None = None,
             recalibrate: bool | None = None, text: str | None = None, tokens: int = RECALIBRATE_TOKENS,
             n_threads: int = 0, show_progress: bool = True) -> QuantizeReport:
    """quantize_model, then (recalibrate None: whenever a predictor or a weight changed lossily and the
    file has predictors) recalibrate_thresholds on `text` (default: the built-in calibration corpus).
    The report's `thresholds` holds (old, new) when they were recalibrated."""
    from pi_backend.tools import corpus

    if text is None and recalibrate is not False:
        text = corpus.calibration_text()
    report = quantize_model(src_path, dst_path, weight_type, predictor_type=predictor_type,
                            show_progress=show_progress)
    lossy = any(not t.copied and t.rel_rms_error > 0 for t in report.tensors)
    has_predictors = any(is_predictor(t.name) for t in report.tensors)
    if recalibrate is None:
        recalibrate = lossy and has_predictors
    if recalibrate and has_predictors:
        from pi_backend.engine.model import load

        probe = load(dst_path, mode="dense", n_threads=n_threads)
        try:
            window = min(probe.n_ctx, 512)
            windows = corpus.token_windows(probe.tokenizer, text, window, max(2, tokens // window))
        finally:
            probe.close()
        report.thresholds = recalibrate_thresholds(dst_path, windows, n_threads=n_threads, show_progress=show_progress)
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="pi-backend quantize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True, help="source GGUF / PowerInfer GGUF")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--type", default="q4_0", choices=QUANT_TYPES, help="weight type (default q4_0)")
    ap.add_argument("--predictor-type", choices=QUANT_TYPES,
                    help=f"type of blk.N.fc1/fc2 (default {DEFAULT_PREDICTOR_TYPE}, or the weight type if more precise)")
    ap.add_argument("--no-recalibrate", action="store_true",
                    help="keep the predictor thresholds as they are (default: recalibrate them on the quantized model)")
    ap.add_argument("--text", help="calibration text for the recalibration (default: the built-in corpus)")
    ap.add_argument("--tokens", type=int, default=RECALIBRATE_TOKENS, help="recalibration tokens")
    ap.add_argument("--check", action="store_true",
                    help="measure predictor recall and perplexity of source and output on held-out text")
    ap.add_argument("--eval-text", help="text file for --check (default: the built-in held-out corpus)")
    ap.add_argument("--windows", type=int, default=16, help="--check: token windows (default 16)")
    ap.add_argument("-t", "--threads", type=int, default=0)
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    from pi_backend.tools.corpus import load_text

    # text files fail now, not after quantizing
    text = load_text(args.text) if args.text else None
    eval_text = load_text(args.eval_text, "heldout") if args.check else None
    report = quantize(args.model, args.output, args.type, predictor_type=args.predictor_type,
                      recalibrate=False if args.no_recalibrate else None, text=text, tokens=args.tokens,
                      n_threads=args.threads, show_progress=not args.quiet)
    print(report.summary())
    if report.thresholds:
        old, new = report.thresholds
        print("predictor thresholds recalibrated on the quantized model: " +
              ", ".join(f"{a:.4g} -> {b:.4g}" for a, b in zip(old, new)))
    if args.check:
        from pi_backend.engine.model import load
        from pi_backend.tools.corpus import token_windows

        probe = load(args.output)
        if not probe.config.has_predictors:
            print("(no predictor in this file: nothing to check)")
            return 0
        wins = token_windows(probe.tokenizer, eval_text, probe.n_ctx, args.windows)
        checks = [check_model(p, wins, label, n_threads=args.threads, show_progress=not args.quiet)
                  for p, label in ((args.model, Path(args.model).name), (args.output, Path(args.output).name))]
        print(format_checks(checks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
