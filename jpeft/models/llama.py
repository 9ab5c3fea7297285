"""Llama-architecture decoder in Flax Linen: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP,
optionally tied embeddings, causal mask.

Every projection is a plain `nn.Dense(use_bias=False)`, so kernels are 2-D `(in, out)` and
parameter paths follow the HF module names: `layers_0/self_attn/q_proj/kernel`,
`layers_0/mlp/gate_proj/kernel`, `layers_0/input_layernorm/scale`, `embed_tokens/embedding`,
`norm/scale`, and `lm_head/kernel` when the embeddings are not tied. RoPE uses the HF
"rotate half" layout. `params` below always means the inner tree (what goes under `"params"`).

`Llama(config).apply(variables, ids)` is the plain causal forward (training). With a `KVCache`,
`apply(variables, ids, cache=cache, mask=mask)` returns `(logits, cache)`: the new tokens are
written at the cache's next slots and attend to every valid slot up to their own, so prompts
may be padded on either side (`mask` says which tokens are real; positions count real tokens
only). `generate` runs batched greedy or sampled decoding on it (`jpeft.models.generation`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util
from jax import lax

from jpeft.interop.modules import LEAVES, ModuleMap, flax_to_torch
from jpeft.models import generation

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


def rope(x: jax.Array, theta: float, positions: jax.Array | None = None) -> jax.Array:
    """Rotary position embedding of `x` `(batch, seq, heads, head_dim)` at `positions`
    `(batch, seq)` (default 0..seq-1)."""
    dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    pos = jnp.arange(x.shape[1], dtype=jnp.float32)[None] if positions is None else positions.astype(jnp.float32)
    angles = pos[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    first, second = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return (x * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


@struct.dataclass
class KVCache:
    """Keys and values of every layer for `slots` token slots, and where the next tokens go.

    keys, values: per layer `(batch, slots, kv_heads, head_dim)`.
    valid:        `(batch, slots)`: the slot holds a real token (padding and unwritten slots do not).
    index:        `()` int32: the next slot to write (the same for every sequence).
    positions:    `(batch,)` int32: the next token's position (its sequence's real tokens so far).
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    valid: jax.Array
    index: jax.Array
    positions: jax.Array

    @property
    def slots(self) -> int:
        return self.valid.shape[1]

    @classmethod
    def empty(cls, config: LlamaConfig, batch: int, slots: int, dtype: Any = None) -> KVCache:
        shape = (batch, slots, config.num_kv_heads, config.head_dim)
        zeros = tuple(jnp.zeros(shape, dtype or config.dtype) for _ in range(config.num_layers))
        return cls(keys=zeros, values=zeros, valid=jnp.zeros((batch, slots), bool),
                   index=jnp.zeros((), jnp.int32), positions=jnp.zeros((batch,), jnp.int32))


@struct.dataclass
class _Step:
    """What every layer's attention needs for one cached call."""

    positions: jax.Array   # (batch, seq) of the new tokens
    allowed: jax.Array     # (batch, seq, slots): query i may attend to slot j
    index: jax.Array       # () first slot written


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    """Grouped-query attention of `q` `(batch, seq, heads, d)` over the cache's `k`, `v`
    `(batch, slots, kv_heads, d)` where `allowed` `(batch, seq, slots)`; softmax in float32. A
    query with no allowed slot (padding before any real token) gets a finite, unused output."""
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / np.sqrt(d)
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h * d)


class Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE on queries and keys; with `step` and `kv`
    (one layer's cached keys and values) it writes the new keys and values into the cache and
    returns `(out, (keys, values))`."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array, step: _Step | None = None, kv: tuple[jax.Array, jax.Array] | None = None):
        c = self.config
        batch, seq, _ = x.shape

        def heads(name: str, n: int) -> jax.Array:
            return _dense(c, n * c.head_dim, name)(x).reshape(batch, seq, n, c.head_dim)

        positions = None if step is None else step.positions
        q = rope(heads("q_proj", c.num_heads), c.rope_theta, positions)
        k = rope(heads("k_proj", c.num_kv_heads), c.rope_theta, positions)
        v = heads("v_proj", c.num_kv_heads)
        o_proj = _dense(c, c.hidden_size, "o_proj")
        if step is None or kv is None:
            out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
            return o_proj(out.reshape(batch, seq, -1))
        at = (0, step.index, 0, 0)
        keys = lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), at)
        values = lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), at)
        out = cached_attention(q, keys.astype(q.dtype), values.astype(q.dtype), step.allowed)
        return o_proj(out), (keys, values)


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
    """Pre-norm transformer block (`step`, `kv`: as `Attention`'s)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array, step: _Step | None = None, kv: tuple[jax.Array, jax.Array] | None = None):
        c = self.config
        attn = Attention(c, name="self_attn")(_rms_norm(c, "input_layernorm")(x), step, kv)
        attn, kv = attn if step is not None else (attn, None)
        x = x + attn
        x = x + MLP(c, name="mlp")(_rms_norm(c, "post_attention_layernorm")(x))
        return x if step is None else (x, kv)


class Llama(nn.Module):
    """`input_ids` `(batch, seq)` int → float32 logits `(batch, seq, vocab)`; with `cache`,
    `(logits, cache)` after writing the tokens at the cache's next slots (`mask` `(batch, seq)`:
    which tokens are real, default all). The caller keeps `cache.index + seq <= cache.slots`
    (`generate` checks it)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, cache: KVCache | None = None, mask: jax.Array | None = None):
        c = self.config
        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=c.dtype, embedding_init=_INIT,
                         name="embed_tokens")
        x = embed(input_ids)

        def head(x):
            x = _rms_norm(c, "norm")(x)
            logits = embed.attend(x) if c.tie_embeddings else _dense(c, c.vocab_size, "lm_head")(x)
            return logits.astype(jnp.float32)

        if cache is None:
            if mask is not None:
                raise ValueError("Llama: mask= pads the prompts of a cached call; the plain forward is causal "
                                 "over every token (pass cache=KVCache.empty(...) to use a mask)")
            for i in range(c.num_layers):
                x = DecoderLayer(c, name=f"layers_{i}")(x)
            return head(x)
        seq = input_ids.shape[1]
        real = jnp.ones(input_ids.shape, bool) if mask is None else mask.astype(bool)
        positions = cache.positions[:, None] + jnp.maximum(jnp.cumsum(real, axis=1) - 1, 0)
        valid = lax.dynamic_update_slice(cache.valid, real, (0, cache.index))
        last_slot = cache.index + jnp.arange(seq)[None, :, None]
        allowed = valid[:, None, :] & (jnp.arange(cache.slots)[None, None, :] <= last_slot)
        step = _Step(positions=positions, allowed=allowed, index=cache.index)
        keys, values = [], []
        for i in range(c.num_layers):
            x, (k, v) = DecoderLayer(c, name=f"layers_{i}")(x, step, (cache.keys[i], cache.values[i]))
            keys.append(k)
            values.append(v)
        new = KVCache(keys=tuple(keys), values=tuple(values), valid=valid, index=cache.index + seq,
                      positions=cache.positions + jnp.sum(real, axis=1, dtype=jnp.int32))
        return head(x), new


@functools.lru_cache(maxsize=32)
def _apply_fn(config: LlamaConfig):
    """One `apply` per config, so `generate` compiles once per config and shape."""
    return Llama(config).apply


def generate(params: Any, config: LlamaConfig, prompt_ids: Any, prompt_mask: Any = None, *, max_new_tokens: int,
             apply_fn=None, slots: int | None = None, **sampling) -> generation.Generation:
    """Batched decoding with a KV cache: `jpeft.models.generation.generate` on this model.
    `apply_fn`: `Llama(config).apply` by default; pass `jpeft.factored(Llama(config).apply,
    spec)` (built once) to run an adapter tree factored. `slots`: the cache length (default
    prompt length + `max_new_tokens`). `sampling`: `temperature`, `top_p`, `stop_tokens`,
    `pad_id`, `key` as `generation.generate` takes them."""
    batch, prompt_len = np.shape(prompt_ids)
    slots = prompt_len + max_new_tokens if slots is None else slots
    cache = KVCache.empty(config, batch, slots)
    return generation.generate(apply_fn or _apply_fn(config), {"params": params}, cache, prompt_ids, prompt_mask,
                               max_new_tokens=max_new_tokens, **sampling)


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
