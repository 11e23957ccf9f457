"""The file-format layer: GGUF / PowerInfer GGUF reading and writing, model configs, activation
statistics, and fixture models.

Modules (imported on demand; nothing here is imported eagerly):
- gguf_file: `GGUFFile`, a defensive GGUF v2/v3 reader accepting the `GGUF` and `PWRI` magics.
- page_cache: a mapped file made resident in 2 MiB pages before decoding.
- gguf_write: `write_gguf`, `write_model` (quantizing), `set_magic`.
- config: `ModelConfig` from GGUF metadata, with tensor-shape validation.
- activation_stats: PowerInfer's `activation_{i}.pt` files, read and written without torch.
- vocab, factory, tiny_relu: tokenizer metadata, random fixture models, the tiny-relu conversion.
- numpy_reference: the plain numpy forward pass (KV cache, FFN masks, GGUF or llama2.c names), the
  yardstick for fixtures, tools and engine tests.
"""
