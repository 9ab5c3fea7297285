"""Linear layer plus a sparse delta (family C; docs/design.md §5)."""

from __future__ import annotations

from pallas_kernels._common import check_sparse, resolve_path
from pallas_kernels._dispatch import dispatch


def linear_sparse_delta(x, K, idx, val, *, path: str = "sparse", impl: str = "auto",
                        blocks=None):
    """y = x @ (K + Sᵀ) with S = scatter(idx, val) the paper-layout (m, n) sparse delta.

    x (..., n); K (n, m) frozen kernel layout; idx int32[k] sorted unique flat indices into
    (m, n) row-major, (row, col) = divmod(idx, n); val (k,).

    path="sparse" (default): gather-based, y[:, row] += val·x[:, col]; no (m, n) array in the
    forward or backward. Backward: dval = Σ_tokens g[:, row]·x[:, col] (sampled product), dx
    includes the sparse term. In the kernel the in-tile gather/scatter are one-hot matmuls, so the
    sparse term costs about density·(out + inner) times the dense tile GEMM: prefer the dense path
    above ~1% density unless memory matters more.
    path="dense": scatter into a zero (m, n) then one GEMM (XLA on every backend; dval = G[idx]
    of the dense gradient). path="auto": dense above DENSE_DENSITY_THRESHOLD.
    K is frozen in every impl (zero gradient); gradients flow to x and val.
    """
    n, m = K.shape
    check_sparse(idx, val)
    path = resolve_path(path, idx.shape[0], m, n)
    return dispatch(x, m=m, n=n, impl=impl, blocks=blocks, path=path, K=K, idx=idx, val=val)
