"""The kernel path lowers for GPU (Triton) and TPU (Mosaic) from this CPU-only machine.

This checks only that pallas_call lowering accepts the kernels, forward and backward (block
shapes, primitives, control flow); it neither compiles them with Triton/Mosaic nor runs them.
"""

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels as pk
import pallas_kernels._dispatch as dispatch
from tests.kernels._helpers import normal, sparse_support

T, N, M, R, NNZ = 64, 128, 128, 8, 100


def _loss(x, a, b, core, gate, val):
    idx = sparse_support(0, M, N, NNZ)
    K = jnp.ones((N, M))
    y = pk.fused_lora_matmul(x, K, a, b, 0.5, core, gate, impl="kernel")
    y += pk.linear_sparse_delta(x, K, idx, val, impl="kernel")
    y += pk.fused_lr_sparse_matmul(x, a, b, idx, val, 0.5, impl="kernel")
    return jnp.sum(y * y)


@pytest.mark.parametrize("platform,lowered_as", [("gpu", "cuda"), ("tpu", "tpu")])
def test_forward_and_backward_lower(monkeypatch, platform, lowered_as):
    monkeypatch.setattr(dispatch, "platform", lambda: platform)
    args = (normal(1, (T, N)), normal(2, (N, R)), normal(3, (R, M)), normal(4, (R, R)),
            normal(5, (R,)), normal(6, (NNZ,)))
    grad = jax.jit(jax.grad(_loss, argnums=range(6)))
    text = grad.trace(*args).lower(lowering_platforms=(lowered_as,)).as_text()
    marker = "triton" if platform == "gpu" else "tpu_custom_call"
    # 3 forward + 3 backward fused calls, 2 projections each for the 2 low-rank ops, 2 sddmm.
    assert text.count(marker) >= 8
