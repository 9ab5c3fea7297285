"""Llama-architecture decoder in Flax Linen: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP,
optionally tied embeddings, causal mask.

Every projection is a plain `nn.Dense(use_bias=False)`, so kernels are 2-D `(in, out)` and
parameter paths follow the HF module names: `layers_0/self_attn/q_proj/kernel`,
`layers_0/mlp/gate_proj/kernel`, `layers_0/input_layernorm/scale`, `embed_tokens/embedding`,
`norm/scale`, and `lm_head/kernel` when the embeddings are not tied. RoPE uses the HF
"rotate half" layout. `params` below always means the inner tree (what goes under `"params"`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jpeft.interop.modules import LEAVES, ModuleMap, flax_to_torch

_INIT = nn.initializers.normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape and numerics of a Llama model (hashable: it is a static argument under `jit`)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    tie_embeddings: bool = True
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32

    def __post_init__(self):
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} must divide into num_heads {self.num_heads}, "
                f"which must divide into num_kv_heads {self.num_kv_heads} groups"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def reference(cls) -> LlamaConfig:
        """The shared benchmark workload of docs/design.md §8 (random init)."""
        return cls(vocab_size=4096, hidden_size=512, intermediate_size=1376, num_layers=4,
                   num_heads=8, num_kv_heads=8)

    @classmethod
    def smollm2_135m(cls) -> LlamaConfig:
        """HuggingFaceTB/SmolLM2-135M (values as in its GGUF metadata)."""
        return cls(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                   num_heads=9, num_kv_heads=3, rope_theta=100000.0, rms_eps=1e-5)


def _dense(config: LlamaConfig, features: int, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=False, dtype=config.dtype, kernel_init=_INIT, name=name)


def _rms_norm(config: LlamaConfig, name: str) -> nn.RMSNorm:
    return nn.RMSNorm(epsilon=config.rms_eps, dtype=config.dtype, name=name)


def rope(x: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding of `x` `(batch, seq, heads, head_dim)` at positions 0..seq-1."""
    dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    angles = jnp.arange(x.shape[1], dtype=jnp.float32)[:, None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)[None, :, None, :]
    first, second = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return (x * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


class Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE on queries and keys."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        batch, seq, _ = x.shape

        def heads(name: str, n: int) -> jax.Array:
            return _dense(c, n * c.head_dim, name)(x).reshape(batch, seq, n, c.head_dim)

        q = rope(heads("q_proj", c.num_heads), c.rope_theta)
        k = rope(heads("k_proj", c.num_kv_heads), c.rope_theta)
        out = jax.nn.dot_product_attention(q, k, heads("v_proj", c.num_kv_heads), is_causal=True)
        return _dense(c, c.hidden_size, "o_proj")(out.reshape(batch, seq, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        gate = _dense(c, c.intermediate_size, "gate_proj")(x)
        up = _dense(c, c.intermediate_size, "up_proj")(x)
        return _dense(c, c.hidden_size, "down_proj")(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm transformer block."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        x = x + Attention(c, name="self_attn")(_rms_norm(c, "input_layernorm")(x))
        return x + MLP(c, name="mlp")(_rms_norm(c, "post_attention_layernorm")(x))


class Llama(nn.Module):
    """`input_ids` `(batch, seq)` int → float32 logits `(batch, seq, vocab)`."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        c = self.config
        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=c.dtype, embedding_init=_INIT,
                         name="embed_tokens")
        x = embed(input_ids)
        for i in range(c.num_layers):
            x = DecoderLayer(c, name=f"layers_{i}")(x)
        x = _rms_norm(c, "norm")(x)
        logits = embed.attend(x) if c.tie_embeddings else _dense(c, c.vocab_size, "lm_head")(x)
        return logits.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens"))
def generate_greedy(params: Any, config: LlamaConfig, prompt_ids: jax.Array,
                    max_new_tokens: int) -> jax.Array:
    """Greedy decoding of `prompt_ids` `(batch, prompt_len)` (equal-length prompts, no cache:
    the whole sequence is recomputed each step). Returns `(batch, prompt_len + max_new_tokens)`."""
    model = Llama(config)
    prompt_len = prompt_ids.shape[1]
    tokens = jnp.pad(prompt_ids, ((0, 0), (0, max_new_tokens)))

    def step(i, tokens):
        logits = model.apply({"params": params}, tokens)
        next_token = jnp.argmax(logits[:, prompt_len + i - 1], axis=-1)
        return tokens.at[:, prompt_len + i].set(next_token.astype(tokens.dtype))

    return jax.lax.fori_loop(0, max_new_tokens, step, tokens)


def hf_module(module_path: str) -> str:
    """The transformers `LlamaForCausalLM` module name of one of our module paths
    (`layers_0/self_attn/q_proj` → `model.layers.0.self_attn.q_proj`; `lm_head` stays)."""
    return module_path if module_path == "lm_head" else "model." + flax_to_torch(module_path)


def _hf_name(path: str) -> str:
    module, _, leaf = path.rpartition("/")
    return f"{hf_module(module)}.{LEAVES[leaf]}"


def to_hf_state_dict(params: Any) -> dict[str, np.ndarray]:
    """`params` as a transformers `LlamaForCausalLM` state dict: `(out, in)` weights, names such
    as `model.layers.0.self_attn.q_proj.weight` (no `lm_head.weight` when tied)."""
    return {_hf_name(path): np.asarray(leaf.T if path.endswith("/kernel") else leaf)
            for path, leaf in traverse_util.flatten_dict(params, sep="/").items()}


def _shapes(config: LlamaConfig) -> dict[str, jax.ShapeDtypeStruct]:
    tree = jax.eval_shape(Llama(config).init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]
    return traverse_util.flatten_dict(tree, sep="/")


def from_hf_state_dict(state: dict[str, Any], config: LlamaConfig) -> dict:
    """`Llama(config)` params from a transformers `LlamaForCausalLM` state dict (numpy or
    anything `np.asarray` takes). Every key must be used and every parameter present; a tied
    model's `lm_head.weight` must equal the embedding."""
    state = {k: np.asarray(v) for k, v in state.items()}
    flat, used = {}, set()
    for path, shape in _shapes(config).items():
        name = _hf_name(path)
        if name not in state:
            raise ValueError(f"{name} (for {path}) is missing from the state dict")
        w = state[name].T if path.endswith("/kernel") else state[name]
        if w.shape != shape.shape:
            raise ValueError(f"{name} has shape {state[name].shape}; {path} needs {shape.shape} (in Flax layout)")
        flat[path] = jnp.asarray(w, shape.dtype)
        used.add(name)
    if config.tie_embeddings and "lm_head.weight" in state:
        if not np.array_equal(state["lm_head.weight"], state["model.embed_tokens.weight"]):
            raise ValueError("lm_head.weight differs from model.embed_tokens.weight, but the config ties them")
        used.add("lm_head.weight")
    extra = sorted(set(state) - used)
    if extra:
        raise ValueError(f"state-dict keys this config has no parameter for: {extra[:5]}")
    return traverse_util.unflatten_dict(flat, sep="/")


def hf_module_map(config: LlamaConfig) -> ModuleMap:
    """The `ModuleMap` for HF files of `Llama(config)` (PEFT adapter folders over a transformers
    `LlamaForCausalLM`): every module's name, the model's state-dict keys, and the tied embedding."""
    paths = list(_shapes(config))
    table = {p.rpartition("/")[0]: hf_module(p.rpartition("/")[0]) for p in paths}
    keys = {_hf_name(p) for p in paths} | ({"lm_head.weight"} if config.tie_embeddings else set())
    return ModuleMap.from_table(table, keys, tied={"embed_tokens"} if config.tie_embeddings else ())
