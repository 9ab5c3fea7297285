"""The sparse backward never forms an (m, n) float array; the dense fallback does."""

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels as pk
from tests.kernels._helpers import float_outputs_of_shape, normal, sparse_support

T, N, M, R, NNZ = 16, 128, 256, 4, 64
MN_SHAPES = {(M, N), (N, M)}
BLOCKS = pk.Blocks(tokens=16, out=64, inner=64, chunk=16)


def _sparse_delta_grad(impl, path):
    idx = sparse_support(0, M, N, NNZ)

    def loss(x, K, val):
        return jnp.sum(pk.linear_sparse_delta(x, K, idx, val, path=path, impl=impl,
                                              blocks=BLOCKS) ** 2)

    args = (normal(1, (T, N)), normal(2, (N, M)), normal(3, (NNZ,)))
    return jax.grad(loss, argnums=(0, 2)), args


def _lr_sparse_grad(impl, path):
    idx = sparse_support(0, M, N, NNZ)

    def loss(x, a, b, val):
        return jnp.sum(pk.fused_lr_sparse_matmul(x, a, b, idx, val, 0.5, path=path, impl=impl,
                                                 blocks=BLOCKS) ** 2)

    args = (normal(1, (T, N)), normal(4, (N, R)), normal(5, (R, M)), normal(3, (NNZ,)))
    return jax.grad(loss, argnums=(0, 1, 2, 3)), args


@pytest.mark.parametrize("impl", ["reference", "kernel"])
def test_sparse_delta_grad_has_no_mn_intermediate(impl):
    """Only the frozen K itself is (n, m) (its stop_gradient is skipped: no copy, no gradient)."""
    grad, args = _sparse_delta_grad(impl, "sparse")
    assert float_outputs_of_shape(jax.make_jaxpr(grad)(*args), MN_SHAPES) == []
    dense_grad, _ = _sparse_delta_grad(impl, "dense")
    assert float_outputs_of_shape(jax.make_jaxpr(dense_grad)(*args), MN_SHAPES)


@pytest.mark.parametrize("impl", ["reference", "kernel"])
def test_lr_sparse_grad_has_no_mn_array_at_all(impl):
    """SLTrain without a base: nothing (m, n)-shaped anywhere, not even K."""
    grad, args = _lr_sparse_grad(impl, "sparse")
    assert float_outputs_of_shape(jax.make_jaxpr(grad)(*args), MN_SHAPES, skip=()) == []
    dense_grad, _ = _lr_sparse_grad(impl, "dense")
    assert float_outputs_of_shape(jax.make_jaxpr(dense_grad)(*args), MN_SHAPES, skip=())


def test_compiled_temporaries_stay_below_one_mn_buffer():
    """XLA's own accounting (CPU reference path): sparse temps < m·n·4 bytes <= dense temps."""
    mn_bytes = M * N * 4
    temps = {}
    for path in ("sparse", "dense"):
        grad, args = _sparse_delta_grad("reference", path)
        stats = jax.jit(grad).lower(*args).compile().memory_analysis()
        temps[path] = stats.temp_size_in_bytes
    assert temps["sparse"] < mn_bytes <= temps["dense"], temps
