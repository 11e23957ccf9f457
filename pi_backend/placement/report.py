"""A placement as text and as a picture: per layer, hot neurons, their activation mass, bytes on the GPU."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pi_backend.placement.solver import GiB, MiB, Placement

__all__ = ["format_report", "plot_placement"]


def _size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.2f} MiB"


def format_report(p: Placement, title: str = "placement") -> str:
    hot_b = p.hot_bytes
    lines = [
        f"{title}: source {p.source}, budget {_size(p.budget_bytes)}, placed {_size(p.total_bytes)} "
        f"({p.total_bytes / max(p.budget_bytes, 1):.1%})",
        f"  dense blocks on the GPU: {_dense_summary(p)} = {_size(p.dense_bytes)}",
        f"  hot neurons: {int(p.hot_counts.sum())} of {p.n_layer * p.n_ff} "
        f"= {_size(hot_b.sum())}" + (f", serving {p.served_fraction:.1%} of the activation mass"
                                     if p.layer_mass is not None else ""),
    ]
    if p.cpu_seconds is not None and p.cpu_only_seconds is not None:
        split = np.maximum(p.gpu_seconds, p.cpu_seconds).sum()
        lines.append(f"  modelled FFN time per token: {split * 1e3:.3f} ms split vs {p.cpu_only_seconds.sum() * 1e3:.3f} ms "
                     "CPU-only (excluding per-layer sync)")
    lines += [f"  note: {m}" for m in p.messages]
    head = f"  {'layer':>5} {'hot':>7} {'hot %':>6} {'GPU MiB':>9}"
    has_mass = p.layer_mass is not None and p.hot_mass is not None
    if has_mass:
        head += f" {'active/tok':>10} {'mass on GPU':>11}"
    if p.cpu_seconds is not None:
        head += f" {'GPU us':>8} {'CPU us':>8}"
    lines.append(head)
    for i in range(p.n_layer):
        k = int(p.hot_counts[i])
        row = f"  {i:>5} {k:>7} {k / p.n_ff:>6.1%} {hot_b[i] / MiB:>9.2f}"
        if has_mass:
            m = p.layer_mass[i]
            row += f" {m:>10.1f} {(p.hot_mass[i] / m if m else 0):>11.1%}"
        if p.cpu_seconds is not None:
            row += f" {p.gpu_seconds[i] * 1e6:>8.1f} {p.cpu_seconds[i] * 1e6:>8.1f}"
        lines.append(row)
    return "\n".join(lines)


def _dense_summary(p: Placement) -> str:
    if not p.dense_gpu:
        return "none"
    attn = sum(1 for n in p.dense_gpu if n.startswith("attn."))
    pred = sum(1 for n in p.dense_gpu if n.startswith("pred."))
    parts = [f"attention {attn}/{p.n_layer} layers"]
    if pred:
        parts.append(f"predictors {pred}/{p.n_layer}")
    parts += [n for n in ("norms", "output", "kv_cache") if n in p.dense_gpu]
    return ", ".join(parts)


def plot_placement(p: Placement, path: str | os.PathLike, title: str = "placement") -> Path | None:
    """Write a PNG (hot neurons and GPU bytes per layer, share of the activation mass on the GPU).
    Returns None, with a message on stderr, when matplotlib is not installed (pip install pi_backend[plot])."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        import sys

        print("[pi-backend] matplotlib is not installed: no placement plot "
              "(pip install 'pi_backend[plot]')", file=sys.stderr)
        return None
    layers = np.arange(p.n_layer)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6.0, 0.12 * p.n_layer + 4), 6), sharex=True)
    ax1.bar(layers, p.hot_bytes / MiB, color="tab:orange", label="hot neurons")
    ax1.set_ylabel("GPU MiB per layer")
    ax1.set_title(f"{title}: {p.total_bytes / GiB:.2f} of {p.budget_bytes / GiB:.2f} GiB "
                  f"(dense {p.dense_bytes / GiB:.2f} GiB)")
    ax1b = ax1.twinx()
    ax1b.plot(layers, p.hot_counts / p.n_ff * 100, "k.-", label="hot neurons %")
    ax1b.set_ylabel("% of the layer's neurons")
    if p.layer_mass is not None and p.hot_mass is not None:
        share = np.divide(p.hot_mass, p.layer_mass, out=np.zeros_like(p.hot_mass), where=p.layer_mass > 0)
        ax2.bar(layers, share * 100, color="tab:green")
        ax2.set_ylabel("% of activation mass on GPU")
        ax2.set_ylim(0, 100)
    else:
        ax2.text(0.5, 0.5, "no activation statistics", ha="center", va="center", transform=ax2.transAxes)
    ax2.set_xlabel("layer")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
