"""Dispatcher behaviour shared by all kernels: backend choice and the frozen base K."""

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels as pk
from tests.kernels._helpers import SMALL, linear_loss, normal, pallas_calls, sparse_support

T, N, M, R, NNZ = 20, 40, 48, 3, 30


def _calls(impl):
    """Each public kernel as fn(x, K) with the other operands fixed."""
    a, b = normal(1, (N, R)), normal(2, (R, M))
    idx, val = sparse_support(3, M, N, NNZ), normal(4, (NNZ,))
    opts = dict(impl=impl, blocks=SMALL)
    return {
        "lora": lambda x, K: pk.fused_lora_matmul(x, K, a, b, 0.5, **opts),
        "sparse": lambda x, K: pk.linear_sparse_delta(x, K, idx, val, **opts),
        "lr_sparse": lambda x, K: pk.fused_lr_sparse_matmul(x, a, b, idx, val, 0.5, K, **opts),
    }


def test_auto_is_kernel_only_on_accelerators():
    """On this CPU-only machine "auto" is the reference; a forced kernel runs interpreted."""
    accel = pk.on_accelerator()
    assert accel == (jax.default_backend() != "cpu")
    assert pk.resolve_impl("auto") == ("kernel" if accel else "reference")
    assert pk.resolve_impl("kernel") == "kernel"
    assert pk.resolve_impl("reference") == "reference"
    with pytest.raises(ValueError, match="impl"):
        pk.resolve_impl("triton")
    x, K = normal(0, (T, N)), normal(5, (N, M))
    for name, fn in _calls("auto").items():
        assert bool(pallas_calls(jax.make_jaxpr(fn)(x, K))) == accel, name
    for name, fn in _calls("kernel").items():
        calls = pallas_calls(jax.make_jaxpr(fn)(x, K))
        assert calls and all(bool(c.params["interpret"]) != accel for c in calls), name


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_frozen_base_gets_zero_gradient(impl):
    """K is frozen in every impl: jax.grad w.r.t. K is exactly zero (not the autodiff x^T g)."""
    x, K, ct = normal(0, (T, N)), normal(5, (N, M)), normal(6, (T, M))
    fns = _calls(impl)
    grads = jax.jit(lambda K: [jax.grad(linear_loss(lambda K, f=f: f(x, K), ct))(K)
                               for f in fns.values()])(K)
    for name, dK in zip(fns, grads):
        assert dK.shape == K.shape, name
        assert float(jnp.max(jnp.abs(dK))) == 0.0, name
