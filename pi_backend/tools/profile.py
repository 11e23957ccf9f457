"""Profile a model's FFN neuron activation frequencies: PowerInfer's `activation/activation_{i}.pt`.

    pi-backend profile -m model.gguf                       # built-in corpus -> <model dir>/activation/
    pi-backend profile -m model.gguf -f calib.txt -o stats/ --tokens 100000
    pi-backend profile --stats stats/ [-m model.gguf]      # report (and check) existing statistics

The engine runs the model (oracle mode for ReLU-family FFNs, which is exact; dense for others) over
calibration text; a hook on every FFN call computes the true activation h of every neuron on the
engine's own inputs (pi_backend.tools.collect) and counts, per layer and neuron, the tokens with
h != 0 (for SiLU models, |silu(gate)| > the layer's threshold-mode cut, when the file has one or
--act-threshold gives one). Per layer the frequencies (count / tokens, float32 [n_ff]) are written as
torch-format tensors (readable by torch.load(weights_only=True) and by pi_backend without torch), the
rank-frequency curve and the share of activations covered by the top k% of neurons are printed and,
when matplotlib is installed, drawn to `<out>/profile.png`.

PowerInfer never released its profiler; its placement reads exactly these files.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pi_backend.model.activation_stats import activation_file_name, load_activation_dir, save_activation_tensor

COVERAGE_FRACTIONS = (0.01, 0.05, 0.10, 0.20, 0.50)
DEFAULT_TOKENS = 32768
_NAME = re.compile(r"activation_(\d+)\.pt")


@dataclass
class Profile:
    """Per layer: how many of n_tokens tokens activated each neuron."""

    counts: list          # int64 [n_ff] per layer
    n_tokens: int
    source: str = ""

    @classmethod
    def from_frequencies(cls, freqs, source: str = "") -> "Profile":
        """A profile from stored frequencies (token count unknown: counts are the frequencies)."""
        return cls([np.asarray(f, dtype=np.float64) for f in freqs], 1, source)

    @property
    def n_layer(self) -> int:
        return len(self.counts)

    @property
    def n_ff(self) -> int:
        return int(self.counts[0].shape[0])

    @property
    def frequencies(self) -> list:
        return [(np.asarray(c, dtype=np.float64) / max(self.n_tokens, 1)).astype(np.float32) for c in self.counts]

    def density(self) -> list:
        """Mean fraction of neurons active per token, per layer (1 - sparsity)."""
        return [float(f.mean()) for f in self.frequencies]

    def coverage(self, fractions=COVERAGE_FRACTIONS) -> list:
        """Per layer: for each fraction k, the share of all activations that the top k of neurons carry."""
        out = []
        for c in self.counts:
            ordered = np.sort(np.asarray(c, dtype=np.float64))[::-1]
            total = ordered.sum()
            cum = np.cumsum(ordered) / total if total > 0 else np.zeros_like(ordered)
            out.append([float(cum[max(1, int(np.ceil(k * ordered.size))) - 1]) for k in fractions])
        return out

    def summary(self, fractions=COVERAGE_FRACTIONS) -> str:
        head = f"{'layer':>5} {'sparsity':>8} {'never':>6} {'always':>6}  " + " ".join(
            f"{'top ' + format(k, '.0%'):>8}" for k in fractions)
        rows = [f"{self.n_tokens} tokens" + (f" of {self.source}" if self.source else "") +
                "; share of all activations carried by the top k% most frequently active neurons:", head]
        for i, (f, cov) in enumerate(zip(self.frequencies, self.coverage(fractions))):
            rows.append(f"{i:5d} {1 - f.mean():8.1%} {int((f == 0).sum()):6d} {int((f >= 1).sum()):6d}  " +
                        " ".join(f"{c:8.1%}" for c in cov))
        return "\n".join(rows)

    def save(self, out_dir: str | os.PathLike) -> list:
        """activation_{i}.pt per layer (frequencies, float32). Returns the paths."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        return [save_activation_tensor(out_dir / activation_file_name(i), f) for i, f in enumerate(self.frequencies)]

    def plot(self, png_path: str | os.PathLike) -> bool:
        """Rank-frequency curve and coverage curve per layer; False (nothing written) without matplotlib."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return False
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
        for i, c in enumerate(self.counts):
            f = np.sort(np.asarray(c, dtype=np.float64) / max(self.n_tokens, 1))[::-1]
            ranks = np.arange(1, f.size + 1)
            ax1.plot(ranks, np.where(f > 0, f, np.nan), label=f"layer {i}", lw=1)  # never-active neurons: off the log scale
            total = f.sum()
            ax2.plot(100 * ranks / f.size, 100 * np.cumsum(f) / total if total else 0 * f, lw=1, label=f"layer {i}")
        ax1.set(xscale="log", yscale="log", xlabel="neuron rank (most frequently active first)",
                ylabel="activation frequency", title="rank-frequency")
        ax2.plot([0, 100], [0, 100], "k:", lw=0.8, label="uniform")
        ax2.set(xlabel="top k% of neurons", ylabel="% of all activations covered", title="coverage",
                xlim=(0, 100), ylim=(0, 100.5))
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
        ax2.legend(fontsize=7, ncol=2 if self.n_layer > 8 else 1, loc="lower right")
        fig.suptitle(f"FFN activation profile ({self.n_tokens} tokens{', ' + self.source if self.source else ''})", fontsize=10)
        fig.tight_layout()
        fig.savefig(png_path, dpi=110)
        plt.close(fig)
        return True


def check_output_dir(out_dir: str | os.PathLike, n_layer: int, n_ff: int, force: bool = False) -> None:
    """Activation files already in out_dir must belong to this model (layer count and n_ff), else the
    result would mix two models' statistics: refuse, or with force remove the ones that do not fit."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output {os.fspath(out_dir)!r} exists and is not a directory")
    if not out_dir.is_dir():
        return
    from pi_backend.model.activation_stats import ActivationFileError, load_activation_file

    foreign = []
    for entry in sorted(out_dir.iterdir()):
        m = _NAME.fullmatch(entry.name)
        if not m:
            continue
        if int(m.group(1)) >= n_layer:
            foreign.append((entry, f"layer {m.group(1)} (the model has {n_layer})"))
            continue
        try:
            load_activation_file(entry, n_ff)
        except ActivationFileError as e:
            foreign.append((entry, str(e).split(": ", 1)[-1]))
    if foreign and not force:
        listed = "; ".join(f"{p.name}: {why}" for p, why in foreign[:4])
        raise ValueError(f"{os.fspath(out_dir)} holds activation statistics of another model ({listed}); "
                         "choose another output directory, or pass --force to replace them")
    for p, _ in foreign:
        p.unlink()


