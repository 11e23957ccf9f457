"""python -m pi_backend.placement MODEL --vram-budget GiB [--plot placement.png] [--reset-gpu-index]"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pi_backend.placement", description=__doc__)
    ap.add_argument("model")
    ap.add_argument("--vram-budget", type=float, required=True, help="GiB for the GPU partition")
    ap.add_argument("--activation-dir", help="default: <model dir>/activation")
    ap.add_argument("--n-ctx", type=int, help="KV cache length (default: the model's context)")
    ap.add_argument("--kv-type", choices=("f16", "f32"), default="f16", help="KV cache type, as the engine's --kv-type")
    ap.add_argument("--reset-gpu-index", action="store_true", help="ignore and rebuild the cached placement")
    ap.add_argument("--disable-gpu-index", action="store_true", help="dense blocks only, no FFN split")
    ap.add_argument("--balance", type=float, default=0.0, help="weight of the slowest layer (minimax) term")
    ap.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto",
                    help="cost model: a GPU, or the CPU stand-in (auto: as the engine would run here)")
    ap.add_argument("--export-gpuidx", help="also write the result as a PowerInfer .gpuidx file here")
    ap.add_argument("--plot", help="write a PNG of the placement here (needs matplotlib)")
    args = ap.parse_args(argv)

    from pi_backend.model.config import ModelConfig
    from pi_backend.model.gguf_file import GGUFFile
    from pi_backend.engine.executors import gpu_available
    from pi_backend.placement import CostModel, format_report, plan_for_model, plot_placement, write_gpuidx

    gpu = args.device == "gpu" or (args.device == "auto" and gpu_available())

    with GGUFFile.open(args.model) as gguf:
        cfg = ModelConfig.from_gguf(gguf)
        p = plan_for_model(gguf, cfg, args.vram_budget, activation_dir=args.activation_dir, n_ctx=args.n_ctx,
                           reset=args.reset_gpu_index, disable_split=args.disable_gpu_index, balance=args.balance,
                           cost=CostModel.for_device(gpu), kv_bytes_per_value=2 if args.kv_type == "f16" else 4)
    print(format_report(p, title=args.model))
    if args.export_gpuidx:
        write_gpuidx(args.export_gpuidx, p.hot, p.n_ff, p.budget_bytes - p.dense_bytes)
        print(f"PowerInfer GPU index written to {args.export_gpuidx}")
    if args.plot and plot_placement(p, args.plot, title=args.model) is not None:
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
