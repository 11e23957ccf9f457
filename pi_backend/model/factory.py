"""Small but real LLaMA-family GGUF models for tests and benchmarks.

Random models are built so that they behave like the models PowerInfer targets rather than like
noise: the FFN visibly changes the output, ReLU-family FFNs are genuinely sparse with a skewed
(hot/cold) per-neuron activation frequency, and PowerInfer files carry a predictor that actually
predicts. How, without bias tensors (llama has none):

* One residual channel (the last) is a constant K: the embedding sets it, no layer writes to it
  (its rows of `attn_output`/`ffn_down` are zero), and no matrix but `ffn_gate` reads it (its
  columns are zero elsewhere). The gate's column on that channel is then a per-neuron bias --
  exactly, since RMSNorm only rescales and the sign of a ReLU input is scale-invariant.
* That bias is calibrated layer by layer on a numpy forward pass over random tokens, so neuron i
  fires on a chosen fraction p_i of tokens, p_i drawn from a skewed distribution with mean
  1 - target_sparsity.
* The predictor is fitted to the same calibration inputs: a rank-r factorisation of the gate
  (best on those inputs, in +/- pairs so the ReLU between fc1 and fc2 loses nothing), the gate's
  bias carried exactly through the constant channel, and a per-neuron margin so that about
  `target_recall` of the active neurons are predicted at threshold 0.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGUFValueType

from .config import FFN_ACT_KEY, SPARSE_THRESHOLD_KEY, SPARSE_THRESHOLDS_KEY, ModelConfig, load_config
from .gguf_write import TypedValue, write_model
from .numpy_reference import llama_forward
from .vocab import vocab_metadata

__all__ = ["FixtureModel", "write_llama_model", "random_llama_weights", "lowrank_predictor", "to_powerinfer_layout"]

_LAYER_TENSORS = (
    "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
    "ffn_norm", "ffn_gate", "ffn_up", "ffn_down", "ffn_down_t", "fc1", "fc2",
)


@dataclass
class FixtureModel:
    path: Path
    weights: dict[str, np.ndarray]  # float32, exactly the tensors written, before quantization
    config: ModelConfig  # as read back from the file


def write_llama_model(
    path: str | os.PathLike,
    *,
    n_embd: int = 64,
    n_ff: int = 192,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int | None = None,
    n_ctx: int = 128,
    norm_eps: float = 1e-5,
    rope_freq_base: float = 10000.0,
    vocab: str | os.PathLike = "llama-spm",
    weights: Mapping[str, np.ndarray] | None = None,
    seed: int = 0,
    init_std: float | None = None,
    target_sparsity: float = 0.85,
    target_recall: float = 0.95,
    weight_type: str = "f16",
    arch: str = "llama",
    ffn_act: str = "reglu",
    record_ffn_act: bool = True,
    powerinfer: bool = False,
    predictor_rank: int | Sequence[int | None] | None = None,
    sparse_threshold: float = 0.0,
    layer_thresholds: Sequence[float] | None = None,
    name: str | None = None,
) -> FixtureModel:
    """Write a llama/bamboo GGUF (PowerInfer PWRI file when `powerinfer`) and return its weights.

    weights: None for random weights (seeded; see the module docstring), or a dict with GGUF names
      and row-major shapes; a PowerInfer file takes either `ffn_down` or `ffn_down_t`, and missing
      predictors are derived from the gate.
    vocab: "llama-spm" (LLaMA-2's 32000 tokens), "byte" (257 tokens, id = byte), or a GGUF path.
    init_std: std of every random matrix (default 1/sqrt(fan_in); embedding std 1).
    target_sparsity: mean fraction of inactive neurons for ReLU-family activations.
    record_ffn_act: write `pi_backend.ffn_act`; False mimics PowerInfer's convert-dense.py files.
    predictor_rank: fc1 rows per layer (int, or a list with None for "no predictor");
      default n_embd for PowerInfer files, none otherwise.
    """
    n_head_kv = n_head_kv or n_head
    tokenizer = vocab_metadata(vocab)
    n_vocab = len(tokenizer["tokenizer.ggml.tokens"].value)
    ranks = _predictor_ranks(predictor_rank, n_layer, n_embd if powerinfer else None)
    dims = dict(n_vocab=n_vocab, n_embd=n_embd, n_ff=n_ff, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv)

    if weights is None:
        rng = np.random.default_rng(seed)
        tensors = random_llama_weights(rng=rng, init_std=init_std, **dims)
        if ffn_act != "swiglu" or any(r is not None for r in ranks):
            _calibrate(
                tensors, rng, ranks, n_head=n_head, n_head_kv=n_head_kv, norm_eps=norm_eps,
                rope_freq_base=rope_freq_base, ffn_act=ffn_act, target_sparsity=target_sparsity,
                target_recall=target_recall, seq_len=min(32, n_ctx),
            )
    else:
        tensors = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}

    for i, rank in enumerate(ranks):
        fc1, fc2 = f"blk.{i}.fc1.weight", f"blk.{i}.fc2.weight"
        if rank is not None and fc1 not in tensors:
            tensors[fc1], tensors[fc2] = lowrank_predictor(
                tensors[f"blk.{i}.ffn_gate.weight"], tensors[f"blk.{i}.ffn_norm.weight"], rank
            )
    if powerinfer:
        tensors = to_powerinfer_layout(tensors)

    metadata: dict[str, Any] = {
        "general.name": name or f"pi-backend-fixture-{arch}-{ffn_act}",
        f"{arch}.context_length": n_ctx,
        f"{arch}.embedding_length": n_embd,
        f"{arch}.block_count": n_layer,
        f"{arch}.feed_forward_length": n_ff,
        f"{arch}.attention.head_count": n_head,
        f"{arch}.attention.head_count_kv": n_head_kv,
        f"{arch}.attention.layer_norm_rms_epsilon": TypedValue(float(norm_eps), GGUFValueType.FLOAT32),
        f"{arch}.rope.freq_base": TypedValue(float(rope_freq_base), GGUFValueType.FLOAT32),
        f"{arch}.rope.dimension_count": n_embd // n_head,
        **tokenizer,
    }
    if record_ffn_act:
        metadata[FFN_ACT_KEY] = ffn_act
    if powerinfer:
        metadata[SPARSE_THRESHOLD_KEY] = TypedValue(float(sparse_threshold), GGUFValueType.FLOAT32)
    if layer_thresholds is not None:
        metadata[SPARSE_THRESHOLDS_KEY] = np.asarray(layer_thresholds, dtype=np.float32)

    ordered = _file_order(tensors, n_layer)
    path = write_model(path, arch, metadata, ordered, weight_type=weight_type, powerinfer=powerinfer)
    # Read back through our own reader: the file must describe the model we meant to write.
    config = load_config(path)
    return FixtureModel(path=Path(path), weights=ordered, config=config)


def write_skewed_activation_stats(model_dir: str | os.PathLike, n_layer: int, n_ff: int, seed: int = 0) -> Path:
    """PowerInfer-style `activation/activation_{i}.pt` statistics beside a fixture model: per neuron an
    activation frequency drawn from Beta(0.3, 3), a few hot neurons and a long cold tail, as ReLU
    models show. What placement (hot / cold split) tests and benchmarks need without profiling."""
    from .activation_stats import save_activation_tensor

    out = Path(model_dir) / "activation"
    out.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n_layer):
        save_activation_tensor(out / f"activation_{i}.pt", rng.beta(0.3, 3.0, n_ff).astype(np.float32))
    return out


def random_llama_weights(
    *, n_vocab: int, n_embd: int, n_ff: int, n_layer: int, n_head: int, n_head_kv: int,
    rng: np.random.Generator, init_std: float | None = None, bias_constant: float = 1.0,
) -> dict[str, np.ndarray]:
    """Random llama weights with the constant "bias channel" set up (gate bias column left at 0)."""
    head_dim = n_embd // n_head
    kv_dim = n_head_kv * head_dim
    c = n_embd - 1  # the bias channel

    def matrix(rows: int, cols: int, gain: float = 1.0) -> np.ndarray:
        std = init_std if init_std is not None else gain / np.sqrt(cols)
        return rng.normal(0.0, std, size=(rows, cols)).astype(np.float32)

    def norm_weight() -> np.ndarray:
        return rng.uniform(0.8, 1.2, size=n_embd).astype(np.float32)

    embd = rng.normal(0.0, 1.0 if init_std is None else init_std, size=(n_vocab, n_embd)).astype(np.float32)
    embd[:, c] = bias_constant
    weights = {"token_embd.weight": embd}
    for i in range(n_layer):
        p = f"blk.{i}."
        weights[p + "attn_norm.weight"] = norm_weight()
        weights[p + "attn_q.weight"] = matrix(n_embd, n_embd)
        weights[p + "attn_k.weight"] = matrix(kv_dim, n_embd)
        weights[p + "attn_v.weight"] = matrix(kv_dim, n_embd)
        weights[p + "attn_output.weight"] = matrix(n_embd, n_embd)
        weights[p + "ffn_norm.weight"] = norm_weight()
        weights[p + "ffn_gate.weight"] = matrix(n_ff, n_embd)
        weights[p + "ffn_up.weight"] = matrix(n_ff, n_embd)
        # Only ~15% of neurons fire: a larger down projection keeps the FFN's share of the residual
        # stream comparable to attention's, so a wrong FFN changes the output.
        weights[p + "ffn_down.weight"] = matrix(n_embd, n_ff, gain=2.5)
        for reader in ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up"):
            weights[p + reader + ".weight"][:, c] = 0.0
        for writer in ("attn_output", "ffn_down"):
            weights[p + writer + ".weight"][c, :] = 0.0
    weights["output_norm.weight"] = norm_weight()
    weights["output.weight"] = matrix(n_vocab, n_embd, gain=2.0)
    weights["output.weight"][:, c] = 0.0
    return weights


def _calibrate(
    weights: dict[str, np.ndarray], rng: np.random.Generator, ranks: Sequence[int | None], *, n_head: int,
    n_head_kv: int, norm_eps: float, rope_freq_base: float, ffn_act: str, target_sparsity: float,
    target_recall: float, seq_len: int, n_seqs: int = 8,
) -> None:
    """Layer by layer on random token sequences: set each gate's bias column so neuron i fires on a
    fraction p_i of the tokens, then fit that layer's predictor to the layer's actual inputs."""
    n_vocab, n_embd = weights["token_embd.weight"].shape
    c = n_embd - 1
    constant = float(weights["token_embd.weight"][0, c])
    density = 1.0 - target_sparsity
    if ffn_act == "drelu":
        density = min(1.0, 2.0 * density)  # relu(up) switches off about half of the rest
    sparse = ffn_act != "swiglu"
    if sparse and not 0.0 < density < 1.0:
        raise ValueError(f"target_sparsity {target_sparsity} gives gate density {density}; expected between 0 and 1")
    tokens = rng.integers(0, n_vocab, size=(n_seqs, seq_len))
    n_samples = tokens.size

    def calibrate_layer(layer: int, ffn_inp: np.ndarray) -> None:
        gate = weights[f"blk.{layer}.ffn_gate.weight"]
        norm_w = weights[f"blk.{layer}.ffn_norm.weight"]
        x = ffn_inp.reshape(-1, n_embd)
        if sparse:
            # sign(gate . rmsnorm(x)) = sign(gate . (x * w)); the bias column is still 0 here
            pre = (x * norm_w) @ gate.T.astype(np.float64)
            # Skewed per-neuron firing rates (a few hot neurons, many cold ones) with the chosen mean.
            shape_a = 0.6
            rates = np.clip(rng.beta(shape_a, shape_a * (1.0 - density) / density, size=gate.shape[0]), 1.0 / n_samples, 0.95)
            gate[:, c] = (-_per_column_quantile(pre, 1.0 - rates) / (constant * norm_w[c])).astype(np.float32)
        if ranks[layer] is not None:
            fc1, fc2 = _fitted_predictor(gate, norm_w, ranks[layer], x, c, target_recall)
            weights[f"blk.{layer}.fc1.weight"], weights[f"blk.{layer}.fc2.weight"] = fc1, fc2

    llama_forward(
        weights, tokens, n_head=n_head, n_head_kv=n_head_kv, norm_eps=norm_eps, ffn_act=ffn_act,
        rope_freq_base=rope_freq_base, before_ffn=calibrate_layer, logits=False,
    )


def _fitted_predictor(
    gate: np.ndarray, ffn_norm: np.ndarray, rank: int, inputs: np.ndarray, bias_channel: int, target_recall: float
) -> tuple[np.ndarray, np.ndarray]:
    """A predictor fitted to a layer's real inputs: the gate's best rank-k approximation *on those
    inputs* (SVD of gate * cov^1/2), the gate's bias carried exactly through the constant channel
    (one fc1 row = that channel, so relu(fc1 x) there is the constant), plus a per-neuron margin
    chosen so that the given fraction of active neurons is predicted (PowerInfer's predictors are
    likewise tuned to over- rather than under-predict)."""
    n_ff, n_embd = gate.shape
    effective = gate.astype(np.float64) * ffn_norm.astype(np.float64)[None, :]
    constant = float(inputs[0, bias_channel])
    bias = effective[:, bias_channel] * constant
    varying = effective.copy()
    varying[:, bias_channel] = 0.0
    cov = inputs.T @ inputs / len(inputs)
    eigval, eigvec = np.linalg.eigh(cov)
    eigval = np.maximum(eigval, eigval.max() * 1e-6)
    sqrt_cov, inv_sqrt_cov = (eigvec * np.sqrt(eigval)) @ eigvec.T, (eigvec / np.sqrt(eigval)) @ eigvec.T
    u, s, vt = np.linalg.svd(varying @ sqrt_cov, full_matrices=False)
    k = min((rank - 1) // 2, s.size)
    directions = vt[:k] @ inv_sqrt_cov  # (k, n_embd): approximation = u_k s_k directions
    fc1 = np.zeros((rank, n_embd))
    fc2 = np.zeros((n_ff, rank))
    fc1[:k], fc1[k : 2 * k] = directions, -directions
    fc2[:, :k], fc2[:, k : 2 * k] = u[:, :k] * s[:k], -u[:, :k] * s[:k]
    fc1[2 * k, bias_channel] = 1.0  # relu(x_c) = the constant
    approx = np.maximum(inputs @ fc1[: 2 * k].T, 0) @ fc2[:, : 2 * k].T + bias
    exact = inputs @ effective.T
    # Margin = z * (per-neuron std of the approximation error), one z for the layer: the smallest
    # that predicts target_recall of the active (neuron, token) pairs. A single fitted scalar
    # generalises to unseen tokens far better than per-neuron quantiles of a few samples.
    error_std = (exact - approx).std(axis=0)
    active = exact > 0
    z = 0.0
    if active.any():
        for z in np.arange(0.0, 6.0, 0.05):
            if (approx + z * error_std >= 0)[active].mean() >= target_recall:
                break
    fc2[:, 2 * k] = (bias + z * error_std) / constant
    return fc1.astype(np.float32), fc2.astype(np.float32)


def _per_column_quantile(values: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Quantile q[j] of column j (linear interpolation, like np.quantile)."""
    ordered = np.sort(values, axis=0)
    pos = q * (ordered.shape[0] - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, ordered.shape[0] - 1)
    cols = np.arange(ordered.shape[1])
    frac = pos - lo
    return ordered[lo, cols] * (1 - frac) + ordered[hi, cols] * frac


def lowrank_predictor(gate: np.ndarray, ffn_norm: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """fc1 (rank, n_embd) and fc2 (n_ff, rank) with fc2 . relu(fc1 . x) ~= gate . (x * ffn_norm),
    for weights without calibration data.

    Uses the top rank//2 singular directions of gate*diag(ffn_norm) in +/- pairs (relu(a) - relu(-a)
    = a); an odd rank gets one zero row. The predictor sees the residual stream before the FFN
    norm; RMSNorm only rescales it, which leaves the sign -- active or not -- unchanged."""
    if rank < 1:
        raise ValueError(f"predictor rank must be >= 1, got {rank}")
    effective = gate.astype(np.float64) * ffn_norm.astype(np.float64)[None, :]
    u, s, vt = np.linalg.svd(effective, full_matrices=False)
    k = min(rank // 2, s.size)
    n_embd, n_ff = gate.shape[1], gate.shape[0]
    fc1 = np.zeros((rank, n_embd))
    fc2 = np.zeros((n_ff, rank))
    fc1[:k], fc1[k : 2 * k] = vt[:k], -vt[:k]
    fc2[:, :k], fc2[:, k : 2 * k] = u[:, :k] * s[:k], -u[:, :k] * s[:k]
    return fc1.astype(np.float32), fc2.astype(np.float32)


def to_powerinfer_layout(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Replace each `blk.N.ffn_down.weight` (n_embd, n_ff) by `blk.N.ffn_down_t.weight` (n_ff, n_embd)."""
    out = {}
    for name, array in weights.items():
        if name.endswith(".ffn_down.weight"):
            out[name.replace(".ffn_down.weight", ".ffn_down_t.weight")] = np.ascontiguousarray(array.T)
        else:
            out[name] = array
    return out


def _predictor_ranks(spec, n_layer: int, default: int | None) -> list[int | None]:
    if spec is None:
        return [default] * n_layer
    if isinstance(spec, (int, np.integer)):
        spec = [int(spec)] * n_layer
    ranks = [None if r is None else int(r) for r in spec]
    if len(ranks) != n_layer:
        raise ValueError(f"predictor_rank lists {len(ranks)} layers, the model has {n_layer}")
    if any(r is not None and r < 1 for r in ranks):
        raise ValueError(f"predictor ranks must be >= 1 (or None for no predictor), got {ranks}")
    return ranks


def _file_order(tensors: Mapping[str, np.ndarray], n_layer: int) -> dict[str, np.ndarray]:
    """token_embd, the layers in order, then the output tensors; anything else last."""
    names = ["token_embd.weight"]
    names += [f"blk.{i}.{t}.weight" for i in range(n_layer) for t in _LAYER_TENSORS]
    names += ["output_norm.weight", "output.weight"]
    ordered = {n: tensors[n] for n in names if n in tensors}
    ordered.update({n: a for n, a in tensors.items() if n not in ordered})
    return ordered
