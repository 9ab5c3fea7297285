"""Fused low-rank + sparse matmul, SLTrain-style (family D; docs/design.md §5)."""

from __future__ import annotations

from pallas_kernels._common import check_lowrank, check_shape, check_sparse, resolve_path
from pallas_kernels._dispatch import dispatch


def fused_lr_sparse_matmul(x, a, b, idx, val, s, K=None, *, path: str = "sparse",
                           impl: str = "auto", blocks=None):
    """y = x @ (s·a @ b + Sᵀ) [+ x @ K]: SLTrain W = s·BA + S, optionally over a frozen base.

    Kernel layout: x (..., n), a (n, r), b (r, m), optional frozen K (n, m); S = scatter(idx, val)
    is the paper-layout (m, n) sparse part with flat row-major indices (see
    `linear_sparse_delta`). One fused call per (token tile, out tile) adds the low-rank term
    (t = x @ a computed once per token tile) and the gather-based sparse term, never densifying S.
    Gradients: x, a, b, val, s; K (if given) is frozen. path/impl/blocks as in
    `linear_sparse_delta` (path="dense" materialises s·a@b + Sᵀ and does one GEMM).
    """
    n, m = a.shape[0], b.shape[1]
    check_lowrank(n, m, a, b, None, None)
    check_shape("K", K, (n, m))
    check_sparse(idx, val)
    path = resolve_path(path, idx.shape[0], m, n)
    return dispatch(x, m=m, n=n, impl=impl, blocks=blocks, path=path, K=K, a=a, b=b, s=s,
                    idx=idx, val=val)
