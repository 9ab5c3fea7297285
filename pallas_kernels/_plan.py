"""Bucketing of sparse entries by output/input tile for the gather-based kernels (docs/design.md §5).

A sparse delta is a list of entries (out_id, in_id, val). The kernels tile the matrix into
(out_block x in_block) blocks; the entries of each block are laid out contiguously in fixed-size
*chunks* of `chunk` slots (a block's last chunk is padded with zero values). Because blocks are
ordered out-tile-major, the chunks of one output tile are contiguous, so a program owning an
output tile walks `chunk_start[j*n_in_tiles] .. chunk_start[(j+1)*n_in_tiles]`.

All of this is O(k log k) index work in plain jnp; it never forms an (m, n) array.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp


class SparsePlan(NamedTuple):
    chunk_start: jnp.ndarray  # int32[n_blocks + 1]: first chunk of each block (+ total)
    chunk_tile: jnp.ndarray   # int32[Q]: input-tile index of each chunk
    local_out: jnp.ndarray    # int32[Q, chunk]: out id within its tile
    local_in: jnp.ndarray     # int32[Q, chunk]: in id within its tile
    slot: jnp.ndarray         # int32[k]: flat slot (q*chunk + c) of each original entry


def num_chunks(k: int, n_blocks: int, chunk: int) -> int:
    """Static bound on the chunks needed: each non-empty block wastes < one chunk."""
    return max(1, (k + min(n_blocks, k) * (chunk - 1)) // chunk)


def _exclusive_cumsum(v):
    return jnp.concatenate([jnp.zeros((1,), v.dtype), jnp.cumsum(v)])


def build_plan(out_ids, in_ids, *, out_block: int, in_block: int, n_out_tiles: int,
               n_in_tiles: int, chunk: int) -> SparsePlan:
    """Group entries by (out tile, in tile) into padded chunks; see the module docstring."""
    k = out_ids.shape[0]
    n_blocks = n_out_tiles * n_in_tiles
    q = num_chunks(k, n_blocks, chunk)
    out_ids = out_ids.astype(jnp.int32)
    in_ids = in_ids.astype(jnp.int32)
    key = (out_ids // out_block) * n_in_tiles + in_ids // in_block
    order = jnp.argsort(key, stable=True)
    key_sorted = key[order]
    counts = jnp.bincount(key, length=n_blocks).astype(jnp.int32)
    first_entry = _exclusive_cumsum(counts)[:-1]
    chunk_start = _exclusive_cumsum((counts + chunk - 1) // chunk).astype(jnp.int32)
    rank = jnp.arange(k, dtype=jnp.int32) - first_entry[key_sorted]
    slot_sorted = chunk_start[key_sorted] * chunk + rank
    slot = jnp.zeros((k,), jnp.int32).at[order].set(slot_sorted)
    local_out = _scatter_slots(slot, out_ids % out_block, q, chunk)
    local_in = _scatter_slots(slot, in_ids % in_block, q, chunk)
    chunk_tile = jnp.zeros((q,), jnp.int32).at[slot // chunk].set(in_ids // in_block)
    return SparsePlan(chunk_start, chunk_tile, local_out, local_in, slot)


def _scatter_slots(slot, values, q: int, chunk: int):
    """Place per-entry values at their slots in a zero (q, chunk) table."""
    return jnp.zeros((q * chunk,), values.dtype).at[slot].set(values).reshape(q, chunk)


def bucket_values(plan: SparsePlan, val):
    """Entry values laid out like the plan; padding slots hold 0 so they contribute nothing."""
    q, chunk = plan.local_out.shape
    return _scatter_slots(plan.slot, val, q, chunk)


def unbucket_values(plan: SparsePlan, table):
    """Inverse of `bucket_values`: gather each original entry's slot."""
    return table.reshape(-1)[plan.slot]
