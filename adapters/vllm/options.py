"""What `--model-impl powerinfer` runs for a given HF config: checked in the API process before any
worker starts, so unsupported models fail with a clear message. Pure Python (no torch, no vLLM).

Options come from config.json's "powerinfer" section (written by `pi-backend convert --to-hf`) and can be
overridden per key on the command line with flat `powerinfer_<key>` entries:

    vllm serve DIR --model-impl powerinfer --hf-overrides '{"powerinfer_mode": "oracle"}'

keys
  ffn_act           reglu | drelu | swiglu      default: from hidden_act (relu -> reglu, silu -> swiglu;
                                                BambooForCausalLM -> drelu)
  mode              sparse | oracle | dense | threshold
                                                default: sparse with predictors, oracle for ReLU models
                                                without, threshold for SiLU models
  sparse_threshold  predictor logit cut (sparse) or |activation| cut (threshold); default 0
  layer_thresholds  per-layer list overriding sparse_threshold
  predictor         predictor.safetensors (default; vLLM's loader reads it with the weights) or a
                    PowerInfer predictor directory of model_{i}.pt, relative to the model directory
  n_threads         the native kernels' thread pool (default: PI_BACKEND_THREADS, else every CPU)
  dense_crossover   active fraction above which a batch runs dense: a number, or "auto" (measured at
                    load time per batch size; default)
  max_sparse_tokens batches with more tokens always run dense (default 256: vLLM's profiling run and
                    long prefills)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# HF architectures routed to pi_backend's model class, and the FFN activation each implies for
# hidden_act "relu".
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "reglu",     # ReluLLaMA, ProSparse (ReGLU); SiLU llama (threshold mode)
    "MistralForCausalLM": "reglu",   # TurboSparse-Mistral-style llama-shaped models
    "BambooForCausalLM": "drelu",    # Bamboo: ReLU on gate and up
}
ARCH = "PowerInferForCausalLM"       # the architecture name registered with vLLM
MODEL_CLASS = "pi_backend.adapters.vllm.model:PowerInferForCausalLM"
MODEL_IMPL = "powerinfer"
CONFIG_KEY = "powerinfer"
FFN_ACTS = ("reglu", "drelu", "swiglu")
MODES = ("sparse", "oracle", "dense", "threshold")
_HIDDEN_ACTS = {"relu": None, "silu": "swiglu", "swish": "swiglu", "drelu": "drelu", "reglu": "reglu"}
_KEYS = ("ffn_act", "mode", "sparse_threshold", "layer_thresholds", "predictor", "n_threads",
         "dense_crossover", "max_sparse_tokens")


class UnsupportedModelError(ValueError):
    """--model-impl powerinfer was asked to run a model it cannot run."""


@dataclass
class PowerInferOptions:
    arch: str
    ffn_act: str
    mode: str
    sparse_threshold: float = 0.0
    layer_thresholds: tuple[float, ...] | None = None
    predictor: str | None = None
    n_threads: int = 0
    dense_crossover: float | str = "auto"
    max_sparse_tokens: int = 256
    extra: dict[str, Any] = field(default_factory=dict)

    def threshold(self, layer: int) -> float:
        if self.layer_thresholds is not None:
            return float(self.layer_thresholds[layer])
        return float(self.sparse_threshold)


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def raw_section(hf_config: Any) -> dict[str, Any]:
    """config.json's "powerinfer" dict, with flat `powerinfer_<key>` overrides applied."""
    section = _get(hf_config, CONFIG_KEY) or {}
    if not isinstance(section, dict):
        raise UnsupportedModelError(f"config {CONFIG_KEY!r} must be a JSON object, got {section!r}")
    section = dict(section)
    for key in _KEYS:
        value = _get(hf_config, f"{CONFIG_KEY}_{key}")
        if value is not None:
            section[key] = value
    return section


