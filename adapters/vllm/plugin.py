"""vLLM general plugin (entry point `vllm.general_plugins: powerinfer`): makes `--model-impl powerinfer`
route supported models to pi_backend's model class.

vLLM accepts any string for --model-impl and, for anything but auto/transformers/terratorch, silently
runs its own model. `register()` (called by vLLM once per process: API server, engine core, every
worker) therefore
  1. registers PowerInferForCausalLM by "module:Class" string (nothing imported until a worker needs it);
  2. wraps `_ModelRegistry.inspect_model_cls` (API process, ModelConfig) and `resolve_model_cls` (worker,
     model loading) so that, when model_impl == "powerinfer", the HF architectures are checked
     (UnsupportedModelError with a clear message otherwise) and replaced by ours;
  3. adds a MODELS_CONFIG_MAP hook that keeps CUDA graphs from silently skipping the op's CPU half
     (piecewise graphs split at pi_backend::sparse_ffn) on CUDA platforms; the CPU platform captures no
     graphs and compiles with Dynamo + Inductor, where the op stays one opaque node.
Idempotent: a second call changes nothing.
"""
from __future__ import annotations

import functools
import logging

from pi_backend.adapters.vllm.options import ARCH, MODEL_CLASS, MODEL_IMPL, resolve_options

logger = logging.getLogger("vllm.pi_backend")  # a child of vLLM's logger: same handlers, same format
OP_NAME = "pi_backend::sparse_ffn"
_WRAPPED = "_pi_backend_powerinfer"
_LOGGED: set = set()


def _route(architectures, model_config) -> list[str]:
    if isinstance(architectures, str):
        architectures = [architectures]
    opts = resolve_options(model_config.hf_config, list(architectures or []))
    key = (tuple(architectures or []), opts.ffn_act, opts.mode)
    if key in _LOGGED:
        return [ARCH]
    _LOGGED.add(key)
    logger.info("pi_backend: --model-impl %s: %s -> %s (ffn %s, mode %s)", MODEL_IMPL,
                list(architectures or []), ARCH, opts.ffn_act, opts.mode)
    return [ARCH]


def _wrap(method):
    if getattr(method, _WRAPPED, False):
        return method

    @functools.wraps(method)
    def wrapper(self, architectures, model_config, *args, **kwargs):
        if getattr(model_config, "model_impl", None) == MODEL_IMPL:
            architectures = _route(architectures, model_config)
        return method(self, architectures, model_config, *args, **kwargs)

    setattr(wrapper, _WRAPPED, True)
    return wrapper


class PowerInferConfigHook:
    """MODELS_CONFIG_MAP entry: decides how CUDA graphs and compilation treat the sparse-FFN op."""

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        return

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            return  # no CUDA graphs on CPU; Dynamo/Inductor keep the custom op opaque
        from vllm.config import CUDAGraphMode

        cc = vllm_config.compilation_config
        mode = cc.cudagraph_mode
        if mode is not None and mode != CUDAGraphMode.NONE and mode != CUDAGraphMode.PIECEWISE:
            logger.warning("pi_backend: cudagraph_mode %s would capture the sparse FFN's CPU work into a "
                           "full graph and skip it on replay; using PIECEWISE", mode)
        if mode != CUDAGraphMode.NONE:
            cc.cudagraph_mode = CUDAGraphMode.PIECEWISE
        ops = list(cc.splitting_ops) if cc.splitting_ops is not None else list(cc._attention_ops)
        if OP_NAME not in ops:
            ops.append(OP_NAME)
        cc.splitting_ops = ops


def register() -> None:
    """The entry point vLLM calls (in every process)."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.registry import _ModelRegistry

    if ARCH not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCH, MODEL_CLASS)
    _ModelRegistry.inspect_model_cls = _wrap(_ModelRegistry.inspect_model_cls)
    _ModelRegistry.resolve_model_cls = _wrap(_ModelRegistry.resolve_model_cls)
    try:
        from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    except ImportError:  # pragma: no cover - other vLLM versions
        MODELS_CONFIG_MAP = None
    if MODELS_CONFIG_MAP is not None:
        MODELS_CONFIG_MAP.setdefault(ARCH, PowerInferConfigHook)
