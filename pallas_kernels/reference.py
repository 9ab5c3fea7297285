"""Pure-jnp references for every kernel (docs/design.md §5; families A, C, D).

These are the ground truth for the tests and what the dispatchers run on CPU; JAX autodiff
differentiates them. Kernel layout throughout: K (n, m), a (n, r), b (r, m), y = x @ K.
Sparse entries: flat indices into the paper-layout (m, n) matrix, (row, col) = divmod(idx, n).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels._common import (
    check_lowrank,
    check_shape,
    check_sparse,
    flatten_tokens,
    resolve_path,
    split_flat_index,
    unflatten_tokens,
)


def _core_gate(t, core=None, gate=None):
    """t [@ core] [* gate]: the r x r core acts on the right of the (.., r) panel t."""
    if core is not None:
        t = t @ core
    if gate is not None:
        t = t * gate
    return t


def lowrank_term(x2d, a, b, s, core=None, gate=None):
    """s·((x @ a) [@ core] [* gate]) @ b (family A; core applied as t @ core)."""
    return s * (_core_gate(x2d @ a, core, gate) @ b)


def lowrank_weight(a, b, s, core=None, gate=None):
    """Kernel-layout (n, m) weight of the low-rank term: s·((a [@ core]) [* gate]) @ b."""
    return s * (_core_gate(a, core, gate) @ b)


def sparse_term(x2d, idx, val, m: int, n: int):
    """Gather-based x @ scatter(idx, val)ᵀ: y[:, row] += val·x[:, col] (family C).

    Memory: a (tokens, k) panel, never an (m, n) array (nor in its autodiff gradient).
    """
    rows, cols = split_flat_index(idx, n)
    contrib = x2d[:, cols] * val
    return jax.ops.segment_sum(contrib.T, rows, num_segments=m).T


def scatter_delta(idx, val, m: int, n: int):
    """Dense paper-layout delta ΔW (m, n) with ΔW.flat[idx] += val (duplicates add)."""
    return jnp.zeros((m * n,), val.dtype).at[idx].add(val).reshape(m, n)


def reference_apply(x2d, *, m: int, n: int, K=None, a=None, b=None, core=None, gate=None,
                    s=1.0, idx=None, val=None, path: str = "sparse"):
    """x @ K + lowrank + sparse on 2-D x; path="dense" scatters the delta then does one GEMM."""
    y = jnp.zeros((x2d.shape[0], m), x2d.dtype) if K is None else x2d @ K
    if path == "dense":
        w = None
        if a is not None:
            w = lowrank_weight(a, b, s, core, gate)
        if idx is not None:
            delta = scatter_delta(idx, val, m, n).T
            w = delta if w is None else w + delta
        return y if w is None else y + x2d @ w
    if a is not None:
        y = y + lowrank_term(x2d, a, b, s, core, gate)
    if idx is not None:
        y = y + sparse_term(x2d, idx, val, m, n)
    return y


def fused_lora_matmul_reference(x, K, a, b, s, core=None, gate=None):
    """Reference for `fused_lora_matmul`: x @ K + s·((x @ a) [@ core] [* gate]) @ b."""
    n, m = K.shape
    check_lowrank(n, m, a, b, core, gate)
    x2d, lead = flatten_tokens(x, n)
    y = reference_apply(x2d, m=m, n=n, K=K, a=a, b=b, core=core, gate=gate, s=s)
    return unflatten_tokens(y, lead)


def linear_sparse_delta_reference(x, K, idx, val, path: str = "sparse"):
    """Reference for `linear_sparse_delta`: x @ (K + scatter(idx, val)ᵀ), gather or dense."""
    n, m = K.shape
    check_sparse(idx, val)
    x2d, lead = flatten_tokens(x, n)
    path = resolve_path(path, idx.shape[0], m, n)
    y = reference_apply(x2d, m=m, n=n, K=K, idx=idx, val=val, path=path)
    return unflatten_tokens(y, lead)


def fused_lr_sparse_matmul_reference(x, a, b, idx, val, s, K=None, path: str = "sparse"):
    """Reference for `fused_lr_sparse_matmul`: x @ (s·a @ b + Sᵀ) [+ x @ K] (SLTrain)."""
    n, m = a.shape[0], b.shape[1]
    check_lowrank(n, m, a, b, None, None)
    check_shape("K", K, (n, m))
    check_sparse(idx, val)
    x2d, lead = flatten_tokens(x, n)
    path = resolve_path(path, idx.shape[0], m, n)
    y = reference_apply(x2d, m=m, n=n, K=K, a=a, b=b, s=s, idx=idx, val=val, path=path)
    return unflatten_tokens(y, lead)
