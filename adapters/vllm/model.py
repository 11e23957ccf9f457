"""PowerInferForCausalLM: vLLM's own Llama (attention with the paged KV cache, RoPE, RMSNorm, embeddings,
LM head, tensor parallelism, torch.compile) with each layer's MLP replaced by pi_backend's sparse FFN
(ffn.PowerInferMLP: one opaque custom op per layer).

The decoder layer is built from a copy of the config with hidden_act "silu" (vLLM's LlamaMLP refuses
anything else) and its MLP is then swapped for ours; its forward passes the residual stream (the
predictor's input, PowerInfer's `ffn_inp`) to the MLP beside the normed hidden states.
"""
from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Iterable

import torch

from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.utils import extract_layer_index

from pi_backend import native
from pi_backend.adapters.vllm.ffn import PowerInferMLP, default_threads
from pi_backend.adapters.vllm.options import PowerInferOptions, resolve_options

logger = logging.getLogger("vllm.pi_backend")


class PowerInferDecoderLayer(LlamaDecoderLayer):
    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None, **kwargs) -> None:
        config = config or vllm_config.model_config.hf_config
        opts: PowerInferOptions = resolve_options(config)
        stock = copy.copy(config)
        stock.hidden_act = "silu"  # LlamaMLP refuses other activations; it is replaced right below
        super().__init__(vllm_config=vllm_config, prefix=prefix, config=stock, **kwargs)
        layer = extract_layer_index(prefix)
        del self.mlp
        self.mlp = PowerInferMLP(
            hidden_size=config.hidden_size, intermediate_size=config.intermediate_size, ffn_act=opts.ffn_act,
            mode=opts.mode, threshold=opts.threshold(layer), layer_idx=layer, prefix=f"{prefix}.mlp",
            max_sparse_tokens=opts.max_sparse_tokens, dense_crossover=opts.dense_crossover,
            n_threads=opts.n_threads or default_threads(), params_dtype=vllm_config.model_config.dtype,
            tp_rank=get_tensor_model_parallel_rank(), tp_size=get_tensor_model_parallel_world_size(),
            static_forward_context=vllm_config.compilation_config.static_forward_context)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
        # fused add + norm: residual becomes the FFN input before the norm (the predictor's input)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        hidden_states = self.mlp(hidden_states, residual)
        return hidden_states, residual


class PowerInferForCausalLM(LlamaForCausalLM):
    """Registered as architecture "PowerInferForCausalLM"; selected by `--model-impl powerinfer`."""

    pi_backend_impl = "powerinfer"  # lets tests tell our class from vLLM's at a glance

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        hf_config = vllm_config.model_config.hf_config
        self.pi_options = resolve_options(hf_config)
        n_threads = self.pi_options.n_threads or default_threads()
        native.set_num_threads(min(n_threads, native.lib.PI_MAX_THREADS))
        logger.info("pi_backend: PowerInferForCausalLM (ffn %s, mode %s, native threads %d, torch threads %d, "
                    "cpu affinity %s)", self.pi_options.ffn_act, self.pi_options.mode, n_threads,
                    torch.get_num_threads(), sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?")
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=PowerInferDecoderLayer)
        self._model_path = vllm_config.model_config.model

    def pi_layers(self) -> list[PowerInferMLP]:
        return [layer.mlp for layer in self.model.layers if isinstance(getattr(layer, "mlp", None), PowerInferMLP)]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(weights)
        self._load_predictor_files()
        return loaded

    def _load_predictor_files(self) -> None:
        """Predictors not in the checkpoint's safetensors: PowerInfer's predictor directory
        (model_{i}.pt) or a separate safetensors file named by powerinfer.predictor."""
        layers = self.pi_layers()
        missing = [m for m in layers if m.fc1 is None]
        spec = self.pi_options.predictor
        if not missing or not spec:
            return
        path = Path(spec)
        if not path.is_absolute():
            path = Path(self._model_path) / path
        if path.is_dir():
            from pi_backend.tools.convert_hf import predictor_pair

            for m in missing:
                f = path / f"model_{m.layer_idx}.pt"
                if not f.is_file():
                    raise FileNotFoundError(f"{path}: no {f.name} (predictor of layer {m.layer_idx})")
                fc1, fc2 = predictor_pair(torch.load(f, map_location="cpu", weights_only=True), f)
                m.set_predictor(fc1=fc1, fc2=fc2)
        elif path.is_file() and path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            for m in missing:
                p = f"model.layers.{m.layer_idx}.mlp."
                if p + "fc1.weight" in tensors:
                    m.set_predictor(fc1=tensors[p + "fc1.weight"], fc2=tensors[p + "fc2.weight"])
        elif not path.exists() and self.pi_options.mode == "sparse":
            raise FileNotFoundError(f"powerinfer.predictor: {path} does not exist")

    def process_weights_after_loading(self) -> None:
        for m in self.pi_layers():
            m.finalize()