def resolve_options(hf_config: Any, architectures: list[str] | None = None) -> PowerInferOptions:
    """Check that pi_backend can run this HF config and say how; raise UnsupportedModelError if not."""
    archs = list(architectures if architectures is not None else (_get(hf_config, "architectures") or []))
    archs = [a for a in archs if a != ARCH]
    known = [a for a in archs if a in SUPPORTED_ARCHITECTURES]
    if archs and not known:
        raise UnsupportedModelError(
            f"--model-impl {MODEL_IMPL}: architecture {archs} is not supported; pi_backend runs "
            f"llama-family models ({', '.join(SUPPORTED_ARCHITECTURES)}): ReLU-LLaMA / ProSparse "
            "(hidden_act relu), Bamboo (dReLU), and SiLU llama models in threshold mode. "
            "Drop --model-impl powerinfer to run this model with vLLM's own implementation.")
    arch = known[0] if known else "LlamaForCausalLM"
    section = raw_section(hf_config)
    unknown = sorted(set(section) - set(_KEYS) - {"source"})
    hidden_act = str(_get(hf_config, "hidden_act", "silu") or "silu").lower()
    if hidden_act not in _HIDDEN_ACTS:
        raise UnsupportedModelError(
            f"--model-impl {MODEL_IMPL}: hidden_act {hidden_act!r} is not supported "
            f"(supported: relu -> ReGLU, silu -> SwiGLU, drelu -> dReLU)")
    ffn_act = section.get("ffn_act") or _HIDDEN_ACTS[hidden_act] or SUPPORTED_ARCHITECTURES[arch]
    if ffn_act not in FFN_ACTS:
        raise UnsupportedModelError(f"{CONFIG_KEY}.ffn_act: {ffn_act!r} is not one of {FFN_ACTS}")
    if _get(hf_config, "mlp_bias", False):
        raise UnsupportedModelError(f"--model-impl {MODEL_IMPL}: FFN biases (mlp_bias) are not supported")
    window = _get(hf_config, "sliding_window")
    if window is not None and arch == "MistralForCausalLM":
        max_pos = int(_get(hf_config, "max_position_embeddings", 0) or 0)
        if int(window) < max_pos:
            raise UnsupportedModelError(f"--model-impl {MODEL_IMPL}: sliding-window attention "
                                        f"(sliding_window={window}) is not supported")
    predictor = section.get("predictor")
    mode = section.get("mode")
    if mode is None:
        if ffn_act == "swiglu":
            mode = "threshold"
        else:
            mode = "sparse" if predictor is not None else "oracle"
    if mode not in MODES:
        raise UnsupportedModelError(f"{CONFIG_KEY}.mode: {mode!r} is not one of {MODES}")
    if mode in ("sparse", "oracle") and ffn_act == "swiglu":
        raise UnsupportedModelError(
            f"{CONFIG_KEY}.mode {mode!r} needs a ReLU-family FFN; this model is SiLU (swiglu): use mode "
            "'threshold' (TEAL/CATS-style, with sparse_threshold / layer_thresholds) or 'dense'")
    n_layer = int(_get(hf_config, "num_hidden_layers", 0) or 0)
    layer_thresholds = section.get("layer_thresholds")
    if layer_thresholds is not None:
        layer_thresholds = tuple(float(t) for t in layer_thresholds)
        if n_layer and len(layer_thresholds) != n_layer:
            raise UnsupportedModelError(f"{CONFIG_KEY}.layer_thresholds: {len(layer_thresholds)} values for "
                                        f"{n_layer} layers")
    crossover = section.get("dense_crossover", "auto")
    if crossover != "auto":
        crossover = float(crossover)
        if not 0.0 <= crossover <= 1.0:
            raise UnsupportedModelError(f"{CONFIG_KEY}.dense_crossover: {crossover} is not in [0, 1] or 'auto'")
    n_threads = int(section.get("n_threads", 0) or 0)
    if n_threads < 0:
        raise UnsupportedModelError(f"{CONFIG_KEY}.n_threads: must be >= 0, got {n_threads}")
    return PowerInferOptions(
        arch=arch, ffn_act=ffn_act, mode=mode,
        sparse_threshold=float(section.get("sparse_threshold", 0.0) or 0.0),
        layer_thresholds=layer_thresholds, predictor=predictor, n_threads=n_threads,
        dense_crossover=crossover, max_sparse_tokens=int(section.get("max_sparse_tokens", 256)),
        extra={k: section[k] for k in unknown})
