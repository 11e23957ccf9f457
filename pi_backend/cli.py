"""`pi-backend` command line: generate text, inspect a model, and the model tools."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pi_backend.model.config import FFN_ACTIVATIONS

DATA = Path(__file__).resolve().parent / "data"
BUILTIN_MODELS = ("tiny-relu.powerinfer.gguf", "tiny-relu.gguf")
DEFAULT_PROMPT = "The Python interpreter"


def builtin_model() -> Path:
    """The small trained ReLU model shipped with the package (see pi_backend/data/README.md)."""
    for name in BUILTIN_MODELS:
        if (DATA / name).is_file():
            return DATA / name
    raise SystemExit(f"no built-in model found in {DATA}; pass -m MODEL")


def _engine_options(args) -> dict:
    opts = {"n_threads": args.threads, "n_ctx": args.ctx}
    for key in ("mode", "threshold", "ffn_act", "vram_budget", "activation_dir", "device", "kv_type"):
        if getattr(args, key, None) is not None:
            opts[key] = getattr(args, key)
    for flag in ("reset_gpu_index", "disable_gpu_index"):
        if getattr(args, flag, False):
            opts[flag] = True
    if getattr(args, "no_mmap", False):
        opts["use_mmap"] = False
    if getattr(args, "no_repack", False):
        opts["repack"] = False
    return opts


def cmd_generate(args) -> int:
    from pi_backend.engine.model import load

    path = Path(args.model) if args.model else builtin_model()
    model = load(path, **_engine_options(args))
    for message in getattr(model.placement, "messages", None) or []:
        print(f"[pi-backend] placement: {message}", file=sys.stderr)
    if model.placement is not None:
        where = "GPU" if model.use_gpu else "placement (no GPU here: a CPU thread stands in for its share)"
        print(f"[pi-backend] {where}: {_gpu_summary(model)}", file=sys.stderr)
    prompt = args.prompt if args.prompt is not None else DEFAULT_PROMPT
    sys.stdout.write(prompt)
    sys.stdout.flush()

    def emit(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    res = model.generate(prompt, max_tokens=args.n_predict, on_text=emit, temperature=args.temp,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    sys.stdout.write("\n")
    layers = " ".join(f"{1 - c:.0%}" for c in res.per_layer_computed)
    print(f"\n[pi-backend] model {path.name} ({model.config.arch}, {model.config.ffn_act}, mode {model.mode}, "
          f"{model.n_threads or 'default'} threads)\n"
          f"[pi-backend] prefill {res.n_prompt} tokens: {res.prefill_tps:.1f} tok/s | "
          f"decode {len(res.tokens)} tokens: {res.decode_tps:.1f} tok/s\n"
          f"[pi-backend] FFN sparsity {1 - res.ffn_computed_fraction:.1%} of neurons not computed "
          f"(predicted/listed {res.ffn_listed_fraction:.1%}); per layer: {layers}", file=sys.stderr)
    return 0


def _gpu_summary(model) -> str:
    p, dl = model.placement, model.device_layers
    parts = []
    if dl is not None:
        parts.append(f"dense blocks + KV cache of {len(dl.layers)}/{model.config.n_layer} layers"
                     + (", output head" if dl.output is not None else ""))
    elif model.use_gpu:
        parts.append("dense blocks on the CPU")
    if p.has_split:
        parts.append(f"hot neurons {p.hot_counts.sum() / (p.n_layer * p.n_ff):.1%} of the FFN")
    elif p.budget_bytes > p.total_bytes and p.source not in ("none",):
        parts.append("no hot neurons (the cost model finds no layer where a split beats its synchronisation)")
    parts.append(f"{p.total_bytes / (1 << 20):.0f} MiB placed of a {p.budget_bytes / (1 << 20):.0f} MiB budget")
    return "; ".join(parts)


def _device_info() -> str:
    from pi_backend.native import device, rocm

    if not device.available():
        text = f"none ({device.why_unavailable()})"
    else:
        dev = device.default()
        free, total = dev.mem_info()
        text = f"{dev.backend}: {dev.name}, {free / (1 << 30):.1f} of {total / (1 << 30):.1f} GiB free"
    for d in rocm.devices():  # hip-python, where ROCm is installed
        text += (f"\n  rocm {d['id']}: {d['name']} {d['arch']}, wave {d['wave_size']}, {d['compute_units']} CUs, "
                 f"{d['total_bytes'] / (1 << 30):.1f} GiB")
    return text


def cmd_info(args) -> int:
    from pi_backend import native
    from pi_backend.model.config import ModelConfig
    from pi_backend.model.gguf_file import GGUFFile

    print(f"native: {native.info()}")
    print(f"device: {_device_info()}")
    if args.model:
        with GGUFFile.open(args.model) as g:
            cfg = ModelConfig.from_gguf(g, ffn_act=args.ffn_act)
            print(f"file: {args.model} magic {g.magic} version {g.version}, {len(g.tensors)} tensors")
            for k, v in cfg.__dict__.items():
                print(f"  {k}: {v}")
    return 0


# subcommands that are whole tools with their own argument parsers: name -> (module, help)
TOOLS = {
    "perplexity": ("pi_backend.tools.perplexity", "perplexity per FFN mode side by side, predictor recall"),
    "serve": ("pi_backend.adapters.llamacpp.server", "llama-cpp-python's OpenAI-compatible server on pi_backend"),
    "profile": ("pi_backend.tools.profile", "neuron activation frequencies -> activation/activation_{i}.pt (+ plot)"),
    "train-predictor": ("pi_backend.tools.train_cli", "train per-layer predictors on the engine, write a PowerInfer GGUF"),
    "calibrate-threshold": ("pi_backend.tools.threshold", "per-layer |silu(gate)| cuts for SiLU models (TEAL/CATS)"),
    "quantize": ("pi_backend.tools.quantize", "re-encode a GGUF / PowerInfer GGUF to F16, BF16, Q8_0 or Q4_0"),
    "convert": ("pi_backend.tools.convert_hf", "convert between Hugging Face checkpoints and (PowerInfer) GGUF"),
    "corpus": ("pi_backend.tools.corpus", "the built-in calibration corpus (Python standard library docs)"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pi-backend", description="PowerInfer-style sparse-FFN inference")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt")
    g.add_argument("-m", "--model", help="GGUF or PowerInfer GGUF file (default: the built-in small model)")
    g.add_argument("-p", "--prompt", help=f"prompt text (default: {DEFAULT_PROMPT!r})")
    g.add_argument("-n", "--n-predict", type=int, default=64, help="tokens to generate (default 64)")
    g.add_argument("-t", "--threads", type=int, default=0, help="CPU threads (default: all this process may use)")
    g.add_argument("-c", "--ctx", type=int, default=2048, help="context length (KV cache)")
    g.add_argument("--mode", choices=("sparse", "dense", "oracle", "threshold"),
                   help="FFN mode (default: sparse with a predictor, oracle for ReLU files without, else dense)")
    g.add_argument("--threshold", type=float, help="override the predictor / threshold-mode cut for every layer")
    g.add_argument("--ffn-act", choices=FFN_ACTIVATIONS,
                   help="FFN activation, for dense ReLU GGUFs whose metadata does not say (PowerInfer's convert-dense.py)")
    g.add_argument("--vram-budget", type=float,
                   help="GiB of GPU memory for dense blocks and hot neurons (default on a GPU: free VRAM - 256 MiB; "
                        "without a GPU the hot partition runs on a CPU stand-in)")
    g.add_argument("--activation-dir", help="activation statistics for placement (default: <model dir>/activation)")
    g.add_argument("--reset-gpu-index", action="store_true", help="re-solve the placement, ignoring its cache")
    g.add_argument("--disable-gpu-index", action="store_true", help="no FFN split: only dense blocks offloaded")
    g.add_argument("--device", choices=("auto", "gpu", "cpu"), help="where the hot partition runs (default auto)")
    g.add_argument("--kv-type", choices=("f16", "f32"),
                   help="KV cache element type (default f16, as llama.cpp's --cache-type-k/-v; on the host and the GPU alike)")
    g.add_argument("--no-mmap", action="store_true",
                   help="read the weights into private memory instead of mapping the file (as llama.cpp's "
                        "--no-mmap); the RAM cannot be reclaimed")
    g.add_argument("--no-repack", action="store_true",
                   help="keep Q4_0 matrices in the file's layout (default: regrouped as Q4_0X16 where the "
                        "CPU kernels read that faster: AVX2, AVX-512)")
    g.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--seed", type=int)
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="the native library and, with -m, a model's configuration")
    i.add_argument("-m", "--model")
    i.add_argument("--ffn-act", choices=FFN_ACTIVATIONS)
    i.set_defaults(func=cmd_info)

    for name, (_, help_text) in TOOLS.items():  # listed in --help; main() hands them their arguments
        sub.add_parser(name, help=help_text, add_help=False)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] in TOOLS:
            return __import__(TOOLS[argv[0]][0], fromlist=["main"]).main(argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: a clear message, not a traceback
        print(f"pi-backend: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
