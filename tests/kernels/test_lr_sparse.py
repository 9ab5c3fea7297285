"""fused_lr_sparse_matmul (SLTrain W = s·BA + S): kernel vs reference."""

import jax.numpy as jnp
import pytest

import pallas_kernels as pk
from tests.kernels._helpers import SMALL, assert_close, assert_matches, normal, sparse_support

T, N, M, R, NNZ = 36, 40, 56, 6, 90


def operands():
    idx = sparse_support(4, M, N, NNZ)
    return (normal(0, (T, N)), normal(1, (N, R)) / N ** 0.5, normal(2, (R, M)), idx,
            normal(3, (NNZ,)), normal(5, (N, M)))


@pytest.mark.parametrize("with_base", [False, True])
def test_forward_and_grads_match_reference(with_base):
    """Values and jax.grad w.r.t. x, a, b, val and s; the optional base K is frozen. Also the
    factored output equals x @ (s·a@b + Sᵀ [+ K]) with the merged weight (factored == materialised)."""
    x, a, b, idx, val, K = operands()
    K = K if with_base else None
    s = jnp.float32(1.5)

    def bind(fn, **kw):
        return lambda x, a, b, val, s: fn(x, a, b, idx, val, s, K, **kw)

    y, _ = assert_matches(bind(pk.fused_lr_sparse_matmul, impl="kernel", blocks=SMALL),
                          bind(pk.fused_lr_sparse_matmul_reference),
                          (x, a, b, val, s), (0, 1, 2, 3, 4), normal(6, (T, M)))
    merged = s * a @ b + pk.scatter_delta(idx, val, M, N).T
    assert_close(y, x @ (merged if K is None else merged + K))
