"""linear_sparse_delta: gather-based kernel vs references, forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from tests.kernels._helpers import (
    SMALL,
    assert_close,
    assert_matches,
    float_outputs_of_shape,
    normal,
    sparse_support,
    value_and_vjp,
)

# 24 tokens, n=48, m=80: padding on every axis of the 32-wide tiles.
T, N, M = 24, 48, 80


def support():
    """Random entries plus a dense 2x20 patch in block (0, 0), so that block spans several
    16-slot chunks while other blocks stay empty or partly filled."""
    patch = (np.arange(2)[:, None] * N + np.arange(20)[None, :]).reshape(-1)
    idx = np.unique(np.concatenate([np.asarray(sparse_support(7, M, N, 60)), patch]))
    return jnp.asarray(idx, jnp.int32)


def operands():
    idx = support()
    return normal(0, (T, N)), normal(1, (N, M)), idx, normal(2, idx.shape)


def kernel(x, K, idx, val, path="sparse"):
    return pk.linear_sparse_delta(x, K, idx, val, path=path, impl="kernel", blocks=SMALL)


@pytest.fixture(scope="module")
def kernel_vjp():
    """Kernel value and (dx, dval) for one random cotangent, compiled once for this module."""
    x, K, idx, val = operands()
    ct = normal(3, (T, M))
    y, grads = assert_matches(lambda x, val: kernel(x, K, idx, val),
                              lambda x, val: pk.linear_sparse_delta_reference(x, K, idx, val),
                              (x, val), (0, 1), ct)
    return ct, y, grads


def test_forward_and_grads_match_reference(kernel_vjp):
    """Checked inside the fixture (forward, dx, dval vs the reference's autodiff)."""
    _, y, (dx, dval) = kernel_vjp
    assert y.shape == (T, M) and dx.shape == (T, N) and dval.shape == support().shape


def test_dense_fallback_matches_sparse_path():
    x, K, idx, val = operands()
    ct = normal(3, (T, M))
    sparse = value_and_vjp(lambda x, val: pk.linear_sparse_delta_reference(x, K, idx, val),
                           (x, val), (0, 1), ct)
    dense = value_and_vjp(lambda x, val: kernel(x, K, idx, val, path="dense"),
                          (x, val), (0, 1), ct)
    for got, want in zip(jax.tree.leaves(dense), jax.tree.leaves(sparse)):
        assert_close(got, want)


def test_dval_is_the_dense_gradient_at_the_support(kernel_vjp):
    """dL/dval == G[idx] with G = δyᵀ x the paper-layout (m, n) dense gradient,
    and the kernel's dx includes the sparse term."""
    x, K, idx, val = operands()
    ct, _, (dx, dval) = kernel_vjp
    dense_grad = (ct.T @ x).reshape(-1)
    assert_close(dval, dense_grad[idx])
    w_eff = K + pk.scatter_delta(idx, val, M, N).T
    assert_close(dx, ct @ w_eff.T)


def test_leading_batch_dims_and_empty_support():
    x, K, _, _ = operands()
    x3 = x.reshape(2, 12, N)
    idx, val = jnp.zeros((0,), jnp.int32), jnp.zeros((0,), jnp.float32)
    y, (dval,) = value_and_vjp(lambda val: kernel(x3, K, idx, val), (val,), (0,),
                               normal(3, (2, 12, M)))
    assert y.shape == (2, 12, M) and dval.shape == (0,)
    assert_close(y, x3 @ K)


def test_path_selection():
    x, K, idx, val = operands()
    k = idx.shape[0]
    assert k > pk.DENSE_DENSITY_THRESHOLD * M * N  # this support is "dense" by the rule
    auto = jax.make_jaxpr(lambda v: pk.linear_sparse_delta(x, K, idx, v, path="auto"))(val)
    sparse = jax.make_jaxpr(lambda v: pk.linear_sparse_delta(x, K, idx, v, path="sparse"))(val)
    densified = [bool(float_outputs_of_shape(j, {(M, N), (N, M)})) for j in (auto, sparse)]
    assert densified == [True, False]
    with pytest.raises(ValueError, match="path"):
        pk.linear_sparse_delta(x, K, idx, val, path="csr")
    with pytest.raises(ValueError, match="val must have shape"):
        pk.linear_sparse_delta(x, K, idx, val[:-1])
    with pytest.raises(ValueError, match="idx must be a 1-D integer"):
        pk.linear_sparse_delta(x, K, idx.astype(jnp.float32), val)


def test_unsorted_support_is_order_independent():
    """The kernel re-buckets entries itself; a permuted (idx, val) gives the same result."""
    x, K, idx, val = operands()
    perm = np.random.default_rng(0).permutation(idx.shape[0])
    y = jax.jit(kernel)(x, K, idx, val)
    assert_close(jax.jit(kernel)(x, K, idx[perm], val[perm]), y)
