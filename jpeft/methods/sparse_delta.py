"""Composable sparse deltas (LT-SFT, Ansell et al., ACL 2022): `SparseDelta` in the papers' `(out, in)`
layout, extracted from trained sparse-family nodes (`deltas`) or from two weights (`difference`), and
their pure algebra (`add`, `subtract`, `negate`, `prune_zeros`, `apply_deltas`)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jpeft import linalg
from jpeft.adapter import Adapter, is_adapter
from jpeft.methods.sparse import SparseMethod
from jpeft.methods.sparse_ops import (
    SparseDelta,
    gather_kernel,
    remap_moments,
    scatter_kernel,
    select_topk,
)
from jpeft.paths import leaves_with_paths


def deltas(params: Any) -> dict[str, SparseDelta]:
    """`{path: SparseDelta}` of every sparse-family adapter node of `params`."""
    return {p: node.method.sparse_delta(node) for p, node in leaves_with_paths(params, is_leaf=is_adapter)
            if isinstance(node, Adapter) and isinstance(node.method, SparseMethod)}


def _add_one(a: SparseDelta, b: SparseDelta, sign: float) -> SparseDelta:
    if a.shape != b.shape:
        raise ValueError(f"cannot combine sparse deltas of shapes {a.shape} and {b.shape}")
    union = jnp.union1d(a.idx, b.idx).astype(jnp.int32)
    va = remap_moments(a.idx, union, a.val)
    vb = remap_moments(b.idx, union, b.val)
    dtype = jnp.result_type(a.val, b.val)
    return SparseDelta(union, va.astype(dtype) + sign * vb.astype(dtype), a.shape)


def _combine(a, b, sign):
    if isinstance(a, SparseDelta):
        return _add_one(a, b, sign)
    out = dict(a)
    for p, d in b.items():
        out[p] = _add_one(a[p], d, sign) if p in a else negate(d) if sign < 0 else d
    return out


def add(a, b):
    """`a + b` for two `SparseDelta`s or two `{path: SparseDelta}` dicts (eager, not jit-able:
    the support is the union). Values add entrywise, nothing is re-sparsified: with disjoint
    supports the result is exact bit for bit, and `add(a, b) == add(b, a)` always."""
    return _combine(a, b, 1.0)


def negate(a):
    """`-a` (exact)."""
    if isinstance(a, SparseDelta):
        return SparseDelta(a.idx, -a.val, a.shape)
    return {p: negate(d) for p, d in a.items()}


def subtract(a, b):
    """`a − b` (support: the union; `subtract(add(a, b), b)` has `a`'s values on `a`'s support
    and zeros on the rest, exactly when the supports are disjoint)."""
    return _combine(a, b, -1.0)


def prune_zeros(a):
    """Drop explicit zero entries (eager)."""
    if isinstance(a, SparseDelta):
        keep = a.val != 0
        return SparseDelta(a.idx[keep], a.val[keep], a.shape)
    return {p: prune_zeros(d) for p, d in a.items()}


def apply_deltas(params: Any, *ds: dict[str, SparseDelta]) -> Any:
    """A plain parameter tree: `params` with every delta added to the kernel at its path
    (`θ₀ + φ₁ + φ₂ + ...`; kernel layout `(in, out)`)."""
    pairs = leaves_with_paths(params)
    for d in ds:
        unknown = sorted(set(d) - {p for p, _ in pairs})
        if unknown:
            raise ValueError(f"sparse deltas for paths not in the tree: {unknown[:5]}")
    leaves = []
    for p, leaf in pairs:
        for d in ds:
            if p in d:
                m, n = d[p].shape
                if leaf.shape != (n, m):
                    raise ValueError(f"{p}: delta of paper shape {d[p].shape} does not fit kernel {leaf.shape}")
                leaf = scatter_kernel(d[p].idx, d[p].val, n, m, base=leaf)
        leaves.append(leaf)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), leaves)


def difference(new: jax.Array, old: jax.Array, k: int | None = None) -> SparseDelta:
    """The sparse delta `new − old` of two kernels (kernel layout): its top-k entries by
    magnitude, or every non-zero entry when `k` is None (eager)."""
    d = linalg.upcast(new) - linalg.upcast(old)
    n, m = d.shape
    if k is None:
        flat = jnp.nonzero(d.T.reshape(-1))[0].astype(jnp.int32)
    else:
        flat = select_topk(jnp.abs(d), k)
    return SparseDelta(flat, gather_kernel(d, flat).astype(new.dtype), (m, n))
