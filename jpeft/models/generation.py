"""Batched autoregressive decoding over a KV cache, for any model whose
`apply_fn(variables, ids, cache=cache, mask=mask)` returns `(logits, cache)` and whose cache has
a static `slots` (the shipped `jpeft.models.llama.KVCache`).

One prefill call writes the prompts (padded on either side; `prompt_mask` says which tokens are
real), then one call per new token. Greedy (`temperature=0`) or sampled (temperature, nucleus
`top_p`); a sequence that emits one of `stop_tokens` stops there and is padded with `pad_id`,
and the loop ends when every sequence has stopped. Everything runs in one `jit` per
`(apply_fn, shapes, options)`: pass the same `apply_fn` object to reuse the compile.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


class Generation(NamedTuple):
    """tokens: `(batch, max_new_tokens)` int32, `pad_id` after a sequence's stop token.
    lengths: `(batch,)` int32, the tokens each sequence generated (its stop token included)."""

    tokens: jax.Array
    lengths: jax.Array


def generate(apply_fn, variables: Any, cache: Any, prompt_ids: Any, prompt_mask: Any = None, *,
             max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, stop_tokens: Sequence[int] = (),
             pad_id: int = 0, key: jax.Array | None = None) -> Generation:
    """Decode up to `max_new_tokens` after `prompt_ids` `(batch, prompt_len)` with `cache` (empty,
    `cache.slots >= prompt_len + max_new_tokens`). `key` is needed to sample (temperature > 0)
    and refused for greedy decoding, as is `top_p` < 1."""
    ids = np.asarray(prompt_ids) if not isinstance(prompt_ids, jax.core.Tracer) else prompt_ids
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"prompt_ids: expected (batch, prompt_len) integer token ids, got shape {ids.shape} "
                         f"and dtype {ids.dtype}")
    batch, prompt_len = ids.shape
    mask = np.ones(ids.shape, bool) if prompt_mask is None else prompt_mask
    if np.shape(mask) != ids.shape:
        raise ValueError(f"prompt_mask: expected shape {ids.shape} like prompt_ids, got {np.shape(mask)}")
    if not isinstance(mask, jax.core.Tracer) and not np.all(np.any(np.asarray(mask), axis=1)):
        empty = np.flatnonzero(~np.any(np.asarray(mask), axis=1)).tolist()
        raise ValueError(f"prompt_mask: sequences {empty} have no real token; every prompt needs at least one")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if prompt_len + max_new_tokens > cache.slots:
        raise ValueError(f"a prompt of {prompt_len} tokens and {max_new_tokens} new tokens need "
                         f"{prompt_len + max_new_tokens} cache slots; the cache has {cache.slots} (prompts are "
                         f"never truncated: make the cache longer or the prompts shorter)")
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if temperature == 0.0 and (top_p != 1.0 or key is not None):
        raise ValueError("temperature=0 decodes greedily: top_p and key apply to sampling only (pass temperature > 0)")
    if temperature > 0.0 and key is None:
        raise ValueError("sampling (temperature > 0) needs key=")
    stops = tuple(int(t) for t in stop_tokens)
    return _generate(apply_fn, variables, cache, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool),
                     jax.random.PRNGKey(0) if key is None else key, max_new_tokens=max_new_tokens,
                     temperature=float(temperature), top_p=float(top_p), stops=stops, pad_id=int(pad_id))


def top_p_logits(logits: jax.Array, top_p: float) -> jax.Array:
    """Nucleus filter: keep the most likely tokens whose probabilities sum to at least `top_p`
    (always the most likely one); the rest get `-inf`."""
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs          # mass of the strictly more likely tokens
    kept = jnp.sum(before < top_p, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(ordered, kept - 1, axis=-1)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def _pick(logits, key, temperature, top_p):
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / temperature
    if top_p < 1.0:
        scaled = top_p_logits(scaled, top_p)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("apply_fn", "max_new_tokens", "temperature", "top_p", "stops", "pad_id"))
def _generate(apply_fn, variables, cache, ids, mask, key, *, max_new_tokens, temperature, top_p, stops, pad_id):
    batch, prompt_len = ids.shape
    logits, cache = apply_fn(variables, ids, cache=cache, mask=mask)
    last = prompt_len - 1 - jnp.argmax(mask[:, ::-1], axis=1)   # each prompt's last real token
    key, now = jax.random.split(key)
    token = _pick(logits[jnp.arange(batch), last], now, temperature, top_p)
    stop_ids = jnp.asarray(stops, jnp.int32)

    def stopped(t):
        return jnp.isin(t, stop_ids) if stops else jnp.zeros(t.shape, bool)

    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
    state = (jnp.int32(1), token, cache, tokens, stopped(token), jnp.ones((batch,), jnp.int32), key)

    def more(state):
        i, _, _, _, done, _, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def step(state):
        i, token, cache, tokens, done, lengths, key = state
        logits, cache = apply_fn(variables, token[:, None], cache=cache, mask=jnp.ones((batch, 1), bool))
        key, now = jax.random.split(key)
        token = jnp.where(done, pad_id, _pick(logits[:, 0], now, temperature, top_p))
        tokens = lax.dynamic_update_slice(tokens, token[:, None], (0, i))
        lengths = lengths + (~done).astype(jnp.int32)
        return i + 1, token, cache, tokens, done | stopped(token), lengths, key

    _, _, _, tokens, _, lengths, _ = lax.while_loop(more, step, state)
    return Generation(tokens, lengths)
