"""A GPT-2 in Flax Linen for the HF interop tests: transformers' `GPT2LMHeadModel` stores its
projections as `Conv1D` weights `(in, out)` (PEFT's `fan_in_fan_out`), unlike `Linear`'s
`(out, in)`. Paths: `wte/embedding`, `wpe/embedding`, `h_N/{ln_1,ln_2}`, `h_N/attn/{c_attn,c_proj}`,
`h_N/mlp/{c_fc,c_proj}`, `ln_f`; the output head is tied to `wte`. Inference numerics only."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jpeft.interop.modules import LEAVES, ModuleMap


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 64
    positions: int = 16
    width: int = 16
    layers: int = 2
    heads: int = 2
    eps: float = 1e-5


class MLP(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(4 * self.width, name="c_fc")(x)
        return nn.Dense(self.width, name="c_proj")(jax.nn.gelu(h, approximate=True))


class Attention(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, x):
        c = self.config
        b, t, d = x.shape
        qkv = nn.Dense(3 * d, name="c_attn")(x)
        q, k, v = (y.reshape(b, t, c.heads, d // c.heads) for y in jnp.split(qkv, 3, axis=-1))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // c.heads)
        logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, jnp.finfo(logits.dtype).min)
        h = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v).reshape(b, t, d)
        return nn.Dense(d, name="c_proj")(h)


class Layer(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, x):
        c = self.config
        x = x + Attention(c, name="attn")(nn.LayerNorm(c.eps, name="ln_1")(x))
        return x + MLP(x.shape[-1], name="mlp")(nn.LayerNorm(c.eps, name="ln_2")(x))


class GPT2(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, ids):
        c = self.config
        wte = nn.Embed(c.vocab_size, c.width, name="wte")
        x = wte(ids) + nn.Embed(c.positions, c.width, name="wpe")(jnp.arange(ids.shape[1]))
        for i in range(c.layers):
            x = Layer(c, name=f"h_{i}")(x)
        return wte.attend(nn.LayerNorm(c.eps, name="ln_f")(x))


def hf_module(module_path: str) -> str:
    """`h_0/attn/c_attn` → `transformer.h.0.attn.c_attn` (only the layer list `h_N` is numbered:
    `ln_1` stays)."""
    return "transformer." + ".".join(f"h.{p[2:]}" if p.startswith("h_") else p for p in module_path.split("/"))


def _hf_name(path: str) -> str:
    module, _, leaf = path.rpartition("/")
    return f"{hf_module(module)}.{LEAVES[leaf]}"


def _shapes(config: GPT2Config) -> dict:
    tree = jax.eval_shape(GPT2(config).init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]
    return traverse_util.flatten_dict(tree, sep="/")


def params_from_hf(state: dict, config: GPT2Config) -> dict:
    """From a transformers `GPT2LMHeadModel` state dict: `Conv1D` weights are already `(in, out)`."""
    flat = {}
    for path, shape in _shapes(config).items():
        w = np.asarray(state[_hf_name(path)])
        assert w.shape == shape.shape, (path, w.shape, shape.shape)
        flat[path] = jnp.asarray(w)
    return traverse_util.unflatten_dict(flat, sep="/")


def hf_module_map(config: GPT2Config) -> ModuleMap:
    """Every projection is a `Conv1D` (`conv1d`); `wte` is tied to the head."""
    paths = list(_shapes(config))
    table = {p.rpartition("/")[0]: hf_module(p.rpartition("/")[0]) for p in paths}
    keys = {_hf_name(p) for p in paths} | {"lm_head.weight"}
    conv1d = {m for m in table if m.rsplit("/", 1)[-1] in ("c_attn", "c_proj", "c_fc")}
    return ModuleMap.from_table(table, keys, tied={"wte"}, conv1d=conv1d)