def profile_model(model_path, *, text: str | None = None, windows=None, tokens: int = DEFAULT_TOKENS,
                  window: int | None = None, act_threshold: float | None = None, n_threads: int = 0,
                  show_progress: bool = True, out_dir=None, force: bool = False, source: str = "") -> Profile:
    """Count active neurons per layer over calibration windows on the engine.

    windows: token lists (else `text`, else the built-in corpus's calibration part, cut into windows
    of `window` tokens up to `tokens` in all). out_dir: checked before the run (see check_output_dir)."""
    from pi_backend.engine.ffn import RELU_FAMILY
    from pi_backend.engine.model import load
    from pi_backend.model.config import load_config
    from pi_backend.tools import corpus
    from pi_backend.tools.collect import check_windows, run_windows

    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"model file {os.fspath(model_path)!r} does not exist")
    cfg = load_config(model_path)
    if out_dir is not None:
        check_output_dir(out_dir, cfg.n_layer, cfg.n_ff, force)
    relu = cfg.ffn_act in RELU_FAMILY
    # oracle is exact for ReLU models (and skips the silent neurons), even in a PowerInfer file
    model = load(model_path, mode="oracle" if relu else "dense", n_threads=n_threads)
    try:
        cuts = [0.0] * cfg.n_layer
        if not relu:
            if act_threshold is not None:
                cuts = [float(act_threshold)] * cfg.n_layer
            elif cfg.layer_sparse_thresholds is not None:
                cuts = list(cfg.layer_sparse_thresholds)
            else:
                print("(SiLU model without threshold-mode cuts: every neuron counts as active; pass "
                      "--act-threshold or calibrate thresholds first)", file=sys.stderr)
        elif act_threshold:
            cuts = [float(act_threshold)] * cfg.n_layer
        if windows is None:
            if text is None:
                text, source = corpus.calibration_text(), source or "the built-in corpus"
            w = window or min(model.n_ctx, 512)
            windows = corpus.token_windows(model.tokenizer, text, w, max(1, tokens // w))
        windows = [list(map(int, w)) for w in windows]
        check_windows(model, windows)
        counts = [np.zeros(cfg.n_ff, np.int64) for _ in range(cfg.n_layer)]

        def record(call) -> None:
            a = call.gate_activation()
            if relu and not cuts[call.layer]:
                active = call.activation(a) != 0
            else:
                active = np.abs(a) > cuts[call.layer]
            counts[call.layer] += active.sum(axis=0)

        n = run_windows(model, windows, record, "profile", show_progress)
    finally:
        model.close()
    return Profile(counts, n, source)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="pi-backend profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", help="GGUF / PowerInfer GGUF to profile")
    ap.add_argument("-f", "--text", help="calibration text file (default: the built-in corpus, calibration part)")
    ap.add_argument("-o", "--output", help="directory for activation_{i}.pt (default: <model dir>/activation)")
    ap.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help=f"tokens to run (default {DEFAULT_TOKENS})")
    ap.add_argument("--window", type=int, help="tokens per window (default: the model's context, at most 512)")
    ap.add_argument("--act-threshold", type=float,
                    help="count a neuron active where |act(gate)| exceeds this (default: h != 0 for ReLU models, "
                         "the file's threshold-mode cuts for SiLU ones)")
    ap.add_argument("--png", help="plot path (default: <output>/profile.png; 'none' to skip)")
    ap.add_argument("--stats", help="report existing statistics in this directory instead of running the model")
    ap.add_argument("--force", action="store_true", help="replace another model's statistics in the output directory")
    ap.add_argument("-t", "--threads", type=int, default=0)
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)

    if args.stats:
        n_layer = n_ff = None
        if args.model:
            from pi_backend.model.config import load_config

            if not os.path.isfile(args.model):
                raise FileNotFoundError(f"model file {args.model!r} does not exist")
            cfg = load_config(args.model)
            n_layer, n_ff = cfg.n_layer, cfg.n_ff
        prof = Profile.from_frequencies(load_activation_dir(args.stats, n_layer=n_layer, n_ff=n_ff), args.stats)
        print(prof.summary().split("\n", 1)[1])
        png = None if args.png == "none" else (args.png or os.path.join(args.stats, "profile.png"))
    else:
        if not args.model:
            ap.error("-m MODEL is required (or --stats DIR)")
        from pi_backend.tools.corpus import load_text

        text = load_text(args.text) if args.text else None
        out = Path(args.output) if args.output else Path(args.model).resolve().parent / "activation"
        prof = profile_model(args.model, text=text, tokens=args.tokens, window=args.window,
                             act_threshold=args.act_threshold, n_threads=args.threads, show_progress=not args.quiet,
                             out_dir=out, force=args.force,
                             source=Path(args.text).name if args.text else "the built-in corpus")
        paths = prof.save(out)
        print(prof.summary())
        print(f"wrote {len(paths)} files: {out}/activation_{{0..{len(paths) - 1}}}.pt")
        png = None if args.png == "none" else (args.png or out / "profile.png")
    if png is not None:
        if prof.plot(png):
            print(f"plot: {png}")
        else:
            print("(matplotlib is not installed: no plot; pip install 'pi_backend[plot]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
